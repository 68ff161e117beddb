"""Scores of generated prompts: the Kaggle metric (SBERT cosine to the true prompt), CLIP-S and RefCLIPScore
(Hessel et al. 2021) from a CLIP scorer, the caption_predictions table and the report's rows.  The U-Net
swap report scores its images with the same CLIP-S."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.captioning.tokenizer import minilm_tokenizer
from pipeline.metrics import normalise_rows
from pipeline.models.backbones import CLIP_MEAN, CLIP_STD, check_variant
from pipeline.models.tiny_clip import tiny_clip_model
from pipeline.training.datasets import image_tensor

CLIP_SCORE_HUB_ID = "openai/clip-vit-large-patch14"
KAGGLE_FIRST_PLACE = 0.66316  # private leaderboard, "Stable Diffusion - Image to Prompts"
CLIP_S_WEIGHT = 2.5  # Hessel et al.'s w in CLIP-S = w * max(cos, 0)


def sbert_cosines(generated: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per row, the cosine of the generated prompt's SBERT embedding with the true prompt's (the Kaggle metric
    is the mean of these over images and, with 384 values per image, the same number)."""
    return (normalise_rows(generated, np.float64) * normalise_rows(targets, np.float64)).sum(axis=-1)


def clip_s(image_embeddings: np.ndarray, text_embeddings: np.ndarray, w: float = CLIP_S_WEIGHT) -> np.ndarray:
    """CLIP-S (Hessel et al. 2021) per row: w * max(cos(image, text), 0)."""
    return w * np.clip(
        (normalise_rows(image_embeddings, np.float64) * normalise_rows(text_embeddings, np.float64)).sum(axis=-1),
        0.0,
        None,
    )


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
    refs = normalise_rows(reference_embeddings, np.float64)
    if refs.ndim == 2:
        refs = refs[:, None, :]
    cand = normalise_rows(candidate_embeddings, np.float64)
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
        return (
            normalise_rows(np.concatenate(out), np.float64) if out else np.zeros((0, self.model.config.projection_dim))
        )

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
        return (
            normalise_rows(np.concatenate(out), np.float64) if out else np.zeros((0, self.model.config.projection_dim))
        )


def _features(output) -> np.ndarray:
    """transformers 5 returns the projected features as pooler_output; 4.x returned the tensor itself."""
    tensor = output.pooler_output if hasattr(output, "pooler_output") else output
    return tensor.float().cpu().numpy()


def _clip_pixels(image, size: int) -> torch.Tensor:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return image_tensor(bytes(image), size, CLIP_MEAN, CLIP_STD)
    import io

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return image_tensor(buffer.getvalue(), size, CLIP_MEAN, CLIP_STD)


def load_clip_scorer(
    variant: str = "tiny", source: str = CLIP_SCORE_HUB_ID, device: str = "cpu", seed: int = 0
) -> ClipScorer:
    """full: CLIPModel + tokenizer from the hub (``source``); tiny: a random-init toy CLIPModel (seeded) with
    the offline BERT tokenizer, whose scores exercise the code path but measure nothing."""
    from transformers import AutoTokenizer, CLIPModel

    check_variant(variant)
    if variant == "full":
        return ClipScorer(
            CLIPModel.from_pretrained(source), AutoTokenizer.from_pretrained(source), device, description=source
        )
    tokenizer = minilm_tokenizer()
    model = tiny_clip_model(tokenizer, seed)
    return ClipScorer(model, tokenizer, device, description="tiny random-init CLIPModel (sample profile)")


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
