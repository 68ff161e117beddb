"""checkpoint.load_model: the one place a checkpoint becomes a model (registry rebuild, verified weights, eval)."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import create_model
from pipeline.storage import sidecar_path
from pipeline.training.checkpoint import CheckpointError, load_model, load_model_weights, save_checkpoint


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("vit", variant="tiny", vocab_size=5)
    directory = tmp_path_factory.mktemp("ckpt")
    path = save_checkpoint(directory, model, index=3, rng=False)
    return model, directory, path


def test_load_model_rebuilds_the_saved_model_in_eval_mode(saved):
    original, directory, path = saved
    for where in (directory, path):  # a directory's newest checkpoint, or the weights file itself
        model = load_model(where, device="cpu")
        assert not model.training
        assert model.config_dict() == original.config_dict()
        want = original.state_dict()
        got = model.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_load_model_checks_the_backbone_before_building(saved):
    _, directory, _ = saved
    with pytest.raises(CheckpointError, match="was trained for backbone vit; this is unet"):
        load_model(directory, backbone="unet", factory=lambda **config: pytest.fail("built a model"))
    assert load_model(directory, backbone="vit").config_dict()["backbone"] == "vit"


def test_load_model_takes_another_factory(saved):
    _, directory, _ = saved
    seen = {}

    def factory(**config):
        seen.update(config)
        return create_model(**config)

    load_model(directory, factory=factory)
    assert seen["backbone"] == "vit" and seen["vocab_size"] == 5


def test_a_damaged_checkpoint_fails_as_load_model_weights_does(tmp_path):
    path = save_checkpoint(tmp_path, create_model("vit", variant="tiny", vocab_size=0), index=1, rng=False)
    assert sidecar_path(path).exists()  # the SHA-256 sidecar is what catches garbled tensor bytes
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as weights_error:
        load_model_weights(path)
    with pytest.raises(CheckpointError) as model_error:
        load_model(path)
    assert str(model_error.value) == str(weights_error.value)
    assert "re-materialize trained_models" in str(model_error.value)
