"""One backbone registry (timm-style) and the model the trainer sees: backbone + heads.

``create_model(backbone, variant=..., vocab_size=..., head_mode=..., embed_dim=..., pretrained=...)`` is the
only constructor; ``model.config_dict()`` gives back its keyword arguments so a checkpoint can rebuild the
same architecture (``pretrained`` is recorded as False there: the checkpoint's state dict carries every
weight, frozen towers included, so rebuilding never needs the hub).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.constants import BACKBONE_NAMES, EMBED_DIM
from pipeline.models import backbones as bb
from pipeline.models.heads import HEAD_MODES, ReverseSDHeads, check_head_mode
from pipeline.registry import Registry


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: how to build it, where its pretrained weights live, the embedding head's MLP."""

    name: str
    description: str
    build: bb.BuildFn
    weights: str  # timm model name or hub id (or a local file / directory) used when pretrained=True
    head_hidden: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"tiny": (), "full": ()})


BACKBONES: Registry[BackboneSpec] = Registry(
    "backbone",
    [
        BackboneSpec("vit", "timm ViT-B/16, 224 px; linear embedding head", bb.build_vit, bb.VIT_NAME),
        BackboneSpec(
            "swin",
            "timm SwinV2-Large, 256 px, gradient checkpointing; linear embedding head",
            bb.build_swin,
            bb.SWIN_NAME,
        ),
        BackboneSpec(
            "clip",
            "CLIP ViT-H/14 image tower (frozen), 224 px; MLP head 1024-8192-8192-384",
            bb.build_clip,
            bb.CLIP_HUB_ID,
            {"tiny": (128, 128), "full": (8192, 8192)},
        ),
        BackboneSpec(
            "unet",
            "Stable Diffusion 2 U-Net encoder + mid block on frozen VAE latents, t=0, caption context; "
            "pooled, linear projection",
            bb.build_unet,
            bb.SD2_HUB_ID,
        ),
    ],
)
assert tuple(BACKBONES) == BACKBONE_NAMES, "pipeline.constants.BACKBONE_NAMES lists the registry's backbones"


class ReverseSDModel(nn.Module):
    """Image (+ optional caption context) -> (unit embedding [B, embed_dim], vocab logits [B, K] or None).

    The trainer resizes images to ``image_size`` and normalises [0, 1] pixels with ``mean`` / ``std``.
    """

    def __init__(
        self, backbone: bb.Backbone, heads: ReverseSDHeads, *, backbone_name: str, variant: str, embed_dim: int
    ):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.backbone_name = backbone_name
        self.variant = variant
        self.embed_dim = int(embed_dim)
        self.vocab_size = heads.vocab_size
        self.head_mode = heads.head_mode
        self.image_size = backbone.image_size
        self.mean = backbone.mean
        self.std = backbone.std
        self.uses_context = bool(backbone.uses_context)
        self.context_dim = backbone.context_dim

    @property
    def embedding_dim(self) -> int:
        """Alias read by pipeline.training.checkpoint."""
        return self.embed_dim

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        *,
        prefix_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """From pixels, or (``prefix_features``) from the frozen prefix's output, e.g. read from a feature
        cache: then only the trainable rest runs, the same computation as from pixels after the prefix."""
        ctx = context if self.uses_context else None
        if prefix_features is not None:
            features = self.backbone.forward_rest(prefix_features, ctx)
        else:
            features = self.backbone(pixel_values, ctx)
        return self.heads(features)

    def frozen_prefix(self) -> bb.FrozenPrefix | None:
        """The frozen first part of the model (CLIP's tower, the unet's VAE), pixels -> what the trainable
        rest reads; None when nothing is frozen (vit, swin).  ``model(prefix_features=prefix(pixels))``
        equals ``model(pixels)``."""
        return self.backbone.frozen_prefix()

    def config_dict(self) -> dict:
        return {
            "backbone": self.backbone_name,
            "variant": self.variant,
            "vocab_size": self.vocab_size,
            "head_mode": self.head_mode,
            "embed_dim": self.embed_dim,
            "pretrained": False,
        }


def create_model(
    backbone: str,
    *,
    variant: str = "tiny",
    vocab_size: int = 1000,
    head_mode: str = "emb_to_cls",
    embed_dim: int = EMBED_DIM,
    pretrained: bool = False,
) -> ReverseSDModel:
    """Build a backbone from BACKBONES with its heads.  Raises ValueError on unknown names."""
    spec = BACKBONES.get(backbone)
    bb.check_variant(variant)
    check_head_mode(head_mode)
    if vocab_size < 0 or embed_dim <= 0:
        raise ValueError(f"need vocab_size >= 0 and embed_dim > 0, got {vocab_size}, {embed_dim}")
    body = spec.build(variant, pretrained, spec.weights)
    heads = ReverseSDHeads(body.feature_dim, embed_dim, vocab_size, head_mode, spec.head_hidden[variant])
    return ReverseSDModel(body, heads, backbone_name=backbone, variant=variant, embed_dim=embed_dim)


__all__ = ["BACKBONES", "BackboneSpec", "HEAD_MODES", "ReverseSDModel", "create_model"]
