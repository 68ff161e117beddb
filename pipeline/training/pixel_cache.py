"""Decoded pixels computed once: for a model without a frozen prefix (vit, swin), its images decoded and resized
to its input size, cached on disk as uint8 (the same file for every backbone of that size).

There is no augmentation, so an image's pixels at a given size are a pure function of its bytes; decoding and
resizing them again every epoch, recipe and prediction was most of a tiny model's step on a CPU (the sample's
vit: 8.8 s of a 22.6 s profiled training run).  A PixelCache is built, named, shared across DDP ranks and
renamed into place as a FeatureCache (pipeline.training.feature_cache) is, and a PixelDataset reads it back as
the PairDataset it stands for, bit for bit.  Only within a budget (REVERSE_SD_PIXEL_CACHE_GB, default 32 GB
a split): DiffusionDB-2M's training split at 224 px would be 100 GB, and on a GPU machine the loader workers
decode fast enough anyway (bench/pixel_cache.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import Dataset

from pipeline.training.cache_datasets import FeatureDataset
from pipeline.training.datasets import PairDataset, make_loader, normalise_pixels
from pipeline.training.feature_cache import FeatureCache, frozen_prefix_of, image_set_key, opened

PIXELS_VERSION = 1  # bump when datasets.image_pixels (decode, resize) changes what it returns
DEFAULT_PIXEL_CACHE_BYTES = 32 * 2**30  # REVERSE_SD_PIXEL_CACHE_GB's default


class PixelDataset(FeatureDataset):
    """A PairDataset read from its PixelCache file: the same items (normalised float pixels, target, labels,
    index[, context]), bit for bit, with the decode and resize done once for good instead of per epoch.  Not
    prefix features: the model still runs whole."""

    prefix_features = False

    def __init__(self, path: str | os.PathLike, base) -> None:
        self.mean, self.std = tuple(base.mean), tuple(base.std)
        super().__init__(path, "uint8", base)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return normalise_pixels(torch.from_numpy(np.array(array)), self.mean, self.std)


class _RawPixels(Dataset):
    """Rows of a PairDataset as uint8 [H, W, 3] (what a PixelCache stores), decoded in loader workers."""

    def __init__(self, dataset: PairDataset, rows: np.ndarray) -> None:
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.dataset.raw_pixels(int(self.rows[index])))


class PixelCache(FeatureCache):
    """The decoded, resized images of a dataset, once: uint8 [N, H, W, 3] before normalisation, named by the
    image set and size (``image_set_key(normalised=False)``) and PIXELS_VERSION, so every backbone of that size
    shares the file.  Only below ``max_bytes`` and half the cache directory's free space; a dataset above either
    is read as before, decoded per item, and counted in ``over_budget``.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        max_bytes: int,
        batch_size: int = 64,
        num_workers: int = 0,
        dist=None,
        **_device_settings,  # device, amp_dtype: pixels are decoded on the CPU, the same for every device
    ) -> None:
        self._start(cache_dir, "cpu", batch_size, num_workers, dist, "pixels", f"v{PIXELS_VERSION}")
        self.max_bytes = int(max_bytes)
        self.over_budget = 0

    def path_for(self, dataset) -> Path:
        return self.directory / f"{self.label}-{self.key}-{image_set_key(dataset, normalised=False)}.npy"

    def nbytes(self, dataset) -> int:
        height, width = (dataset.image_size,) * 2 if isinstance(dataset.image_size, int) else dataset.image_size
        return len(dataset) * int(height) * int(width) * 3

    def _decide(self, dataset, path: Path) -> str:
        """Whether to reuse, build or skip (over budget), decided by rank 0 for every rank under DDP: ranks that
        disagreed (a file renamed in between, free space at the edge) would wait for each other for ever."""
        choice = ["skip"]
        if self.rank == 0:
            if self._read_meta(path, len(dataset)) is not None:
                choice = ["reuse"]
            else:
                self.directory.mkdir(parents=True, exist_ok=True)
                if self.nbytes(dataset) <= shutil.disk_usage(self.directory).free // 2:
                    choice = ["build"]
        if self.world > 1:
            torch_dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def wrap(self, dataset):
        if type(dataset) is not PairDataset or len(dataset) == 0:  # a captioner's or a test's own dataset
            self.skipped += dataset is not None and not isinstance(dataset, FeatureDataset)
            return dataset
        if self.nbytes(dataset) > self.max_bytes:  # before the key, which may hash every image's bytes
            self.over_budget += 1
            return dataset
        path = self.path_for(dataset)
        choice = self._decide(dataset, path)
        if choice == "skip":
            self.over_budget += 1
            return dataset
        if choice == "build":
            self._build(dataset, path)
        (self.built if choice == "build" else self.reused).append(path.name)
        return opened(lambda: PixelDataset(path, dataset), dataset)

    def summary(self) -> dict:
        return {**super().summary(), "kind": "pixels", "over_budget": self.over_budget}

    def _probe(self, dataset) -> tuple[np.ndarray, str]:
        return dataset.raw_pixels(0)[None], "uint8"

    def _rows(self, dataset, rows: np.ndarray):
        loader = make_loader(_RawPixels(dataset, rows), self.batch_size, num_workers=self.num_workers, pin_memory=False)
        for batch in loader:
            yield batch.numpy()


def pixel_cache_for(
    model: torch.nn.Module, cache_dir: str | os.PathLike | None, max_bytes: int | None = None, **kwargs
) -> PixelCache | None:
    """A PixelCache of at most ``max_bytes`` per file (None: DEFAULT_PIXEL_CACHE_BYTES) for a model without a
    frozen prefix; None with a frozen prefix (its features are cached instead), without a cache directory or with
    a zero budget.  kwargs (batch_size, num_workers, dist; device and amp_dtype are ignored) go to the cache."""
    budget = DEFAULT_PIXEL_CACHE_BYTES if max_bytes is None else int(max_bytes)
    if cache_dir is None or budget <= 0 or frozen_prefix_of(model) is not None:
        return None
    return PixelCache(cache_dir, max_bytes=budget, **kwargs)


__all__ = ["DEFAULT_PIXEL_CACHE_BYTES", "PIXELS_VERSION", "PixelCache", "PixelDataset", "pixel_cache_for"]
