"""Every ``REVERSE_SD_*`` setting, read once from the environment and validated up front.

``load_settings(environ)`` is the only place that reads them; everything else receives a frozen
``Settings``.  A wrong value fails at start with one line naming the variable (``SettingsError``), before
any Dagster step runs.  ``resources/profiles.py`` turns a ``Settings`` into the result-changing numbers of
its profile (plain data).

REVERSE_SD_PROFILE                  sample | diffusiondb (default sample)
REVERSE_SD_DIFFUSIONDB              a hub dataset id or a local mirror directory (default: the profile's)
REVERSE_SD_DIFFUSIONDB_REVISION     hub revision (default main; the observed data version records the sha)
REVERSE_SD_HOME                     the storage root of every artifact (default ./data in the project)
DAGSTER_HOME                        the Dagster instance (default ./.dagster_home in the project)
REVERSE_SD_SAMPLE_PARTS / _IMAGES_PER_PART   size of the generated sample (sample profile)
REVERSE_SD_TRAIN_EPOCHS             training epochs of every backbone (sample profile)
REVERSE_SD_TRAIN_<BACKBONE>_EPOCHS / _LR     one backbone's epochs / learning rate
REVERSE_SD_SPLIT_SEED               seed of the train / val / test split
REVERSE_SD_CAPTIONERS               comma-separated captioners to fine-tune (default blip)
REVERSE_SD_NPROC_PER_NODE           training processes per machine, or "gpus" (default 1)
REVERSE_SD_DEVICE                   auto | cpu | cuda | cuda:N: where models run (default auto: CUDA when present)
REVERSE_SD_LOADER_WORKERS           DataLoader worker processes (default: the cores available, at most 8)
REVERSE_SD_OBSERVE_CRON             when the observe schedule looks for a new DiffusionDB revision
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.constants import BACKBONE_NAMES as BACKBONES

PROJECT_DIR = Path(__file__).resolve().parents[1]
PROFILES = ("sample", "diffusiondb")
HUB_DATASET = "poloclub/diffusiondb"
# The DiffusionDB revision on the hub.  Pin it to a commit sha with REVERSE_SD_DIFFUSIONDB_REVISION for
# reproducible runs; either way diffusiondb_source records the resolved commit sha as its data version,
# so a new upstream revision shows up as stale data rather than silently changing results.
HUB_REVISION = "main"
DEFAULT_OBSERVE_CRON = "0 3 * * *"
MAX_LOADER_WORKERS = 8  # beyond this, decoding 256-px JPEGs outpaces one GPU; more workers only cost memory
_PER_BACKBONE = re.compile(r"REVERSE_SD_TRAIN_([A-Z0-9]+)_(EPOCHS|LR)")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


class SettingsError(ValueError):
    """A wrong setting; the message names it."""


@dataclass(frozen=True)
class Settings:
    profile: str
    home: str
    diffusiondb: str
    diffusiondb_revision: str
    dagster_home: str
    observe_cron: str = DEFAULT_OBSERVE_CRON
    sample_parts: int = 4
    sample_images_per_part: int = 250
    train_epochs: int | None = None  # REVERSE_SD_TRAIN_EPOCHS
    # backbone -> {"epochs": int, "lr": float} from REVERSE_SD_TRAIN_<BACKBONE>_EPOCHS / _LR
    train_overrides: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    split_seed: int = 0
    captioners: tuple[str, ...] | None = None  # None: the profile's default
    nproc_per_node: int | str = 1  # an integer, or "gpus" (resolved when resources are built)
    device: str = "auto"
    loader_workers: int | None = None  # None: cores available, at most MAX_LOADER_WORKERS
    hf_token_set: bool = False

    @property
    def is_sample(self) -> bool:
        return self.profile == "sample"

    @property
    def backbone_variant(self) -> str:
        """Tiny random-init twins on the sample profile, the real architectures on DiffusionDB."""
        return "tiny" if self.is_sample else "full"

    @property
    def sample_mirror_dir(self) -> str:
        return local_dir(self.home, "sample_mirror")

    @property
    def uses_generated_sample(self) -> bool:
        return self.diffusiondb == self.sample_mirror_dir


def available_cores() -> int:
    """CPU cores this process may use (the affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_loader_workers() -> int:
    """Loader workers when REVERSE_SD_LOADER_WORKERS is unset: every core but the training process's own, capped."""
    return max(0, min(available_cores() - 1, MAX_LOADER_WORKERS))


def local_dir(root: str, name: str) -> str:
    """A local directory ``name`` for tools that need one (the generated sample, hub downloads): under the
    storage root when it is local (file:// is its local path), in the user's cache directory when the root
    is an object store."""
    if root.startswith("file://"):
        return os.path.join(root.removeprefix("file://"), name)
    if "://" in root:
        cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.expanduser("~/.cache")
        return os.path.join(cache, "reverse-sd", name)
    return os.path.join(root, name)


def _text(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def _int(env: Mapping[str, str], name: str, default: int | None, minimum: int = 1) -> int | None:
    raw = _text(env, name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _positive_float(env: Mapping[str, str], name: str) -> float | None:
    raw = _text(env, name)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise SettingsError(f"{name}={raw!r} must be a positive finite number")
    return value


def _train_overrides(env: Mapping[str, str]) -> dict[str, dict[str, float]]:
    overrides: dict[str, dict[str, float]] = {}
    for name in sorted(env):
        match = _PER_BACKBONE.fullmatch(name)
        if not match:
            continue
        backbone, what = match.group(1).lower(), match.group(2)
        if backbone not in BACKBONES:
            raise SettingsError(f"{name}: {backbone!r} is not a backbone; use one of: {', '.join(BACKBONES)}")
        value = _int(env, name, None) if what == "EPOCHS" else _positive_float(env, name)
        if value is not None:
            overrides.setdefault(backbone, {})[what.lower()] = value
    return overrides


def _captioners(env: Mapping[str, str]) -> tuple[str, ...] | None:
    """REVERSE_SD_CAPTIONERS: comma-separated registered captioners (e.g. "blip,blip2"); BLIP-2 is opt-in."""
    raw = _text(env, "REVERSE_SD_CAPTIONERS")
    if not raw:
        return None
    from pipeline.captioning.captioner import available_captioners

    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in available_captioners()]
    if unknown or not names:
        raise SettingsError(
            f"REVERSE_SD_CAPTIONERS={raw!r} names no registered captioner {unknown or ''}; "
            f"use a comma-separated list of: {', '.join(available_captioners())}"
        )
    return names


def _nproc(env: Mapping[str, str]) -> int | str:
    raw = _text(env, "REVERSE_SD_NPROC_PER_NODE") or "1"
    if raw == "gpus":
        return raw
    if not raw.isdigit() or int(raw) < 1:
        raise SettingsError(f"REVERSE_SD_NPROC_PER_NODE={raw!r} must be a positive integer or 'gpus'")
    return int(raw)


def _device(env: Mapping[str, str]) -> str:
    raw = _text(env, "REVERSE_SD_DEVICE") or "auto"
    if not _DEVICE.fullmatch(raw):
        raise SettingsError(f"REVERSE_SD_DEVICE={raw!r} is not a device; use auto, cpu, cuda or cuda:N")
    return raw


def _cron(env: Mapping[str, str]) -> str:
    raw = _text(env, "REVERSE_SD_OBSERVE_CRON") or DEFAULT_OBSERVE_CRON
    if len(raw.split()) != 5:
        raise SettingsError(f"REVERSE_SD_OBSERVE_CRON={raw!r} is not a cron expression of five fields")
    return raw


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting from ``environ`` (default: the process environment)."""
    env = os.environ if environ is None else environ
    profile = _text(env, "REVERSE_SD_PROFILE") or "sample"
    if profile not in PROFILES:
        raise SettingsError(f"REVERSE_SD_PROFILE={profile!r} is not a profile; use one of: {', '.join(PROFILES)}")
    home = _text(env, "REVERSE_SD_HOME") or str(PROJECT_DIR / "data")
    if "://" not in home:
        home = str(Path(home).expanduser().resolve())
    default_source = local_dir(home, "sample_mirror") if profile == "sample" else HUB_DATASET
    dagster_home = _text(env, "DAGSTER_HOME") or str(PROJECT_DIR / ".dagster_home")
    return Settings(
        profile=profile,
        home=home,
        diffusiondb=_text(env, "REVERSE_SD_DIFFUSIONDB") or default_source,
        diffusiondb_revision=_text(env, "REVERSE_SD_DIFFUSIONDB_REVISION") or HUB_REVISION,
        dagster_home=str(Path(dagster_home).expanduser().resolve()),
        observe_cron=_cron(env),
        sample_parts=_int(env, "REVERSE_SD_SAMPLE_PARTS", 4),
        sample_images_per_part=_int(env, "REVERSE_SD_SAMPLE_IMAGES_PER_PART", 250),
        train_epochs=_int(env, "REVERSE_SD_TRAIN_EPOCHS", None),
        train_overrides=_train_overrides(env),
        split_seed=_int(env, "REVERSE_SD_SPLIT_SEED", 0, minimum=0),
        captioners=_captioners(env),
        nproc_per_node=_nproc(env),
        device=_device(env),
        loader_workers=_int(env, "REVERSE_SD_LOADER_WORKERS", None, minimum=0),
        hf_token_set=bool(_text(env, "HF_TOKEN")),
    )


def ensure_dagster_home(settings: Settings) -> Path:
    """Create DAGSTER_HOME with the project's dagster.yaml when it has none, and export it."""
    home = Path(settings.dagster_home)
    config = home / "dagster.yaml"
    if home.exists() and not home.is_dir():
        raise SettingsError(f"DAGSTER_HOME={settings.dagster_home!r} is a file, not a directory")
    try:
        home.mkdir(parents=True, exist_ok=True)
        if not config.exists():
            shutil.copyfile(PROJECT_DIR / "dagster.yaml", config)
    except OSError as exc:
        raise SettingsError(f"DAGSTER_HOME={settings.dagster_home!r} is not writable: {exc.strerror}") from exc
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def check_storage_root(settings: Settings) -> None:
    """Fail at start, naming REVERSE_SD_HOME, when the storage root cannot be written."""
    if "://" in settings.home:
        return
    root = Path(settings.home)
    if root.exists() and not root.is_dir():
        raise SettingsError(f"REVERSE_SD_HOME={settings.home!r} is a file, not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SettingsError(f"REVERSE_SD_HOME={settings.home!r} is not writable: {exc.strerror}") from exc


def check_source(settings: Settings) -> None:
    """Fail at start, naming REVERSE_SD_DIFFUSIONDB, when a local mirror is missing or not in DiffusionDB's layout.

    Hub ids are not checked here (that needs the network); the generated sample mirror does not exist
    until its first use.
    """
    from pipeline.data.diffusiondb import PART_KEY, is_local_location

    if settings.uses_generated_sample or not is_local_location(settings.diffusiondb):
        return
    root = Path(settings.diffusiondb.removeprefix("file://")).expanduser()
    name = f"REVERSE_SD_DIFFUSIONDB={settings.diffusiondb!r}"
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise SettingsError(
            f"{name} {what}: give a local DiffusionDB mirror directory or a hub dataset id ({HUB_DATASET})"
        )
    images = root / "images"
    parts = (
        [p for p in images.iterdir() if p.suffix == ".zip" and PART_KEY.fullmatch(p.stem)] if images.is_dir() else []
    )
    if not parts:
        raise SettingsError(f"{name} is not a DiffusionDB mirror: it has no images/part-NNNNNN.zip")
