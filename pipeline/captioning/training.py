"""Fine-tuning the captioner on the shared training loop (pipeline/training/loop.py), with the paper's recipe.

The captioner is trained with the same two ideas as the embedding models:

- vocabulary head ("MLC"): a multi-label classifier over the K-word vocabulary on the pooled vision
  features; loss = captioning LM loss + lambda * BCE (pipeline/captioning/loss.py);
- curriculum ("CL", pipeline/training/curriculum.py): stages easy -> easy+medium -> all -> all, from difficulty
  buckets that come from the backbones' difficulty_scores (rank-averaged, ``combined_difficulty``) or from the
  captioner's own preliminary epochs (difficulty = minus the per-sample LM loss, higher = easier).

``CaptionTask`` is what the shared loop needs to know about a captioner (forward, loss, per-epoch figures,
validation LM loss); the loop brings DDP, gradient accumulation, best-epoch selection and kill-resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.captioning.dataset import CaptionDataset, trim_batch
from pipeline.captioning.loss import caption_loss, lm_loss_per_sample
from pipeline.captioning.model import Captioner
from pipeline.training.datasets import make_loader
from pipeline.training.loop import StepOutput, TrainConfig, TrainResult, TrainTask, preliminary_cosines, train_model


@dataclass
class CaptionTrainConfig(TrainConfig):
    """TrainConfig with the captioner's defaults: a smaller batch and learning rate for fine-tuning, gradient
    clipping, one kept checkpoint (a captioner checkpoint is large), no embedding heads to initialise."""

    batch_size: int = 32
    lr: float = 5e-5
    max_grad_norm: float | None = 1.0
    keep_checkpoints: int | None = 1
    init_heads_from_targets: bool = False


def _autocast(loop):
    if loop.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(loop.device.type, dtype=loop.amp)


def _lm_sums(model: Captioner, loader, device: torch.device, amp=None) -> torch.Tensor:
    """(sum of per-sample LM losses, samples) over ``loader``, eval mode, no autograd, float64."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)
    with torch.inference_mode():
        for pixels, ids, mask, _, _ in loader:
            ids, mask = trim_batch(ids, mask)
            pixels, ids, mask = pixels.to(device), ids.to(device), mask.to(device)
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                token_logits, _ = model(pixels, ids, mask)
            _, per_sample = lm_loss_per_sample(token_logits, ids, mask)
            total[0] += per_sample.double().sum()
            total[1] += per_sample.shape[0]
    return total


class CaptionTask(TrainTask):
    """The captioner on the shared loop: LM + lambda * BCE per batch, validated by the mean per-sample LM loss
    (lower is better, so best-epoch selection keeps the lowest).  The per-sample value handed to on_batch and
    preliminary passes is the sample's training LM loss."""

    stat_keys = ("train_loss", "train_lm", "train_bce")
    val_key = "val_lm"
    higher_is_better = False
    load_kwargs = {"expected_embedding_dim": None}  # a captioner has no embedding head to check

    def data_hash(self, train_set: CaptionDataset) -> str:
        return hashlib.sha256(train_set.input_ids.cpu().numpy().tobytes()).hexdigest()[:16]

    def train_step(self, loop, batch) -> StepOutput:
        pixels, ids, mask, labels, index = batch
        ids, mask = trim_batch(ids, mask)
        non_blocking = loop.device.type == "cuda"
        pixels, ids, mask, labels = (t.to(loop.device, non_blocking=non_blocking) for t in (pixels, ids, mask, labels))
        with _autocast(loop):
            token_logits, vocab_logits = loop.model(pixels, ids, mask)
        lambda_vocab = loop.config.lambda_vocab
        loss, parts, per_sample = caption_loss(token_logits, ids, mask, vocab_logits, labels, lambda_vocab)
        if vocab_logits is not None and loop.dist.enabled and (lambda_vocab <= 0 or labels.shape[-1] == 0):
            # Keep the vocabulary head in the graph with zero weight: DDP needs every parameter used.
            loss = loss + 0.0 * vocab_logits.float().sum()
        size = pixels.shape[0]
        sums = {
            "train_loss": loss.detach().double() * size,
            "train_lm": parts["lm"].double() * size,
            "train_bce": parts["bce"].double() * size,
        }
        return StepOutput(loss, size, sums, per_sample, index)

    def evaluate(self, loop, dataset: CaptionDataset) -> float:
        return loop.mean_over_ranks(_lm_sums(loop.unwrapped, loop.eval_loader(dataset), loop.device, loop.amp))


def fit_captioner(
    captioner: Captioner,
    train_set: CaptionDataset,
    config: CaptionTrainConfig,
    stages: Sequence[np.ndarray] | None = None,
    val_set: CaptionDataset | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_batch: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    checkpoint_dir: str | None = None,
) -> TrainResult:
    """Fine-tune in place on the shared loop (pipeline.training.loop.train_model with CaptionTask).

    ``stages`` (curriculum_stages) are trained in order, ``stage_epochs`` each; without them ``epochs``
    epochs over everything.  ``on_batch(stage, epoch, indices, per-sample LM loss)`` sees every micro-batch.
    With ``checkpoint_dir`` a killed run resumes after its last finished epoch with the weights an
    uninterrupted run has, and a checkpoint of other settings, data or stages is discarded; without one the
    checkpoints live in a temporary directory for the run.  Given ``val_set`` (and ``config.keep_best``), the
    captioner ends with the weights of its lowest-val-LM-loss epoch (``result.extra["selected_epoch"]``).
    """
    hook = None
    if on_batch is not None:

        def hook(stage, epoch, index, per_sample):
            on_batch(stage, epoch, index, per_sample.cpu())

    with contextlib.ExitStack() as stack:
        directory = checkpoint_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="captioner-"))
        return train_model(
            captioner,
            train_set,
            val_set,
            config,
            directory,
            stages=None if stages is None else list(stages),
            on_log=on_log,
            task=CaptionTask(),
            on_batch=hook,
        )


def train_captioner(
    captioner: Captioner, train_set: CaptionDataset, config: CaptionTrainConfig, *args, **kwargs
) -> list[dict]:
    """fit_captioner (the same arguments), returning its history: one record per epoch (train_loss, train_lm,
    train_bce, val_lm, lr, throughput, ...)."""
    return fit_captioner(captioner, train_set, config, *args, **kwargs).history


def evaluate_lm(captioner: Captioner, dataset: CaptionDataset | None, batch_size: int = 32, device="cpu") -> float:
    """Mean per-sample LM loss on ``dataset`` (eval mode)."""
    if dataset is None or len(dataset) == 0:
        return float("nan")
    total = _lm_sums(captioner, make_loader(dataset, batch_size, pin_memory=False), torch.device(device))
    return float(total[0] / total[1])


def preliminary_loss_history(
    captioner: Captioner, train_set: CaptionDataset, config: CaptionTrainConfig, epochs: int
) -> np.ndarray:
    """The captioner's own difficulty pass: [epochs, n] of minus each sample's training LM loss (higher = easier).

    Feed it to curriculum.difficulty_from_history; the curriculum run then starts from a fresh captioner.
    """
    return -preliminary_cosines(captioner, train_set, config, epochs, task=CaptionTask())


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
