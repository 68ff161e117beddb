"""pipeline.data.image_store: a split's images in one memory-mapped Arrow file, built part by part and cached."""

from __future__ import annotations

import pickle

import numpy as np
import polars as pl
import pytest
import torch

from pipeline.data.image_store import ImageColumn, split_images, write_image_files
from pipeline.data.images import reencode_image
from pipeline.training.datasets import PairDataset, make_loader
from pipeline.training.ddp import read_pairs, write_pairs


def _png(seed: int) -> bytes:
    from io import BytesIO

    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


PARTS = {
    "part-000001": {f"a{i}": _png(i) for i in range(5)},
    "part-000002": {f"b{i}": _png(10 + i) for i in range(4)},
    "part-000003": {f"c{i}": _png(20 + i) for i in range(3)},
}


class PartReader:
    """read_part over PARTS that records each call (part, number of ids asked for)."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, int]] = []
        self.fail_on = fail_on

    def __call__(self, part: str, ids: list[str]) -> pl.DataFrame:
        self.calls.append((part, len(ids)))
        if part == self.fail_on:
            raise OSError(f"cannot read {part}")
        have = PARTS[part]
        return pl.DataFrame(
            {"image_id": [i for i in ids if i in have], "image": [have[i] for i in ids if i in have]},
            schema={"image_id": pl.String, "image": pl.Binary},
        )


def _rows(ids: list[str]) -> pl.DataFrame:
    part_of = {i: p for p, images in PARTS.items() for i in images}
    return pl.DataFrame({"image_id": ids, "part": [part_of.get(i, "part-000001") for i in ids]})


def test_split_images_follow_the_rows_order_and_leave_out_missing_ids(tmp_path):
    ids = ["c2", "a0", "b3", "missing", "a4", "b0"]
    reader = PartReader()
    column, found = split_images(_rows(ids), reader, lambda part: "v1", tmp_path, "train")
    assert found == ["c2", "a0", "b3", "a4", "b0"]
    assert len(column) == 5
    expected = [PARTS[{"a": "part-000001", "b": "part-000002", "c": "part-000003"}[i[0]]][i] for i in found]
    assert [column[i] for i in range(5)] == expected
    assert column[-1] == expected[-1] and column[1:3] == expected[1:3]
    with pytest.raises(IndexError):
        column[5]
    # one read per part, each asked for that part's ids only: memory holds one part at a time
    assert sorted(reader.calls) == [("part-000001", 3), ("part-000002", 2), ("part-000003", 1)]


def test_cache_is_reused_until_a_part_changes_and_old_files_are_removed(tmp_path):
    ids = ["a1", "b1", "c1"]
    reader = PartReader()
    version = {"part-000002": "v1"}
    first, _ = split_images(_rows(ids), reader, lambda p: version.get(p, "v1"), tmp_path, "train")
    split_images(_rows(ids), reader, lambda p: version.get(p, "v1"), tmp_path, "train")
    assert len(reader.calls) == 3  # second call: no part read
    split_images(_rows(["a1"]), reader, lambda p: "v1", tmp_path, "val")  # another split keeps its own file
    version["part-000002"] = "v2"  # the part was rewritten
    second, _ = split_images(_rows(ids), reader, lambda p: version.get(p, "v1"), tmp_path, "train")
    assert len(reader.calls) == 3 + 1 + 3
    files = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.arrow"))
    assert files == ["train", "val"]
    assert [first[i] for i in range(3)] == [second[i] for i in range(3)]  # the mapping survives the unlink


def test_a_failed_build_leaves_no_file(tmp_path):
    with pytest.raises(OSError, match="part-000002"):
        split_images(_rows(["a1", "b1", "c1"]), PartReader(fail_on="part-000002"), lambda p: "v", tmp_path, "train")
    assert list(tmp_path.iterdir()) == []


def test_image_column_pickles_as_its_path_and_rows(tmp_path):
    path = tmp_path / "images.arrow"
    write_image_files({path: _rows(["a0", "a1", "b2"])}, PartReader())
    column = ImageColumn(path, rows=[2, 0])
    clone = pickle.loads(pickle.dumps(column))
    assert len(pickle.dumps(column)) < 1000  # not the images
    assert [clone[0], clone[1]] == [PARTS["part-000002"]["b2"], PARTS["part-000001"]["a0"]]
    with pytest.raises(ValueError, match="rows outside"):
        ImageColumn(path, rows=[3])


def test_pair_dataset_reads_a_mapped_column_in_loader_workers(tmp_path):
    ids = ["a0", "a1", "b0", "b1", "c0", "c1"]
    column, found = split_images(_rows(ids), PartReader(), lambda p: "v", tmp_path, "train")
    targets = np.eye(6, 4, dtype=np.float32)
    dataset = PairDataset(column, targets, image_size=8)
    assert dataset.images is column  # not copied into a list
    in_memory = PairDataset([column[i] for i in range(6)], targets, image_size=8)
    loader = make_loader(dataset, batch_size=3, num_workers=2)
    pixels = torch.cat([batch[0] for batch in loader])
    assert torch.equal(pixels, torch.stack([in_memory[i][0] for i in range(6)]))


def test_launched_runs_get_row_indices_into_the_image_file_not_a_copy(tmp_path):
    ids = ["a0", "b1", "c2", "a3"]
    column, _ = split_images(_rows(ids), PartReader(), lambda p: "v", tmp_path, "train")
    targets = np.random.default_rng(0).normal(size=(4, 384)).astype(np.float32)
    labels = [np.array([1, 2]), np.array([], dtype=np.int64), np.array([0]), np.array([5])]
    write_pairs(str(tmp_path / "pairs.parquet"), column, targets, labels)
    assert "image" not in pl.read_parquet_schema(tmp_path / "pairs.parquet")
    images, read_targets, read_labels = read_pairs(str(tmp_path / "pairs.parquet"))
    assert isinstance(images, ImageColumn)
    assert [images[i] for i in range(4)] == [column[i] for i in range(4)]
    assert np.array_equal(read_targets, targets)
    assert [x.tolist() for x in read_labels] == [x.tolist() for x in labels]
    # plain bytes still travel as bytes
    write_pairs(str(tmp_path / "bytes.parquet"), [column[i] for i in range(4)], targets, None)
    images, _, no_labels = read_pairs(str(tmp_path / "bytes.parquet"))
    assert images[2].as_py() == column[2] and no_labels is None


def test_reencoded_images_round_trip_through_the_file(tmp_path):
    """What diffusiondb_parts stores (re-encoded images) comes back byte for byte."""
    data = reencode_image(_png(99), 16)
    reader = lambda part, ids: pl.DataFrame({"image_id": ids, "image": [data] * len(ids)})  # noqa: E731
    column, _ = split_images(_rows(["a0"]), reader, lambda p: "v", tmp_path, "test")
    assert column[0] == data


def test_a_file_swept_by_a_concurrent_run_before_it_is_opened_is_rebuilt(tmp_path, monkeypatch):
    import pipeline.data.image_store as store

    real_write, builds = store.write_image_files, []

    def write_then_swept(files, read_part):
        builds.append(list(files))
        written = real_write(files, read_part)
        if len(builds) == 1:
            for path in files:
                path.unlink()  # another run, holding newer parts, removed it
        return written

    monkeypatch.setattr(store, "write_image_files", write_then_swept)
    column, found = split_images(_rows(["a1", "b2"]), PartReader(), lambda p: "v", tmp_path, "train")
    assert len(builds) == 2 and found == ["a1", "b2"] and column[1] == PARTS["part-000002"]["b2"]


def test_label_lists_are_two_arrays_that_read_back_as_the_rows():
    from pipeline.training.datasets import LabelLists, multi_hot

    rows = [np.array([3, 1]), None, [], np.array([0]), [2, 2, 4]]
    labels = LabelLists(rows)
    assert len(labels) == 5 and labels.values.tolist() == [3, 1, 0, 2, 2, 4]
    assert [labels[i].tolist() for i in range(5)] == [[3, 1], [], [], [0], [2, 2, 4]]
    assert labels[-1].tolist() == [2, 2, 4] and LabelLists(labels) is not labels
    with pytest.raises(IndexError):
        labels[5]
    assert multi_hot(labels, 0, 5).tolist() == [0, 1, 0, 1, 0] and multi_hot(None, 0, 5).shape == (0,)
    labels.check_range(5)
    with pytest.raises(ValueError, match="row 4: label index out of range"):
        labels.check_range(4)
    # a dataset refuses out-of-range labels when it is built, naming the row
    with pytest.raises(ValueError, match="row 4"):
        PairDataset([b""] * 5, np.zeros((5, 4), np.float32), rows, image_size=8, vocab_size=4)


def test_a_damaged_cache_file_is_rebuilt(tmp_path):
    rows = _rows(["a1", "b2"])
    column, _ = split_images(rows, PartReader(), lambda p: "v", tmp_path, "train")
    (path,) = tmp_path.glob("train-*.arrow")
    del column
    path.write_bytes(b"ARROW1 but truncated")  # bit rot, or a disk that lost the tail
    reader = PartReader()
    column, found = split_images(rows, reader, lambda p: "v", tmp_path, "train")
    assert len(reader.calls) == 2 and [column[0], column[1]] == [PARTS["part-000001"]["a1"], PARTS["part-000002"]["b2"]]


def test_several_splits_are_built_in_one_pass_over_the_parts(tmp_path):
    from pipeline.data.image_store import split_images_many

    requests = {"train": _rows(["a0", "a1", "b0", "c0"]), "val": _rows(["a2", "b1"]), "test": _rows(["c1", "a3"])}
    reader = PartReader()
    built = split_images_many(requests, reader, lambda p: "v", tmp_path)
    assert sorted(reader.calls) == [("part-000001", 4), ("part-000002", 2), ("part-000003", 2)]  # each part once
    for name, rows in requests.items():
        column, found = built[name]
        assert found == rows["image_id"].to_list()
        alone, _ = split_images(rows, PartReader(), lambda p: "v", tmp_path / "alone", name)
        assert [column[i] for i in range(len(column))] == [alone[i] for i in range(len(alone))]
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.arrow")) == ["test", "train", "val"]
    # only what is missing is built again: val's part changed
    test_file = next(tmp_path.glob("test-*.arrow"))
    reader = PartReader()
    split_images_many(requests, reader, lambda p: "v2" if p == "part-000002" else "v", tmp_path)
    # train and val use part-000002: rebuilt together (each part read once for both); test is kept
    assert sorted(reader.calls) == [("part-000001", 3), ("part-000002", 2), ("part-000003", 1)]
    assert test_file.exists() and len(list(tmp_path.glob("*.arrow"))) == 3


def test_temporary_files_of_killed_builds_are_swept_live_ones_kept(tmp_path):
    import os
    import time

    from pipeline.data.image_store import remove_abandoned

    killed = tmp_path / ".train-abc.arrow.0123.tmp"
    live = tmp_path / ".val-def.arrow.4567.tmp"
    other = tmp_path / "notes.txt"
    for path in (killed, live, other):
        path.write_bytes(b"x" * 10)
    hours_ago = time.time() - 2 * 3600
    os.utime(killed, (hours_ago, hours_ago))
    os.utime(other, (hours_ago, hours_ago))
    split_images(_rows(["a1"]), PartReader(), lambda p: "v", tmp_path, "train")  # a build sweeps first
    assert not killed.exists() and live.exists() and other.exists()
    assert remove_abandoned(tmp_path, idle_s=0) == 1 and not live.exists()


DRIVER = r"""
import sys, time
import polars as pl
sys.path.insert(0, sys.argv[1])
from pipeline.data.image_store import split_images_many

parts_dir, cache, stall = sys.argv[2], sys.argv[3], sys.argv[4] == "stall"
rows = pl.read_parquet(f"{parts_dir}/rows.parquet")
calls = []

def read_part(part, ids):
    calls.append(part)
    if stall and len(calls) == 2:  # the first part's images are in the temporary file by now
        print("STALLED", flush=True)
        time.sleep(600)
    frame = pl.read_parquet(f"{parts_dir}/{part}.parquet")
    return frame.filter(pl.col("image_id").is_in(ids))

built = split_images_many({"train": rows.filter(pl.col("split") == "train").drop("split"),
                           "val": rows.filter(pl.col("split") == "val").drop("split")},
                          read_part, lambda part: "v1", cache)
print("DONE", *[len(built[n][0]) for n in ("train", "val")], flush=True)
"""


def test_a_build_killed_mid_write_leaves_no_file_and_the_next_build_is_complete(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    project = str(Path(__file__).resolve().parents[2])
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    split_of = {}
    for part, images in PARTS.items():
        ids = sorted(images)
        pl.DataFrame({"image_id": ids, "image": [images[i] for i in ids]}).write_parquet(parts_dir / f"{part}.parquet")
        split_of.update({i: ("val" if i.endswith("1") else "train") for i in ids})
    rows = _rows(sorted(split_of)).with_columns(pl.Series("split", [split_of[i] for i in sorted(split_of)]))
    rows.write_parquet(parts_dir / "rows.parquet")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cache = tmp_path / "cache"
    run = [sys.executable, str(driver), project, str(parts_dir), str(cache)]
    proc = subprocess.Popen([*run, "stall"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "STALLED"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not list(cache.glob("*.arrow")), "a killed build must leave no file a reader could open"
    assert len(list(cache.glob(".*.tmp"))) == 2  # its temporaries, swept by a later build once abandoned
    done = subprocess.run([*run, "go"], capture_output=True, text=True, timeout=120, check=True)
    n_val = sum(1 for s in split_of.values() if s == "val")
    assert done.stdout.split() == ["DONE", str(len(split_of) - n_val), str(n_val)]
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.arrow")) == ["train", "val"]


def test_an_empty_split_builds_an_empty_column(tmp_path):
    """A tiny sample can leave a split empty (1 part x 24 images: 0 test pairs); it must not fail the others."""
    from pipeline.data.image_store import split_images_many

    requests = {"train": _rows(["a0", "a1"]), "test": _rows(["a0"]).head(0)}
    built = split_images_many(requests, PartReader(), lambda p: "v", tmp_path)
    assert built["train"][1] == ["a0", "a1"]
    column, found = built["test"]
    assert found == [] and len(column) == 0
