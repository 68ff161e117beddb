"""A run's data path (pipeline/training/data.py): pairs -> dataset -> feature cache -> loader, built once and
read by the preliminary epochs, training and prediction alike."""

from __future__ import annotations

import numpy as np
import pytest
from test_training import cfg, toy_data

from pipeline.models import create_model
from pipeline.training.data import TrainingData, data_path
from pipeline.training.datasets import PairDataset
from pipeline.training.loop import predict_embeddings, seed_everything, train_model
from pipeline.training.pairs import SplitData

K = 6
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _splits(n_train: int = 16, n_val: int = 8, n_test: int = 8) -> dict[str, SplitData]:
    images, targets, labels = toy_data(n_train + n_val + n_test)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, None)}
    return {
        name: SplitData(
            image_ids=[f"{name}-{i}" for i in range(len(images[a:b]))],
            images=images[a:b],
            targets=targets[a:b],
            labels=labels[a:b],
            prompts=[""] * len(images[a:b]),
        )
        for name, (a, b) in bounds.items()
    }


def _model(name: str = "clip"):
    seed_everything(0)
    return create_model(name, variant="tiny", vocab_size=K)


def test_data_path_builds_each_split_in_the_models_preprocessing():
    model, splits = _model(), _splits()
    data = data_path({**splits, "none": None}, model, num_workers=0)
    for name, split in splits.items():
        dataset = data[name]
        assert isinstance(dataset, PairDataset) and len(dataset) == len(split)
        assert dataset.image_size == model.image_size and dataset.vocab_size == K
        assert np.array_equal(dataset.targets, split.targets)
    assert data["none"] is None and data.summary() is None  # no cache before it is opened on a device
    triple = data_path({"train": (splits["train"].images, splits["train"].targets, None)}, model)
    assert triple["train"].labels is None


def test_one_data_path_trains_and_predicts_as_datasets_with_a_cache_directory(tmp_path):
    """train_model and predict_embeddings over a data path give what they give over the datasets with the
    same cache directory; prediction opens the cache once for every split and reports each split's part."""
    splits = _splits()
    config = cfg(epochs=2, batch_size=8)
    results = {}
    for how in ("datasets", "data_path"):
        model = _model()
        cache = tmp_path / f"features-{how}"
        if how == "datasets":
            sets = {n: PairDataset.for_model(s.images, s.targets, s.labels, model) for n, s in splits.items()}
            result = train_model(model, sets["train"], sets["val"], config, tmp_path / how, cache_dir=cache)
            predicted = {n: predict_embeddings(model, sets[n], 8, "cpu", cache_dir=cache) for n in sets}
            summaries = None
        else:
            data = data_path({"train": splits["train"], "val": splits["val"]}, model, cache)
            result = train_model(model, data, config=config, checkpoint_dir=tmp_path / how)
            everything = data_path(splits, model, cache)
            predicted, summaries = {}, {}
            for name in splits:
                metrics: dict = {}
                predicted[name] = predict_embeddings(model, everything, 8, "cpu", split=name, metrics=metrics)
                summaries[name] = metrics["feature_cache"]
            assert everything.cache is not None and len(everything._events) == 3  # one cache, three splits
        results[how] = result, predicted, summaries
    (plain, plain_predicted, _), (path, path_predicted, summaries) = results["datasets"], results["data_path"]
    assert [h["val_cosine"] for h in plain.history] == [h["val_cosine"] for h in path.history]
    assert plain.feature_cache["built"] == path.feature_cache["built"] == 2  # train and val
    for name in splits:
        assert np.array_equal(plain_predicted[name], path_predicted[name])
    assert summaries["train"]["reused"] == summaries["val"]["reused"] == 1 and summaries["test"]["built"] == 1
    assert summaries["test"]["files"] and summaries["test"]["files"][0] not in summaries["train"]["files"]


def test_a_data_path_carries_its_own_splits_and_cache_directory(tmp_path):
    model = _model("vit")
    data = data_path(_splits(), model, tmp_path)
    with pytest.raises(ValueError, match="carries its splits"):
        TrainingData.of(data, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="name the split"):
        predict_embeddings(model, data, 8, "cpu")
    with pytest.raises(TypeError, match="config and a checkpoint_dir"):
        train_model(model, data)
