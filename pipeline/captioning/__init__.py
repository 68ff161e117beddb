"""Prompt generation: a captioner (BLIP; BLIP-2 opt-in) fine-tuned to write the prompt of an image with the
paper's recipe (vocabulary head + curriculum), and the scores the paper and the Kaggle competition report
for generated prompts (SBERT cosine, CLIP-S, RefCLIPScore).

Modules, in the order a run uses them:
    tokenizer   BLIP's tokenizer rebuilt offline, restricted to the training prompts for the tiny variant
    model       Captioner: BLIP / BLIP-2 + vocabulary head behind one forward signature
    registry    CAPTIONERS and create_captioner (variants and their check shared with pipeline.models)
    dataset     CaptionDataset: tokenized prompts, decoded images, vocabulary labels
    loss        LM loss + lambda * BCE
    training    CaptionTask on the shared loop (pipeline.training.loop), curriculum difficulty
    generation  generate_prompts
    checkpoint  save_captioner / load_captioner (no hub needed to reload)
    scoring     SBERT cosine, CLIP-S, RefCLIPScore, ClipScorer, the caption_predictions table, report rows
"""

from pipeline.captioning.checkpoint import TOKENIZER_DIR, load_captioner, save_captioner
from pipeline.captioning.dataset import CaptionDataset
from pipeline.captioning.generation import generate_prompts
from pipeline.captioning.loss import caption_loss, lm_loss_per_sample
from pipeline.captioning.model import Captioner
from pipeline.captioning.registry import (
    BLIP2_HUB_ID,
    BLIP_HUB_ID,
    CAPTIONERS,
    VARIANTS,
    CaptionerArch,
    create_captioner,
)
from pipeline.captioning.scoring import (
    CLIP_SCORE_HUB_ID,
    KAGGLE_FIRST_PLACE,
    ClipScorer,
    caption_table,
    clip_s,
    load_clip_scorer,
    ref_clip_s,
    report_rows,
    sbert_cosines,
)
from pipeline.captioning.tokenizer import IMAGE_TOKEN, minilm_tokenizer, restrict_vocabulary, tiny_tokenizer
from pipeline.captioning.training import (
    CaptionTask,
    CaptionTrainConfig,
    combined_difficulty,
    evaluate_lm,
    fit_captioner,
    preliminary_loss_history,
    train_captioner,
)

__all__ = [
    "BLIP2_HUB_ID",
    "BLIP_HUB_ID",
    "CAPTIONERS",
    "CLIP_SCORE_HUB_ID",
    "IMAGE_TOKEN",
    "KAGGLE_FIRST_PLACE",
    "TOKENIZER_DIR",
    "VARIANTS",
    "CaptionDataset",
    "CaptionTask",
    "CaptionTrainConfig",
    "Captioner",
    "CaptionerArch",
    "ClipScorer",
    "caption_loss",
    "caption_table",
    "clip_s",
    "combined_difficulty",
    "create_captioner",
    "evaluate_lm",
    "fit_captioner",
    "generate_prompts",
    "lm_loss_per_sample",
    "load_captioner",
    "load_clip_scorer",
    "minilm_tokenizer",
    "preliminary_loss_history",
    "ref_clip_s",
    "report_rows",
    "restrict_vocabulary",
    "save_captioner",
    "sbert_cosines",
    "tiny_tokenizer",
    "train_captioner",
]
