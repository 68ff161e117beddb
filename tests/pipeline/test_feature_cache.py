"""Frozen parts computed once (pipeline/training/feature_cache.py): the frozen prefix / trainable rest split of
the tiny clip and unet twins, cached training giving the same model as uncached training, and the cache's
keys (rebuilt when the images or the frozen weights change, reused otherwise) and atomic writes."""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pyarrow as pa
import pytest
import torch
from test_training import cfg, toy_data
from torch.utils.data import default_collate

from pipeline.data.image_store import SCHEMA, ImageColumn
from pipeline.models import create_model
from pipeline.training.cache_datasets import FeatureDataset, feature_loader
from pipeline.training.datasets import PairDataset
from pipeline.training.feature_cache import ABANDONED_AFTER_S, FeatureCache, image_set_key
from pipeline.training.loop import TrainConfig, predict_embeddings, preliminary_cosines, seed_everything, train_model

K = 6
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(name: str, seed: int = 0):
    seed_everything(seed)
    return create_model(name, variant="tiny", vocab_size=K)


def _sets(model, n_train: int = 30, n_val: int = 14, context: bool = False):
    """30 training pairs (a short last batch of 6 at batch 8), 14 val pairs; the unet gets a caption context."""
    images, targets, labels = toy_data(n_train + n_val)
    ctx = (
        np.random.default_rng(5).normal(size=(n_train + n_val, 3, model.context_dim)).astype(np.float32)
        if context
        else None
    )

    def part(a, b):
        return None if ctx is None else ctx[a:b]

    train = PairDataset.for_model(
        images[:n_train], targets[:n_train], labels[:n_train], model, context=part(0, n_train)
    )
    val = PairDataset.for_model(
        images[n_train:], targets[n_train:], labels[n_train:], model, context=part(n_train, None)
    )
    return train, val


def _cfg(**kw) -> TrainConfig:
    return cfg(**{"stage_epochs": 1, **kw})


# -- the split -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,frozen", [("clip", "tower"), ("unet", "vae"), ("vit", None), ("swin", None)])
def test_model_splits_into_frozen_prefix_and_trainable_rest(name, frozen):
    model = _model(name).eval()
    prefix = model.frozen_prefix()
    if frozen is None:
        assert prefix is None  # everything is trained: nothing to cache
        return
    part = getattr(model.backbone, frozen)
    assert set(prefix.state_dict()) == {f"parts.{frozen}.{k}" for k in part.state_dict()}  # exactly the frozen weights
    assert all(not p.requires_grad for p in prefix.parameters())
    pixels = torch.randn(3, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    context = torch.randn(3, 2, model.context_dim) if model.uses_context else None
    with torch.no_grad():
        features = prefix(pixels)
        from_pixels = model(pixels, context=context)
        from_prefix = model(None, context=context, prefix_features=features)
    assert features.is_contiguous() and not features.requires_grad
    assert torch.equal(from_pixels[0], from_prefix[0]) and torch.equal(from_pixels[1], from_prefix[1])
    model.train()
    assert not prefix.training and not part.training  # frozen parts stay in eval mode


# -- same model, cached or not ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clip", "unet"])
def test_cached_training_gives_the_same_model(name, tmp_path):
    """preliminary_cosines, train_model (curriculum stages, best-epoch selection) and predict_embeddings,
    each run from pixels and from the feature cache with the same seed, give the same numbers.

    On this CPU they are bit for bit equal: the cache is built in batches of the training batch size (8),
    and the tiny twins' kernels give every row the same result whatever the other rows of its batch are,
    provided the latents keep one memory layout (UNetBackbone.forward_prefix makes them contiguous).  The
    tolerance allows for what no cache can promise on other hardware: a matmul or conv kernel chosen by
    batch size (the last, short batch of an epoch) rounds in another order (1e-7 relative per element).
    """
    results = {}
    for cached in (False, True):
        cache_dir = tmp_path / "features" if cached else None
        model = _model(name)
        train, val = _sets(model, context=name == "unet")
        prelim_metrics: dict = {}
        prelim = preliminary_cosines(model, train, _cfg(), epochs=2, metrics=prelim_metrics, cache_dir=cache_dir)
        model = _model(name)
        frozen_before = {k: v.clone() for k, v in model.frozen_prefix().state_dict().items()}
        stages = [np.arange(0, 12), np.arange(0, 22), np.arange(30)]
        result = train_model(model, train, val, _cfg(), tmp_path / f"ckpt-{cached}", stages=stages, cache_dir=cache_dir)
        predict_metrics: dict = {}
        predictions = predict_embeddings(model, val, 8, "cpu", cache_dir=cache_dir, metrics=predict_metrics)
        assert all(torch.equal(frozen_before[k], v) for k, v in model.frozen_prefix().state_dict().items())
        results[cached] = (model.state_dict(), result, prelim, predictions)
        if cached:
            assert prelim_metrics["feature_cache"]["used"] and prelim_metrics["feature_cache"]["built"] == 1
            assert result.feature_cache["used"] and result.feature_cache["reused"] == 1  # train: built by prelim
            assert result.feature_cache["built"] == 1  # val
            assert predict_metrics["feature_cache"]["reused"] == 1 and predict_metrics["feature_cache"]["built"] == 0
        else:
            assert result.feature_cache is None and prelim_metrics["feature_cache"] is None
            assert predict_metrics["feature_cache"] is None

    (w_plain, r_plain, p_plain, e_plain), (w_cached, r_cached, p_cached, e_cached) = results[False], results[True]
    assert set(w_plain) == set(w_cached)  # the same checkpointable model, frozen part included
    for key in w_plain:
        assert torch.allclose(w_plain[key], w_cached[key], rtol=0, atol=1e-6), key
    assert r_cached.extra["fingerprint"] == r_plain.extra["fingerprint"]  # checkpoints interchangeable
    assert r_cached.extra["selected_epoch"] == r_plain.extra["selected_epoch"]
    assert [h["val_cosine"] for h in r_cached.history] == pytest.approx(
        [h["val_cosine"] for h in r_plain.history], abs=1e-6
    )
    assert [h["train_loss"] for h in r_cached.history] == pytest.approx(
        [h["train_loss"] for h in r_plain.history], abs=1e-6
    )
    np.testing.assert_allclose(p_cached, p_plain, rtol=0, atol=1e-6)
    np.testing.assert_allclose(e_cached, e_plain, rtol=0, atol=1e-6)
    if name == "clip":  # the whole clip backbone is frozen: only the heads train, and their epoch skips the tower
        assert all(k.startswith("backbone.") for k in w_plain if not k.startswith("heads."))


# -- keys: rebuilt when the images or the frozen weights change, reused otherwise --------------------------
def _cache(model, directory, **kw) -> FeatureCache:
    return FeatureCache(model.frozen_prefix(), directory, batch_size=4, label=model.backbone_name, **kw)


def test_cache_is_reused_and_rebuilt_when_images_or_frozen_weights_change(tmp_path):
    model = _model("clip")
    train, _ = _sets(model, n_train=10, n_val=0)
    first = _cache(model, tmp_path).wrap(train)
    assert isinstance(first, FeatureDataset) and first.features.shape == (10, model.backbone.feature_dim)
    files = sorted(p.name for p in tmp_path.glob("*.npy"))
    assert len(files) == 1

    again = _cache(model, tmp_path)
    again.wrap(train)
    assert (again.summary()["built"], again.summary()["reused"]) == (0, 1)

    # Trainable weights are not part of the key: training the heads keeps the cache.
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(1.0)
    heads_changed = _cache(model, tmp_path)
    heads_changed.wrap(train)
    assert heads_changed.summary()["reused"] == 1

    # Another image set (one image replaced) -> a new file; the old one still serves the old set.
    images = list(train.images)
    images[3] = images[4]
    other = PairDataset.for_model(images, train.targets, None, model)
    changed_images = _cache(model, tmp_path)
    new = changed_images.wrap(other)
    assert changed_images.summary()["built"] == 1
    np.testing.assert_array_equal(new.features[3], new.features[4])
    assert not np.array_equal(np.asarray(first.features[3]), np.asarray(new.features[3]))
    assert len(list(tmp_path.glob("*.npy"))) == 2

    # The same images in another preprocessing -> another key.
    resized = PairDataset(train.images, train.targets, image_size=32, mean=model.mean, std=model.std)
    assert image_set_key(resized) != image_set_key(train)

    # Frozen weights changed -> rebuilt, with the new tower's output.
    with torch.no_grad():
        next(model.backbone.tower.parameters()).add_(0.5)
    changed_weights = _cache(model, tmp_path)
    rebuilt = changed_weights.wrap(train)
    assert changed_weights.summary()["built"] == 1 and changed_weights.key != again.key
    with torch.no_grad():
        expected = model.frozen_prefix()(torch.stack([train[i][0] for i in range(10)]))
    np.testing.assert_allclose(np.asarray(rebuilt.features), expected.numpy(), rtol=0, atol=1e-6)

    # The autocast dtype / device type are part of the weights' identity (they change the numbers).
    assert _cache(model, tmp_path, amp_dtype=torch.bfloat16).key != changed_weights.key


def test_memory_mapped_image_column_is_keyed_by_its_file_and_rows(tmp_path):
    model = _model("unet")
    images, targets, _ = toy_data(6)
    path = tmp_path / "train-abc.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        writer.write_table(pa.table({"image_id": [f"i{k}" for k in range(6)], "image": images}, schema=SCHEMA))
    column = ImageColumn(path, rows=np.arange(6))
    plain = PairDataset.for_model(column, targets, None, model)
    same = PairDataset.for_model(ImageColumn(path, rows=np.arange(6)), targets, None, model)
    reversed_rows = PairDataset.for_model(ImageColumn(path, rows=np.arange(6)[::-1]), targets, None, model)
    assert image_set_key(plain) == image_set_key(same) != image_set_key(reversed_rows)
    cached = _cache(model, tmp_path / "features").wrap(plain)
    with torch.no_grad():
        expected = model.frozen_prefix()(torch.stack([plain[i][0] for i in range(6)]))
    assert cached.features.shape == (6, 4, 8, 8)  # VAE latents, x8 down
    np.testing.assert_allclose(np.asarray(cached.features), expected.numpy(), rtol=0, atol=1e-6)


# -- atomic writes ---------------------------------------------------------------------------------------
class _Breaks(PairDataset):
    """A PairDataset whose row ``bad`` cannot be decoded, as if the build were killed there."""

    bad = 7

    def __getitem__(self, index):
        if int(index) == self.bad:
            raise RuntimeError("killed")
        return super().__getitem__(index)


def test_a_failed_build_leaves_nothing_a_reader_picks_up(tmp_path):
    model = _model("clip")
    train, _ = _sets(model, n_train=10, n_val=0)
    broken = _Breaks.for_model(list(train.images), train.targets, None, model)
    cache = _cache(model, tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        cache.wrap(broken)
    assert list(tmp_path.iterdir()) == []  # no final file, no temporary left behind
    # A killed process leaves its temporary file: an hour later the next build removes it.
    stale = tmp_path / ".clip-x.deadbeef.tmp.npy"
    stale.write_bytes(b"half")
    old = time.time() - ABANDONED_AFTER_S - 10
    os.utime(stale, (old, old))
    fresh = tmp_path / ".clip-y.cafe.tmp.npy"
    fresh.write_bytes(b"someone else's build in progress")
    # A cache file without its description (or with a wrong row count) counts as missing.
    path = cache.path_for(train)
    np.save(path, np.zeros((3, 64), np.float32))
    rebuilt = _cache(model, tmp_path)
    out = rebuilt.wrap(train)
    assert rebuilt.summary()["built"] == 1 and out.features.shape == (10, 64)
    assert not stale.exists() and fresh.exists()


def test_feature_dataset_items_batches_and_pickling(tmp_path):
    model = _model("unet")
    train, _ = _sets(model, n_train=9, n_val=0, context=True)
    ds = _cache(model, tmp_path).wrap(train)
    assert len(ds) == 9 and ds.vocab_size == K and ds.prefix_features
    one = ds[4]
    _, target, labels, index, context = train[4]
    assert torch.equal(one[1], target) and torch.equal(one[2], labels) and one[3] == index == 4
    assert torch.equal(one[4], context)
    batch = ds.__getitems__([4, 0, 8])
    for got, want in zip(batch, [ds[4], ds[0], ds[8]]):
        assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(got, want))
    # The trainer's loader over cached features gives what the default collate makes of the items.
    order = [4, 0, 8, 2, 6, 1, 3]
    batches = list(feature_loader(ds, 3, sampler=order))
    assert [len(b[0]) for b in batches] == [3, 3, 1]
    for got, rows in zip(batches, [order[:3], order[3:6], order[6:]]):
        want = default_collate([ds[i] for i in rows])
        assert len(got) == len(want) == 5 and all(torch.equal(a, b) for a, b in zip(got, want))
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker gets
    assert "features" not in ds.__getstate__() and torch.equal(clone[8][0], ds[8][0])
