"""`reverse-sd materialize` at scale: the plan, submission to the instance as parents finish, and recovery.

The follow loop is tested with a fake instance; planning on the real Definitions; recovery with real
processes (the CLI, its Dagster services, run workers) killed by SIGKILL / stopped by SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest
from conftest import popen_cli, run_cli
from environments import sample_env

from assets.jobs import GPU_POOL, RANGE_END_TAG, RANGE_START_TAG
from cli import runs as orch
from cli.plan import Plan, Unit
from cli.planning import default_range_size, group_ranges, plan_units
from cli.processes import process_started_at
from pipeline import storage

PROJECT = Path(__file__).resolve().parents[2]


def _fake_plan(n: int, depends_on: dict[int, set[int]] | None = None, gpu: bool = True) -> Plan:
    units = [Unit("materialize_trained_models", (dg.AssetKey("trained_models"),), f"p{i}", gpu) for i in range(n)]
    return Plan(units, {i: set((depends_on or {}).get(i, ())) for i in range(n)})


class _FakeRuns:
    """Stands in for the instance (InstanceRuns): a submitted run finishes on the next poll, failing when its
    partition is in ``fail``; records what was submitted and how many of the invocation's runs were active."""

    def __init__(self, fail=frozenset()):
        self.fail, self.submitted, self.active, self.max_active, self.order = set(fail), [], {}, 0, []

    def submit(self, units, tags):
        ids = []
        for unit in units:
            run_id = f"run{len(self.submitted)}"
            self.submitted.append((unit, dict(tags)))
            self.active[run_id] = unit
            self.order.append(unit.partition_keys)
            ids.append(run_id)
        self.max_active = max(self.max_active, len(self.active))
        return ids

    def finished(self, run_ids):
        done = {r: not (set(self.active[r].partition_keys) & self.fail) for r in run_ids}
        for r in run_ids:
            self.active.pop(r)
        return done

    def failures(self, run_id):
        return ["boom"], "Traceback: boom"


def test_only_sources_whose_observation_would_record_something_new_are_observed():
    """A `--stale` with nothing changed submits no observe run (each one is a process of its own); a new or
    changed part, folder or settings version submits the one job that records it."""
    from assets.definitions import defs
    from assets.own_images import folders_partitions

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("diffusiondb_part", ["part-000001"])
        parts = {"part-000001": "sha-a"}
        assert orch.sources_to_observe(instance, parts, {}) == ["observe_diffusiondb_source", "observe_settings"]
        assert defs.resolve_job_def("observe_settings").execute_in_process(instance=instance).success
        instance.report_runless_asset_event(
            dg.AssetObservation("diffusiondb_source", partition="part-000001", tags={"dagster/data_version": "sha-a"})
        )
        assert orch.sources_to_observe(instance, parts, {}) == []
        assert orch.sources_to_observe(instance, {"part-000001": "sha-b"}, {}) == ["observe_diffusiondb_source"]
        instance.add_dynamic_partitions(folders_partitions.name, ["mine"])
        assert orch.sources_to_observe(instance, parts, {"mine": "v1"}) == ["observe_images_source"]


def test_gpu_runs_wait_for_the_pool_not_for_workers_so_a_few_more_are_kept_in_flight():
    runs = _FakeRuns()
    orch.run_plan(_fake_plan(10, gpu=True), runs, {}, max_active=3, poll_seconds=0)
    assert runs.max_active == 3 + orch.GPU_RUNS_AHEAD
    mixed = _fake_plan(10, gpu=True)
    mixed.units[5:] = [Unit(u.job, u.asset_keys, u.partition_key, False) for u in mixed.units[5:]]
    runs = _FakeRuns()
    orch.run_plan(mixed, runs, {}, max_active=2, poll_seconds=0)
    first = [unit.gpu for unit, _ in runs.submitted[:6]]  # all ready at once: 4 GPU runs, then 2 others
    assert first == [True, True, True, True, False, False]


def test_the_gpu_pool_gets_its_configured_default_before_any_run_and_an_operators_limit_is_kept(tmp_path):
    """On a fresh instance Dagster's queue writes a pool's default limit only while it looks at the first run
    that uses it, too late for that pass: the command writes it first.  A limit set by the operator stays."""
    (tmp_path / "dagster.yaml").write_text((PROJECT / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storage = instance.event_log_storage
        assert GPU_POOL not in storage.get_concurrency_keys()
        assert orch.apply_default_pool_limits(instance) == [GPU_POOL]
        assert GPU_POOL in storage.get_concurrency_keys()
        assert storage.get_concurrency_info(GPU_POOL).slot_count == instance.global_op_concurrency_default_limit == 1
        storage.set_concurrency_slots(GPU_POOL, 3)  # `dagster instance concurrency set gpu 3`
        assert orch.apply_default_pool_limits(instance) == []
        assert storage.get_concurrency_info(GPU_POOL).slot_count == 3


class _InstanceWithRuns:
    """What runs_whose_worker_is_gone reads of an instance: its launcher, its unfinished runs, and each run's
    engine event naming its worker pid (run id -> (pid, recorded at), or None before the worker started)."""

    def __init__(self, launcher, workers: dict[str, tuple[int, float] | None], storage=None):
        self.run_launcher, self.workers = launcher, workers
        self.run_storage = storage or type("SqliteRunStorage", (), {})()

    def get_runs(self, filters):
        assert set(filters.statuses) == {
            dg.DagsterRunStatus.STARTING,
            dg.DagsterRunStatus.STARTED,
            dg.DagsterRunStatus.CANCELING,
        }
        return [
            SimpleNamespace(
                run_id=run_id,
                job_name="materialize_difficulty_scores",
                asset_selection={dg.AssetKey("difficulty_scores")},
                tags={"dagster/partition": run_id},
            )
            for run_id in self.workers
        ]

    def all_logs(self, run_id, of_type):
        assert of_type == dg.DagsterEventType.ENGINE_EVENT
        if self.workers[run_id] is None:
            return []
        pid, since = self.workers[run_id]
        data = SimpleNamespace(metadata={"pid": dg.MetadataValue.text(str(pid))})
        return [SimpleNamespace(dagster_event=SimpleNamespace(event_specific_data=data), timestamp=since)]


def test_a_run_whose_worker_is_gone_or_replaced_by_a_reused_pid_is_found_and_a_live_one_is_not(capsys):
    """A power loss leaves runs STARTED that no process will ever finish; under the DefaultRunLauncher
    nothing in Dagster notices.  A live worker, or one not started yet, is left alone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    me, now = os.getpid(), time.time()
    workers = {
        "alive": (me, now),
        "gone": (dead.pid, now),
        "reused": (me, process_started_at(me) - 60),  # the pid now belongs to a process born after the run
        "starting": None,
    }
    lost = orch.runs_whose_worker_is_gone(_InstanceWithRuns(dg.DefaultRunLauncher(), workers))
    assert [(r.run_id, r.pid, r.label) for r in lost] == [
        ("gone", dead.pid, "difficulty_scores[gone]"),
        ("reused", me, "difficulty_scores[reused]"),
    ]
    # other launchers check their workers' health themselves (run monitoring), on other machines
    assert orch.runs_whose_worker_is_gone(_InstanceWithRuns(object(), workers)) == []
    # `make ui` names them before it serves the instance, with the two ways out
    orch.warn_of_lost_runs(_InstanceWithRuns(dg.DefaultRunLauncher(), {"gone": (dead.pid, now)}))
    warning = capsys.readouterr().err
    assert f"run gone (difficulty_scores[gone]) shows as running, but its worker (pid {dead.pid}) is gone" in warning
    assert "Terminate it in the UI" in warning and "reverse-sd materialize --stale" in warning
    # on a PostgreSQL instance, other machines' code servers launch runs too: their pids mean nothing here
    postgres = type("PostgresRunStorage", (), {})()
    assert orch.runs_whose_worker_is_gone(_InstanceWithRuns(dg.DefaultRunLauncher(), workers, postgres)) == []


def test_queued_gpu_runs_say_which_run_of_others_holds_the_pool():
    """A GPU run started from the UI (or a sensor) holds the pool: the command's heartbeat names it, so a
    wait of hours is explained; its own runs and runs of other pools are not named."""
    from cli.materialize import _pool_note

    def run(run_id, asset, invocation=None):
        tags = {"dagster/partition": "vit"} | ({orch.INVOCATION_TAG: invocation} if invocation else {})
        return SimpleNamespace(
            run_id=run_id, job_name="j", asset_selection={dg.AssetKey(asset)}, tags=tags, status=None
        )

    started = [
        run("ui-gpu-run", "difficulty_scores"),
        run("own-gpu-run", "difficulty_scores", invocation="me"),
        run("ui-cpu-run", "filtered_pairs"),
    ]
    instance = SimpleNamespace(get_runs=lambda filters: started)
    gpu_assets = {dg.AssetKey("difficulty_scores"), dg.AssetKey("trained_models")}
    assert orch.pool_holders(instance, "me", gpu_assets) == ["difficulty_scores[vit] (run ui-gpu-r)"]
    assert _pool_note(instance, "me", gpu_assets) == (
        f"; the {GPU_POOL} pool is held by difficulty_scores[vit] (run ui-gpu-r), not this command's"
    )
    assert _pool_note(SimpleNamespace(get_runs=lambda filters: started[1:]), "me", gpu_assets) == ""


def test_runs_are_submitted_with_the_invocation_and_partition_tags_and_at_most_max_active_at_once():
    runs = _FakeRuns()
    plan = _fake_plan(10, gpu=False)
    progress = orch.run_plan(plan, runs, {"reverse-sd/invocation": "abc"}, max_active=3, poll_seconds=0)
    assert len(progress.outcomes) == 10 and all(o.success for o in progress.outcomes)
    assert runs.max_active == 3
    unit, tags = runs.submitted[0]
    assert orch.run_tags(unit, tags) == {"reverse-sd/invocation": "abc", "dagster/partition": "p0"}
    ranged = Unit("materialize_diffusiondb_parts", (dg.AssetKey("diffusiondb_parts"),), "a", False, ("a", "b"))
    assert orch.run_tags(ranged, {}) == {RANGE_START_TAG: "a", RANGE_END_TAG: "b"}


def test_a_failure_stops_its_dependents_only():
    plan = _fake_plan(4, {2: {1}, 3: {2}})
    progress = orch.run_plan(plan, _FakeRuns(fail={"p1"}), {}, max_active=4, poll_seconds=0)
    assert sorted(o.unit.partition_key for o in progress.outcomes if o.success) == ["p0"]
    assert [o.failures for o in progress.outcomes if not o.success] == [["boom"]]
    assert sorted(u.partition_key for u in progress.not_run) == ["p2", "p3"]


def test_runs_are_submitted_only_after_what_they_read():
    runs = _FakeRuns()
    orch.run_plan(_fake_plan(3, {0: {2}, 1: {0}}), runs, {}, max_active=3, poll_seconds=0)
    assert runs.order == [("p2",), ("p0",), ("p1",)]


def test_a_failed_ranged_run_is_resubmitted_one_partition_per_run_and_its_readers_wait_for_all():
    unit = Unit("materialize_diffusiondb_parts", (dg.AssetKey("diffusiondb_parts"),), "a", False, ("a", "b", "c"))
    reader = Unit("materialize_unpartitioned", (dg.AssetKey("filtered_pairs"),), None, False)
    runs = _FakeRuns(fail={"b"})
    progress = orch.run_plan(Plan([unit, reader], {0: set(), 1: {0}}), runs, {}, max_active=4, poll_seconds=0)
    assert runs.order == [("a", "b", "c"), ("a",), ("b",), ("c",)]
    assert progress.outcomes[0].split_into == 3
    assert [u.label for u in progress.not_run] == ["filtered_pairs"]


def test_plan_is_runs_of_named_jobs_in_dependency_order_and_a_dry_plan_writes_nothing():
    from assets.data import parts_partitions
    from assets.definitions import defs

    instance = dg.DagsterInstance.ephemeral()
    parts = [f"part-{i:06d}" for i in range(1, 4)]
    plan = plan_units(defs, instance, extra_partitions={parts_partitions.name: parts}, partitions_per_run=1)
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
    # By default the three parts of a one-worker plan share one ranged run, which filtered_pairs waits for.
    ranged = plan_units(defs, instance, extra_partitions={parts_partitions.name: parts}, workers=1)
    assert ranged.units[0].partition_keys == tuple(parts) and ranged.units[1].job != ranged.units[0].job


# ---- recovery, with real processes -----------------------------------------------------------------------


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _cli(args, env) -> subprocess.Popen:
    return popen_cli(args, env, start_new_session=True)


def _started_run(dagster_home: Path, job: str):
    if not (dagster_home / "dagster.yaml").exists():
        return None
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    instance = dg.DagsterInstance.get()
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job, statuses=[dg.DagsterRunStatus.STARTED]))
    return runs[0] if runs else None


def _worker_pid(instance, run_id: str) -> int | None:
    """The run worker's pid, from Dagster's own "Started process for run (pid: N)." engine event."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        if entry.message and entry.message.startswith("Started process for run (pid: "):
            return int(entry.message.split("pid: ")[1].split(")")[0])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.extended
def test_kill_minus_nine_of_a_run_worker_or_the_cli_and_sigterm_then_stale_completes(tmp_path):
    """Runs go through the instance's queue and launcher.  kill -9 of a run worker inside a gpu step: the code
    server marks its run failed (one line from the CLI, exit 1), which gives its place in the gpu pool back,
    so the next --stale is not stuck behind it.  SIGTERM: the invocation's runs are terminated, exit 130
    within seconds.  kill -9 of the CLI: its Dagster services go with it; and when its run worker dies too (a
    power loss), the next --stale marks that lost run canceled instead of waiting behind it for ever.  The gpu
    pool limit is never changed."""
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
    gpu_run = lambda: _started_run(dagster_home, "materialize_difficulty_scores")  # noqa: E731
    try:
        # 1. kill -9 a run worker while its step holds the gpu slot
        proc = _cli(["materialize", *selection], env)
        # Only once the CLI has created the fresh instance's storage (it says so when it submits) may this
        # process open it: two processes creating it at once race ("alembic_version already exists").
        for line in iter(proc.stdout.readline, ""):
            if "submitted to the Dagster instance" in line:
                break
        run = _wait_for(gpu_run, 300, "a gpu run")
        instance = dg.DagsterInstance.get()
        limit_before = instance.event_log_storage.get_concurrency_info("gpu").slot_count
        in_step = lambda: instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)  # noqa: E731
        _wait_for(in_step, 120, "the gpu step")  # the run holds the pool (granularity: run) from its launch
        pid = _wait_for(lambda: _worker_pid(instance, run.run_id), 30, "the run worker's pid")
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        assert "Traceback" not in err
        failed = [line for line in err.splitlines() if line.startswith("failed: ")]
        assert len(failed) >= 1 and "difficulty_scores" in failed[0], err[-2000:]
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert _wait_for(lambda: not _alive(proc.pid), 5, "the CLI to exit")

        # 2. SIGTERM a --stale run during the gpu stage: its runs are terminated, exit 130 within seconds.  The
        # four difficulty tables are removed first, so that three of its gpu runs wait in the queue behind the
        # running one (a lone run of a few seconds may end before the signal reaches it).
        for table in (tmp_path / "data" / "difficulty_scores").glob("*.parquet"):
            table.unlink()
        proc = _cli(["materialize", "--stale", *selection], env)
        second = _wait_for(lambda: (r := gpu_run()) and r.run_id != run.run_id and r, 300, "the re-run's gpu run")
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - stopped_at < 20
        assert proc.returncode == 130, err[-2000:]
        assert "Traceback" not in err and "stopped:" in err
        invocation = instance.get_runs(
            filters=dg.RunsFilter(tags={orch.INVOCATION_TAG: second.tags[orch.INVOCATION_TAG]})
        )
        statuses = [r.status for r in invocation if r.job_name == "materialize_difficulty_scores"]
        assert len(statuses) == 4 and statuses.count(dg.DagsterRunStatus.CANCELED) >= 2, statuses
        assert set(statuses) <= {
            dg.DagsterRunStatus.CANCELED,
            dg.DagsterRunStatus.CANCELING,
            dg.DagsterRunStatus.SUCCESS,
        }

        # 3. kill -9 the CLI itself: the services it started are stopped by the kernel's parent-death signal.
        # Its run worker, held still meanwhile, is then killed too, as a power loss or a reboot would: the run
        # is left STARTED with no process behind it, holding the gpu pool.
        proc = _cli(["materialize", "--stale", *selection], env)
        third = _wait_for(
            lambda: (r := gpu_run()) and r.run_id not in (run.run_id, second.run_id) and r, 300, "a gpu run"
        )
        worker = _wait_for(lambda: _worker_pid(instance, third.run_id), 120, "the third gpu run's worker pid")
        os.kill(worker, signal.SIGSTOP)
        group = os.getpgid(worker)  # the services' group, which their code server and its run workers share
        children = subprocess.run(
            ["pgrep", "-P", str(proc.pid), "-f", "cli.dagster_services"], capture_output=True, text=True
        )
        dev_pids = [int(p) for p in children.stdout.split()]
        assert dev_pids, "the CLI started no Dagster services"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_for(lambda: not any(_alive(p) for p in dev_pids), 60, "its services to stop")
        # What is left of that process group (its code server, which waits for its run to end, and the worker)
        # goes down at once, as in a power loss: no process is left to record the run's end.
        assert group not in (os.getpgrp(), proc.pid)
        os.killpg(group, signal.SIGKILL)
        _wait_for(lambda: process_started_at(worker) is None, 10, "the run worker to die")
        assert instance.get_run_by_id(third.run_id).status in (
            dg.DagsterRunStatus.STARTING,
            dg.DagsterRunStatus.STARTED,
        )

        # 4. the next --stale finishes with no manual step: the lost run is marked canceled and says so, no slot
        # leaked, nothing left queued
        final = run_cli(["materialize", "--stale", *selection], env, timeout=900)
        assert final.returncode == 0, final.stderr[-3000:]
        assert "Traceback" not in final.stderr
        assert f"(run {third.run_id[:8]}, pid {worker})" in final.stdout, final.stdout[-2000:]
        assert instance.get_run_by_id(third.run_id).status == dg.DagsterRunStatus.CANCELED
        assert len(list((tmp_path / "data" / "difficulty_scores").glob("*.parquet"))) == 4
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == limit_before
        assert not instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
    finally:
        if old_home is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old_home


@pytest.mark.extended  # several CLI invocations, each with its own Dagster services
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
    lines = orch.failure_lines(result.all_events)
    assert lines == [f"filtered_pairs: OSError: [Errno 28] No space left on device: '{target}'"]


def _materializations(instance, key: str) -> dict[str, list]:
    by_part: dict[str, list] = {}
    for record in instance.fetch_materializations(dg.AssetKey(key), limit=1000).records:
        by_part.setdefault(record.asset_materialization.partition, []).append(record.asset_materialization)
    return by_part


@pytest.mark.extended  # several CLI invocations, each with its own Dagster services
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
    assert "materialized 2 runs" in result.stdout, result.stdout
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    instance = dg.DagsterInstance.get()
    runs = instance.get_runs()
    assert sorted(
        (r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG])
        for r in runs
        if r.job_name.startswith("materialize_diffusiondb")
    ) == [
        ("part-000001", "part-000003"),
        ("part-000004", "part-000006"),
    ]
    # Observed: the new parts and the settings; no image folder is set, so no observe run for it.
    assert _observe_runs(instance) == ["observe_diffusiondb_source", "observe_settings"]
    events = _materializations(instance, "diffusiondb_parts")
    assert sorted(events) == [f"part-{i:06d}" for i in range(1, 7)]
    for part, (event, *_) in events.items():  # each part its own figures, not its range's
        assert event.metadata["records"].value == 3
        assert event.metadata["source_sha256"].value == file_sha256(mirror / "images" / f"{part}.zip")
        assert part in event.metadata["path"].value

    # Each part's source version is observed on its own: a changed zip stales that part alone.
    dry = run_cli([*args, "--stale", "--dry-run"], env, timeout=300)
    assert "nothing to materialize" in dry.stdout, dry.stdout
    # With nothing changed, no run at all: an observe run would record nothing new.
    again = run_cli([*args, "--stale"], env, timeout=300)
    assert again.returncode == 0 and "nothing to materialize" in again.stdout, again.stdout + again.stderr[-2000:]
    assert len(instance.get_runs()) == len(runs)
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
    # Only the changed source is observed again; the settings did not change.
    assert _observe_runs(instance) == ["observe_diffusiondb_source", "observe_diffusiondb_source", "observe_settings"]
    observed = {
        r.asset_observation.partition
        for r in instance.fetch_observations(dg.AssetKey("diffusiondb_source"), limit=100).records
    }
    assert observed == {f"part-{i:06d}" for i in range(1, 7)}
    assert (tmp_path / "data" / "diffusiondb_parts" / "part-000006.parquet").exists()


def _observe_runs(instance: dg.DagsterInstance) -> list[str]:
    return sorted(r.job_name for r in instance.get_runs() if r.job_name.startswith("observe_"))


def test_ranges_join_only_adjacent_partitions_and_readers_wait_for_every_range():
    """Parts p0-p5 with p3 fresh, two per run: [p0,p1] [p2] [p4,p5] (a range never spans p3, which it would
    rebuild), and filtered_pairs reads all three runs; a stage without a BackfillPolicy is never merged."""
    from assets.definitions import defs

    graph = defs.resolve_asset_graph()
    parts_job = "materialize_diffusiondb_parts"
    keys = ["p0", "p1", "p2", "p4", "p5"]
    units = [Unit(parts_job, (dg.AssetKey("diffusiondb_parts"),), k, False) for k in keys]
    units.append(Unit("materialize_unpartitioned", (dg.AssetKey("filtered_pairs"),), None, False))
    units += [Unit("materialize_trained_models", (dg.AssetKey("trained_models"),), f"vit|{r}", True) for r in "ab"]
    depends_on = {i: set() for i in range(len(units))}
    depends_on[5] = {0, 1, 2, 3, 4}
    order = {parts_job: {f"p{i}": i for i in range(6)}}
    plan = group_ranges(Plan(units, depends_on), graph, order, workers=1, partitions_per_run=2)
    assert [u.partition_keys for u in plan.units] == [
        ("p0", "p1"),
        ("p2",),
        ("p4", "p5"),
        (None,),
        ("vit|a",),
        ("vit|b",),
    ]
    assert plan.depends_on[3] == {0, 1, 2} and plan.depends_on[0] == set()
    # The default on 2 workers: one range per worker (5 parts: 3, then 2 across the gap).
    by_default = group_ranges(Plan(units, depends_on), graph, order, 2, None)
    assert [u.partition_keys for u in by_default.units][:2] == [("p0", "p1", "p2"), ("p4", "p5")]


@pytest.mark.parametrize(
    ("parts", "workers", "size"),
    [
        (4, 2, 2),  # the sample: two ranges of two, both at once (not four runs in two waves)
        (2, 2, 1),  # one part per worker
        (1, 8, 1),
        (20, 16, 2),  # ten ranges on 16 workers finish as soon as twenty runs would
        (40, 2, 5),  # enough parts: four runs per worker
        (16, 2, 4),
        (2000, 16, 32),
        (0, 4, 1),
    ],
)
def test_default_range_size_is_four_runs_per_worker_but_never_needlessly_short(parts, workers, size):
    assert default_range_size(parts, workers) == size
