"""What `reverse-sd materialize` plans: units (one run each), their stages, and the plan that orders them."""

from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg


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
    # --stale: (asset, partition) pairs left out because a failed blocking check stops them -> that check
    blocked: dict[tuple[dg.AssetKey, str | None], str] = field(default_factory=dict)

    @property
    def stages(self) -> list[Stage]:
        """The units grouped back into stages (for printing)."""
        stages: dict[tuple, Stage] = {}
        for unit in self.units:
            stage = stages.setdefault((unit.job, unit.asset_keys), Stage(list(unit.asset_keys), None))
            stage.partition_keys.extend(unit.partition_keys)
        return list(stages.values())
