"""The few settings every command, test and benchmark shares, read from the environment.

REVERSE_SD_PROFILE      sample | diffusiondb (default sample)
REVERSE_SD_DIFFUSIONDB  a hub dataset id or a local mirror directory (default: the profile's)
REVERSE_SD_HOME         the storage root of every artifact (default ./data in the project directory)
DAGSTER_HOME            the Dagster instance (default ./.dagster_home in the project directory)

Wrong values fail at start with one line naming the setting (SettingsError).
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
        return os.path.join(self.home, "sample_mirror")

    @property
    def uses_generated_sample(self) -> bool:
        return self.diffusiondb == self.sample_mirror_dir


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
    default_source = os.path.join(home, "sample_mirror") if profile == "sample" else HUB_DATASET
    source = env.get("REVERSE_SD_DIFFUSIONDB", "").strip() or default_source
    revision = env.get("REVERSE_SD_DIFFUSIONDB_REVISION", "").strip() or HUB_REVISION
    dagster_home = env.get("DAGSTER_HOME", "").strip() or str(PROJECT_DIR / ".dagster_home")
    return Settings(profile, home, source, revision, str(Path(dagster_home).expanduser().resolve()))


def ensure_dagster_home(settings: Settings) -> Path:
    """Create DAGSTER_HOME with the project's dagster.yaml when it has none, and export it."""
    home = Path(settings.dagster_home)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        shutil.copyfile(PROJECT_DIR / "dagster.yaml", config)
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
