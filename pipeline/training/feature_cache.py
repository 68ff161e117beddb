"""Frozen parts computed once: the output of a model's frozen prefix, per image, cached on disk (for a model
without one, vit and swin, pipeline.training.pixel_cache caches the decoded pixels the same way).

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
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import Subset

from pipeline.training.cache_datasets import FeatureDataset
from pipeline.training.datasets import make_loader

CACHE_VERSION = 1  # bump when the file layout or what a key covers changes
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


def _image_file(dataset) -> dict | None:
    """The memory-mapped image file a dataset reads (pipeline.data.image_store.ImageColumn) as {"path",
    "mtime_ns"}, else None."""
    path = getattr(dataset.images, "path", None)
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    return {"path": os.path.abspath(path), "mtime_ns": os.stat(path).st_mtime_ns}


def _is_current(source: dict) -> bool:
    try:
        return os.stat(source["path"]).st_mtime_ns == source["mtime_ns"]
    except (OSError, KeyError, TypeError):
        return False


def remove_orphans(directory: str | os.PathLike, keep: str | os.PathLike | None = None) -> int:
    """Remove the cache files (and descriptions) made from an image file that is gone or was written again: the
    image store replaces a split's file when its parts change, and nothing reads the old one's features or pixels
    again, so a growing dataset would otherwise leave a split's worth of cache behind at every change.  ``keep``:
    a file just built for a run whose image file was replaced meanwhile (it still maps the old one).  Returns how
    many went."""
    removed = 0
    for meta_path in Path(directory).glob("[!.]*.json"):
        if keep is not None and meta_path.with_suffix(".npy") == Path(keep):
            continue
        try:
            source = json.loads(meta_path.read_text()).get("images")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(source, dict) and not _is_current(source):
            with contextlib.suppress(OSError):
                meta_path.with_suffix(".npy").unlink()
                removed += 1
            with contextlib.suppress(OSError):
                meta_path.unlink()
    return removed


def supports(dataset) -> bool:
    """Whether ``dataset`` is one a cache can stand in for (a PairDataset: images + preprocessing)."""
    return all(hasattr(dataset, a) for a in ("images", "image_size", "mean", "std", "targets"))


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
        self.amp = amp_dtype
        self._start(cache_dir, device, batch_size, num_workers, dist, label, prefix_key(prefix, amp_dtype, device))

    def _start(self, cache_dir, device, batch_size: int, num_workers: int, dist, label: str, key: str) -> None:
        """Where and how files are built, and the counters summary() reports (shared with PixelCache)."""
        self.directory = Path(cache_dir)
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.num_workers = int(num_workers)
        self.rank = int(getattr(dist, "rank", 0))
        self.world = int(getattr(dist, "world_size", 1))
        self.label = label
        self.key = key
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
        return opened(lambda: FeatureDataset(path, meta["dtype"], dataset), dataset)

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


def opened(open_cache, dataset):
    """The cache file's dataset, or ``dataset`` itself when the file went between its check and its opening (a
    run with newer parts removed it with its image file): read as uncached, which gives the same items."""
    try:
        return open_cache()
    except FileNotFoundError:
        return dataset


def frozen_prefix_of(model: torch.nn.Module) -> torch.nn.Module | None:
    """``model``'s frozen prefix (unwrapped from DDP), or None: vit, swin, a stand-in without ``frozen_prefix``."""
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    make = getattr(model, "frozen_prefix", None)
    return make() if callable(make) else None


def feature_cache_for(model: torch.nn.Module, cache_dir: str | os.PathLike | None, **kwargs) -> FeatureCache | None:
    """A FeatureCache for ``model``'s frozen prefix, or None when there is no cache directory or the model
    has no frozen prefix (vit, swin: see pipeline.training.pixel_cache).  kwargs go to FeatureCache."""
    prefix = frozen_prefix_of(model) if cache_dir is not None else None
    if prefix is None:
        return None
    model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    kwargs.setdefault("label", str(getattr(model, "backbone_name", "") or ""))
    return FeatureCache(prefix, cache_dir, **kwargs)


__all__ = [
    "FeatureCache",
    "feature_cache_for",
    "frozen_prefix_of",
    "image_set_key",
    "opened",
    "prefix_key",
    "remove_orphans",
    "supports",
    "weights_digest",
]
