"""Prompt generation: a BLIP captioner fine-tuned to write the prompt of an image, with the paper's recipe,
and the two scores the paper and the Kaggle competition report for generated prompts.

The captioner is trained with the same two ideas as the embedding models:

- vocabulary head ("MLC"): a linear multi-label classifier over the K-word vocabulary on the pooled vision
  features (BLIP's image [CLS] token); loss = captioning LM loss + lambda * BCE(vocab logits, labels);
- curriculum ("CL", pipeline/training/curriculum.py): stages easy -> easy+medium -> all -> all, from difficulty
  buckets that come from the backbones' difficulty_scores (rank-averaged, free) or from the captioner's own
  preliminary epochs (difficulty = minus the per-sample LM loss, higher = easier, as for the cosine).

Registry (like pipeline/models/registry.py): CAPTIONERS maps a name to how its two variants are built.
"full" is the hub checkpoint (``from_pretrained``: real code, not run offline); "tiny" is the same classes
at toy width, random init, with the BERT-uncased WordPiece tokenizer of the offline all-MiniLM-L6-v2
package plus BLIP's two added tokens ([DEC] as BOS, [ENC]): exactly what BLIP's own tokenizer is.  Given the
training prompts, the tiny tokenizer keeps only the WordPiece tokens they use (~150 on the
sample): the 30,524-wide output layer was ~90% of a CPU training step, and WordPiece's greedy longest match
tokenizes every training prompt identically with the reduced vocabulary.

"blip2" is BLIP-2 (Blip2ForConditionalGeneration, Salesforce/blip2-opt-2.7b, ~3.9B parameters) for where
memory allows: the pre-trained OPT language model is frozen (loaded in fp16 on a GPU) and the image encoder,
Q-Former, projection and vocabulary head (on the mean Q-Former query output) are fine-tuned, BLIP-2's own
captioning recipe; a random-init OPT (the tiny twin) trains too, as a frozen random LM could not learn.
The captioner inserts the image placeholder tokens the BLIP-2 processor would; its tiny twin is the same
classes with a toy OPT and the offline WordPiece tokenizer plus "<image>".

Scores: ``sbert_cosines`` (the Kaggle metric: cosine of all-MiniLM-L6-v2 embeddings of generated vs true
prompt; first place 0.66316) and ``ref_clip_s`` (RefCLIPScore, Hessel et al. 2021).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.training.datasets import LabelLists, StageSampler, decode_image, epoch_seed, make_loader, multi_hot

VARIANTS = ("tiny", "full")
BLIP_HUB_ID = "Salesforce/blip-image-captioning-base"
BLIP2_HUB_ID = "Salesforce/blip2-opt-2.7b"
IMAGE_TOKEN = "<image>"  # BLIP-2's placeholder for the Q-Former's query outputs in the LM's input
CLIP_SCORE_HUB_ID = "openai/clip-vit-large-patch14"
KAGGLE_FIRST_PLACE = 0.66316  # private leaderboard, "Stable Diffusion - Image to Prompts"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP's and CLIP's image processors normalise with these
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_IMAGE_SIZE = 32  # colour, shape and count survive 32 px; 16 patches keep a CPU epoch ~1 s
TINY_MAX_LENGTH = 48  # the sample's prompts are at most ~46 WordPiece tokens
FULL_MAX_LENGTH = 77  # Stable Diffusion reads 77 CLIP tokens of a prompt; longer text never reached the image
CLIP_S_WEIGHT = 2.5  # Hessel et al.'s w in CLIP-S = w * max(cos, 0)

TINY_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=TINY_IMAGE_SIZE,
    patch_size=8,
)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
TINY_QFORMER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
TINY_OPT = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=64)
TINY_QUERY_TOKENS = 4
TINY_CLIP = dict(
    text=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77
    ),
    vision=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    ),
    projection_dim=32,
)


# -- tokenizers --------------------------------------------------------------------------------------------
def minilm_tokenizer():
    """The BERT-uncased WordPiece tokenizer of the offline all-MiniLM-L6-v2 package."""
    from transformers import AutoTokenizer

    from pipeline.data.embedding import resolve_model_location

    return AutoTokenizer.from_pretrained(resolve_model_location(None))


def _add_blip_tokens(tokenizer):
    """BLIP's tokenizer = BERT-uncased + [DEC] (the decoder's BOS) + [ENC]."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def restrict_vocabulary(base, corpus: Sequence[str]):
    """A WordPiece tokenizer keeping only the special tokens and the tokens ``base`` uses on ``corpus``.

    Greedy longest-match WordPiece picks, for every word of the corpus, pieces that are all kept, and no
    longer kept prefix exists that ``base`` would not have picked, so the corpus tokenizes identically.
    Unseen words may split differently or become [UNK].  Ids are renumbered densely in the base order.
    """
    from transformers import BertTokenizer

    used: set[int] = set(base.all_special_ids)
    for start in range(0, len(corpus), 1024):
        for ids in base(list(corpus[start : start + 1024]), add_special_tokens=False)["input_ids"]:
            used.update(ids)
    vocab = {base.convert_ids_to_tokens(i): n for n, i in enumerate(sorted(used))}
    return BertTokenizer(vocab=vocab, do_lower_case=True, clean_up_tokenization_spaces=True)


def tiny_tokenizer(corpus: Sequence[str] | None = None):
    """BLIP's tokenizer rebuilt offline: MiniLM's WordPiece (restricted to ``corpus`` when given) + BLIP tokens."""
    base = minilm_tokenizer()
    tokenizer = restrict_vocabulary(base, corpus) if corpus is not None else base
    return _add_blip_tokens(tokenizer)


# -- registry ----------------------------------------------------------------------------------------------
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

    _check_variant(variant, pretrained)
    if variant == "full":
        tokenizer = AutoTokenizer.from_pretrained(weights)
        if pretrained:
            return BlipForConditionalGeneration.from_pretrained(weights), tokenizer
        return BlipForConditionalGeneration(BlipConfig(text_config=_blip_text_ids(tokenizer))), tokenizer
    tokenizer = tiny_tokenizer(corpus)
    text = {**TINY_TEXT, **_blip_text_ids(tokenizer), "max_position_embeddings": TINY_MAX_LENGTH + 2}
    return BlipForConditionalGeneration(BlipConfig(vision_config=TINY_VISION, text_config=text)), tokenizer


def _with_image_token(tokenizer):
    """The tokenizer with BLIP-2's image placeholder as a special token (decoding skips it)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        extra = [t for t in getattr(tokenizer, "additional_special_tokens", None) or [] if t != IMAGE_TOKEN]
        tokenizer.add_special_tokens({"additional_special_tokens": [*extra, IMAGE_TOKEN]})
    return tokenizer


def build_blip2(variant: str, pretrained: bool, weights: str, corpus: Sequence[str] | None = None):
    """Blip2ForConditionalGeneration + its tokenizer.  full: hub checkpoint (fp16 on a GPU) or random OPT-2.7b
    size; tiny: toy vision tower, Q-Former and OPT with the offline WordPiece tokenizer."""
    from transformers import AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration

    _check_variant(variant, pretrained)
    if variant == "full":
        tokenizer = _with_image_token(AutoTokenizer.from_pretrained(weights))
        if pretrained:
            dtype = torch.float16 if torch.cuda.is_available() else None  # the Q-Former stays fp32 (transformers)
            model = Blip2ForConditionalGeneration.from_pretrained(weights, dtype=dtype)
            if model.get_input_embeddings().num_embeddings < len(tokenizer):  # a revision without "<image>"
                model.resize_token_embeddings(len(tokenizer))
        else:
            model = Blip2ForConditionalGeneration(Blip2Config(text_config={"vocab_size": len(tokenizer)}))
        model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        return model, tokenizer
    tokenizer = _with_image_token(tiny_tokenizer(corpus))
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


CAPTIONERS: MappingProxyType[str, CaptionerArch] = MappingProxyType(
    {
        "blip": CaptionerArch(
            "blip",
            "BLIP ViT-B captioner (BlipForConditionalGeneration) + vocabulary head on the image [CLS] token",
            build_blip,
            BLIP_HUB_ID,
            {"tiny": TINY_MAX_LENGTH, "full": FULL_MAX_LENGTH},
        ),
        "blip2": CaptionerArch(
            "blip2",
            "BLIP-2 OPT-2.7b captioner (Blip2ForConditionalGeneration), frozen OPT, + vocabulary head on the "
            "mean Q-Former query output",
            build_blip2,
            BLIP2_HUB_ID,
            {"tiny": TINY_MAX_LENGTH, "full": FULL_MAX_LENGTH},
        ),
    }
)


def available_captioners() -> list[str]:
    return sorted(CAPTIONERS)


def _check_variant(variant: str, pretrained: bool = False) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    if pretrained and variant != "full":
        raise ValueError("pretrained weights exist only for variant 'full'; tiny variants are random-init")


class Captioner(nn.Module):
    """A BLIP or BLIP-2 captioner, the vocabulary head on its pooled image features, its tokenizer and
    preprocessing.

    ``forward(pixels, input_ids, attention_mask)`` -> (token logits [B, T, V] over the text positions only,
    vocab logits [B, K] or None).  Text goes in as the model was pre-trained: BOS ([DEC] for BLIP), the
    prompt's tokens, EOS.  BLIP-2's image placeholder tokens are added here, in front of the text, and their
    logits dropped, so the loss and the datasets are the same for both families.  ``generation`` holds the
    default decoding settings (num_beams, ...); they are saved with the checkpoint, so `reverse-sd predict
    --generate` decodes as the run that trained it was configured to.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        name: str,
        variant: str,
        vocab_size: int,
        max_length: int,
        generation: dict | None = None,
        freeze_language_model: bool = False,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name, self.variant = name, variant
        self.vocab_size = int(vocab_size)
        self.max_length = int(max_length)
        self.generation = dict(generation or {"num_beams": 1})
        config = model.config
        self.family = "blip2" if hasattr(model, "qformer") else "blip"
        self.image_size = int(config.vision_config.image_size)
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        if self.family == "blip2":
            self.num_query_tokens = int(config.num_query_tokens)
            self.image_token_id = int(config.image_token_id)
            pooled_width = int(config.qformer_config.hidden_size)
            # BLIP-2's captioning fine-tune keeps its pre-trained LLM frozen; a random-init one (tiny) must learn
            self.freeze_language_model = bool(freeze_language_model)
            model.language_model.requires_grad_(not self.freeze_language_model)
        else:
            pooled_width = int(config.vision_config.hidden_size)
        self.vocab_head = nn.Linear(pooled_width, self.vocab_size) if self.vocab_size else None

    def encode_text(self, prompts: Sequence[str], padding: str = "max_length") -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [n, max_length]: BOS, the prompt's tokens, EOS, truncated to max_length."""
        text = self.model.config.text_config
        if self.family == "blip":
            enc = self.tokenizer(
                list(prompts), padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            ids = enc["input_ids"].clone()
            ids[:, 0] = text.bos_token_id  # [DEC] in place of [CLS]: what BLIP's generate starts from
            return ids, enc["attention_mask"]
        pieces = self.tokenizer(
            list(prompts), add_special_tokens=False, truncation=True, max_length=self.max_length - 2
        )
        rows = [[text.bos_token_id, *p, text.eos_token_id] for p in pieces["input_ids"]]
        width = self.max_length if padding == "max_length" else max(map(len, rows), default=2)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def _with_image_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """BLIP-2 reads the Q-Former's outputs where its input holds num_query_tokens image placeholders."""
        image = input_ids.new_full((input_ids.shape[0], self.num_query_tokens), self.image_token_id)
        return torch.cat([image, input_ids], dim=1), torch.cat([torch.ones_like(image), attention_mask], dim=1)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.family == "blip2":
            ids, mask = self._with_image_tokens(input_ids, attention_mask)
            out = self.model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask)
            logits, pooled = out.logits[:, self.num_query_tokens :], out.qformer_outputs[0].mean(dim=1)
        else:
            out = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
            logits, pooled = out.logits, out.image_embeds[:, 0]
        if self.vocab_head is None:
            return logits, None
        return logits, self.vocab_head(pooled.to(self.vocab_head.weight.dtype))

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int | None = None, **kwargs) -> list[str]:
        """Greedy (num_beams=1) or beam-search decoding to text; ``kwargs`` (num_beams, no_repeat_ngram_size:
        small captioners loop on "by X, by X", ...) override ``self.generation`` and go to transformers."""
        settings = {**self.generation, **{k: v for k, v in kwargs.items() if v is not None}}
        settings.update(max_new_tokens=max_new_tokens or self.max_length, do_sample=False)
        if self.family == "blip2":
            bos = torch.full(
                (pixel_values.shape[0], 1),
                self.model.config.text_config.bos_token_id,
                dtype=torch.long,
                device=pixel_values.device,
            )
            prompt, mask = self._with_image_tokens(bos, torch.ones_like(bos))
            ids = self.model.generate(pixel_values=pixel_values, input_ids=prompt, attention_mask=mask, **settings)
            if ids.shape[1] >= prompt.shape[1] and torch.equal(ids[:, : prompt.shape[1]], prompt):
                ids = ids[:, prompt.shape[1] :]  # decoder-only generate returns the prompt too
        else:
            ids = self.model.generate(pixel_values=pixel_values, **settings)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def config_dict(self) -> dict:
        """What rebuilds this captioner without the hub: the BLIP / BLIP-2 config itself is stored."""
        return {
            "captioner": self.name,
            "family": self.family,
            "variant": self.variant,
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "generation": self.generation,
            "blip_config": self.model.config.to_json_string(use_diff=False),
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


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
    if name not in CAPTIONERS:
        raise ValueError(f"unknown captioner {name!r}; valid captioners: {', '.join(available_captioners())}")
    _check_variant(variant, pretrained)
    if vocab_size < 0:
        raise ValueError(f"need vocab_size >= 0, got {vocab_size}")
    arch = CAPTIONERS[name]
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


# -- loss --------------------------------------------------------------------------------------------------
def lm_loss_per_sample(token_logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Next-token cross-entropy: (mean over all target tokens, mean per sample [B]); padding is ignored.

    Position t predicts token t + 1, so [DEC] is never a target and [SEP] is (the model learns to stop).
    """
    logits = token_logits[:, :-1].float()
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    token = token.view(targets.shape)
    mask = (targets != -100).to(token.dtype)
    counts = mask.sum(dim=1)
    per_sample = (token * mask).sum(dim=1) / counts.clamp(min=1)
    mean = (token * mask).sum() / counts.sum().clamp(min=1)
    return mean, per_sample


def caption_loss(
    token_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vocab_logits: torch.Tensor | None = None,
    vocab_labels: torch.Tensor | None = None,
    lambda_vocab: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(LM loss + lambda * BCE, {"lm", "bce"} detached, per-sample LM loss detached)."""
    lm, per_sample = lm_loss_per_sample(token_logits, input_ids, attention_mask)
    total = lm
    bce = torch.zeros((), device=lm.device)
    if vocab_logits is not None and vocab_labels is not None and vocab_labels.shape[-1]:
        bce = F.binary_cross_entropy_with_logits(vocab_logits.float(), vocab_labels.to(torch.float32))
        if lambda_vocab > 0:
            total = lm + lambda_vocab * bce
    return total, {"lm": lm.detach(), "bce": bce.detach()}, per_sample.detach()


# -- data --------------------------------------------------------------------------------------------------
PRELOAD_BYTES = 256 * 2**20


class CaptionDataset(torch.utils.data.Dataset):
    """(pixels, input_ids, attention_mask, multi-hot vocabulary labels, index) per pair.

    Prompts are tokenized once, padded to the captioner's max_length (the trainer trims each batch to its
    longest row).  Images are decoded in the captioner's preprocessing, as pipeline.training.datasets does: all at once
    when the decoded set fits in PRELOAD_BYTES (decoding was half of a tiny CPU epoch, every epoch), else
    lazily in the loader's workers.
    """

    def __init__(self, images, prompts: Sequence[str], labels: Sequence[np.ndarray] | None, captioner: Captioner):
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        # A memory-mapped ImageColumn (or any indexable sequence) stays as it is: never a copy of the split.
        self.images = images.to_list() if hasattr(images, "to_list") else images
        self.input_ids, self.attention_mask = captioner.encode_text(prompts)
        self.k = captioner.vocab_size
        self.labels = LabelLists(labels) if (labels is not None and self.k) else None
        if self.labels is not None:
            self.labels.check_range(self.k)
        self.size, self.mean, self.std = captioner.image_size, captioner.mean, captioner.std
        self.pixels = None
        if len(self.images) * 3 * self.size**2 * 4 <= PRELOAD_BYTES:
            self.pixels = torch.stack([self._decode(i) for i in range(len(self.images))]) if self.images else None

    def _decode(self, index: int) -> torch.Tensor:
        try:
            return decode_image(self.images[index], self.size, self.mean, self.std)
        except Exception as exc:  # name the row: a silent skip would misalign the indices
            raise ValueError(f"cannot decode image at row {index}: {exc}") from exc

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        index = int(index)
        pixels = self.pixels[index] if self.pixels is not None else self._decode(index)
        labels = multi_hot(self.labels, index, self.k)
        return pixels, self.input_ids[index], self.attention_mask[index], labels, index


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(mask.sum(dim=1).max())
    return ids[:, :n], mask[:, :n]


# -- training ----------------------------------------------------------------------------------------------
@dataclass
class CaptionTrainConfig:
    """Captioner training settings; ``result_dict()`` holds those that change the weights."""

    epochs: int = 3  # over everything, when no curriculum stages are given
    stage_epochs: int = 1  # per curriculum stage
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    lambda_vocab: float = 0.1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0

    def result_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("device", "num_workers")}


def _caption_run_fingerprint(
    captioner: Captioner, train_set: CaptionDataset, config: CaptionTrainConfig, stages
) -> str:
    """What decides the fine-tuned weights: settings, captioner config, training prompts' tokens, stages."""
    import hashlib

    from pipeline.training.checkpoint import model_config

    settings = json.dumps([config.result_dict(), model_config(captioner)], sort_keys=True, default=str)
    digest = hashlib.sha256(settings.encode())
    digest.update(train_set.input_ids.cpu().numpy().tobytes())
    for stage in stages:
        digest.update(np.asarray(stage, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()[:24]


def train_captioner(
    captioner: Captioner,
    train_set: CaptionDataset,
    config: CaptionTrainConfig,
    stages: Sequence[np.ndarray] | None = None,
    val_set: CaptionDataset | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_batch: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    checkpoint_dir: str | None = None,
) -> list[dict]:
    """Fine-tune in place: AdamW, one warm-up + cosine schedule over all stages, shuffling only inside a stage.

    ``stages`` (curriculum_stages) are trained in order, ``stage_epochs`` each; without them ``epochs``
    epochs over everything.  ``on_batch(stage, epoch, indices, per-sample LM loss)`` sees every batch (the
    preliminary difficulty pass and the tests use it).  Returns one record per epoch.

    With ``checkpoint_dir``, weights, optimizer and schedule are saved after every epoch and a killed run
    resumes after its last finished epoch, with the weights an uninterrupted run has (every epoch seeds its
    own shuffle and RNG); a checkpoint from other settings, data or stages is discarded, not resumed.
    """
    from pipeline.training.checkpoint import (
        latest_checkpoint,
        load_checkpoint,
        read_state,
        remove_checkpoints,
        save_checkpoint,
    )
    from pipeline.training.loop import (
        autocast_dtype,
        cosine_with_warmup,
        make_optimizer,
        resolve_device,
        seed_everything,
    )

    n = len(train_set)
    stage_list = [np.arange(n)] if stages is None else [np.asarray(s, dtype=np.int64) for s in stages]
    if not stage_list or any(s.size == 0 for s in stage_list):
        raise ValueError("every curriculum stage needs at least one sample")
    if any(s.min() < 0 or s.max() >= n for s in stage_list):
        raise ValueError(f"stage indices outside the training set of {n}")
    per_stage = config.stage_epochs if stages is not None else config.epochs
    plan = [(s, e) for s in range(len(stage_list)) for e in range(per_stage)]
    device = resolve_device(config.device)
    amp = autocast_dtype(config.precision, device)
    captioner.to(device)
    sampler = StageSampler(stage_list[0], True, config.seed)
    loader = make_loader(
        train_set,
        config.batch_size,
        seed=config.seed,
        num_workers=config.num_workers,
        sampler=sampler,
        pin_memory=device.type == "cuda",
    )
    total_steps = sum(-(-len(stage_list[s]) // config.batch_size) for s, _ in plan)
    optimizer = make_optimizer(captioner, config)
    scheduler = cosine_with_warmup(optimizer, total_steps, int(round(config.warmup_fraction * total_steps)))
    history, done = [], 0
    fingerprint = _caption_run_fingerprint(captioner, train_set, config, stage_list)
    latest = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
    if latest is not None:
        if read_state(latest)["progress"].get("fingerprint") == fingerprint:
            state = load_checkpoint(
                latest, captioner, optimizer, scheduler, restore_rng=False, expected_embedding_dim=None
            )
            history, done = list(state["progress"]["history"]), int(state["progress"]["done"])
        else:  # another run's progress (other settings, data or stages): start over
            remove_checkpoints(checkpoint_dir)
    for k, (stage, epoch) in enumerate(plan):
        if k < done:
            continue
        sampler.set_stage(stage_list[stage])
        sampler.set_epoch(stage, epoch)
        loader.generator.manual_seed(epoch_seed(config.seed, stage, epoch, salt=10_000))
        seed_everything(epoch_seed(config.seed, stage, epoch, salt=1))
        captioner.train()
        started = time.perf_counter()
        sums = {"loss": 0.0, "lm": 0.0, "bce": 0.0}
        seen = 0
        for pixels, ids, mask, labels, index in loader:
            ids, mask = _trim(ids, mask)
            pixels, ids, mask, labels = (t.to(device) for t in (pixels, ids, mask, labels))
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                token_logits, vocab_logits = captioner(pixels, ids, mask)
            loss, parts, per_sample = caption_loss(token_logits, ids, mask, vocab_logits, labels, config.lambda_vocab)
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(captioner.trainable_parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            b = pixels.shape[0]
            sums["loss"] += float(loss.detach()) * b
            sums["lm"] += float(parts["lm"]) * b
            sums["bce"] += float(parts["bce"]) * b
            seen += b
            if on_batch is not None:
                on_batch(stage, epoch, index, per_sample.cpu())
        record = {
            "stage": stage,
            "epoch": epoch,
            "stage_size": int(len(stage_list[stage])),
            "train_loss": sums["loss"] / max(seen, 1),
            "train_lm": sums["lm"] / max(seen, 1),
            "train_bce": sums["bce"] / max(seen, 1),
            "val_lm": evaluate_lm(captioner, val_set, config.batch_size, device),
            "lr": scheduler.get_last_lr()[0],
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        if on_log is not None:
            on_log(record)
        if checkpoint_dir:
            progress = {"done": k + 1, "history": history, "fingerprint": fingerprint}
            save_checkpoint(
                checkpoint_dir,
                captioner,
                optimizer,
                scheduler,
                progress=progress,
                config=config.result_dict(),
                index=k + 1,
                rng=False,
                keep_last=1,
            )
    return history


@torch.no_grad()
def evaluate_lm(captioner: Captioner, dataset: CaptionDataset | None, batch_size: int = 32, device="cpu") -> float:
    """Mean per-sample LM loss on ``dataset`` (eval mode)."""
    if dataset is None or len(dataset) == 0:
        return float("nan")
    captioner.eval()
    total, count = 0.0, 0
    for pixels, ids, mask, _, _ in make_loader(dataset, batch_size, pin_memory=False):
        ids, mask = _trim(ids, mask)
        token_logits, _ = captioner(pixels.to(device), ids.to(device), mask.to(device))
        _, per_sample = lm_loss_per_sample(token_logits, ids.to(device), mask.to(device))
        total += float(per_sample.sum())
        count += len(per_sample)
    return total / count


def preliminary_loss_history(
    captioner: Captioner, train_set: CaptionDataset, config: CaptionTrainConfig, epochs: int
) -> np.ndarray:
    """The captioner's own difficulty pass: [epochs, n] of minus each sample's training LM loss (higher = easier).

    Feed it to curriculum.difficulty_from_history; the curriculum run then starts from a fresh captioner.
    """
    n = len(train_set)
    out = np.full((epochs, n), np.nan, dtype=np.float64)

    def record(stage, epoch, index, per_sample):
        out[epoch, np.asarray(index)] = -per_sample.double().numpy()

    cfg = CaptionTrainConfig(**{**asdict(config), "epochs": epochs})
    train_captioner(captioner, train_set, cfg, on_batch=record)
    return out


def combined_difficulty(per_backbone: Sequence[np.ndarray]) -> np.ndarray:
    """One difficulty per sample from several backbones' difficulty_scores (aligned arrays, NaN = not scored).

    Each backbone's mean cosines live on their own scale, so each is turned into a percentile rank in
    [0, 1] (1 = easiest) and the ranks are averaged over the backbones that scored the sample; a sample no
    backbone scored gets -inf, the hardest, as curriculum.difficulty_from_history does.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in per_backbone]
    if not arrays:
        raise ValueError("no difficulty scores to combine")
    n = arrays[0].shape[0]
    ranks = np.full((len(arrays), n), np.nan)
    for row, values in enumerate(arrays):
        if values.shape != (n,):
            raise ValueError(f"difficulty arrays differ in length: {values.shape} vs ({n},)")
        seen = np.isfinite(values)
        if seen.sum() == 1:
            ranks[row, seen] = 0.5
        elif seen.any():
            order = np.argsort(np.argsort(values[seen], kind="stable"), kind="stable")
            ranks[row, seen] = order / (seen.sum() - 1)
    counts = np.isfinite(ranks).sum(axis=0)
    sums = np.where(np.isfinite(ranks), ranks, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)


# -- generation --------------------------------------------------------------------------------------------
def generate_prompts(
    captioner: Captioner,
    images: Sequence[bytes],
    batch_size: int = 32,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    device: str | torch.device = "auto",
    **kwargs,
) -> list[str]:
    """Generated prompt text for encoded images, in order; settings not given are the captioner's own
    (``kwargs``: see Captioner.generate)."""
    from pipeline.training.loop import resolve_device

    dev = resolve_device(device) if isinstance(device, str) else device
    captioner.to(dev).eval()
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pixels = torch.stack([decode_image(b, captioner.image_size, captioner.mean, captioner.std) for b in batch])
        out += captioner.generate(pixels.to(dev), num_beams=num_beams, max_new_tokens=max_new_tokens, **kwargs)
    return out


# -- checkpoints -------------------------------------------------------------------------------------------
TOKENIZER_DIR = "tokenizer"


def save_captioner(captioner: Captioner, directory: str, progress: dict | None = None, config: dict | None = None):
    """Tokenizer files, then weights (pipeline.training.checkpoint: safetensors, atomic); weights present = complete."""
    from pipeline import storage as store
    from pipeline.training.checkpoint import remove_checkpoints, save_checkpoint

    remove_checkpoints(directory)
    old = store.as_path(f"{directory.rstrip('/')}/{TOKENIZER_DIR}")
    if old.exists():  # files another tokenizer version wrote must not be read with this one's
        for entry in old.iterdir():
            entry.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        captioner.tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                data = f.read()
            with store.atomic_local_path(f"{directory.rstrip('/')}/{TOKENIZER_DIR}/{name}") as target:
                target.write_bytes(data)
    return save_checkpoint(directory, captioner, progress=progress, config=config, index=1, rng=False, keep_last=1)


def load_captioner(directory: str, device: str = "cpu") -> Captioner:
    """Rebuild a saved captioner from its directory alone (no hub: the BLIP config and tokenizer are stored)."""
    from transformers import (
        AutoTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        BlipConfig,
        BlipForConditionalGeneration,
    )

    from pipeline import storage as store
    from pipeline.training.checkpoint import CheckpointError, latest_checkpoint, load_model_weights

    weights = latest_checkpoint(directory)
    if weights is None:
        raise CheckpointError(f"no captioner checkpoint in {directory}")
    state, config = load_model_weights(weights, expected_embedding_dim=None)
    with tempfile.TemporaryDirectory() as tmp:
        source = store.as_path(f"{directory.rstrip('/')}/{TOKENIZER_DIR}")
        for entry in source.iterdir():
            with open(os.path.join(tmp, entry.name), "wb") as f:
                f.write(entry.read_bytes())
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    if config.get("family", "blip") == "blip2":
        model = Blip2ForConditionalGeneration(Blip2Config.from_dict(json.loads(config["blip_config"])))
    else:
        model = BlipForConditionalGeneration(BlipConfig.from_dict(json.loads(config["blip_config"])))
    captioner = Captioner(
        model,
        tokenizer,
        name=config["captioner"],
        variant=config["variant"],
        vocab_size=config["vocab_size"],
        max_length=config["max_length"],
        generation=config.get("generation"),
    )
    captioner.load_state_dict(state)
    return captioner.to(device).eval()


# -- scores ------------------------------------------------------------------------------------------------
def _unit(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=-1, keepdims=True), 1e-12)


def sbert_cosines(generated: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per row, the cosine of the generated prompt's SBERT embedding with the true prompt's (the Kaggle metric
    is the mean of these over images and, with 384 values per image, the same number)."""
    return (_unit(generated) * _unit(targets)).sum(axis=-1)


def clip_s(image_embeddings: np.ndarray, text_embeddings: np.ndarray, w: float = CLIP_S_WEIGHT) -> np.ndarray:
    """CLIP-S (Hessel et al. 2021) per row: w * max(cos(image, text), 0)."""
    return w * np.clip((_unit(image_embeddings) * _unit(text_embeddings)).sum(axis=-1), 0.0, None)


def ref_clip_s(
    image_embeddings: np.ndarray,
    candidate_embeddings: np.ndarray,
    reference_embeddings: np.ndarray,
    w: float = CLIP_S_WEIGHT,
) -> np.ndarray:
    """RefCLIPScore per row: harmonic mean of CLIP-S(image, candidate) and max(max_r cos(candidate, ref_r), 0).

    ``reference_embeddings`` is [n, d] (one reference each, the true prompt here) or [n, R, d].  The
    reference term is clipped at 0 like CLIP-S so the harmonic mean stays defined; it is 0 when both are 0.
    Papers print it x100 (the paper's BLIP 31.88 reads 0.3188 here).
    """
    refs = _unit(reference_embeddings)
    if refs.ndim == 2:
        refs = refs[:, None, :]
    cand = _unit(candidate_embeddings)
    ref_term = np.clip(np.einsum("nd,nrd->nr", cand, refs).max(axis=1), 0.0, None)
    image_term = clip_s(image_embeddings, candidate_embeddings, w)
    denom = image_term + ref_term
    return np.where(denom > 0, 2.0 * image_term * ref_term / np.where(denom > 0, denom, 1.0), 0.0)


def caption_table(pairs, generated: Sequence[str], generated_embeddings: np.ndarray, scorer: ClipScorer):
    """The caption_predictions table for ``pairs`` (image_ids, images, prompts, targets, as SplitData holds them):
    per image the generated prompt, its SBERT embedding and cosine to the true prompt's (``targets``), CLIP-S
    of the image and the generated prompt, and RefCLIPScore with the true prompt as the reference."""
    import polars as pl

    from pipeline.training.pairs import embedding_series

    if len(generated) != len(pairs.image_ids):
        raise ValueError(f"{len(generated)} generated prompts for {len(pairs.image_ids)} images")
    images = scorer.image_embeddings(pairs.images)
    candidates, references = scorer.text_embeddings(generated), scorer.text_embeddings(pairs.prompts)
    embeddings = np.asarray(generated_embeddings, np.float32).reshape(len(generated), -1)
    return pl.DataFrame(
        {
            "image_id": pairs.image_ids,
            "prompt": pairs.prompts,
            "generated": list(generated),
            "sbert_cosine": sbert_cosines(embeddings, pairs.targets).astype(np.float32),
            "clip_s": clip_s(images, candidates).astype(np.float32),
            "refclip_s": ref_clip_s(images, candidates, references).astype(np.float32),
        },
        schema_overrides={"image_id": pl.String, "prompt": pl.String, "generated": pl.String},
    ).with_columns(embedding_series("embedding", embeddings))


class ClipScorer:
    """CLIP image and text embeddings (unit rows) for CLIP-S, RefCLIPScore and the U-Net swap report.

    Images (encoded bytes or PIL images) are resized to the tower's square input and normalised with CLIP's
    mean / std, which is what CLIPImageProcessor does to a square image.
    """

    def __init__(
        self, model, tokenizer, device: str | torch.device = "cpu", batch_size: int = 32, description: str = ""
    ):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.description = description

    @torch.no_grad()
    def image_embeddings(self, images: Sequence) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.stack([_clip_pixels(im, self.image_size) for im in images[start : start + self.batch_size]])
            out.append(_features(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return _unit(np.concatenate(out)) if out else np.zeros((0, self.model.config.projection_dim))

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            feats = self.model.get_text_features(
                input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device)
            )
            out.append(_features(feats))
        return _unit(np.concatenate(out)) if out else np.zeros((0, self.model.config.projection_dim))


def _features(output) -> np.ndarray:
    """transformers 5 returns the projected features as pooler_output; 4.x returned the tensor itself."""
    tensor = output.pooler_output if hasattr(output, "pooler_output") else output
    return tensor.float().cpu().numpy()


def _clip_pixels(image, size: int) -> torch.Tensor:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), size, CLIP_MEAN, CLIP_STD)
    import io

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return decode_image(buffer.getvalue(), size, CLIP_MEAN, CLIP_STD)


def load_clip_scorer(
    variant: str = "tiny", source: str = CLIP_SCORE_HUB_ID, device: str = "cpu", seed: int = 0
) -> ClipScorer:
    """full: CLIPModel + tokenizer from the hub (``source``); tiny: a random-init toy CLIPModel (seeded) with
    the offline BERT tokenizer, whose scores exercise the code path but measure nothing."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    _check_variant(variant)
    if variant == "full":
        return ClipScorer(
            CLIPModel.from_pretrained(source), AutoTokenizer.from_pretrained(source), device, description=source
        )
    tokenizer = minilm_tokenizer()
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = CLIPModel(
            CLIPConfig(
                text_config={**TINY_CLIP["text"], **ids},
                vision_config=TINY_CLIP["vision"],
                projection_dim=TINY_CLIP["projection_dim"],
            )
        )
    finally:
        torch.random.set_rng_state(generator_state)
    return ClipScorer(model, tokenizer, device, description="tiny random-init CLIPModel (sample profile)")


# -- report ------------------------------------------------------------------------------------------------
def report_rows(predictions: Mapping[str, Any], variants: Mapping[str, str] | None = None) -> list[dict]:
    """Rows for the evaluation report, one per captioner: mean SBERT cosine (Kaggle metric), RefCLIPScore,
    CLIP-S, test images, and the Kaggle first place for reference.  ``predictions`` maps a captioner name to
    its caption_predictions table (columns sbert_cosine, refclip_s, clip_s)."""
    rows = []
    for name, frame in predictions.items():
        rows.append(
            {
                "captioner": name,
                "variant": (variants or {}).get(name, ""),
                "sbert_cosine": float(frame["sbert_cosine"].mean()) if frame.height else float("nan"),
                "refclip_score": float(frame["refclip_s"].mean()) if frame.height else float("nan"),
                "clip_s": float(frame["clip_s"].mean()) if frame.height else float("nan"),
                "test_images": int(frame.height),
                "kaggle_first_place": KAGGLE_FIRST_PLACE,
            }
        )
    return rows


__all__ = [
    "CAPTIONERS",
    "Captioner",
    "CaptionerArch",
    "CaptionDataset",
    "CaptionTrainConfig",
    "ClipScorer",
    "KAGGLE_FIRST_PLACE",
    "available_captioners",
    "caption_loss",
    "caption_table",
    "clip_s",
    "combined_difficulty",
    "create_captioner",
    "evaluate_lm",
    "generate_prompts",
    "load_captioner",
    "load_clip_scorer",
    "preliminary_loss_history",
    "ref_clip_s",
    "report_rows",
    "restrict_vocabulary",
    "save_captioner",
    "sbert_cosines",
    "train_captioner",
]
