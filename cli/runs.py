"""Hand `reverse-sd materialize`'s plan (``cli.planning``) to the Dagster instance, and follow it.

Every run is submitted through the webserver's GraphQL API (``launchMultipleRuns``), so it goes through the
instance's run coordinator (the queue in dagster.yaml, its ``max_concurrent_runs``) and its run launcher
(a subprocess per run on one machine; Celery or Kubernetes when dagster.yaml says so).  The "gpu" pool is
Dagster's (``concurrency.pools`` in dagster.yaml, or ``dagster instance concurrency set gpu N``); a
run that uses it waits in the queue (``granularity: run``), and one whose worker dies is marked failed by the
code server that launched it, which gives its place in the pool back; one whose worker died with that code
server (a power loss) is found at the next start (``runs_whose_worker_is_gone``) and canceled.

The CLI only decides *which* runs and *when*: a unit is submitted once every unit it reads from
succeeded, a failure stops only what depends on it, and a failed ranged run is re-submitted one partition
at a time, so one bad part fails alone.  All runs of one invocation share the ``reverse-sd/invocation``
tag (the UI's run filter groups by it).
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import dagster as dg

from assets.jobs import GPU_POOL, RANGE_END_TAG, RANGE_START_TAG
from cli.dagster_server import LOCATION_NAME, REPOSITORY_NAME, ServerError, graphql
from cli.plan import Plan, Unit
from cli.processes import process_started_at

LAUNCHED_BY_TAG = "reverse-sd/launched-by"
INVOCATION_TAG = "reverse-sd/invocation"
PARTITION_TAG = "dagster/partition"
OBSERVE_JOBS = ("observe_diffusiondb_source", "observe_images_source", "observe_settings")
FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
# Launched and not ended: what holds a place in a pool (``granularity: run``) and has a worker, or had one.
LAUNCHED_NOT_ENDED = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


STORAGE_TAG = "reverse-sd/storage"


def new_invocation_tags(storage_root: str, invocation: str | None = None) -> dict[str, str]:
    invocation = invocation or uuid.uuid4().hex[:12]
    return {LAUNCHED_BY_TAG: "cli", INVOCATION_TAG: invocation, STORAGE_TAG: storage_root}


def active_runs(instance: dg.DagsterInstance, invocation: str) -> list[str]:
    """The invocation's runs that have not finished (queued, starting or running)."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={INVOCATION_TAG: invocation}))
    return [r.run_id for r in runs if r.status not in FINISHED]


def orphaned_queued_runs(instance: dg.DagsterInstance, storage_root: str) -> list[str]:
    """Queued runs that an earlier `materialize` on this storage root submitted and can no longer follow (it
    was killed): the caller holds the root's lock, so no live invocation owns them.  Their work is planned
    again (or found fresh) by this invocation, so they are canceled rather than left to run twice."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED],
            tags={LAUNCHED_BY_TAG: "cli", STORAGE_TAG: storage_root},
        )
    )
    return [r.run_id for r in runs]


@dataclass(frozen=True)
class LostRun:
    run_id: str
    label: str  # what it materializes, e.g. "difficulty_scores[vit]"
    pid: int  # its run worker, as Dagster recorded it


def runs_whose_worker_is_gone(instance: dg.DagsterInstance) -> list[LostRun]:
    """Runs the instance still shows as starting, running or canceling whose run worker process is gone: a
    power loss, a reboot or a kill of the whole process tree.  Such a run never ends by itself, and one that
    uses the gpu pool holds it for good (``granularity: run``), so every later GPU run would wait forever.

    Only for the DefaultRunLauncher, whose runs are subprocesses of a code server, on an instance in SQLite,
    which only this machine writes: so every run worker it records ran here.  The DefaultRunLauncher has no run
    worker health check, so Dagster's run monitoring only times out runs that never started.  (The Celery and
    Kubernetes launchers have one; on a PostgreSQL instance other machines launch runs too, and a pid of theirs
    means nothing here.)  The worker's pid is Dagster's own record ("Started process for run (pid: N)"); a live
    process with that pid that started after the run did is another process (pids are reused): gone."""
    if not isinstance(instance.run_launcher, dg.DefaultRunLauncher) or not _on_sqlite(instance):
        return []
    lost = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=LAUNCHED_NOT_ENDED)):
        worker = _run_worker(instance, run.run_id)
        if worker is None:  # not started yet: run monitoring's start timeout covers it
            continue
        pid, since = worker
        started = process_started_at(pid)
        # A reused pid belongs to a process born after the run's worker: after a reboot, at least the boot's time
        # later.  The 30 s allow for the wall clock being stepped forward meanwhile (NTP), which shifts /proc's
        # start times, so that a live worker is never taken for gone.
        if started is None or started > since + 30:
            lost.append(LostRun(run.run_id, _run_label(run), pid))
    return lost


def warn_of_lost_runs(instance: dg.DagsterInstance) -> list[LostRun]:
    """Before `make ui` serves the instance: name each lost run (``runs_whose_worker_is_gone``) and how to end
    it, since the UI shows it as running for ever and its pool's runs wait behind it."""
    lost = runs_whose_worker_is_gone(instance)
    for run in lost:
        print(
            f"warning: run {run.run_id[:8]} ({run.label}) shows as running, but its worker (pid {run.pid}) is gone; "
            "until it ends, runs of its pool wait: Terminate it in the UI (Runs, the run), or run "
            "`reverse-sd materialize --stale`, which cancels it and rebuilds what it was building",
            file=sys.stderr,
        )
    return lost


def pool_holders(instance: dg.DagsterInstance, invocation: str, pool_assets: set[dg.AssetKey]) -> list[str]:
    """The runs of others (the UI, a sensor, another command) now starting or running that materialize an
    asset of the pool, as "label (run id)": what this invocation's queued runs of that pool wait for."""
    return [
        f"{_run_label(run)} (run {run.run_id[:8]})"
        for run in instance.get_runs(filters=dg.RunsFilter(statuses=LAUNCHED_NOT_ENDED))
        if run.tags.get(INVOCATION_TAG) != invocation and set(run.asset_selection or ()) & pool_assets
    ]


def _on_sqlite(instance: dg.DagsterInstance) -> bool:
    """Whether the instance keeps its runs in SQLite files under DAGSTER_HOME (Dagster's default storage; its
    classes are not exported, hence the name)."""
    return type(instance.run_storage).__name__.startswith("Sqlite")


def _run_worker(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, when it was recorded) of the run's worker, from its first engine event that names a pid."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.event_specific_data if entry.dagster_event else None
        pid = getattr(data, "metadata", {}).get("pid") if data is not None else None
        if pid is not None and str(pid.value).isdigit() and int(pid.value) > 0:
            return int(pid.value), entry.timestamp
    return None


def _run_label(run: dg.DagsterRun) -> str:
    assets = ",".join(sorted(k.to_user_string() for k in run.asset_selection or ())) or run.job_name
    partition = run.tags.get(PARTITION_TAG) or (
        f"{run.tags[RANGE_START_TAG]}..{run.tags[RANGE_END_TAG]}" if RANGE_START_TAG in run.tags else None
    )
    return f"{assets}[{partition}]" if partition else assets


def apply_default_pool_limits(instance: dg.DagsterInstance, pools=(GPU_POOL,)) -> list[str]:
    """Give each of ``pools`` that has no limit row yet the instance's configured ``default_limit``, before any
    run that uses it is queued; returns the pools initialized.

    Dagster writes this row itself, but only in the queue's first pass over a run that uses the pool, and that
    pass has already read the (empty) list of limited pools: on a fresh instance every run queued at that
    moment is dequeued unchecked (measured: the four difficulty_scores runs started together with a limit of
    1).  Writing the configured default first is what Dagster would write; a limit an operator set (dagster.yaml
    or `dagster instance concurrency set`) is never touched."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits or instance.global_op_concurrency_default_limit is None:
        return []
    limited = set(storage.get_concurrency_keys())
    initialized = [pool for pool in pools if pool not in limited]
    for pool in initialized:
        storage.initialize_concurrency_limit_to_default(pool)
    return initialized


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


def failure_lines(events: Iterable, success: bool = False) -> list[str]:
    """One line per failed step or failed blocking check among a finished run's Dagster events (a failed
    check is named once, with its scalar metadata, not again as the step failure it causes)."""
    events = [e for e in events if e is not None]
    lines = []
    for event in events:
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
    if not lines and not success:
        run_failure = [e for e in events if e.event_type_value in ("PIPELINE_FAILURE", "PIPELINE_CANCELED")]
        lines.append(run_failure[-1].message if run_failure else "run failed")
    return lines


def run_failure_lines(instance: dg.DagsterInstance, run_id: str) -> tuple[list[str], str]:
    """(one line per failure, the full error text for the log file) of a finished run, from its event log."""
    events = [entry.dagster_event for entry in instance.all_logs(run_id)]
    lines = failure_lines(events)
    detail = "\n".join(
        "".join(e.step_failure_data.error.to_string())
        for e in events
        if e is not None and e.is_step_failure and e.step_failure_data and e.step_failure_data.error
    ).strip()
    return lines, detail


# ---- submission through the webserver -------------------------------------------------------------------

_LAUNCH = """mutation($params: [ExecutionParams!]!) { launchMultipleRuns(executionParamsList: $params) {
  __typename
  ... on LaunchMultipleRunsResult { launchMultipleRunsResult {
    __typename ... on LaunchRunSuccess { run { runId } } ... on Error { message } } }
  ... on PythonError { message } } }"""
_TERMINATE = """mutation($ids: [String!]!) { terminateRuns(runIds: $ids) { __typename } }"""
# The UI's "force termination": marks the runs canceled without asking a run worker (there is none left to ask).
_FORCE_CANCEL = """mutation($ids: [String!]!) {
  terminateRuns(runIds: $ids, terminatePolicy: MARK_AS_CANCELED_IMMEDIATELY) { __typename } }"""


def run_tags(unit: Unit, tags: dict[str, str]) -> dict[str, str]:
    """A unit's run tags: the invocation's, plus Dagster's own partition (or partition range) tags."""
    out = dict(tags)
    if unit.is_range:
        out[RANGE_START_TAG], out[RANGE_END_TAG] = unit.partitions[0], unit.partitions[-1]
    elif unit.partition_key is not None:
        out[PARTITION_TAG] = unit.partition_key
    return out


class InstanceRuns:
    """Submits units as runs of their named jobs (GraphQL ``launchMultipleRuns``) and reports finished ones
    from the instance's run storage."""

    def __init__(self, url: str, instance: dg.DagsterInstance):
        self.url, self.instance = url, instance

    def submit(self, units: list[Unit], tags: dict[str, str]) -> list[str]:
        params = [
            {
                "selector": {
                    "repositoryLocationName": LOCATION_NAME,
                    "repositoryName": REPOSITORY_NAME,
                    "jobName": unit.job,
                    **({"assetSelection": [{"path": k.path} for k in unit.asset_keys]} if unit.asset_keys else {}),
                },
                "runConfigData": {},
                "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in run_tags(unit, tags).items()]},
            }
            for unit in units
        ]
        result = graphql(self.url, _LAUNCH, {"params": params}, timeout=120)["launchMultipleRuns"]
        if result["__typename"] != "LaunchMultipleRunsResult":
            raise ServerError(f"launching {len(units)} run(s) failed: {result.get('message')}")
        ids = []
        for unit, launched in zip(units, result["launchMultipleRunsResult"]):
            if launched["__typename"] != "LaunchRunSuccess":
                raise ServerError(f"launching {unit.label} failed: {launched.get('message') or launched['__typename']}")
            ids.append(launched["run"]["runId"])
        return ids

    def finished(self, run_ids: list[str]) -> dict[str, bool]:
        """run id -> success, for the given runs that have finished."""
        if not run_ids:
            return {}
        runs = self.instance.get_runs(filters=dg.RunsFilter(run_ids=run_ids))
        return {r.run_id: r.status == dg.DagsterRunStatus.SUCCESS for r in runs if r.status in FINISHED}

    def statuses(self, run_ids: list[str]) -> dict[str, dg.DagsterRunStatus]:
        if not run_ids:
            return {}
        return {r.run_id: r.status for r in self.instance.get_runs(filters=dg.RunsFilter(run_ids=run_ids))}

    def failures(self, run_id: str) -> tuple[list[str], str]:
        return run_failure_lines(self.instance, run_id)

    def terminate(self, run_ids: list[str]) -> None:
        if run_ids:
            graphql(self.url, _TERMINATE, {"ids": run_ids}, timeout=30)

    def force_cancel(self, run_ids: list[str]) -> None:
        if run_ids:
            graphql(self.url, _FORCE_CANCEL, {"ids": run_ids}, timeout=30)


def sources_to_observe(
    instance: dg.DagsterInstance, listed_parts: Mapping[str, str], folders: Mapping[str, str]
) -> list[str]:
    """The observe jobs whose run would record a version the instance does not hold yet: a new or changed
    DiffusionDB part (``listed_parts``: part -> version) or image folder (``folders``), or a backbone's changed
    training settings.  The others are not submitted: they would record nothing, and each is a run (a process,
    3-4 s here), which made most of a `--stale` that finds nothing to do."""
    from assets.data import changed_part_versions
    from assets.own_images import changed_folder_versions
    from assets.training import changed_settings_versions

    changed = {
        "observe_diffusiondb_source": bool(changed_part_versions(instance, listed_parts)),
        "observe_images_source": bool(changed_folder_versions(instance, folders)),
        "observe_settings": bool(changed_settings_versions(instance)),
    }
    return [job for job in OBSERVE_JOBS if changed[job]]


def observe_sources(
    runs: InstanceRuns, tags: dict[str, str], jobs: Sequence[str] = OBSERVE_JOBS, timeout: float = 600
) -> None:
    """Record the current data version of each source partition (every DiffusionDB part whose zip changed,
    each backbone's training_settings) with a run of each of the observe ``jobs``, so that changed data or
    settings show up as stale before planning."""
    units = [Unit(name, (), None, False) for name in jobs]
    if not units:
        return
    ids = runs.submit(units, tags)
    deadline = time.monotonic() + timeout
    while True:
        done = runs.finished(ids)
        if len(done) == len(ids):
            break
        if time.monotonic() > deadline:
            raise ServerError(f"observing the sources took over {timeout:.0f} s")
        time.sleep(0.3)
    for unit, run_id in zip(units, ids):
        if not done[run_id]:
            lines, _ = runs.failures(run_id)
            raise RuntimeError(f"{unit.job} failed: " + "; ".join(lines))


# ---- following a plan -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    unit: Unit
    run_id: str | None
    success: bool
    failures: list[str] = field(default_factory=list)
    detail: str = ""  # full error text for the log file
    seconds: float = 0.0
    split_into: int = 0  # a failed ranged run, re-planned as this many single-partition runs


@dataclass
class Progress:
    outcomes: list[Outcome] = field(default_factory=list)
    not_run: list[Unit] = field(default_factory=list)  # downstream of a failure
    active: dict[str, int] = field(default_factory=dict)  # run id -> unit index, submitted and not finished


def run_plan(
    plan: Plan,
    runs,
    tags: dict[str, str],
    max_active: int,
    on_submit: Callable[[Unit, str], None] | None = None,
    on_done: Callable[[Outcome], None] | None = None,
    on_tick: Callable[[Progress], None] | None = None,
    poll_seconds: float = 0.5,
    progress: Progress | None = None,
) -> Progress:
    """Submit each unit of ``plan`` once every unit it reads from succeeded, keep at most ``max_active`` of
    this invocation's runs queued or running (a few more for GPU runs: ``_admit``), and follow them until all
    finished.

    ``runs`` submits and reports (``InstanceRuns``; tests pass a fake).  A failed unit stops only its
    dependents; a failed ranged run is re-submitted one partition per run (``Outcome.split_into``).
    ``progress`` (filled as it goes) lets a caller that is interrupted see what is still active.
    """
    progress = progress if progress is not None else Progress()
    plan = Plan(list(plan.units), {i: set(d) for i, d in plan.depends_on.items()}, dict(plan.reasons))
    pending = set(range(len(plan.units)))
    started: dict[str, float] = {}
    succeeded: set[int] = set()
    blocked: set[int] = set()
    while pending or progress.active:
        for i in sorted(pending):  # anything that reads from a failed or blocked unit never runs
            if plan.depends_on[i] & blocked:
                pending.discard(i)
                blocked.add(i)
                progress.not_run.append(plan.units[i])
        ready = _admit(plan, [i for i in sorted(pending) if plan.depends_on[i] <= succeeded], progress, max_active)
        if ready:
            ids = runs.submit([plan.units[i] for i in ready], tags)
            for i, run_id in zip(ready, ids):
                pending.discard(i)
                progress.active[run_id] = i
                started[run_id] = time.perf_counter()
                if on_submit:
                    on_submit(plan.units[i], run_id)
        if not progress.active:
            break
        for run_id, success in runs.finished(list(progress.active)).items():
            i = progress.active.pop(run_id)
            lines, detail = ([], "") if success else runs.failures(run_id)
            outcome = Outcome(plan.units[i], run_id, success, lines, detail, time.perf_counter() - started[run_id])
            if not success and plan.units[i].is_range:
                singles = _split(plan, i)
                pending.update(singles)
                outcome.split_into = len(singles)
            else:
                (succeeded if success else blocked).add(i)
            progress.outcomes.append(outcome)
            if on_done:
                on_done(outcome)
        if on_tick:
            on_tick(progress)
        if progress.active:
            time.sleep(poll_seconds)
    return progress


GPU_RUNS_AHEAD = 2  # GPU runs in flight beyond --workers: queued, so one is dequeued the moment the slot frees


def _admit(plan: Plan, ready: list[int], progress: Progress, max_active: int) -> list[int]:
    """The ready units to submit now: at most ``max_active`` runs in flight that use no GPU, and GPU runs up to
    ``max_active + GPU_RUNS_AHEAD``.  GPU runs wait in the queue for the instance's "gpu" pool, not for a
    core, so the next one is already queued when the slot frees rather than submitted once a whole earlier
    run has ended and the command has seen it."""
    active = [plan.units[i] for i in progress.active.values()]
    room = {
        False: max_active - sum(not u.gpu for u in active),
        True: max_active + GPU_RUNS_AHEAD - sum(u.gpu for u in active),
    }
    admitted = []
    for i in ready:
        if room[plan.units[i].gpu] > 0:
            room[plan.units[i].gpu] -= 1
            admitted.append(i)
    return admitted


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


def stop_runs(runs, run_ids: list[str], timeout: float = 8) -> list[str]:
    """Terminate the given runs (queued ones are canceled at once) and wait up to ``timeout`` seconds for
    them to finish; returns those still not finished."""
    if not run_ids:
        return []
    runs.terminate(run_ids)
    deadline = time.monotonic() + timeout
    left = list(run_ids)
    while left and time.monotonic() < deadline:
        time.sleep(0.3)
        left = [r for r, s in runs.statuses(left).items() if s not in FINISHED]
    return left
