"""The tiers, and shared fixtures.

Tests mirror the packages: tests/pipeline, tests/resources, tests/assets, tests/cli, and tests/e2e (whole
materializations; tests/cluster: the Celery deployment).  `make test` runs all but e2e, cluster and the tests
marked ``extended`` (multi-process: torchrun, kill -9, Postgres); `make test-extended` runs those.

One timeout policy: pytest-timeout gives a test 900 s (pyproject.toml) and an e2e test E2E_TIMEOUT, and no
subprocess a test starts may outlive that: run_cli defaults to 600 s, the session's materialization to
E2E_MATERIALIZE_TIMEOUT, less than E2E_TIMEOUT (its first test pays for it).

The whole graph is materialized once per test session on the default sample, as `make run` builds it (the
CLI in a subprocess, its own storage root and Dagster instance): tests/e2e/ checks the run, the report and
the CLI on it, and opens it in a browser.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from environments import sample_env

PROJECT = Path(__file__).resolve().parents[1]
E2E = Path(__file__).resolve().parent / "e2e"
E2E_TIMEOUT = 1800
E2E_MATERIALIZE_TIMEOUT = 1500


@pytest.hookimpl(tryfirst=True)  # before -m deselects: an e2e test is an extended one
def pytest_collection_modifyitems(config, items):
    for item in items:
        if E2E in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.extended)
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT))


def run_cli(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def popen_cli(args: list[str], env: dict[str, str], **popen: object) -> subprocess.Popen:
    """The CLI started in a subprocess with its stdout and stderr piped (text); ``popen`` on top."""
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def use_home(monkeypatch: pytest.MonkeyPatch, home: Path, **settings: str) -> Path:
    """This process's REVERSE_SD_HOME is ``home``: no other REVERSE_SD_* setting leaks in from the calling shell,
    then ``settings`` (e.g. HF_HUB_OFFLINE="1") on top.  Returns ``home``."""
    for key in list(os.environ):
        if key.startswith("REVERSE_SD_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("REVERSE_SD_HOME", str(home))
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    return home


@pytest.fixture(scope="session")
def sample_graph_run(tmp_path_factory) -> tuple[Path, dict[str, str], subprocess.CompletedProcess]:
    """(REVERSE_SD_HOME, environment, the CLI's completed process) of one whole-graph materialization.

    The default sample (4 parts x 250): on a smaller one the tiny models cannot be expected to beat the
    mean-embedding baseline, which a blocking check enforces.
    """
    root = tmp_path_factory.mktemp("e2e")
    env = sample_env(root)  # the defaults, whatever the calling shell exported
    result = run_cli(["materialize"], env, timeout=E2E_MATERIALIZE_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return root / "data", env, result


@pytest.fixture(scope="session")
def materialized_sample(sample_graph_run) -> dict[str, str]:
    """The environment of the materialized sample (tests/test_web_ui.py looks this fixture up)."""
    return dict(sample_graph_run[1])


PREDICT_WORDS = ["red", "blue", "circle", "square", "painting", "photo"]


def write_tiny_predict_home(home: Path, seed: int = 0) -> Path:
    """A storage root holding what predict reads: a prompt bank, a vocabulary (PREDICT_WORDS) and one tiny vit
    with an MLC head."""
    import numpy as np
    import polars as pl

    from pipeline.models import create_model
    from pipeline.training.checkpoint import save_checkpoint

    vit = create_model("vit", variant="tiny", vocab_size=len(PREDICT_WORDS))
    save_checkpoint(home / "trained_models" / "vit" / "mlc", vit)
    bank = np.random.default_rng(seed).normal(size=(6, 384)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    pl.DataFrame({"prompt": [f"prompt {i}" for i in range(6)], "embedding": bank}).write_parquet(
        home / "prompt_bank.parquet"
    )
    pl.DataFrame(
        {
            "index": np.arange(len(PREDICT_WORDS), dtype=np.int32),
            "word": PREDICT_WORDS,
            "count": np.arange(len(PREDICT_WORDS), 0, -1),
        }
    ).write_parquet(home / "vocabulary.parquet")
    return home


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads; on a shared 2-core box two threads make them many times slower.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A script (python -c) that materializes what trained_models[vit|mlc] reads, in process on the instance of
# DAGSTER_HOME, then trained_models[vit|mlc] itself, and prints one JSON line: success, the run's log messages,
# the checkpoint, epochs and world size.  tests/assets/test_training_launch.py and tests/pipeline/test_ddp.py
# drive torchrun launches through it.
TRAINED_MODELS_DRIVER = r"""
import json, sys
import dagster as dg
from assets.data import register_parts
from assets.definitions import ALL_ASSETS, ALL_CHECKS, defs
from cli.runs import OBSERVE_JOBS
instance = dg.DagsterInstance.get()
register_parts(instance, defs.resources["diffusiondb"])
for job in OBSERVE_JOBS:  # what `reverse-sd materialize` submits first, run here in this process
    assert defs.resolve_job_def(job).execute_in_process(instance=instance).success
data = ["filtered_pairs", "prompt_embeddings", "vocabulary", "vocabulary_labels"]
for part in instance.get_dynamic_partitions("diffusiondb_part"):
    dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=["diffusiondb_parts"], partition_key=part,
                   instance=instance, resources=defs.resources)
dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=data, instance=instance, resources=defs.resources)
result = dg.materialize([*ALL_ASSETS, *ALL_CHECKS], selection=["trained_models"],
                        partition_key="vit|mlc", instance=instance, resources=defs.resources, raise_on_error=False)
logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
meta = result.asset_materializations_for_node("trained_models")[0].metadata
print(json.dumps({"success": result.success, "logs": logs,
                  "checkpoint": meta["checkpoint"].value, "epochs": meta["epochs"].value,
                  "world_size": meta["world_size"].value}))
"""
