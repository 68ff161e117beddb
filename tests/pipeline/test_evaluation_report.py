"""The report's table, JSON keys and baselines on tiny made-up inputs."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from pipeline.evaluation.report import Report
from pipeline.metrics import knn_baseline, mean_cosine, mean_embedding_baseline, row_cosines
from pipeline.training.pairs import join_pairs


def _unit(rng, n, d=8):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_row_cosines_and_mean_cosine_agree():
    rng = np.random.default_rng(0)
    a, b = _unit(rng, 20), _unit(rng, 20)
    assert np.allclose(row_cosines(a, a), 1.0)
    assert row_cosines(a, b).mean() == pytest.approx(mean_cosine(a * 3.0, b))


def test_knn_baseline_recovers_neighbours_targets():
    rng = np.random.default_rng(1)
    features = _unit(rng, 30, 16)
    targets = _unit(rng, 30, 8)
    predictions = knn_baseline(features, targets, features, k=1)
    assert np.allclose(predictions, targets, atol=1e-6)


def test_mean_embedding_baseline_is_cosine_to_normalised_mean():
    rng = np.random.default_rng(2)
    train, test = _unit(rng, 50), _unit(rng, 10)
    mean = train.mean(0) / np.linalg.norm(train.mean(0))
    assert mean_embedding_baseline(train, test) == pytest.approx(float((test @ mean).mean()))


def test_report_contains_table_and_architecture_json_keys():
    cosine = {
        "vit/baseline": 0.41,
        "vit/mlc": 0.42,
        "vit/mlc_cl": 0.43,
        "ensemble/median": 0.5,
        "ensemble/mean": 0.49,
        "ensemble+dakl": 0.51,
        "baseline/mean_embedding": 0.3,
        "baseline/knn": 0.35,
    }
    report = Report(profile="sample", split="test", cosine=cosine, counts={"test": 10})
    md = report.markdown()
    assert "| vit | 0.4100 (0.6526) | 0.4200 (0.6539) | 0.4300 (0.6550) |" in md
    assert "sample-profile figures are not DiffusionDB figures" in md
    assert "0.5100" in md and "0.3000" in md and "0.3500" in md
    data = json.loads(report.to_json())
    assert data["split"] == "test"
    assert data["cosine"]["ensemble+dakl"] == 0.51
    assert "<table>" in report.html() and "0.4300" in report.html()


def test_report_shows_generated_prompt_scores_beside_the_kaggle_reference():
    row = {
        "captioner": "blip",
        "variant": "tiny",
        "sbert_cosine": 0.6512,
        "refclip_score": 0.0012,
        "clip_s": 0.0006,
        "test_images": 77,
        "kaggle_first_place": 0.66316,
    }
    report = Report(profile="sample", split="test", cosine={"caption/blip": 0.6512}, generation=[row])
    assert "| blip (tiny) | 0.6512 | 0.0012 | 0.66316 |" in report.markdown()
    assert "0.6512" in report.html() and "RefCLIPScore" in report.html()
    assert json.loads(report.to_json())["generation"][0]["sbert_cosine"] == 0.6512
    assert "generated prompts" not in Report(profile="sample", split="test", cosine={}).markdown()


def test_join_pairs_requires_every_embedding():
    pairs = pl.DataFrame({"image_id": ["a", "b"], "prompt": ["x", "y"], "split": ["train", "val"]})
    embeddings = pl.DataFrame({"prompt": ["x"], "embedding": [[1.0, 0.0]]})
    with pytest.raises(ValueError, match="no prompt embedding"):
        join_pairs(pairs, embeddings, None)


# ---- on the materialized sample graph (the session fixture of tests/conftest.py, ~3-4 minutes once) ---------

TABLE_ASSETS = {
    "filtered_pairs": None,
    "prompt_embeddings": None,
    "vocabulary": None,
    "vocabulary_labels": None,
    "ensemble_predictions": None,
    "kmeans_centroids": None,
    "dakl_predictions": None,
    "prompt_bank": None,
    "diffusiondb_parts": "partitioned",
    "difficulty_scores": "partitioned",
    "model_predictions": "partitioned",
    "caption_predictions": "partitioned",
}


def _latest_metadata(instance, key: str) -> dict:
    import dagster as dg

    event = instance.get_latest_materialization_event(dg.AssetKey(key))
    assert event is not None, f"{key} was never materialized"
    return dict(event.asset_materialization.metadata)


def test_the_report_is_the_landing_page(sample_graph_run):
    """evaluation_report's UI metadata: Table 1 as a typed table that agrees with evaluation.json (exactly 4
    decimals, as text, the paper beside), the plots and the gallery as PNG images, scalars rounded; the same
    content in evaluation.html."""
    import dagster as dg

    home, env, _ = sample_graph_run
    cosine = json.loads((home / "reports" / "evaluation.json").read_text())["cosine"]
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        metadata = _latest_metadata(instance, "evaluation_report")
    table = metadata["evaluation_table"]
    assert isinstance(table, dg.TableMetadataValue)
    assert [c.name for c in table.schema.columns][:3] == ["model", "baseline", "baseline (paper)"]
    rows = {r.data["model"]: r.data for r in table.records}
    for backbone in ("vit", "swin", "clip", "unet"):
        assert rows[backbone]["baseline"] == f"{cosine[f'{backbone}/baseline']:.4f}"  # fixed decimals, as text
        assert rows[backbone]["+ MLC + CL (paper)"] not in (None, "-")
    assert rows["ensemble + DAKL"]["+ MLC + CL"] == f"{cosine['ensemble+dakl']:.4f}"
    assert "| ensemble + DAKL |" in metadata["table_1"].value  # Table 1 as Markdown, every column
    assert isinstance(metadata["baselines"], dg.TableMetadataValue)
    images = {
        k: v.value
        for k, v in metadata.items()
        if isinstance(v, dg.MarkdownMetadataValue) and "data:image/png;base64," in v.value
    }
    assert {"plot_test_cosine", "gallery"} <= set(images), sorted(metadata)
    floats = {k: v.value for k, v in metadata.items() if isinstance(v, dg.FloatMetadataValue)}
    assert floats and all(v == round(v, 4) for v in floats.values()), floats
    assert floats["test_cosine/ensemble+dakl"] == round(cosine["ensemble+dakl"], 4)
    page = (home / "reports" / "evaluation.html").read_text()
    assert page.count("<img ") >= 2 and "src='data:image/png;base64," in page
    assert f"{cosine['vit/baseline']:.4f}" in page and "+ MLC + CL (paper)" in page


def test_every_table_asset_has_row_count_and_column_schema(sample_graph_run):
    import dagster as dg
    import polars as pl

    home, env, _ = sample_graph_run
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        for key, kind in TABLE_ASSETS.items():
            metadata = _latest_metadata(instance, key)
            assert isinstance(metadata.get("dagster/row_count"), dg.IntMetadataValue), (key, sorted(metadata))
            schema = metadata["dagster/column_schema"].schema
            assert schema.columns, key
            if kind is None:
                frame = pl.read_parquet(home / f"{key}.parquet")
                assert metadata["dagster/row_count"].value == frame.height, key
                assert [c.name for c in schema.columns] == frame.columns, key
            else:
                assert metadata["dagster/partition_row_count"].value == metadata["dagster/row_count"].value
        check = instance.get_latest_asset_check_evaluation_record(
            dg.AssetCheckKey(dg.AssetKey("model_predictions"), "beats_mean_embedding_baseline")
        )
    evaluation = check.event.dagster_event.event_specific_data
    # One evaluation per model partition, naming its partition (the UI's partition column), with its figures.
    assert evaluation.partition == evaluation.metadata["model"].value
    cosine, baseline = evaluation.metadata["val_cosine"].value, evaluation.metadata["baseline_val_cosine"].value
    assert cosine == round(cosine, 4) and evaluation.passed == (cosine > baseline)
