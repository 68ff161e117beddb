"""The report on the materialized sample: what the UI shows (Table 1, plots, every table's schema)."""

from __future__ import annotations

import json

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
