"""A split's image bytes in one memory-mapped Arrow IPC file, so training never holds a split in memory.

Training, difficulty scoring and prediction read images by row, in shuffled order, from every DataLoader
worker and every DDP rank.  Holding them as a Python list of bytes costs the whole split in RAM per
process (at 2M DiffusionDB pairs, tens of GB; forked workers then copy it page by page as reference
counts are touched), and Parquet parts cannot be read one row at a time.  So a split's images are
written once, part by part (one part in memory at a time), to an uncompressed Arrow IPC file under a
local cache directory; an ImageColumn maps it and returns one image's bytes per row in O(1).  The pages
live in the OS page cache, shared by every process that maps the file.

The file name is a hash of the requested image ids and of each source part's fingerprint (size and
modification time of its table), so a changed part or split rebuilds it and an unchanged one is reused
across assets and runs.  Files are written to a temporary name and renamed, so a killed build leaves
nothing a reader could pick up; older files of the same split are removed once a new one is in place
(a process still mapping one keeps reading it: unlinking does not unmap).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.large_binary())])
ABANDONED_AFTER_S = 3600  # a temporary file nobody has written to for this long belongs to a killed build


class ImageColumn(Sequence):
    """Read-only sequence of image bytes backed by a memory-mapped Arrow IPC file.

    ``rows`` (optional) maps this column's positions to file rows, so the column can follow any row
    order (e.g. sorted by image id) while the file keeps the order it was written in.  Pickles as its
    path and rows, so spawned DataLoader workers and launched processes map the same file.
    """

    def __init__(self, path: str | os.PathLike, rows: np.ndarray | Sequence[int] | None = None) -> None:
        self.path = os.path.abspath(path)  # launched processes may run elsewhere
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._open()
        if self.rows is not None and self.rows.size and not (0 <= self.rows.min() and self.rows.max() < self._n):
            raise ValueError(f"rows outside the {self._n} images of {self.path}")

    def _open(self) -> None:
        self._map = pa.memory_map(self.path, "r")
        table = pa.ipc.open_file(self._map).read_all()  # zero-copy: buffers point into the mapping
        self._chunks = table.column("image").chunks
        self._ids = table.column("image_id")
        self._n = table.num_rows
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])

    @property
    def file_image_ids(self) -> list[str]:
        """The image ids in file order (what the file holds, whatever ``rows`` selects)."""
        return self._ids.to_pylist()

    def __len__(self) -> int:
        return self._n if self.rows is None else len(self.rows)

    def _file_row(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"image index {index} out of range for {n} images")
        index %= n
        return index if self.rows is None else int(self.rows[index])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self._file_row(int(index))
        chunk = int(np.searchsorted(self._starts, row, side="right")) - 1
        return self._chunks[chunk][row - int(self._starts[chunk])].as_py()

    def __getstate__(self) -> dict:
        return {"path": self.path, "rows": self.rows}

    def __setstate__(self, state: dict) -> None:
        self.path, self.rows = state["path"], state["rows"]
        self._open()

    def __repr__(self) -> str:
        return f"ImageColumn({self.path!r}, {len(self)} images)"


def write_image_files(
    files: dict[Path, pl.DataFrame], read_part: Callable[[str, list[str]], pl.DataFrame]
) -> dict[Path, int]:
    """Write each file's images (its rows: image_id, part) to an Arrow IPC file, all in one pass over the parts.

    ``read_part(part, image_ids)`` returns (image_id, image) for the ids it has; it is called once per
    part with every id any file wants from it, so each part is read once and memory holds one part's
    images at a time.  Ids a part does not have are left out (callers join on what a file holds).  Every
    file is written to a temporary name and renamed once all are complete; on failure none is left.
    Returns the number of images written per file.
    """
    paths = list(files)
    wanted = pl.concat(
        [
            rows.select("image_id", "part").with_columns(file=pl.lit(i, pl.Int32))
            for i, rows in enumerate(files.values())
        ]
    ).sort("part", maintain_order=True)  # grouped by part: each part is read once for every file
    tmps = [path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp") for path in paths]
    written = dict.fromkeys(paths, 0)
    try:
        with contextlib.ExitStack() as stack:
            writers = []
            for path, tmp in zip(paths, tmps):
                path.parent.mkdir(parents=True, exist_ok=True)
                sink = stack.enter_context(pa.OSFile(str(tmp), "wb"))
                writers.append(stack.enter_context(pa.ipc.new_file(sink, SCHEMA)))
            for (part,), group in wanted.group_by("part", maintain_order=True):
                images = read_part(part, group["image_id"].unique(maintain_order=True).to_list())
                images = images.select("image_id", "image")
                for (i,), ids in group.group_by("file", maintain_order=True):
                    table = images.filter(pl.col("image_id").is_in(ids["image_id"].implode())).to_arrow()
                    if table.num_rows:
                        writers[i].write_table(table.cast(SCHEMA))
                        written[paths[i]] += table.num_rows
        for path, tmp in zip(paths, tmps):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return written


def remove_abandoned(cache_dir: str | os.PathLike, idle_s: float = ABANDONED_AFTER_S) -> int:
    """Delete the temporary files of builds that were killed (kill -9 skips their cleanup): those not
    written to for ``idle_s`` seconds; a build in progress keeps writing, so its file stays.  Returns how
    many were removed."""
    removed, now = 0, time.time()
    for tmp in Path(cache_dir).glob(".*.arrow.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if now - tmp.stat().st_mtime > idle_s:
                tmp.unlink()
                removed += 1
    return removed


def cache_key(rows: pl.DataFrame, part_fingerprints: dict[str, str]) -> str:
    """Hash of the requested (part, image_id) rows in order and the fingerprint of every part they use."""
    digest = hashlib.blake2b(digest_size=12)
    for part, image_id in rows.select("part", "image_id").iter_rows():
        digest.update(f"{part}\0{image_id}\n".encode())
    for part in sorted(part_fingerprints):
        digest.update(f"{part}\0{part_fingerprints[part]}\n".encode())
    return digest.hexdigest()


def split_images_many(
    requests: dict[str, pl.DataFrame],
    read_part: Callable[[str, list[str]], pl.DataFrame],
    part_fingerprint: Callable[[str], str],
    cache_dir: str | os.PathLike,
) -> dict[str, tuple[ImageColumn, list[str]]]:
    """For each name (e.g. a split), the images of its rows (image_id, part) as an ImageColumn in the rows'
    order, with the image ids it holds (ids whose part has no such image are left out of both).

    Files are cached under ``cache_dir`` as ``<name>-<key>.arrow``; the missing ones are built together in
    one pass over the parts, and older files of a rebuilt name are removed.
    """
    cache_dir = Path(cache_dir)
    ordered = {
        n: rows.select("image_id", "part").sort("part", "image_id", maintain_order=True) for n, rows in requests.items()
    }
    used = {n: rows["part"].unique().to_list() for n, rows in ordered.items()}
    fingerprints = {part: part_fingerprint(part) for parts in used.values() for part in parts}
    paths = {
        n: cache_dir / f"{n}-{cache_key(rows, {p: fingerprints[p] for p in used[n]})}.arrow"
        for n, rows in ordered.items()
    }
    columns: dict[str, ImageColumn] = {}
    for attempt in range(2):
        missing = {paths[n]: ordered[n] for n in requests if n not in columns and not paths[n].exists()}
        if missing:
            remove_abandoned(cache_dir)
            write_image_files(missing, read_part)
            for n in requests:
                if paths[n] in missing:
                    for old in cache_dir.glob(f"{n}-*.arrow"):
                        if old != paths[n]:
                            old.unlink(missing_ok=True)
        for n in requests:
            if n in columns:
                continue
            try:
                columns[n] = ImageColumn(paths[n])
            except (OSError, pa.ArrowInvalid):
                # Swept by a concurrent run with newer parts between write and open, or damaged on disk
                # since (the cache is only ever renamed into place whole): build it again, once.
                if attempt:
                    raise
                paths[n].unlink(missing_ok=True)
        if len(columns) == len(requests):
            break
    out = {}
    for n, rows in requests.items():
        file_rows = pl.DataFrame(
            {"image_id": pl.Series(columns[n].file_image_ids, dtype=pl.String)}  # typed: a split may be empty
        ).with_row_index("file_row")
        found = rows.select("image_id").with_row_index("position").join(file_rows, on="image_id", how="inner")
        found = found.sort("position")
        out[n] = (ImageColumn(paths[n], found["file_row"].to_numpy()), found["image_id"].to_list())
    return out


def split_images(
    rows: pl.DataFrame,
    read_part: Callable[[str, list[str]], pl.DataFrame],
    part_fingerprint: Callable[[str], str],
    cache_dir: str | os.PathLike,
    name: str,
) -> tuple[ImageColumn, list[str]]:
    """split_images_many for one name: (column in ``rows``' order, the image ids it holds)."""
    return split_images_many({name: rows}, read_part, part_fingerprint, cache_dir)[name]
