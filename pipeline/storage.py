"""Atomic artifact writes under one storage root.

Every artifact is written to a temporary sibling and renamed into place, so a killed run never leaves a
half-written Parquet file or checkpoint where a reader looks.  Paths may be local paths or fsspec URLs
(``file://...``, ``memory://...``, ``s3://...``) through universal-pathlib, so the storage root can be an
object store with no code change.  On a remote filesystem the artifact is first written to a local
temporary file, then uploaded: object stores whose upload only becomes visible once complete (S3, GCS,
Azure: one PUT or a completed multipart upload) take it directly; any other fsspec filesystem gets a
hidden temporary sibling that is moved into place, because a plain streamed write there commits
whatever was written when it fails half-way.

Every artifact written here gets a sidecar ``<name>.sha256`` (its SHA-256, size and modification time,
or on an object store the object's ETag), written after the artifact itself; readers verify the content
against it (``verify``), so a truncated or altered file stops with one line naming it instead of giving
wrong answers, and ``is_intact`` tells `--stale` planning cheaply (size and time, or size and ETag, first;
the hash only when they moved) that a file was touched.

Object stores (s3://, through s3fs; an S3-compatible server through AWS_ENDPOINT_URL_S3): no "directory" is
ever created (s3fs would create a missing *bucket* for it), directory listings are not cached (another
process writes the objects this one lists), and a remote artifact is downloaded once, verified, then read
from that local copy (``verified_local_copy``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

PathLike = str | os.PathLike


# Object stores whose put_file makes the object visible only once the whole upload has succeeded.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


def as_path(path: PathLike) -> UPath | Path:
    """A local Path for plain paths and file://, a UPath for any other fsspec protocol.

    On an object store the listing cache is off: s3fs would otherwise answer exists() and iterdir() from a
    listing this process made before another process (a run, a worker) wrote there."""
    if isinstance(path, UPath):
        return Path(path.path) if path.protocol in ("", "file", "local") else path
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        if text.split("://", 1)[0].lower() in ATOMIC_PUT_PROTOCOLS:
            return UPath(text, use_listings_cache=False)
        return UPath(text)
    return Path(text.removeprefix("file://"))


def _is_object_store(path: UPath) -> bool:
    protocols = {path.fs.protocol} if isinstance(path.fs.protocol, str) else set(path.fs.protocol)
    return bool(protocols & ATOMIC_PUT_PROTOCOLS)


def _etag(path: UPath) -> str | None:
    """The object's ETag (changes whenever its content does), or None where the store has none."""
    info = path.fs.info(path.path)
    value = info.get("ETag") or info.get("etag")
    return str(value) if value else None


@contextlib.contextmanager
def atomic_local_path(target: PathLike, suffix: str = "", sidecar: bool = True) -> Iterator[Path]:
    """Yield a temporary local path; on success it is renamed (or uploaded) to ``target``, then its SHA-256
    sidecar is written (``sidecar=False``: files in someone else's layout, such as a DiffusionDB mirror).

    On failure the temporary file is removed and ``target`` is left as it was.
    """
    dest = as_path(target)
    if isinstance(dest, Path):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp{suffix}"
        try:
            yield tmp
            digest = file_sha256(tmp) if sidecar else None
            os.replace(tmp, dest)
            if sidecar:
                _write_sidecar(dest, digest)
        finally:
            if tmp.exists():
                tmp.unlink()
    else:
        fd, name = tempfile.mkstemp(suffix=suffix or dest.suffix)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            digest = file_sha256(tmp) if sidecar else None
            upload(tmp, dest)
            if sidecar:
                etag = _etag(dest) if _is_object_store(dest) else None
                _write_sidecar(dest, digest, size=tmp.stat().st_size, etag=etag)
        finally:
            tmp.unlink(missing_ok=True)


# ---- integrity: a SHA-256 sidecar per artifact --------------------------------------------------------

SIDECAR_SUFFIX = ".sha256"


class IntegrityError(ValueError):
    """An artifact that does not match the hash recorded when it was written (truncated, altered)."""


def file_sha256(path: PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    p = as_path(path)
    with p.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(target: PathLike) -> UPath | Path:
    dest = as_path(target)
    return dest.with_name(dest.name + SIDECAR_SUFFIX)


def _write_sidecar(dest: UPath | Path, digest: str, size: int | None = None, etag: str | None = None) -> None:
    record = {"sha256": digest, "size": size if size is not None else dest.stat().st_size}
    if isinstance(dest, Path):
        record["mtime_ns"] = dest.stat().st_mtime_ns
    if etag:
        record["etag"] = etag
    data = json.dumps(record).encode()
    side = sidecar_path(dest)
    if isinstance(side, Path):
        tmp = side.parent / f".{side.name}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, side)
    else:
        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(data)
        try:
            upload(Path(f.name), side)
        finally:
            os.unlink(f.name)


def recorded_hash(target: PathLike) -> dict | None:
    """The sidecar's record ({"sha256", "size", "mtime_ns"}), or None for a file written without one."""
    side = sidecar_path(target)
    try:
        return json.loads(side.read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def verify(target: PathLike, content: PathLike | None = None) -> str | None:
    """Check ``target`` against its sidecar; return its SHA-256 (None when it has no sidecar).

    ``content``: a local copy of ``target`` to hash instead (``verified_local_copy``: one download, not two).
    Raises IntegrityError, naming the file, when the content differs from what was written."""
    record = recorded_hash(target)
    if record is None:
        return None
    actual = file_sha256(target if content is None else content)
    if actual != record.get("sha256"):
        size = as_path(target if content is None else content).stat().st_size
        what = "truncated" if size < record.get("size", size) else "altered"
        _mark_refused(target, record)
        raise IntegrityError(
            f"{target} is damaged ({what}: {size} bytes, SHA-256 {actual[:12]}..., written as "
            f"{record.get('size')} bytes, {str(record.get('sha256'))[:12]}...)"
        )
    return actual


def _mark_refused(target: PathLike, record: dict) -> None:
    """A reader refused ``target``: drop the size/mtime shortcut from its sidecar, so the next cheap check
    (planning, ``materialize --stale``) rehashes it and plans its rebuild, even when bytes were flipped with
    size and mtime kept.  Best effort: a read-only root keeps the record as it is."""
    side = sidecar_path(target)
    if record.get("mtime_ns") is None or not isinstance(side, Path):  # object stores always rehash
        return
    tmp = side.parent / f".{side.name}.{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_bytes(json.dumps({**record, "mtime_ns": None, "refused": True}).encode())
        os.replace(tmp, side)
    except OSError:
        tmp.unlink(missing_ok=True)


def is_intact(target: PathLike) -> bool:
    """Cheap check for planning: size and modification time as written, else the full hash."""
    record = recorded_hash(target)
    if record is None:
        return True
    p = as_path(target)
    try:
        # one stat, or one HEAD on an object store (its size and ETag together)
        info = p.stat() if isinstance(p, Path) else p.fs.info(p.path)
    except FileNotFoundError:
        return False
    if isinstance(p, Path):
        if info.st_size == record.get("size") and info.st_mtime_ns == record.get("mtime_ns"):
            return True
    elif record.get("etag") and info.get("size") == record.get("size"):
        # an object's ETag changes whenever its bytes do: that HEAD instead of downloading it to hash it
        etag = info.get("ETag") or info.get("etag")
        if etag and str(etag) == record["etag"]:
            return True
    try:
        verify(target)
    except IntegrityError:
        return False
    return True


def upload(local: Path, dest: UPath) -> None:
    """Copy a complete local file to ``dest`` on its fsspec filesystem so no reader sees part of it.

    On an object store that is one PUT (or a multipart upload, completed only once every part is in): no
    "directory" is made first, because s3fs's mkdir creates the bucket when it is missing, and a mistyped
    bucket in REVERSE_SD_HOME must be an error, not a new bucket."""
    fs = dest.fs
    if _is_object_store(dest):
        fs.put_file(str(local), dest.path)
        return
    with contextlib.suppress(FileExistsError, NotImplementedError):
        dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        fs.put_file(str(local), staging.path)
        fs.mv(staging.path, dest.path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            if fs.exists(staging.path):
                fs.rm(staging.path)


def write_parquet(frame: pl.DataFrame | pa.Table, target: PathLike, compression: str = "zstd") -> None:
    """Write a polars frame or arrow table as Parquet, atomically."""
    table = frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame
    with atomic_local_path(target, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression=compression)


def write_bytes(data: bytes, target: PathLike) -> None:
    with atomic_local_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(text: str, target: PathLike) -> None:
    write_bytes(text.encode("utf-8"), target)


@contextlib.contextmanager
def verified_local_copy(target: PathLike) -> Iterator[Path]:
    """A local file holding ``target``'s content, checked against its sidecar (IntegrityError if damaged).

    A local artifact is itself; a remote one is downloaded once to a temporary file, which is hashed and then
    read (removed afterwards): a reader never hashes one version of an object and reads another."""
    p = as_path(target)
    if isinstance(p, Path):
        verify(p)
        yield p
        return
    fd, name = tempfile.mkstemp(suffix=p.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        p.fs.get_file(p.path, str(tmp))
        verify(target, content=tmp)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def read_parquet(path: PathLike, columns: list[str] | None = None) -> pl.DataFrame:
    """Read a Parquet artifact after checking it against its recorded hash (IntegrityError if damaged)."""
    with verified_local_copy(path) as local:
        return pl.read_parquet(local, columns=columns)


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


def fingerprint(path: PathLike) -> str:
    """A cheap identity of a file's current version, for caches keyed on it: size and modification time
    (local files, rewritten by rename, so a rewrite changes it), else the fsspec info's ETag / mtime / size."""
    p = as_path(path)
    if isinstance(p, Path):
        st = p.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    info = p.fs.info(p.path)
    keys = ("ETag", "etag", "md5", "mtime", "LastModified", "last_modified", "created")
    stamp = next((info[k] for k in keys if info.get(k)), "")
    return f"{info.get('size', '')}:{stamp}"


# ---- one writer per storage root ----------------------------------------------------------------------


class RootBusy(RuntimeError):
    """Another process holds the storage root's lock; the message says who."""


class RootLock:
    """An exclusive lock per storage root (a file lock beside the artifacts, or in DAGSTER_HOME for an
    object-store root): two `materialize` runs on one root never compute the same thing twice."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / ".reverse-sd-materialize.lock"
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self, wait: bool, on_wait: Callable[[str], None] | None = None) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                raise RootBusy(self.holder()) from None
            if on_wait:
                on_wait(self.holder())
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (unlinking would race a waiter)
            self._fd = None
