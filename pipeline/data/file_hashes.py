"""File content hashes (sha256) cached by stat, in memory and optionally on disk.

A DiffusionDB listing names every part by the sha256 of its zip; at DiffusionDB-2M's 2,000 zips (850 GB)
hashing them on every invocation would cost far more than the work, so an unchanged file is hashed once
per machine: the key is (path, size, mtime, ctime), and a file whose stat moved is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

_HASH_CACHE: dict[tuple[str, int, int, int], str] = {}
_HASH_LOCK = threading.Lock()
_log = logging.getLogger(__name__)

# The persistent twin of _HASH_CACHE: one JSON Lines file per cache directory, so an unchanged zip is hashed
# once per machine rather than once per process (DiffusionDB-2M is 850 GB of zips, listed on every invocation).
HASH_CACHE_FILE = "zip-sha256.jsonl"
_CACHE_FORMAT = 1
_COMPACT_SLACK = 64  # superseded records tolerated before a load rewrites the file
# A file changed this recently may change again within the filesystem's timestamp granularity without its
# stat changing (git's "racy" entries): its hash is kept in memory but not on disk until it has settled.
_RACY_NS = 2 * 10**9
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_DISK_LOADED: set[str] = set()  # cache directories already merged into _HASH_CACHE by this process
_DISK_UNWRITABLE: set[str] = set()  # cache directories that refused a write: not tried again by this process


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    """(resolved path, size, mtime_ns, ctime_ns): ctime too, because a rewrite that restores the mtime (cp -p,
    rsync -t, tar) must not be trusted for ever once the hash outlives the process."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _record_check(key: tuple[str, int, int, int], sha: str) -> str:
    return hashlib.sha256("\0".join(map(str, (*key, sha))).encode()).hexdigest()[:16]


def _encode_record(key: tuple[str, int, int, int], sha: str) -> bytes:
    path, size, mtime_ns, ctime_ns = key
    record = {"v": _CACHE_FORMAT, "path": path, "size": size, "mtime_ns": mtime_ns, "ctime_ns": ctime_ns}
    record |= {"sha256": sha, "check": _record_check(key, sha)}
    return json.dumps(record, separators=(",", ":")).encode()


def _decode_record(line: bytes) -> tuple[tuple[str, int, int, int], str] | None:
    """A record, or None for anything torn, garbled or of another format: a bad line costs a re-hash, never
    a wrong hash (every record carries a check of its own fields)."""
    try:
        record = json.loads(line)
        key = (record["path"], record["size"], record["mtime_ns"], record["ctime_ns"])
        sha, check = record["sha256"], record["check"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if record.get("v") != _CACHE_FORMAT or not isinstance(key[0], str) or not isinstance(sha, str):
        return None
    if not all(type(n) is int for n in key[1:]) or not _SHA256_HEX.fullmatch(sha):
        return None
    return (key, sha) if check == _record_check(key, sha) else None


def _load_hash_cache(cache_dir: Path) -> None:
    """Merge the directory's records into _HASH_CACHE, once per process; compact the file when it has grown."""
    with _HASH_LOCK:
        if str(cache_dir) in _DISK_LOADED:
            return
        _DISK_LOADED.add(str(cache_dir))
    try:
        lines = [line for line in (cache_dir / HASH_CACHE_FILE).read_bytes().splitlines() if line.strip()]
    except FileNotFoundError:
        return
    except OSError as exc:
        _log.warning("file hash cache %s unreadable (%s): hashing without it", cache_dir, exc)
        return
    latest: dict[str, tuple[tuple[str, int, int, int], str]] = {}  # resolved path -> its newest record
    for line in lines:
        if (decoded := _decode_record(line)) is not None:
            latest[decoded[0][0]] = decoded
    with _HASH_LOCK:
        for key, sha in latest.values():
            _HASH_CACHE.setdefault(key, sha)
    if len(lines) > len(latest) + _COMPACT_SLACK:
        _compact_hash_cache(cache_dir, latest.values())


def _compact_hash_cache(cache_dir: Path, records) -> None:
    """Rewrite the file with one record per existing path, atomically (temp file + rename): a reader sees the
    old file or the new one.  A record appended by another process meanwhile may be lost: a re-hash, no more."""
    tmp = cache_dir / f"{HASH_CACHE_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as f:
            for key, sha in records:
                if os.path.exists(key[0]):
                    f.write(b"\n" + _encode_record(key, sha))
        os.replace(tmp, cache_dir / HASH_CACHE_FILE)
    except OSError as exc:
        _log.warning("file hash cache %s not compacted (%s)", cache_dir, exc)
        tmp.unlink(missing_ok=True)


def _append_hash_cache(cache_dir: Path, key: tuple[str, int, int, int], sha: str) -> None:
    """Append one record with a single O_APPEND write, so concurrent processes never interleave inside a record.
    Each record starts with a newline: one torn by a crash can never swallow the next."""
    if str(cache_dir) in _DISK_UNWRITABLE:
        return
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir / HASH_CACHE_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"\n" + _encode_record(key, sha))
        finally:
            os.close(fd)
    except OSError as exc:
        _DISK_UNWRITABLE.add(str(cache_dir))
        _log.warning("file hash cache %s not writable (%s): hashes are kept for this process only", cache_dir, exc)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime, ctime) so a listing re-hashes only changed files.

    With `cache_dir` (a writable local directory) the cache also persists there, shared by every process.
    """
    cache = None if cache_dir is None else Path(cache_dir).expanduser().resolve()
    if cache is not None:
        _load_hash_cache(cache)
    key = _stat_key(path)
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    value = _hash_file(path)
    if _stat_key(path) != key:  # changed while being read: the hash belongs to no single version, keep none
        return value
    with _HASH_LOCK:
        _HASH_CACHE[key] = value
    if cache is not None and time.time_ns() - max(key[2], key[3]) > _RACY_NS:
        _append_hash_cache(cache, key, value)
    return value
