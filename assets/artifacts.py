"""Artifacts on disk against what the instance recorded: one rule for `reverse-sd materialize --stale` and for
the `damaged_artifacts` sensor.

Every materialization records the files it wrote as path metadata, and pipeline/storage.py keeps a hash
sidecar beside each file.  A file that is gone, or whose size, mtime and then hash no longer match, is
damaged; its partition must be rebuilt.  Dagster's declarative automation cannot look at files, so the
sensor does, and requests the damaged partitions; what reads them is then rebuilt by reverse_sd_automation
(an updated parent), as --stale rebuilds what reads a partition it rebuilds.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from pipeline import storage
from resources import StorageResource


def under_root(recorded: str, key: dg.AssetKey, root: str) -> str | None:
    """Where an artifact recorded at ``recorded`` lives under the storage root ``root`` now.

    Artifacts sit at <root>/<asset key>[.parquet | /...]: the path from the asset key's component on is
    relative to the root, so a copied or moved root is checked at its new place, not the original's.  None
    when ``recorded`` has no such component and is not under ``root`` (another root's file: rebuild here)."""
    parts = Path(recorded).parts
    name = key.to_user_string()
    for i, part in enumerate(parts):
        if part == name or part.startswith(name + "."):
            return str(Path(root, *parts[i:]))
    root_path = Path(root).resolve()
    return recorded if Path(recorded).resolve().is_relative_to(root_path) else None


def artifact_problem(key: dg.AssetKey, metadata: dict, root: str | None) -> str | None:
    """Why the files a materialization of ``key`` recorded (its path metadata) cannot be used now, or None.

    ``root``: the local storage root the files must be under (None for an object store, whose URLs are
    checked as recorded: one HEAD, and the sidecar when the ETag changed)."""
    for entry in metadata.values():
        local = entry.value if isinstance(entry, dg.PathMetadataValue) else None
        if not isinstance(local, str):
            continue
        if "://" in local:
            if not storage.exists(local):
                return f"artifact missing: {local}"
            if not storage.is_intact(local):
                return f"artifact damaged: {local}"
            continue
        if root is not None:
            moved = under_root(local, key, root)
            if moved is None:
                return f"artifact recorded outside the storage root {root}: {local}"
            local = moved
        if not os.path.exists(local):
            return f"artifact missing: {local}"
        if os.path.isfile(local) and not storage.is_intact(local):
            return f"artifact damaged: {local}"
    return None


def latest_materializations(
    instance: dg.DagsterInstance, key: dg.AssetKey, partitioned: bool = True
) -> dict[str | None, dg.EventLogRecord]:
    """partition (None when unpartitioned) -> its newest materialization record, a page of 1,000 at a time (one
    record when the asset is not ``partitioned``: its newest is the only one that counts)."""
    latest: dict[str | None, dg.EventLogRecord] = {}
    cursor = None
    while True:
        limit = 1000 if partitioned else 1
        page = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=limit, cursor=cursor)
        for record in page.records:
            latest.setdefault(record.asset_materialization.partition, record)
        if not page.has_more or not partitioned:
            return latest
        cursor = page.cursor


def damaged_partitions(
    instance: dg.DagsterInstance, graph, keys: list[dg.AssetKey], root: str | None
) -> list[tuple[dg.AssetKey, str | None, str, int]]:
    """(asset, partition, why, storage id of the damaged materialization) for every latest materialization
    of ``keys`` (assets of ``graph``) whose artifacts are missing or damaged."""
    found = []
    for key in keys:
        partitioned = graph.get(key).partitions_def is not None
        for partition, record in latest_materializations(instance, key, partitioned).items():
            why = artifact_problem(key, record.asset_materialization.metadata, root)
            if why:
                found.append((key, partition, why, record.storage_id))
    return found


@dg.sensor(
    name="damaged_artifacts",
    asset_selection=dg.AssetSelection.all(),
    minimum_interval_seconds=600,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Rematerializes partitions whose artifact file is gone or damaged (size, mtime, hash against the "
    "sidecar), the same rule as `reverse-sd materialize --stale`; reverse_sd_automation then rebuilds what reads "
    "them.  One request per damaged materialization (its run key), so a rebuild in progress is not asked twice.",
)
def damaged_artifacts(context: dg.SensorEvaluationContext, storage: StorageResource):
    graph = context.repository_def.asset_graph
    keys = sorted(graph.materializable_asset_keys)
    root = storage.root if "://" not in storage.root else None
    found = damaged_partitions(context.instance, graph, keys, root)
    if not found:
        return dg.SkipReason(f"every latest artifact of {len(keys)} assets is intact")
    for key, partition, why, _ in found[:20]:
        context.log.warning(f"{key.to_user_string()}{f'[{partition}]' if partition else ''}: {why}")
    return [
        dg.RunRequest(
            run_key=f"{key.to_user_string()}:{partition}:{storage_id}", asset_selection=[key], partition_key=partition
        )
        for key, partition, _, storage_id in found
    ]
