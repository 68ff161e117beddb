"""What the UI and evaluation.html show: Table 1 with the paper's figures as a typed table, rounded figures,
Dagster's standard table entries, the plots; all from the pure functions the assets call."""

from __future__ import annotations

import base64
import json
import math

import dagster as dg
import numpy as np
import polars as pl
import pytest

from assets.common import metadata_table, rounded_metadata, table_metadata
from assets.plots import bar_plot_png, data_uri, gallery_png, md_image, zoomed_limits
from pipeline.evaluation.report import (
    PAPER_DAKL,
    PAPER_KNN,
    PAPER_TABLE,
    TABLE1_COLUMNS,
    Report,
    score_test_split,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

COSINE = {
    "vit/baseline": 0.612345678,
    "vit/mlc": 0.62,
    "vit/mlc_cl": 0.63,
    "swin/baseline": 0.6,
    "ensemble/median/baseline": 0.64,
    "ensemble/median/mlc_cl": 0.65,
    "ensemble/mean/mlc_cl": 0.645,
    "ensemble/median": 0.66,
    "ensemble/mean": 0.655,
    "ensemble+dakl": 0.667777,
    "baseline/mean_embedding": 0.5,
    "baseline/knn": 0.55,
}


def _report(**kwargs) -> Report:
    return Report(profile="sample", split="test", cosine=dict(COSINE), counts={"test": 10, "train": 80}, **kwargs)


def test_table1_records_put_the_papers_figure_beside_each_cell():
    records = {r["model"]: r for r in _report().table1_records()}
    assert list(records) == ["vit", "swin", "clip", "unet", "ensemble median", "ensemble mean", "ensemble + DAKL"]
    names = [name for name, _ in TABLE1_COLUMNS]
    assert names == [
        "model",
        "baseline",
        "baseline (paper)",
        "+ MLC",
        "+ MLC (paper)",
        "+ MLC + CL",
        "+ MLC + CL (paper)",
    ]
    assert all(list(r) == names for r in records.values())
    assert records["vit"]["baseline"] == 0.6123  # rounded to 4 decimals
    assert records["vit"]["baseline (paper)"] == PAPER_TABLE["vit"]["baseline"]
    assert records["swin"]["+ MLC"] is None and records["swin"]["+ MLC (paper)"] == PAPER_TABLE["swin"]["mlc"]
    assert records["clip"]["baseline"] is None and records["clip"]["+ MLC + CL (paper)"] == 0.6750
    assert records["ensemble median"]["+ MLC + CL"] == 0.65
    assert records["ensemble median"]["+ MLC + CL (paper)"] == PAPER_TABLE["ensemble"]["mlc_cl"]
    assert records["ensemble mean"]["+ MLC + CL (paper)"] is None  # the paper reports the median only
    dakl = records["ensemble + DAKL"]
    assert dakl["+ MLC + CL"] == 0.6678 and dakl["+ MLC + CL (paper)"] == PAPER_DAKL
    assert dakl["baseline"] is None and dakl["baseline (paper)"] is None


def test_baseline_records_round_and_cite_the_paper():
    records = {r["baseline"].split(" (")[0]: r for r in _report().baseline_records()}
    assert records["mean training embedding"] == {
        "baseline": "mean training embedding",
        "test cosine": 0.5,
        "paper": None,
    }
    knn = next(r for name, r in records.items() if name.startswith("k-NN"))
    assert knn["test cosine"] == 0.55 and knn["paper"] == PAPER_KNN
    missing = Report(profile="sample", split="test", cosine={}).baseline_records()
    assert all(r["test cosine"] is None for r in missing)


def test_metadata_table_is_a_typed_dagster_table_with_four_decimals():
    value = metadata_table(_report().table1_records(), TABLE1_COLUMNS)
    assert isinstance(value, dg.TableMetadataValue)
    assert [(c.name, c.type) for c in value.schema.columns] == TABLE1_COLUMNS
    vit = value.records[0].data
    assert vit["model"] == "vit" and vit["baseline"] == 0.6123
    nan = metadata_table(
        [{"x": float("nan"), "y": np.float32(0.123456), "z": np.bool_(True)}],
        [("x", "float"), ("y", "float"), ("z", "bool")],
    )
    assert nan.records[0].data == {"x": None, "y": 0.1235, "z": True}  # JSON-safe: the UI parses records as JSON
    json.dumps(nan.records[0].data, allow_nan=False)


def test_table_metadata_is_dagsters_row_count_and_column_schema():
    frame = pl.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "split": ["train", "val", "test"],
            "embedding": pl.Series([[1.0, 0.0]] * 3, dtype=pl.Array(pl.Float32, 2)),
        }
    )
    metadata = table_metadata(frame)
    assert metadata["dagster/row_count"] == dg.MetadataValue.int(3)
    schema = metadata["dagster/column_schema"].schema
    assert [(c.name, c.type) for c in schema.columns] == [
        ("image_id", "String"),
        ("split", "String"),
        ("embedding", "Array(Float32, shape=(2,))"),
    ]
    assert "dagster/partition_row_count" not in metadata
    assert table_metadata(frame, partitioned=True)["dagster/partition_row_count"] == dg.MetadataValue.int(3)
    # what the UI's catalog reads
    assert dg.MaterializeResult(metadata=metadata).metadata["dagster/row_count"].value == 3


def test_scalar_metadata_is_rounded():
    rounded = rounded_metadata({"a": 0.771318435, "b": np.float64(0.123449), "n": 7, "s": "x", "ok": True})
    assert rounded == {"a": 0.7713, "b": 0.1234, "n": 7, "s": "x", "ok": True}
    assert isinstance(rounded["b"], float)


def test_score_test_split_names_every_figure_like_evaluation_json():
    rng = np.random.default_rng(0)
    test_y, train_y = rng.normal(size=(6, 4)), rng.normal(size=(20, 4))
    scores = score_test_split(
        test_y,
        train_y,
        {"vit/baseline": test_y, "vit/mlc": -test_y},
        {("median", "baseline"): test_y, ("median", "best"): test_y, ("mean", "best"): test_y},
        test_y,
    )
    assert list(scores.cosine) == [
        "vit/baseline",
        "vit/mlc",
        "ensemble/median/baseline",
        "ensemble/median",
        "ensemble/mean",
        "ensemble+dakl",
        "baseline/mean_embedding",
    ]
    assert scores.cosine["vit/baseline"] == pytest.approx(1.0) and scores.cosine["vit/mlc"] == pytest.approx(-1.0)
    assert scores.per_row["vit/baseline"].shape == (6,)


def test_html_holds_the_tables_the_paper_and_the_figures():
    png = bar_plot_png({"vit/baseline": 0.61, "ensemble+dakl": 0.66}, "t", "cosine", reference=0.5)
    page = _report(figures={"Test cosine per model": data_uri(png)}, notes=["a note"]).html()
    assert "<table>" in page and "+ MLC + CL (paper)" in page
    assert "<td class='num'>0.6123</td>" in page  # 4 decimals
    assert "<td class='num paper'>0.6526</td>" in page  # the paper's vit baseline beside it
    assert f"<td class='num paper'>{PAPER_DAKL:.4f}</td>" in page
    assert "<img alt='Test cosine per model' src='data:image/png;base64," in page
    assert "a note" in page and "Baselines" in page


def test_evaluation_json_keeps_its_schema():
    data = json.loads(_report().to_json())
    assert data["split"] == "test" and data["cosine"] == COSINE  # unrounded, as ARCHITECTURE.md states
    assert set(data) == {"split", "profile", "cosine", "counts"}


def test_bar_chart_axis_is_zoomed_on_the_values_and_the_baseline():
    low, high = zoomed_limits([0.70, 0.72, 0.75, 0.62])
    assert 0.5 < low < 0.62 and 0.75 < high < 0.9  # not 0..max
    assert zoomed_limits([0.7, 0.7]) == pytest.approx((0.695, 0.7125))
    assert zoomed_limits([]) is None


def test_plots_are_pngs_that_embed_as_markdown_images():
    import io

    from PIL import Image

    values = {f"m{i}": 0.6 + i / 100 for i in range(22)} | {"baseline/mean_embedding": 0.55, "x": math.nan}
    png = bar_plot_png(values, "test mean cosine", "cosine", reference=0.55, reference_label="mean embedding")
    assert png.startswith(PNG_MAGIC)
    markdown = md_image(png, "bars")
    assert markdown.startswith("![bars](data:image/png;base64,")
    assert base64.b64decode(markdown[len("![bars](data:image/png;base64,") : -1]) == png
    image = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image, "PNG")
    gallery = gallery_png([image.getvalue()] * 2, ["true prompt: a red square\n1. (0.900) a red square"] * 2)
    width, height = Image.open(io.BytesIO(gallery)).size
    assert gallery.startswith(PNG_MAGIC) and height > width / 2  # one row per image


def test_table_1_in_the_ui_keeps_trailing_zeros_and_every_column():
    """The UI's Table 1 showed 0.659 where evaluation.html has 0.6590, and lost its last column: the typed
    table's figures are fixed-decimal text now, and a Markdown rendition holds every column."""
    from assets.evaluation import _report_metadata

    report = Report(profile="sample", split="test", cosine={"vit/baseline": 0.659, "ensemble+dakl": 0.65})
    metadata = _report_metadata(report, {}, "reports")
    vit = metadata["evaluation_table"].records[0].data
    assert vit["baseline"] == "0.6590" and vit["baseline (paper)"] == "0.6526" and vit["+ MLC"] == "-"
    assert "0.6590" in report.html()  # what the page shows, the UI shows
    markdown = metadata["table_1"].value
    lines = markdown.strip().splitlines()
    names = [name for name, _ in TABLE1_COLUMNS]
    assert lines[0] == "| " + " | ".join(names) + " |"
    assert all(line.count("|") == len(names) + 1 for line in lines), lines  # no row short of a column
    assert "| vit | 0.6590 | 0.6526 | - | 0.6539 | - | 0.6550 |" in lines
    assert lines[-1] == "| ensemble + DAKL | - | - | - | - | 0.6500 | 0.6917 |"  # the last column is there
