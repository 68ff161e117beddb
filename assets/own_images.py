"""The second data source: the user's own generations (REVERSE_SD_IMAGES), one partition per subfolder.

- images_source (observable source, partitioned by image_folder): each subfolder's content version (the
  sha256 of its files' paths and contents, pipeline/data/own_images.py), so a new or changed subfolder is new
  data and only it, and what reads it, is rebuilt.
- image_folders (partitioned by image_folder): one subfolder's pairs, images re-encoded as DiffusionDB's parts
  are, prompts from the images' metadata (pipeline/image_metadata.py) or sidecars; Parquet.  filtered_pairs
  reads it beside diffusiondb_parts (source = "images", part = the subfolder).
- images_new_folders (sensor, stopped by default like the others): registers new subfolders, unregisters
  vanished ones, and materializes the new and the changed ones.  `reverse-sd materialize` registers and
  observes them too (sync_folders, the observe_images_source job).
"""

import time

import dagster as dg

from assets.common import PROFILE_CONFIG, artifact_metadata, code_version, markdown_table, table_metadata
from assets.listed_partitions import ListedPartitions
from resources import ImagesResource, StorageResource

DATA_GROUP = "data"
folders_partitions = dg.DynamicPartitionsDefinition(name="image_folder")
TABLE = "image_folders"  # the asset key, and the table's name under the storage root


@dg.observable_source_asset(
    partitions_def=folders_partitions,
    group_name=DATA_GROUP,
    description="The content of each subfolder of REVERSE_SD_IMAGES: the sha256 of its image files' and sidecars' "
    "paths and contents. A changed subfolder turns only itself and what reads it stale.",
)
def images_source(context: dg.OpExecutionContext, images: ImagesResource) -> dg.DataVersionsByPartition:
    return dg.DataVersionsByPartition(changed_folder_versions(context.instance, images.list_folders()))


# Subfolders as partitions, by the same rule as DiffusionDB's parts (assets/listed_partitions.py).
FOLDERS = ListedPartitions(folders_partitions, dg.AssetKey("images_source"))
folder_changes, sync_folders, changed_folder_versions = FOLDERS.changes, FOLDERS.sync, FOLDERS.changed_versions


@dg.asset(
    partitions_def=folders_partitions,
    deps=[images_source],
    group_name=DATA_GROUP,
    kinds={"polars", "parquet"},
    code_version=code_version("image_folders", image_size=PROFILE_CONFIG.image_size),
    description="One subfolder of REVERSE_SD_IMAGES: images with a prompt in their metadata (or a sidecar), "
    "decoded once, resized, re-encoded; prompt, seed, cfg, steps, sampler, generator.",
)
def image_folders(context: dg.AssetExecutionContext, images: ImagesResource, storage: StorageResource):
    from pipeline.data.own_images import folder_version, read_folder

    name = context.partition_key
    folder = images.folder(name)
    if not folder.is_dir():
        raise dg.Failure(f"REVERSE_SD_IMAGES has no subfolder {name!r} any more: it is unregistered on the next sync")
    started = time.perf_counter()
    version = folder_version(folder, storage.local_dir("hash-cache"))
    result = read_folder(folder, name, image_size=PROFILE_CONFIG.image_size)
    target = storage.write_table(result.frame, TABLE, name)
    elapsed = time.perf_counter() - started
    for skipped in result.skipped[:50]:
        context.log.warning(f"{name}: skipped {skipped['id']}: {skipped['reason']}")
    context.log.info(f"{name}: {result.frame.height} pairs kept, {len(result.skipped)} skipped, {elapsed:.1f} s")
    skipped_md = markdown_table(result.skipped[:100] or [{"id": "-", "reason": "none"}])
    return dg.MaterializeResult(
        metadata={
            "records": result.frame.height,
            "skipped": len(result.skipped),
            "skipped_by_reason": dict(result.counts),
            "by_generator": dict(result.generators),
            "skipped_records": dg.MetadataValue.md(skipped_md),
            "seconds": round(elapsed, 2),
            "content_sha256": version,
            **table_metadata(result.frame, partitioned=True),
            **artifact_metadata(target),
            "preview": dg.MetadataValue.md(
                markdown_table(result.frame.select("image_id", "generator", "prompt", "seed").head(5).to_dicts())
            ),
        },
        data_version=dg.DataVersion(version),
    )


def materialized_folders(context: dg.AssetExecutionContext, storage: StorageResource) -> list[str]:
    """The registered subfolders that have a table, in name order."""
    names = sorted(context.instance.get_dynamic_partitions(folders_partitions.name))
    present = [n for n in names if storage.has_table(TABLE, n)]
    if len(present) < len(names):
        context.log.warning(f"{len(names) - len(present)} registered image folders have no table yet and are left out")
    return present


def table_of(source: str, part: str) -> tuple[str, str]:
    """(table, partition) holding a pair's image: a DiffusionDB part's, or an image folder's."""
    return (TABLE, part) if source == "images" else ("diffusiondb_parts", part)


observe_images_job = dg.define_asset_job("observe_images_source", selection=[images_source])


@dg.sensor(
    name="images_new_folders",
    minimum_interval_seconds=300,
    asset_selection=[image_folders],
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Registers new subfolders of REVERSE_SD_IMAGES and materializes them, and the changed ones; "
    "unregisters vanished ones.",
)
def images_new_folders(context: dg.SensorEvaluationContext, images: ImagesResource):
    listed = images.list_folders()
    new, gone = folder_changes(context.instance, listed)
    changed = [n for n in changed_folder_versions(context.instance, listed) if n not in new]
    if not new and not gone and not changed:
        return dg.SkipReason(f"no new, changed or vanished image folders ({len(listed)} listed)")
    run = [*new, *changed]
    requests = [dg.RunRequest(partition_key=n, asset_selection=[image_folders.key]) for n in run]
    return FOLDERS.sensor_result(listed, new, gone, run, requests)


IMAGES_ASSETS = [images_source, image_folders]
