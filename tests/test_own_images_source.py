"""REVERSE_SD_IMAGES, the second data source: subfolders as partitions observed by content, their pairs in
filtered_pairs beside DiffusionDB's (source = "images", part = the subfolder), and a subfolder added later
ingested alone."""

from __future__ import annotations

import os

import polars as pl
import pytest
from conftest import run_cli, sample_env
from own_images import write_a1111, write_plain

from pipeline.data.own_images import folder_problem, list_folders, read_folder
from resources.settings import SettingsError, check_source, load_settings

SHAPES = ["cube", "sphere", "pyramid", "cone", "torus", "cylinder"]
COLOURS = ["red", "blue", "green", "yellow"]


def make_folder(root, name: str, n: int = 6) -> list[str]:
    """``n`` A1111 PNGs with distinct prompts, and one image without metadata (skipped)."""
    prompts = []
    for i in range(n):
        prompt = f"{name} a {COLOURS[i % 4]} {SHAPES[i % 6]} on a table, photo number {i}"
        write_a1111(root / name / f"{i:05d}.png", prompt, colour=COLOURS[i % 4], seed=i)
        prompts.append(prompt)
    write_plain(root / name / "no-metadata.png")
    return prompts


def test_folders_are_versioned_by_content_and_read_as_parts(tmp_path):
    make_folder(tmp_path, "day1", 3)
    make_folder(tmp_path, "day2", 3)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "loose.png").write_bytes(b"")  # a file at the top is no folder
    before = list_folders(tmp_path)
    assert sorted(before) == ["day1", "day2"]
    write_a1111(tmp_path / "day2" / "00000.png", "another prompt entirely", colour="blue")
    after = list_folders(tmp_path)
    assert after["day1"] == before["day1"] and after["day2"] != before["day2"]
    (tmp_path / "day1" / "00001.txt").write_text("a sidecar changes the content too")
    assert list_folders(tmp_path)["day1"] != before["day1"]

    result = read_folder(tmp_path / "day1", "day1", image_size=32)
    frame = result.frame
    assert frame["image_id"].to_list() == ["day1/00000.png", "day1/00001.png", "day1/00002.png"]
    assert set(frame["part"]) == {"day1"} and frame["prompt"][1] == "a sidecar changes the content too"
    assert frame["generator"].to_list() == ["AUTOMATIC1111", "sidecar", "AUTOMATIC1111"]
    assert result.skipped == [{"id": "day1/no-metadata.png", "reason": "no prompt metadata"}]


def test_folder_names_a_partition_cannot_take_are_refused():
    assert folder_problem("2024-05-01") is None
    assert folder_problem(".cache") and folder_problem("a,b") and folder_problem("x\ny")


def test_settings_images_and_diffusiondb_none(tmp_path):
    settings = load_settings({"REVERSE_SD_IMAGES": str(tmp_path), "REVERSE_SD_HOME": str(tmp_path / "h")})
    assert settings.images == str(tmp_path) and settings.uses_diffusiondb
    alone = load_settings({"REVERSE_SD_IMAGES": str(tmp_path), "REVERSE_SD_DIFFUSIONDB": "none"})
    assert not alone.uses_diffusiondb
    check_source(alone)  # nothing to check for DiffusionDB
    with pytest.raises(SettingsError, match="REVERSE_SD_DIFFUSIONDB=none leaves nothing to train on"):
        load_settings({"REVERSE_SD_DIFFUSIONDB": "none"})
    with pytest.raises(SettingsError, match="REVERSE_SD_IMAGES=.* does not exist"):
        check_source(load_settings({"REVERSE_SD_IMAGES": str(tmp_path / "missing"), "REVERSE_SD_DIFFUSIONDB": "none"}))


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


@pytest.mark.extended
@pytest.mark.slow
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
