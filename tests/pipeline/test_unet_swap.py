"""The fine-tuned U-Net encoder swapped into a tiny Stable Diffusion pipeline after the first DDIM step:
which encoder runs at which step (forward hooks), images, determinism, restoring, checkpoints.  CPU, seconds."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.evaluation.unet_swap import (
    DEFAULT_PROMPTS,
    EncoderSwap,
    check_compatible,
    encoder_from_model,
    generate_images,
    load_finetuned_encoder,
    swap_grid,
    tiny_sd_pipeline,
)
from pipeline.models import create_model
from pipeline.training.loop import seed_everything

PROMPTS = list(DEFAULT_PROMPTS[:2])
STEPS = 3
SIZE = dict(height=32, width=32)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)


def _unet_model(perturb: float):
    """The tiny unet backbone as trained_models starts it (seed 0), its encoder moved by ``perturb`` (a stand-in
    for fine-tuning: only the weights matter to the swap)."""
    seed_everything(0)
    model = create_model("unet", variant="tiny", vocab_size=4)
    if perturb:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in encoder_from_model(model).parameters():
                p.add_(perturb * torch.randn(p.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def finetuned():
    return encoder_from_model(_unet_model(0.05))


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_tiny_pipeline_starts_from_the_backbones_initial_weights(pipe):
    untouched = encoder_from_model(_unet_model(0.0))
    for name, module in untouched.items():
        mine = getattr(pipe.unet, name).state_dict()
        assert all(torch.equal(mine[k], v) for k, v in module.state_dict().items()), name
    # so swapping in an encoder that was never trained changes nothing: differences below come from weights
    plain = generate_images(pipe, PROMPTS, None, steps=STEPS, **SIZE)
    same = generate_images(pipe, PROMPTS, untouched, steps=STEPS, **SIZE)
    assert np.array_equal(_arrays(plain), _arrays(same))


def test_fine_tuned_encoder_runs_only_after_the_first_step(pipe, finetuned):
    step = {"now": -1}
    calls: dict[str, list[int]] = {"original": [], "finetuned": [], "original_mid": [], "finetuned_mid": []}

    def count_step(module, args):  # the whole U-Net runs once per DDIM step (CFG batches both halves)
        step["now"] += 1

    def record(key):
        return lambda module, args, output: calls[key].append(step["now"])

    original_down, original_mid = pipe.unet.down_blocks, pipe.unet.mid_block
    hooks = [
        pipe.unet.register_forward_pre_hook(count_step),
        original_down[0].register_forward_hook(record("original")),
        finetuned["down_blocks"][0].register_forward_hook(record("finetuned")),
        original_mid.register_forward_hook(record("original_mid")),
        finetuned["mid_block"].register_forward_hook(record("finetuned_mid")),
    ]
    try:
        generate_images(pipe, PROMPTS, finetuned, steps=STEPS, **SIZE)
        assert calls == {"original": [0], "finetuned": [1, 2], "original_mid": [0], "finetuned_mid": [1, 2]}
        assert pipe.unet.down_blocks is original_down and pipe.unet.mid_block is original_mid  # restored
        for key in calls:
            calls[key].clear()
        step["now"] = -1
        generate_images(pipe, PROMPTS, None, steps=STEPS, **SIZE)
        assert calls["original"] == [0, 1, 2] and calls["finetuned"] == []
    finally:
        for hook in hooks:
            hook.remove()


def test_swap_changes_images_and_runs_are_deterministic(pipe, finetuned):
    plain = _arrays(generate_images(pipe, PROMPTS, None, seed=7, steps=STEPS, **SIZE))
    swapped = _arrays(generate_images(pipe, PROMPTS, finetuned, seed=7, steps=STEPS, **SIZE))
    assert plain.shape == (2, 32, 32, 3)
    assert np.abs(plain - swapped).mean() > 0.5
    assert np.array_equal(swapped, _arrays(generate_images(pipe, PROMPTS, finetuned, seed=7, steps=STEPS, **SIZE)))
    assert np.array_equal(plain, _arrays(generate_images(pipe, PROMPTS, None, seed=7, steps=STEPS, **SIZE)))
    assert not np.array_equal(plain, _arrays(generate_images(pipe, PROMPTS, None, seed=8, steps=STEPS, **SIZE)))
    # an image depends on its prompt and seed only, not on the batch around it
    alone = _arrays(generate_images(pipe, PROMPTS[:1], finetuned, seed=7, steps=STEPS, **SIZE))
    assert np.abs(alone[0] - swapped[0]).max() <= 1


def test_original_encoder_restored_when_generation_fails(pipe, finetuned):
    original = pipe.unet.down_blocks

    def fail_late(module, args):
        if module is finetuned["down_blocks"][0]:
            raise RuntimeError("boom")

    hook = finetuned["down_blocks"][0].register_forward_pre_hook(fail_late)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            generate_images(pipe, PROMPTS, finetuned, steps=STEPS, **SIZE)
    finally:
        hook.remove()
    assert pipe.unet.down_blocks is original


def test_incompatible_encoder_is_rejected(pipe):
    from diffusers import UNet2DConditionModel

    from pipeline.models import backbones as bb

    other = UNet2DConditionModel(**{**bb.TINY_UNET_CONFIG, "block_out_channels": (16, 32), "norm_num_groups": 8})
    with pytest.raises(ValueError, match="does not fit"):
        check_compatible(
            pipe.unet, torch.nn.ModuleDict({"down_blocks": other.down_blocks, "mid_block": other.mid_block})
        )
    with pytest.raises(ValueError, match="after_steps"):
        EncoderSwap(pipe.unet, encoder_from_model(_unet_model(0.0)), after_steps=0)


def test_encoder_loads_from_a_trained_models_checkpoint(tmp_path):
    from pipeline.training.checkpoint import save_checkpoint

    model = _unet_model(0.05)
    save_checkpoint(tmp_path / "unet" / "mlc_cl", model, index=3)
    encoder, config = load_finetuned_encoder(tmp_path / "unet" / "mlc_cl")
    assert config["backbone"] == "unet"
    expected = encoder_from_model(model).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in encoder.state_dict().items())
    seed_everything(0)
    save_checkpoint(tmp_path / "vit", create_model("vit", variant="tiny", vocab_size=4), index=1)
    with pytest.raises(ValueError, match="trained for backbone vit; this is unet"):
        load_finetuned_encoder(tmp_path / "vit")


def test_grid_png(pipe, finetuned):
    plain = generate_images(pipe, PROMPTS, None, steps=2, **SIZE)
    swapped = generate_images(pipe, PROMPTS, finetuned, steps=2, **SIZE)
    scores = {"SD": np.array([1.0, 2.0]), "swap": np.array([3.0, 4.0])}
    png = swap_grid(PROMPTS, {"SD": plain, "swap": swapped}, scores, cell=64)
    grid = Image.open(io.BytesIO(png))
    assert grid.format == "PNG" and grid.width == 2 * (64 + 6) + 6 and grid.height > 2 * 64


def test_hub_path_loads_a_local_pipeline_with_ddim(pipe, tmp_path):
    """load_sd_pipeline (the hub path) on a save_pretrained directory: same weights, DDIM, same images."""
    from diffusers import DDIMScheduler

    from pipeline.evaluation.unet_swap import load_sd_pipeline

    pipe.save_pretrained(tmp_path / "sd")
    loaded = load_sd_pipeline(str(tmp_path / "sd"), device="cpu")
    assert isinstance(loaded.scheduler, DDIMScheduler) and loaded.unet.dtype == torch.float32
    a = generate_images(pipe, PROMPTS, None, steps=2, **SIZE)
    b = generate_images(loaded, PROMPTS, None, steps=2, **SIZE)
    assert np.array_equal(_arrays(a), _arrays(b))
