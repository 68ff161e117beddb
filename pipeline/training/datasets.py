"""Training data: (image bytes, target embedding, vocabulary labels) pairs as a torch Dataset, loaders, and
the curriculum-safe sampler.

Images are decoded in the DataLoader workers with PIL and put through the backbone's own preprocessing
(resize to its image_size with antialiasing, normalise with its mean / std).  No random augmentation: the
prompts talk about colours and positions, which flips and colour jitter would contradict.

StageSampler is why the curriculum survives: a stage's index subset decides which samples are seen, the
shuffle happens only inside that subset (seeded per stage and epoch), and under DDP the subset is split
across ranks the way DistributedSampler does it (padding to equal shards).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data.images import open_image


def _as_byte_sequence(images) -> Sequence:
    """Keep pyarrow arrays and sequences (a memory-mapped pipeline.data.image_store.ImageColumn among them) as
    they are, indexing is cheap; series and iterables become a list of bytes."""
    if isinstance(images, pa.ChunkedArray):
        return images.combine_chunks()
    if isinstance(images, (pa.Array, Sequence)) and not isinstance(images, (str, bytes)):
        return images
    if hasattr(images, "to_list"):  # polars / pandas series
        return images.to_list()
    return list(images)


class LabelLists(Sequence):
    """Per-row vocabulary index lists as two flat arrays (values and row offsets, like CSR).

    A Python list of 730k small arrays is 730k objects whose reference counts every forked DataLoader
    worker touches, copying their pages one by one; two numpy arrays are two objects.  Rows read back as
    int64 arrays; None or an empty list is an empty row.
    """

    def __init__(self, rows: Sequence) -> None:
        if isinstance(rows, LabelLists):
            self.values, self.offsets = rows.values, rows.offsets
            return
        arrays = [np.asarray(r if r is not None else [], dtype=np.int64).ravel() for r in rows]
        self.offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([a.size for a in arrays], out=self.offsets[1:])
        self.values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        index = range(len(self))[index]  # negative indices and bounds, as a list has them
        return self.values[self.offsets[index] : self.offsets[index + 1]]

    def check_range(self, size: int) -> None:
        """ValueError naming the first row with an index outside [0, size)."""
        bad = np.flatnonzero((self.values < 0) | (self.values >= size))
        if bad.size:
            row = int(np.searchsorted(self.offsets, bad[0], side="right")) - 1
            raise ValueError(f"row {row}: label index out of range [0, {size})")


def multi_hot(labels: LabelLists | None, index: int, size: int) -> torch.Tensor:
    """Row ``index`` of ``labels`` as a float multi-hot vector of ``size`` (shape [0] without labels)."""
    out = torch.zeros(size if labels is not None else 0, dtype=torch.float32)
    if labels is not None:
        idx = labels[index]
        if idx.size:
            out[torch.from_numpy(idx)] = 1.0
    return out


def image_pixels(data: bytes, image_size: int | tuple[int, int], name: str | None = None) -> np.ndarray:
    """Encoded image -> uint8 [H, W, 3] at ``image_size``: the deterministic half of the preprocessing, what a
    pixel cache (pipeline.training.pixel_cache.PixelCache) stores.

    Opened by pipeline.data.images.open_image like every image (pixel limit, EXIF orientation, RGB); an
    image it refuses is an ImageError naming ``name``.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    rgb = open_image(data, name)
    if rgb.size != (size[1], size[0]):
        # PIL's resize filters the whole footprint when shrinking (antialiased).
        rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8)  # writable: torch.from_numpy takes it as it is


def normalise_pixels(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] scaled to [0, 1] and normalised with ``mean`` / ``std``:
    the same arithmetic for one image and for a batch gathered from a pixel cache, so both give equal bits."""
    out = pixels.movedim(-1, -3).float().div_(255.0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    return out.sub_(m).div_(s)


def image_tensor(data: bytes, image_size: int | tuple[int, int], mean, std, name: str | None = None) -> torch.Tensor:
    """Encoded image -> normalised float tensor [3, H, W] in the backbone's preprocessing (image_pixels, then
    normalise_pixels)."""
    return normalise_pixels(torch.from_numpy(image_pixels(data, image_size, name)), mean, std)


class PairDataset(Dataset):
    """Image bytes + 384-d targets + vocabulary labels, decoded lazily.

    Items are (pixels [3,H,W], target [D], labels [K] multi-hot float (shape [0] without labels), index),
    plus the context row as a fifth element when ``context`` is given.  The index is the row's position, so
    per-sample records (preliminary cosines) can be written back to the right row from any worker.
    """

    def __init__(
        self,
        images,
        targets: np.ndarray,
        labels: Sequence[np.ndarray] | None = None,
        context: np.ndarray | None = None,
        *,
        image_size: int | tuple[int, int],
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        vocab_size: int = 0,
    ) -> None:
        self.images = _as_byte_sequence(images)
        self.targets = np.ascontiguousarray(np.asarray(targets, dtype=np.float32))
        n = len(self.images)
        if self.targets.ndim != 2 or self.targets.shape[0] != n:
            raise ValueError(f"targets must be (n={n}, d), got {self.targets.shape}")
        if labels is not None and len(labels) != n:
            raise ValueError(f"{len(labels)} label lists for {n} images")
        self.labels = LabelLists(labels) if (labels is not None and vocab_size > 0) else None
        self.vocab_size = int(vocab_size) if self.labels is not None else 0
        if self.labels is not None:
            self.labels.check_range(self.vocab_size)
        if context is not None:
            context = np.asarray(context, dtype=np.float32)
            if context.shape[0] != n:
                raise ValueError(f"context has {context.shape[0]} rows for {n} images")
        self.context = context
        self.image_size = image_size
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)

    @classmethod
    def for_model(cls, images, targets, labels, model, context=None) -> PairDataset:
        """A dataset in ``model``'s preprocessing (its image_size, mean, std and vocabulary size)."""
        return cls(
            images,
            targets,
            labels,
            context,
            image_size=model.image_size,
            mean=model.mean,
            std=model.std,
            vocab_size=int(getattr(model, "vocab_size", 0) or 0),
        )

    def __len__(self) -> int:
        return len(self.images)

    def _bytes(self, index: int) -> bytes:
        item = self.images[index]
        return item.as_py() if hasattr(item, "as_py") else item

    def raw_pixels(self, index: int) -> np.ndarray:
        """Row ``index``'s image as uint8 [H, W, 3] at the dataset's image size (before normalisation)."""
        index = int(index)
        try:
            return image_pixels(self._bytes(index), self.image_size)
        except Exception as exc:  # name the offending row; a silent skip would misalign the indices
            raise ValueError(f"cannot decode image at row {index}: {exc}") from exc

    def __getitem__(self, index: int):
        index = int(index)
        pixels = normalise_pixels(torch.from_numpy(self.raw_pixels(index)), self.mean, self.std)
        target = torch.tensor(self.targets[index])  # a copy: the table may be a read-only Arrow buffer
        labels = multi_hot(self.labels, index, self.vocab_size)
        if self.context is not None:
            return pixels, target, labels, index, torch.from_numpy(self.context[index])
        return pixels, target, labels, index


class StageSampler(Sampler[int]):
    """Indices of one curriculum stage, shuffled only within the stage, sharded across DDP ranks.

    ``set_stage(indices)`` and ``set_epoch(stage, epoch)`` are called by the trainer before each epoch;
    the permutation is drawn from a generator seeded by (seed, stage, epoch), so it depends on nothing
    else (a resumed run draws the same order).  Every rank draws the same permutation and takes
    positions rank, rank + world, ... after padding it (by wrapping around) to a multiple of world_size,
    like torch's DistributedSampler, so each rank runs the same number of steps.
    """

    def __init__(
        self,
        indices: Sequence[int] | np.ndarray,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.stage = 0
        self.epoch = 0
        self.set_stage(indices)

    def set_stage(self, indices: Sequence[int] | np.ndarray) -> None:
        self.indices = np.asarray(indices, dtype=np.int64).copy()

    def set_epoch(self, stage: int, epoch: int) -> None:
        self.stage, self.epoch = int(stage), int(epoch)

    def __len__(self) -> int:
        n = len(self.indices)
        return -(-n // self.world_size) if n else 0

    def order(self) -> np.ndarray:
        """This rank's indices for the current stage and epoch."""
        n = len(self.indices)
        if n == 0:
            return self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.stage, self.epoch))
            perm = self.indices[torch.randperm(n, generator=g).numpy()]
        else:
            perm = self.indices
        total = len(self) * self.world_size
        if total > n:
            perm = np.concatenate([perm, np.resize(perm, total - n)])
        return perm[self.rank : total : self.world_size]

    def __iter__(self):
        return iter(self.order().tolist())


def epoch_seed(seed: int, stage: int, epoch: int, salt: int = 0) -> int:
    """A 63-bit seed from (seed, stage, epoch, salt); stable across processes (no Python hash())."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(stage), int(epoch), int(salt)])
    hi, lo = (int(x) for x in ss.generate_state(2, dtype=np.uint32))
    return ((hi >> 1) << 32) | lo


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each worker from torch's per-worker seed (itself from the loader generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
    collate_fn=None,
) -> DataLoader:
    """A DataLoader with a seeded generator, seeded workers, persistent workers and pinned memory on CUDA.

    ``pin_memory`` None: pinned when CUDA is available (the trainer passes it for its device).  With workers,
    they persist across epochs (no re-fork per epoch) and each keeps ``prefetch_factor`` batches ready
    (default: 4 per worker with up to 4 workers, 2 per worker beyond: enough batches in flight to hide a
    slow one, without pinning gigabytes of host memory).  ``collate_fn`` None: the default collate.
    """
    if sampler is not None and shuffle:
        raise ValueError("pass either sampler or shuffle=True, not both")
    generator = torch.Generator().manual_seed(int(seed))
    kwargs = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor or (4 if num_workers <= 4 else 2))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        generator=generator,
        worker_init_fn=_seed_worker,
        collate_fn=collate_fn,
        **kwargs,
    )
