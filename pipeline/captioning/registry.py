"""The captioner registry: CAPTIONERS (a pipeline.registry.Registry, as BACKBONES is) maps a name to how its
two variants are built; the variants and their check are the backbones' (pipeline.models.backbones).

"full" is the hub checkpoint (``from_pretrained``: real code, not run offline); "tiny" is the same classes
at toy width, random init, with the offline WordPiece tokenizer (pipeline/captioning/tokenizer.py).
"blip2" (Salesforce/blip2-opt-2.7b) keeps its pre-trained OPT frozen, BLIP-2's own captioning recipe; its
random-init tiny twin trains the LM too, as a frozen random LM could not learn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.captioning.model import Captioner
from pipeline.captioning.tokenizer import IMAGE_TOKEN, tiny_tokenizer, with_image_token
from pipeline.models.backbones import TINY_TRANSFORMER, VARIANTS, check_pretrained
from pipeline.registry import Registry

BLIP_HUB_ID = "Salesforce/blip-image-captioning-base"
BLIP2_HUB_ID = "Salesforce/blip2-opt-2.7b"
TINY_IMAGE_SIZE = 32  # colour, shape and count survive 32 px; 16 patches keep a tiny CPU epoch short
TINY_MAX_LENGTH = 48  # the sample's prompts are at most ~46 WordPiece tokens
FULL_MAX_LENGTH = 77  # Stable Diffusion reads 77 CLIP tokens of a prompt; longer text never reached the image

TINY_VISION = dict(TINY_TRANSFORMER, image_size=TINY_IMAGE_SIZE, patch_size=8)
TINY_TEXT = dict(TINY_TRANSFORMER)
TINY_QFORMER = dict(TINY_TRANSFORMER)
TINY_OPT = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=64)
TINY_QUERY_TOKENS = 4

BuildFn = Callable[..., tuple[nn.Module, Any]]  # (variant, pretrained, weights, corpus) -> (model, tokenizer)


def _blip_text_ids(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )


def build_blip(variant: str, pretrained: bool, weights: str, corpus: Sequence[str] | None = None):
    """BlipForConditionalGeneration + its tokenizer.  full: hub checkpoint (or random base-size); tiny: toy."""
    from transformers import AutoTokenizer, BlipConfig, BlipForConditionalGeneration

    check_pretrained(variant, pretrained)
    if variant == "full":
        tokenizer = AutoTokenizer.from_pretrained(weights)
        if pretrained:
            return BlipForConditionalGeneration.from_pretrained(weights), tokenizer
        return BlipForConditionalGeneration(BlipConfig(text_config=_blip_text_ids(tokenizer))), tokenizer
    tokenizer = tiny_tokenizer(corpus)
    text = {**TINY_TEXT, **_blip_text_ids(tokenizer), "max_position_embeddings": TINY_MAX_LENGTH + 2}
    return BlipForConditionalGeneration(BlipConfig(vision_config=TINY_VISION, text_config=text)), tokenizer


def build_blip2(variant: str, pretrained: bool, weights: str, corpus: Sequence[str] | None = None):
    """Blip2ForConditionalGeneration + its tokenizer.  full: hub checkpoint (fp16 on a GPU) or random OPT-2.7b
    size; tiny: toy vision tower, Q-Former and OPT with the offline WordPiece tokenizer."""
    from transformers import AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration

    check_pretrained(variant, pretrained)
    if variant == "full":
        tokenizer = with_image_token(AutoTokenizer.from_pretrained(weights))
        if pretrained:
            dtype = torch.float16 if torch.cuda.is_available() else None  # the Q-Former stays fp32 (transformers)
            model = Blip2ForConditionalGeneration.from_pretrained(weights, dtype=dtype)
            if model.get_input_embeddings().num_embeddings < len(tokenizer):  # a revision without "<image>"
                model.resize_token_embeddings(len(tokenizer))
        else:
            model = Blip2ForConditionalGeneration(Blip2Config(text_config={"vocab_size": len(tokenizer)}))
        model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        return model, tokenizer
    tokenizer = with_image_token(tiny_tokenizer(corpus))
    ids = _blip_text_ids(tokenizer)
    text = {
        **TINY_OPT,
        "model_type": "opt",
        "vocab_size": ids["vocab_size"],
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
        "max_position_embeddings": TINY_MAX_LENGTH + TINY_QUERY_TOKENS + 2,
    }
    qformer = {**TINY_QFORMER, "encoder_hidden_size": TINY_VISION["hidden_size"], "vocab_size": ids["vocab_size"]}
    config = Blip2Config(
        vision_config=TINY_VISION,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=TINY_QUERY_TOKENS,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    return Blip2ForConditionalGeneration(config), tokenizer


@dataclass(frozen=True)
class CaptionerArch:
    """What a captioner is: its builder, where its pretrained weights live, its preprocessing."""

    name: str
    description: str
    build: BuildFn
    weights: str
    max_length: dict[str, int]


CAPTIONERS: Registry[CaptionerArch] = Registry(
    "captioner",
    [
        CaptionerArch(
            "blip",
            "BLIP ViT-B captioner (BlipForConditionalGeneration) + vocabulary head on the image [CLS] token",
            build_blip,
            BLIP_HUB_ID,
            {"tiny": TINY_MAX_LENGTH, "full": FULL_MAX_LENGTH},
        ),
        CaptionerArch(
            "blip2",
            "BLIP-2 OPT-2.7b captioner (Blip2ForConditionalGeneration), frozen OPT, + vocabulary head on the "
            "mean Q-Former query output",
            build_blip2,
            BLIP2_HUB_ID,
            {"tiny": TINY_MAX_LENGTH, "full": FULL_MAX_LENGTH},
        ),
    ],
)


def create_captioner(
    name: str = "blip",
    *,
    variant: str = "tiny",
    vocab_size: int = 1000,
    pretrained: bool = False,
    corpus: Sequence[str] | None = None,
    weights: str | None = None,
) -> Captioner:
    """Build a registered captioner; ``corpus`` (training prompts) restricts the tiny tokenizer's vocabulary;
    ``weights`` replaces the registry's hub id for "full" (a local save_pretrained directory works too)."""
    arch = CAPTIONERS.get(name)
    check_pretrained(variant, pretrained)
    if vocab_size < 0:
        raise ValueError(f"need vocab_size >= 0, got {vocab_size}")
    model, tokenizer = arch.build(variant, pretrained, weights or arch.weights, corpus)
    return Captioner(
        model,
        tokenizer,
        name=name,
        variant=variant,
        vocab_size=vocab_size,
        max_length=arch.max_length[variant],
        freeze_language_model=pretrained,
    )


__all__ = ["CAPTIONERS", "VARIANTS", "CaptionerArch", "create_captioner"]
