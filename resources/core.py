"""ConfigurableResources.  Values come from the environment (resources/settings.py); hub tokens only
through EnvVar, never from config files, never logged."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import dagster as dg
import polars as pl

from pipeline import storage
from resources.profiles import profile_config
from resources.settings import (
    NO_DIFFUSIONDB,
    SAMPLE_IMAGE_SIZE,
    Settings,
    default_loader_workers,
    load_settings,
    local_dir,
)


class ArtifactError(RuntimeError):
    """An artifact that exists but cannot be read (truncated, garbled): the message names the file and the
    asset to re-materialize."""


class StorageResource(dg.ConfigurableResource):
    """The one storage root of every artifact: a local directory or an fsspec URL (memory://, s3://)."""

    root: str

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def local_dir(self, name: str) -> str:
        """A local directory for tools that need one (hub downloads), even when the root is an object store."""
        return local_dir(self.root, name)

    def table_path(self, asset_key: str, partition: str | None = None) -> str:
        """<root>/<asset key>.parquet, or <root>/<asset key>/<partition key>.parquet."""
        if partition is None:
            return self.path(f"{asset_key}.parquet")
        return self.path(asset_key, f"{partition}.parquet")

    def write_table(self, frame, asset_key: str, partition: str | None = None) -> str:
        target = self.table_path(asset_key, partition)
        storage.write_parquet(frame, target)
        return target

    def read_table(
        self, asset_key: str, partition: str | None = None, columns: list[str] | None = None
    ) -> pl.DataFrame:
        target = self.table_path(asset_key, partition)
        if not storage.exists(target):
            raise FileNotFoundError(
                f"{target} does not exist: materialize asset {asset_key!r}"
                + (f" partition {partition!r}" if partition else "")
                + " first"
            )
        what = f"asset {asset_key!r}" + (f" partition {partition!r}" if partition else "")
        try:
            return storage.read_parquet(target, columns=columns)
        except storage.IntegrityError as exc:
            raise ArtifactError(f"{exc}: re-materialize {what}") from None
        except Exception as exc:  # polars / pyarrow name neither the file nor what to do about it
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise ArtifactError(
                f"{target} is unreadable ({reason}): re-materialize asset {asset_key!r}"
                + (f" partition {partition!r}" if partition else "")
            ) from exc

    def has_table(self, asset_key: str, partition: str | None = None) -> bool:
        return storage.exists(self.table_path(asset_key, partition))

    def fingerprint(self, asset_key: str, partition: str | None = None) -> str:
        """Changes whenever the table is rewritten (size and modification time, or the object's ETag)."""
        return storage.fingerprint(self.table_path(asset_key, partition))


class DiffusionDBResource(dg.ConfigurableResource):
    """Where DiffusionDB comes from: a hub dataset id at a revision, or a local mirror directory.

    On the sample profile the mirror is generated (deterministically) at `location` on first use; `location`
    is named by the sample's size (resources/settings.py, sample_mirror_dir), so other settings are another mirror.
    `hash_cache_dir` (a local directory; build_resources puts it under the storage root's local cache) keeps a
    mirror's zip hashes across invocations, so listing the parts does not re-read every zip each time.
    """

    location: str
    revision: str = "main"
    token: str | None = None
    generate_sample: bool = False
    sample_parts: int = 4
    sample_images_per_part: int = 250
    sample_seed: int = 0
    hash_cache_dir: str | None = None

    def source(self):
        from pipeline.data.diffusiondb import DiffusionDBSource

        if self.location == NO_DIFFUSIONDB:
            return _NoParts()
        if self.generate_sample:
            self._ensure_sample()
        return DiffusionDBSource(
            self.location, revision=self.revision, token=self._token(), hash_cache_dir=self.hash_cache_dir
        )

    def _token(self) -> str | None:
        # Inside a run Dagster resolves the EnvVar; outside one (the CLI registering parts) it is still the
        # EnvVar object, whose str() is the variable's *name*: resolve it here, never send the name as a token.
        return self.token.get_value() if isinstance(self.token, dg.EnvVar) else self.token

    def list_parts(self, create: bool = True) -> dict[str, str]:
        """part key -> content version, as ``source().list_parts()``.

        ``create=False`` writes nothing (a dry run): a generated sample mirror that does not exist yet is
        listed as the parts it would hold, each versioned "not-generated:<mirror>" (a version no built part
        has, so every part counts as new data), and the zip-hash cache is used only when it exists already.
        """
        if create or self.location == NO_DIFFUSIONDB:
            return self.source().list_parts()
        from pipeline.data.diffusiondb import DiffusionDBSource
        from pipeline.data.sample_data import part_key

        if self.generate_sample and not (Path(self.location) / "metadata.parquet").is_file():
            version = f"not-generated:{Path(self.location).name}"
            return {part_key(i): version for i in range(1, self.sample_parts + 1)}
        cache = self.hash_cache_dir if self.hash_cache_dir and Path(self.hash_cache_dir).is_dir() else None
        source = DiffusionDBSource(self.location, revision=self.revision, token=self._token(), hash_cache_dir=cache)
        return source.list_parts()

    def _ensure_sample(self) -> None:
        """Generate the sample mirror once, even when several processes ask at the same moment: a file lock
        beside it serialises them, and the mirror is built under a name of its own, then renamed, so a
        killed run never leaves half a mirror."""
        import fcntl
        import shutil

        from pipeline.data.sample_data import generate_sample_mirror

        root = Path(self.location)
        if (root / "metadata.parquet").exists():
            return
        root.parent.mkdir(parents=True, exist_ok=True)
        with _SAMPLE_LOCK, open(root.with_name(root.name + ".lock"), "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            if (root / "metadata.parquet").exists():  # another process built it while we waited
                return
            tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")
            for leftover in root.parent.glob(f"{root.name}.partial*"):  # killed builders' (we hold the lock)
                shutil.rmtree(leftover, ignore_errors=True)
            generate_sample_mirror(
                tmp,
                n_parts=self.sample_parts,
                images_per_part=self.sample_images_per_part,
                seed=self.sample_seed,
                image_size=SAMPLE_IMAGE_SIZE,
            )
            os.replace(tmp, root)


_SAMPLE_LOCK = threading.Lock()  # threads of one process; the file lock covers processes


class _NoParts:
    """The DiffusionDB source of REVERSE_SD_DIFFUSIONDB=none: no parts."""

    def list_parts(self) -> dict[str, str]:
        return {}

    def fetch_part(self, part: str, cache_dir=None):
        raise RuntimeError(f"REVERSE_SD_DIFFUSIONDB=none: there is no DiffusionDB part {part}")


class ImagesResource(dg.ConfigurableResource):
    """REVERSE_SD_IMAGES: a folder of the user's own generations, each immediate subfolder one part
    (pipeline/data/own_images.py); ``location`` None when unset (no folders).  ``hash_cache_dir`` keeps the
    files' content hashes across invocations, so a listing re-reads only changed files."""

    location: str | None = None
    hash_cache_dir: str | None = None

    def list_folders(self) -> dict[str, str]:
        """subfolder -> content version (empty when REVERSE_SD_IMAGES is unset or the folder is gone)."""
        from pipeline.data.own_images import list_folders

        if not self.location or not Path(self.location).is_dir():
            return {}
        cache = self.hash_cache_dir
        if cache:
            Path(cache).mkdir(parents=True, exist_ok=True)
        return list_folders(self.location, cache)

    def folder(self, name: str) -> Path:
        if not self.location:
            raise RuntimeError("REVERSE_SD_IMAGES is not set: there are no image folders")
        return Path(self.location) / name


class SentenceEncoderResource(dg.ConfigurableResource):
    """The SBERT model of the targets: a local directory, the offline package, or a hub name."""

    model: str = "all-MiniLM-L6-v2"
    device: str = "auto"  # auto: CUDA when present
    batch_size: int = 128

    def encoder(self, device: str | None = None):
        """The encoder on ``device`` (default: this resource's; PromptEncoder takes "auto" as CUDA when present)."""
        from pipeline.data.embedding import PromptEncoder

        return PromptEncoder(self.model, device=device or self.device, batch_size=self.batch_size)


class ComputeResource(dg.ConfigurableResource):
    """Which device trains, with which backbone variant, how many data-loading workers and how much disk the
    decoded-pixel cache may take."""

    device: str = "auto"
    backbone_variant: str = "tiny"
    pretrained: bool = False
    num_workers: int = 0
    nproc_per_node: int = 1
    pixel_cache_gb: float = 32.0  # REVERSE_SD_PIXEL_CACHE_GB

    @property
    def pixel_cache_bytes(self) -> int:
        """The pixel cache's budget per split file (pipeline.training.pixel_cache.PixelCache)."""
        return int(self.pixel_cache_gb * 2**30)


def build_resources(settings: Settings | None = None) -> dict[str, dg.ConfigurableResource]:
    settings = settings or load_settings()
    config = profile_config(settings)
    token = dg.EnvVar("HF_TOKEN") if settings.hf_token_set else None
    return {
        "storage": StorageResource(root=settings.home),
        "diffusiondb": DiffusionDBResource(
            location=settings.diffusiondb,
            revision=settings.diffusiondb_revision,
            token=token,
            generate_sample=settings.uses_generated_sample,
            sample_parts=config.sample.n_parts,
            sample_images_per_part=config.sample.images_per_part,
            sample_seed=config.sample.seed,
            hash_cache_dir=local_dir(settings.home, "hash-cache"),
        ),
        "images": ImagesResource(location=settings.images, hash_cache_dir=local_dir(settings.home, "hash-cache")),
        "sentence_encoder": SentenceEncoderResource(
            model=config.encoder_model, device=settings.device, batch_size=config.encoder_batch_size
        ),
        "compute": ComputeResource(
            device=settings.device,
            backbone_variant=settings.backbone_variant,
            pretrained=not settings.is_sample,
            num_workers=_loader_workers(settings),
            nproc_per_node=_nproc_per_node(settings),
            pixel_cache_gb=settings.pixel_cache_gb,
        ),
        # Launches torchrun for multi-process training (trained_models with nproc_per_node > 1).
        "pipes": dg.PipesSubprocessClient(),
    }


def _nproc_per_node(settings: Settings) -> int:
    """Training processes per machine (DDP under torchrun when > 1); "gpus" is every visible GPU."""
    if settings.nproc_per_node == "gpus":
        import torch

        return max(1, torch.cuda.device_count())
    return int(settings.nproc_per_node)


def _loader_workers(settings: Settings) -> int:
    """REVERSE_SD_LOADER_WORKERS, else the cores available (capped) on real data; the sample's tiny images
    decode faster in the training process than worker processes start."""
    if settings.loader_workers is not None:
        return settings.loader_workers
    return 0 if settings.is_sample else default_loader_workers()
