"""The report's figures per data source (diffusiondb / images): on a small hand-made test split of two sources,
every per-source figure is the hand computation on that source's rows; the JSON, Markdown, HTML and the UI's
tables carry them, and one source alone still gets its named row."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.evaluation.by_source import mean_by_source, pooled_mean, score_by_source
from pipeline.evaluation.report import (
    SOURCE_TEXT_COLUMNS,
    Report,
    score_test_split,
)

# Five test pairs in 2-d: three from DiffusionDB, two from the user's own images.
SOURCES = ["diffusiondb", "images", "diffusiondb", "images", "diffusiondb"]
TARGETS = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [0, 1]], dtype=np.float64)
# vit/baseline predicts [1, 0] everywhere: cosine 1 on rows 0 and 2, 0 on rows 1, 3, 4.
VIT = np.array([[1, 0]] * 5, dtype=np.float64)
# the median ensemble predicts [1, 1] (cosine 1/sqrt 2 on every row), DAKL the target itself but for row 3.
MEDIAN = np.ones((5, 2))
DAKL = TARGETS.copy()
DAKL[3] = [1, 0]
TRAIN = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float64)  # mean [0.75, 0.25]: direction (3, 1)/sqrt 10


def _by_source(sources=SOURCES, extra_rows=None):
    return score_by_source(
        sources, TARGETS, TRAIN, {"vit/baseline": VIT}, {("median", "best"): MEDIAN}, DAKL, extra_rows=extra_rows
    )


def test_each_sources_figures_equal_the_hand_computation():
    knn = (np.array([0.5, 0.25, 0.75]), ["images", "diffusiondb", "diffusiondb"])  # rows scored outside
    by_source = _by_source(extra_rows={"baseline/knn": knn})
    assert list(by_source) == ["diffusiondb", "images"]
    dd, own = by_source["diffusiondb"], by_source["images"]
    # diffusiondb: rows 0, 2, 4 (targets e1, e1, e2); images: rows 1, 3 (targets e2, e2)
    assert dd["vit/baseline"] == pytest.approx((1 + 1 + 0) / 3)
    assert own["vit/baseline"] == pytest.approx(0.0)
    assert dd["ensemble/median"] == pytest.approx(1 / np.sqrt(2))
    assert own["ensemble/median"] == pytest.approx(1 / np.sqrt(2))
    assert dd["ensemble+dakl"] == pytest.approx(1.0)
    assert own["ensemble+dakl"] == pytest.approx((1 + 0) / 2)
    # the mean training embedding (3, 1)/sqrt 10 against e1 is 3/sqrt 10, against e2 1/sqrt 10
    assert dd["baseline/mean_embedding"] == pytest.approx((3 + 3 + 1) / 3 / np.sqrt(10))
    assert own["baseline/mean_embedding"] == pytest.approx(1 / np.sqrt(10))
    assert dd["baseline/knn"] == pytest.approx((0.25 + 0.75) / 2)
    assert own["baseline/knn"] == pytest.approx(0.5)
    # pooled back by test pairs, the per-source figures give the overall ones
    overall = score_test_split(TARGETS, TRAIN, {"vit/baseline": VIT}, {("median", "best"): MEDIAN}, DAKL).cosine
    for key in overall:
        assert pooled_mean({s: by_source[s][key] for s in by_source}, {"diffusiondb": 3, "images": 2}) == (
            pytest.approx(overall[key])
        )


def test_mean_by_source_and_its_checks():
    assert mean_by_source(np.array([1.0, 2.0, 4.0]), ["b", "a", "b"]) == {"a": 2.0, "b": 2.5}
    with pytest.raises(ValueError, match="2 values but 3 sources"):
        mean_by_source(np.array([1.0, 2.0]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="4 sources for 5 test rows"):
        _by_source(sources=SOURCES[:4])


def _report(by_source: dict, counts_by_source: dict) -> Report:
    overall = score_test_split(TARGETS, TRAIN, {"vit/baseline": VIT}, {("median", "best"): MEDIAN}, DAKL).cosine
    return Report(
        profile="sample",
        split="test",
        cosine=overall,
        counts={"test": 5, "train": 4},
        cosine_by_source=by_source,
        counts_by_source=counts_by_source,
    )


def test_the_report_carries_the_per_source_figures_in_json_markdown_html_and_the_ui():
    from assets.evaluation import _report_metadata

    by_source = _by_source()
    counts = {"diffusiondb": {"test": 3, "train": 3}, "images": {"test": 2, "train": 1}}
    report = _report(by_source, counts)
    data = json.loads(report.to_json())
    assert data["cosine_by_source"]["images"]["ensemble+dakl"] == pytest.approx(0.5)
    assert data["cosine_by_source"]["diffusiondb"]["vit/baseline"] == pytest.approx(2 / 3)
    assert data["counts_by_source"] == counts
    assert data["cosine"] == report.cosine  # the overall figures, unchanged

    markdown = report.by_source_markdown()
    assert markdown.splitlines()[0] == "| figure | all | diffusiondb | images |"
    assert "| test pairs | 5 | 3 | 2 |" in markdown
    assert "| ensemble+dakl | 0.8000 | 1.0000 | 0.5000 |" in markdown
    assert "| vit/baseline | 0.4000 | 0.6667 | 0.0000 |" in markdown
    assert "## Per data source" in report.markdown() and markdown in report.markdown()
    assert "<h2>Per data source</h2>" in report.html() and "<td class='num'>0.6667</td>" in report.html()

    metadata = _report_metadata(report, {}, "reports")
    table = metadata["cosine_by_source"]
    assert [c.name for c in table.schema.columns] == [name for name, _ in SOURCE_TEXT_COLUMNS]
    rows = {r.data["source"]: r.data for r in table.records}
    assert rows["images"]["test pairs"] == 2 and rows["images"]["ensemble + DAKL"] == "0.5000"
    assert rows["diffusiondb"]["ensemble median"] == "0.7071" and rows["diffusiondb"]["k-NN"] == "-"
    assert "| ensemble+dakl | 0.8000 | 1.0000 | 0.5000 |" in metadata["table_by_source"].value


def test_one_source_alone_still_names_it():
    from assets.evaluation import _report_metadata

    sources = ["images"] * 5
    report = _report(_by_source(sources=sources), {"images": {"test": 5, "train": 4}})
    assert list(report.cosine_by_source) == ["images"]
    assert report.cosine_by_source["images"] == pytest.approx(report.cosine)  # the same rows, the same figures
    rows = _report_metadata(report, {}, "reports")["cosine_by_source"].records
    assert [r.data["source"] for r in rows] == ["images"] and rows[0].data["test pairs"] == 5
    assert set(json.loads(report.to_json())["cosine_by_source"]) == {"images"}
