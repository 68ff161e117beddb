"""Plan `reverse-sd materialize`: the runs that materialize a selection.

Planning walks the asset graph in topological stages (the assets that share a partitions definition
and come at the same depth run together, e.g. trained_models + model_predictions per model partition).
Each (stage, partition) becomes one run of the stage's named asset job (``stage_jobs``), so the UI lists
it under that job and can re-execute it; assets whose BackfillPolicy allows it (DiffusionDB parts) run
a range of consecutive partitions per run (``group_ranges``).  ``--stale`` keeps only what
``cli.staleness`` finds missing or stale.  The named jobs are ``assets.jobs``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import dagster as dg

from assets.jobs import GPU_POOL
from cli.plan import Plan, Stage, Unit
from cli.staleness import _keep_stale, _Records


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
    gone_partitions: Sequence[str] = (),
    storage_root: str | None = None,
) -> Plan:
    """The runs that materialize ``selection`` (default: every asset), in dependency order.

    Assets whose BackfillPolicy allows ranged runs (diffusiondb_parts) get one run per range of consecutive
    partitions, ``partitions_per_run`` each (default: ``default_range_size``, four runs per worker with ranges
    of at least four parts, within the policy's limit), so Dagster's cost per run is paid once per range.

    ``extra_partitions`` (dynamic partitions definition name -> keys) counts keys as registered without
    writing them to the instance: a dry run plans the parts the source lists but the instance lacks.
    ``observed_now`` (source asset -> partition -> data version) counts versions as observed without
    recording them: a dry run sees changed settings.  ``gone_partitions`` are left out as if unregistered
    (a dry run's parts that the source no longer lists).  ``storage_root``: where artifacts must be (default:
    the Definitions' storage resource's root).
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
            keys = [k for k in keys if k not in gone_partitions]
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
                    if parent.partition_key not in gone_partitions:
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
            root = storage_root or getattr((defs.resources or {}).get("storage"), "root", None)
            plan = _keep_stale(plan, parents_of, _Records(instance, asset_graph, observed_now, root))
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


# A run costs about 2 s before its first step (process start, code load), a sample part 0.1-0.5 s of work:
# ranges shorter than this only add runs.  (Measured on the sample: 4 parts on 2 workers took 8.6 s in four
# one-part runs, in two waves.)
MIN_PARTS_PER_RANGE = 4


def default_range_size(parts: int, workers: int) -> int:
    """Partitions per ranged run when --partitions-per-run is not given.

    Four runs per worker, so parts of uneven cost still spread evenly; but a range is at least
    MIN_PARTS_PER_RANGE parts long, or as long as one range per worker makes it when there are fewer: with
    equal parts, one range per worker finishes as soon as any split could, in the fewest runs."""
    workers = max(workers, 1)
    balanced = -(-parts // (4 * workers))
    one_per_worker = -(-parts // workers)
    return max(1, balanced, min(MIN_PARTS_PER_RANGE, one_per_worker))


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
    merged: dict[int, list[int]] = {}  # lowest unit index of a run -> its members, in partition order
    for (job, _keys), members in groups.items():
        limit = _range_limit(asset_graph, plan.units[members[0]])
        size = max(1, min(partitions_per_run or default_range_size(len(members), workers), limit))
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
                merged[min(run)] = run
                run = []
            run.append(m)
        if run:
            merged[min(run)] = run
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
    return Plan(units, depends_on, reasons, plan.blocked)


def _dynamic_name(partitions_def) -> str | None:
    return partitions_def.name if isinstance(partitions_def, dg.DynamicPartitionsDefinition) else None


def _job_keys(job, asset_graph) -> set[dg.AssetKey]:
    return set(job.selection.resolve(asset_graph))
