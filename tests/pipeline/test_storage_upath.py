"""The storage root can be an fsspec URL (memory://, file://; s3:// in a deployment) with no code change:
StorageResource and pipeline.storage read, write and test existence there, writes stay atomic (a failed
write or upload leaves the previous artifact and no temporary file), and the cheap data assets materialize
into such a root, in process (memory://) and through the CLI (file://)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import dagster as dg
import fsspec
import polars as pl
import pytest
from fsspec.implementations.memory import MemoryFile

from pipeline import storage
from resources import DiffusionDBResource, StorageResource

PROJECT = Path(__file__).resolve().parents[2]
FRAME = pl.DataFrame({"image_id": ["a", "b", "c"], "value": [1.0, 2.0, 3.0]})


@pytest.fixture
def memory_root():
    """A fresh memory:// bucket (the memory filesystem is process-wide), removed afterwards."""
    bucket = f"reverse-sd-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{bucket}/home"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{bucket}"):
        fs.rm(f"/{bucket}", recursive=True)


@pytest.fixture
def file_root(tmp_path):
    return f"file://{tmp_path}/home"


def _memory_files(root: str) -> list[str]:
    fs = fsspec.filesystem("memory")
    prefix = root.removeprefix("memory:/")  # memory://b/home -> /b/home
    return sorted(fs.find(prefix)) if fs.exists(prefix) else []


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_storage_resource_round_trip(kind, memory_root, file_root, tmp_path):
    root = memory_root if kind == "memory" else file_root
    res = StorageResource(root=root)
    assert not res.has_table("filtered_pairs")
    with pytest.raises(FileNotFoundError, match="materialize asset 'filtered_pairs'"):
        res.read_table("filtered_pairs")
    target = res.write_table(FRAME, "filtered_pairs")
    partitioned = res.write_table(FRAME.head(1), "model_predictions", "vit|mlc")
    assert partitioned == f"{root}/model_predictions/vit|mlc.parquet"
    assert target == f"{root}/filtered_pairs.parquet"
    assert res.has_table("filtered_pairs") and res.has_table("model_predictions", "vit|mlc")
    assert res.read_table("filtered_pairs").equals(FRAME)
    assert res.read_table("filtered_pairs", columns=["value"]).columns == ["value"]
    assert res.read_table("model_predictions", "vit|mlc").height == 1
    if kind == "memory":
        # the bytes live in the memory filesystem, not on a local path named after the URL
        files = _memory_files(root)
        assert any(f.endswith("/home/filtered_pairs.parquet") for f in files), files
        assert any(f.endswith("/home/model_predictions/vit|mlc.parquet") for f in files), files
        assert not Path("memory:").exists()
    else:
        local = tmp_path / "home"
        assert pl.read_parquet(local / "filtered_pairs.parquet").equals(FRAME)
        assert (local / "model_predictions" / "vit|mlc.parquet").is_file()
        assert not Path("file:").exists()


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_text_and_bytes_under_url(kind, memory_root, file_root):
    root = memory_root if kind == "memory" else file_root
    storage.write_text('{"method": "median"}', f"{root}/models/ensemble.json")
    storage.write_bytes(b"\x00\x01", f"{root}/models/blob.bin")
    assert storage.as_path(f"{root}/models/ensemble.json").read_text() == '{"method": "median"}'
    assert storage.as_path(f"{root}/models/blob.bin").read_bytes() == b"\x00\x01"
    assert storage.exists(f"{root}/models") and not storage.exists(f"{root}/models/missing.json")


def _leftovers(root: str, tmp_path: Path) -> list[str]:
    if root.startswith("memory://"):
        names = _memory_files(root)
    else:
        names = [str(p) for p in (tmp_path / "home").rglob("*")]
    return [n for n in names if ".tmp" in n]


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_failed_write_keeps_previous_artifact(kind, memory_root, file_root, tmp_path):
    """An exception while the artifact is being written leaves the old one whole and no temporary file."""
    root = memory_root if kind == "memory" else file_root
    res = StorageResource(root=root)
    res.write_table(FRAME, "vocabulary")
    target = res.table_path("vocabulary")
    with pytest.raises(RuntimeError, match="killed"):
        with storage.atomic_local_path(target, suffix=".parquet") as tmp:
            tmp.write_bytes(b"PAR1 half a file")
            raise RuntimeError("killed mid-write")
    assert res.read_table("vocabulary").equals(FRAME)
    assert _leftovers(root, tmp_path) == []


def test_failed_upload_keeps_previous_artifact(memory_root, monkeypatch):
    """The upload to an object store fails half-way: readers still see the old artifact, never a part of
    the new one (a plain streamed write to the target would have replaced it), and no staging file stays."""
    res = StorageResource(root=memory_root)
    res.write_table(FRAME, "prompt_bank")
    calls = {"n": 0}
    original = MemoryFile.write

    def failing_write(self, data):
        calls["n"] += 1
        original(self, bytes(data)[: len(data) // 2])
        raise OSError("connection reset during upload")

    monkeypatch.setattr(MemoryFile, "write", failing_write)
    with pytest.raises(OSError, match="connection reset"):
        res.write_table(pl.DataFrame({"image_id": ["z"], "value": [9.0]}), "prompt_bank")
    monkeypatch.undo()
    assert calls["n"] >= 1
    assert res.read_table("prompt_bank").equals(FRAME)
    assert [f for f in _memory_files(memory_root) if ".tmp" in f] == []


def test_as_path_keeps_local_paths_local(tmp_path):
    assert storage.as_path(f"file://{tmp_path}/x.parquet") == tmp_path / "x.parquet"
    assert storage.as_path(str(tmp_path / "x.parquet")) == tmp_path / "x.parquet"
    from upath import UPath

    assert storage.as_path(UPath(f"file://{tmp_path}/x")) == tmp_path / "x"
    assert storage.as_path("memory://bucket/x").protocol == "memory"


# ---- materializing data assets into a URL root ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mirror(tmp_path_factory) -> Path:
    """A one-part DiffusionDB mirror in DiffusionDB's layout: the source stays local, artifacts go to the URL."""
    from pipeline.data.sample_data import generate_sample_mirror

    root = tmp_path_factory.mktemp("mirror") / "diffusiondb"
    generate_sample_mirror(root, n_parts=1, images_per_part=40, seed=3)
    return root


def test_materialize_data_assets_into_memory_root(tiny_mirror, memory_root):
    from assets.data import diffusiondb_parts, filtered_pairs, no_prompt_in_two_splits, parts_partitions
    from assets.own_images import image_folders
    from resources import ImagesResource, with_tables

    resources = with_tables(
        {
            "storage": StorageResource(root=memory_root),
            "diffusiondb": DiffusionDBResource(location=str(tiny_mirror)),
            "images": ImagesResource(),  # image_folders, a parent of filtered_pairs (not run)
        }
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(parts_partitions.name, ["part-000001"])
        parts = dg.materialize([diffusiondb_parts], partition_key="part-000001", instance=instance, resources=resources)
        assert parts.success
        pairs = dg.materialize(
            [diffusiondb_parts, image_folders, filtered_pairs, no_prompt_in_two_splits],
            selection=[filtered_pairs, no_prompt_in_two_splits],
            instance=instance,
            resources=resources,
        )
        assert pairs.success
        checks = pairs.get_asset_check_evaluations()
        assert [c.passed for c in checks] == [True]
        metadata = pairs.asset_materializations_for_node("filtered_pairs")[0].metadata
    assert metadata["path"].value == f"{memory_root}/filtered_pairs.parquet"
    files = _memory_files(memory_root)
    assert any(f.endswith("/diffusiondb_parts/part-000001.parquet") for f in files), files
    res = resources["storage"]
    raw = res.read_table("diffusiondb_parts", "part-000001")
    kept = res.read_table("filtered_pairs")
    assert raw.height == 40 and 0 < kept.height <= raw.height
    assert metadata["rows_kept"].value == kept.height
    assert set(kept["image_id"]) <= set(raw["image_id"])
    assert not Path("memory:").exists()


@pytest.mark.extended  # the CLI with its own Dagster services and runs
def test_cli_materializes_into_file_url_root(tiny_mirror, tmp_path):
    """A user's run: REVERSE_SD_HOME=file://..., the CLI in a subprocess, its own Dagster instance."""
    home = tmp_path / "artifacts"
    env = {
        **os.environ,
        "REVERSE_SD_PROFILE": "sample",
        "REVERSE_SD_HOME": f"file://{home}",
        "REVERSE_SD_DIFFUSIONDB": str(tiny_mirror),
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "materialize", "--select", "diffusiondb_parts,filtered_pairs"],
        cwd=tmp_path,  # a relative "file:" folder would show up here if a URL were taken for a path
        env={**env, "PYTHONPATH": str(PROJECT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "materialized 2 runs" in result.stdout
    assert (home / "diffusiondb_parts" / "part-000001.parquet").is_file()
    assert pl.read_parquet(home / "filtered_pairs.parquet").height > 0
    assert not (tmp_path / "file:").exists() and not (PROJECT / "file:").exists()
    assert not list(home.rglob("*.tmp*"))


def test_sample_profile_generates_its_mirror_under_file_url_home(tmp_path, monkeypatch):
    from resources import build_resources, load_settings

    monkeypatch.chdir(tmp_path)
    env = {
        "REVERSE_SD_PROFILE": "sample",
        "REVERSE_SD_HOME": f"file://{tmp_path}/home",
        "REVERSE_SD_SAMPLE_PARTS": "1",
        "REVERSE_SD_SAMPLE_IMAGES_PER_PART": "5",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("REVERSE_SD_DIFFUSIONDB", raising=False)
    source = build_resources(load_settings())["diffusiondb"].source()
    assert sorted(source.list_parts()) == ["part-000001"]
    assert not (tmp_path / "file:").exists()


def test_local_dirs_stay_local_under_an_object_store_root(tmp_path, monkeypatch):
    """Hub downloads and the generated sample need a local directory whatever the storage root is."""
    from resources import StorageResource, load_settings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert StorageResource(root="memory://bucket/x").local_dir("downloads") == str(
        tmp_path / "cache" / "reverse-sd" / "downloads"
    )
    assert StorageResource(root=f"file://{tmp_path}/home").local_dir("downloads") == f"{tmp_path}/home/downloads"
    assert StorageResource(root=str(tmp_path / "home")).local_dir("downloads") == str(tmp_path / "home" / "downloads")
    settings = load_settings({"REVERSE_SD_PROFILE": "sample", "REVERSE_SD_HOME": "s3://bucket/prefix"})
    assert Path(settings.sample_mirror_dir).parent == tmp_path / "cache" / "reverse-sd" / "sample_mirror"
    assert settings.uses_generated_sample
