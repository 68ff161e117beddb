"""trained_models with REVERSE_SD_NPROC_PER_NODE=2: torchrun launched from the asset through Dagster Pipes,
two gloo processes on CPU, checkpoints where model_predictions finds them, the run's logs in Dagster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TRAINED_MODELS_DRIVER as DRIVER
from environments import sample_env

PROJECT = Path(__file__).resolve().parents[2]


@pytest.mark.extended
def test_trained_models_launches_torchrun_through_pipes(tmp_path):
    env = sample_env(
        tmp_path,
        REVERSE_SD_SAMPLE_PARTS="1",
        REVERSE_SD_SAMPLE_IMAGES_PER_PART="48",
        REVERSE_SD_TRAIN_EPOCHS="1",
        REVERSE_SD_NPROC_PER_NODE="2",
        OMP_NUM_THREADS="1",
    )
    (tmp_path / "dagster_home").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", DRIVER], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["success"], "\n".join(report["logs"][-20:])
    logs = "\n".join(report["logs"])
    assert "torch.distributed.run" in logs and "--nproc_per_node 2" in logs
    assert report["world_size"] == 2 and report["epochs"] == 1
    checkpoint = Path(report["checkpoint"])
    assert checkpoint.exists() and checkpoint.parent == tmp_path / "data" / "trained_models" / "vit" / "mlc"
