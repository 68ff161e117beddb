"""The generation assets (trained_captioners, caption_predictions, unet_swap_report) materialized with Dagster on
a tiny generated sample (1 part x 100 images), after the data assets and difficulty_scores[vit] they read.

The unet checkpoint is written directly in trained_models' layout (trained_models/unet/mlc_cl/ckpt-*.safetensors)
from the tiny backbone with its encoder moved off its initial weights: training it here would triple the run.
"""

from __future__ import annotations

import io
import json

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from assets.data import DATA_ASSETS, register_parts
from assets.evaluation import caption_report_rows
from assets.generation import GENERATION_ASSETS
from assets.own_images import IMAGES_ASSETS
from assets.training import TRAINING_ASSETS, difficulty_scores
from pipeline.captioning import CAPTIONERS
from pipeline.data.sample_data import generate_sample_mirror
from resources import (
    ComputeResource,
    DiffusionDBResource,
    ImagesResource,
    SentenceEncoderResource,
    StorageResource,
    Table,
    Tables,
    with_tables,
)


@pytest.fixture(scope="module")
def materialized(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the difficulty pass runs tiny models too; one thread on a shared box
    root = tmp_path_factory.mktemp("generation")
    mirror, home = root / "mirror", root / "home"
    generate_sample_mirror(mirror, n_parts=1, images_per_part=100, seed=0)
    resources = with_tables(
        {
            "storage": StorageResource(root=str(home)),
            "diffusiondb": DiffusionDBResource(location=str(mirror)),
            "sentence_encoder": SentenceEncoderResource(),
            "compute": ComputeResource(device="cpu"),
            "images": ImagesResource(),  # for the parents not run here (image_folders, trained_models)
            "pipes": dg.PipesSubprocessClient(),
        }
    )
    graph = [*IMAGES_ASSETS, *DATA_ASSETS, *TRAINING_ASSETS, *GENERATION_ASSETS]  # what the selected assets read
    with dg.instance_for_test() as instance:
        (part,) = register_parts(instance, resources["diffusiondb"])
        run = lambda assets, key=None: dg.materialize(  # noqa: E731
            graph, selection=assets, resources=resources, instance=instance, partition_key=key, raise_on_error=True
        )
        run([a for a in DATA_ASSETS if a.key.to_user_string() == "diffusiondb_parts"], part)
        run([a for a in DATA_ASSETS if a.key.to_user_string() not in ("diffusiondb_source", "diffusiondb_parts")])
        run([difficulty_scores], "vit")
        _write_unet_checkpoint(resources["storage"])
        captions = run(GENERATION_ASSETS[:2], "blip")
        swap = run(GENERATION_ASSETS[2:])
        yield resources["storage"], home, captions, swap
    torch.set_num_threads(before)


def _write_unet_checkpoint(storage: StorageResource) -> None:
    from pipeline.evaluation.unet_swap import encoder_from_model
    from pipeline.models import create_model
    from pipeline.training.checkpoint import save_checkpoint
    from pipeline.training.loop import seed_everything

    seed_everything(0)
    model = create_model("unet", variant="tiny", vocab_size=8)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in encoder_from_model(model).parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    save_checkpoint(storage.path("trained_models", "unet", "mlc_cl"), model, index=1)


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict:
    events = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == key]
    assert len(events) == 1
    return {k: v.value for k, v in events[0].materialization.metadata.items()}


def test_captioner_trained_with_curriculum_and_saved(materialized):
    storage, home, captions, _ = materialized
    meta = _metadata(captions, "trained_captioners")
    assert meta["difficulty_source"] == "rank-average of difficulty_scores: vit"
    train = storage.read_table("filtered_pairs").filter(pl.col("split") == "train").height
    assert meta["stage_0_size"] < meta["stage_1_size"] < meta["stage_2_size"] == meta["stage_3_size"] == train
    assert np.isfinite(meta["final_val_lm_loss"])
    assert list((home / "trained_captioners" / "blip").glob("ckpt-*.safetensors"))
    assert (home / "trained_captioners" / "blip" / "tokenizer" / "tokenizer_config.json").exists()


def test_caption_predictions_table_scores_and_check(materialized):
    storage, home, captions, _ = materialized
    table = pl.read_parquet(home / "caption_predictions" / "blip.parquet")
    test = storage.read_table("filtered_pairs").filter(pl.col("split") == "test")
    assert sorted(table["image_id"]) == sorted(test["image_id"]) and table.height > 0
    assert set(table.columns) >= {"prompt", "generated", "sbert_cosine", "clip_s", "refclip_s", "embedding"}
    assert all(isinstance(g, str) for g in table["generated"])
    assert table["sbert_cosine"].is_between(-1.0, 1.0).all() and (table["refclip_s"] >= 0).all()
    # the stored cosine is the generated prompt's embedding against the true prompt's
    truth = table.select("image_id", "embedding").join(
        storage.read_table("prompt_embeddings")
        .join(test.select("prompt", "image_id"), on="prompt")
        .select("image_id", pl.col("embedding").alias("target")),
        on="image_id",
    )
    a, b = truth["embedding"].to_numpy(), truth["target"].to_numpy()
    expected = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    got = table.join(truth.select("image_id"), on="image_id", maintain_order="right")["sbert_cosine"].to_numpy()
    assert np.allclose(got, expected, atol=1e-5)
    meta = _metadata(captions, "caption_predictions")
    assert meta["sbert_cosine"] == pytest.approx(float(table["sbert_cosine"].mean()), abs=1e-6)
    assert meta["kaggle_first_place"] == 0.66316 and "measure nothing" in meta["note"]
    checks = captions.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("generated_prompt_per_test_image", True)]
    rows = caption_report_rows(Tables("caption_predictions", [Table(storage, "caption_predictions", "blip")]))
    assert len(rows) == 1 and rows[0]["captioner"] == "blip" and rows[0]["test_images"] == table.height
    assert rows[0]["sbert_cosine"] == pytest.approx(meta["sbert_cosine"], abs=1e-6)
    assert rows[0]["refclip_score"] == pytest.approx(float(table["refclip_s"].mean()), abs=1e-6)


def test_unet_swap_report(materialized):
    _, home, _, swap = materialized
    meta = _metadata(swap, "unet_swap_report")
    assert meta["encoder"] == "unet/mlc_cl" and meta["pipeline"] == "tiny Stable Diffusion twin"
    assert meta["mean_abs_pixel_change"] > 0  # the moved encoder changed the images
    report = json.loads((home / "reports" / "unet_swap.json").read_text())
    assert len(report["prompts"]) == 4
    assert report["clip_score_sd"] == pytest.approx(np.mean([r["clip_sd"] for r in report["prompts"]]))
    assert report["clip_score_swap"] == pytest.approx(np.mean([r["clip_swap"] for r in report["prompts"]]))
    grid = Image.open(io.BytesIO((home / "reports" / "unet_swap.png").read_bytes()))
    assert grid.format == "PNG" and grid.height > 4 * 160
    assert "| prompt |" in (home / "reports" / "unet_swap.md").read_text()


def test_predict_generate_prints_the_captioners_prompt(materialized, tmp_path, monkeypatch, capsys):
    """`reverse-sd predict --generate`: the retrieved prompts, then the captioner's own, which is the prompt
    caption_predictions wrote for the same image (the same stored bytes go through the same decoding)."""
    from cli import main as cli
    from pipeline.models import create_model
    from pipeline.training.checkpoint import save_checkpoint

    storage, home, _, _ = materialized
    storage.write_table(storage.read_table("prompt_embeddings").select("prompt", "embedding"), "prompt_bank")
    save_checkpoint(
        storage.path("trained_models", "vit", "baseline"), create_model("vit", variant="tiny", vocab_size=0)
    )
    predictions = pl.read_parquet(home / "caption_predictions" / "blip.parquet").head(2)
    parts = pl.concat([pl.read_parquet(p) for p in (home / "diffusiondb_parts").glob("*.parquet")])
    images = predictions.join(parts.select("image_id", "image"), on="image_id", maintain_order="left")
    paths = []
    for i, data in enumerate(images["image"]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    monkeypatch.setenv("REVERSE_SD_HOME", str(home))
    assert (
        cli.main(
            [
                "predict",
                *map(str, paths),
                "--model",
                "vit",
                "--generate",
                "--top-k",
                "2",
                "--format",
                "table",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert [line.split("generated:", 1)[1].strip() for line in out.splitlines() if "generated:" in line] == [
        g.strip() for g in predictions["generated"]
    ]
    assert out.count("  1. ") == 2 and out.count("  2. ") == 2
    assert cli.main(["predict", str(paths[0]), "--model", "vit", "--generate", "--format", "json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["generated"] == predictions["generated"][0]
    # nothing trained to write prompts: one line naming the asset, exit 2
    monkeypatch.setattr(CAPTIONERS, "names", lambda: ["nothing"])
    assert cli.main(["predict", str(paths[0]), "--model", "vit", "--generate", "--quiet"]) == 2
    assert "materialize the asset trained_captioners" in capsys.readouterr().err
