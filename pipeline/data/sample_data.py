"""A procedural DiffusionDB: a local mirror in DiffusionDB's own on-disk layout whose images depend on
their prompts, so that the whole method runs (and learns something real) with no network.

Layout, exactly as the real 2M subset ships it::

    root/images/part-000001.zip     PNG images with UUID names + part-000001.json
                                    {image file name: {"p": prompt, "se": seed, "c": cfg, "st": steps, "sa": sampler}}
    root/metadata.parquet           one row per image with DiffusionDB's columns and dtypes

Every picture is drawn from a handful of attributes, each visible in the picture and each named in the
prompt: object colour, shape, count (1-4), background colour and a style (plain, blurry, posterized,
film grain, line art).  Around the subject the prompt carries DiffusionDB-like noise the image cannot
explain (modifiers, artists, "trending on artstation", "4k"), as real prompts do.

The prompts also carry what the paper's filter must catch, in realistic proportion (a few % each, fixed
quotas per part so even a tiny mirror has some of each): surrounding whitespace, empty and whitespace-only
prompts, non-ASCII characters, exact duplicates, and prompts sharing their first or last 50 characters
with an earlier prompt.  Duplicates and prefix-sharers re-render the earlier prompt's subject, so the
image still matches the prompt; suffix-sharers get a new subject before the shared tail.

Deterministic: a part's bytes depend only on (seed, part index, images_per_part, image_size), so parts
can be added to an existing mirror later (``first_part``) and come out as they would have in one go.
Zip entries carry a fixed timestamp, and every random draw comes from a seeded numpy Generator.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from pipeline.storage import atomic_local_path

# -- vocabulary of the generator ----------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 215, 40),
    "orange": (245, 135, 25),
    "purple": (135, 55, 185),
    "pink": (245, 135, 195),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon")
COUNT_WORDS = {1: "a single", 2: "two", 3: "three", 4: "four"}
# style key -> the words the prompt uses for it (None: no style words)
STYLES: dict[str, str | None] = {
    "plain": None,
    "blur": "blurry",
    "posterize": "posterized",
    "noise": "film grain",
    "lineart": "line art",
}
SUBJECT_TEMPLATES = (
    "{count} {color} {shapes} on {a_bg} background",
    "{count} {color} {shapes} on {a_bg} background",
    "a painting of {count} {color} {shapes}, {bg} background",
    "{bg} background with {count} {color} {shapes}",
    "an illustration of {count} {color} {shapes} on {a_bg} background",
)
# DiffusionDB-like noise; no word here names a colour, shape, number or style of the generator.
MODIFIERS = (
    "highly detailed",
    "digital painting",
    "concept art",
    "illustration",
    "octane render",
    "unreal engine",
    "intricate",
    "elegant",
    "smooth",
    "matte painting",
    "cinematic lighting",
    "volumetric lighting",
    "studio lighting",
    "dramatic",
    "award winning",
    "masterpiece",
    "hyperrealistic",
    "symmetrical",
    "ultra realistic",
    "fantasy",
    "artstation hq",
    "deviantart",
)
ARTISTS = (
    "greg rutkowski",
    "artgerm",
    "alphonse mucha",
    "wlop",
    "makoto shinkai",
    "beeple",
    "ilya kuvshinov",
    "james jean",
    "ross tran",
    "simon stalenhag",
    "moebius",
    "thomas kinkade",
    "studio ghibli",
    "craig mullins",
)
TAGS = ("trending on artstation", "4k", "8k", "hd", "featured on pixiv", "cgsociety", "behance")
NON_ASCII = ("✨", "宇宙", "красивый", "café", "naïve", "über", "日本画", "🔥", "señor", "—")
SAMPLERS = ("k_lms", "k_euler_ancestral", "k_euler", "ddim", "plms", "k_dpm_2", "k_dpm_2_ancestral", "k_heun")
SAMPLER_WEIGHTS = (0.6, 0.1, 0.06, 0.06, 0.06, 0.04, 0.04, 0.04)
# DiffusionDB's metadata.parquet stores the sampler as a uint8 code.
SAMPLER_CODES = {
    "ddim": 1,
    "plms": 2,
    "k_euler": 3,
    "k_euler_ancestral": 4,
    "k_heun": 5,
    "k_dpm_2": 6,
    "k_dpm_2_ancestral": 7,
    "k_lms": 8,
}
CFGS = (7.0, 7.5, 7.5, 8.0, 10.0, 12.0, 15.0)
STEPS = (20, 30, 50, 50, 50, 100, 150)

# Share of each kind of filter bait per part (the rest are clean prompts).
BAIT_SHARES = {
    "empty": 0.01,
    "whitespace_only": 0.01,
    "surrounding_whitespace": 0.03,
    "non_ascii": 0.03,
    "duplicate": 0.05,
    "shared_prefix": 0.03,
    "shared_suffix": 0.03,
}
AFFIX = 50  # the paper's prefix / suffix length
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: same bytes every run
EPOCH = datetime(2022, 8, 7, tzinfo=UTC)  # DiffusionDB was collected in August 2022
METADATA_SCHEMA = {
    "image_name": pl.String,
    "prompt": pl.String,
    "part_id": pl.UInt16,
    "seed": pl.UInt32,
    "step": pl.UInt16,
    "cfg": pl.Float32,
    "sampler": pl.UInt8,
    "width": pl.UInt16,
    "height": pl.UInt16,
    "user_name": pl.String,
    "timestamp": pl.Datetime("us", "UTC"),
    "image_nsfw": pl.Float32,
    "prompt_nsfw": pl.Float32,
}


@dataclass(frozen=True)
class Attributes:
    """What a picture shows; every field is named in its prompt."""

    color: str
    shape: str
    count: int
    background: str
    style: str


@dataclass(frozen=True)
class _Record:
    attributes: Attributes
    prompt: str  # as written to the JSON (bait included)
    clean: str  # the prompt before whitespace bait, what later bait copies from
    head: list[str]  # comma-separated segments naming the attributes
    tail: list[str]  # the noise segments after them


def part_key(index: int) -> str:
    return f"part-{index:06d}"


# -- prompts ------------------------------------------------------------------------------------------


def _draw_attributes(rng: np.random.Generator) -> Attributes:
    names = list(COLORS)
    color = names[rng.integers(len(names))]
    background = [n for n in names if n != color][rng.integers(len(names) - 1)]
    return Attributes(
        color=color,
        shape=SHAPES[rng.integers(len(SHAPES))],
        count=int(rng.integers(1, 5)),
        background=background,
        style=list(STYLES)[rng.integers(len(STYLES))],
    )


def _head(attrs: Attributes, rng: np.random.Generator) -> list[str]:
    shapes = attrs.shape if attrs.count == 1 else attrs.shape + "s"
    template = SUBJECT_TEMPLATES[rng.integers(len(SUBJECT_TEMPLATES))]
    subject = template.format(
        count=COUNT_WORDS[attrs.count],
        color=attrs.color,
        shapes=shapes,
        bg=attrs.background,
        a_bg=("an " if attrs.background[0] in "aeiou" else "a ") + attrs.background,
    )
    style = STYLES[attrs.style]
    return [subject] if style is None else [subject, style]


def _tail(rng: np.random.Generator, style: str | None = None) -> list[str]:
    """Modifiers, artists and tags.  With a style, modifiers and artists come from that style's own
    share of the lists (as real artists go with a look), so most of a prompt is visible in its image
    and models can learn it; tags stay random, the part of a prompt no image shows."""
    modifiers, artists_pool = MODIFIERS, ARTISTS
    if style is not None:
        i, n = list(STYLES).index(style), len(STYLES)
        modifiers, artists_pool = MODIFIERS[i::n], ARTISTS[i::n]
    mods = [
        modifiers[i]
        for i in rng.choice(len(modifiers), size=min(len(modifiers), int(rng.integers(2, 4))), replace=False)
    ]
    artists = [artists_pool[i] for i in rng.choice(len(artists_pool), size=1, replace=False)]
    # Tags ("trending on artstation") are the part no image shows: always on global tails, one in
    # two on styled ones, so the sample keeps some noise without drowning the visible signal.
    n_tags = 1 if style is None or rng.random() < 0.5 else 0
    tags = [TAGS[i] for i in rng.choice(len(TAGS), size=n_tags, replace=False)]
    segments = [*mods, "by " + " and ".join(artists), *tags]
    return [segments[i] for i in rng.permutation(len(segments))]


def _join(segments: list[str]) -> str:
    return ", ".join(segments)


def _fresh(rng: np.random.Generator) -> _Record:
    attrs = _draw_attributes(rng)
    head, tail = _head(attrs, rng), _tail(rng, attrs.style)
    if rng.random() < 0.6:
        # A palette note at the end, as many real prompts have: visible, and it keeps 50-character
        # suffixes varied, so near-duplicates come mostly from the planned bait.
        tail = [*tail, f"{attrs.color} and {attrs.background} color palette"]
    text = _join(head + tail)
    return _Record(attrs, text, text, head, tail)


def _bait_plan(n: int, rng: np.random.Generator) -> list[str]:
    """One bait kind (or "clean") per image: fixed quotas, shuffled; copying kinds never come first."""
    plan: list[str] = []
    for kind, share in BAIT_SHARES.items():
        plan += [kind] * (max(1, round(share * n)) if n >= 20 else int(rng.random() < share * n))
    kept = plan[: max(n - 1, 0)]  # at least one clean image per part
    plan = kept + ["clean"] * (n - len(kept))
    order = rng.permutation(n)
    plan = [plan[i] for i in order]
    if n and plan[0] in ("duplicate", "shared_prefix", "shared_suffix"):
        first_clean = plan.index("clean")
        plan[0], plan[first_clean] = plan[first_clean], plan[0]
    return plan


def _make_record(kind: str, earlier: list[_Record], rng: np.random.Generator) -> _Record:
    if kind in ("duplicate", "shared_prefix", "shared_suffix") and earlier:
        base = earlier[int(rng.integers(len(earlier)))]
        if kind == "duplicate":
            return _Record(base.attributes, base.clean, base.clean, base.head, base.tail)
        if kind == "shared_prefix":
            # the same subject and first noise segments (>= 50 characters), then a different ending
            keep = list(base.head)
            rest = list(base.tail)
            while len(_join(keep)) < AFFIX + 1 and rest:
                keep.append(rest.pop(0))
            for _ in range(10):
                tail = _tail(rng)
                text = _join(keep + tail[-2:])
                if text != base.clean and text[:AFFIX] == base.clean[:AFFIX]:
                    return _Record(base.attributes, text, text, base.head, keep[len(base.head) :] + tail[-2:])
        else:
            # a new subject before the same noise tail (the tail is >= 50 characters)
            if len(_join(base.tail)) >= AFFIX + 1:
                attrs = _draw_attributes(rng)
                head = _head(attrs, rng)
                text = _join(head + base.tail)
                if text != base.clean:
                    return _Record(attrs, text, text, head, base.tail)
    record = _fresh(rng)
    if kind == "empty":
        return _Record(record.attributes, "", "", [], [])
    if kind == "whitespace_only":
        blank = ("  ", " ", "\n", " \t ")[rng.integers(4)]
        return _Record(record.attributes, blank, blank, [], [])
    if kind == "surrounding_whitespace":
        pad = ((" ", ""), ("", " "), ("  ", "  "), ("", "\n"), ("\t", " "))[rng.integers(5)]
        return _Record(record.attributes, pad[0] + record.clean + pad[1], record.clean, record.head, record.tail)
    if kind == "non_ascii":
        token = NON_ASCII[rng.integers(len(NON_ASCII))]
        tail = list(record.tail)
        tail.insert(int(rng.integers(len(tail) + 1)), token)
        text = _join(record.head + tail)
        return _Record(record.attributes, text, text, record.head, tail)
    return record


# -- pictures -----------------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        k, radii = 3, [r]
    elif shape == "hexagon":
        k, radii = 6, [r]
    elif shape == "star":
        k, radii = 10, [r, r * 0.45]
    else:  # square
        k, radii, angle = 4, [r * 1.2], angle + np.pi / 4
    points = []
    for i in range(k):
        t = angle - np.pi / 2 + 2 * np.pi * i / k
        rad = radii[i % len(radii)]
        points.append((cx + rad * np.cos(t), cy + rad * np.sin(t)))
    return points


_LAYOUTS = {
    1: [(0.5, 0.5)],
    2: [(0.28, 0.5), (0.72, 0.5)],
    3: [(0.5, 0.27), (0.27, 0.72), (0.73, 0.72)],
    4: [(0.28, 0.28), (0.72, 0.28), (0.28, 0.72), (0.72, 0.72)],
}


def render(attrs: Attributes, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the picture a prompt describes: gradient background, `count` shapes, then the style."""
    bg = np.array(COLORS[attrs.background], dtype=np.float32)
    shade = np.linspace(1.0, 0.72, size, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(bg * shade, (size, size, 3)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(canvas), "RGB")
    draw = ImageDraw.Draw(img)
    color = COLORS[attrs.color]
    base_r = size * (0.26 if attrs.count == 1 else 0.15)
    line = max(2, size // 64)
    for fx, fy in _LAYOUTS[attrs.count]:
        r = base_r * float(rng.uniform(0.8, 1.1))
        cx = size * (fx + float(rng.uniform(-0.04, 0.04)))
        cy = size * (fy + float(rng.uniform(-0.04, 0.04)))
        fill = None if attrs.style == "lineart" else color
        outline = color if attrs.style == "lineart" else None
        width = line if attrs.style == "lineart" else 0
        if attrs.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
        else:
            angle = float(rng.uniform(-0.25, 0.25))
            points = _shape_polygon(attrs.shape, cx, cy, r, angle)
            if attrs.style == "lineart":
                draw.line(points + [points[0]], fill=color, width=line, joint="curve")
            else:
                draw.polygon(points, fill=fill)
    if attrs.style == "blur":
        img = img.filter(ImageFilter.GaussianBlur(radius=size / 40))
    elif attrs.style == "posterize":
        img = ImageOps.posterize(img, 2)
    elif attrs.style == "noise":
        noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 38, (size, size, 3)).astype(np.int16)
        img = Image.fromarray(noisy.clip(0, 255).astype(np.uint8), "RGB")
    return img


# -- writing ------------------------------------------------------------------------------------------


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _zip_member(zf: zipfile.ZipFile, name: str, data: bytes, compress: int) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = compress
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _generate_part(root: Path, seed: int, index: int, n: int, size: int) -> list[dict]:
    """Write images/part-NNNNNN.zip (atomically); return its metadata rows."""
    key = part_key(index)
    rng = np.random.default_rng([seed, index])
    users = [hashlib.sha256(f"user-{seed}-{u}".encode()).hexdigest() for u in range(max(4, n // 8))]
    plan = _bait_plan(n, rng)
    earlier: list[_Record] = []
    entries: dict[str, dict] = {}
    rows: list[dict] = []
    start = EPOCH + timedelta(hours=int(index) * 3)
    target = root / "images" / f"{key}.zip"
    with atomic_local_path(target, sidecar=False) as tmp:  # DiffusionDB's layout, nothing added
        with zipfile.ZipFile(tmp, "w") as zf:
            for i, kind in enumerate(plan):
                record = _make_record(kind, earlier, rng)
                if record.head:
                    earlier.append(record)
                name = f"{uuid.UUID(bytes=rng.bytes(16), version=4)}.png"
                image_seed = int(rng.integers(0, 2**32))
                cfg = float(CFGS[rng.integers(len(CFGS))])
                steps = int(STEPS[rng.integers(len(STEPS))])
                sampler = SAMPLERS[rng.choice(len(SAMPLERS), p=SAMPLER_WEIGHTS)]
                img = render(record.attributes, size, np.random.default_rng([seed, index, i]))
                _zip_member(zf, name, _png_bytes(img), zipfile.ZIP_STORED)
                entries[name] = {"p": record.prompt, "se": image_seed, "c": cfg, "st": steps, "sa": sampler}
                rows.append(
                    {
                        "image_name": name,
                        "prompt": record.prompt,
                        "part_id": index,
                        "seed": image_seed,
                        "step": steps,
                        "cfg": cfg,
                        "sampler": SAMPLER_CODES[sampler],
                        "width": size,
                        "height": size,
                        "user_name": users[rng.integers(len(users))],
                        "timestamp": start + timedelta(seconds=7 * i + int(rng.integers(7))),
                        "image_nsfw": float(rng.beta(1, 12)),
                        "prompt_nsfw": float(rng.beta(1, 20)),
                    }
                )
            # DiffusionDB writes the JSON with non-ASCII characters as they are (UTF-8)
            payload = json.dumps(entries, ensure_ascii=False, indent=None).encode("utf-8")
            _zip_member(zf, f"{key}.json", payload, zipfile.ZIP_DEFLATED)
    return rows


def _rows_from_zip(path: Path, index: int) -> list[dict]:
    """Metadata rows for a part that metadata.parquet does not cover, from the part's own JSON."""
    with zipfile.ZipFile(path) as zf:
        entries = json.loads(zf.read(f"{part_key(index)}.json").decode("utf-8"))
    return [
        {
            "image_name": name,
            "prompt": e.get("p"),
            "part_id": index,
            "seed": e.get("se"),
            "step": e.get("st"),
            "cfg": e.get("c"),
            "sampler": SAMPLER_CODES.get(e.get("sa"), 9),
        }
        for name, e in entries.items()
    ]


def generate_sample_mirror(
    root,
    n_parts: int = 4,
    images_per_part: int = 250,
    seed: int = 0,
    image_size: int = 256,
    first_part: int = 1,
) -> list[str]:
    """Write parts first_part .. first_part+n_parts-1 under `root`; return their keys.

    metadata.parquet is rewritten to cover every part present in root/images afterwards: rows of parts
    it already described are kept, regenerated parts replace theirs, and a part it never described gets
    rows from its own JSON (user_name, timestamp and the nsfw scores then null).
    """
    if n_parts < 0 or images_per_part < 1 or first_part < 1 or image_size < 16:
        raise ValueError("need n_parts >= 0, images_per_part >= 1, first_part >= 1, image_size >= 16")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    keys, new_rows = [], []
    for index in range(first_part, first_part + n_parts):
        new_rows += _generate_part(root, seed, index, images_per_part, image_size)
        keys.append(part_key(index))
    new = pl.DataFrame(new_rows, schema=METADATA_SCHEMA)

    meta_path = root / "metadata.parquet"
    frames = [new]
    covered = set(range(first_part, first_part + n_parts))
    if meta_path.exists():
        old = pl.read_parquet(meta_path).filter(~pl.col("part_id").is_in(list(covered)))
        frames.append(old.select(list(METADATA_SCHEMA)).cast(METADATA_SCHEMA))
        covered |= set(old["part_id"].unique().to_list())
    for path in sorted((root / "images").glob("part-[0-9][0-9][0-9][0-9][0-9][0-9].zip")):
        index = int(path.stem.split("-")[1])
        if index not in covered:
            frames.append(pl.DataFrame(_rows_from_zip(path, index), schema=METADATA_SCHEMA))
    # sort by part, keeping each part's archive order
    meta = pl.concat(frames).with_row_index("_order").sort("part_id", "_order").drop("_order")
    present = {int(p.stem.split("-")[1]) for p in (root / "images").glob("part-[0-9][0-9][0-9][0-9][0-9][0-9].zip")}
    meta = meta.filter(pl.col("part_id").is_in(sorted(present)))
    with atomic_local_path(meta_path, sidecar=False) as tmp:
        meta.write_parquet(tmp, statistics=False)
    return keys
