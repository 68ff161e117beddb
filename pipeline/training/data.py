"""A run's data path, built in one place: pairs -> dataset -> optional feature cache -> loader.

``data_path(splits, model, cache_dir, num_workers=...)`` declares it for the splits' pairs
(pipeline.training.pairs.SplitData, or (images, targets, labels) triples): each split becomes a
PairDataset in the model's preprocessing.  ``TrainingData.of(train, val, cache_dir)`` does the same for
datasets already built (a captioner's, a test's).  The epoch loop (pipeline.training.epochs) and
prediction (pipeline.training.inference) then ``open`` it on their device, which makes the frozen prefix's
feature cache (pipeline.training.feature_cache; keyed by the device type and precision, so it can only be
made there), read each split through ``dataset(name)`` (the cached features in place of the pixels when
the model has a frozen prefix and a cache directory is given) and take their loaders from here.  Nothing
else builds a dataset, a cache or a loader for training, difficulty scores or prediction.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from torch.utils.data import Dataset, Subset

from pipeline.training.cache_datasets import FeatureDataset, feature_loader
from pipeline.training.datasets import PairDataset, make_loader
from pipeline.training.feature_cache import FeatureCache, feature_cache_for
from pipeline.training.pixel_cache import PixelDataset, pixel_cache_for


def is_cached(dataset) -> bool:
    """Whether ``dataset`` yields the frozen prefix's cached output in place of pixels (a FeatureDataset, not
    a PixelDataset, whose cached pixels the whole model reads)."""
    return bool(getattr(dataset, "prefix_features", False))


def loader_for(dataset, batch_size: int, *, num_workers: int, pin_memory: bool, sampler=None, seed: int = 0):
    """make_loader, or for a cache file (a gather from a mapped file, a whole batch at once: features in the main
    process, pixels in ``num_workers`` workers, which normalise them) feature_loader: the same batches either
    way."""
    if isinstance(dataset, FeatureDataset):
        workers = num_workers if isinstance(dataset, PixelDataset) else 0
        return feature_loader(
            dataset, batch_size, sampler=sampler, seed=seed, pin_memory=pin_memory, num_workers=workers
        )
    return make_loader(dataset, batch_size, seed=seed, num_workers=num_workers, sampler=sampler, pin_memory=pin_memory)


def shard_loader(dataset, batch_size: int, *, rank: int, world_size: int, num_workers: int, pin_memory: bool):
    """This rank's shard of ``dataset`` (rows rank, rank + world_size, ...) in order, for evaluation."""
    shard = np.arange(rank, len(dataset), world_size).tolist()
    if isinstance(dataset, FeatureDataset):
        return loader_for(dataset, batch_size, num_workers=num_workers, pin_memory=pin_memory, sampler=shard)
    return make_loader(Subset(dataset, shard), batch_size, num_workers=num_workers, pin_memory=pin_memory)


def _pair_dataset(pairs, model) -> Dataset | None:
    if pairs is None or isinstance(pairs, Dataset):
        return pairs
    if isinstance(pairs, tuple):
        images, targets, labels = pairs
    else:  # SplitData or alike
        images, targets, labels = pairs.images, pairs.targets, pairs.labels
    return PairDataset.for_model(images, targets, labels, model)


class TrainingData:
    """One run's splits on their way to the model: the datasets, the feature cache once opened on a device,
    and the loaders.  ``datasets``: split name -> dataset (None for an absent split)."""

    def __init__(
        self,
        datasets: Mapping[str, Dataset | None],
        cache_dir: str | os.PathLike | None = None,
        *,
        num_workers: int | None = None,
        pixel_cache_bytes: int | None = None,
    ) -> None:
        self.datasets = dict(datasets)
        self.cache_dir = cache_dir
        self.pixel_cache_bytes = pixel_cache_bytes  # None: the default budget (pipeline.training.pixel_cache)
        self.num_workers = num_workers  # None: the run's (TrainConfig.num_workers, predict_embeddings' argument)
        self.cache: FeatureCache | None = None
        self._opened_for: tuple | None = None
        self._read: dict[str, Dataset | None] = {}  # what the model reads, per split
        self._events: dict[str, tuple[str, str, float]] = {}  # split -> (built | reused, file, build seconds)

    @classmethod
    def of(
        cls, train, val=None, cache_dir: str | os.PathLike | None = None, *, num_workers: int | None = None
    ) -> TrainingData:
        """``train`` when it is a TrainingData already (then nothing else may be given), else the data path of
        the datasets ``train`` and ``val``."""
        if isinstance(train, TrainingData):
            if val is not None or cache_dir is not None:
                raise ValueError("a TrainingData carries its splits and cache directory: give no val set or cache_dir")
            return train
        return cls({"train": train, "val": val}, cache_dir, num_workers=num_workers)

    def workers(self, default: int) -> int:
        return int(default if self.num_workers is None else self.num_workers)

    def __getitem__(self, name: str) -> Dataset | None:
        """Split ``name``'s dataset as built (pixels): its length, targets and labels."""
        return self.datasets.get(name)

    def open(self, model, *, device, amp_dtype, batch_size: int, num_workers: int, dist=None) -> TrainingData:
        """Make the frozen prefix's feature cache for ``model`` on ``device`` under ``amp_dtype`` (none without a
        cache directory or a frozen prefix); ``batch_size`` and ``num_workers`` are those of its builds.  Opening
        again for the same model and settings keeps it; for others it starts over."""
        key = (
            id(model),
            str(device),
            str(amp_dtype),
            int(batch_size),
            int(num_workers),
            getattr(dist, "world_size", 1),
        )
        if key != self._opened_for:
            settings = dict(
                device=device, amp_dtype=amp_dtype, batch_size=batch_size, num_workers=num_workers, dist=dist
            )
            self.cache = feature_cache_for(model, self.cache_dir, **settings) or pixel_cache_for(
                model, self.cache_dir, self.pixel_cache_bytes, **settings
            )
            self._opened_for, self._read, self._events = key, {}, {}
        return self

    def dataset(self, name: str) -> Dataset | None:
        """What the model reads of split ``name``: the cached features in place of the pixels when a cache is
        open (built on first use, every rank together under DDP), else the dataset itself."""
        base = self.datasets.get(name)
        if self.cache is None or base is None:
            return base
        if name not in self._read:
            cache = self.cache
            built, reused, seconds = len(cache.built), len(cache.reused), cache.build_seconds
            self._read[name] = cache.wrap(base)
            if len(cache.built) > built:
                self._events[name] = ("built", cache.built[-1], cache.build_seconds - seconds)
            elif len(cache.reused) > reused:
                self._events[name] = ("reused", cache.reused[-1], 0.0)
        return self._read[name]

    def summary(self, *names: str) -> dict | None:
        """What the feature cache did ({"used", "built", "reused", "build_seconds", "files", "directory"}) for
        ``names`` (default: every split read); None without a cache."""
        if self.cache is None:
            return None
        if not names:
            return self.cache.summary()
        events = [self._events[n] for n in names if n in self._events]
        built = [file for kind, file, _ in events if kind == "built"]
        reused = [file for kind, file, _ in events if kind == "reused"]
        return {
            "used": bool(built or reused),
            "built": len(built),
            "reused": len(reused),
            "build_seconds": round(sum(s for _, _, s in events), 3),
            "files": built + reused,
            "directory": str(self.cache.directory),
        }

    def loader(self, name: str, batch_size: int, *, num_workers: int, pin_memory: bool, sampler=None, seed: int = 0):
        """A loader over what the model reads of split ``name`` (see ``dataset``)."""
        return loader_for(
            self.dataset(name), batch_size, num_workers=num_workers, pin_memory=pin_memory, sampler=sampler, seed=seed
        )


def data_path(
    splits: Mapping[str, object],
    model,
    cache_dir: str | os.PathLike | None = None,
    *,
    num_workers: int | None = None,
    pixel_cache_bytes: int | None = None,
) -> TrainingData:
    """The data path of a run: each split's pairs (SplitData, an (images, targets, labels) triple, a dataset,
    or None) as a dataset in ``model``'s preprocessing (its image size, mean, std; labels only when it has a
    vocabulary head), the frozen prefix's features (or, without one, the decoded pixels, up to
    ``pixel_cache_bytes`` a file) cached under ``cache_dir`` once the run opens it on its device, and loaders
    with ``num_workers`` workers (None: the run's setting)."""
    return TrainingData(
        {name: _pair_dataset(p, model) for name, p in splits.items()},
        cache_dir,
        num_workers=num_workers,
        pixel_cache_bytes=pixel_cache_bytes,
    )


__all__ = ["TrainingData", "data_path", "is_cached", "loader_for", "shard_loader"]
