"""Plan and run `reverse-sd materialize`: named Dagster jobs, one run per (stage, partition), in parallel.

Planning walks the asset graph in topological stages (the assets that share a partitions definition
and come at the same depth run together, e.g. trained_models + model_predictions per model partition).
Each (stage, partition) becomes one run of the stage's named asset job (``stage_jobs``), so the UI lists
it under that job and can re-execute it; every run of one invocation carries the same
``reverse-sd/invocation`` tag, which the UI's run filter groups by.

``--stale`` keeps what is missing or stale, judged from the instance's own records through public APIs:
a partition is stale when it was never materialized, its artifact file is gone, its code version
changed, or a parent's data version moved on since it was built (and everything below a rebuilt
partition is rebuilt too).

Execution (``run_units``) keeps ``workers`` runs going at once on worker processes, each run after the
runs it reads from; the "gpu" pool admits one run per GPU, each pinned to its own device.  A failed run
stops only what depends on it.  Every run records its worker's pid, so the next invocation can tell a
run whose process was killed (-9, OOM) from a live one, mark it failed and free its pool slots.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import dagster as dg

from pipeline import storage

LAUNCHED_BY_TAG = "reverse-sd/launched-by"
INVOCATION_TAG = "reverse-sd/invocation"
PID_TAG = "reverse-sd/pid"
HOST_TAG = "reverse-sd/host"
DEVICE_TAG = "reverse-sd/device"
GPU_POOL = "gpu"
OBSERVE_JOBS = ("observe_diffusiondb_source", "observe_settings")
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
ACTIVE_STATUSES = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


# ---- named jobs ----------------------------------------------------------------------------------------


def stage_jobs(assets_defs: Sequence[dg.AssetsDefinition]) -> list[dg.UnresolvedAssetJobDefinition]:
    """One asset job per partitions definition, named after its first asset (materialize_trained_models) or
    materialize_unpartitioned: the jobs the CLI's runs belong to.

    A run materializes a subset of its job's assets (one stage), so a UI re-execution repeats exactly it.
    """
    groups: dict[str, tuple[dg.PartitionsDefinition | None, list[dg.AssetKey]]] = {}
    for assets_def in assets_defs:
        if not isinstance(assets_def, dg.AssetsDefinition) or not assets_def.is_materializable:
            continue
        partitions_def = assets_def.partitions_def
        existing = next((n for n, (p, _) in groups.items() if p == partitions_def), None)
        name = existing or (
            "materialize_unpartitioned"
            if partitions_def is None
            else f"materialize_{assets_def.key.to_python_identifier()}"
        )
        groups.setdefault(name, (partitions_def, []))[1].extend(assets_def.keys)
    return [
        dg.define_asset_job(
            name,
            selection=dg.AssetSelection.assets(*keys),
            description=f"Materializes {', '.join(k.to_user_string() for k in keys)} (used by `reverse-sd materialize`).",
        )
        for name, (partitions_def, keys) in groups.items()
    ]


# ---- planning ------------------------------------------------------------------------------------------


@dataclass
class Stage:
    asset_keys: list[dg.AssetKey]
    partitions_def: dg.PartitionsDefinition | None
    partition_keys: list[str | None] = field(default_factory=list)


@dataclass(frozen=True)
class Unit:
    """One run: the assets of a stage for one partition, as a run of the named job ``job``; or for a range
    of partitions (``partitions``, consecutive in the partitions definition's order) in one ranged run."""

    job: str
    asset_keys: tuple[dg.AssetKey, ...]
    partition_key: str | None
    gpu: bool
    partitions: tuple[str, ...] = ()  # a ranged run: every key from partition_key to the last, in order

    @property
    def partition_keys(self) -> tuple[str | None, ...]:
        return self.partitions or (self.partition_key,)

    @property
    def is_range(self) -> bool:
        return len(self.partitions) > 1

    @property
    def label(self) -> str:
        names = ",".join(k.to_user_string() for k in self.asset_keys)
        if self.is_range:
            return f"{names}[{self.partitions[0]}...{self.partitions[-1]}] ({len(self.partitions)} partitions)"
        return names + (f"[{self.partition_key}]" if self.partition_key is not None else "")

    def singles(self) -> list[Unit]:
        """The range as one unit per partition (to isolate the partition that made the ranged run fail)."""
        return [Unit(self.job, self.asset_keys, key, self.gpu) for key in self.partition_keys]


@dataclass
class Plan:
    units: list[Unit]
    depends_on: dict[int, set[int]]  # unit index -> indices of the units it reads from
    reasons: dict[int, str] = field(default_factory=dict)  # --stale: why a unit runs

    @property
    def stages(self) -> list[Stage]:
        """The units grouped back into stages (for printing)."""
        stages: dict[tuple, Stage] = {}
        for unit in self.units:
            stage = stages.setdefault((unit.job, unit.asset_keys), Stage(list(unit.asset_keys), None))
            stage.partition_keys.extend(unit.partition_keys)
        return list(stages.values())


def resolve_selection(asset_graph, selection: str | None) -> set[dg.AssetKey]:
    """A comma-separated list is a union, as `dagster asset materialize --select a,b` takes it."""
    materializable = set(asset_graph.materializable_asset_keys)
    if not selection:
        return materializable
    selected: set[dg.AssetKey] = set()
    for part in (p.strip() for p in selection.split(",")):
        if part:
            selected |= set(dg.AssetSelection.from_string(part).resolve(asset_graph))
    return selected & materializable


def _stages(asset_graph, selected: set[dg.AssetKey]) -> list[Stage]:
    ordered = [k for level in asset_graph.toposorted_asset_keys_by_level for k in sorted(level) if k in selected]
    stages: list[Stage] = []
    stage_of: dict[dg.AssetKey, int] = {}
    for key in ordered:
        # Join the earliest stage with the same partitions that comes at or after every parent's stage (one
        # run then materializes both, in dependency order), so trained_models and model_predictions share
        # a run per partition even when an unrelated asset sits between them in topological order.
        node = asset_graph.get(key)
        after = max((stage_of[p] for p in node.parent_keys if p in stage_of), default=-1)
        target = next(
            (i for i in range(max(after, 0), len(stages)) if stages[i].partitions_def == node.partitions_def), None
        )
        if target is None:
            stages.append(Stage([key], node.partitions_def))
            target = len(stages) - 1
        else:
            stages[target].asset_keys.append(key)
        stage_of[key] = target
    return stages


def plan_units(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    selection: str | None = None,
    stale_only: bool = False,
    extra_partitions: dict[str, Sequence[str]] | None = None,
    observed_now: dict[dg.AssetKey, dict[str | None, str]] | None = None,
    workers: int = 1,
    partitions_per_run: int | None = None,
) -> Plan:
    """The runs that materialize ``selection`` (default: every asset), in dependency order.

    Assets whose BackfillPolicy allows ranged runs (diffusiondb_parts) get one run per range of consecutive
    partitions, ``partitions_per_run`` each (default: enough runs to keep ``workers`` busy, four per worker,
    within the policy's limit), so Dagster's cost per run is paid once per range.

    ``extra_partitions`` (dynamic partitions definition name -> keys) counts keys as registered without
    writing them to the instance: a dry run plans the parts the source lists but the instance lacks.
    ``observed_now`` (source asset -> partition -> data version) counts versions as observed without
    recording them: a dry run sees changed settings.
    """
    asset_graph = defs.resolve_asset_graph()
    extra = {
        name: [k for k in keys if not instance.has_dynamic_partition(name, k)]
        for name, keys in (extra_partitions or {}).items()
    }
    jobs = {key: job for job in defs.jobs if job.name.startswith("materialize_") for key in _job_keys(job, asset_graph)}
    units: list[Unit] = []
    index: dict[tuple[dg.AssetKey, str | None], int] = {}
    order: dict[str, dict[str | None, int]] = {}  # job -> partition key -> its position in the definition
    with dg.partition_loading_context(dynamic_partitions_store=instance):
        for stage in _stages(asset_graph, resolve_selection(asset_graph, selection)):
            keys = (
                [
                    *stage.partitions_def.get_partition_keys(dynamic_partitions_store=instance),
                    *extra.get(_dynamic_name(stage.partitions_def), []),
                ]
                if stage.partitions_def
                else [None]
            )
            gpu = any(GPU_POOL in (asset_graph.get(k).pools or ()) for k in stage.asset_keys)
            job = jobs[stage.asset_keys[0]].name
            order.setdefault(job, {k: n for n, k in enumerate(keys)})
            for partition_key in keys:
                unit = Unit(job, tuple(stage.asset_keys), partition_key, gpu)
                for key in unit.asset_keys:
                    index[(key, partition_key)] = len(units)
                units.append(unit)
        depends_on: dict[int, set[int]] = {}
        # unit index -> asset key -> the (asset, partition) pairs that asset reads
        parents_of: dict[int, dict[dg.AssetKey, list[tuple[dg.AssetKey, str | None]]]] = {}
        unregistered = {k for keys in extra.values() for k in keys}
        for i, unit in enumerate(units):
            parents_of[i] = {}
            for key in unit.asset_keys:
                parents = parents_of[i].setdefault(key, [])
                if unit.partition_key in unregistered:
                    continue  # not in the instance yet (dry run): it reads only the source
                for parent in asset_graph.get_parents_partitions(key, unit.partition_key).parent_partitions:
                    parents.append((parent.asset_key, parent.partition_key))
                for parent_key in asset_graph.get(key).parent_keys:  # a dry run's new parts feed their children
                    if asset_graph.get(parent_key).partitions_def == asset_graph.get(key).partitions_def:
                        continue  # same partitions: each partition reads only its own (a new part feeds itself)
                    name = _dynamic_name(asset_graph.get(parent_key).partitions_def)
                    parents.extend((parent_key, k) for k in extra.get(name, []))
            every = [p for parents in parents_of[i].values() for p in parents]
            depends_on[i] = {index[p] for p in every if p in index and index[p] != i}
        plan = Plan(units, depends_on)
        if stale_only:
            plan = _keep_stale(plan, parents_of, _Records(instance, asset_graph, observed_now))
    return group_ranges(plan, asset_graph, order, workers, partitions_per_run)


def _range_limit(asset_graph, unit: Unit) -> int:
    """How many partitions one run of ``unit``'s assets may cover (1: no ranged runs)."""
    limits = []
    for key in unit.asset_keys:
        policy = asset_graph.get(key).backfill_policy
        if unit.partition_key is None or policy is None or policy.max_partitions_per_run == 1:
            return 1
        limits.append(policy.max_partitions_per_run or sys.maxsize)  # None: a single run for any range
    return min(limits)


def group_ranges(
    plan: Plan, asset_graph, order: dict[str, dict[str | None, int]], workers: int, partitions_per_run: int | None
) -> Plan:
    """Merge single-partition units of one stage into ranged runs of consecutive partitions.

    Only partitions next to each other in the partitions definition's order share a run (a range run
    materializes every partition between its ends), and never two that depend on each other.
    """
    if partitions_per_run is not None and partitions_per_run < 1:
        raise ValueError(f"partitions per run must be at least 1, got {partitions_per_run}")
    groups: dict[tuple, list[int]] = {}
    for i, unit in enumerate(plan.units):
        if not unit.is_range and _range_limit(asset_graph, unit) > 1:
            groups.setdefault((unit.job, unit.asset_keys), []).append(i)
    merged: dict[int, list[int]] = {}  # first member -> members
    for (job, _keys), members in groups.items():
        limit = _range_limit(asset_graph, plan.units[members[0]])
        size = partitions_per_run or -(-len(members) // (4 * max(workers, 1)))
        size = max(1, min(size, limit))
        if size == 1:
            continue
        positions = order.get(job, {})
        members = sorted(members, key=lambda m: positions.get(plan.units[m].partition_key, -1))
        run: list[int] = []
        for m in members:
            adjacent = run and positions.get(plan.units[m].partition_key) == (
                positions.get(plan.units[run[-1]].partition_key, -2) + 1
            )
            if run and (not adjacent or len(run) == size or plan.depends_on[m] & set(run)):
                merged[run[0]] = run
                run = []
            run.append(m)
        if run:
            merged[run[0]] = run
    if not any(len(run) > 1 for run in merged.values()):
        return plan
    member_of = {m: first for first, run in merged.items() for m in run}
    units: list[Unit] = []
    new_index: dict[int, int] = {}
    reasons: dict[int, str] = {}
    for i, unit in enumerate(plan.units):
        first = member_of.get(i, i)
        if first != i:
            new_index[i] = new_index[first]
            continue
        run = merged.get(i, [i])
        new_index[i] = len(units)
        if len(run) > 1:
            keys = tuple(plan.units[m].partition_key for m in run)
            unit = Unit(unit.job, unit.asset_keys, keys[0], unit.gpu, partitions=keys)
        if i in plan.reasons:
            reasons[len(units)] = plan.reasons[i]
        units.append(unit)
    depends_on: dict[int, set[int]] = {}
    for i in range(len(plan.units)):
        reads = {new_index[d] for d in plan.depends_on[i]} - {new_index[i]}
        depends_on.setdefault(new_index[i], set()).update(reads)
    return Plan(units, depends_on, reasons)


def _dynamic_name(partitions_def) -> str | None:
    return partitions_def.name if isinstance(partitions_def, dg.DynamicPartitionsDefinition) else None


def _job_keys(job, asset_graph) -> set[dg.AssetKey]:
    return set(job.selection.resolve(asset_graph))


# ---- staleness from the instance's records (public APIs only) -------------------------------------------


class _Records:
    """Every materialization / observation of an asset, per partition (newest first), fetched once per asset:
    (storage id, data version) pairs, and the latest event itself."""

    def __init__(self, instance: dg.DagsterInstance, asset_graph, observed_now=None):
        self.instance, self.graph = instance, asset_graph
        self.observed_now = observed_now or {}  # key -> partition -> version not recorded (dry run)
        self._history: dict[dg.AssetKey, dict[str | None, list[tuple[int, str | None]]]] = {}
        self._latest: dict[dg.AssetKey, dict[str | None, object]] = {}

    def _load(self, key: dg.AssetKey) -> None:
        fetch = (
            self.instance.fetch_materializations
            if self.graph.get(key).is_materializable
            else self.instance.fetch_observations
        )
        history: dict[str | None, list[tuple[int, str | None]]] = {}
        latest: dict[str | None, object] = {}
        cursor = None
        while True:
            result = fetch(dg.AssetRecordsFilter(asset_key=key), limit=1000, cursor=cursor, ascending=False)
            for record in result.records:
                event = _event(record)
                latest.setdefault(event.partition, record)
                history.setdefault(event.partition, []).append((record.storage_id, _data_version(record)))
            if not result.has_more:
                break
            cursor = result.cursor
        for partition, version in self.observed_now.get(key, {}).items():
            events = history.setdefault(partition, [])
            if not events or events[0][1] != version:
                events.insert(0, (sys.maxsize, version))  # as if observed now, after every recorded event
        self._history[key], self._latest[key] = history, latest

    def record(self, key: dg.AssetKey, partition: str | None):
        if key not in self._latest:
            self._load(key)
        return self._latest[key].get(partition)

    def history(self, key: dg.AssetKey, partition: str | None) -> list[tuple[int, str | None]]:
        if key not in self._history:
            self._load(key)
        return self._history[key].get(partition, [])


def _event(record):
    return record.asset_materialization or record.asset_observation


def _data_version(record) -> str | None:
    return None if record is None else _event(record).tags.get("dagster/data_version")


def _parent_changed(records: _Records, key: dg.AssetKey, partition: str | None, pointer: str | None) -> bool:
    """Whether a parent partition's data version moved on since the child read it.

    Dagster records, per parent, the newest parent event the child's run read (its input event pointer).
    The version the child saw is the parent's newest event at or before that pointer; compare it with the
    parent's latest (a re-observation or rematerialization with the same version is no change)."""
    history = records.history(key, partition)
    if not history:
        return False  # never built or observed: nothing newer to read
    latest_version = history[0][1]
    if pointer in (None, "NULL") or not str(pointer).isdigit():
        return True  # the child ran before this parent had any version
    seen = next((version for storage_id, version in history if storage_id <= int(pointer)), None)
    if seen is None:
        return True  # a partition that did not exist when the child ran (a new part)
    return latest_version != seen


def stale_reason(
    key: dg.AssetKey, partition: str | None, parents: Iterable[tuple[dg.AssetKey, str | None]], records: _Records
) -> str | None:
    """Why (key, partition) needs rebuilding, or None when it is fresh."""
    record = records.record(key, partition)
    if record is None:
        return "missing"
    event = _event(record)
    tags = event.tags
    current_code = records.graph.get(key).code_version
    if current_code is not None and tags.get("dagster/code_version") != current_code:
        return "code version changed"
    for entry in event.metadata.values():  # the artifacts it wrote (path metadata): gone, truncated or altered
        local = entry.value if isinstance(entry, dg.PathMetadataValue) else None
        if not isinstance(local, str) or "://" in local:
            continue
        if not os.path.exists(local):
            return f"artifact missing: {local}"
        if os.path.isfile(local) and not storage.is_intact(local):
            return f"artifact damaged: {local}"
    for parent_key, parent_partition in parents:
        pointer = tags.get(f"dagster/input_event_pointer/{parent_key.to_user_string()}")
        if _parent_changed(records, parent_key, parent_partition, pointer):
            label = parent_key.to_user_string() + (f"[{parent_partition}]" if parent_partition else "")
            return f"{label} changed"
    return None


def _keep_stale(plan: Plan, parents_of, records: _Records) -> Plan:
    """Keep the (asset, partition) pairs that are missing or stale, or that read a pair kept earlier; a unit
    shrinks to the assets it must rebuild (a damaged prompt_bank does not rebuild filtered_pairs).

    A pair downstream of one that will be rebuilt now is stale *after* the rebuild even if it looks fresh
    before it; partition mappings decide which downstream partitions that is (a new part -> the
    unpartitioned filtered_pairs; difficulty_scores[unet] -> trained_models[unet|*] only).
    """
    rebuilding: dict[tuple[dg.AssetKey, str | None], int] = {}  # pair -> index of its kept unit
    units: list[Unit] = []
    depends_on: dict[int, set[int]] = {}
    reasons: dict[int, str] = {}
    for i, unit in enumerate(plan.units):  # units, and the assets inside each, are in dependency order
        keys, reads, why = [], set(), None
        for key in unit.asset_keys:
            parents = parents_of[i][key]
            rebuilt = [p for p in parents if p in rebuilding]
            if rebuilt:
                reason = "reads " + rebuilt[0][0].to_user_string() + (f"[{rebuilt[0][1]}]" if rebuilt[0][1] else "")
            else:
                reason = stale_reason(key, unit.partition_key, parents, records)
                reason = reason and f"{key.to_user_string()}: {reason}"
            if reason:
                keys.append(key)
                reads |= {rebuilding[p] for p in rebuilt}
                why = why or reason
                rebuilding[(key, unit.partition_key)] = -1  # this unit; its index is set below
        if keys:
            index = len(units)
            for key in keys:
                rebuilding[(key, unit.partition_key)] = index
            gpu = any(GPU_POOL in (records.graph.get(k).pools or ()) for k in keys)
            units.append(Unit(unit.job, tuple(keys), unit.partition_key, gpu))
            depends_on[index] = {r for r in reads if r not in (-1, index)}
            reasons[index] = why
    return Plan(units, depends_on, reasons)


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
