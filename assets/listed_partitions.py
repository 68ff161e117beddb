"""Dynamic partitions that follow what a source lists: DiffusionDB's parts, the subfolders of REVERSE_SD_IMAGES.

One rule for both, used by `reverse-sd materialize` and by the sensors alike: a listed name not registered yet
is registered (new data), a registered name no longer listed is unregistered (nothing waits for it, what read it
is rebuilt without it; its table stays, unread), and each partition's content version is recorded as an
observation of the source asset only when it changed, so the event log grows by one entry per change.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import dagster as dg

DATA_VERSION_TAG = "dagster/data_version"


def latest_observed_versions(instance: dg.DagsterInstance, source_key: dg.AssetKey) -> dict[str, str]:
    """partition -> the data version of the newest observation of the partitioned source ``source_key``."""
    latest: dict[str, str] = {}
    cursor = None
    while True:
        result = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=source_key), limit=1000, cursor=cursor, ascending=False
        )
        for record in result.records:
            observation = record.asset_observation
            if observation.partition is not None:
                latest.setdefault(observation.partition, observation.tags.get(DATA_VERSION_TAG))
        if not result.has_more:
            return latest
        cursor = result.cursor


@dataclass(frozen=True)
class ListedPartitions:
    partitions: dg.DynamicPartitionsDefinition
    source_key: dg.AssetKey  # the observable source asset whose observations carry each partition's version
    keep_all_when_none_listed: bool = False  # True: a source listing nothing is a wrong setting, not news

    def changes(self, instance: dg.DagsterInstance, listed) -> tuple[list[str], list[str]]:
        """(new, gone): listed names not registered yet, registered names no longer listed."""
        known = set(instance.get_dynamic_partitions(self.partitions.name))
        new = sorted(name for name in listed if name not in known)
        keep = self.keep_all_when_none_listed and not listed
        return new, ([] if keep else sorted(known - set(listed)))

    def sync(self, instance: dg.DagsterInstance, listed) -> tuple[list[str], list[str]]:
        """Register the new names and unregister the gone ones; returns (new, gone)."""
        new, gone = self.changes(instance, listed)
        if new:
            instance.add_dynamic_partitions(self.partitions.name, new)
        for name in gone:
            instance.delete_dynamic_partition(self.partitions.name, name)
        return new, gone

    def latest_versions(self, instance: dg.DagsterInstance) -> dict[str, str]:
        """name -> the data version of its newest observation."""
        return latest_observed_versions(instance, self.source_key)

    def changed_versions(self, instance: dg.DagsterInstance, listed: Mapping[str, str]) -> dict[str, str]:
        """The registered names whose listed version differs from their last observed one (or never observed):
        observing only those keeps the event log at one event per change, not per partition per run."""
        registered = set(instance.get_dynamic_partitions(self.partitions.name))
        latest = self.latest_versions(instance)
        return {name: v for name, v in listed.items() if name in registered and latest.get(name) != v}

    def sensor_result(
        self, listed: Mapping[str, str], new: list[str], gone: list[str], run: list[str], run_requests: list
    ) -> dg.SensorResult:
        """A sensor's answer: register ``new``, unregister ``gone``, request ``run_requests``, and record the
        version of each name in ``run`` before its run reads it (without it, the partition would look stale
        after the next observation, read before its source was ever observed, and be ingested twice)."""
        return dg.SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=[
                *([self.partitions.build_add_request(new)] if new else []),
                *([self.partitions.build_delete_request(gone)] if gone else []),
            ],
            asset_events=[
                dg.AssetObservation(asset_key=self.source_key, partition=n, tags={DATA_VERSION_TAG: listed[n]})
                for n in run
            ],
        )
