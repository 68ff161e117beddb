"""The DiffusionDB source (local twin of the hub path), the part reader on good and hostile archives, and
pipeline.data.images' decode / validate / re-encode."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.diffusiondb import (
    FRAME_SCHEMA,
    CorruptArchiveError,
    DiffusionDBSource,
    read_part,
    validate_part_key,
)
from pipeline.data.images import ImageError, open_image, reencode_image
from pipeline.data.sample_data import generate_sample_mirror

PART = "part-000007"


# -- helpers ------------------------------------------------------------------------------------------


def _png(color=(200, 30, 30), size=(48, 48), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG header declaring width x height pixels, with a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _entry(prompt, seed=1) -> dict:
    return {"p": prompt, "se": seed, "c": 7.5, "st": 50, "sa": "k_lms"}


def _write_zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


def _snapshot(*dirs: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for d in dirs for p in d.rglob("*")}


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mirror")
    generate_sample_mirror(root, n_parts=2, images_per_part=30, seed=5, image_size=96)
    return root


# -- the reader on a generated part --------------------------------------------------------------------


def test_reads_every_record_of_a_generated_part(mirror):
    zip_path = mirror / "images" / "part-000002.zip"
    with zipfile.ZipFile(zip_path) as zf:
        entries = json.loads(zf.read("part-000002.json"))
    result = read_part(zip_path, "part-000002", image_size=64)
    frame = result.frame
    assert dict(frame.schema) == FRAME_SCHEMA
    assert result.skipped == [] and result.counts == {}
    assert frame.height == 30 and frame["image_id"].to_list() == list(entries)
    assert frame["part"].unique().to_list() == ["part-000002"]
    # prompts are raw: whitespace bait is not stripped here
    assert frame["prompt"].to_list() == [e["p"] for e in entries.values()]
    assert frame["seed"].to_list() == [e["se"] for e in entries.values()]
    assert frame["steps"].to_list() == [e["st"] for e in entries.values()]
    assert frame["sampler"].to_list() == [e["sa"] for e in entries.values()]
    assert frame["width"].unique().to_list() == [96] and frame["height"].unique().to_list() == [96]
    for data in frame["image"].head(5):
        img = open_image(data)
        assert img.size == (64, 64) and img.mode == "RGB"


def test_reencoded_image_keeps_the_picture(mirror):
    zip_path = mirror / "images" / "part-000001.zip"
    frame = read_part(zip_path, "part-000001", image_size=96).frame
    with zipfile.ZipFile(zip_path) as zf:
        name = frame["image_id"][0]
        original = np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("RGB"), dtype=np.float64)
    stored = np.asarray(open_image(frame["image"][0]), dtype=np.float64)
    assert np.abs(original - stored).mean() < 8  # JPEG q95, same size: close to the source


# -- hostile archives ----------------------------------------------------------------------------------


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """One archive with three good records and one of every kind of bad record."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # anything written relative to the cwd would show up here
    good = {f"good-{i}.png": _png((40 * i, 100, 200)) for i in range(3)}
    entries = {name: _entry(f"  good prompt {i} ") for i, name in enumerate(good)}
    entries["good-2.png"]["p"] = None  # a null prompt is kept (the filter counts it), not skipped
    entries.update(
        {
            "../evil.png": _entry("escape"),
            "/abs.png": _entry("absolute"),
            "C:/drive.png": _entry("drive"),
            "sub/../../up.png": _entry("nested escape"),
            "link.png": _entry("symlink"),
            "zero.png": _entry("zero bytes"),
            "garbage.png": _entry("not an image"),
            "truncated.png": _entry("half a png"),
            "bomb.png": _entry("bomb"),
            "no-image.png": _entry("entry without image"),
            "number-prompt.png": _entry(12345),
            "list-entry.png": ["not", "an", "object"],
        }
    )
    entries["good-1.png"]["se"] = "not a number"  # bad metadata value -> null, record kept
    members = [
        *good.items(),
        ("../evil.png", _png()),
        ("/abs.png", _png()),
        ("C:/drive.png", _png()),
        ("sub/../../up.png", _png()),
        (_symlink_info("link.png"), b"/etc/passwd"),
        ("zero.png", b""),
        ("garbage.png", os.urandom(300)),
        ("truncated.png", _png(size=(256, 256))[:60]),
        ("bomb.png", _bomb_png()),
        ("no-entry.png", _png()),
        ("number-prompt.png", _png()),
        ("list-entry.png", _png()),
        (f"{PART}.json", json.dumps(entries).encode()),
    ]
    zip_path = _write_zip(tmp_path / f"{PART}.zip", members)
    return zip_path, tmp_path, work


def test_hostile_archive_keeps_good_records_and_counts_bad_ones(hostile):
    zip_path, tmp_path, work = hostile
    before = _snapshot(tmp_path)
    result = read_part(zip_path, PART, image_size=32)
    assert _snapshot(tmp_path) == before  # nothing written, not even next to the archive or in the cwd
    assert not Path("/abs.png").exists() and not (tmp_path / "evil.png").exists()

    frame = result.frame
    assert frame["image_id"].to_list() == ["good-0.png", "good-1.png", "good-2.png"]
    assert frame["prompt"].to_list() == ["  good prompt 0 ", "  good prompt 1 ", None]
    assert frame["seed"].to_list() == [1, None, 1]
    assert all(open_image(b).size == (32, 32) for b in frame["image"])

    reasons = {s["id"]: s["reason"] for s in result.skipped}
    assert reasons == {
        "../evil.png": "unsafe_member_name",
        "/abs.png": "unsafe_member_name",
        "C:/drive.png": "unsafe_member_name",
        "sub/../../up.png": "unsafe_member_name",
        "link.png": "symlink_member",
        "zero.png": "empty_image",
        "garbage.png": "undecodable_image",
        "truncated.png": "undecodable_image",
        "bomb.png": "image_too_large",
        "no-entry.png": "image_without_entry",
        "no-image.png": "entry_without_image",
        "number-prompt.png": "prompt_not_text",
        "list-entry.png": "entry_not_object",
    }
    assert len(result.skipped) == len(reasons)  # each bad record counted once
    assert result.counts == {
        "unsafe_member_name": 4,
        "symlink_member": 1,
        "empty_image": 1,
        "undecodable_image": 2,
        "image_too_large": 1,
        "image_without_entry": 1,
        "entry_without_image": 1,
        "prompt_not_text": 1,
        "entry_not_object": 1,
    }


def test_corrupt_member_is_skipped_not_fatal(tmp_path):
    a, b = _png((10, 200, 10)), _png((10, 10, 200))
    path = _write_zip(
        tmp_path / f"{PART}.zip",
        [
            ("a.png", a),
            ("b.png", b),
            (f"{PART}.json", json.dumps({"a.png": _entry("a"), "b.png": _entry("b")}).encode()),
        ],
    )
    raw = bytearray(path.read_bytes())
    start = raw.find(b)  # stored uncompressed: flip a byte inside b.png's data -> bad CRC
    raw[start + 40] ^= 0xFF
    path.write_bytes(bytes(raw))
    result = read_part(path, PART, image_size=16)
    assert result.frame["image_id"].to_list() == ["a.png"]
    assert result.skipped == [{"id": "b.png", "reason": "corrupt_member"}]


def _good_zip_bytes(tmp_path) -> bytes:
    path = _write_zip(
        tmp_path / "good.zip", [("a.png", _png()), (f"{PART}.json", json.dumps({"a.png": _entry("a")}).encode())]
    )
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "missing"])
def test_unreadable_archive_raises_naming_part_and_file(tmp_path, kind):
    path = tmp_path / "archive.zip"
    if kind == "truncated":
        path.write_bytes(_good_zip_bytes(tmp_path)[:-30])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(CorruptArchiveError) as err:
        read_part(path, PART)
    assert PART in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"[1, 2, 3]", b"\xff\xfe{\x00}\x00", b'{"a.png": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None],
    ids=["not-json", "not-object", "utf16", "nested-100000-deep", "missing"],
)
def test_untrusted_json_fails_the_part(tmp_path, payload):
    """Without a parseable JSON no prompt in the part is known: the part fails, naming itself (never another
    exception type, such as the RecursionError of deep nesting)."""
    members = [("a.png", _png())]
    if payload is not None:
        members.append((f"{PART}.json", payload))
    path = _write_zip(tmp_path / f"{PART}.zip", members)
    with pytest.raises(CorruptArchiveError) as err:
        read_part(path, PART)
    assert PART in str(err.value) and f"{PART}.zip" in str(err.value)


def test_lenient_json_costs_only_the_bad_entries(tmp_path):
    """Invalid UTF-8, lone surrogates, raw control characters and over-long numbers: each costs at most its
    own entry, never the part; what is kept can be stored as Parquet."""
    names = ["good.png", "latin1.png", "surrogate.png", "raw-ctrl.png", "escaped-ctrl.png", "bigint.png", "sa.png"]
    raw_json = (
        b'{"good.png": {"p": "a red cat", "se": 1},'
        b' "latin1.png": {"p": "caf\xe9 au lait", "se": 2},'  # a Latin-1 byte: not UTF-8
        b' "surrogate.png": {"p": "half \\ud800 pair", "se": 3},'  # valid JSON, not storable text
        b' "raw-ctrl.png": {"p": "tab\there\nnew line \x07 bell \x1b[31m", "se": 4},'  # raw, unescaped
        b' "escaped-ctrl.png": {"p": "nul \\u0000 esc \\u001b", "se": 5},'
        b' "bigint.png": {"p": "huge seed", "se": ' + b"9" * 5000 + b', "st": -' + b"9" * 30 + b"},"
        b' "sa.png": {"p": "odd sampler", "sa": "\\udc80"},'
        b' "\xff\xfe.png": {"p": "a key that is not UTF-8"}}'
    )
    members = [(name, _png((30 * i, 90, 160))) for i, name in enumerate(names)] + [(f"{PART}.json", raw_json)]
    path = _write_zip(tmp_path / f"{PART}.zip", members)
    result = read_part(path, PART, image_size=16)
    frame = result.frame
    assert frame["image_id"].to_list() == ["good.png", "raw-ctrl.png", "escaped-ctrl.png", "bigint.png", "sa.png"]
    assert frame["prompt"].to_list() == [
        "a red cat",
        "tab\there\nnew line \x07 bell \x1b[31m",
        "nul \x00 esc \x1b",
        "huge seed",
        "odd sampler",
    ]
    assert frame["seed"].to_list() == [1, 4, 5, None, None]
    assert frame["steps"].to_list() == [None] * 5 and frame["sampler"].to_list() == [None] * 5
    assert result.skipped == [
        {"id": "latin1.png", "reason": "prompt_not_utf8"},
        {"id": "surrogate.png", "reason": "prompt_not_utf8"},
        {"id": "\\udcff\\udcfe.png", "reason": "entry_without_image"},  # escaped: safe to log
    ]
    # the asset's next step: the kept records round-trip through Parquet
    from pipeline.storage import read_parquet, write_parquet

    write_parquet(frame, tmp_path / "out.parquet")
    assert read_parquet(tmp_path / "out.parquet").equals(frame)


def test_skipped_ids_are_escaped_for_logs(tmp_path):
    """A member name carrying terminal escapes or newlines is reported escaped, one line, bounded length."""
    hostile = "x\x1b[2J\n\rINFO fake log line" + "A" * 1000 + ".png"
    path = _write_zip(
        tmp_path / f"{PART}.zip",
        [(hostile, _png()), ("ok.png", _png()), (f"{PART}.json", json.dumps({"ok.png": _entry("fine")}).encode())],
    )
    result = read_part(path, PART, image_size=16)
    assert result.frame["image_id"].to_list() == ["ok.png"]
    [skipped] = result.skipped
    assert skipped["reason"] == "image_without_entry"
    assert skipped["id"].isprintable() and skipped["id"].startswith("x\\x1b[2J\\n\\r") and len(skipped["id"]) <= 200


def test_member_name_not_utf8_fails_the_part_loudly(tmp_path):
    """Python's zipfile cannot list an archive whose UTF-8-flagged name is not UTF-8: the part fails naming
    itself (a CorruptArchiveError, not a UnicodeDecodeError traceback)."""
    path = _write_zip(
        tmp_path / f"{PART}.zip",
        [("a\u00e9.png", _png()), (f"{PART}.json", json.dumps({"a\u00e9.png": _entry("x")}).encode())],
    )
    raw = path.read_bytes()
    assert raw.count("a\u00e9.png".encode()) == 2  # local header and central directory (the JSON escapes it)
    path.write_bytes(raw.replace("a\u00e9.png".encode(), b"a\xff\xfe.png"))
    with pytest.raises(CorruptArchiveError, match=PART):
        read_part(path, PART)


def test_read_part_rejects_bad_part_key(mirror):
    with pytest.raises(ValueError):
        read_part(mirror / "images" / "part-000001.zip", "../part-000001")


# -- the source ----------------------------------------------------------------------------------------


def test_local_source_lists_fetches_and_versions(tmp_path):
    root = tmp_path / "mirror"
    generate_sample_mirror(root, n_parts=2, images_per_part=5, seed=2, image_size=16)
    (root / "images" / "notes.txt").write_text("ignored")
    (root / "images" / "part-1.zip").write_bytes(b"ignored: not a part key")
    source = DiffusionDBSource(str(root))
    assert source.is_local
    parts = source.list_parts()
    assert list(parts) == ["part-000001", "part-000002"]
    assert all(len(v) == 64 for v in parts.values()) and parts["part-000001"] != parts["part-000002"]
    path = source.fetch_part("part-000002", cache_dir=tmp_path / "cache")
    assert path == (root / "images" / "part-000002.zip").resolve()
    assert not (tmp_path / "cache").exists()  # local parts are read in place, no copy
    first = source.revision_id()
    assert source.revision_id() == first == DiffusionDBSource(str(root)).revision_id()

    generate_sample_mirror(root, n_parts=1, images_per_part=5, seed=2, image_size=16, first_part=3)
    added = source.revision_id()
    assert added != first and list(source.list_parts()) == ["part-000001", "part-000002", "part-000003"]
    assert source.list_parts()["part-000001"] == parts["part-000001"]

    # same name and size, different content -> a new version (content hash, not size or mtime)
    target = root / "images" / "part-000003.zip"
    stat_before = target.stat()
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns + 1))
    assert source.revision_id() not in (first, added)
    assert source.list_parts()["part-000003"] != parts.get("part-000003")


@pytest.mark.parametrize(
    "key", ["../part-000001", "part-1", "part-0000011", "part-000001/../../x", "/etc/passwd", "", "PART-000001"]
)
def test_bad_part_keys_rejected(mirror, key):
    with pytest.raises(ValueError):
        validate_part_key(key)
    with pytest.raises(ValueError):
        DiffusionDBSource(str(mirror)).fetch_part(key)


def test_missing_part_and_missing_mirror(tmp_path, mirror):
    with pytest.raises(FileNotFoundError, match="part-000009"):
        DiffusionDBSource(str(mirror)).fetch_part("part-000009")
    missing = tmp_path / "no" / "such" / "mirror"
    with pytest.raises(ValueError, match=str(missing)):
        DiffusionDBSource(str(missing))


def test_hub_source_is_not_local_and_hides_its_token():
    source = DiffusionDBSource("poloclub/diffusiondb", revision="abc123", token="hf_secret_token")
    assert not source.is_local
    assert "hf_secret_token" not in repr(source) and "hf_secret_token" not in str(source)
    assert DiffusionDBSource().location == "poloclub/diffusiondb"


def test_hub_and_local_share_the_reader(tmp_path, mirror, monkeypatch):
    """The hub path ends in hf_hub_download's local file; from there it is the same read_part."""
    import huggingface_hub

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(mirror / "images" / "part-000001.zip")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    hub = DiffusionDBSource("poloclub/diffusiondb", revision="0123abc", token="tok")
    path = hub.fetch_part("part-000001", cache_dir=tmp_path / "dl")
    assert calls == [
        {
            "repo_id": "poloclub/diffusiondb",
            "filename": "images/part-000001.zip",
            "repo_type": "dataset",
            "revision": "0123abc",
            "cache_dir": str(tmp_path / "dl"),
            "token": "tok",
        }
    ]
    local = DiffusionDBSource(str(mirror)).fetch_part("part-000001")
    assert read_part(path, "part-000001").frame.equals(read_part(local, "part-000001").frame)


# -- pipeline.data.images -----------------------------------------------------------------------------------


def test_reencode_centre_crops_to_a_square():
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # red middle third
    out = open_image(reencode_image(_to_bytes(img), size=50, fmt="PNG"))
    assert out.size == (50, 50)
    assert np.asarray(out)[:, :, 0].mean() > 250  # only the red centre survives the crop


def _to_bytes(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_reencode_handles_modes():
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent -> white
    assert np.asarray(open_image(reencode_image(_to_bytes(rgba), size=8, fmt="PNG"))).min() == 255
    grey16 = Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16))
    assert np.asarray(open_image(reencode_image(_to_bytes(grey16), size=8, fmt="PNG"))).min() == 255
    for mode, color in (("L", 128), ("P", 3), ("CMYK", (0, 0, 0, 0))):
        out = open_image(reencode_image(_to_bytes(Image.new(mode, (20, 30), color), "TIFF"), size=8))
        assert out.size == (8, 8) and out.mode == "RGB"


def test_image_errors_have_reasons():
    cases = {
        b"": "empty",
        b"\x89PNG\r\n\x1a\n garbage": "undecodable",
        _bomb_png(): "too_large",
        _bomb_png(7_000, 7_000): "too_large",  # 49M pixels: under Pillow's own bomb limit, over ours
        _bomb_png(0, 10): "undecodable",
    }
    for data, reason in cases.items():
        with pytest.raises(ImageError) as err:
            reencode_image(data)
        assert err.value.reason == reason
    # the limit is configurable
    with pytest.raises(ImageError) as err:
        reencode_image(_png(size=(40, 40)), max_image_pixels=1000)
    assert err.value.reason == "too_large" and "1,600" in str(err.value)
    assert reencode_image(_png(size=(40, 40)), size=16, max_image_pixels=1600)


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PCX", "SGI"])
def test_only_expected_formats_are_decoded(fmt):
    """Formats no dataset uses are refused unread (Pillow would sniff anything, EPS included, which runs
    Ghostscript); the same picture as PNG is fine."""
    img = Image.new("RGB", (32, 32), (10, 200, 30))
    with pytest.raises(ImageError) as err:
        reencode_image(_to_bytes(img, fmt))
    assert err.value.reason == "undecodable"
    assert reencode_image(_to_bytes(img, "PNG"), size=8)
