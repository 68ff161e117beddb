"""trained_models with REVERSE_SD_NPROC_PER_NODE=2: torchrun launched from the asset through Dagster Pipes,
two gloo processes on CPU, checkpoints where model_predictions finds them, the run's logs in Dagster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sample_env

PROJECT = Path(__file__).resolve().parents[2]

DRIVER = r"""
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
