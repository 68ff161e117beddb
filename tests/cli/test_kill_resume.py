"""Kill -9 mid-write, then re-run: for diffusiondb_parts, prompt_embeddings and trained_models.

Each test starts a subprocess that does the real work (the `reverse-sd` CLI, or a small driver calling the
same pipeline functions the asset calls), waits until the atomic write's temporary file is half written,
SIGKILLs it, and checks that (1) no reader sees a partial artifact at the final path: it is absent, or the
previous complete version; (2) a re-run completes with results identical to an uninterrupted run (training
resumes from its last checkpoint and ends with the same weights, bit for bit, on CPU).

A write is made to stop half-way deterministically by a hook the subprocess installs only when
KILL_TEST_HALF_WRITE names a target: the real bytes are produced, the first half is written and flushed to
the temporary file, then the process sleeps until it is killed.  Everything else is the real code path.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import popen_cli

from pipeline.data.diffusiondb import read_part
from pipeline.training.checkpoint import latest_checkpoint, list_checkpoints, load_model_weights

pytestmark = pytest.mark.extended  # multi-process: run by CI (make test-extended), not the default run

PROJECT = Path(__file__).resolve().parents[2]

# Installed in the subprocess (sitecustomize-free: the driver / CLI wrapper imports it first).
HOOK = r'''
import io, os, sys, time

TARGET = os.environ.get("KILL_TEST_HALF_WRITE", "")
# Our own copy of the stdout pipe: Dagster captures fd 1 / sys.stdout during a run's compute.  A run worker
# launched by the instance reports to the file KILL_TEST_REPORT instead (its stdout is the server's log).
_REPORT = open(os.environ["KILL_TEST_REPORT"], "a") if os.environ.get("KILL_TEST_REPORT") else os.fdopen(os.dup(1), "w")


def _stall(path, data):
    """Write the first half of data to path, flush it to disk, say so on stdout, and wait to be killed."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        print(f"\nKILL-TEST-STALLED {path}" + (f" PID {os.getpid()}" if os.environ.get("KILL_TEST_REPORT") else ""), file=_REPORT, flush=True)
        time.sleep(600)
        f.write(data[len(data) // 2 :])


if TARGET.startswith("parquet:"):  # parquet:<name>[:<n>]: the n-th write (default 1st) of a file named <name>
    import pyarrow.parquet as pq

    _real_write_table = pq.write_table
    _, needle, *nth = TARGET.split(":")
    _writes = []

    def write_table(table, where, *args, **kwargs):
        if needle in str(where):
            _writes.append(where)
        if needle not in str(where) or len(_writes) != int(nth[0] if nth else 1):
            return _real_write_table(table, where, *args, **kwargs)
        buf = io.BytesIO()
        _real_write_table(table, buf, *args, **kwargs)
        _stall(where, buf.getvalue())

    pq.write_table = write_table
elif TARGET.startswith("checkpoint:"):
    import pipeline.training.checkpoint as ckpt

    _real_save = ckpt.st_save_file
    needle = TARGET.split(":", 1)[1]

    def st_save_file(tensors, filename, metadata=None):
        _real_save(tensors, filename, metadata=metadata)
        if needle in str(filename):
            data = open(filename, "rb").read()
            _stall(filename, data)

    ckpt.st_save_file = st_save_file
'''

CLI = (
    HOOK
    + r"""
from cli.main import main

if __name__ == "__main__":  # materialize's spawned workers import this module too (and so get the hook)
    sys.exit(main(sys.argv[1:]))
"""
)

EMBED = (
    HOOK
    + r"""
import json
import polars as pl
import torch

torch.set_num_threads(1)
from pipeline.data.embedding import PromptEncoder, embed_incremental
from pipeline.storage import exists, read_parquet, write_parquet

PROMPTS = [f"a {c} {s} in the style of {a}, highly detailed" for c in ("red", "blue", "green", "golden")
           for s in ("cat", "castle", "robot", "forest", "ship") for a in ("monet", "greg rutkowski")]
encoder = PromptEncoder(device="cpu")
for step in json.loads(sys.argv[1]):  # [[home, n_prompts], ...]: each step is one materialization
    home, n = step
    target = f"{home}/prompt_embeddings.parquet"
    cache = read_parquet(target) if exists(target) else None
    frame, stats = embed_incremental(pl.Series("prompt", PROMPTS[:n]), cache, encoder)
    write_parquet(frame, target)
    print(json.dumps(stats), flush=True)
"""
)

TRAIN = (
    HOOK
    + r"""
import io, json
import numpy as np
import torch
from PIL import Image

torch.set_num_threads(1)
from pipeline.training.datasets import PairDataset
from pipeline.models import create_model
from pipeline.training.loop import TrainConfig, seed_everything, train_model

rng = np.random.default_rng(0)
images, labels = [], []
for i in range(28):
    colour = rng.integers(0, 256, size=3).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.tile(colour, (64, 64, 1))).save(buf, format="PNG")
    images.append(buf.getvalue())
    labels.append(np.flatnonzero(colour > 127))
targets = np.random.default_rng(1).normal(size=(28, 3)) @ np.random.default_rng(2).normal(size=(3, 384))
targets = (targets / np.linalg.norm(targets, axis=1, keepdims=True)).astype(np.float32)
model = create_model("vit", variant="tiny", vocab_size=3)  # for the datasets' preprocessing
train = PairDataset.for_model(images[:20], targets[:20], labels[:20], model)
val = PairDataset.for_model(images[20:], targets[20:], labels[20:], model)
# the mlc_cl recipe's shape: curriculum stages easy, easy+medium, all (one epoch each)
stages = [np.arange(8), np.arange(14), np.arange(20)]
config = TrainConfig(stage_epochs=1, batch_size=4, lr=3e-3, warmup_fraction=0.1, seed=0, device="cpu", log_every=0)
out = {}
for directory in sys.argv[1:]:  # one run per checkpoint directory, each from the same initial weights
    seed_everything(0)
    model = create_model("vit", variant="tiny", vocab_size=3)
    result = train_model(model, train, val, config, directory, stages=stages)
    out[directory] = {"resumed_epochs": result.resumed_epochs, "val": [h["val_cosine"] for h in result.history]}
print(json.dumps(out))
"""
)


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT),
        "HF_HUB_OFFLINE": "1",
        "REVERSE_SD_PROFILE": "sample",
        "REVERSE_SD_HOME": str(tmp / "data"),
        "DAGSTER_HOME": str(tmp / "dagster_home"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("REVERSE_SD_DIFFUSIONDB", None)
    env.pop("KILL_TEST_HALF_WRITE", None)
    env.update(extra)
    return env


def _script(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.py"
    path.write_text(text)
    return path


def _run(script: Path, args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(script), *args], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


MARKER = "KILL-TEST-STALLED "


def _kill_mid_write(script: Path, args: list[str], env: dict[str, str]) -> Path:
    """Start the subprocess, wait until the hook reports its half-written temporary file, SIGKILL it.

    Returns the temporary file it left.  (Polling the directory instead would race with earlier, complete
    writes of the same artifact, whose temporaries exist for a moment too.)
    """
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for text in proc.stdout:
            lines.put(text)
        lines.put(None)  # EOF: the process is gone

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    output = []
    try:
        while True:
            line = lines.get(timeout=180)  # queue.Empty fails the test rather than hanging it
            if line is None:
                proc.wait(timeout=60)
                pytest.fail(
                    f"finished before the write could be killed (rc {proc.returncode}): {''.join(output)[-3000:]}"
                )
            output.append(line)
            if MARKER in line:  # a progress bar may share the line
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    leftover = Path(line.split(MARKER, 1)[1].strip())
    assert (
        leftover.exists() and leftover.name.startswith(".") and ".tmp" in leftover.name
    )  # a temporary, not the artifact
    return leftover


def _assert_not_parquet(path: Path) -> None:
    """The leftover really is a half-written file (the kill landed mid-write), unreadable as Parquet."""
    with pytest.raises((pl.exceptions.PolarsError, OSError)):
        pl.read_parquet(path)


# -- diffusiondb_parts, through the CLI ----------------------------------------------------------------


def _kill_run_worker_mid_write(args: list[str], env: dict[str, str], report: Path) -> Path:
    """`reverse-sd materialize` whose runs (launched by the instance) carry the hook as sitecustomize: wait for
    the run worker to report its half-written temporary file, SIGKILL that worker; the CLI reports the failed
    run (exit 1).  Returns the temporary file it left."""
    proc = popen_cli(args, env)
    try:
        deadline = time.monotonic() + 300
        while MARKER not in (report.read_text() if report.exists() else ""):
            assert proc.poll() is None, f"finished before the write could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "no stalled write reported"
            time.sleep(0.2)
        line = next(x for x in report.read_text().splitlines() if MARKER in x)
        where, pid = line.split(MARKER, 1)[1].rsplit(" PID ", 1)
        os.kill(int(pid), signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    assert "Traceback" not in err
    leftover = Path(where.strip())
    assert leftover.exists() and leftover.name.startswith(".") and ".tmp" in leftover.name
    return leftover


def test_killed_part_write_leaves_no_partial_parquet_and_rerun_is_identical(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)  # every process: CLI, services, run workers
    report = tmp_path / "report.txt"
    env = _env(tmp_path, REVERSE_SD_SAMPLE_PARTS="2", REVERSE_SD_SAMPLE_IMAGES_PER_PART="6")
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{PROJECT}"
    cli = _script(tmp_path, "cli_probe", CLI)
    parts_dir = tmp_path / "data" / "diffusiondb_parts"
    killed_env = {**env, "KILL_TEST_HALF_WRITE": "parquet:part-000001.parquet", "KILL_TEST_REPORT": str(report)}
    # one run at a time: the other part must not be written while this one stalls
    leftover = _kill_run_worker_mid_write(
        ["materialize", "--select", "diffusiondb_parts", "--workers", "1", "--partitions-per-run", "1"],
        killed_env,
        report,
    )
    assert leftover.parent == parts_dir
    _assert_not_parquet(leftover)
    # no reader finds the killed part's table; the other part's run, independent of it, completed
    assert sorted(p.name for p in parts_dir.glob("part-*.parquet")) == ["part-000002.parquet"]

    # the re-run (only what is missing, as after any failure) completes despite the stale temporary file
    rerun = _run(cli, ["materialize", "--select", "diffusiondb_parts", "--stale"], env)
    assert "materialized 1 run " in rerun.stdout
    from resources.settings import load_settings

    mirror = Path(load_settings(env).sample_mirror_dir) / "images"
    for part in ("part-000001", "part-000002"):
        uninterrupted = read_part(mirror / f"{part}.zip", part).frame
        stored = pl.read_parquet(parts_dir / f"{part}.parquet")
        assert stored.height == 6 and stored.equals(uninterrupted)
    assert sorted(p.name for p in parts_dir.glob("part-*.parquet")) == ["part-000001.parquet", "part-000002.parquet"]


# -- prompt_embeddings (incremental), a driver around embed_incremental -----------------------------------


def test_killed_embedding_update_keeps_the_previous_table_and_rerun_is_identical(tmp_path):
    env = _env(tmp_path)
    embed = _script(tmp_path, "embed", EMBED)
    killed, version1_ref, reference = tmp_path / "killed", tmp_path / "version1", tmp_path / "reference"
    # version 1 (20 prompts) is written; the update to version 2 (40 prompts) is killed mid-write
    leftover = _kill_mid_write(
        embed,
        [json.dumps([[str(killed), 20], [str(killed), 40]])],
        {**env, "KILL_TEST_HALF_WRITE": "parquet:prompt_embeddings.parquet:2"},
    )
    _assert_not_parquet(leftover)
    survivor = pl.read_parquet(killed / "prompt_embeddings.parquet")  # a reader sees version 1, complete

    # the re-run, then (same process, other homes) version 1 and an uninterrupted 1 -> 2 update
    steps = [[str(killed), 40], [str(version1_ref), 20], [str(reference), 20], [str(reference), 40]]
    rerun = [json.loads(line) for line in _run(embed, [json.dumps(steps)], env).stdout.strip().splitlines()]
    assert survivor.height == 20 and survivor.equals(pl.read_parquet(version1_ref / "prompt_embeddings.parquet"))
    assert rerun[0]["cached"] == 20 and rerun[0]["encoded"] == 20  # the killed run's work is redone, no more
    final = pl.read_parquet(killed / "prompt_embeddings.parquet")
    assert final.height == 40 and final.equals(pl.read_parquet(reference / "prompt_embeddings.parquet"))


# -- trained_models, a driver around train_model ---------------------------------------------------------


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_model_weights(latest_checkpoint(directory))[0]


def test_killed_training_resumes_from_its_last_checkpoint_with_identical_weights(tmp_path):
    env = _env(tmp_path)
    train = _script(tmp_path, "train", TRAIN)
    killed, reference = tmp_path / "killed", tmp_path / "reference"

    # killed while writing the weights of checkpoint 2 (its trainer state is already complete)
    leftover = _kill_mid_write(
        train,
        [str(killed)],
        {**env, "KILL_TEST_HALF_WRITE": "checkpoint:ckpt-00002"},
    )
    assert leftover.name.startswith(".ckpt-00002.safetensors.")
    assert not (killed / "ckpt-00002.safetensors").exists()
    assert [index for index, _ in list_checkpoints(killed)] == [1]
    assert len(_weights(killed)) > 0  # the newest complete checkpoint reads completely

    # the re-run in a fresh process, then an uninterrupted run in another directory
    runs = json.loads(_run(train, [str(killed), str(reference)], env).stdout.strip().splitlines()[-1])
    resumed, straight = runs[str(killed)], runs[str(reference)]
    assert resumed["resumed_epochs"] == 1 and straight["resumed_epochs"] == 0
    assert resumed["val"] == straight["val"]  # the whole history, the restored epoch included
    a, b = _weights(killed), _weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the killed write's leftovers are swept by the next save
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in reference.iterdir())
