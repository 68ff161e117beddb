"""The decoded-pixel cache (pipeline/training/pixel_cache.py): a model without a frozen prefix
(vit, swin) reads its images decoded and resized once instead of every epoch, and trains, scores and predicts
exactly as from the encoded images; the file is shared by every backbone of that image size, and a split above
the budget (REVERSE_SD_PIXEL_CACHE_GB) is decoded per item as before."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from test_feature_cache import _cfg, _model, _sets

from pipeline.captioning.dataset import CaptionDataset
from pipeline.training.data import data_path, loader_for
from pipeline.training.datasets import PairDataset
from pipeline.training.loop import predict_embeddings, preliminary_cosines, train_model
from pipeline.training.pixel_cache import PixelCache, PixelDataset, pixel_cache_for
from resources.settings import SettingsError, load_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pixel_dataset_gives_the_pair_datasets_items_bit_for_bit(tmp_path):
    model = _model("vit")
    train, _ = _sets(model, n_train=10, n_val=0)
    cache = PixelCache(tmp_path, max_bytes=2**30, batch_size=4)
    cached = cache.wrap(train)
    assert isinstance(cached, PixelDataset) and not cached.prefix_features  # the model still runs whole
    assert cached.features.dtype == np.uint8 and cached.features.shape == (10, 64, 64, 3)
    for i in range(10):
        for a, b in zip(train[i], cached[i]):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    plain = list(loader_for(train, 4, num_workers=0, pin_memory=False))
    gathered = list(loader_for(cached, 4, num_workers=0, pin_memory=False))
    in_workers = list(loader_for(cached, 4, num_workers=2, pin_memory=False))  # batches gathered in parallel
    assert len(plain) == len(gathered) == len(in_workers) == 3
    for a, b, c in zip(plain, gathered, in_workers):
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))
    again = pickle.loads(pickle.dumps(cached))  # how loader workers and launched ranks receive it
    assert torch.equal(again[3][0], train[3][0])
    assert cache.summary()["kind"] == "pixels" and cache.summary()["built"] == 1


def test_vit_trains_scores_and_predicts_the_same_from_the_pixel_cache_and_swin_reuses_it(tmp_path):
    results = {}
    for cached in (False, True):
        cache_dir = tmp_path / "cache" if cached else None
        model = _model("vit")
        train, val = _sets(model)
        prelim_metrics: dict = {}
        prelim = preliminary_cosines(model, train, _cfg(), epochs=2, metrics=prelim_metrics, cache_dir=cache_dir)
        model = _model("vit")
        result = train_model(model, train, val, _cfg(), tmp_path / f"ckpt-{cached}", cache_dir=cache_dir)
        predict_metrics: dict = {}
        predictions = predict_embeddings(model, val, 8, "cpu", cache_dir=cache_dir, metrics=predict_metrics)
        results[cached] = (model.state_dict(), result, prelim, predictions)
        if cached:
            assert prelim_metrics["feature_cache"]["kind"] == "pixels" and prelim_metrics["feature_cache"]["built"] == 1
            assert result.feature_cache["reused"] == 1 and result.feature_cache["built"] == 1  # train, then val
            assert predict_metrics["feature_cache"]["reused"] == 1 and predict_metrics["feature_cache"]["built"] == 0
    (w_plain, r_plain, p_plain, e_plain), (w_cached, r_cached, p_cached, e_cached) = results[False], results[True]
    for key in w_plain:  # the same pixels in the same batches: the same training, bit for bit
        assert torch.equal(w_plain[key], w_cached[key]), key
    assert [h["val_cosine"] for h in r_cached.history] == [h["val_cosine"] for h in r_plain.history]
    np.testing.assert_array_equal(p_cached, p_plain)
    np.testing.assert_array_equal(e_cached, e_plain)

    swin = _model("swin")  # another backbone of the same image size: the same files, whatever its mean / std
    train, val = _sets(swin)
    files = sorted(p.name for p in (tmp_path / "cache").glob("*.npy"))
    result = train_model(swin, train, val, _cfg(epochs=1), tmp_path / "ckpt-swin", cache_dir=tmp_path / "cache")
    assert result.feature_cache["reused"] == 2 and result.feature_cache["built"] == 0
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.npy")) == files


def test_a_split_above_the_budget_is_decoded_per_item_and_a_zero_budget_means_no_cache(tmp_path):
    model = _model("vit")
    train, _ = _sets(model, n_train=10, n_val=0)
    cache = PixelCache(tmp_path / "cache", max_bytes=10 * 64 * 64 * 3 - 1)  # one byte short of the split
    assert cache.wrap(train) is train
    assert cache.summary()["over_budget"] == 1 and not cache.summary()["used"]
    assert not list((tmp_path / "cache").glob("*.npy"))
    data = data_path({"train": train}, model, tmp_path / "cache", pixel_cache_bytes=10 * 64 * 64 * 3)
    data.open(model, device="cpu", amp_dtype=None, batch_size=4, num_workers=0)
    assert isinstance(data.dataset("train"), PixelDataset)  # exactly the split's size fits
    assert pixel_cache_for(model, tmp_path / "cache", 0) is None
    assert pixel_cache_for(model, None) is None
    assert pixel_cache_for(_model("clip"), tmp_path / "cache") is None  # its frozen tower's features instead


def test_only_pair_datasets_are_cached(tmp_path):
    """A captioner's dataset yields other items (token ids); the cache must not stand in for it."""
    model = _model("vit")
    train, _ = _sets(model, n_train=4, n_val=0)
    captions = CaptionDataset.__new__(CaptionDataset)  # its type is what matters
    cache = PixelCache(tmp_path, max_bytes=2**30)
    assert cache.wrap(captions) is captions and cache.wrap(None) is None
    assert isinstance(cache.wrap(train), PixelDataset) and type(train) is PairDataset


@pytest.mark.parametrize(
    "raw,expected",
    [("", 32.0), ("0", 0.0), ("0.5", 0.5), ("100000", 100_000.0), ("-1", None), ("lots", None), ("inf", None)],
)
def test_pixel_cache_budget_setting(raw, expected):
    env = {"REVERSE_SD_PIXEL_CACHE_GB": raw} if raw else {}
    if expected is None:
        with pytest.raises(SettingsError, match="REVERSE_SD_PIXEL_CACHE_GB"):
            load_settings(env)
    else:
        assert load_settings(env).pixel_cache_gb == expected


def test_files_of_a_replaced_image_file_are_removed_after_the_next_build(tmp_path):
    """The image store replaces a split's file when its parts change; the pixels (or features) cached from the
    old file are garbage then, and a growing dataset must not leave a split's worth of them behind each time."""
    from test_image_store import PartReader, _rows

    from pipeline.data.image_store import split_images

    cache_dir = tmp_path / "cache"
    old_column, _ = split_images(_rows(["a0", "a1", "b0"]), PartReader(), lambda p: "v1", tmp_path / "images", "train")
    old = PixelCache(cache_dir, max_bytes=2**30).wrap(
        PairDataset(old_column, np.zeros((3, 4), np.float32), image_size=8)
    )
    assert isinstance(old, PixelDataset)
    # New parts: the store writes the split's new file and removes the old one; a run still mapping it reads on.
    new_column, _ = split_images(
        _rows(["a0", "a1", "b0", "c0"]), PartReader(), lambda p: "v2", tmp_path / "images", "train"
    )
    assert not os.path.exists(old_column.path)
    cache = PixelCache(cache_dir, max_bytes=2**30)
    new = cache.wrap(PairDataset(new_column, np.zeros((4, 4), np.float32), image_size=8))
    assert isinstance(new, PixelDataset) and cache.summary()["removed"] == 1
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([Path(new.path).name, Path(new.path).stem + ".json"])
    assert torch.equal(old[2][0], new[2][0])  # the old reader's mapping still reads

    # A run that started on the old file and builds its cache only now keeps what it built.
    late = PixelCache(cache_dir, max_bytes=2**30).wrap(
        PairDataset(old_column, np.zeros((3, 4), np.float32), image_size=16)
    )
    assert isinstance(late, PixelDataset) and os.path.exists(late.path)


def test_files_of_an_image_file_written_again_are_removed_after_the_next_build(tmp_path):
    """The same split file name written anew (its image cache emptied and rebuilt): the old pixels go too."""
    from test_image_store import PartReader, _rows

    from pipeline.data.image_store import split_images

    column, _ = split_images(_rows(["a0", "a1"]), PartReader(), lambda p: "v1", tmp_path / "images", "train")
    first = PixelCache(tmp_path / "cache", max_bytes=2**30).wrap(PairDataset(column, np.zeros((2, 4)), image_size=8))
    stat = os.stat(column.path)
    os.utime(column.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as a rewrite leaves it
    cache = PixelCache(tmp_path / "cache", max_bytes=2**30)
    second = cache.wrap(PairDataset(column, np.zeros((2, 4)), image_size=8))
    assert second.path != first.path and cache.summary()["removed"] == 1
    assert [p.name for p in (tmp_path / "cache").glob("*.npy")] == [Path(second.path).name]


def test_a_file_removed_between_its_check_and_its_opening_is_read_uncached(tmp_path):
    """Another run's sweep may remove a file this run has just decided to reuse: it reads the images instead."""
    model = _model("vit")
    train, _ = _sets(model, n_train=4, n_val=0)
    assert isinstance(PixelCache(tmp_path, max_bytes=2**30).wrap(train), PixelDataset)

    class SweptMeanwhile(PixelCache):
        def _decide(self, dataset, path):
            choice = super()._decide(dataset, path)
            path.unlink()  # after the check said "reuse"
            return choice

    cache = SweptMeanwhile(tmp_path, max_bytes=2**30)
    assert cache.wrap(train) is train and cache.summary()["reused"] == 1
