"""A checkpoint records what it was trained for (backbone, recipe, settings hash) and one copied into another
model's folder is refused by name, before any model is built or any shape compared."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.models import create_model
from pipeline.storage import sidecar_path, write_parquet
from pipeline.training.checkpoint import CheckpointError, load_model, save_checkpoint


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        "vit": create_model("vit", variant="tiny", vocab_size=5),
        "swin": create_model("swin", variant="tiny", vocab_size=5),
    }


def _folder(home, backbone: str, recipe: str):
    return home / "trained_models" / backbone / recipe


def test_a_checkpoint_records_its_backbone_recipe_and_settings(tmp_path, models):
    from safetensors import safe_open

    path = save_checkpoint(
        tmp_path, models["swin"], index=1, rng=False, identity={"recipe": "mlc", "settings_hash": "abc"}
    )
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert (metadata["backbone"], metadata["recipe"], metadata["settings_hash"]) == ("swin", "mlc", "abc")


def test_another_backbones_checkpoint_in_a_models_folder_is_refused_by_name(tmp_path, models):
    folder = _folder(tmp_path, "vit", "baseline")
    path = save_checkpoint(folder, models["swin"], index=3, rng=False)
    with pytest.raises(CheckpointError) as error:
        load_model(path, factory=lambda **config: pytest.fail("built a model"))
    message = str(error.value)
    assert message == f"checkpoint {path} was trained for backbone swin; this is vit/baseline"
    assert "\n" not in message
    with pytest.raises(CheckpointError, match="trained for backbone swin"):
        load_model(folder)  # the folder's newest, as predict and model_predictions load it


def test_another_recipes_checkpoint_is_refused_and_the_right_one_loads(tmp_path, models):
    path = save_checkpoint(_folder(tmp_path, "vit", "baseline"), models["vit"], index=1, identity={"recipe": "mlc"})
    with pytest.raises(CheckpointError, match="trained for backbone vit, recipe mlc; this is vit/baseline"):
        load_model(path)
    with pytest.raises(CheckpointError, match="recipe mlc; this is vit/mlc_cl"):
        load_model(path, backbone="vit", recipe="mlc_cl")
    good = save_checkpoint(_folder(tmp_path, "vit", "mlc"), models["vit"], index=1, identity={"recipe": "mlc"})
    assert load_model(good).config_dict()["backbone"] == "vit"


def _as_older_checkpoint(path) -> None:
    """Rewrite a checkpoint as one written before identities were recorded (model_config only)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k not in ("backbone", "recipe", "settings_hash")}
    tensors = load_file(str(path))
    sidecar_path(path).unlink()
    save_file(tensors, str(path), metadata=metadata)


def test_older_checkpoints_without_identity_load_and_their_backbone_is_still_checked(tmp_path, models):
    own = save_checkpoint(_folder(tmp_path, "vit", "mlc"), models["vit"], index=1, rng=False)
    foreign = save_checkpoint(_folder(tmp_path, "vit", "baseline"), models["swin"], index=1, rng=False)
    for path in (own, foreign):
        _as_older_checkpoint(path)
    assert load_model(own).config_dict()["backbone"] == "vit"  # no recipe recorded: not checked
    with pytest.raises(CheckpointError, match=r"trained for backbone swin; this is vit/baseline$"):
        load_model(foreign)


def test_predict_names_both_models_in_one_line(tmp_path, models):
    from pipeline.predictor import PromptPredictor

    bank = pl.DataFrame({"prompt": ["a red cube"], "embedding": [np.ones(384, dtype=np.float32) / np.sqrt(384)]})
    write_parquet(bank, tmp_path / "prompt_bank.parquet")
    save_checkpoint(_folder(tmp_path, "vit", "mlc"), models["swin"], index=2, rng=False)
    with pytest.raises(ValueError) as error:
        PromptPredictor(str(tmp_path), model="vit", device="cpu")
    message = str(error.value)
    assert "\n" not in message
    assert message.endswith("ckpt-00002.safetensors was trained for backbone swin; this is vit/mlc")
    json.dumps(message)  # plain text
