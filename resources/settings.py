"""Every ``REVERSE_SD_*`` setting, read once from the environment and validated up front.

``load_settings(environ)`` is the only place that reads them; everything else receives a frozen
``Settings``.  A wrong value fails at start with one line naming the variable (``SettingsError``), before
any Dagster step runs.  ``resources/profiles.py`` turns a ``Settings`` into the result-changing numbers of
its profile (plain data).

REVERSE_SD_PROFILE                  sample | diffusiondb (default sample)
REVERSE_SD_DIFFUSIONDB              a hub dataset id or a local mirror directory (default: the profile's), or none
                                    (train on REVERSE_SD_IMAGES alone)
REVERSE_SD_IMAGES                   a folder of the user's own generations: each immediate subfolder is one part
                                    of image_folders (prompts from the images' metadata or sidecars)
REVERSE_SD_DIFFUSIONDB_REVISION     hub revision (default main; the observed data version records the sha)
REVERSE_SD_HOME                     the storage root of every artifact (default ./data in the project)
DAGSTER_HOME                        the Dagster instance (default ./.dagster_home in the project)
REVERSE_SD_SAMPLE_PARTS / _IMAGES_PER_PART   size of the generated sample (sample profile; at most 2,000 parts
                                    of 10,000 images); the mirror's directory is named by them, so a change is new data
REVERSE_SD_TRAIN_EPOCHS             training epochs of every backbone (sample profile; 1 to 10,000)
REVERSE_SD_TRAIN_<BACKBONE>_EPOCHS / _LR     one backbone's epochs (1 to 10,000) / learning rate (0 < lr <= 10)
REVERSE_SD_SPLIT_SEED               seed of the train / val / test split (0 to 2**32 - 1)
REVERSE_SD_CAPTIONERS               comma-separated captioners to fine-tune (default blip)
REVERSE_SD_NPROC_PER_NODE           training processes per machine (1 to 64), or "gpus" (default 1)
REVERSE_SD_TRAIN_NNODES             machines that train one model together (1 to 1,024; default 1); above 1 needs:
REVERSE_SD_TRAIN_RDZV_ENDPOINT      host:port of the torchrun c10d rendezvous, on the machine that runs the step
REVERSE_SD_TRAIN_RDZV_ID            the rendezvous id every node passes (letters, digits, . _ -; default reverse-sd)
REVERSE_SD_TRAIN_JOIN_TIMEOUT       seconds the step waits for the other nodes to join (10 to 86,400; default 600)
REVERSE_SD_DEVICE                   auto | cpu | cuda | cuda:N: where models run (default auto: CUDA when present)
REVERSE_SD_LOADER_WORKERS           DataLoader worker processes (default: the cores available, at most 8; at most
                                    the cores this process may use)
REVERSE_SD_PIXEL_CACHE_GB           the most disk one split's decoded images may take in the pixel cache (vit, swin:
                                    decoded and resized once, not every epoch; 0 to 100,000, default 32; 0: none)
REVERSE_SD_BASELINE_CHECK           block | warn (default block): a model that does not beat the mean-embedding
                                    baseline stops the ensemble, DAKL and the report (block), or is only flagged
                                    (warn: a WARN-severity, non-blocking check, for samples too small to learn)
REVERSE_SD_OBSERVE_CRON             when the observe schedule looks for a new DiffusionDB revision (five cron fields)

Every number is bounded, and the bound is in the error.  REVERSE_SD_HOME's URL scheme must be one fsspec knows
(checked here); check_storage_root also wants its driver installed and refuses in-process storage (memory://),
which the processes that run the steps cannot see, and asks an object store (s3://bucket/prefix, the endpoint
from AWS_ENDPOINT_URL_S3) for its bucket and a probe write before anything runs.  check_source refuses a hub
dataset id when the hub cannot be reached (HF_HUB_OFFLINE, or no answer), before anything runs.
"""

from __future__ import annotations

import hashlib
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
NO_DIFFUSIONDB = "none"  # REVERSE_SD_DIFFUSIONDB=none: no DiffusionDB parts, only REVERSE_SD_IMAGES
DEFAULT_OBSERVE_CRON = "0 3 * * *"
DEFAULT_PIXEL_CACHE_GB = 32.0  # 218k images at 224 px; DiffusionDB-2M's training split (670k, 100 GB) decodes
MAX_PIXEL_CACHE_GB = 100_000.0
MAX_LOADER_WORKERS = 8  # beyond this, decoding 256-px JPEGs outpaces one GPU; more workers only cost memory
# Bounds of the numeric settings (each error names its bound).
MAX_SAMPLE_PARTS = 2_000  # DiffusionDB 2M's part count
MAX_SAMPLE_IMAGES_PER_PART = 10_000  # ten times a real part (1,000 images); a part is generated in memory
MAX_EPOCHS = 10_000
MAX_LR = 10.0
MAX_SEED = 2**32 - 1
MAX_NPROC_PER_NODE = 64
MAX_NNODES = 1_024
MIN_JOIN_TIMEOUT_S, MAX_JOIN_TIMEOUT_S = 10, 86_400
DEFAULT_RDZV_ID = "reverse-sd"
BASELINE_CHECK_MODES = ("block", "warn")
# The generated sample's fixed generator settings (its seed and image size), part of the mirror's directory name.
SAMPLE_SEED = 0
SAMPLE_IMAGE_SIZE = 256
_PER_BACKBONE = re.compile(r"REVERSE_SD_TRAIN_([A-Z0-9]+)_(EPOCHS|LR)")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
_RDZV_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\]")
_RDZV_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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
    train_nnodes: int = 1  # REVERSE_SD_TRAIN_NNODES: machines in one torchrun rendezvous
    train_rdzv_endpoint: str | None = None  # host:port, required when train_nnodes > 1
    train_rdzv_id: str = DEFAULT_RDZV_ID
    train_join_timeout_s: int = 600
    device: str = "auto"
    loader_workers: int | None = None  # None: cores available, at most MAX_LOADER_WORKERS
    pixel_cache_gb: float = DEFAULT_PIXEL_CACHE_GB  # REVERSE_SD_PIXEL_CACHE_GB (0: no pixel cache)
    hf_token_set: bool = False
    hub_offline: bool = False  # HF_HUB_OFFLINE is set: the hub cannot be reached
    baseline_check: str = "block"  # REVERSE_SD_BASELINE_CHECK: block | warn
    images: str | None = None  # REVERSE_SD_IMAGES: the own-images folder (absolute), or None

    @property
    def uses_diffusiondb(self) -> bool:
        """False for REVERSE_SD_DIFFUSIONDB=none: training on the own images alone."""
        return self.diffusiondb != NO_DIFFUSIONDB

    @property
    def is_sample(self) -> bool:
        return self.profile == "sample"

    @property
    def backbone_variant(self) -> str:
        """Tiny random-init twins on the sample profile, the real architectures on DiffusionDB."""
        return "tiny" if self.is_sample else "full"

    @property
    def sample_mirror_dir(self) -> str:
        """The generated sample's directory, named by what it holds: a change of REVERSE_SD_SAMPLE_PARTS or
        ..._IMAGES_PER_PART is another directory (new data, never a stale mirror read as current), and two
        object-store roots never share one."""
        return sample_mirror_dir(self.home, self.sample_parts, self.sample_images_per_part)

    @property
    def sample_mirror_generated(self) -> bool:
        """Whether the generated sample exists yet (it is written on first use, never by a dry run)."""
        return (Path(self.sample_mirror_dir) / "metadata.parquet").is_file()

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


def sample_mirror_dir(home: str, parts: int, images_per_part: int) -> str:
    """<root>/sample_mirror/<parts>x<images>-seed<seed>-<size>px; under an object-store root the local cache's
    sample_mirror/ instead, the name then also carrying a hash of the root so that roots never share one."""
    name = f"{parts}x{images_per_part}-seed{SAMPLE_SEED}-{SAMPLE_IMAGE_SIZE}px"
    if "://" in home and not home.startswith("file://"):
        name += "-root-" + hashlib.sha256(home.rstrip("/").encode()).hexdigest()[:10]
    return os.path.join(local_dir(home, "sample_mirror"), name)


def _text(env: Mapping[str, str], name: str) -> str:
    return env.get(name, "").strip()


def _int(
    env: Mapping[str, str], name: str, default: int | None, minimum: int = 1, maximum: int | None = None
) -> int | None:
    raw = _text(env, name)
    if not raw:
        return default
    try:
        value = int(raw) if len(raw) <= 40 else None  # int() of a huge string is slow, and no bound is that large
    except ValueError:
        value = None
    if value is None:
        raise SettingsError(
            f"{name}={raw[:40]!r} is not an integer" + (f" from {minimum} to {maximum}" if maximum else "")
        )
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}={raw!r} must be at most {maximum:,}")
    return value


def _float(
    env: Mapping[str, str], name: str, default: float | None, *, maximum: float, zero: str | None = None
) -> float | None:
    """A finite number up to ``maximum``: positive, or from 0 when ``zero`` says what 0 means."""
    raw = _text(env, name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw[:40]!r} is not a number") from None
    if not (math.isfinite(value) and (0 <= value if zero else 0 < value) and value <= maximum):
        bounds = f"from 0 ({zero}) to {maximum:,g}" if zero else f"a positive finite number, at most {maximum:g}"
        raise SettingsError(f"{name}={raw[:40]!r} must be {bounds}")
    return value


def _loader_workers(env: Mapping[str, str]) -> int | None:
    """REVERSE_SD_LOADER_WORKERS: 0 (load in the training process) up to the cores this process may use."""
    cores = available_cores()
    value = _int(env, "REVERSE_SD_LOADER_WORKERS", None, minimum=0)
    if value is not None and value > cores:
        raise SettingsError(
            f"REVERSE_SD_LOADER_WORKERS={value} asks for more DataLoader workers than the {cores} cores this "
            f"process may use: use 0 to {cores}"
        )
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
        value = (
            _int(env, name, None, maximum=MAX_EPOCHS) if what == "EPOCHS" else _float(env, name, None, maximum=MAX_LR)
        )
        if value is not None:
            overrides.setdefault(backbone, {})[what.lower()] = value
    return overrides


def _captioners(env: Mapping[str, str]) -> tuple[str, ...] | None:
    """REVERSE_SD_CAPTIONERS: comma-separated registered captioners (e.g. "blip,blip2"); BLIP-2 is opt-in."""
    raw = _text(env, "REVERSE_SD_CAPTIONERS")
    if not raw:
        return None
    from pipeline.captioning import CAPTIONERS

    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in CAPTIONERS]
    if unknown or not names:
        raise SettingsError(
            f"REVERSE_SD_CAPTIONERS={raw!r} names no registered captioner {unknown or ''}; "
            f"use a comma-separated list of: {', '.join(CAPTIONERS.names())}"
        )
    return names


def _nproc(env: Mapping[str, str]) -> int | str:
    raw = _text(env, "REVERSE_SD_NPROC_PER_NODE") or "1"
    if raw == "gpus":
        return raw
    if not raw.isdigit() or len(raw) > 6 or not 1 <= int(raw) <= MAX_NPROC_PER_NODE:
        raise SettingsError(
            f"REVERSE_SD_NPROC_PER_NODE={raw[:40]!r} must be an integer from 1 to {MAX_NPROC_PER_NODE}, or 'gpus'"
        )
    return int(raw)


def _rdzv_endpoint(env: Mapping[str, str], nnodes: int) -> str | None:
    """REVERSE_SD_TRAIN_RDZV_ENDPOINT: host:port (port 1 to 65535); required with REVERSE_SD_TRAIN_NNODES > 1."""
    name = "REVERSE_SD_TRAIN_RDZV_ENDPOINT"
    raw = _text(env, name)
    if not raw:
        if nnodes > 1:
            raise SettingsError(
                f"REVERSE_SD_TRAIN_NNODES={nnodes} needs {name}=host:port, the rendezvous on the machine that "
                "runs the training step"
            )
        return None
    host, _, port = raw.rpartition(":")
    if not (_RDZV_HOST.fullmatch(host) and port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        raise SettingsError(f"{name}={raw[:80]!r} must be host:port, with a port from 1 to 65535")
    return raw


def _rdzv_id(env: Mapping[str, str]) -> str:
    raw = _text(env, "REVERSE_SD_TRAIN_RDZV_ID") or DEFAULT_RDZV_ID
    if not _RDZV_ID.fullmatch(raw):
        raise SettingsError(
            f"REVERSE_SD_TRAIN_RDZV_ID={raw[:80]!r} must be 1 to 64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return raw


def _baseline_check(env: Mapping[str, str]) -> str:
    raw = (_text(env, "REVERSE_SD_BASELINE_CHECK") or "block").lower()
    if raw not in BASELINE_CHECK_MODES:
        raise SettingsError(f"REVERSE_SD_BASELINE_CHECK={raw!r} is not a mode; use block or warn")
    return raw


def _device(env: Mapping[str, str]) -> str:
    raw = _text(env, "REVERSE_SD_DEVICE") or "auto"
    if not _DEVICE.fullmatch(raw):
        raise SettingsError(f"REVERSE_SD_DEVICE={raw!r} is not a device; use auto, cpu, cuda or cuda:N")
    return raw


_CRON_FIELDS = (  # name, lowest, highest, names
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
_CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_CRON_HELP = (
    "use five fields (minute 0-59, hour 0-23, day of month 1-31, month 1-12 or jan-dec, day of week 0-7 or "
    "sun-sat; each *, a value, a range a-b, a list a,b, with an optional /step) or @hourly, @daily, @weekly, "
    f"@monthly, @yearly; e.g. '{DEFAULT_OBSERVE_CRON}'"
)


def _cron_values(text: str, field: int) -> set[int]:
    """The values one cron field selects; ValueError saying what is wrong."""
    name, low, high, names = _CRON_FIELDS[field]

    def number(token: str) -> int:
        token = token.lower()
        if token in names:
            return names.index(token) + (1 if field == 3 else 0)
        if not token.isdigit() or len(token) > 4:
            raise ValueError(f"{name} {token!r} is not a number")
        value = int(token)
        if not low <= value <= high:
            raise ValueError(f"{name} {value} is out of {low}-{high}")
        return value

    values: set[int] = set()
    for item in text.split(","):
        body, _, step_text = item.partition("/")
        if "/" in item:
            if not step_text.isdigit() or len(step_text) > 4 or not 1 <= int(step_text) <= high:
                raise ValueError(f"{name} step {step_text!r} is not a number from 1 to {high}")
        step = int(step_text) if step_text else 1
        if body in ("*", "?") if field in (2, 4) else body == "*":
            start, stop = low, high
        elif "-" in body:
            first, _, last = body.partition("-")
            start, stop = number(first), number(last)
            if start > stop:
                raise ValueError(f"{name} range {body!r} runs backwards")
        else:
            start = number(body)
            stop = high if step_text else start
        values.update(range(start, stop + 1, step))
    return values


def validate_cron(raw: str) -> str | None:
    """What is wrong with a cron expression, or None when Dagster's schedules and automation conditions accept
    it and it can fire (not on a 30th of February)."""
    if raw.startswith("@"):
        return None if raw.lower() in _CRON_ALIASES else f"{raw!r} is not one of {', '.join(_CRON_ALIASES)}"
    fields = raw.split()
    if len(fields) != 5:
        return f"it has {len(fields)} fields, not five"
    try:
        values = [_cron_values(text, i) for i, text in enumerate(fields)]
    except ValueError as exc:
        return str(exc)
    days, months = values[2], values[3]
    any_weekday = fields[4] in ("*", "?")
    if any_weekday and not any(day <= _DAYS_IN_MONTH[month - 1] for day in days for month in months):
        return "that day of month never occurs in that month"
    return None


def _cron(env: Mapping[str, str]) -> str:
    raw = " ".join(_text(env, "REVERSE_SD_OBSERVE_CRON").split()) or DEFAULT_OBSERVE_CRON
    problem = validate_cron(raw)
    if problem:
        raise SettingsError(
            f"REVERSE_SD_OBSERVE_CRON={raw[:80]!r} is not a cron expression of five fields ({problem}): {_CRON_HELP}"
        )
    return raw


_OFFLINE_VALUES = ("1", "ON", "YES", "TRUE")  # as huggingface_hub reads HF_HUB_OFFLINE


def _url_schemes(url: str) -> list[str]:
    """The fsspec protocols of a URL, chained ones included (simplecache::s3://bucket/key)."""
    return [segment.split("://", 1)[0].lower() for segment in url.split("::") if segment]


def _known_schemes() -> set[str]:
    import fsspec

    return set(fsspec.available_protocols()) | set(fsspec.registry)


def installed_schemes() -> list[str]:
    """The fsspec protocols whose implementation imports here (file, memory, s3 once s3fs is installed, ...)."""
    import warnings

    import fsspec

    installed = []
    for scheme in sorted(_known_schemes()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fsspec.get_filesystem_class(scheme)
        except Exception:  # a missing optional package, or an implementation that fails to import
            continue
        installed.append(scheme)
    return installed


def _storage_home(env: Mapping[str, str]) -> str:
    home = _text(env, "REVERSE_SD_HOME") or str(PROJECT_DIR / "data")
    if "://" not in home:
        return str(Path(home).expanduser().resolve())
    unknown = [scheme for scheme in _url_schemes(home) if scheme not in _known_schemes()]
    if unknown:
        raise SettingsError(
            f"REVERSE_SD_HOME={home!r}: {unknown[0]!r} is not a storage scheme fsspec knows; installed: "
            f"{', '.join(installed_schemes())} (or a local directory)"
        )
    return home


def _images(env: Mapping[str, str], diffusiondb: str) -> str | None:
    raw = _text(env, "REVERSE_SD_IMAGES")
    if diffusiondb.lower() == NO_DIFFUSIONDB and not raw:
        raise SettingsError(
            "REVERSE_SD_DIFFUSIONDB=none leaves nothing to train on: set REVERSE_SD_IMAGES to a folder of your images"
        )
    if not raw:
        return None
    if "://" in raw:
        raise SettingsError(f"REVERSE_SD_IMAGES={raw[:80]!r} must be a local folder, not a URL")
    return str(Path(raw).expanduser().resolve())


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting from ``environ`` (default: the process environment)."""
    env = os.environ if environ is None else environ
    profile = _text(env, "REVERSE_SD_PROFILE") or "sample"
    if profile not in PROFILES:
        raise SettingsError(f"REVERSE_SD_PROFILE={profile!r} is not a profile; use one of: {', '.join(PROFILES)}")
    home = _storage_home(env)
    sample_parts = _int(env, "REVERSE_SD_SAMPLE_PARTS", 4, maximum=MAX_SAMPLE_PARTS)
    sample_images = _int(env, "REVERSE_SD_SAMPLE_IMAGES_PER_PART", 250, maximum=MAX_SAMPLE_IMAGES_PER_PART)
    default_source = sample_mirror_dir(home, sample_parts, sample_images) if profile == "sample" else HUB_DATASET
    dagster_home = _text(env, "DAGSTER_HOME") or str(PROJECT_DIR / ".dagster_home")
    nnodes = _int(env, "REVERSE_SD_TRAIN_NNODES", 1, maximum=MAX_NNODES)
    diffusiondb = _text(env, "REVERSE_SD_DIFFUSIONDB") or default_source
    if diffusiondb.lower() == NO_DIFFUSIONDB:
        diffusiondb = NO_DIFFUSIONDB
    return Settings(
        profile=profile,
        home=home,
        images=_images(env, diffusiondb),
        diffusiondb=diffusiondb,
        diffusiondb_revision=_text(env, "REVERSE_SD_DIFFUSIONDB_REVISION") or HUB_REVISION,
        dagster_home=str(Path(dagster_home).expanduser().resolve()),
        observe_cron=_cron(env),
        sample_parts=sample_parts,
        sample_images_per_part=sample_images,
        train_epochs=_int(env, "REVERSE_SD_TRAIN_EPOCHS", None, maximum=MAX_EPOCHS),
        train_overrides=_train_overrides(env),
        split_seed=_int(env, "REVERSE_SD_SPLIT_SEED", 0, minimum=0, maximum=MAX_SEED),
        captioners=_captioners(env),
        nproc_per_node=_nproc(env),
        train_nnodes=nnodes,
        train_rdzv_endpoint=_rdzv_endpoint(env, nnodes),
        train_rdzv_id=_rdzv_id(env),
        train_join_timeout_s=_int(
            env, "REVERSE_SD_TRAIN_JOIN_TIMEOUT", 600, minimum=MIN_JOIN_TIMEOUT_S, maximum=MAX_JOIN_TIMEOUT_S
        ),
        device=_device(env),
        baseline_check=_baseline_check(env),
        loader_workers=_loader_workers(env),
        pixel_cache_gb=_float(
            env, "REVERSE_SD_PIXEL_CACHE_GB", DEFAULT_PIXEL_CACHE_GB, maximum=MAX_PIXEL_CACHE_GB, zero="no pixel cache"
        ),
        hf_token_set=bool(_text(env, "HF_TOKEN")),
        hub_offline=_text(env, "HF_HUB_OFFLINE").upper() in _OFFLINE_VALUES,
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


def check_storage_root(settings: Settings, create: bool = True) -> None:
    """Fail at start, naming REVERSE_SD_HOME, when the storage root cannot serve a materialize: a local
    directory that cannot be written, a URL whose fsspec driver is not installed, or storage that only this
    process sees (memory://): each step runs in a process of its own, and what it wrote there would be gone.

    ``create=False`` (a dry run) writes nothing: a local root that does not exist yet only needs a writable
    parent.
    """
    if "://" in settings.home and not settings.home.startswith("file://"):
        _check_url_root(settings.home)
        _check_object_store_root(settings.home, create)
        return
    root = Path(settings.home.removeprefix("file://"))
    if root.exists() and not root.is_dir():
        raise SettingsError(f"REVERSE_SD_HOME={settings.home!r} is a file, not a directory")
    if not create:
        existing = next(p for p in (root, *root.parents) if p.exists())
        if not existing.is_dir():
            raise SettingsError(f"REVERSE_SD_HOME={settings.home!r} is not writable: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise SettingsError(f"REVERSE_SD_HOME={settings.home!r} is not writable: {existing} is read-only")
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SettingsError(f"REVERSE_SD_HOME={settings.home!r} is not writable: {exc.strerror}") from exc


def _check_url_root(url: str) -> None:
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    name = f"REVERSE_SD_HOME={url!r}"
    for scheme in _url_schemes(url):
        try:
            implementation = fsspec.get_filesystem_class(scheme)
        except ImportError as exc:
            reason = (str(exc).strip().splitlines() or ["its package is missing"])[0]
            raise SettingsError(
                f"{name}: the {scheme!r} filesystem is not installed ({reason}); installed: "
                f"{', '.join(installed_schemes())}"
            ) from None
        except ValueError:
            raise SettingsError(
                f"{name}: {scheme!r} is not a storage scheme fsspec knows; installed: {', '.join(installed_schemes())}"
            ) from None
        if issubclass(implementation, MemoryFileSystem):
            raise SettingsError(
                f"{name} lives in this process's memory ({scheme}://), which the processes that run the steps "
                "cannot see: use a local directory or an object store (s3://bucket/prefix)"
            )


def _check_object_store_root(url: str, create: bool) -> None:
    """An object-store root (s3://bucket/prefix) answers now, not in the middle of a run: the endpoint is
    reachable, the credentials are accepted and the bucket exists (a missing bucket is never created).
    ``create``: a probe object is written under the prefix and deleted; otherwise (a dry run) the bucket is
    only looked up."""
    from pipeline import storage

    root = storage.as_path(url)
    if isinstance(root, Path) or url.split("://", 1)[0].lower() not in storage.ATOMIC_PUT_PROTOCOLS:
        return
    bucket = root.path.strip("/").split("/", 1)[0]
    name = f"REVERSE_SD_HOME={url!r}"
    try:
        if not root.fs.exists(bucket):
            raise FileNotFoundError(f"bucket {bucket!r} does not exist")
        if create:
            probe = root / f".write-probe-{os.getpid()}"
            root.fs.pipe_file(probe.path, b"")
            root.fs.rm_file(probe.path)
    except Exception as exc:  # botocore / aiohttp / fsspec errors: say which, in one line
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        what = "cannot be written" if create else "cannot be read"
        raise SettingsError(f"{name} {what}: {reason} ({_endpoint(url)})") from None


def _endpoint(url: str) -> str:
    if url.split("://", 1)[0].lower() in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return f"endpoint {endpoint}"
        return "AWS's own endpoint: set AWS_ENDPOINT_URL_S3 for another S3-compatible server"
    return "the filesystem's default endpoint"


def check_source(settings: Settings) -> None:
    """Fail at start, naming REVERSE_SD_DIFFUSIONDB, when a local mirror is missing or not in DiffusionDB's
    layout, or a hub dataset id cannot be reached (HF_HUB_OFFLINE set, no network, no such dataset).

    Writes nothing: the generated sample mirror is not checked here (it does not exist until its first use;
    ``DiffusionDBResource.list_parts(create=False)`` lists the parts it would hold).
    """
    from pipeline.data.diffusiondb import PART_KEY, is_local_location

    if settings.images is not None and not Path(settings.images).is_dir():
        what = "does not exist" if not Path(settings.images).exists() else "is not a directory"
        raise SettingsError(f"REVERSE_SD_IMAGES={settings.images!r} {what}: give a folder of image subfolders")
    if settings.uses_generated_sample or not settings.uses_diffusiondb:
        return
    if not is_local_location(settings.diffusiondb):
        _check_hub_source(settings)
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


HUB_CHECK_TIMEOUT_S = 15.0


def _check_hub_source(settings: Settings, endpoint: str | None = None) -> None:
    """A hub dataset id must answer now, once, quickly: offline, or with no network, nothing later can work."""
    name = f"REVERSE_SD_DIFFUSIONDB={settings.diffusiondb!r}"
    remedy = "set REVERSE_SD_DIFFUSIONDB to a local DiffusionDB mirror directory (images/part-NNNNNN.zip)"
    if settings.hub_offline:
        raise SettingsError(
            f"{name} is a hub dataset id, but HF_HUB_OFFLINE is set: the hub cannot be reached "
            f"offline; {remedy}, or unset HF_HUB_OFFLINE"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:  # HfApi reads HF_TOKEN itself
        HfApi(endpoint=endpoint).dataset_info(
            settings.diffusiondb, revision=settings.diffusiondb_revision, timeout=HUB_CHECK_TIMEOUT_S
        )
    except RevisionNotFoundError:
        raise SettingsError(
            f"REVERSE_SD_DIFFUSIONDB_REVISION={settings.diffusiondb_revision!r} is not a revision of "
            f"{settings.diffusiondb} on the hub"
        ) from None
    except GatedRepoError:
        raise SettingsError(f"{name} is gated on the hub: accept its terms there and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise SettingsError(f"{name} is not a dataset on the hub (a private one needs HF_TOKEN); or {remedy}") from None
    except Exception as exc:  # no network, DNS, proxy, timeout, the hub's own errors
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SettingsError(f"{name}: the hub cannot be reached ({reason}); {remedy}") from None
