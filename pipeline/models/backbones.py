"""The four image backbones of the paper, each reduced to ``features = backbone(pixels, context)``.

Every backbone is a :class:`Backbone`: a module that maps normalised pixels ``[B, 3, S, S]`` (S =
``image_size``, normalised with ``mean`` / ``std`` after scaling to [0, 1]) to pooled features
``[B, feature_dim]``.  The heads (pipeline/models/heads.py) sit on top.  Each builder makes the real
architecture (``variant="full"``, optionally with hub weights) or a tiny twin of the *same classes* with a
small config and random weights, so the sample profile exercises the real code path on a CPU.

Hub loading is real code kept on the same path as the offline twins: ``load_*`` functions take a hub id or
a local directory / file, so tests can feed them a ``save_pretrained`` directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

# timm (1.7 s with torchvision), transformers and diffusers cost seconds to import, and each run is a fresh
# process: each builder imports only its own library, so a clip or unet run never loads timm.
if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

VARIANTS = ("tiny", "full")
TINY_IMAGE_SIZE = 64

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Backbone(nn.Module):
    """Pixels (+ optional text context) -> pooled features; frozen parts stay frozen and in eval mode.

    ``frozen`` names the submodules whose weights are never trained (the CLIP tower, the VAE): their
    parameters have requires_grad False and ``train()`` keeps them in eval mode, so dropout / norm
    statistics never move and DDP ignores them.
    """

    feature_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    uses_context: bool = False
    context_dim: int | None = None
    frozen: tuple[str, ...] = ()

    def freeze(self) -> None:
        for name in self.frozen:
            module = getattr(self, name)
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    # -- the frozen prefix / trainable rest split (pipeline/training/feature_cache.py) -------------------
    # A backbone whose frozen parts come first (CLIP: the whole tower; unet: the VAE) computes
    # ``forward = forward_rest(forward_prefix(pixels), context)``.  With no augmentation the prefix's output
    # is a pure function of the image, so the trainer can compute it once per split and train the rest on it.
    def forward_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen prefix: normalised pixels -> what the trainable rest reads (no autograd)."""
        raise NotImplementedError(f"{type(self).__name__} has no frozen prefix")

    def forward_rest(self, prefix_output: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The trainable rest: the prefix's output (+ optional context) -> pooled features."""
        raise NotImplementedError(f"{type(self).__name__} has no frozen prefix")

    def prefix_identity(self) -> dict:
        """What, besides the frozen modules' weights, decides the prefix's output (class, constants)."""
        return {"class": type(self).__name__}

    def frozen_prefix(self) -> FrozenPrefix | None:
        """The frozen prefix as a module (its weights are the frozen submodules'), or None when every
        part is trained (vit, swin)."""
        return FrozenPrefix(self) if self.frozen else None


class FrozenPrefix(nn.Module):
    """A backbone's frozen prefix: ``prefix(pixels)`` = ``backbone.forward_prefix(pixels)``.

    Holds the frozen submodules (shared with the backbone, not copies), so ``state_dict()`` is exactly
    the frozen weights (what a feature cache is keyed on) and ``.to(device)`` moves what it runs.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.parts = nn.ModuleDict({name: getattr(backbone, name) for name in backbone.frozen})
        object.__setattr__(self, "_backbone", backbone)  # not a submodule: its trainable parts stay out
        self.identity = {**backbone.prefix_identity(), "frozen": list(backbone.frozen)}
        self.training = False

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._backbone.forward_prefix(pixel_values)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always eval mode


def check_variant(variant: str) -> None:
    """Every model family (backbones, captioners) has the same two variants, checked here once."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")


def check_pretrained(variant: str, pretrained: bool) -> None:
    """A known variant, and pretrained weights asked for only where the hub has them."""
    check_variant(variant)
    if pretrained and variant != "full":
        raise ValueError("pretrained weights exist only for variant 'full'; tiny variants are random-init")


# -- timm: ViT-B/16 and SwinV2-L ------------------------------------------------------------------------
class TimmBackbone(Backbone):
    """A timm classifier with its classifier removed (num_classes=0): forward gives the pooled features."""

    def __init__(self, model: nn.Module, image_size: int, mean, std):
        super().__init__()
        self.model = model
        self.feature_dim = int(model.num_features)
        self.image_size = int(image_size)
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)

    def forward(self, pixel_values: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(pixel_values)


def load_timm(name: str, pretrained: bool, weights_file: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=0)``; pretrained from the hub, or from a local weights file."""
    import timm

    overlay = {"file": weights_file} if weights_file else None
    return timm.create_model(name, pretrained=pretrained, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs)


def _timm_backbone(model: nn.Module, full_name: str, variant: str) -> TimmBackbone:
    """Wrap with the normalisation of the pretrained weights; tiny twins use the same at 64 px."""
    import timm

    if variant == "full":
        cfg = timm.data.resolve_model_data_config(model)
        return TimmBackbone(model, cfg["input_size"][-1], cfg["mean"], cfg["std"])
    cfg = timm.models.get_pretrained_cfg(full_name)
    return TimmBackbone(model, TINY_IMAGE_SIZE, cfg.mean, cfg.std)


VIT_NAME = "vit_base_patch16_224"
SWIN_NAME = "swinv2_large_window12to16_192to256"


def build_vit(variant: str = "tiny", pretrained: bool = False, weights: str = VIT_NAME) -> TimmBackbone:
    """ViT-B/16 at 224 px (timm); tiny: the same VisionTransformer class at 64 px, patch 8, width 64, depth 2."""
    import timm

    check_pretrained(variant, pretrained)
    if variant == "full":
        local = weights if os.path.isfile(weights) else None
        model = load_timm(VIT_NAME if local else weights, pretrained, local)
    else:
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=TINY_IMAGE_SIZE, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0
        )
    return _timm_backbone(model, VIT_NAME, variant)


def build_swin(variant: str = "tiny", pretrained: bool = False, weights: str = SWIN_NAME) -> TimmBackbone:
    """SwinV2-Large at 256 px (timm) with gradient checkpointing; tiny: SwinTransformerV2 at 64 px, 2 stages."""
    import timm

    check_pretrained(variant, pretrained)
    if variant == "full":
        local = weights if os.path.isfile(weights) else None
        model = load_timm(SWIN_NAME if local else weights, pretrained, local)
        model.set_grad_checkpointing(True)  # 197M parameters at 256 px: trade compute for activation memory
    else:
        model = timm.models.swin_transformer_v2.SwinTransformerV2(
            img_size=TINY_IMAGE_SIZE,
            patch_size=4,
            window_size=4,
            embed_dim=32,
            depths=(1, 1),
            num_heads=(2, 4),
            drop_path_rate=0.0,
            num_classes=0,
        )
    return _timm_backbone(model, SWIN_NAME, variant)


# -- CLIP ViT-H/14 image tower (frozen) -----------------------------------------------------------------
CLIP_HUB_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

CLIP_FULL_CONFIG = dict(  # the vision tower of laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
# The size of every tiny twin's transformer (CLIP's tower here, the captioners' towers in pipeline.captioning).
TINY_TRANSFORMER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
CLIP_TINY_CONFIG = dict(
    CLIP_FULL_CONFIG, **TINY_TRANSFORMER, image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=64
)


def load_clip_tower(source: str = CLIP_HUB_ID) -> CLIPVisionModelWithProjection:
    """The CLIP image tower + projection from a hub id or a local directory (a full CLIPModel checkpoint works).

    A full CLIP checkpoint (the laion repository) keeps the projection size at the top of its config, not
    in vision_config, whose default (512) would silently re-initialise the 1024-d projection: copy it over.
    """
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(source)
    if getattr(config, "vision_config", None) is not None:
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        config = vision
    return CLIPVisionModelWithProjection.from_pretrained(source, config=config)


class ClipBackbone(Backbone):
    """Frozen CLIP image tower; features = the projected image embedding (1024-d for ViT-H/14)."""

    frozen = ("tower",)

    def __init__(self, tower: CLIPVisionModelWithProjection):
        super().__init__()
        self.tower = tower
        self.feature_dim = int(tower.config.projection_dim)
        self.image_size = int(tower.config.image_size)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        self.freeze()

    def forward_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # frozen: no activations kept for backward
            return self.tower(pixel_values=pixel_values).image_embeds

    def forward_rest(self, prefix_output: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return prefix_output  # the whole backbone is frozen: the heads read the tower's embedding

    def forward(self, pixel_values: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_rest(self.forward_prefix(pixel_values), context)


def build_clip(variant: str = "tiny", pretrained: bool = False, weights: str = CLIP_HUB_ID) -> ClipBackbone:
    check_pretrained(variant, pretrained)
    if pretrained:
        tower = load_clip_tower(weights)
    else:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        config = CLIP_FULL_CONFIG if variant == "full" else CLIP_TINY_CONFIG
        tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    return ClipBackbone(tower)


# -- Stable Diffusion 2 U-Net encoder + mid block on VAE latents ----------------------------------------
SD2_HUB_ID = "stabilityai/stable-diffusion-2-1-base"
SD2_IMAGE_SIZE = 512

SD2_UNET_CONFIG = dict(  # stabilityai/stable-diffusion-2-1-base, subfolder unet
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_num_groups=32,
    norm_eps=1e-5,
)
VAE_LAYOUT = dict(  # SD's VAE: four encoder blocks, images x8 down to 4 latent channels
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
SD2_VAE_CONFIG = dict(  # subfolder vae
    VAE_LAYOUT,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)
TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
# Four encoder blocks like SD's VAE, so 64 px -> 8x8 latents (the same x8 geometry), at toy width.
TINY_VAE_CONFIG = dict(
    VAE_LAYOUT, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=TINY_IMAGE_SIZE
)


def load_sd_unet(source: str = SD2_HUB_ID) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """The U-Net and VAE of a Stable Diffusion checkpoint (hub id or local directory with unet/ and vae/)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
    return unet, vae


class UNetBackbone(Backbone):
    """SD U-Net encoder (conv_in, down blocks, mid block) at t = 0 on frozen VAE latents; global average pool.

    The decoder halves (U-Net up blocks and output convs, VAE decoder) are removed after building: they are
    never run, and keeping them would put unused parameters in the optimizer, in DDP and in checkpoints.
    ``context`` is the caption's text embedding ``[B, T, cross_attention_dim]`` (``[B, C]`` is read as
    T = 1); without one a learned null context stands in, so an empty caption source still trains.
    """

    frozen = ("vae",)
    uses_context = True

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, image_size: int, checkpointing: bool):
        super().__init__()
        unet.up_blocks = nn.ModuleList()
        unet.conv_norm_out = None
        unet.conv_act = None
        unet.conv_out = None
        vae.decoder = None
        vae.post_quant_conv = None
        self.unet, self.vae = unet, vae
        if checkpointing:
            unet.enable_gradient_checkpointing()
        self.context_dim = int(unet.config.cross_attention_dim)
        self.null_context = nn.Parameter(torch.randn(1, 1, self.context_dim) * 0.02)
        self.feature_dim = int(unet.config.block_out_channels[-1])
        self.image_size = int(image_size)
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # pixels in [-1, 1], as the VAE expects
        self.latent_scale = float(vae.config.scaling_factor)
        self.freeze()

    def _context(self, context: torch.Tensor | None, batch: int) -> torch.Tensor:
        if context is None:
            return self.null_context.expand(batch, -1, -1)
        if context.dim() == 2:
            context = context[:, None, :]
        if context.dim() != 3 or context.shape[0] != batch or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context must be [B={batch}, T, {self.context_dim}] (or [B, {self.context_dim}]); "
                f"got {tuple(context.shape)}"
            )
        # + 0 * null_context keeps the null context in the graph, so DDP sees every parameter used.
        return context.to(self.null_context.dtype) + 0.0 * self.null_context

    def prefix_identity(self) -> dict:
        return {**super().prefix_identity(), "latent_scale": self.latent_scale}

    def forward_prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen VAE: pixels in [-1, 1] -> scaled latents (the distribution's mean, no sampling).

        Contiguous: the VAE's output comes channels-last strided, and a conv picks its kernel (and so its
        rounding) by memory layout; cached latents come back contiguous, so both paths must feed the same."""
        with torch.no_grad():
            return (self.vae.encode(pixel_values).latent_dist.mean * self.latent_scale).contiguous()

    def forward(self, pixel_values: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_rest(self.forward_prefix(pixel_values), context)

    def forward_rest(self, prefix_output: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The trainable encoder on VAE latents ``[B, 4, S/8, S/8]``."""
        latents = prefix_output
        batch = latents.shape[0]
        unet = self.unet
        if unet.config.center_input_sample:
            latents = 2 * latents - 1.0
        hidden_states = self._context(context, batch)
        timestep = torch.zeros((), device=latents.device)
        emb = unet.time_embedding(unet.get_time_embed(sample=latents, timestep=timestep))
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        sample = unet.conv_in(latents)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=hidden_states)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                sample = unet.mid_block(sample, emb, encoder_hidden_states=hidden_states)
            else:
                sample = unet.mid_block(sample, emb)
        return sample.mean(dim=(2, 3))


def build_unet(variant: str = "tiny", pretrained: bool = False, weights: str = SD2_HUB_ID) -> UNetBackbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    check_pretrained(variant, pretrained)
    if pretrained:
        unet, vae = load_sd_unet(weights)
    elif variant == "full":
        unet, vae = UNet2DConditionModel(**SD2_UNET_CONFIG), AutoencoderKL(**SD2_VAE_CONFIG)
    else:
        unet, vae = UNet2DConditionModel(**TINY_UNET_CONFIG), AutoencoderKL(**TINY_VAE_CONFIG)
    size = SD2_IMAGE_SIZE if variant == "full" else TINY_IMAGE_SIZE
    return UNetBackbone(unet, vae, size, checkpointing=variant == "full")


BuildFn = Callable[[str, bool, str], Backbone]  # (variant, pretrained, weights) -> Backbone
__all__ = [
    "Backbone",
    "FrozenPrefix",
    "TimmBackbone",
    "ClipBackbone",
    "UNetBackbone",
    "build_vit",
    "build_swin",
    "build_clip",
    "build_unet",
    "load_timm",
    "load_clip_tower",
    "load_sd_unet",
    "VARIANTS",
    "check_pretrained",
    "check_variant",
]
