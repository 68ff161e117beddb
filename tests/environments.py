"""The environment of a reverse-sd subprocess on the sample profile, shared by the tests and bench/ so that
both measure the same configuration.  Imports nothing heavy: bench/materialize.py loads it outside pytest."""

from __future__ import annotations

import os
from pathlib import Path


def sample_env(root: Path, **settings: str) -> dict[str, str]:
    """The environment of a CLI subprocess on the sample profile with its own storage root and Dagster
    instance under ``root``: no REVERSE_SD_* setting or HF_TOKEN leaks in from the calling shell, then
    ``settings`` (e.g. REVERSE_SD_SAMPLE_PARTS="1") on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REVERSE_SD_") and k != "HF_TOKEN"}
    env.update(
        REVERSE_SD_PROFILE="sample",
        REVERSE_SD_HOME=str(root / "data"),
        DAGSTER_HOME=str(root / "dagster_home"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(settings)
    return env
