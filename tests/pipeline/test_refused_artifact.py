"""A file a reader refused is rehashed by the cheap integrity check that planning uses (issue 27 item 2):
bytes flipped with size and mtime kept are invisible to size/mtime, so the refusal must be remembered."""

from __future__ import annotations

import os

import polars as pl
import pytest

from pipeline import storage


def _flip_keeping_size_and_mtime(path) -> None:
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_refused_file_is_seen_damaged_by_the_cheap_check(tmp_path):
    target = tmp_path / "prompt_bank.parquet"
    storage.write_parquet(pl.DataFrame({"prompt": ["a red circle"] * 50}), target)
    assert storage.is_intact(target)
    _flip_keeping_size_and_mtime(target)
    assert storage.is_intact(target)  # size and mtime as written: the cheap check cannot see it...
    with pytest.raises(storage.IntegrityError):
        storage.verify(target)  # ...until a reader (predict) refuses it
    assert not storage.is_intact(target)  # from then on planning rehashes it: --stale plans the rebuild
    storage.write_parquet(pl.DataFrame({"prompt": ["a blue square"] * 50}), target)  # rebuilt
    assert storage.is_intact(target) and storage.recorded_hash(target).get("mtime_ns") is not None
