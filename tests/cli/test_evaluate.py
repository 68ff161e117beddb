"""`reverse-sd evaluate` on a tiny storage root (tests/conftest.py write_tiny_predict_home): per-image cosines
between the predicted embedding and the SBERT embedding of the prompt read from the image, and the mean."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_tiny_predict_home
from own_images import write_a1111, write_comfy, write_novelai, write_plain

from cli import main as cli
from pipeline.evaluation.own_images import summarise

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    return write_tiny_predict_home(tmp_path_factory.mktemp("tiny_home"), seed=2)


@pytest.fixture()
def folder(tmp_path):
    write_a1111(tmp_path / "shots" / "a.png", "a red cube on a table", colour="red")
    write_a1111(tmp_path / "shots" / "b.jpg", "a blue sphere in the sky", colour="blue")
    write_comfy(tmp_path / "shots" / "c.png")
    write_novelai(tmp_path / "shots" / "n.png")
    write_plain(tmp_path / "shots" / "plain.png")
    return tmp_path / "shots"


def test_evaluate_prints_per_image_cosines_and_the_mean(tiny_home, folder, monkeypatch, capsys):
    monkeypatch.setenv("REVERSE_SD_HOME", str(tiny_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(["evaluate", str(folder), "--model", "vit", "--format", "jsonl"])
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 1  # plain.png has no prompt: skipped, named
    images = [r for r in records if not r.get("summary") and r.get("cosine") is not None]
    assert sorted(r["path"].rsplit("/", 1)[1] for r in images) == ["a.png", "b.jpg", "c.png", "n.png"]
    assert all(
        -1.0 <= r["cosine"] <= 1.0 and r["model"] == "vit" and r["cosines"] == {"vit": r["cosine"]} for r in images
    )
    skipped = [r for r in records if r.get("skipped") and not r.get("summary")]
    assert [(r["path"].rsplit("/", 1)[1], r["skipped"]) for r in skipped] == [("plain.png", "no prompt metadata")]
    summary = records[-1]
    assert summary["summary"] is True and summary["n"] == 4 and summary["skipped"] == 1
    assert summary["mean"] == pytest.approx(np.mean([r["cosine"] for r in images]), abs=1e-6)
    assert summary["generators"]["AUTOMATIC1111"]["n"] == 2 and summary["generators"]["ComfyUI"]["n"] == 1

    assert cli.main(["evaluate", str(folder), "--model", "vit", "--format", "table"]) == 1
    table = capsys.readouterr().out
    assert "mean cosine" in table and "over 4 images (vit)" in table and "AUTOMATIC1111:" in table


def test_evaluate_refuses_a_wrong_model_and_a_folder_without_prompts(tiny_home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REVERSE_SD_HOME", str(tiny_home))
    assert cli.main(["evaluate", str(tmp_path), "--model", "resnet"]) == 2
    assert "--model 'resnet' is not a model" in capsys.readouterr().err
    write_plain(tmp_path / "only" / "p.png")
    assert cli.main(["evaluate", str(tmp_path / "only"), "--model", "vit"]) == 2
    assert "no image with a known prompt" in capsys.readouterr().err


def test_summarise_by_model_and_generator():
    rows = [
        {"generator": "A", "cosines": {"ensemble": 0.5, "vit": 0.4}},
        {"generator": "A", "cosines": {"ensemble": 0.7, "vit": 0.2}},
        {"generator": "B", "cosines": {"ensemble": 0.3, "vit": 0.3}},
    ]
    summary = summarise(rows, ["ensemble", "vit"], skipped=2)
    assert (
        summary["n"] == 3 and summary["mean"] == pytest.approx(0.5) and summary["models"]["vit"] == pytest.approx(0.3)
    )
    assert summary["generators"] == {
        "A": {"n": 2, "mean": pytest.approx(0.6)},
        "B": {"n": 1, "mean": pytest.approx(0.3)},
    }
