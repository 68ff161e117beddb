"""The data checks beside filtered_pairs: too little data stops at the split, before any model trains."""

from __future__ import annotations

import dagster as dg
import pytest

from assets.data import diffusiondb_parts, every_split_has_pairs, filtered_pairs, parts_partitions
from resources import DiffusionDBResource, StorageResource


@pytest.mark.parametrize("images, passed", [(3, False), (60, True)])
def test_every_split_must_hold_pairs(tmp_path, images, passed):
    from pipeline.data.sample_data import generate_sample_mirror

    mirror = tmp_path / "mirror"
    generate_sample_mirror(mirror, n_parts=1, images_per_part=images, seed=3)
    resources = {
        "storage": StorageResource(root=str(tmp_path / "data")),
        "diffusiondb": DiffusionDBResource(location=str(mirror)),
    }
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(parts_partitions.name, ["part-000001"])
        assert dg.materialize([diffusiondb_parts], partition_key="part-000001", instance=instance, resources=resources)
        result = dg.materialize(
            [filtered_pairs, every_split_has_pairs], instance=instance, resources=resources, raise_on_error=False
        )
    (check,) = result.get_asset_check_evaluations()
    assert check.passed is passed
    counts = {k: check.metadata[f"split_{k}"].value for k in ("train", "val", "test")}
    assert (min(counts.values()) > 0) is passed, counts
    if not passed:
        assert not result.success  # blocking: what reads filtered_pairs would not run
        assert "more DiffusionDB parts or image folders" in check.metadata["remedy"].value
