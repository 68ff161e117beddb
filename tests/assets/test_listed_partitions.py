"""Partitions that follow what a source lists (assets/listed_partitions.py): the images_new_folders sensor
registers new subfolders, re-requests changed ones and unregisters vanished ones; DiffusionDB's parts follow
the same rule, except that a source listing no part at all unregisters nothing."""

from __future__ import annotations

import shutil

import dagster as dg
from own_images import make_folder, write_a1111

from assets.data import PARTS
from assets.own_images import FOLDERS, images_new_folders
from resources import ImagesResource


def _tick(instance, images: ImagesResource) -> dg.SensorResult | dg.SkipReason:
    """One sensor evaluation, applied as the daemon would: partitions added / deleted, observations recorded."""
    context = dg.build_sensor_context(instance=instance, resources={"images": images})
    result = images_new_folders(context)
    if isinstance(result, dg.SensorResult):
        for request in result.dynamic_partitions_requests or []:
            if isinstance(request, dg.AddDynamicPartitionsRequest):
                instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
            else:
                for key in request.partition_keys:
                    instance.delete_dynamic_partition(request.partitions_def_name, key)
        for event in result.asset_events or []:
            instance.report_runless_asset_event(event)
    return result


def _requested(result) -> list[str]:
    return sorted(r.partition_key for r in result.run_requests) if isinstance(result, dg.SensorResult) else []


def test_new_changed_and_vanished_image_folders(tmp_path):
    images = ImagesResource(location=str(tmp_path / "images"), hash_cache_dir=str(tmp_path / "cache"))
    make_folder(tmp_path / "images", "day1", 2)
    make_folder(tmp_path / "images", "day2", 2)
    with dg.instance_for_test() as instance:
        first = _tick(instance, images)
        assert _requested(first) == ["day1", "day2"]
        assert sorted(instance.get_dynamic_partitions(FOLDERS.partitions.name)) == ["day1", "day2"]
        assert isinstance(_tick(instance, images), dg.SkipReason)  # nothing new: one observation per change

        write_a1111(tmp_path / "images" / "day2" / "00000.png", "a changed prompt", colour="blue")
        assert _requested(_tick(instance, images)) == ["day2"]  # only the changed folder is read again

        shutil.rmtree(tmp_path / "images" / "day1")
        gone = _tick(instance, images)
        assert _requested(gone) == [] and isinstance(gone, dg.SensorResult)
        assert instance.get_dynamic_partitions(FOLDERS.partitions.name) == ["day2"]  # unregistered


def test_a_source_listing_no_part_unregisters_nothing_but_an_empty_images_folder_does():
    with dg.instance_for_test() as instance:
        for listed in (PARTS, FOLDERS):
            instance.add_dynamic_partitions(listed.partitions.name, ["a", "b"])
        assert PARTS.sync(instance, {}) == ([], [])  # a DiffusionDB source listing nothing is a wrong setting
        assert PARTS.sync(instance, {"a": "v1"}) == ([], ["b"])
        assert FOLDERS.sync(instance, {}) == ([], ["a", "b"])  # every subfolder deleted: none is left
        assert instance.get_dynamic_partitions(PARTS.partitions.name) == ["a"]
        assert instance.get_dynamic_partitions(FOLDERS.partitions.name) == []
