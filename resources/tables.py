"""Lineage declared once: an asset names what it reads in its ``ins`` (``table_in`` / ``directory_in``), and the
``tables`` input manager hands it a small handle per upstream artifact instead of the data.

- ``Table``: one upstream table (or, for a checkpoint parent, its directory): ``read(columns=...)``, ``exists``,
  ``path``, ``fingerprint()``, ``directory``; nothing is read until the asset asks.
- ``Tables``: a partitioned parent, as a mapping partition key -> ``Table`` (the partitions the asset's partition
  mapping selects, in key order), holding only the partitions that have a table; ``missing`` lists the others.
  A directory parent (``directory_in``) keeps every mapped partition: whether a checkpoint is there is the
  reader's question (pipeline.training.checkpoint.latest_checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import dagster as dg
import polars as pl

from resources.core import StorageResource

TABLES = "tables"  # the input manager's resource key
_DIRECTORY = "reverse_sd/directory"  # AssetIn metadata: the parent is a directory of checkpoints, not a table


class Table:
    """One upstream artifact under the storage root: <root>/<key>.parquet or <root>/<key>/<partition>.parquet."""

    def __init__(self, storage: StorageResource, key: str, partition: str | None = None):
        self.storage, self.key, self.partition = storage, key, partition

    def __repr__(self) -> str:
        return f"Table({self.key!r}" + (f", {self.partition!r})" if self.partition else ")")

    @property
    def path(self) -> str:
        return self.storage.table_path(self.key, self.partition)

    @property
    def directory(self) -> str:
        """<root>/<key>[/<partition dimension>...]: where a checkpoint asset (trained_models, trained_captioners)
        keeps its partition's files ("vit|mlc" -> trained_models/vit/mlc)."""
        return self.storage.path(self.key, *(self.partition.split("|") if self.partition else ()))

    @property
    def exists(self) -> bool:
        return self.storage.has_table(self.key, self.partition)

    def read(self, columns: list[str] | None = None) -> pl.DataFrame:
        return self.storage.read_table(self.key, self.partition, columns=columns)

    def fingerprint(self) -> str:
        return self.storage.fingerprint(self.key, self.partition)


class Tables(Mapping[str, Table]):
    """A partitioned parent: partition key -> Table, for the mapped partitions that are present."""

    def __init__(self, key: str, present: list[Table], missing: list[Table] = ()):
        self.key = key
        self._tables = {t.partition: t for t in present}
        self._missing = {t.partition: t for t in missing}
        self.missing = list(self._missing)  # the mapped partitions that have no table

    def partition(self, partition: str) -> Table:
        """The handle of a mapped partition whether or not its table exists (reading a missing one fails with
        the line that names the asset and partition to materialize)."""
        return self._tables.get(partition) or self._missing[partition]

    def __getitem__(self, partition: str) -> Table:
        return self._tables[partition]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)

    def __repr__(self) -> str:
        return f"Tables({self.key!r}, {list(self._tables)}, missing={self.missing})"


class TableInputManager(dg.ConfigurableIOManager):
    """Loads an asset's ``ins`` as handles (Table / Tables) on the one storage root; writes nothing (the assets
    write their own artifacts through StorageResource and return MaterializeResult)."""

    storage: StorageResource

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        raise NotImplementedError("the tables input manager only loads inputs; assets write through StorageResource")

    def load_input(self, context: dg.InputContext) -> Table | Tables:
        key = context.asset_key.to_user_string()
        if not context.has_asset_partitions:
            return Table(self.storage, key)
        tables = [Table(self.storage, key, str(p)) for p in sorted(str(p) for p in context.asset_partition_keys)]
        if (context.definition_metadata or {}).get(_DIRECTORY):
            return Tables(key, tables)
        present = [t for t in tables if t.exists]
        return Tables(key, present, [t for t in tables if t not in present])


def table_in(asset, partition_mapping: dg.PartitionMapping | None = None) -> dg.AssetIn:
    """The input of an asset that reads ``asset``'s table(s): a Table, or Tables for a partitioned parent."""
    return dg.AssetIn(_key(asset), partition_mapping=partition_mapping, input_manager_key=TABLES)


def directory_in(asset, partition_mapping: dg.PartitionMapping | None = None) -> dg.AssetIn:
    """The input of an asset that reads ``asset``'s checkpoint directories: Tables of every mapped partition."""
    return dg.AssetIn(
        _key(asset), partition_mapping=partition_mapping, input_manager_key=TABLES, metadata={_DIRECTORY: True}
    )


def _key(asset) -> dg.AssetKey:
    return asset.key if hasattr(asset, "key") else dg.AssetKey.from_coercible(asset)


def with_tables(resources: dict) -> dict:
    """``resources`` plus the ``tables`` input manager on their storage root (the Definitions' and the tests')."""
    return {**resources, TABLES: TableInputManager(storage=resources["storage"])}
