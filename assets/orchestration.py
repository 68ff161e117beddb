"""Materialize an asset selection in the configured instance, partition by partition, in graph order.

`dagster asset materialize` runs one partition (or one range) per call; the graph mixes per-part, per-
backbone and unpartitioned assets, so this walks it in topological stages: each stage is a run of the
assets that share a partitions definition, once per partition key.  Every run is recorded in the
instance, so the UI shows exactly what the CLI did, and --stale keeps only missing or stale partitions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus


@dataclass
class Stage:
    asset_keys: list[dg.AssetKey]
    partitions_def: dg.PartitionsDefinition | None
    partition_keys: list[str | None] = field(default_factory=list)


def _topological_keys(asset_graph, keys: set[dg.AssetKey]) -> list[dg.AssetKey]:
    ordered = []
    for level in asset_graph.toposorted_asset_keys_by_level:
        ordered.extend(sorted(k for k in level if k in keys))
    return ordered


def plan_stages(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    selection: str | None = None,
    stale_only: bool = False,
) -> list[Stage]:
    asset_graph = defs.resolve_asset_graph()
    materializable = {k for k in asset_graph.materializable_asset_keys}
    if selection:
        # A comma-separated list is a union, as `dagster asset materialize --select a,b` takes it.
        selected = set()
        for part in (p.strip() for p in selection.split(",")):
            if part:
                selected |= set(dg.AssetSelection.from_string(part).resolve(asset_graph))
        selected &= materializable
    else:
        selected = materializable
    resolver = None
    if stale_only:
        from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
        from dagster._time import get_current_datetime

        view = AssetGraphView(
            temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
            instance=instance,
            asset_graph=asset_graph,
        )
        resolver = CachingStaleStatusResolver(instance=instance, asset_graph=asset_graph, loading_context=view)

    stages: list[Stage] = []
    stage_of: dict[dg.AssetKey, int] = {}
    for key in _topological_keys(asset_graph, selected):
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
    for stage in stages:
        keys: list[str | None] = (
            list(stage.partitions_def.get_partition_keys(dynamic_partitions_store=instance))
            if stage.partitions_def
            else [None]
        )
        stage.partition_keys = keys
    if resolver is not None:
        stages = _keep_stale(stages, resolver, instance)
    return [s for s in stages if s.asset_keys and s.partition_keys]


def _keep_stale(stages: list[Stage], resolver: CachingStaleStatusResolver, instance: dg.DagsterInstance) -> list[Stage]:
    """Keep (asset, partition) pairs that are missing or stale, or that depend on a pair kept earlier.

    A pair downstream of one that will be rebuilt now is stale *after* the rebuild even if it looks fresh
    before it; partition mappings decide which downstream partitions that is (a new part -> the
    unpartitioned filtered_pairs; difficulty_scores[unet] -> trained_models[unet|*] only).
    """
    graph = resolver.asset_graph
    kept: list[Stage] = []
    rebuilding: set[tuple[dg.AssetKey, str | None]] = set()

    def depends_on_rebuild(key: dg.AssetKey, partition_key: str | None) -> bool:
        parents = graph.get_parents_partitions(key, partition_key).parent_partitions
        return any((p.asset_key, p.partition_key) in rebuilding for p in parents)

    with dg.partition_loading_context(dynamic_partitions_store=instance):
        for stage in stages:
            keys = [
                pk
                for pk in stage.partition_keys
                if any(
                    depends_on_rebuild(k, pk) or resolver.get_status(k, pk) != StaleStatus.FRESH
                    for k in stage.asset_keys
                )
            ]
            if keys:
                kept.append(Stage(stage.asset_keys, stage.partitions_def, keys))
                rebuilding.update((k, pk) for k in stage.asset_keys for pk in keys)
    return kept


def observe_settings(defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
    """Record the current data version of every settings source (training_settings), so that a changed
    setting shows up as stale data before planning.  DiffusionDB itself is not observed here: new parts
    are registered as partitions instead, which stales only what they feed."""
    from dagster._core.definitions.observe import observe

    from assets.training import training_settings

    observe(
        [training_settings],
        instance=instance,
        raise_on_error=True,
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        tags={"reverse-sd/launched-by": "cli"},
    )


def run_stages(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    stages: Iterable[Stage],
    on_run: Callable[[Stage, str | None], None] | None = None,
    log_level: str = "WARNING",
    on_done: Callable[[dg.ExecuteInProcessResult], None] | None = None,
) -> list[dg.ExecuteInProcessResult]:
    """One in-process run per (stage, partition key), recorded in `instance`; stops at the first failure."""
    from assets.definitions import ALL_ASSETS, ALL_CHECKS

    assets_defs = [*ALL_ASSETS, *ALL_CHECKS]
    resources = defs.resources or {}
    results = []
    for stage in stages:
        selection = dg.AssetSelection.assets(*stage.asset_keys) | dg.AssetSelection.checks_for_assets(
            *stage.asset_keys
        )
        for partition_key in stage.partition_keys:
            if on_run:
                on_run(stage, partition_key)
            result = dg.materialize(
                assets_defs,
                selection=selection,
                partition_key=partition_key,
                instance=instance,
                resources=resources,
                raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
                tags={"reverse-sd/launched-by": "cli"},
            )
            results.append(result)
            if on_done:
                on_done(result)
            if not result.success:
                return results
    return results
