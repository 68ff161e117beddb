"""The data checks beside filtered_pairs: too little data stops at the split, before any model trains."""

from __future__ import annotations

import dagster as dg
import pytest

from assets.data import (
    diffusiondb_parts,
    filtered_pairs,
    has_test_pairs,
    parts_partitions,
    train_and_val_hold_pairs,
)
from assets.own_images import image_folders
from resources import DiffusionDBResource, ImagesResource, StorageResource, with_tables


def _materialize_pairs(tmp_path, images: int):
    from pipeline.data.sample_data import generate_sample_mirror

    mirror = tmp_path / "mirror"
    generate_sample_mirror(mirror, n_parts=1, images_per_part=images, seed=3)
    resources = with_tables(
        {
            "storage": StorageResource(root=str(tmp_path / "data")),
            "diffusiondb": DiffusionDBResource(location=str(mirror)),
            "images": ImagesResource(),  # image_folders, a parent of filtered_pairs (not run)
        }
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(parts_partitions.name, ["part-000001"])
        assert dg.materialize([diffusiondb_parts], partition_key="part-000001", instance=instance, resources=resources)
        result = dg.materialize(
            [diffusiondb_parts, image_folders, filtered_pairs, train_and_val_hold_pairs, has_test_pairs],
            selection=[filtered_pairs, train_and_val_hold_pairs, has_test_pairs],
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
    return result, {c.check_name: c for c in result.get_asset_check_evaluations()}


@pytest.mark.parametrize("images, train_val, test", [(2, False, True), (3, True, False), (60, True, True)])
def test_splits_must_hold_pairs(tmp_path, images, train_val, test):
    result, checks = _materialize_pairs(tmp_path, images)
    blocking, warning = checks["train_and_val_hold_pairs"], checks["has_test_pairs"]
    assert (blocking.passed, warning.passed) == (train_val, test)
    assert warning.severity == dg.AssetCheckSeverity.WARN
    assert result.success is train_val  # only an empty train or val split stops what reads filtered_pairs
    for check in (blocking, warning):
        if not check.passed:
            assert "more DiffusionDB parts or image folders" in check.metadata["remedy"].value
