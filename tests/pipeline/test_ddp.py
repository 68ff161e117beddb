"""A real 2-process DistributedDataParallel run (torchrun, gloo, CPU) through pipeline.training.ddp.

Checks that the ranks end with identical weights, that they moved from the initial weights, and that the
result matches a single-process run over the same global batches (batch_size is global: each rank takes
every other sample of the same in-stage permutation, and DDP averages the ranks' gradients).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_s3_storage import bucket, client, s3_endpoint, s3_env  # noqa: F401  (moto's S3 server fixtures)
from test_training import TINY_CONFIG, make_tiny_model, toy_data

from pipeline.training import ddp as ddp_train
from pipeline.training.checkpoint import load_model_weights

ROOT = Path(__file__).resolve().parents[2]


def _write_pairs(path: Path, images, targets, labels) -> None:
    table = pa.table(
        {
            "image": pa.array(images, type=pa.binary()),
            "embedding": pa.array(list(targets), type=pa.list_(pa.float32(), 384)),
            "label_indices": pa.array([x.tolist() for x in labels], type=pa.list_(pa.int32())),
        }
    )
    pq.write_table(table, path)


def _spec(tmp_path: Path, name: str, curriculum: bool) -> Path:
    spec = {
        "model": {"factory": "test_training:make_tiny_model", "kwargs": {"seed": 0, "dropout": 0.0}},
        "loss": {"factory": "test_training:make_loss"},
        "train": str(tmp_path / "train.parquet"),
        "val": str(tmp_path / "val.parquet"),
        "stages": str(tmp_path / "stages.npz") if curriculum else None,
        "config": {**TINY_CONFIG, "stage_epochs": 1, "precision": "fp32", "log_every": 1},
        "checkpoint_dir": str(tmp_path / name / "ckpt"),
        "metrics": str(tmp_path / name / "metrics.json"),
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def _toy_files(tmp_path: Path) -> None:
    images, targets, labels = toy_data(26)
    _write_pairs(tmp_path / "train.parquet", images[:18], targets[:18], labels[:18])  # 18: a short last batch
    _write_pairs(tmp_path / "val.parquet", images[18:], targets[18:], labels[18:])
    np.savez(tmp_path / "stages.npz", stage_0=np.arange(0, 16, 2), stage_1=np.arange(18))


def _launch_env() -> dict[str, str]:
    # test_training (the spec's model and loss factories) lives beside this file; conftest one level up
    path = [str(Path(__file__).resolve().parent), str(ROOT / "tests"), str(ROOT)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_matches_single(tmp_path: Path, metrics: dict) -> None:
    """The multi-process checkpoint equals a single-process run's over the same global batches."""
    single = ddp_train.run(json.loads(_spec(tmp_path, "single", curriculum=True).read_text()))
    assert single["extra"]["world_size"] == 1
    ddp_state, _ = load_model_weights(metrics["checkpoint_path"])
    single_state, _ = load_model_weights(single["checkpoint_path"])
    init = make_tiny_model(0, dropout=0.0).state_dict()
    assert not torch.allclose(ddp_state["head.weight"], init["head.weight"])
    # Even stage sizes (8, 18): no padding, so both runs see the same global batches (the last one of 2
    # samples as 1 + 1) and differ only by float summation order.
    for k in single_state:
        assert torch.allclose(ddp_state[k], single_state[k], atol=1e-5, rtol=1e-4), k


def _rank_lines(output: str) -> list[dict]:
    records = []
    for line in output.splitlines():
        start = line.find('{"event": "rank_done"')
        if start >= 0:
            records.append(json.loads(line[start:]))
    return records


@pytest.mark.extended
def test_two_process_ddp_matches_single_process(tmp_path):
    _toy_files(tmp_path)
    env = _launch_env()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pipeline.training.ddp",
        "--spec",
        str(_spec(tmp_path, "ddp", curriculum=True)),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["extra"]["world_size"] == 2
    assert metrics["extra"]["replica_max_abs_diff"] == 0.0  # both ranks hold the same weights
    assert [h["stage"] for h in metrics["history"]] == [0, 1]
    _assert_matches_single(tmp_path, metrics)


@pytest.mark.extended
def test_two_process_ddp_from_the_pixel_cache_matches_single_process(tmp_path):
    """With a cache directory, the ranks decode the split's images once into one pixel file (rank 0 decides
    build or reuse for both, each rank decodes its share of the rows) and train on it as from the images."""
    _toy_files(tmp_path)
    spec_path = _spec(tmp_path, "ddp", curriculum=True)
    spec = {**json.loads(spec_path.read_text()), "cache_dir": str(tmp_path / "cache")}
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "pipeline.training.ddp", "--spec", str(spec_path)]
    done = subprocess.run(command, cwd=ROOT, env=_launch_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    cache = metrics["feature_cache"]
    assert cache["kind"] == "pixels" and cache["built"] == 2 and cache["reused"] == 0, cache  # train, val
    assert len(list((tmp_path / "cache").glob("pixels-*.npy"))) == 2
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary file left
    _assert_matches_single(tmp_path, metrics)


@pytest.mark.extended
def test_two_node_rendezvous_matches_single_process(tmp_path):
    """Two torchrun agents (--nnodes 2, one process each, c10d rendezvous on 127.0.0.1, gloo over lo): the
    first holds the spec and hosts the rendezvous, the second joins with the spec-less command a second
    machine runs.  Both ranks must report a world of 2, the second having taken the spec from the store."""
    _toy_files(tmp_path)
    env = {**_launch_env(), "GLOO_SOCKET_IFNAME": "lo"}
    endpoint = f"127.0.0.1:{_free_port()}"
    rdzv = {"nnodes": 2, "rdzv_endpoint": endpoint, "rdzv_id": f"test-{os.getpid()}", "join_timeout_s": 120}
    node0 = ddp_train.torchrun_command(_spec(tmp_path, "ddp", curriculum=True), 1, **rdzv)
    node1 = ddp_train.join_command(1, python=sys.executable, **rdzv)
    started = time.monotonic()
    first = subprocess.Popen(node0, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = subprocess.Popen(node1, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out0, _ = first.communicate(timeout=300)
        out1, _ = second.communicate(timeout=60)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = time.monotonic() - started
    assert first.returncode == 0 and second.returncode == 0, out0[-3000:] + "\n-----\n" + out1[-3000:]

    ranks0, ranks1 = _rank_lines(out0), _rank_lines(out1)
    assert len(ranks0) == 1 and len(ranks1) == 1, out0[-2000:] + out1[-2000:]
    assert {ranks0[0]["rank"], ranks1[0]["rank"]} == {0, 1}
    assert ranks0[0]["world_size"] == ranks1[0]["world_size"] == 2
    assert ranks0[0]["spec"] == "given" and ranks1[0]["spec"] == "joined"
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["extra"]["world_size"] == 2
    assert metrics["extra"]["replica_max_abs_diff"] == 0.0
    assert [h["stage"] for h in metrics["history"]] == [0, 1]
    _assert_matches_single(tmp_path, metrics)
    print(f"two-node rendezvous run: {elapsed:.1f} s")


@pytest.mark.extended
def test_trained_models_trains_on_two_nodes_from_the_settings(tmp_path):
    """REVERSE_SD_TRAIN_NNODES=2: the trained_models asset (materialized as in test_training_launch) starts
    node 0's torchrun agent from the settings, writes the spec under the storage root and waits; the test
    plays the second machine with the documented join command, in its retry loop, started before the step.
    Both ranks report a world of 2, the model's metadata too, and the run's spec files are gone afterwards."""
    from conftest import TRAINED_MODELS_DRIVER as DRIVER
    from environments import sample_env

    endpoint = f"127.0.0.1:{_free_port()}"
    settings = {
        "REVERSE_SD_SAMPLE_PARTS": "1",
        "REVERSE_SD_SAMPLE_IMAGES_PER_PART": "48",
        "REVERSE_SD_TRAIN_EPOCHS": "1",
        "REVERSE_SD_TRAIN_NNODES": "2",
        "REVERSE_SD_TRAIN_RDZV_ENDPOINT": endpoint,
        "REVERSE_SD_TRAIN_RDZV_ID": f"asset-{os.getpid()}",
        "REVERSE_SD_TRAIN_JOIN_TIMEOUT": "300",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
    env = sample_env(tmp_path, **settings)
    (tmp_path / "dagster_home").mkdir()
    join = ddp_train.join_command(1, nnodes=2, rdzv_endpoint=endpoint, rdzv_id=settings["REVERSE_SD_TRAIN_RDZV_ID"])
    # The README's command for the other machine: retried until node 0's agent hosts the rendezvous.
    loop = f"until {' '.join(join)}; do sleep 2; done"
    joiner_env = {**_launch_env(), "GLOO_SOCKET_IFNAME": "lo", "REVERSE_SD_HOME": env["REVERSE_SD_HOME"]}
    joiner_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), joiner_env.get("PATH", "")])
    started = time.monotonic()
    joiner = subprocess.Popen(
        ["bash", "-c", loop], cwd=ROOT, env=joiner_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", DRIVER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        elapsed = time.monotonic() - started
        joined_out, _ = joiner.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        joiner.kill()
        joined_out, _ = joiner.communicate()
    finally:
        if joiner.poll() is None:
            joiner.kill()
            joiner.wait()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:] + "\n-----\n" + joined_out[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["success"], "\n".join(report["logs"][-20:]) + "\n-----\n" + joined_out[-3000:]
    assert joiner.returncode == 0, joined_out[-3000:]
    logs = "\n".join(report["logs"])
    assert "--nnodes 2" in logs and f"--rdzv-endpoint {endpoint}" in logs and "--join" in logs
    assert report["world_size"] == 2 and report["epochs"] == 1

    joined = _rank_lines(joined_out)
    assert len(joined) == 1 and joined[0]["world_size"] == 2 and joined[0]["spec"] == "joined", joined_out[-2000:]
    assert joined[0]["rank"] in (0, 1)  # node 0's rank is the other one: the model's world_size is 2

    data = tmp_path / "data"
    checkpoint = Path(report["checkpoint"])
    assert checkpoint.exists() and checkpoint.parent == data / "trained_models" / "vit" / "mlc"
    assert not (data / "ddp_runs").exists()  # the run's spec files removed when the step ended
    print(f"trained_models on two nodes: {elapsed:.1f} s (sample 1 part x 48 images, data assets included)")


def test_readme_gives_the_join_and_launch_commands():
    """The README's multi-node commands are what join_command / torchrun_command build (the test above runs
    join_command's), so the documented command is the tested one."""
    readme = " ".join((ROOT / "README.md").read_text().replace("\\\n", " ").split())
    rdzv = {"nnodes": 2, "rdzv_endpoint": "host0:29400", "rdzv_id": "reverse-sd", "join_timeout_s": 600}
    join = " ".join(ddp_train.join_command(1, **rdzv))
    assert f"until {join}; do sleep 5; done" in readme
    launch = ddp_train.torchrun_command("<root>/ddp_runs/<run id>/<backbone>/<recipe>/spec.json", 1, **rdzv)
    assert " ".join(["python", *launch[1:]]) in readme


@pytest.mark.extended
def test_two_nodes_read_the_spec_from_an_object_store(bucket, s3_env, tmp_path):  # noqa: F811
    """The shared root is an S3 bucket (moto's server): write_spec(shared=True) puts the spec, the pairs with
    their images inline and the stages there; both agents read them through pipeline.storage, rank 0 (on
    whichever node) writes the checkpoint and metrics.json back there, and the result equals one process's."""
    from pipeline import storage
    from pipeline.training.loop import TrainConfig

    images, targets, labels = toy_data(26)
    run_dir = f"s3://{bucket}/root/ddp_runs/run-1/toy/mlc_cl"
    config = json.loads(_spec(tmp_path, "unused", curriculum=True).read_text())["config"]
    spec_path = ddp_train.write_spec(
        run_dir,
        model_kwargs={"seed": 0, "dropout": 0.0},
        train=(images[:18], targets[:18], labels[:18]),
        val=(images[18:], targets[18:], labels[18:]),
        config=TrainConfig(**config),
        checkpoint_dir=f"s3://{bucket}/root/trained_models/toy/mlc_cl",
        stages=[np.arange(0, 16, 2), np.arange(18)],
        shared=True,
    )
    spec = json.loads(_s3_text(spec_path))
    spec["model"]["factory"] = "test_training:make_tiny_model"
    spec["loss"] = {"factory": "test_training:make_loss"}
    storage.write_text(json.dumps(spec), spec_path)
    assert not list(tmp_path.rglob("*.parquet"))  # nothing of the run on local disk

    env = {**_launch_env(), **s3_env, "GLOO_SOCKET_IFNAME": "lo"}
    rdzv = {"nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{_free_port()}", "rdzv_id": "s3", "join_timeout_s": 120}
    started = time.monotonic()
    procs = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for command in (
            ddp_train.torchrun_command(spec_path, 1, **rdzv),
            ddp_train.join_command(1, python=sys.executable, **rdzv),
        )
    ]
    try:
        outs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = time.monotonic() - started
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + "\n-----\n" + outs[1][-3000:]
    ranks = [_rank_lines(out) for out in outs]
    assert [len(r) for r in ranks] == [1, 1] and {r[0]["world_size"] for r in ranks} == {2}
    assert {r[0]["spec"] for r in ranks} == {"given", "joined"}

    metrics = json.loads(_s3_text(spec["metrics"]))
    assert metrics["extra"]["world_size"] == 2 and metrics["checkpoint_path"].startswith(f"s3://{bucket}/")
    _toy_files(tmp_path)  # the same pairs and stages, locally, for the single-process run
    _assert_matches_single(tmp_path, metrics)  # the checkpoint read from the bucket
    print(f"two-node run on the object store: {elapsed:.1f} s")


def _s3_text(url: str) -> str:
    from pipeline import storage

    with storage.verified_local_copy(url) as local:
        return Path(local).read_text()
