"""`reverse-sd materialize` at scale: the plan, the parallel scheduler, the gpu pool per GPU, and recovery.

The scheduler is tested with a fake launcher (threads and fake device counts); planning on the real
Definitions; recovery with real processes killed by SIGKILL / stopped by SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from conftest import run_cli, sample_env

from assets import orchestration as orch
from pipeline import storage

PROJECT = Path(__file__).resolve().parents[1]


def _fake_plan(n: int, gpu: bool, depends_on: dict[int, set[int]] | None = None) -> orch.Plan:
    units = [orch.Unit("materialize_trained_models", (dg.AssetKey("trained_models"),), f"p{i}", gpu) for i in range(n)]
    return orch.Plan(units, {i: set((depends_on or {}).get(i, ())) for i in range(n)})


class _Recorder:
    """A fake launch: sleeps a little, records how many runs (and which devices) were in flight at once."""

    def __init__(self, fail: set[str] = frozenset(), seconds: float = 0.05):
        self.lock = threading.Lock()
        self.running: dict[str, int | None] = {}
        self.max_running = 0
        self.device_clash = False
        self.fail, self.seconds = fail, seconds
        self.order: list[str] = []

    def __call__(self, unit, device, tags):
        with self.lock:
            busy = {d for d in self.running.values() if d is not None}
            self.device_clash |= device is not None and device in busy
            self.running[unit.partition_key] = device
            self.max_running = max(self.max_running, len(self.running))
            self.order.append(unit.partition_key)
        time.sleep(self.seconds)
        with self.lock:
            del self.running[unit.partition_key]
        return orch.Outcome(
            unit, "run", unit.partition_key not in self.fail, ["boom"] if unit.partition_key in self.fail else []
        )


def test_gpu_pool_admits_one_run_per_gpu_each_on_its_own_device():
    """12 trained_models partitions on an 8-GPU box run 8 at a time, never two on one device."""
    recorder = _Recorder()
    progress = orch.run_units(
        _fake_plan(12, gpu=True), workers=16, gpu_slots=8, gpu_devices=True, tags={}, launch=recorder
    )
    assert recorder.max_running == 8
    assert not recorder.device_clash
    assert len(progress.outcomes) == 12 and all(o.success for o in progress.outcomes)


@pytest.mark.parametrize("gpus, expected", [(0, 1), (1, 1), (2, 2)])
def test_fake_gpu_counts_bound_the_gpu_runs(gpus, expected):
    recorder = _Recorder()
    orch.run_units(
        _fake_plan(6, gpu=True), workers=8, gpu_slots=max(1, gpus), gpu_devices=gpus > 0, tags={}, launch=recorder
    )
    assert recorder.max_running == expected


def test_workers_bound_the_runs_at_once_and_data_runs_ignore_the_gpu_pool():
    recorder = _Recorder()
    orch.run_units(_fake_plan(10, gpu=False), workers=3, gpu_slots=1, gpu_devices=False, tags={}, launch=recorder)
    assert recorder.max_running == 3


def test_a_failure_stops_its_dependents_only():
    # p0 -> p2 -> p4 ; p1 -> p3 ; p0 fails
    plan = _fake_plan(5, gpu=False, depends_on={2: {0}, 3: {1}, 4: {2}})
    recorder = _Recorder(fail={"p0"})
    progress = orch.run_units(plan, workers=4, gpu_slots=1, gpu_devices=False, tags={}, launch=recorder)
    ran = {o.unit.partition_key: o.success for o in progress.outcomes}
    assert ran == {"p0": False, "p1": True, "p3": True}
    assert sorted(u.partition_key for u in progress.not_run) == ["p2", "p4"]


def test_runs_wait_for_what_they_read():
    plan = _fake_plan(3, gpu=False, depends_on={0: {2}, 1: {0}})
    recorder = _Recorder()
    orch.run_units(plan, workers=3, gpu_slots=1, gpu_devices=False, tags={}, launch=recorder)
    assert recorder.order == ["p2", "p0", "p1"]


def test_plan_is_runs_of_named_jobs_in_dependency_order_and_a_dry_plan_writes_nothing():
    from assets.data import parts_partitions
    from assets.definitions import defs

    instance = dg.DagsterInstance.ephemeral()
    parts = [f"part-{i:06d}" for i in range(1, 4)]
    plan = orch.plan_units(defs, instance, extra_partitions={parts_partitions.name: parts})
    assert instance.get_dynamic_partitions(parts_partitions.name) == []  # nothing registered
    jobs = {job.name for job in defs.jobs}
    assert {u.job for u in plan.units} <= jobs
    labels = [u.label for u in plan.units]
    assert labels[:3] == [f"diffusiondb_parts[{p}]" for p in parts]
    for i, parents in plan.depends_on.items():
        assert all(p < i for p in parents)
    filtered = next(i for i, u in enumerate(plan.units) if dg.AssetKey("filtered_pairs") in u.asset_keys)
    assert plan.depends_on[filtered] == {0, 1, 2}
    models = [u for u in plan.units if dg.AssetKey("trained_models") in u.asset_keys]
    assert len(models) == 12 and all(u.gpu for u in models)
    assert not any(u.gpu for u in plan.units[:3])


def test_no_private_dagster_import_in_assets_or_resources():
    offenders = [
        str(path.relative_to(PROJECT))
        for folder in ("assets", "resources")
        for path in (PROJECT / folder).glob("*.py")
        if "dagster._" in path.read_text()
    ]
    assert offenders == []


# ---- recovery, with real processes -----------------------------------------------------------------------

SLEEPER = r"""
import os, sys, time
import dagster as dg
from assets import orchestration as orch

@dg.asset(pool="gpu")
def sleeper():
    print("SLEEPING", flush=True)
    time.sleep(120)

instance = dg.DagsterInstance.get()
orch.ensure_pool_limit(instance, 1)
dg.materialize([sleeper], instance=instance, tags={orch.LAUNCHED_BY_TAG: "cli", orch.PID_TAG: str(os.getpid()),
               orch.HOST_TAG: __import__("socket").gethostname()})
"""


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_run_killed_in_the_gpu_pool_is_released_and_its_slot_freed(tmp_path):
    dagster_home = tmp_path / "dh"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text((PROJECT / "dagster.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "PYTHONPATH": str(PROJECT)}
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER], env=env, stdout=subprocess.PIPE, text=True, cwd=PROJECT)
    try:
        assert proc.stdout.readline().strip() == "SLEEPING"
        os.environ["DAGSTER_HOME"], old = str(dagster_home), os.environ.get("DAGSTER_HOME")
        instance = dg.DagsterInstance.get()
        assert len(instance.event_log_storage.get_concurrency_info("gpu").claimed_slots) == 1
        assert orch.release_dead_runs(instance) == []  # alive: left alone
        proc.kill()
        proc.wait()
        released = orch.release_dead_runs(instance)
        assert len(released) == 1
        assert instance.get_run_by_id(released[0]).status == dg.DagsterRunStatus.FAILURE
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []
    finally:
        proc.kill()
        if old is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old


def _cli(args, env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "assets.cli", *args],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _started_run(dagster_home: Path, job: str):
    if not (dagster_home / "dagster.yaml").exists():
        return None
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    instance = dg.DagsterInstance.get()
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job, statuses=[dg.DagsterRunStatus.STARTED]))
    return runs[0] if runs else None


@pytest.mark.extended
def test_kill_minus_nine_in_a_gpu_stage_then_stale_rerun_completes_and_sigterm_stops_within_seconds(tmp_path):
    """kill -9 of `materialize` inside difficulty_scores: the next --stale run frees the slot the dead run held
    and completes; SIGTERM during a gpu stage stops within seconds, marking the run canceled."""
    env = sample_env(
        tmp_path,
        REVERSE_SD_SAMPLE_PARTS="1",
        REVERSE_SD_SAMPLE_IMAGES_PER_PART="24",
        REVERSE_SD_TRAIN_EPOCHS="1",
        OMP_NUM_THREADS="1",
    )
    old_home = os.environ.get("DAGSTER_HOME")
    dagster_home = tmp_path / "dagster_home"
    selection = ["--select", "*difficulty_scores", "--workers", "2"]
    try:
        # 1. kill -9 the CLI while difficulty_scores runs; its workers die with it
        proc = _cli(["materialize", *selection], env)
        run = _wait_for(lambda: _started_run(dagster_home, "materialize_difficulty_scores"), 240, "a gpu run")
        instance = dg.DagsterInstance.get()
        # A run is STARTED a moment before its step claims the gpu slot: kill inside the step, slot held.
        _wait_for(lambda: instance.event_log_storage.get_concurrency_info("gpu").claimed_slots, 60, "the gpu slot")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_for(lambda: not orch._process_alive(int(run.tags[orch.PID_TAG])), 10, "the worker to die")
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED  # left behind
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots  # the leaked slot

        # 2. SIGTERM a --stale run during the gpu stage: canceled within seconds, slot freed
        proc = _cli(["materialize", "--stale", *selection], env)
        second = _wait_for(
            lambda: (r := _started_run(dagster_home, "materialize_difficulty_scores")) and r.run_id != run.run_id and r,
            240,
            "the re-run's gpu run",
        )
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE  # released at start
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.monotonic() - stopped_at < 15
        assert proc.returncode == 130
        assert instance.get_run_by_id(second.run_id).status == dg.DagsterRunStatus.CANCELED
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots == []

        # 3. the next --stale run completes with no manual step
        final = run_cli(["materialize", "--stale", *selection], env, timeout=600)
        assert final.returncode == 0, final.stderr[-3000:]
        assert "Traceback" not in final.stderr
        assert len(list((tmp_path / "data" / "difficulty_scores").glob("*.parquet"))) == 4
    finally:
        if old_home is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old_home


def test_two_invocations_on_one_storage_root_and_a_failure_in_one_line(tmp_path, monkeypatch):
    """While another invocation holds the storage root (here the test holds its lock), a second one says so in
    one line and computes nothing; with --wait it queues behind it, then runs."""
    env = sample_env(tmp_path, REVERSE_SD_SAMPLE_PARTS="2", REVERSE_SD_SAMPLE_IMAGES_PER_PART="40")
    holder = storage.RootLock(tmp_path / "data")
    holder.acquire(wait=False)
    try:
        refused = run_cli(["materialize", "--select", "diffusiondb_parts"], env, timeout=300)
        assert refused.returncode == 3
        assert len(refused.stderr.strip().splitlines()) == 1 and "holds the storage root" in refused.stderr
        assert not (tmp_path / "data" / "diffusiondb_parts").exists()  # nothing computed
        waiting = _cli(["materialize", "--wait", "--select", "diffusiondb_parts"], env)
        first_line = waiting.stderr.readline()  # it says it waits, and waits
        assert first_line.startswith("waiting: another reverse-sd materialize"), first_line
        time.sleep(1)
        assert waiting.poll() is None
    finally:
        holder.release()
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err[-3000:]
    assert len(list((tmp_path / "data" / "diffusiondb_parts").glob("*.parquet"))) == 2

    # A failure is one line per asset[partition] with its cause (a truncated table: the file is named), and
    # where the full log is; no traceback without --verbose.
    damaged = tmp_path / "data" / "diffusiondb_parts" / "part-000002.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    runs_before = len(dg.DagsterInstance.get().get_run_records())
    plan = run_cli(["materialize", "--stale", "--dry-run", "--select", "diffusiondb_parts"], env, timeout=300)
    assert "diffusiondb_parts [1]: part-000002" in plan.stdout, plan.stdout  # a truncated artifact is stale
    assert len(dg.DagsterInstance.get().get_run_records()) == runs_before  # a dry run writes no run
    result = run_cli(["materialize", "--select", "filtered_pairs"], env, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and failed[0].startswith("failed: filtered_pairs")
    assert (
        "part-000002.parquet is damaged (truncated" in failed[0]
        and "re-materialize asset 'diffusiondb_parts'" in failed[0]
    )
    assert "materialize-" in result.stderr.splitlines()[-1]  # where the full log is


def test_a_full_disk_is_one_line_with_the_errno_text(tmp_path):
    """ "No space left on device" used to show only inside a 110-line trace."""
    import errno

    target = tmp_path / "data" / "filtered_pairs.parquet"

    @dg.asset
    def filtered_pairs():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    result = dg.materialize([filtered_pairs], instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    lines = orch.failure_lines(result)
    assert lines == [f"filtered_pairs: OSError: [Errno 28] No space left on device: '{target}'"]


def _materializations(instance, key: str) -> dict[str, list]:
    by_part: dict[str, list] = {}
    for record in instance.fetch_materializations(dg.AssetKey(key), limit=1000).records:
        by_part.setdefault(record.asset_materialization.partition, []).append(record.asset_materialization)
    return by_part


def test_parts_run_in_ranges_each_part_keeps_its_metadata_and_a_bad_part_fails_alone(tmp_path, monkeypatch):
    """Ranged runs pay Dagster's per-run cost once per range of parts; each part still gets its own metadata
    in the UI, and a range that fails is re-run part by part so only the bad part fails (in one line)."""
    from pipeline.data.diffusiondb import file_sha256
    from pipeline.data.sample_data import generate_sample_mirror

    mirror = tmp_path / "mirror"
    generate_sample_mirror(mirror, n_parts=6, images_per_part=3, image_size=64)
    env = sample_env(tmp_path, REVERSE_SD_DIFFUSIONDB=str(mirror))
    args = ["materialize", "--select", "diffusiondb_parts", "--workers", "1", "--partitions-per-run", "3"]
    result = run_cli(args, env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "materialized 2 asset runs" in result.stdout, result.stdout
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    instance = dg.DagsterInstance.get()
    runs = instance.get_runs()
    assert sorted(
        (r.tags[orch.RANGE_START_TAG], r.tags[orch.RANGE_END_TAG])
        for r in runs
        if r.job_name.startswith("materialize_diffusiondb")
    ) == [
        ("part-000001", "part-000003"),
        ("part-000004", "part-000006"),
    ]
    events = _materializations(instance, "diffusiondb_parts")
    assert sorted(events) == [f"part-{i:06d}" for i in range(1, 7)]
    for part, (event, *_) in events.items():  # each part its own figures, not its range's
        assert event.metadata["records"].value == 3
        assert event.metadata["source_sha256"].value == file_sha256(mirror / "images" / f"{part}.zip")
        assert part in event.metadata["path"].value

    # Each part's source version is observed on its own: a changed zip stales that part alone.
    dry = run_cli([*args, "--stale", "--dry-run"], env, timeout=300)
    assert "nothing to materialize" in dry.stdout, dry.stdout
    import zipfile

    with zipfile.ZipFile(mirror / "images" / "part-000002.zip", "a") as archive:
        archive.comment = b"re-uploaded"
    dry = run_cli([*args, "--stale", "--dry-run"], env, timeout=300)
    assert "diffusiondb_parts [1]: part-000002\n" in dry.stdout, dry.stdout

    # Parts 4-6 lose their tables (stale), and part 5's archive is now garbage: the range 4-6 fails as one run,
    # is re-run part by part, and only part 5 fails; part 2 (changed) runs alone.
    for i in (4, 5, 6):
        (tmp_path / "data" / "diffusiondb_parts" / f"part-{i:06d}.parquet").unlink()
    (mirror / "images" / "part-000005.zip").write_bytes(b"not a zip archive")
    result = run_cli([*args, "--stale"], env, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "[part-000004...part-000006] (3 partitions) failed as one run" in result.stderr, result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and failed[0].startswith("failed: diffusiondb_parts[part-000005]: "), failed
    assert "part-000005" in failed[0].split(": ", 2)[2]  # the cause names the archive
    events = _materializations(instance, "diffusiondb_parts")
    assert [len(events[f"part-{i:06d}"]) for i in range(1, 7)] == [1, 2, 1, 2, 1, 2]
    observed = {
        r.asset_observation.partition
        for r in instance.fetch_observations(dg.AssetKey("diffusiondb_source"), limit=100).records
    }
    assert observed == {f"part-{i:06d}" for i in range(1, 7)}
    assert (tmp_path / "data" / "diffusiondb_parts" / "part-000006.parquet").exists()


def test_ranges_join_only_adjacent_partitions_and_readers_wait_for_every_range():
    """Parts p0-p5 with p3 fresh, two per run: [p0,p1] [p2] [p4,p5] (a range never spans p3, which it would
    rebuild), and filtered_pairs reads all three runs; a stage without a BackfillPolicy is never merged."""
    from assets.definitions import defs

    graph = defs.resolve_asset_graph()
    parts_job = "materialize_diffusiondb_parts"
    keys = ["p0", "p1", "p2", "p4", "p5"]
    units = [orch.Unit(parts_job, (dg.AssetKey("diffusiondb_parts"),), k, False) for k in keys]
    units.append(orch.Unit("materialize_unpartitioned", (dg.AssetKey("filtered_pairs"),), None, False))
    units += [orch.Unit("materialize_trained_models", (dg.AssetKey("trained_models"),), f"vit|{r}", True) for r in "ab"]
    depends_on = {i: set() for i in range(len(units))}
    depends_on[5] = {0, 1, 2, 3, 4}
    order = {parts_job: {f"p{i}": i for i in range(6)}}
    plan = orch.group_ranges(orch.Plan(units, depends_on), graph, order, workers=1, partitions_per_run=2)
    assert [u.partition_keys for u in plan.units] == [
        ("p0", "p1"),
        ("p2",),
        ("p4", "p5"),
        (None,),
        ("vit|a",),
        ("vit|b",),
    ]
    assert plan.depends_on[3] == {0, 1, 2} and plan.depends_on[0] == set()
    # The default: four runs per worker, so small plans keep one run per part.
    assert orch.group_ranges(orch.Plan(units, depends_on), graph, order, 2, None).units == units
