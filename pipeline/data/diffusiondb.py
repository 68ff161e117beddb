"""DiffusionDB: where the parts come from (hub or local mirror) and how one part is read.

DiffusionDBSource names the data: a Hugging Face dataset id at a pinned revision, or a local mirror
directory in DiffusionDB's layout (images/part-NNNNNN.zip).  Both lead to a local zip path
(`fetch_part`); everything after that, `read_part`, is shared, so the local mirror is an honest
offline twin of the hub path.

read_part streams one archive: opened once, members read one at a time into memory (never extracted,
no path is ever built from a member name, nothing is written anywhere), each image decoded once,
resized and re-encoded by pipeline.data.images.  Bad records are skipped and counted with their ids, never
crashing the part and never dropping a good record.  An archive that cannot be read at all raises
CorruptArchiveError naming the part and the file; so does a part whose JSON cannot be parsed (missing,
not JSON, not an object of entries): without it no prompt in the part is known, so failing the part
loudly is the honest outcome.  JSON that is mostly right is read leniently so one bad entry costs only
itself: invalid UTF-8 bytes cost only the entries they sit in (prompt_not_utf8), raw control characters
inside strings are kept as text, and numbers too long for Python's int parser become null metadata.

Sizes are bounded: a part's JSON over MAX_JSON_BYTES fails the part (CorruptArchiveError naming the limit),
and a prompt over MAX_PROMPT_CHARS characters is cut there (the record is kept; the cut is counted as
prompt_truncated and listed in ``truncated``): the prompt encoder reads 256 tokens at most, so the cut
loses nothing it would have read, and a 40 MB prompt no longer costs seconds and gigabytes downstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from pipeline.data.file_hashes import _load_hash_cache, file_sha256
from pipeline.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, reencode

HUB_DATASET = "poloclub/diffusiondb"
PART_KEY = re.compile(r"part-\d{6}")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DRIVE = re.compile(r"^[A-Za-z]:")
MAX_MEMBER_BYTES = 64 << 20  # one image; DiffusionDB's PNGs are well under 2 MB
# A part's JSON is about 0.5 MB (1,000 entries).  32 MB still holds 1,000 entries whose prompts are all at
# MAX_PROMPT_CHARS and written as \uXXXX escapes (6 bytes a character: ~25 MB), while json.loads' peak memory
# stays a few hundred MB (a 256 MB JSON needed gigabytes).
MAX_JSON_BYTES = 32 << 20
# all-MiniLM-L6-v2 reads 256 word pieces at most (254 of text); English prompts average about 4 characters a
# piece, so 4,096 characters is 4x what the encoder can read, and the cut changes nothing it reads unless a
# text averages over 16 characters a word piece (long runs of spaces, or words the tokenizer cannot split).
MAX_PROMPT_CHARS = 4096

FRAME_SCHEMA = {
    "image_id": pl.String,
    "part": pl.String,
    "prompt": pl.String,
    "seed": pl.Int64,
    "cfg": pl.Float64,
    "steps": pl.Int64,
    "sampler": pl.String,
    "width": pl.Int64,
    "height": pl.Int64,
    "image": pl.Binary,
}


class CorruptArchiveError(RuntimeError):
    """A part archive (or its JSON) that cannot be read at all; the message names the part and file."""


def cap_prompt(text: str, limit: int = MAX_PROMPT_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, at the last whitespace when one is near the end (so no word
    is cut in half: the words kept tokenise as in the whole text), else exactly at ``limit``."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    space = max(head.rfind(" "), head.rfind("\n"), head.rfind("\t"))
    return head[:space] if space >= limit - 256 else head


def validate_part_key(part_key: str) -> str:
    """Only part-NNNNNN: a hostile key can never build a path outside the mirror or a hub file name."""
    if not isinstance(part_key, str) or not PART_KEY.fullmatch(part_key):
        raise ValueError(f"not a DiffusionDB part key (part-NNNNNN): {part_key!r}")
    return part_key


# -- the source -------------------------------------------------------------------------------------


def is_local_location(location: str) -> bool:
    """An existing directory, or anything path-like; otherwise an owner/name hub id."""
    if location.startswith("file://"):
        return True
    path = Path(location).expanduser()
    if path.is_dir():
        return True
    if path.is_absolute() or location.startswith((".", "~")) or "\\" in location or _DRIVE.match(location):
        return True
    return not _HUB_ID.fullmatch(location)


@dataclass(frozen=True)
class DiffusionDBSource:
    """A DiffusionDB location: a hub dataset id at `revision`, or a local mirror directory.

    `token` is only passed to huggingface_hub; it is left out of repr and comparisons so it is never logged.
    `hash_cache_dir`, a writable local directory, keeps a mirror's zip hashes across processes (file_sha256).
    """

    location: str = HUB_DATASET
    revision: str = "main"
    token: str | None = field(default=None, repr=False, compare=False)
    hash_cache_dir: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.is_local:
            root = self.root
            if not root.is_dir():
                raise ValueError(f"DiffusionDB mirror directory does not exist: {root}")
            if self.hash_cache_dir is not None:  # so a later file_sha256(zip) without the directory still finds it
                _load_hash_cache(Path(self.hash_cache_dir).expanduser().resolve())

    @property
    def is_local(self) -> bool:
        return is_local_location(self.location)

    @property
    def root(self) -> Path:
        """The local mirror directory (local sources only)."""
        return Path(self.location.removeprefix("file://")).expanduser().resolve()

    def _local_parts(self) -> dict[str, Path]:
        images = self.root / "images"
        if not images.is_dir():
            return {}
        found = {}
        for path in images.iterdir():
            # names are matched, never trusted: only part-NNNNNN.zip regular files (no symlinks out)
            if path.suffix == ".zip" and PART_KEY.fullmatch(path.stem) and path.is_file() and not path.is_symlink():
                found[path.stem] = path
        return dict(sorted(found.items()))

    def _sha256(self, path: Path) -> str:
        return file_sha256(path, cache_dir=self.hash_cache_dir)

    # -- versions -----------------------------------------------------------------------------------
    def revision_id(self) -> str:
        """The data version: the hub commit sha of `revision`, or a hash of the mirror's part listing."""
        if not self.is_local:
            from huggingface_hub import HfApi

            return HfApi(token=self.token).dataset_info(self.location, revision=self.revision).sha
        digest = hashlib.sha256()
        for key, path in self._local_parts().items():
            digest.update(f"{key}.zip\t{path.stat().st_size}\t{self._sha256(path)}\n".encode())
        return "mirror-" + digest.hexdigest()

    def list_parts(self) -> dict[str, str]:
        """part key -> content version (sha256 of the part's zip: local bytes, or the hub's LFS sha256)."""
        if self.is_local:
            return {key: self._sha256(path) for key, path in self._local_parts().items()}
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(token=self.token)
        parts = {}
        for entry in api.list_repo_tree(
            self.location, path_in_repo="images", repo_type="dataset", revision=self.revision
        ):
            if not isinstance(entry, RepoFile):
                continue
            name = entry.path.rsplit("/", 1)[-1]
            if name.endswith(".zip") and PART_KEY.fullmatch(name[:-4]):
                parts[name[:-4]] = entry.lfs.sha256 if entry.lfs is not None else entry.blob_id
        return dict(sorted(parts.items()))

    # -- data ---------------------------------------------------------------------------------------
    def fetch_part(self, part_key: str, cache_dir: str | os.PathLike | None = None) -> Path:
        """A local path to the part's zip: the mirror's own file (no copy), or a hub download.

        Hub downloads go through huggingface_hub: resumable, checked against the hub's hash, cached in
        `cache_dir` (a local directory) so a second fetch costs nothing.
        """
        validate_part_key(part_key)
        if self.is_local:
            path = self.root / "images" / f"{part_key}.zip"
            if not path.is_file():
                raise FileNotFoundError(f"{part_key}: no archive at {path}")
            return path
        from huggingface_hub import hf_hub_download

        return Path(
            hf_hub_download(
                repo_id=self.location,
                filename=f"images/{part_key}.zip",
                repo_type="dataset",
                revision=self.revision,
                cache_dir=None if cache_dir is None else str(cache_dir),
                token=self.token,
            )
        )


# -- reading one part -------------------------------------------------------------------------------


@dataclass
class PartReadResult:
    """The kept records (`frame`), the skipped ones with their reasons, and the count per reason; kept records
    whose prompt was cut to MAX_PROMPT_CHARS are in `truncated` ({"id", "chars": the original length}) and
    counted in `counts` as prompt_truncated (not in `skipped`: the record is kept)."""

    frame: pl.DataFrame
    skipped: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    truncated: list[dict] = field(default_factory=list)


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    """Why a member's name or kind is refused: it would leave the archive's folder, or is a link."""
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symlink_member"
    if name.startswith(("/", "\\")) or _DRIVE.match(name) or "\x00" in name:
        return "unsafe_member_name"
    if any(part == ".." for part in re.split(r"[\\/]", name)):
        return "unsafe_member_name"
    return None


def _as_int(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    value = int(value)
    return value if -(2**63) <= value < 2**63 else None


def _as_float(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def _parse_int(text: str) -> int | float:
    """JSON integers; one beyond int64 becomes +-inf (later null), instead of Python's digit-limit ValueError."""
    if len(text) > 20:
        return float("-inf") if text.startswith("-") else float("inf")
    return int(text)


def _encodable(text: str) -> bool:
    """False for strings holding lone surrogates (from \\ud800 escapes or invalid UTF-8): Arrow cannot store them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _safe_id(name: str, limit: int = 200) -> str:
    """A record id fit for logs and UI metadata: control characters and surrogates escaped, length capped."""
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in name)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _load_entries(zf: zipfile.ZipFile, part_key: str, zip_path: Path) -> dict:
    name = f"{part_key}.json"
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise CorruptArchiveError(f"{part_key}: {zip_path} has no {name}, so no prompt in it is known") from None
    too_big = (
        f"{part_key}: {name} in {zip_path} is over the {MAX_JSON_BYTES:,}-byte limit of a part's JSON "
        "(DiffusionDB's are about 0.5 MB)"
    )
    if info.file_size > MAX_JSON_BYTES:
        raise CorruptArchiveError(f"{too_big}: it declares {info.file_size:,} bytes")
    try:
        with zf.open(info) as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise CorruptArchiveError(f"{part_key}: cannot read {name} from {zip_path}: {exc}") from exc
    if len(raw) > MAX_JSON_BYTES:  # a header that understates the size
        raise CorruptArchiveError(f"{too_big}: it declares {info.file_size:,} bytes but holds more")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Keep the valid entries; invalid bytes become lone surrogates, and their entries are skipped.
        text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    try:
        entries = json.loads(text, strict=False, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise CorruptArchiveError(f"{part_key}: {name} in {zip_path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise CorruptArchiveError(f"{part_key}: {name} in {zip_path} is nested too deeply to parse") from exc
    if not isinstance(entries, dict):
        raise CorruptArchiveError(
            f"{part_key}: {name} in {zip_path} is a JSON {type(entries).__name__}, not an object of entries"
        )
    return entries


def read_part(
    zip_path: str | os.PathLike,
    part_key: str,
    image_size: int = 256,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    image_format: str = "JPEG",
    quality: int = 95,
) -> PartReadResult:
    """Read one DiffusionDB part archive into a frame of FRAME_SCHEMA (one row per good image).

    prompt is the raw JSON value (not stripped, not filtered: that is the filter's job, which also
    counts null prompts); a prompt of another type (number, list ...) skips the record.  Invalid seed /
    cfg / steps / sampler values become null rather than dropping a good image.  width and height are
    the image as stored in the archive (before resizing); `image` holds the re-encoded bytes.
    Skip reasons: symlink_member, unsafe_member_name, duplicate_member, member_too_large, corrupt_member,
    image_without_entry, entry_without_image, entry_not_object, prompt_not_text, prompt_not_utf8, and the
    image reasons of pipeline.data.images (empty_image, image_too_large, undecodable_image).  Skipped ids are
    escaped (control characters, surrogates) so that logging them is safe.  A prompt longer than
    MAX_PROMPT_CHARS is cut (cap_prompt) and counted as prompt_truncated; its record is kept.
    """
    validate_part_key(part_key)
    zip_path = Path(zip_path)
    columns: dict[str, list] = {name: [] for name in FRAME_SCHEMA}
    skipped: list[dict] = []
    truncated: list[dict] = []

    def skip(record_id: str, reason: str) -> None:
        skipped.append({"id": _safe_id(record_id), "reason": reason})

    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
        raise CorruptArchiveError(f"{part_key}: {zip_path} is not a readable zip archive: {exc}") from exc
    with zf:
        entries = _load_entries(zf, part_key, zip_path)
        json_name = f"{part_key}.json"
        seen: set[str] = set()
        refused: set[str] = set()  # names of refused members: their entries are not counted twice
        for info in zf.infolist():
            name = info.filename
            if name == json_name or info.is_dir():
                continue
            reason = _unsafe_reason(info)
            if reason is None and name in seen:
                reason = "duplicate_member"
            if reason is None and name not in entries:
                reason = "image_without_entry"
            if reason is None and info.file_size > MAX_MEMBER_BYTES:
                reason = "member_too_large"
            entry = entries.get(name)
            if reason is None and not isinstance(entry, dict):
                reason = "entry_not_object"
            prompt = entry.get("p") if isinstance(entry, dict) else None
            if reason is None and prompt is not None and not isinstance(prompt, str):
                reason = "prompt_not_text"
            if reason is None and prompt is not None and not _encodable(prompt):
                reason = "prompt_not_utf8"
            if reason is not None:
                if reason != "duplicate_member":
                    refused.add(name)
                skip(name, reason)
                continue
            seen.add(name)
            try:
                with zf.open(info) as f:
                    data = f.read(MAX_MEMBER_BYTES + 1)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError):
                # bad CRC, unsupported compression or encryption: this member only
                skip(name, "corrupt_member")
                refused.add(name)
                continue
            try:
                image, width, height = reencode(
                    data,
                    size=image_size,
                    fmt=image_format,
                    quality=quality,
                    max_image_pixels=max_image_pixels,
                    name=f"{zip_path.name}:{_safe_id(name)}",
                )
            except ImageError as exc:
                skip(name, f"{exc.reason}_image" if exc.reason != "too_large" else "image_too_large")
                continue
            if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
                truncated.append({"id": _safe_id(name), "chars": len(prompt)})
                prompt = cap_prompt(prompt)
            sampler = entry.get("sa")
            columns["image_id"].append(name)
            columns["part"].append(part_key)
            columns["prompt"].append(prompt)
            columns["seed"].append(_as_int(entry.get("se")))
            columns["cfg"].append(_as_float(entry.get("c")))
            columns["steps"].append(_as_int(entry.get("st")))
            columns["sampler"].append(sampler if isinstance(sampler, str) and _encodable(sampler) else None)
            columns["width"].append(width)
            columns["height"].append(height)
            columns["image"].append(image)
        for name in entries:
            if name not in seen and name not in refused:
                skip(name, "entry_without_image")
    frame = pl.DataFrame(columns, schema=FRAME_SCHEMA)
    counts = dict(Counter(s["reason"] for s in skipped))
    if truncated:
        counts["prompt_truncated"] = len(truncated)
    return PartReadResult(frame, skipped, counts, truncated)
