"""End to end: the whole graph materialized on a very small sample, as a user runs it (the CLI in a
subprocess, against its own storage root and Dagster instance), then a stale-only re-run that does nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

PROJECT = Path(__file__).resolve().parents[1]


def _run_cli(args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "assets.cli", *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    env = {
        **os.environ,
        "REVERSE_SD_PROFILE": "sample",
        "REVERSE_SD_HOME": str(root / "data"),
        "DAGSTER_HOME": str(root / "dagster_home"),
        "REVERSE_SD_SAMPLE_PARTS": "2",
        "REVERSE_SD_SAMPLE_IMAGES_PER_PART": "150",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("REVERSE_SD_DIFFUSIONDB", None)
    result = _run_cli(["materialize"], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return root / "data", env, result


def test_whole_graph_materializes(sample_run):
    home, _, result = sample_run
    parts = sorted(p.name for p in (home / "diffusiondb_parts").glob("*.parquet"))
    assert parts == ["part-000001.parquet", "part-000002.parquet"]
    raw = pl.concat([pl.read_parquet(home / "diffusiondb_parts" / p) for p in parts])
    assert raw.height == 300
    pairs = pl.read_parquet(home / "filtered_pairs.parquet")
    # the sample carries filter bait, so the filter must remove something, and keep most
    assert 0.5 * raw.height < pairs.height < raw.height
    assert set(pairs["split"].unique()) <= {"train", "val", "test"}
    embeddings = pl.read_parquet(home / "prompt_embeddings.parquet")
    assert set(embeddings["prompt"]) == set(pairs["prompt"])
    labels = pl.read_parquet(home / "vocabulary_labels.parquet")
    assert labels.height == pairs.height
    # nothing half-written left behind
    assert not list(home.rglob("*.tmp*"))


def test_stale_rerun_does_nothing(sample_run):
    _, env, _ = sample_run
    again = _run_cli(["materialize", "--stale"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to materialize" in again.stdout


def test_wrong_profile_fails_with_one_line(sample_run):
    _, env, _ = sample_run
    bad = _run_cli(["materialize"], {**env, "REVERSE_SD_PROFILE": "bogus"})
    assert bad.returncode == 2
    assert "REVERSE_SD_PROFILE" in bad.stderr
    assert "Traceback" not in bad.stderr
