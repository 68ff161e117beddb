"""The procedural DiffusionDB mirror: DiffusionDB's layout, determinism, filter bait, prompt-driven images."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipeline.data.sample_data import COLORS, METADATA_SCHEMA, Attributes, generate_sample_mirror, render

UUID_PNG = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.png")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mirror")
    keys = generate_sample_mirror(root, n_parts=3, images_per_part=40, seed=3, image_size=64)
    assert keys == ["part-000001", "part-000002", "part-000003"]
    return root


@pytest.fixture(scope="module")
def bait_prompts(tmp_path_factory) -> pl.Series:
    """A mirror large enough for realistic proportions (images kept tiny: only prompts matter here)."""
    root = tmp_path_factory.mktemp("bait")
    generate_sample_mirror(root, n_parts=4, images_per_part=250, seed=0, image_size=16)
    return pl.read_parquet(root / "metadata.parquet")["prompt"]


def test_layout_is_diffusiondb(mirror):
    assert sorted(p.name for p in mirror.iterdir()) == ["images", "metadata.parquet"]
    zips = sorted(p.name for p in (mirror / "images").iterdir())
    assert zips == ["part-000001.zip", "part-000002.zip", "part-000003.zip"]
    names_all = []
    for zip_name in zips:
        key = zip_name.removesuffix(".zip")
        with zipfile.ZipFile(mirror / "images" / zip_name) as zf:
            names = zf.namelist()
            entries = json.loads(zf.read(f"{key}.json").decode("utf-8"))
            pngs = [n for n in names if n != f"{key}.json"]
            assert len(pngs) == 40 and all(UUID_PNG.fullmatch(n) for n in pngs)
            assert list(entries) == pngs  # one entry per image, in archive order
            for entry in entries.values():
                assert set(entry) == {"p", "se", "c", "st", "sa"}
                assert isinstance(entry["p"], str) and isinstance(entry["sa"], str)
                assert isinstance(entry["se"], int) and isinstance(entry["st"], int)
                assert isinstance(entry["c"], float)
            with Image.open(io.BytesIO(zf.read(pngs[0]))) as img:
                assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
        names_all += pngs
    meta = pl.read_parquet(mirror / "metadata.parquet")
    assert dict(meta.schema) == METADATA_SCHEMA
    assert meta.height == 120 and meta["image_name"].to_list() == names_all
    assert meta["part_id"].unique().sort().to_list() == [1, 2, 3]
    assert meta["width"].unique().to_list() == [64]


def test_metadata_matches_json(mirror):
    meta = pl.read_parquet(mirror / "metadata.parquet").filter(pl.col("part_id") == 2)
    with zipfile.ZipFile(mirror / "images" / "part-000002.zip") as zf:
        entries = json.loads(zf.read("part-000002.json"))
    for row in meta.iter_rows(named=True):
        entry = entries[row["image_name"]]
        assert row["prompt"] == entry["p"] and row["seed"] == entry["se"] and row["step"] == entry["st"]
        assert row["cfg"] == pytest.approx(entry["c"])


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_sample_mirror(a, n_parts=2, images_per_part=12, seed=7, image_size=32)
    generate_sample_mirror(b, n_parts=2, images_per_part=12, seed=7, image_size=32)
    generate_sample_mirror(c, n_parts=2, images_per_part=12, seed=8, image_size=32)
    assert _files(a) == _files(b)
    assert _files(a)["images/part-000001.zip"] != _files(c)["images/part-000001.zip"]


def test_adding_a_part_later_matches_one_go(tmp_path):
    later, once = tmp_path / "later", tmp_path / "once"
    generate_sample_mirror(later, n_parts=2, images_per_part=10, seed=1, image_size=32)
    before = _files(later)
    assert generate_sample_mirror(later, n_parts=1, images_per_part=10, seed=1, image_size=32, first_part=3) == [
        "part-000003"
    ]
    generate_sample_mirror(once, n_parts=3, images_per_part=10, seed=1, image_size=32)
    after = _files(later)
    # old parts untouched, the new part as it would have been, metadata covering all three
    assert {k: after[k] for k in before if k.endswith(".zip")} == {
        k: v for k, v in before.items() if k.endswith(".zip")
    }
    assert after["images/part-000003.zip"] == _files(once)["images/part-000003.zip"]
    assert pl.read_parquet(later / "metadata.parquet").equals(pl.read_parquet(once / "metadata.parquet"))
    assert not [p for p in later.rglob("*") if ".tmp" in p.name]


def test_filter_bait_present_in_realistic_proportion(bait_prompts):
    prompts = bait_prompts
    n = prompts.len()
    stripped = prompts.str.strip_chars()
    surrounding = ((prompts != stripped) & (stripped != "")).sum()
    empty = (prompts == "").sum()
    blank = ((prompts != "") & (stripped == "")).sum()
    non_ascii = stripped.str.contains(r"[^\x00-\x7F]").sum()
    clean = stripped.filter(stripped != "")
    duplicates = clean.len() - clean.n_unique()  # rows repeating an earlier prompt exactly
    distinct = clean.unique()
    shared_prefix = distinct.str.slice(0, 50).is_duplicated().sum()
    shared_suffix = distinct.str.slice(-50).is_duplicated().sum()
    for name, count in {
        "surrounding whitespace": surrounding,
        "empty": empty,
        "whitespace-only": blank,
        "non-ASCII": non_ascii,
        "exact duplicates": duplicates,
        "distinct prompts sharing a 50-char prefix": shared_prefix,
        "distinct prompts sharing a 50-char suffix": shared_suffix,
    }.items():
        assert 0 < count < 0.2 * n, f"{name}: {count} of {n}"
    # most prompts look like DiffusionDB's and survive
    assert 0.6 * n < (~clean.str.contains(r"[^\x00-\x7F]")).sum() <= n
    # tags no image shows are kept to a minority so that tiny models can learn (sample_data._tail)
    assert 0.2 < clean.str.contains("trending on artstation|4k|8k|hd").mean() < 0.8
    assert clean.str.contains(r"\bby [a-z]").mean() > 0.9


def test_prompt_names_every_attribute(mirror):
    meta = pl.read_parquet(mirror / "metadata.parquet")
    prompts = meta["prompt"].str.strip_chars().filter(meta["prompt"].str.strip_chars() != "")
    assert prompts.str.contains(r"\b(circles?|squares?|triangles?|stars?|hexagons?)\b").all()
    assert prompts.str.contains(r"\b(a single|two|three|four)\b").all()
    assert prompts.str.contains(r"\b(" + "|".join(COLORS) + r") background\b").all()


def _mean(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0)


def _render(**changes) -> Image.Image:
    attrs = dict(color="red", shape="circle", count=1, background="white", style="plain") | changes
    return render(Attributes(**attrs), 128, np.random.default_rng(0))


def test_images_depend_on_each_attribute():
    red, blue = _mean(_render(color="red")), _mean(_render(color="blue"))
    assert red[0] > blue[0] + 25 and blue[2] > red[2] + 25  # object colour shows
    on_black = _mean(_render(background="black"))
    assert on_black.sum() < _mean(_render()).sum() - 200  # background colour shows

    def mask(img):
        a = np.asarray(img, dtype=np.int16)
        return np.abs(a - np.array(COLORS["red"])).sum(axis=2) < 60

    def object_share(img):
        return float(mask(img).mean())

    shapes = ("circle", "square", "triangle", "star", "hexagon")
    masks = {shape: mask(_render(shape=shape)) for shape in shapes}
    for i, a in enumerate(shapes):
        for b in shapes[i + 1 :]:
            assert (masks[a] ^ masks[b]).mean() > 0.02, (a, b)  # each shape draws a different silhouette
    assert masks["star"].mean() < masks["square"].mean() and masks["triangle"].mean() < masks["circle"].mean()
    one, four = object_share(_render(count=1)), object_share(_render(count=4))
    assert one != four
    plain = np.asarray(_render(), dtype=np.float64)
    lineart = object_share(_render(style="lineart"))
    assert 0 < lineart < 0.5 * object_share(_render())  # outlines only
    noise = np.asarray(_render(style="noise"), dtype=np.float64)
    assert noise[:10, :10].std() > plain[:10, :10].std() + 10  # grain on a flat corner
    blur = np.asarray(_render(style="blur"), dtype=np.float64)
    assert np.abs(np.diff(blur, axis=1)).max() < np.abs(np.diff(plain, axis=1)).max()  # no hard edge
    poster = np.asarray(_render(style="posterize", background="gray"), dtype=np.uint8)
    assert set(np.unique(poster)) <= {0, 64, 128, 192}  # 2 bits per channel


def test_plain_images_show_their_named_background(mirror):
    """End to end through the files: the corner of a plain image is the background the prompt names."""
    palette = {name: np.array(rgb) for name, rgb in COLORS.items()}
    checked = 0
    for key in ("part-000001", "part-000002"):
        with zipfile.ZipFile(mirror / "images" / f"{key}.zip") as zf:
            entries = json.loads(zf.read(f"{key}.json"))
            for name, entry in entries.items():
                prompt = entry["p"].strip()
                match = re.search(r"\b(\w+) background\b", prompt)
                if not match or re.search(r"blurry|posterized|film grain|line art", prompt):
                    continue
                pixel = np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("RGB"))[1, 1].astype(int)
                nearest = min(palette, key=lambda c: np.abs(palette[c] - pixel).sum())
                assert nearest == match.group(1), (prompt, pixel)
                checked += 1
    assert checked >= 5


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_sample_mirror(tmp_path, n_parts=1, images_per_part=0)
    with pytest.raises(ValueError):
        generate_sample_mirror(tmp_path, n_parts=1, first_part=0)
