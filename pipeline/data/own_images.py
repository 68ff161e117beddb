"""The user's own generations as a data source (REVERSE_SD_IMAGES): each immediate subfolder is one part.

- ``list_folders(root)``: subfolder name -> content version, the sha256 of its image files' and sidecars'
  relative paths and content hashes (pipeline.data.file_hashes: cached by stat, so a listing re-reads only
  changed files).  A new or changed subfolder is new data; an unchanged one keeps its version.
- ``read_folder(folder, name, image_size)``: the folder's images with a prompt (pipeline.image_metadata:
  sd-parsers, sidecars), decoded, resized and re-encoded as DiffusionDB's parts are
  (pipeline.data.images.reencode), in DiffusionDB's part schema (FRAME_SCHEMA) plus ``generator``.  Image ids
  are ``<subfolder>/<path inside it>`` (never a DiffusionDB file name, which has no slash).  Images without a
  prompt, unreadable or undecodable ones are skipped, each with its reason.
- Folders are walked as predict walks inputs (pipeline.inputs.scan_inputs: regular files, bounded walk).

Subfolders whose names start with a dot, or hold characters a partition key cannot (control characters,
``,[]*``, ``...``), are left out, each with its reason (``invalid_folders``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from pipeline.data.diffusiondb import FRAME_SCHEMA
from pipeline.data.file_hashes import file_sha256
from pipeline.data.images import ImageError, reencode
from pipeline.image_metadata import METADATA_SUFFIXES, read_image_metadata, sidecar_path
from pipeline.inputs import InputError, read_input_file, scan_inputs

SOURCE = "images"  # filtered_pairs' source column for these pairs ("diffusiondb" for the others)
IMAGES_FRAME_SCHEMA = {**FRAME_SCHEMA, "generator": pl.String}
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f,\[\]*]|\.\.\.")
MAX_FOLDER_NAME = 200


def folder_problem(name: str) -> str | None:
    """Why a subfolder name cannot be a partition, or None."""
    if name.startswith("."):
        return "a hidden folder"
    if _BAD_NAME.search(name) or len(name) > MAX_FOLDER_NAME:
        return f"a name a partition key cannot take (control characters, , [ ] *, ..., over {MAX_FOLDER_NAME})"
    return None


def _subfolders(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    with os.scandir(root) as entries:
        found = [Path(e.path) for e in entries if e.is_dir()]
    return sorted(found, key=lambda p: p.name)


def invalid_folders(root: str | os.PathLike) -> dict[str, str]:
    return {p.name: why for p in _subfolders(root) if (why := folder_problem(p.name))}


def folder_files(folder: Path) -> list[Path]:
    """The image files below ``folder`` (PNG, JPEG, WebP), in a stable order."""
    return [p for p in scan_inputs([str(folder)]).files if p.suffix.lower() in METADATA_SUFFIXES]


def folder_version(folder: Path, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 over (relative path, sha256 of the content) of every image file and sidecar below ``folder``."""
    digest = hashlib.sha256()
    for image in folder_files(folder):
        files = [image]
        sidecar = sidecar_path(image)
        if sidecar is not None:
            files.append(sidecar)
        for path in files:
            digest.update(os.fsencode(os.path.relpath(path, folder)) + b"\0")
            digest.update(file_sha256(path, cache_dir).encode() + b"\n")
    return digest.hexdigest()


def list_folders(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Subfolder name -> content version, for each valid immediate subfolder of ``root``."""
    return {p.name: folder_version(p, cache_dir) for p in _subfolders(root) if folder_problem(p.name) is None}


@dataclass
class FolderResult:
    frame: pl.DataFrame
    skipped: list[dict] = field(default_factory=list)  # {"id", "reason"}
    counts: Counter = field(default_factory=Counter)  # reason -> images
    generators: Counter = field(default_factory=Counter)  # generator -> images kept


def read_folder(folder: str | os.PathLike, name: str, image_size: int = 256) -> FolderResult:
    """The pairs of one subfolder (see the module docstring)."""
    folder = Path(folder)
    columns: dict[str, list] = {column: [] for column in IMAGES_FRAME_SCHEMA}
    result = FolderResult(pl.DataFrame())
    for path in folder_files(folder):
        image_id = f"{name}/{Path(os.path.relpath(path, folder)).as_posix()}"
        record = read_image_metadata(path)
        reason = record.skipped
        image = None
        if reason is None:
            try:
                image, width, height = reencode(read_input_file(path), size=image_size, name=image_id)
            except (InputError, ImageError) as exc:
                reason = f"unreadable image: {exc}"
        if reason is not None:
            result.skipped.append({"id": image_id, "reason": reason})
            result.counts[reason.split(":")[0][:60]] += 1
            continue
        result.generators[record.generator] += 1
        row = {
            "image_id": image_id,
            "part": name,
            "prompt": record.prompt,
            "seed": record.seed if record.seed is not None and abs(record.seed) < 2**63 else None,
            "cfg": record.cfg,
            "steps": record.steps if record.steps is not None and abs(record.steps) < 2**63 else None,
            "sampler": record.sampler,
            "width": width,
            "height": height,
            "image": image,
            "generator": record.generator,
        }
        for column, value in row.items():
            columns[column].append(value)
    result.frame = pl.DataFrame(columns, schema=IMAGES_FRAME_SCHEMA)
    return result
