"""What a run reads from a cache file in place of a PairDataset: the frozen prefix's features (FeatureDataset,
pipeline.training.feature_cache) or the decoded pixels (PixelDataset, pipeline.training.pixel_cache), with the
same targets, labels, context and indices, and the loader that gathers them a batch at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.training.datasets import make_loader, multi_hot


class FeatureDataset(Dataset):
    """A PairDataset with the frozen prefix's output in place of the pixels.

    Items are (prefix features, target, labels multi-hot, index[, context]) with the same targets, labels,
    context and indices as the PairDataset it stands for, so the trainer, its sampler (curriculum stages,
    shuffling seed) and its loss see the same data.  ``__getitems__`` gathers a whole batch from the
    memory-mapped file at once.  Pickles as its file path (workers and launched processes map it again).
    """

    prefix_features = True  # what the trainer checks: batch[0] is the prefix's output, not pixels

    def __init__(self, path: str | os.PathLike, dtype: str, base) -> None:
        self.path, self.dtype = str(path), dtype
        self.targets = base.targets
        self.labels = getattr(base, "labels", None)
        self.vocab_size = int(getattr(base, "vocab_size", 0) or 0)
        self.context = getattr(base, "context", None)
        self._open()

    def _open(self) -> None:
        self.features = np.load(self.path, mmap_mode="r")
        if self.features.shape[0] != len(self.targets):
            raise ValueError(f"{self.path} holds {self.features.shape[0]} rows for {len(self.targets)} pairs")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "features"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.targets)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(array))  # a copy out of the mapping (writable, owned)
        return t.view(torch.bfloat16) if self.dtype == "bfloat16" else t

    def __getitem__(self, index: int):
        index = int(index)
        item = (
            self._tensor(self.features[index]),
            torch.tensor(self.targets[index]),
            multi_hot(self.labels, index, self.vocab_size),
            index,
        )
        if self.context is not None:
            return (*item, torch.from_numpy(np.asarray(self.context[index])))
        return item

    def _multi_hot(self, idx: np.ndarray) -> torch.Tensor:
        out = torch.zeros((len(idx), self.vocab_size if self.labels is not None else 0), dtype=torch.float32)
        if self.labels is None or not self.vocab_size or not len(idx):
            return out
        offsets, values = getattr(self.labels, "offsets", None), getattr(self.labels, "values", None)
        if offsets is None or values is None:  # a plain sequence of index arrays
            for row, i in enumerate(idx.tolist()):
                out[row] = multi_hot(self.labels, i, self.vocab_size)
            return out
        starts, lengths = offsets[idx], offsets[idx + 1] - offsets[idx]  # CSR rows (datasets.LabelLists)
        rows = np.repeat(np.arange(len(idx)), lengths)
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[torch.from_numpy(rows), torch.from_numpy(values[np.repeat(starts, lengths) + within])] = 1.0
        return out

    def batch(self, indices: Sequence[int]) -> tuple:
        """The collated batch of ``indices`` (what the default collate makes of their items), in one gather
        per array: features, targets, labels, indices (int64)[, context]."""
        idx = np.asarray(indices, dtype=np.int64)
        out = (
            self._tensor(self.features[idx]),
            torch.from_numpy(np.asarray(self.targets)[idx]),
            self._multi_hot(idx),
            torch.from_numpy(idx.copy()),
        )
        if self.context is not None:
            return (*out, torch.from_numpy(np.asarray(self.context, dtype=np.float32)[idx]))
        return out

    def __getitems__(self, indices: Sequence[int]) -> list[tuple]:
        """A batch's items from one gather per array (for loaders with the default collate)."""
        columns = [c.unbind(0) for c in self.batch(indices)]
        columns[3] = [int(i) for i in indices]
        return list(zip(*columns))


class _Batches(Dataset):
    """A FeatureDataset read a whole batch at a time (with _keep_batch as the loader's collate)."""

    def __init__(self, dataset: FeatureDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple:
        return self.dataset.batch(indices)


def _keep_batch(batch):
    return batch


def feature_loader(
    dataset: FeatureDataset,
    batch_size: int,
    *,
    sampler=None,
    seed: int = 0,
    pin_memory: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over a cache file that yields what make_loader's default collate would, a batch at a time
    from the mapped file.  Features need no workers (a gather is faster than shipping it); cached pixels take
    ``num_workers``, which gather and normalise whole batches in parallel (a 224-px batch is float work: one
    process manages about 1,600 images/s).  ``sampler``: an index order (e.g. a StageSampler, or this rank's
    shard); default: in order."""
    return make_loader(
        _Batches(dataset),
        batch_size,
        seed=seed,
        num_workers=num_workers,
        sampler=sampler,
        pin_memory=pin_memory,
        prefetch_factor=2,
        collate_fn=_keep_batch,
    )


__all__ = ["FeatureDataset", "feature_loader"]
