"""REVERSE_SD_IMAGES, the second data source, through the CLI: its pairs in filtered_pairs beside DiffusionDB's
(source = "images", part = the subfolder), and a subfolder added later ingested alone."""

from __future__ import annotations

import json
import math
import os

import polars as pl
import pytest
from conftest import run_cli
from environments import sample_env
from own_images import make_folder


def _materializations(dagster_home, asset: str) -> dict[str, int]:
    import dagster as dg

    previous = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    try:
        with dg.DagsterInstance.get() as instance:
            records = instance.fetch_materializations(dg.AssetKey(asset), limit=1000).records
    finally:
        if previous is None:
            os.environ.pop("DAGSTER_HOME")
        else:
            os.environ["DAGSTER_HOME"] = previous
    counts: dict[str, int] = {}
    for record in records:
        partition = record.asset_materialization.partition
        counts[partition] = counts.get(partition, 0) + 1
    return counts


def test_the_sample_graph_with_two_image_folders_then_a_third(tmp_path):
    images = tmp_path / "images"
    day1, day2 = make_folder(images, "day1"), make_folder(images, "day2")
    env = sample_env(
        tmp_path,
        REVERSE_SD_SAMPLE_PARTS="1",
        REVERSE_SD_SAMPLE_IMAGES_PER_PART="20",
        REVERSE_SD_IMAGES=str(images),
    )
    first = run_cli(["materialize", "--select", "*filtered_pairs"], env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "registered 2 new image folders: day1, day2" in first.stdout
    pairs = pl.read_parquet(tmp_path / "data" / "filtered_pairs.parquet")
    own = pairs.filter(pl.col("source") == "images")
    assert sorted(own["prompt"]) == sorted(day1 + day2)
    assert set(own["part"]) == {"day1", "day2"}
    assert set(pairs.filter(pl.col("source") == "diffusiondb")["part"]) == {"part-000001"}

    day3 = make_folder(images, "day3")
    second = run_cli(["materialize", "--stale", "--select", "*filtered_pairs"], env, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    pairs = pl.read_parquet(tmp_path / "data" / "filtered_pairs.parquet")
    assert sorted(pairs.filter(pl.col("source") == "images")["prompt"]) == sorted(day1 + day2 + day3)
    # day3 ingested alone: day1 and day2 (and the DiffusionDB part) were not read again
    assert _materializations(tmp_path / "dagster_home", "image_folders") == {"day1": 1, "day2": 1, "day3": 1}
    assert _materializations(tmp_path / "dagster_home", "diffusiondb_parts") == {"part-000001": 1}
    assert _materializations(tmp_path / "dagster_home", "filtered_pairs") == {None: 2}


def test_the_whole_graph_on_own_images_alone(tmp_path):
    """REVERSE_SD_DIFFUSIONDB=none: every stage, from the image folders to the report, on the user's images
    alone.  Two folders of six images are the smallest make_folder data whose split holds a test pair
    (12 pairs: 9 train, 2 val, 1 test); one epoch, and the baseline check only warns (so few pairs cannot be
    expected to beat the mean embedding)."""
    images = tmp_path / "images"
    prompts = make_folder(images, "day1") + make_folder(images, "day2")
    env = sample_env(
        tmp_path,
        REVERSE_SD_DIFFUSIONDB="none",
        REVERSE_SD_IMAGES=str(images),
        REVERSE_SD_TRAIN_EPOCHS="1",
        REVERSE_SD_BASELINE_CHECK="warn",
    )
    result = run_cli(["materialize"], env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "registered 2 new image folders: day1, day2" in result.stdout

    data = tmp_path / "data"
    pairs = pl.read_parquet(data / "filtered_pairs.parquet")
    assert set(pairs["source"]) == {"images"} and set(pairs["part"]) == {"day1", "day2"}
    assert sorted(pairs["prompt"]) == sorted(prompts)
    assert not (data / "diffusiondb_parts").exists()

    report = json.loads((data / "reports" / "evaluation.json").read_text())
    assert set(report["cosine_by_source"]) == {"images"} and set(report["counts_by_source"]) == {"images"}
    assert report["counts_by_source"]["images"] == report["counts"]  # every pair is an own image
    own = report["cosine_by_source"]["images"]
    for key in ("vit/baseline", "unet/mlc_cl", "ensemble/median", "ensemble+dakl", "baseline/mean_embedding"):
        assert math.isfinite(report["cosine"][key]) and own[key] == pytest.approx(report["cosine"][key])
    assert "## Per data source" in (data / "reports" / "evaluation.md").read_text()
