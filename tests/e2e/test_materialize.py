"""End to end: the whole graph materialized on a very small sample, as a user runs it (the CLI in a
subprocess, against its own storage root and Dagster instance), then a stale-only re-run that does nothing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import polars as pl
import pytest
from conftest import run_cli

PROJECT = Path(__file__).resolve().parents[2]


def _run_cli(args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return run_cli(args, env, timeout)


@pytest.fixture(scope="module")
def sample_run(sample_graph_run):
    return sample_graph_run


def test_whole_graph_materializes(sample_run):
    home, _, result = sample_run
    parts = sorted(p.name for p in (home / "diffusiondb_parts").glob("*.parquet"))
    assert parts == [f"part-00000{i}.parquet" for i in range(1, 5)]
    raw = pl.concat([pl.read_parquet(home / "diffusiondb_parts" / p) for p in parts])
    assert raw.height == 1000
    pairs = pl.read_parquet(home / "filtered_pairs.parquet")
    # the sample carries filter bait, so the filter must remove something, and keep most
    assert 0.5 * raw.height < pairs.height < raw.height
    assert set(pairs["split"].unique()) <= {"train", "val", "test"}
    embeddings = pl.read_parquet(home / "prompt_embeddings.parquet")
    assert set(embeddings["prompt"]) == set(pairs["prompt"])
    labels = pl.read_parquet(home / "vocabulary_labels.parquet")
    assert labels.height == pairs.height
    # nothing half-written left behind
    assert not list(home.rglob("*.tmp*"))
    report = json.loads((home / "reports" / "evaluation.json").read_text())
    cosine = report["cosine"]
    for key in (
        "vit/baseline",
        "unet/mlc_cl",
        "ensemble/median",
        "ensemble/mean",
        "ensemble+dakl",
        "baseline/mean_embedding",
        "baseline/knn",
    ):
        assert -1.0 <= cosine[key] <= 1.0, key
    # every trained model beats the mean training embedding on test (the blocking check enforces it on val)
    models = [f"{b}/{r}" for b in ("vit", "swin", "clip", "unet") for r in ("baseline", "mlc", "mlc_cl")]
    losers = {m: cosine[m] for m in models if not cosine[m] > cosine["baseline/mean_embedding"]}
    assert not losers, (losers, cosine["baseline/mean_embedding"])
    assert "caption/blip" in cosine and report["generation"][0]["test_images"] > 0
    assert "| vit |" in (home / "reports" / "evaluation.md").read_text()
    assert "evaluation" in result.stdout  # make run prints the table


def test_every_artifact_records_its_sha256_and_the_file_matches(sample_run):
    import hashlib

    import dagster as dg

    home, env, _ = sample_run
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        for key in ("filtered_pairs", "prompt_embeddings", "prompt_bank"):
            event = instance.get_latest_materialization_event(dg.AssetKey(key)).asset_materialization
            path = event.metadata["path"].value
            assert path == str(home / f"{key}.parquet")
            assert event.metadata["path_sha256"].value == hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_every_run_went_through_the_instance_queue_and_launcher_and_can_be_re_executed(sample_run):
    """`materialize` submits its runs to the instance: each was queued (RUN_ENQUEUED), launched by the run
    launcher (RUN_STARTING), carries the invocation tag, and has a job origin (what the UI's Re-execute needs)."""
    import dagster as dg

    _, env, _ = sample_run
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        runs = instance.get_runs()
        assert len(runs) >= 10
        for run in runs:
            kinds = {e.dagster_event.event_type_value for e in instance.all_logs(run.run_id) if e.dagster_event}
            assert {"PIPELINE_ENQUEUED", "PIPELINE_STARTING"} <= kinds, (run.job_name, kinds)
            assert run.remote_job_origin is not None, run.job_name
            assert run.tags.get("reverse-sd/invocation"), run.job_name


def test_gpu_runs_never_overlap_with_a_gpu_limit_of_one(sample_run):
    """The "gpu" pool (limit 1 in dagster.yaml) holds at the queue from the very first run on a fresh instance:
    each run that uses it is launched (RUN_STARTING) only after the previous one ended."""
    import dagster as dg

    from assets.jobs import GPU_POOL

    _, env, _ = sample_run
    spans = []
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        for run in instance.get_runs():
            if run.run_op_concurrency and GPU_POOL in (run.run_op_concurrency.all_pools or ()):
                times = {
                    e.dagster_event.event_type_value: e.timestamp
                    for e in instance.all_logs(run.run_id)
                    if e.dagster_event and e.dagster_event.is_job_event
                }
                ended = next(
                    (times[k] for k in ("PIPELINE_SUCCESS", "PIPELINE_FAILURE", "PIPELINE_CANCELED") if k in times),
                    None,
                )
                assert ended is not None, f"{run.job_name} has not ended"
                spans.append(
                    (times["PIPELINE_STARTING"], ended, f"{run.job_name}[{run.tags.get('dagster/partition')}]")
                )
    spans.sort()
    assert len(spans) >= 17  # 4 difficulty scores, 12 models, the captioner (and the report's run)
    for (_, ended, name), (started, _, after) in zip(spans, spans[1:]):
        assert started >= ended, f"{after} started before {name} ended"


def test_no_run_is_executed_in_process_by_product_code():
    offenders = [
        str(path.relative_to(PROJECT))
        for folder in ("assets", "pipeline", "resources")
        for path in (PROJECT / folder).rglob("*.py")
        if "execute_in_process" in path.read_text()
    ]
    assert offenders == []


def test_stale_rerun_does_nothing(sample_run):
    _, env, _ = sample_run
    again = _run_cli(["materialize", "--stale"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to materialize" in again.stdout


def _stale_plan(env: dict[str, str]) -> dict[str, list[str]]:
    """`materialize --stale --dry-run`: asset names of each planned stage -> its partition keys."""
    result = _run_cli(["materialize", "--stale", "--dry-run"], env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = {}
    for line in result.stdout.splitlines():
        if line.startswith("  "):
            names, _, keys = line.strip().partition(" [")
            count, _, listed = keys.partition("]")
            plan[names] = listed.lstrip(": ").split() or [None] * int(count)
    return plan


DATA_STAGES = ("diffusiondb_parts", "filtered_pairs", "prompt_embeddings", "vocabulary", "vocabulary_labels")


def test_changed_training_setting_for_one_backbone_stales_it_and_the_ensemble_only(sample_run):
    _, env, _ = sample_run
    plan = _stale_plan({**env, "REVERSE_SD_TRAIN_UNET_EPOCHS": "9"})
    assert plan["difficulty_scores"] == ["unet"]
    assert sorted(plan["trained_models,model_predictions"]) == ["unet|baseline", "unet|mlc", "unet|mlc_cl"]
    assert any("ensemble_predictions" in names.split(",") for names in plan)
    planned = {name for names in plan for name in names.split(",")}
    assert not planned & set(DATA_STAGES)  # parts, filtered pairs, embeddings and labels stay fresh
    assert "prompt_bank" not in planned


def test_changed_split_setting_stales_filtered_pairs_and_downstream_not_the_parts(sample_run):
    _, env, _ = sample_run
    plan = _stale_plan({**env, "REVERSE_SD_SPLIT_SEED": "7"})
    first = next(iter(plan))
    assert first.split(",")[0] == "filtered_pairs"
    planned = {name for names in plan for name in names.split(",")}
    assert "diffusiondb_parts" not in planned
    assert {"prompt_embeddings", "trained_models", "evaluation_report"} <= planned


def test_new_part_stales_that_part_and_downstream_only(sample_run, tmp_path):
    """On a copy of the materialized instance: one new part in the mirror -> only that part is read."""
    import shutil

    from pipeline.data.sample_data import generate_sample_mirror

    home, env, _ = sample_run
    copy = tmp_path / "copy"
    shutil.copytree(home.parent, copy, ignore=shutil.ignore_patterns("*.sock"))
    copied_env = {**env, "REVERSE_SD_HOME": str(copy / "data"), "DAGSTER_HOME": str(copy / "dagster_home")}
    (mirror,) = [
        p for p in (copy / "data" / "sample_mirror").glob("*x*") if p.is_dir()
    ]  # named by the sample's settings
    generate_sample_mirror(mirror, n_parts=1, images_per_part=20, first_part=5)
    plan = _stale_plan(copied_env)
    assert plan["diffusiondb_parts"] == ["part-000005"]  # old parts untouched
    assert next(iter(plan)) == "diffusiondb_parts"
    planned = {name for names in plan for name in names.split(",")}
    assert {"filtered_pairs", "prompt_embeddings", "trained_models", "evaluation_report"} <= planned


def test_a_vanished_part_is_unregistered_and_stale_rebuilds_without_it(sample_run, tmp_path):
    """On a copy: part 2's zip deleted from the mirror after it was built.  The dry run says it would unregister
    it and plans filtered_pairs and below (not the part); --stale unregisters it, rebuilds filtered_pairs without
    its rows, and a second --stale --dry-run has nothing left to do for the data stages (issue 27 item 6, 29 item 4)."""
    import shutil

    import dagster as dg

    home, env, _ = sample_run
    copy = tmp_path / "copy"
    shutil.copytree(home.parent, copy, ignore=shutil.ignore_patterns("*.sock"))
    copied_env = {**env, "REVERSE_SD_HOME": str(copy / "data"), "DAGSTER_HOME": str(copy / "dagster_home")}
    (mirror,) = [p for p in (copy / "data" / "sample_mirror").glob("*x*") if p.is_dir()]
    (mirror / "images" / "part-000002.zip").unlink()
    dry = _run_cli(["materialize", "--stale", "--dry-run"], copied_env, timeout=300)
    assert "would unregister 1 part the source no longer lists: part-000002" in dry.stdout, dry.stdout
    plan = _stale_plan(copied_env)
    assert "diffusiondb_parts" not in plan and any(n.startswith("filtered_pairs") for n in plan), plan
    done = _run_cli(["materialize", "--stale", "--select", "diffusiondb_parts,filtered_pairs"], copied_env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unregistered 1 part" in done.stdout
    pairs = pl.read_parquet(copy / "data" / "filtered_pairs.parquet")
    assert pairs.height > 0 and "part-000002" not in set(pairs["part"])
    with dg.DagsterInstance.from_config(copied_env["DAGSTER_HOME"]) as instance:
        assert "part-000002" not in instance.get_dynamic_partitions("diffusiondb_part")


def test_wrong_profile_fails_with_one_line(sample_run):
    _, env, _ = sample_run
    bad = _run_cli(["materialize"], {**env, "REVERSE_SD_PROFILE": "bogus"})
    assert bad.returncode == 2
    assert "REVERSE_SD_PROFILE" in bad.stderr
    assert "Traceback" not in bad.stderr


def _sample_images(home: Path, target: Path, n: int = 3) -> list[Path]:
    """A few of the sample's images written as PNG/JPEG files, as a user would have them."""
    import io

    from PIL import Image

    frame = pl.read_parquet(home / "diffusiondb_parts" / "part-000001.parquet").head(n)
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image_id, data) in enumerate(frame.select("image_id", "image").iter_rows()):
        image = Image.open(io.BytesIO(data))
        path = target / (Path(image_id).stem + (".png" if i % 2 == 0 else ".jpg"))
        image.save(path)
        paths.append(path)
    return paths


def test_predict_table_skips_broken_file(sample_run, tmp_path):
    home, env, _ = sample_run
    images = _sample_images(home, tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    result = _run_cli(["predict", str(tmp_path / "imgs"), "--top-k", "3", "--format", "table", "--quiet"], env, 300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    for path in images:
        assert str(path) in result.stdout
    assert result.stdout.count("  1. ") == len(images)


def test_predict_json_topk_sorted_and_kaggle_rows(sample_run, tmp_path):
    home, env, _ = sample_run
    images = _sample_images(home, tmp_path / "imgs", n=2)
    result = _run_cli(
        ["predict", *map(str, images), "--format", "json", "--embeddings", "--top-k", "4", "--quiet"], env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.startswith("note: these are toy models trained on synthetic images")
    records = json.loads(result.stdout)
    assert len(records) == 2
    for record in records:
        scores = [p["cosine"] for p in record["prompts"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert len(record["embedding"]) == 384
        assert record["words"] and all(0 <= w["probability"] <= 1 for w in record["words"])  # the MLC heads' words
    kaggle = _run_cli(["predict", *map(str, images), "--format", "kaggle", "--quiet"], env, timeout=300)
    assert kaggle.returncode == 0, kaggle.stderr[-2000:]
    lines = kaggle.stdout.strip().splitlines()
    assert lines[0] == "imgId_eId,val"
    assert len(lines) == 1 + 384 * 2
    assert lines[1].startswith(images[0].stem + "_0,")


def test_predict_with_a_chosen_captioner(sample_run, tmp_path):
    """--captioner picks the captioner (and implies --generate); one that was not trained is named."""
    home, env, _ = sample_run
    images = _sample_images(home, tmp_path / "imgs", n=2)
    result = _run_cli(["predict", *map(str, images), "--format", "json", "--captioner", "blip", "--quiet"], env, 300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(isinstance(r["generated"], str) for r in json.loads(result.stdout))
    missing = _run_cli(["predict", str(images[0]), "--captioner", "blip2", "--quiet"], env, 300)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "'blip2'" in missing.stderr and "trained_captioners" in missing.stderr


def test_predict_without_models_names_the_asset(tmp_path):
    image_dir = tmp_path / "imgs"
    image_dir.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(image_dir / "a.png")
    env = {**os.environ, "REVERSE_SD_HOME": str(tmp_path / "empty")}
    result = _run_cli(["predict", str(image_dir)], env, timeout=300)
    assert result.returncode == 2
    assert "prompt_bank" in result.stderr and "Traceback" not in result.stderr


def test_predict_reads_trained_models_from_an_object_store_root(sample_run, tmp_path):
    """A storage root on an object store (memory:// here, s3:// in a deployment) serves `reverse-sd predict`
    as a local one does: the same method, the same embeddings and generated prompts for the same images."""
    import uuid

    import fsspec
    import numpy as np

    from pipeline.predictor import PromptPredictor

    home, _, _ = sample_run
    fs, bucket = fsspec.filesystem("memory"), f"/predict-{uuid.uuid4().hex}/home"
    skip = {"diffusiondb_parts", "sample_mirror", "image_cache", "downloads"}  # inputs of training, not of predict
    try:
        for entry in home.iterdir():
            if entry.name not in skip:
                fs.put(str(entry), f"{bucket}/{entry.name}", recursive=entry.is_dir())
        images = _sample_images(home, tmp_path / "imgs", n=2)
        local = PromptPredictor(str(home), device="cpu", captioner="auto")
        remote = PromptPredictor(f"memory:/{bucket}", device="cpu", captioner="auto")
        assert remote.method == local.method == "ensemble+dakl"
        got = list(remote.predict_files(images, generate=True))
        want = list(local.predict_files(images, generate=True))
        for (_, e_remote, err, g_remote), (_, e_local, _, g_local) in zip(got, want):
            assert err is None and g_remote == g_local
            assert np.allclose(e_remote, e_local, atol=1e-6)
    finally:
        fs.rm(bucket.rsplit("/", 1)[0], recursive=True)
