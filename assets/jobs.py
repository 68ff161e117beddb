"""Named asset jobs: one per partitions definition, the jobs `reverse-sd materialize`'s runs belong to (so the
UI lists each run under its job and can re-execute it), and the pool and tags those runs use."""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

GPU_POOL = "gpu"
# Dagster's own tags for a run over a range of partitions (what a single-run backfill sets).
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


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
