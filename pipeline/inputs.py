"""What `reverse-sd predict` takes in: regular image files only (no FIFO, device or oversized file can hang or
exhaust it), folders and globs expanded, read in batches; and the device it runs on.
"""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
# The largest input file predict reads: far above any real image (a 50-megapixel PNG is ~100 MB only when
# incompressible), far below what would exhaust memory.  Bigger files are skipped unread.
MAX_INPUT_BYTES = 100 * 1024 * 1024


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
    """What expand_inputs found: the files to read, and (path, reason) for every path refused unread."""

    files: list[Path]
    skipped: list[tuple[Path, str]]


def scan_inputs(paths: Sequence[str], max_bytes: int = MAX_INPUT_BYTES) -> InputScan:
    """Files, folders (recursive) and globs -> regular image-looking files, in a stable order, without repeats.

    Every candidate, named or matched by a glob or found in a folder, goes through check_input_file: FIFOs,
    devices, sockets, symlinks to those, missing and oversized files are skipped with their reason.  In a
    folder only image-suffixed names are candidates (other files are not inputs).
    """
    found: list[Path] = []
    for raw in paths:
        matches = sorted(glob.glob(raw, recursive=True)) if any(c in raw for c in "*?[") else [raw]
        for match in matches:
            path = Path(match)
            if path.is_dir():
                found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
            else:
                found.append(path)
    seen: set[str] = set()
    scan = InputScan([], [])
    for path in found:
        key = os.path.abspath(path)
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
