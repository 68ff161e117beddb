"""The persistent zip-hash cache of DiffusionDBSource: an unchanged zip is read once per machine, a changed
one is re-hashed, and a damaged or unwritable cache only costs re-hashing, never a wrong hash or a failure."""

from __future__ import annotations

import hashlib
import os
import time
import zipfile

import pytest

from pipeline.data import file_hashes as ddb
from pipeline.data.diffusiondb import DiffusionDBSource
from pipeline.data.file_hashes import HASH_CACHE_FILE


@pytest.fixture
def mirror(tmp_path):
    images = tmp_path / "mirror" / "images"
    images.mkdir(parents=True)
    for i in range(3):
        with zipfile.ZipFile(images / f"part-{i:06d}.zip", "w") as z:
            z.writestr(f"part-{i:06d}.json", "{}")
            z.writestr("filler.bin", os.urandom(1000))
    return tmp_path / "mirror"


@pytest.fixture
def reads(monkeypatch):
    """The paths whose bytes were hashed, in order; the process memory starts (and is kept) empty of hashes."""
    seen = []
    real = ddb._hash_file

    def spy(path):
        seen.append(path.name)
        return real(path)

    monkeypatch.setattr(ddb, "_hash_file", spy)
    monkeypatch.setattr(ddb, "_RACY_NS", 0)  # the zips were just written; test_racy_file_is_not_persisted covers it
    fresh_process()
    yield seen
    fresh_process()


def fresh_process():
    """What a new process starts with: no hashes in memory, no cache file loaded, no directory given up on."""
    ddb._HASH_CACHE.clear()
    ddb._DISK_LOADED.clear()
    ddb._DISK_UNWRITABLE.clear()


def list_afresh(mirror, cache, reads) -> dict[str, str]:
    """The parts listed by a fresh process (fresh_process) with the hash cache ``cache``; ``reads`` cleared first."""
    fresh_process()
    reads.clear()
    return DiffusionDBSource(str(mirror), hash_cache_dir=str(cache)).list_parts()


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_second_process_reads_no_unchanged_zip(mirror, tmp_path, reads):
    cache = tmp_path / "cache"
    first = DiffusionDBSource(str(mirror), hash_cache_dir=str(cache)).list_parts()
    assert len(reads) == 3
    assert first == {p.stem: sha(p) for p in (mirror / "images").iterdir()}
    assert (cache / HASH_CACHE_FILE).is_file()

    fresh_process()
    source = DiffusionDBSource(str(mirror), hash_cache_dir=str(cache))
    assert source.list_parts() == first
    assert source.revision_id().startswith("mirror-")
    assert len(reads) == 3  # nothing read again
    # a caller hashing a zip without the directory (the ingest asset) finds it too, once the source exists
    assert ddb.file_sha256(mirror / "images" / "part-000001.zip") == first["part-000001"]
    assert len(reads) == 3


def test_changed_zip_is_rehashed(mirror, tmp_path, reads):
    cache = tmp_path / "cache"
    before = DiffusionDBSource(str(mirror), hash_cache_dir=str(cache)).list_parts()
    touched, rewritten = mirror / "images" / "part-000000.zip", mirror / "images" / "part-000002.zip"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns - 10**9))
    st = rewritten.stat()
    time.sleep(0.05)  # past the filesystem's timestamp granularity, so the rewrite moves the ctime
    data = bytearray(rewritten.read_bytes())
    data[-1] ^= 0xFF  # same size; the mtime restored as cp -p or rsync -t would: only ctime tells
    rewritten.write_bytes(bytes(data))
    os.utime(rewritten, ns=(st.st_atime_ns, st.st_mtime_ns))

    listed = list_afresh(mirror, cache, reads)
    assert sorted(reads) == ["part-000000.zip", "part-000002.zip"]
    assert listed["part-000002"] == sha(rewritten) != before["part-000002"]
    assert listed["part-000000"] == before["part-000000"]  # touched only: the same bytes, the same hash

    assert list_afresh(mirror, cache, reads) == listed
    assert reads == []  # the new hashes were kept in turn


@pytest.mark.parametrize(
    "damage",
    ["garbage", "torn", "wrong_hash", "not_utf8", "deep"],
)
def test_corrupt_cache_file_is_ignored(mirror, tmp_path, reads, damage):
    cache = tmp_path / "cache"
    want = DiffusionDBSource(str(mirror), hash_cache_dir=str(cache)).list_parts()
    file = cache / HASH_CACHE_FILE
    text = file.read_bytes()
    file.write_bytes(
        {
            "garbage": b'\x00\x01 not json {{{\n[1,2]\n"str"\n',
            "torn": text[: len(text) // 2],
            # a record whose hash was altered: its check no longer matches, so it is not trusted
            "wrong_hash": text.replace(want["part-000000"].encode(), b"0" * 64),
            "not_utf8": b"\xff\xfe" + text[:40] + b"\xff\n",
            "deep": b"[" * 100_000 + b"\n",
        }[damage]
    )
    assert list_afresh(mirror, cache, reads) == want
    assert reads  # what the damaged file lost is hashed again, and the file is usable afterwards
    assert list_afresh(mirror, cache, reads) == want
    assert reads == []


def test_record_appended_after_a_torn_one_survives(mirror, tmp_path, reads):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / HASH_CACHE_FILE).write_bytes(b'\n{"v":1,"path":"/x","si')  # a writer killed mid-record
    want = DiffusionDBSource(str(mirror), hash_cache_dir=str(cache)).list_parts()
    assert list_afresh(mirror, cache, reads) == want
    assert reads == []


def test_unwritable_cache_dir_does_not_fail_listing(mirror, tmp_path, reads):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache = blocker / "cache"  # cannot be created, whoever runs the test (root included)
    source = DiffusionDBSource(str(mirror), hash_cache_dir=str(cache))
    want = {p.stem: sha(p) for p in (mirror / "images").iterdir()}
    assert source.list_parts() == want
    assert source.list_parts() == want
    assert len(reads) == 3  # the process memory still spares the second listing


def test_superseded_records_are_compacted(mirror, tmp_path, reads, monkeypatch):
    monkeypatch.setattr(ddb, "_COMPACT_SLACK", 2)
    cache = tmp_path / "cache"
    zip0 = mirror / "images" / "part-000000.zip"
    for _ in range(5):
        os.utime(zip0, ns=(zip0.stat().st_atime_ns, zip0.stat().st_mtime_ns - 10**9))
        fresh_process()
        want = DiffusionDBSource(str(mirror), hash_cache_dir=str(cache)).list_parts()
    lines = [line for line in (cache / HASH_CACHE_FILE).read_bytes().splitlines() if line.strip()]
    assert len(lines) <= 3 + 2 + 1
    assert list_afresh(mirror, cache, reads) == want
    assert reads == []


def test_resource_passes_a_local_directory_under_the_storage_root(tmp_path, mirror):
    from resources.core import DiffusionDBResource, build_resources
    from resources.settings import load_settings

    env = {"REVERSE_SD_HOME": str(tmp_path / "home"), "REVERSE_SD_DIFFUSIONDB": str(mirror)}
    built = build_resources(load_settings(env))["diffusiondb"]
    assert built.hash_cache_dir == str(tmp_path / "home" / "hash-cache")
    env["REVERSE_SD_HOME"] = "memory://bucket/home"  # an object store: the user's local cache instead
    assert "://" not in build_resources(load_settings(env))["diffusiondb"].hash_cache_dir
    resource = DiffusionDBResource(location=str(mirror), hash_cache_dir=str(tmp_path / "c"))
    assert resource.source().hash_cache_dir == str(tmp_path / "c")
    assert DiffusionDBResource(location=str(mirror)).source().hash_cache_dir is None


def test_racy_file_is_not_persisted(mirror, tmp_path, reads, monkeypatch):
    """A zip written moments ago could change again within one timestamp tick: memory only, until it settles."""
    monkeypatch.setattr(ddb, "_RACY_NS", 3600 * 10**9)
    cache = tmp_path / "cache"
    source = DiffusionDBSource(str(mirror), hash_cache_dir=str(cache))
    want = source.list_parts()
    assert source.list_parts() == want and len(reads) == 3
    assert not (cache / HASH_CACHE_FILE).exists()
