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
