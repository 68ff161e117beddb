"""The fine-tuned U-Net encoder back in Stable Diffusion, as the paper's last experiment does.

Our unet backbone (pipeline/models/backbones.py) fine-tunes Stable Diffusion 2's U-Net encoder (down blocks
+ mid block) to predict the prompt's embedding.  The paper puts that encoder back into the generator after
the first DDIM step and reports better prompt alignment.  Here: a diffusers StableDiffusionPipeline with a
DDIMScheduler; an ``EncoderSwap`` callback (``callback_on_step_end``) replaces ``unet.down_blocks`` and
``unet.mid_block`` when the first step ends, so step 1 denoises with the original encoder and every later
step with the fine-tuned one; the original modules are put back when the call returns, whatever happens.

Real path: the hub checkpoint the backbone was fine-tuned from (bb.SD2_HUB_ID, stable-diffusion-2-1-base,
the same SD 2 base architecture as stable-diffusion-2-base, so the encoder's weights fit the decoder they
were trained against) on a GPU.  Offline twin: ``tiny_sd_pipeline`` builds the same classes from configs;
its U-Net and VAE are drawn exactly as the tiny unet backbone draws them from the same seed, so there too the
fine-tuned encoder goes back into the very model it started from.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline.models import backbones as bb

if TYPE_CHECKING:
    from PIL import Image

SWAP_MODULES = ("down_blocks", "mid_block")
SD_HUB_ID = bb.SD2_HUB_ID
# A fixed prompt list: subjects the sample can render (colour, shape, count, style) and DiffusionDB-like ones.
DEFAULT_PROMPTS = (
    "two red circles on a blue background, highly detailed, digital painting",
    "a painting of three yellow stars, black background, film grain, by greg rutkowski",
    "an illustration of a single green hexagon on a white background, line art",
    "four purple squares on an orange background, blurry, trending on artstation",
    "a portrait of an astronaut in a garden, oil painting, highly detailed, artstation",
    "a castle on a hill at sunset, matte painting, volumetric lighting, by makoto shinkai",
    "a cat wearing a wizard hat, digital art, intricate, 4k",
    "a futuristic city street at night, neon lights, cinematic lighting, unreal engine",
)
# DDIM as Stable Diffusion 2 base ships it (scheduler/scheduler_config.json).
SD2_DDIM = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)
TINY_TEXT_ENCODER = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77)


def load_sd_pipeline(source: str = SD_HUB_ID, device: str = "cuda", dtype: torch.dtype | None = None):
    """Stable Diffusion 2 from the hub (or a local save_pretrained directory) with a DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        source, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def tiny_sd_pipeline(seed: int = 0):
    """The offline twin: tiny U-Net / VAE (the unet backbone's tiny configs), a tiny CLIPTextModel, the offline
    BERT tokenizer (any tokenizer fits a random text encoder), DDIM.

    The U-Net and VAE are built first after ``torch.manual_seed(seed)``, in build_unet's order, so they equal
    the tiny unet backbone's initial weights for the training seed (the caller's RNG state is restored).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.captioning import minilm_tokenizer

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet, vae = UNet2DConditionModel(**bb.TINY_UNET_CONFIG), AutoencoderKL(**bb.TINY_VAE_CONFIG)
        tokenizer = minilm_tokenizer()
        tokenizer.model_max_length = TINY_TEXT_ENCODER["max_position_embeddings"]
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=int(unet.config.cross_attention_dim),
                bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **TINY_TEXT_ENCODER,
            )
        )
    finally:
        torch.random.set_rng_state(state)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD2_DDIM),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encoder_from_model(model) -> nn.ModuleDict:
    """The fine-tuned encoder of a unet ReverseSDModel (or UNetBackbone): its down blocks and mid block."""
    backbone = getattr(model, "backbone", model)
    unet = getattr(backbone, "unet", None)
    if unet is None:
        raise ValueError("not a unet backbone model: it has no U-Net to take the encoder from")
    return nn.ModuleDict({name: getattr(unet, name) for name in SWAP_MODULES if getattr(unet, name) is not None})


def load_finetuned_encoder(checkpoint) -> tuple[nn.ModuleDict, dict]:
    """(encoder, model config) from a trained_models unet checkpoint (weights file or its directory)."""
    from pipeline.training.checkpoint import load_model

    model = load_model(checkpoint, backbone="unet")
    return encoder_from_model(model).eval(), model.config_dict()


def check_compatible(unet: nn.Module, encoder: nn.ModuleDict) -> None:
    """Raise ValueError unless every encoder module has the shapes of the U-Net's module it replaces."""
    for name in SWAP_MODULES:
        ours = getattr(unet, name, None)
        if (ours is None) != (name not in encoder):
            raise ValueError(f"the U-Net and the fine-tuned encoder differ in having a {name}")
        if ours is None:
            continue
        have = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        want = {k: tuple(v.shape) for k, v in encoder[name].state_dict().items()}
        if have != want:
            diff = sorted(set(have.items()) ^ set(want.items()))[:1]
            raise ValueError(f"fine-tuned {name} does not fit the pipeline's U-Net (first difference: {diff})")


class EncoderSwap:
    """``callback_on_step_end`` putting the fine-tuned encoder into ``unet`` once ``after_steps`` steps ended.

    ``restore()`` puts the original modules back; ``swapped_at`` is the index of the step after which the
    swap happened (None before it).
    """

    def __init__(self, unet: nn.Module, encoder: nn.ModuleDict, after_steps: int = 1):
        if after_steps < 1:
            raise ValueError("after_steps must be >= 1 (the paper swaps after the first step)")
        self.unet, self.encoder, self.after_steps = unet, encoder, int(after_steps)
        self.original = {name: getattr(unet, name) for name in encoder}
        self.swapped_at: int | None = None

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if self.swapped_at is None and step + 1 >= self.after_steps:
            for name, module in self.encoder.items():
                setattr(self.unet, name, module)
            self.swapped_at = int(step)
        return callback_kwargs

    def restore(self) -> None:
        for name, module in self.original.items():
            setattr(self.unet, name, module)


def generate_images(
    pipe,
    prompts: Sequence[str],
    encoder: nn.ModuleDict | None = None,
    *,
    seed: int = 0,
    steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float = 7.5,
    swap_after: int = 1,
) -> list[Image.Image]:
    """One image per prompt (PIL), with the fine-tuned ``encoder`` swapped in after ``swap_after`` DDIM steps,
    or the pipeline as it is when ``encoder`` is None.  Prompt i's noise comes from its own CPU generator
    seeded ``seed + i``, so an image depends on (prompt, seed) only, with or without the swap."""
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    swap = None
    if encoder is not None:
        check_compatible(pipe.unet, encoder)
        encoder.to(device=pipe.unet.device, dtype=pipe.unet.dtype).eval()
        swap = EncoderSwap(pipe.unet, encoder, swap_after)
    try:
        with torch.inference_mode():
            out = pipe(
                list(prompts),
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generators,
                callback_on_step_end=swap,
                output_type="pil",
            )
    finally:
        if swap is not None:
            swap.restore()
    return list(out.images)


def clip_scores(scorer, images: Sequence, prompts: Sequence[str]) -> np.ndarray:
    """Prompt alignment per image: 100 * max(cos(CLIP image, CLIP prompt), 0) (torchmetrics' CLIPScore)."""
    from pipeline.captioning.scoring import clip_s

    return clip_s(scorer.image_embeddings(list(images)), scorer.text_embeddings(list(prompts)), w=100.0)


def swap_grid(
    prompts: Sequence[str],
    columns: Mapping[str, Sequence[Image.Image]],
    scores: Mapping[str, np.ndarray],
    cell: int = 160,
) -> bytes:
    """PNG grid: one row per prompt, one column per setting, each image with its CLIP score, prompt below."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    names = list(columns)
    pad, line = 6, 12
    text_h = 3 * line + pad
    width = len(names) * (cell + pad) + pad
    height = line + pad + len(prompts) * (cell + line + text_h) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(names):
        draw.text((pad + c * (cell + pad), pad // 2), name, fill="black", font=font)
    y = line + pad
    chars = max(20, (width - 2 * pad) // 6)
    for r, prompt in enumerate(prompts):
        for c, name in enumerate(names):
            x = pad + c * (cell + pad)
            grid.paste(columns[name][r].convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
            draw.text((x, y + cell + 1), f"CLIP {float(scores[name][r]):.2f}", fill="black", font=font)
        lines = textwrap.wrap(f"{r + 1}. {prompt}", chars)[:3]
        for k, text in enumerate(lines):
            draw.text((pad, y + cell + line + k * line), text, fill="dimgray", font=font)
        y += cell + line + text_h
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = [
    "DEFAULT_PROMPTS",
    "EncoderSwap",
    "SWAP_MODULES",
    "check_compatible",
    "clip_scores",
    "encoder_from_model",
    "generate_images",
    "load_finetuned_encoder",
    "load_sd_pipeline",
    "swap_grid",
    "tiny_sd_pipeline",
]


# ---- the unet_swap_report stage: the first trained encoder, swapped in, scored side by side --------------------


def first_checkpoint(directories: Sequence[tuple[str, str]]):
    """(recipe, checkpoint) of the first (recipe, checkpoint directory) that holds a checkpoint, or None."""
    from pipeline.training.checkpoint import latest_checkpoint

    for recipe, directory in directories:
        checkpoint = latest_checkpoint(directory)
        if checkpoint is not None:
            return recipe, checkpoint
    return None


def swap_report(checkpoint, encoder_name: str, spec, *, variant: str, device: str, tiny_seed: int) -> dict:
    """Stable Diffusion with and without the fine-tuned encoder in ``checkpoint`` for the first spec.swap_prompts
    DEFAULT_PROMPTS, CLIP prompt alignment of both: the summary (pipeline, encoder, clip_model, clip_score_sd,
    clip_score_swap, mean_abs_pixel_change, settings, prompts: per-prompt rows) and, under "grid", the PNG grid.
    A "full" encoder runs in SD 2 from the hub; a tiny one in the tiny twin drawn from ``tiny_seed``."""
    from pipeline.captioning.scoring import load_clip_scorer

    encoder, config = load_finetuned_encoder(checkpoint)
    if config.get("variant") == "full":
        pipe, pipeline_name = load_sd_pipeline(SD_HUB_ID, device), SD_HUB_ID
    else:
        pipe, pipeline_name = tiny_sd_pipeline(tiny_seed).to(device), "tiny Stable Diffusion twin"
    prompts = list(DEFAULT_PROMPTS[: spec.swap_prompts])
    settings = dict(
        seed=spec.seed,
        steps=spec.swap_steps,
        height=spec.swap_size,
        width=spec.swap_size,
        guidance_scale=spec.swap_guidance,
    )
    plain = generate_images(pipe, prompts, None, **settings)
    swapped = generate_images(pipe, prompts, encoder, **settings)
    scorer = load_clip_scorer(variant, spec.clip_model, device, seed=spec.seed)
    columns = {"SD": plain, "SD + fine-tuned encoder": swapped}
    scores = {name: clip_scores(scorer, images, prompts) for name, images in columns.items()}
    pixel_change = float(np.mean([np.abs(np.subtract(a, b, dtype=np.float32)).mean() for a, b in zip(plain, swapped)]))
    rows = [
        {"prompt": p, "clip_sd": float(scores["SD"][i]), "clip_swap": float(scores["SD + fine-tuned encoder"][i])}
        for i, p in enumerate(prompts)
    ]
    return {
        "pipeline": pipeline_name,
        "encoder": encoder_name,
        "clip_model": scorer.description if variant == "tiny" else spec.clip_model,
        "clip_score_sd": float(np.mean(scores["SD"])),
        "clip_score_swap": float(np.mean(scores["SD + fine-tuned encoder"])),
        "mean_abs_pixel_change": pixel_change,
        "settings": settings,
        "prompts": rows,
        "grid": swap_grid(prompts, columns, scores),
    }


def write_swap_report(reports: str, summary: dict, grid: bytes, table_md: str) -> None:
    """reports/unet_swap.png (the grid), .json (the summary) and .md (``table_md``, the per-prompt table, and the
    grid), each written atomically under the storage root's reports directory."""
    import json

    from pipeline import storage

    storage.write_bytes(grid, f"{reports}/unet_swap.png")
    storage.write_text(json.dumps(summary, indent=2), f"{reports}/unet_swap.json")
    storage.write_text(
        "# Stable Diffusion with the fine-tuned U-Net encoder after step 1\n\n"
        f"pipeline: {summary['pipeline']}; encoder: {summary['encoder']}; CLIP score = 100 * max(cos, 0)\n\n"
        f"{table_md}\n\n![grid](unet_swap.png)\n",
        f"{reports}/unet_swap.md",
    )
