"""What `reverse-sd materialize --stale` rebuilds, judged from the instance's own records (public APIs).

A partition is stale when it was never materialized, its artifact file is gone or damaged, its code
version changed, or a parent's data version moved on since it was built; everything below a partition
that is rebuilt now is rebuilt too.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import dagster as dg

from assets.artifacts import artifact_problem
from assets.jobs import GPU_POOL
from cli.plan import Plan, Unit

# ---- staleness from the instance's records (public APIs only) -------------------------------------------


class _Records:
    """Every materialization / observation of an asset, per partition (newest first), fetched once per asset:
    (storage id, data version) pairs, and the latest event itself."""

    def __init__(self, instance: dg.DagsterInstance, asset_graph, observed_now=None, root: str | None = None):
        self.instance, self.graph = instance, asset_graph
        self.root = root if root and "://" not in root else None  # the local storage root artifacts must be under
        self.observed_now = observed_now or {}  # key -> partition -> version not recorded (dry run)
        self._history: dict[dg.AssetKey, dict[str | None, list[tuple[int, str | None]]]] = {}
        self._latest: dict[dg.AssetKey, dict[str | None, object]] = {}
        self._checks: dict[dg.AssetCheckKey, list] = {}  # blocking check -> its executions, newest first

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

    def failed_blocking_check(self, key: dg.AssetKey, partition: str | None) -> str | None:
        """'check NAME failed on KEY[PARTITION]' when a blocking check's newest evaluation of this partition,
        made at or after its latest materialization, failed (what stops the automation sensor there too)."""
        record = self.record(key, partition)
        if record is None or not self.graph.get(key).is_materializable:
            return None
        for check_key in self.graph.get_check_keys_for_assets({key}):
            if not self.graph.get_check_spec(check_key).blocking:
                continue
            if check_key not in self._checks:  # newest first; the limit covers one evaluation per partition
                self._checks[check_key] = list(
                    self.instance.event_log_storage.get_asset_check_execution_history(check_key, limit=10_000)
                )
            for execution in self._checks[check_key]:
                entry = execution.event
                evaluation = entry.dagster_event.event_specific_data if entry and entry.dagster_event else None
                if not hasattr(evaluation, "passed") or getattr(evaluation, "partition", None) not in (None, partition):
                    continue
                if entry.timestamp < record.timestamp or evaluation.passed:
                    break  # the newest verdict on this partition predates its data, or passed
                label = key.to_user_string() + (f"[{partition}]" if partition else "")
                return f"check {check_key.name} failed on {label}"
        return None

    def history(self, key: dg.AssetKey, partition: str | None) -> list[tuple[int, str | None]]:
        if key not in self._history:
            self._load(key)
        return self._history[key].get(partition, [])


def _event(record):
    return record.asset_materialization or record.asset_observation


def _data_version(record) -> str | None:
    return None if record is None else (_event(record).tags or {}).get("dagster/data_version")


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
    tags = event.tags or {}
    current_code = records.graph.get(key).code_version
    if current_code is not None and tags.get("dagster/code_version") != current_code:
        return "code version changed"
    problem = artifact_problem(key, event.metadata, records.root)  # the files it wrote: gone, truncated, altered
    if problem:
        return problem
    # filtered_pairs: how many DiffusionDB parts and image folders it read (a vanished one is no parent event)
    for field, parent_name, noun in (
        ("parts", "diffusiondb_parts", "parts"),
        ("image_folders", "image_folders", "image folders"),
    ):
        built_from = event.metadata.get(field)
        if built_from is not None and isinstance(built_from.value, int):
            now = sum(1 for parent_key, _ in parents if parent_key.to_user_string() == parent_name)
            if (now or field == "image_folders") and now != built_from.value:
                return f"built from {built_from.value} {noun}, {now} registered now"
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
    blocked: dict[tuple[dg.AssetKey, str | None], str] = {}  # pair -> the failed blocking check that stops it
    for i, unit in enumerate(plan.units):  # units, and the assets inside each, are in dependency order
        keys, reads, why = [], set(), None
        for key in unit.asset_keys:
            parents = parents_of[i][key]
            rebuilt = [p for p in parents if p in rebuilding]
            stopped = next((blocked[p] for p in parents if p in blocked), None)
            if stopped is None and not rebuilt:
                stopped = next((f for p in parents if (f := records.failed_blocking_check(*p))), None)
                if stopped is not None and stale_reason(key, unit.partition_key, parents, records) is None:
                    stopped = None  # built from the parent as it is now: nothing to rebuild, nothing blocked
            if stopped is not None:
                blocked[(key, unit.partition_key)] = stopped
                continue
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
    return Plan(units, depends_on, reasons, blocked=blocked)
