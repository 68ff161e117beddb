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

import hashlib
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.large_binary())])


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


def write_image_file(
    rows: pl.DataFrame, read_part: Callable[[str, list[str]], pl.DataFrame], path: str | os.PathLike
) -> int:
    """Write the images of ``rows`` (columns image_id, part) to an Arrow IPC file at ``path``, atomically.

    ``read_part(part, image_ids)`` returns (image_id, image) for the ids it has; it is called once per
    part, so memory holds one part's images at a time.  Ids a part does not have are left out (the
    caller joins on what the file holds).  Returns the number of images written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    written = 0
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            for (part,), group in rows.group_by("part", maintain_order=True):
                images = read_part(part, group["image_id"].to_list())
                if images.height:
                    table = images.select("image_id", "image").to_arrow().cast(SCHEMA)
                    writer.write_table(table)
                    written += table.num_rows
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def cache_key(rows: pl.DataFrame, part_fingerprints: dict[str, str]) -> str:
    """Hash of the requested (part, image_id) rows in order and the fingerprint of every part they use."""
    digest = hashlib.blake2b(digest_size=12)
    for part, image_id in rows.select("part", "image_id").iter_rows():
        digest.update(f"{part}\0{image_id}\n".encode())
    for part in sorted(part_fingerprints):
        digest.update(f"{part}\0{part_fingerprints[part]}\n".encode())
    return digest.hexdigest()


def split_images(
    rows: pl.DataFrame,
    read_part: Callable[[str, list[str]], pl.DataFrame],
    part_fingerprint: Callable[[str], str],
    cache_dir: str | os.PathLike,
    name: str,
) -> tuple[ImageColumn, list[str]]:
    """The images of ``rows`` (image_id, part) as an ImageColumn in ``rows``' order, built on first use.

    Returns (column, image ids it holds, in ``rows``' order); ids whose part has no such image are left
    out of both.  ``name`` (e.g. the split) prefixes the cache file, and older files with that prefix
    are removed after a new one is written.
    """
    ordered = rows.select("image_id", "part").sort("part", "image_id", maintain_order=True)
    fingerprints = {part: part_fingerprint(part) for part in ordered["part"].unique().to_list()}
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{name}-{cache_key(ordered, fingerprints)}.arrow"
    for attempt in range(2):
        if not path.exists():
            write_image_file(ordered, read_part, path)
            for old in cache_dir.glob(f"{name}-*.arrow"):
                if old != path:
                    old.unlink(missing_ok=True)
        try:
            column = ImageColumn(path)
            break
        except (OSError, pa.ArrowInvalid):
            # Swept by a concurrent run with newer parts between write and open, or damaged on disk since
            # (the cache is only ever renamed into place whole): build it again, once.
            if attempt:
                raise
            path.unlink(missing_ok=True)
    file_rows = pl.DataFrame({"image_id": column.file_image_ids}).with_row_index("file_row")
    wanted = rows.select("image_id").with_row_index("position").join(file_rows, on="image_id", how="inner")
    wanted = wanted.sort("position")
    return ImageColumn(path, wanted["file_row"].to_numpy()), wanted["image_id"].to_list()
