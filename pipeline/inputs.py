"""What `reverse-sd predict` takes in: regular image files only (no FIFO, device or oversized file can hang or
exhaust it), folders and globs expanded, read in batches; and the device it runs on.

Paths are hostile too: an existing path is taken literally before any globbing (a file named ``a[1].png``
is read, not matched); folders and ``**`` globs follow symlinked folders but visit each real folder once
(a symlink loop cannot hang the walk) and each real file once, down to MAX_WALK_DEPTH folders and up to
MAX_INPUT_FILES files; every argument that matched nothing is named.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# What a folder or glob offers predict: the formats pipeline.data.images opens (an animated GIF is read as
# its first frame).  A file named explicitly is tried whatever its name.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
# The largest input file predict reads: far above any real image (a 50-megapixel PNG is ~100 MB only when
# incompressible), far below what would exhaust memory.  Bigger files are skipped unread.
MAX_INPUT_BYTES = 100 * 1024 * 1024
# Bounds of a folder or glob walk: how many folders deep below the argument, and how many files in all.
MAX_WALK_DEPTH = 32
MAX_INPUT_FILES = 1_000_000
# Images per forward pass of predict: the default, and the cap (memory grows with the batch, about
# 100 kB per image held plus the model's activations; past a few hundred there is nothing to gain).
DEFAULT_BATCH_SIZE = 32
MAX_BATCH_SIZE = 256


def check_batch_size(size: int) -> int:
    """``size`` when 1 <= size <= MAX_BATCH_SIZE, else ValueError naming the cap."""
    if not 1 <= int(size) <= MAX_BATCH_SIZE:
        raise ValueError(f"batch size {size} is outside 1..{MAX_BATCH_SIZE} (the cap bounds memory)")
    return int(size)


class InputError(OSError):
    """An input path that is not read (not a regular file, too large, missing); the message is the reason."""


def _kind(mode: int) -> str | None:
    """What a non-regular file is, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a special file"


def _megabytes(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n:,} bytes"


def _check_stat(path: Path, info: os.stat_result, max_bytes: int) -> None:
    kind = _kind(info.st_mode)
    if kind is not None:
        link = f"a symlink to {os.path.realpath(path)}, " if os.path.islink(path) else ""
        raise InputError(f"{link}{kind}, not a regular file")
    if info.st_size > max_bytes:
        raise InputError(f"{_megabytes(info.st_size)}, above the {_megabytes(max_bytes)} limit for an input image")


def check_input_file(path: str | os.PathLike, max_bytes: int = MAX_INPUT_BYTES) -> None:
    """InputError unless ``path`` (after symlinks) is a regular file of at most ``max_bytes``: an os.stat,
    nothing opened, so a FIFO cannot block and /dev/zero is never read."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError("a broken symlink" if os.path.islink(path) else "no such file") from None
    except OSError as exc:
        raise InputError(exc.strerror or type(exc).__name__) from None
    _check_stat(path, info, max_bytes)


def read_input_file(path: str | os.PathLike, max_bytes: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, else InputError.

    Checked again on the open descriptor (opened non-blocking, so a path swapped for a FIFO after the scan
    cannot hang), and never more than ``max_bytes`` read whatever the file grew to.
    """
    check_input_file(path, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(exc.strerror or type(exc).__name__) from None
    with os.fdopen(fd, "rb") as f:
        _check_stat(Path(path), os.fstat(fd), max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"more than {_megabytes(max_bytes)}, the limit for an input image")
    return data


@dataclass
class InputScan:
    """What scan_inputs found: the files to read, and (path, reason) for every path refused unread and every
    argument that matched nothing."""

    files: list[Path]
    skipped: list[tuple[Path, str]]


_MAGIC = re.compile(r"[*?[]")


@dataclass
class _Walk:
    """One argument's expansion: candidate paths in order, and notes (path, reason) on what was not searched."""

    limit: int
    found: list[Path] = field(default_factory=list)
    notes: list[tuple[Path, str]] = field(default_factory=list)
    deep: bool = False

    @property
    def full(self) -> bool:
        return len(self.found) >= self.limit

    def add(self, path: Path) -> None:
        if not self.full:
            self.found.append(path)

    def too_deep(self, directory: Path) -> None:
        if not self.deep:  # once per argument
            self.deep = True
            self.notes.append((directory, f"not searched: deeper than {MAX_WALK_DEPTH} folders below the argument"))

    def entries(self, directory: Path) -> list[os.DirEntry]:
        """The entries of ``directory`` by name; an unreadable folder is noted, not fatal."""
        try:
            with os.scandir(directory) as it:
                return sorted(it, key=lambda e: e.name)
        except OSError as exc:
            self.notes.append((directory, f"cannot list this folder: {exc.strerror or type(exc).__name__}"))
            return []


def _dir_key(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a symlink: a linked folder is searched, once (see _dirs)
    except OSError:
        return False


def _dirs(root: Path, walk: _Walk, hidden: bool) -> Iterator[Path]:
    """``root`` and every folder below it (symlinked ones too), each real folder once, depth first by name,
    at most MAX_WALK_DEPTH below ``root``; ``hidden`` also enters folders whose name starts with a dot."""
    seen: set[tuple[int, int]] = set()

    def visit(directory: Path, depth: int) -> Iterator[Path]:
        key = _dir_key(directory)
        if key is None or key in seen or walk.full:
            return
        seen.add(key)
        yield directory
        for entry in walk.entries(directory):
            if not _is_dir(entry) or (not hidden and entry.name.startswith(".")):
                continue
            if depth >= MAX_WALK_DEPTH:
                walk.too_deep(Path(entry.path))
                continue
            yield from visit(Path(entry.path), depth + 1)

    yield from visit(root, 0)


def _folder(root: Path, walk: _Walk) -> None:
    """The image-suffixed files of ``root`` and of every folder below it."""
    for directory in _dirs(root, walk, hidden=True):
        for entry in walk.entries(directory):
            if entry.name.lower().endswith(tuple(IMAGE_SUFFIXES)) and not _is_dir(entry):
                walk.add(Path(entry.path))


def _matches(name: str, pattern: str) -> bool:
    """glob's rule for one name: fnmatch, case-sensitive, and no leading dot matched by a wildcard."""
    return fnmatch.fnmatchcase(name, pattern) and (not name.startswith(".") or pattern.startswith("."))


def _glob(pattern: str, walk: _Walk) -> list[str]:
    """What ``glob.glob(pattern, recursive=True)`` matches, without its hazards: ``**`` enters each real
    folder once (a symlink loop ends), no deeper than MAX_WALK_DEPTH, no more than MAX_INPUT_FILES matches."""
    parts = pattern.split(os.sep)
    base = os.sep if pattern.startswith(os.sep) else ""
    parts = [p for p in parts if p != ""] if base else parts
    while parts and not _MAGIC.search(parts[0]) and parts[0] != "**":
        base = os.path.join(base, parts.pop(0))
    found: list[str] = []

    def expand(current: str, rest: list[str]) -> None:
        if walk.full or len(found) >= walk.limit:
            return
        if not rest:
            if os.path.lexists(current or "."):
                found.append(current)
            return
        head, tail = rest[0], rest[1:]
        if head == "**":
            for directory in _dirs(Path(current or "."), walk, hidden=False):
                below = "" if str(directory) == "." and not current else str(directory)
                if not tail:
                    if below:
                        found.append(below)
                    continue
                expand(below, tail)
            return
        if not _MAGIC.search(head):
            expand(os.path.join(current, head), tail)
            return
        for entry in walk.entries(Path(current or ".")):
            if _matches(entry.name, head) and (not tail or _is_dir(entry)):
                expand(os.path.join(current, entry.name), tail)

    if parts:
        expand(base, parts)
    elif os.path.lexists(base):
        found.append(base)
    return sorted(dict.fromkeys(found))


def scan_inputs(paths: Sequence[str], max_bytes: int = MAX_INPUT_BYTES, max_files: int = MAX_INPUT_FILES) -> InputScan:
    """Files, folders (recursive) and globs -> regular image-looking files, in a stable order, each real file
    once (whatever the paths or symlinks it was reached by).

    An existing path is taken literally, before any globbing.  Every candidate, named or matched by a glob or
    found in a folder, goes through check_input_file: FIFOs, devices, sockets, symlinks to those, missing and
    oversized files are skipped with their reason.  In a folder only image-suffixed names are candidates
    (other files are not inputs).  An argument that matched nothing (a glob without a match, a folder
    without an image), a folder that cannot be listed and a walk cut at a bound are skipped with their
    reason too, under the argument's or folder's name.
    """
    seen: set[str] = set()
    scan = InputScan([], [])
    for raw in paths:
        walk = _Walk(limit=max_files - len(scan.files))
        if walk.full:
            scan.skipped.append((Path(raw), f"not searched: {max_files:,} files found already, the limit"))
            continue
        if os.path.lexists(raw):  # literally, even when the name holds * ? [
            candidates = [raw]
            empty = f"a folder holding no image file ({', '.join(sorted(IMAGE_SUFFIXES))})"
        elif _MAGIC.search(raw):
            candidates = _glob(raw, walk)
            empty = "matches no file"
        else:
            candidates = [raw]  # missing: check_input_file says so
            empty = ""
        for candidate in candidates:
            path = Path(candidate)
            if path.is_dir():
                _folder(path, walk)
            else:
                walk.add(path)
        if not walk.found and empty and not walk.notes:  # (a note says why nothing was found)
            scan.skipped.append((Path(raw), empty))
        scan.skipped += walk.notes
        if walk.full:
            scan.skipped.append((Path(raw), f"stopped at {max_files:,} files, the limit of one predict"))
        for path in walk.found:
            key = os.path.realpath(path)
            if key in seen:
                continue
            seen.add(key)
            try:
                check_input_file(path, max_bytes)
            except InputError as exc:
                scan.skipped.append((path, str(exc)))
                continue
            scan.files.append(path)
    return scan


def expand_inputs(paths: Sequence[str], max_bytes: int = MAX_INPUT_BYTES) -> list[Path]:
    """The files of scan_inputs (regular image files within the size cap); see it for what is skipped."""
    return scan_inputs(paths, max_bytes).files


def duplicate_stems(paths: Sequence[Path]) -> dict[str, list[Path]]:
    """File stems shared by more than one path (a Kaggle submission's image ids are stems)."""
    by_stem: dict[str, list[Path]] = {}
    for path in paths:
        by_stem.setdefault(path.stem, []).append(path)
    return {stem: group for stem, group in by_stem.items() if len(group) > 1}


def resolve_predict_device(device: str) -> str:
    """``auto`` is CUDA when present; asking for CUDA without one fails in one line naming --device."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available")
    return device


def path_batches(paths: Iterable, size: int) -> Iterator[list[Path]]:
    """``paths`` as lists of at most ``size`` Paths, lazily (a folder of millions is never listed at once)."""
    chunk: list[Path] = []
    for path in paths:
        chunk.append(Path(path))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
