"""The few settings every command, test and benchmark shares, read from the environment.

REVERSE_SD_PROFILE      sample | diffusiondb (default sample)
REVERSE_SD_DIFFUSIONDB  a hub dataset id or a local mirror directory (default: the profile's)
REVERSE_SD_HOME         the storage root of every artifact (default ./data in the project directory)
DAGSTER_HOME            the Dagster instance (default ./.dagster_home in the project directory)

Wrong values fail at start with one line naming the setting (SettingsError): load_settings checks the
profile, check_storage_root / ensure_dagster_home that the two homes can be written, check_source that a
local mirror exists in DiffusionDB's layout.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
PROFILES = ("sample", "diffusiondb")
HUB_DATASET = "poloclub/diffusiondb"
# The DiffusionDB revision on the hub.  Pin it to a commit sha with REVERSE_SD_DIFFUSIONDB_REVISION for
# reproducible runs; either way diffusiondb_source records the resolved commit sha as its data version,
# so a new upstream revision shows up as stale data rather than silently changing results.
HUB_REVISION = "main"


class SettingsError(ValueError):
    """A wrong setting; the message names it."""


@dataclass(frozen=True)
class Settings:
    profile: str
    home: str
    diffusiondb: str
    diffusiondb_revision: str
    dagster_home: str

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


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    profile = env.get("REVERSE_SD_PROFILE", "sample").strip() or "sample"
    if profile not in PROFILES:
        raise SettingsError(
            f"REVERSE_SD_PROFILE={profile!r} is not a profile; use one of: {', '.join(PROFILES)}"
        )
    home = env.get("REVERSE_SD_HOME", "").strip() or str(PROJECT_DIR / "data")
    if "://" not in home:
        home = str(Path(home).expanduser().resolve())
    default_source = local_dir(home, "sample_mirror") if profile == "sample" else HUB_DATASET
    source = env.get("REVERSE_SD_DIFFUSIONDB", "").strip() or default_source
    revision = env.get("REVERSE_SD_DIFFUSIONDB_REVISION", "").strip() or HUB_REVISION
    dagster_home = env.get("DAGSTER_HOME", "").strip() or str(PROJECT_DIR / ".dagster_home")
    return Settings(profile, home, source, revision, str(Path(dagster_home).expanduser().resolve()))


def ensure_dagster_home(settings: Settings) -> Path:
    """Create DAGSTER_HOME with the project's dagster.yaml when it has none, and export it."""
    home = Path(settings.dagster_home)
    config = home / "dagster.yaml"
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
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write-probe"
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
    parts = [p for p in images.iterdir() if p.suffix == ".zip" and PART_KEY.fullmatch(p.stem)] if images.is_dir() else []
    if not parts:
        raise SettingsError(f"{name} is not a DiffusionDB mirror: it has no images/part-NNNNNN.zip")
