"""Frozen parts computed once: the output of a model's frozen prefix, per image, cached on disk; and, for a
model without one (vit, swin), its decoded and resized pixels (PixelCache, at the end of this module).

The CLIP backbone's image tower and the unet backbone's VAE are frozen, and training has no augmentation,
so what they compute for an image is a pure function of the image (and of the frozen weights).  Running
them every epoch (and again for every recipe, the preliminary epochs and prediction) is wasted work: at
ViT-H/14 size the tower is nearly all of a clip step.  A :class:`FeatureCache` runs a model's frozen
prefix (``model.frozen_prefix()``, pixels -> what the trainable rest reads) once over a dataset, batched,
in eval mode, without autograd, on the training device and under the training precision, and stores the
result as one ``.npy`` file (memory-mapped when read).  Training and prediction then read those rows and
run only the trainable rest (``model(prefix_features=...)``): the same computation as from pixels.

A cache file is named by
- the frozen weights' identity: a hash of the prefix's state_dict tensors (names, dtypes, shapes, bytes),
  its constants (``prefix_identity``: class, latent scale), the autocast dtype and the device type;
- the image set: a hash of the dataset's images in row order (for a memory-mapped
  pipeline.data.image_store column: its file, whose name is itself a hash of the image ids and their
  parts' fingerprints, and the row selection; otherwise the image bytes) and its preprocessing (image
  size, mean, std).
Changing either builds a new file; an unchanged pair reuses it across runs, recipes and assets.

Files are written under a temporary name and renamed, with their small JSON description written first,
so a killed build leaves nothing where a reader looks (its temporary file is removed by a later build
once it is an hour old).  Each file's description names the image file it was made from; after a build, the
files of image files that are gone (the image store replaced them) are removed (``remove_orphans``).  Under DDP every rank computes its share of the rows into the same temporary
file (one node, one local directory), then rank 0 renames it.  bfloat16 outputs (CUDA autocast) are
stored as their raw 16 bits, so the cached values are bit for bit what the prefix produced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Dataset, Subset

from pipeline.training.datasets import PairDataset, make_loader, multi_hot, normalise_pixels

CACHE_VERSION = 1  # bump when the file layout or what a key covers changes
PIXELS_VERSION = 1  # bump when datasets.image_pixels (decode, resize) changes what it returns
DEFAULT_PIXEL_CACHE_BYTES = 32 * 2**30  # REVERSE_SD_PIXEL_CACHE_GB's default
ABANDONED_AFTER_S = 3600  # a temporary file nobody has touched for this long belongs to a killed build
# bf16: raw bits in int16; uint8: a PixelCache's decoded images
_STORED = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "uint8": np.uint8}


# -- keys ------------------------------------------------------------------------------------------------
def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state_dict: every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def prefix_key(prefix: torch.nn.Module, amp_dtype: torch.dtype | None, device: torch.device) -> str:
    """The frozen weights' identity, plus what changes their output numerically (autocast, device type)."""
    payload = {
        "version": CACHE_VERSION,
        "identity": getattr(prefix, "identity", {"class": type(prefix).__name__}),
        "amp": str(amp_dtype),
        "device": torch.device(device).type,
        "weights": weights_digest(prefix),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _item_bytes(item) -> bytes:
    return item.as_py() if hasattr(item, "as_py") else bytes(item)


def image_set_key(dataset, *, normalised: bool = True) -> str:
    """The image set of a PairDataset-like dataset (``images``, ``image_size``, ``mean``, ``std``): its
    images in row order and their preprocessing (without mean and std when not ``normalised``: a pixel cache
    holds the images before normalisation, one file for every backbone of that image size).

    A memory-mapped image column (pipeline.data.image_store.ImageColumn) is keyed by its file (name, size,
    modification time: the name is a hash of the image ids and their source parts) and row selection, which
    costs nothing; any other image sequence by a hash of every image's bytes."""
    images = dataset.images
    h = hashlib.sha256()
    described = {"n": len(images), "size": dataset.image_size}
    if normalised:
        described.update(mean=list(dataset.mean), std=list(dataset.std))
    h.update(json.dumps(described, default=str).encode())
    path = getattr(images, "path", None)
    if isinstance(path, str) and hasattr(images, "rows") and os.path.isfile(path):
        st = os.stat(path)
        h.update(f"file|{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        rows = images.rows
        h.update(b"all" if rows is None else np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    else:
        for i in range(len(images)):
            data = _item_bytes(images[i])
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()[:20]


def _image_file(dataset) -> str | None:
    """The memory-mapped image file a dataset reads (pipeline.data.image_store.ImageColumn), else None."""
    path = getattr(dataset.images, "path", None)
    return os.path.abspath(path) if isinstance(path, str) else None


def remove_orphans(directory: str | os.PathLike, keep: str | os.PathLike | None = None) -> int:
    """Remove the cache files (and descriptions) made from an image file that is gone: the image store replaces a
    split's file when its parts change, and nothing reads the old one's features or pixels again, so a growing
    dataset would otherwise leave a split's worth of cache behind at every change.  ``keep``: a file just built
    for a run whose image file was replaced meanwhile (it still maps the old one).  Returns how many went."""
    removed = 0
    for meta_path in Path(directory).glob("[!.]*.json"):
        if keep is not None and meta_path.with_suffix(".npy") == Path(keep):
            continue
        try:
            source = json.loads(meta_path.read_text()).get("images")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(source, str) and not os.path.exists(source):
            with contextlib.suppress(OSError):
                meta_path.with_suffix(".npy").unlink()
                removed += 1
            with contextlib.suppress(OSError):
                meta_path.unlink()
    return removed


def supports(dataset) -> bool:
    """Whether ``dataset`` is one a cache can stand in for (a PairDataset: images + preprocessing)."""
    return all(hasattr(dataset, a) for a in ("images", "image_size", "mean", "std", "targets"))


# -- the dataset the trainer reads -----------------------------------------------------------------------
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
    kwargs = {"persistent_workers": True, "prefetch_factor": 2} if num_workers > 0 else {}
    return DataLoader(
        _Batches(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_keep_batch,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(int(seed)),
        **kwargs,
    )


# -- the cache -------------------------------------------------------------------------------------------
class FeatureCache:
    """One model's frozen prefix, ready to stand cached features in for datasets.

    ``wrap(dataset)`` returns a FeatureDataset over the cached file (built first when missing) or, for a
    dataset it cannot stand in for, the dataset itself.  ``summary()`` says what it did: files built and
    reused, build seconds.
    """

    def __init__(
        self,
        prefix: torch.nn.Module,
        cache_dir: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        dist=None,
        label: str = "",
    ) -> None:
        self.prefix = prefix
        self.directory = Path(cache_dir)
        self.device = torch.device(device)
        self.amp = amp_dtype
        self.batch_size = max(1, int(batch_size))
        self.num_workers = int(num_workers)
        self.rank = int(getattr(dist, "rank", 0))
        self.world = int(getattr(dist, "world_size", 1))
        self.label = label
        self.key = prefix_key(prefix, amp_dtype, self.device)
        self.built: list[str] = []
        self.reused: list[str] = []
        self.skipped = 0
        self.removed = 0  # files of image sets that are gone, removed after a build
        self.build_seconds = 0.0

    # paths
    def path_for(self, dataset) -> Path:
        name = f"{self.label}-" if self.label else ""
        return self.directory / f"{name}{self.key}-{image_set_key(dataset)}.npy"

    @staticmethod
    def _meta_path(path: Path) -> Path:
        return path.with_suffix(".json")

    def _read_meta(self, path: Path, n: int) -> dict | None:
        """The description of a complete cache file for ``n`` rows, or None (missing or not matching)."""
        try:
            meta = json.loads(self._meta_path(path).read_text())
            header = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        if meta.get("rows") != n or header.shape[0] != n or meta.get("dtype") not in _STORED:
            return None
        return meta

    # the public part
    def wrap(self, dataset):
        if dataset is None or getattr(dataset, "prefix_features", False):
            return dataset
        if not supports(dataset) or len(dataset) == 0:
            self.skipped += 1
            return dataset
        path = self.path_for(dataset)
        meta = self._read_meta(path, len(dataset))
        if meta is None:
            meta = self._build(dataset, path)
            self.built.append(path.name)
        else:
            self.reused.append(path.name)
        return _opened(lambda: FeatureDataset(path, meta["dtype"], dataset), dataset)

    def summary(self) -> dict:
        return {
            "kind": "features",
            "used": bool(self.built or self.reused),
            "built": len(self.built),
            "reused": len(self.reused),
            "build_seconds": round(self.build_seconds, 3),
            "files": self.built + self.reused,
            "removed": self.removed,
            "directory": str(self.directory),
        }

    # building
    def _probe(self, dataset) -> tuple[np.ndarray, str]:
        """The first row's output (with its batch axis) and its stored dtype's name."""
        self.prefix.to(self.device).eval()
        return self._to_numpy(self._run(dataset[0][0][None].to(self.device)))

    def _rows(self, dataset, rows: np.ndarray):
        """The output for ``rows`` of ``dataset``, a batch (numpy) at a time, in order."""
        loader = make_loader(
            Subset(dataset, rows.tolist()),
            self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for batch in loader:
            pixels = batch[0].to(self.device, non_blocking=self.device.type == "cuda")
            yield self._to_numpy(self._run(pixels))[0]

    def _run(self, pixels: torch.Tensor) -> torch.Tensor:
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            return self.prefix(pixels)

    @staticmethod
    def _to_numpy(out: torch.Tensor) -> tuple[np.ndarray, str]:
        out = out.detach()
        if out.dtype == torch.bfloat16:
            return out.cpu().view(torch.int16).numpy(), "bfloat16"
        if out.dtype == torch.float16:
            return out.cpu().numpy(), "float16"
        return out.float().cpu().numpy(), "float32"

    def _barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    def _shared_token(self) -> str:
        token = [uuid.uuid4().hex]
        if self.world > 1:
            torch_dist.broadcast_object_list(token, src=0)
        return token[0]

    def _remove_abandoned(self) -> None:
        """Temporary files of killed builds (untouched for ABANDONED_AFTER_S)."""
        now = time.time()
        for tmp in self.directory.glob(".*.tmp*"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > ABANDONED_AFTER_S:
                    tmp.unlink()

    def _build(self, dataset, path: Path) -> dict:
        """Run the prefix over ``dataset`` (this rank's rows) into a temporary file; rank 0 renames it."""
        started = time.perf_counter()
        n = len(dataset)
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_abandoned()
        token = self._shared_token()
        tmp = self.directory / f".{path.stem}.{token}.tmp.npy"
        # Shape and dtype from one item: every rank creates nothing until rank 0 has made the file.
        probe, dtype = self._probe(dataset)
        try:
            if self.rank == 0:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=probe.dtype, shape=(n, *probe.shape[1:]))
                del out
            self._barrier()
            rows = np.arange(self.rank, n, self.world)
            if rows.size:
                store = np.load(tmp, mmap_mode="r+")
                position = 0
                for values in self._rows(dataset, rows):
                    store[rows[position : position + len(values)]] = values
                    position += len(values)
                store.flush()
                del store
                if position != rows.size:
                    raise RuntimeError(f"feature cache: {position} of {rows.size} rows computed")
            self._barrier()
            seconds = time.perf_counter() - started
            meta = {
                "version": CACHE_VERSION,
                "rows": n,
                "shape": list(probe.shape[1:]),
                "dtype": dtype,
                "key": self.key,
                "build_seconds": round(seconds, 3),
                "device": str(self.device),
                "world_size": self.world,
                "images": _image_file(dataset),
            }
            if self.rank == 0:
                meta_tmp = self.directory / f".{path.stem}.{token}.tmp.json"
                meta_tmp.write_text(json.dumps(meta, indent=2))
                os.replace(meta_tmp, self._meta_path(path))  # the description first: a reader looks for the .npy
                os.replace(tmp, path)
                self.removed += remove_orphans(self.directory, keep=path)
        finally:
            if self.rank == 0:
                for leftover in (tmp, self.directory / f".{path.stem}.{token}.tmp.json"):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
        self._barrier()
        self.build_seconds += time.perf_counter() - started
        return meta


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
    """The decoded, resized images of a dataset, once, for a model with no frozen prefix (vit, swin).

    There is no augmentation, so an image's pixels at a given size are a pure function of its bytes; decoding
    and resizing them again every epoch, recipe and prediction was most of a tiny model's step on a CPU (the
    sample's vit: 8.8 s of a 22.6 s profiled run).  The file holds uint8 [N, H, W, 3] before normalisation,
    named by the image set and size (``image_set_key(normalised=False)``) and PIXELS_VERSION, so every
    backbone of that size shares it; a PixelDataset normalises a gathered batch exactly as PairDataset does
    one image.  Built, named, shared across DDP ranks and renamed into place as a FeatureCache is.

    Only below ``max_bytes`` (REVERSE_SD_PIXEL_CACHE_GB) and half the cache directory's free space: 2M
    images at 224 px would be 301 GB, where decoding in the loader workers keeps up with a GPU anyway.  A
    dataset above either bound is read as before, decoded per item, and counted in ``over_budget``.
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
        self.directory = Path(cache_dir)
        self.device = torch.device("cpu")  # where the pixels are decoded
        self.max_bytes = int(max_bytes)
        self.batch_size = max(1, int(batch_size))
        self.num_workers = int(num_workers)
        self.rank = int(getattr(dist, "rank", 0))
        self.world = int(getattr(dist, "world_size", 1))
        self.label = "pixels"
        self.key = f"v{PIXELS_VERSION}"
        self.built, self.reused = [], []
        self.skipped = self.over_budget = self.removed = 0
        self.build_seconds = 0.0

    def path_for(self, dataset) -> Path:
        return self.directory / f"{self.label}-{self.key}-{image_set_key(dataset, normalised=False)}.npy"

    def nbytes(self, dataset) -> int:
        height, width = (dataset.image_size,) * 2 if isinstance(dataset.image_size, int) else dataset.image_size
        return len(dataset) * int(height) * int(width) * 3

    def _decide(self, dataset, path: Path) -> str:
        """ "reuse", "build" or "skip" (over budget), decided by rank 0 for every rank under DDP: ranks that
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
        return _opened(lambda: PixelDataset(path, dataset), dataset)

    def summary(self) -> dict:
        return {**super().summary(), "kind": "pixels", "over_budget": self.over_budget}

    def _probe(self, dataset) -> tuple[np.ndarray, str]:
        return dataset.raw_pixels(0)[None], "uint8"

    def _rows(self, dataset, rows: np.ndarray):
        loader = make_loader(_RawPixels(dataset, rows), self.batch_size, num_workers=self.num_workers, pin_memory=False)
        for batch in loader:
            yield batch.numpy()


def _opened(open_cache, dataset):
    """The cache file's dataset, or ``dataset`` itself when the file went between its check and its opening (a
    run with newer parts removed it with its image file): read as uncached, which gives the same items."""
    try:
        return open_cache()
    except FileNotFoundError:
        return dataset


def feature_cache_for(
    model: torch.nn.Module, cache_dir: str | os.PathLike | None, *, pixel_cache_bytes: int | None = None, **kwargs
) -> FeatureCache | None:
    """A FeatureCache for ``model``'s frozen prefix (clip, unet); for a model without one (vit, swin), a
    PixelCache of at most ``pixel_cache_bytes`` per file (None: DEFAULT_PIXEL_CACHE_BYTES; 0: none).  None
    without a cache directory.  kwargs (device, amp_dtype, batch_size, num_workers, dist) go to the cache."""
    if cache_dir is None:
        return None
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    make = getattr(model, "frozen_prefix", None)
    prefix = make() if callable(make) else None
    if prefix is None:
        budget = DEFAULT_PIXEL_CACHE_BYTES if pixel_cache_bytes is None else int(pixel_cache_bytes)
        return PixelCache(cache_dir, max_bytes=budget, **kwargs) if budget > 0 else None
    kwargs.setdefault("label", str(getattr(model, "backbone_name", "") or ""))
    return FeatureCache(prefix, cache_dir, **kwargs)


__all__ = [
    "DEFAULT_PIXEL_CACHE_BYTES",
    "FeatureCache",
    "FeatureDataset",
    "PixelCache",
    "PixelDataset",
    "feature_cache_for",
    "feature_loader",
    "image_set_key",
    "prefix_key",
    "remove_orphans",
    "supports",
    "weights_digest",
]
