"""Run `reverse-sd materialize`'s plan (``assets.planning``): in parallel, recoverable, failures in one line.

Execution (``run_units``) keeps ``workers`` runs going at once on worker processes, each run after the
runs it reads from; the "gpu" pool admits one run per GPU, each pinned to its own device.  A failed run
stops only what depends on it; a failed ranged run is re-run one partition at a time.  Every run records
its worker's pid, so the next invocation can tell a run whose process was killed (-9, OOM) from a live
one, mark it failed and free its pool slots.  The runs of one invocation share the ``reverse-sd/invocation``
tag, which the UI's run filter groups by.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg

from assets.planning import (
    GPU_POOL,
    RANGE_END_TAG,
    RANGE_START_TAG,
    Plan,
    Stage,
    Unit,
    group_ranges,
    plan_units,
    resolve_selection,
    stage_jobs,
)
from assets.staleness import stale_reason

__all__ = [  # planning and staleness, re-exported: the CLI and tests use this module as the one entry point
    "GPU_POOL",
    "RANGE_END_TAG",
    "RANGE_START_TAG",
    "Plan",
    "Stage",
    "Unit",
    "group_ranges",
    "plan_units",
    "resolve_selection",
    "stage_jobs",
    "stale_reason",
]

LAUNCHED_BY_TAG = "reverse-sd/launched-by"
INVOCATION_TAG = "reverse-sd/invocation"
PID_TAG = "reverse-sd/pid"
HOST_TAG = "reverse-sd/host"
DEVICE_TAG = "reverse-sd/device"
OBSERVE_JOBS = ("observe_diffusiondb_source", "observe_settings")
ACTIVE_STATUSES = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


# ---- settings observation -------------------------------------------------------------------------------


def observe_sources(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    """Record the current data version of each source partition (every DiffusionDB part whose zip changed,
    each backbone's training_settings) as a run of the observe job, so that changed data or settings show up
    as stale before planning."""
    for name in OBSERVE_JOBS:
        result = defs.resolve_job_def(name).execute_in_process(
            instance=instance,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
            tags={LAUNCHED_BY_TAG: "cli"},
        )
        if not result.success:
            raise RuntimeError(f"{name} failed: " + "; ".join(failure_lines(result)))


# ---- recovery from killed runs --------------------------------------------------------------------------


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed the CLI's runs on this host whose worker process is gone (kill -9, OOM), and free the
    pool slots they held, so later runs never wait on a slot nobody will give back.  Returns their ids."""
    host = socket.gethostname()
    released = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=ACTIVE_STATUSES, tags={LAUNCHED_BY_TAG: "cli"})):
        pid = run.tags.get(PID_TAG)
        if run.tags.get(HOST_TAG) != host or not (pid or "").isdigit() or _process_alive(int(pid)):
            continue
        instance.report_run_failed(run, message=f"its process {pid} is gone (killed?); marked failed by reverse-sd")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        released.append(run.run_id)
    return released


def cancel_runs(instance: dg.DagsterInstance, invocation: str) -> list[str]:
    """Mark canceled the still-active runs of one invocation (after its workers were stopped) and free
    their pool slots."""
    canceled = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=ACTIVE_STATUSES, tags={INVOCATION_TAG: invocation})):
        instance.report_run_canceled(run, message="reverse-sd materialize was stopped")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        canceled.append(run.run_id)
    return canceled


def ensure_pool_limit(instance: dg.DagsterInstance, slots: int) -> None:
    """The "gpu" pool admits one step per GPU (at least one): raise its limit to ``slots`` when lower."""
    info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
    if (info.slot_count or 0) < slots:
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, slots)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ---- failures in one line -------------------------------------------------------------------------------


def root_cause(error) -> str:
    """The user's exception behind a Dagster SerializableErrorInfo, as 'ExceptionClass: message' (the first
    error in the cause chain that is not Dagster's own wrapper: its message names the file or errno)."""
    while (getattr(error, "cls_name", "") or "").startswith("Dagster") and getattr(error, "cause", None) is not None:
        error = error.cause
    message = (error.message or "").strip().splitlines()
    text = message[-1] if message else ""
    cls = getattr(error, "cls_name", None) or ""
    if f"{cls}: " in text:  # "polars.exceptions.ComputeError: msg" -> "msg"
        text = text.split(f"{cls}: ", 1)[1]
    if cls == "Failure":  # dagster.Failure carries a message meant for people as it is
        return text or "failed"
    return f"{cls}: {text}" if cls else (text or "failed (no message)")


def failure_lines(result) -> list[str]:
    """One line per failed step or failed blocking check of a finished run (a failed check is named once,
    with its scalar metadata, not again as the step failure it causes)."""
    lines = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error if event.step_failure_data else None
            cause = root_cause(error) if error else "failed"
            if not cause.startswith("DagsterAssetCheckFailedError"):
                lines.append(f"{event.step_key}: {cause}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            if not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR:
                facts = [
                    f"{name}={entry.value}"
                    for name, entry in evaluation.metadata.items()
                    if isinstance(entry.value, (int, float, str)) and len(str(entry.value)) < 80
                ]
                lines.append(f"check {evaluation.check_name} failed" + (f": {', '.join(facts)}" if facts else ""))
    if not lines and not result.success:
        run_failure = [e for e in result.all_events if e.event_type_value == "PIPELINE_FAILURE"]
        lines.append(run_failure[-1].message if run_failure else "run failed")
    return lines


# ---- execution ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    unit: Unit
    run_id: str | None
    success: bool
    failures: list[str] = field(default_factory=list)
    detail: str = ""  # full error text for the log file
    seconds: float = 0.0
    split_into: int = 0  # a failed ranged run, re-planned as this many single-partition runs


_WORKER_STATE: dict = {}


def _worker_init(log_level: str) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)
    from assets.definitions import defs

    _WORKER_STATE.update(defs=defs, instance=dg.DagsterInstance.get(), log_level=log_level)


def execute_unit(unit: Unit, device_index: int | None, tags: dict[str, str]) -> Outcome:
    """Run one unit as a run of its named job in this process (a worker), pinned to ``device_index``."""
    if not _WORKER_STATE:
        _worker_init("CRITICAL")
    defs, instance = _WORKER_STATE["defs"], _WORKER_STATE["instance"]
    run_tags = {**tags, PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    if device_index is not None:
        import torch

        torch.cuda.set_device(device_index)  # "auto" and "cuda" resolve to this device from here on
        run_tags[DEVICE_TAG] = f"cuda:{device_index}"
    if unit.is_range:  # Dagster's own tags for a ranged run (what a single-run backfill sets)
        run_tags[RANGE_START_TAG], run_tags[RANGE_END_TAG] = unit.partitions[0], unit.partitions[-1]
    started = time.perf_counter()
    try:
        result = defs.resolve_job_def(unit.job).execute_in_process(
            instance=instance,
            partition_key=None if unit.is_range else unit.partition_key,
            asset_selection=list(unit.asset_keys),
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": _WORKER_STATE["log_level"]}}}},
            tags=run_tags,
        )
    except Exception as exc:  # a run that could not even start (e.g. an unknown partition)
        return Outcome(
            unit, None, False, [f"{type(exc).__name__}: {exc}"], traceback.format_exc(), time.perf_counter() - started
        )
    lines = failure_lines(result) if not result.success else []
    detail = ""
    if not result.success:
        detail = "\n".join(
            "".join(e.step_failure_data.error.to_string()) if e.is_step_failure and e.step_failure_data else ""
            for e in result.all_events
        ).strip()
    return Outcome(unit, result.run_id, result.success, lines, detail, time.perf_counter() - started)


class _WorkerProcess:
    """One long-lived worker (spawned, so no forked torch or SQLite state) that runs units one at a time."""

    def __init__(self, ctx, log_level: str):
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(
            target=_worker_main, args=(self.tasks, self.results, log_level, os.getpid()), daemon=True
        )
        self.process.start()
        self.busy_with: tuple[int, Unit, int | None] | None = None


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the invoking process dies, even by kill -9, so no orphan
    keeps computing (its run is then released by the next invocation)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker_main(tasks, results, log_level: str, parent_pid: int) -> None:
    import signal

    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it stops workers with SIGTERM/SIGKILL
    _worker_init(log_level)
    results.put(("ready", os.getpid()))
    while True:
        task = tasks.get()
        if task is None:
            return
        index, unit, device_index, tags = task
        try:
            outcome = execute_unit(unit, device_index, tags)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, never lost
            outcome = Outcome(unit, None, False, [f"{type(exc).__name__}: {exc}"], traceback.format_exc())
        results.put((index, outcome))


@dataclass
class Progress:
    outcomes: list[Outcome] = field(default_factory=list)
    not_run: list[Unit] = field(default_factory=list)  # downstream of a failure


def run_units(
    plan: Plan,
    workers: int,
    gpu_slots: int,
    gpu_devices: bool,
    tags: dict[str, str],
    log_level: str = "CRITICAL",
    on_start: Callable[[Unit], None] | None = None,
    on_done: Callable[[Outcome], None] | None = None,
    launch: Callable | None = None,
    launcher=None,
) -> Progress:
    """Run ``plan`` with at most ``workers`` runs at once and at most ``gpu_slots`` of them in the gpu pool,
    each after the runs it depends on; a failed run stops only its dependents.

    A failed ranged run is re-planned as one run per partition (its ``Outcome.split_into`` says how many),
    so one bad part fails alone and the good parts of its range still materialize.

    ``gpu_devices``: give each gpu run its own device index (0 .. gpu_slots-1).  ``launch`` replaces the
    worker processes (tests): a function (unit, device_index, tags) -> Outcome run in a thread pool.
    """
    progress = Progress()
    plan = Plan(list(plan.units), {i: set(d) for i, d in plan.depends_on.items()}, dict(plan.reasons))
    pending = set(range(len(plan.units)))
    running: dict[int, int | None] = {}  # unit index -> device index
    succeeded: set[int] = set()
    blocked: set[int] = set()
    free_devices = list(range(gpu_slots))
    if launcher is not None:  # prestarted_launcher(): workers already imported and waiting
        pool = launcher
    elif launch:
        pool = _ThreadLauncher(launch, workers)
    elif workers == 1 or len(plan.units) == 1:  # nothing to overlap: skip spawning (and importing) a worker
        pool = _InlineLauncher(log_level)
    else:
        pool = _ProcessLauncher(workers, log_level)
    try:
        while pending or running:
            # Anything that reads from a failed or blocked unit never runs.
            for i in sorted(pending):
                if plan.depends_on[i] & blocked:
                    pending.discard(i)
                    blocked.add(i)
                    progress.not_run.append(plan.units[i])
            gpu_running = sum(1 for i in running if plan.units[i].gpu)
            for i in sorted(pending):
                if len(running) >= workers:
                    break
                unit = plan.units[i]
                if not plan.depends_on[i] <= succeeded:
                    continue
                if unit.gpu and gpu_running >= gpu_slots:
                    continue
                device = free_devices.pop(0) if unit.gpu else None
                gpu_running += unit.gpu
                pending.discard(i)
                running[i] = device
                if on_start:
                    on_start(unit)
                pool.submit(i, unit, device if gpu_devices else None, tags)
            if not running:
                break
            i, outcome = pool.next_result()
            device = running.pop(i)
            if device is not None:
                free_devices.append(device)
                free_devices.sort()
            if not outcome.success and plan.units[i].is_range:
                singles = _split(plan, i)
                pending.update(singles)
                outcome.split_into = len(singles)
            else:
                (succeeded if outcome.success else blocked).add(i)
            progress.outcomes.append(outcome)
            if on_done:
                on_done(outcome)
    finally:
        pool.close()
    return progress


def _split(plan: Plan, i: int) -> list[int]:
    """Replace ranged unit ``i`` by one unit per partition, in place: each reads what the range read, and
    whatever read the range reads all of them.  Returns the new units' indices."""
    singles = []
    for unit in plan.units[i].singles():
        plan.depends_on[len(plan.units)] = set(plan.depends_on[i])
        if i in plan.reasons:
            plan.reasons[len(plan.units)] = plan.reasons[i]
        singles.append(len(plan.units))
        plan.units.append(unit)
    for reads in plan.depends_on.values():
        if i in reads:
            reads.discard(i)
            reads.update(singles)
    return singles


class _ProcessLauncher:
    def __init__(self, workers: int, log_level: str):
        import multiprocessing

        self.ctx = multiprocessing.get_context("spawn")
        self.workers_max, self.log_level = workers, log_level
        self.workers: list[_WorkerProcess] = []

    def submit(self, index: int, unit: Unit, device: int | None, tags: dict[str, str]) -> None:
        worker = next((w for w in self.workers if w.busy_with is None), None)
        if worker is None:
            worker = _WorkerProcess(self.ctx, self.log_level)
            self.workers.append(worker)
        worker.busy_with = (index, unit, device)
        worker.tasks.put((index, unit, device, tags))

    def next_result(self) -> tuple[int, Outcome]:
        import queue

        while True:
            for worker in self.workers:
                if worker.busy_with is None:
                    continue
                try:
                    index, outcome = worker.results.get(timeout=0.05)
                    if index == "ready":
                        continue
                except queue.Empty:
                    if not worker.process.is_alive():  # killed (OOM, -9): its run is reported failed
                        index, unit, _ = worker.busy_with
                        code = worker.process.exitcode
                        self.workers.remove(worker)
                        worker.busy_with = None
                        return index, Outcome(unit, None, False, [f"worker process died (exit code {code})"])
                    continue
                worker.busy_with = None
                return index, outcome

    def prestart(self, n: int) -> None:
        """Start ``n`` workers and wait until each has imported the definitions."""
        fresh = [_WorkerProcess(self.ctx, self.log_level) for _ in range(n - len(self.workers))]
        for worker in fresh:
            message = worker.results.get(timeout=600)
            assert message[0] == "ready", message
        self.workers.extend(fresh)

    def close(self) -> None:
        for worker in self.workers:
            if worker.busy_with is None and worker.process.is_alive():
                worker.tasks.put(None)
        deadline = time.monotonic() + 5
        for worker in self.workers:
            if worker.busy_with is not None:
                worker.process.kill()  # stopped mid-run: its run is marked canceled by the caller
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=1)


def prestarted_launcher(workers: int, log_level: str = "CRITICAL") -> _ProcessLauncher:
    """Worker processes started and ready before any run (benchmarks time the runs, not the imports)."""
    launcher = _ProcessLauncher(workers, log_level)
    launcher.prestart(workers)
    return launcher


class _InlineLauncher:
    """Runs each unit in this process, one at a time (one worker, or a one-run plan)."""

    def __init__(self, log_level: str):
        self.log_level = log_level
        self.queued: list = []

    def submit(self, index, unit, device, tags) -> None:
        self.queued.append((index, unit, device, tags))

    def next_result(self):
        if not _WORKER_STATE:
            _worker_init(self.log_level)
        index, unit, device, tags = self.queued.pop(0)
        return index, execute_unit(unit, device, tags)

    def close(self) -> None:
        self.queued.clear()


class _ThreadLauncher:
    """Runs ``launch`` in threads instead of worker processes (tests of the scheduling itself)."""

    def __init__(self, launch: Callable, workers: int):
        import queue
        from concurrent.futures import ThreadPoolExecutor

        self.launch, self.results = launch, queue.Queue()
        self.executor = ThreadPoolExecutor(max_workers=workers)

    def submit(self, index, unit, device, tags) -> None:
        def run():
            try:
                outcome = self.launch(unit, device, tags)
            except Exception as exc:  # noqa: BLE001
                outcome = Outcome(unit, None, False, [f"{type(exc).__name__}: {exc}"])
            self.results.put((index, outcome))

        self.executor.submit(run)

    def next_result(self):
        return self.results.get()

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def new_invocation_tags() -> dict[str, str]:
    return {LAUNCHED_BY_TAG: "cli", INVOCATION_TAG: uuid.uuid4().hex[:12]}
