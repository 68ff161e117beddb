"""What differs between the models the loop trains: a task object (``TrainTask``) gives the loop a batch's
forward and loss, the per-epoch figures, the validation metric and what identifies the training data.

The embedding regressors use ``EmbeddingTask``; the captioner subclasses TrainTask in
pipeline.captioning.training.  The batch helpers here (unpack, forward under autocast) are shared by the tasks,
the epoch loop and inference, so all see batches alike; their loaders come from pipeline.training.data.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.training.data import is_cached


class _Loop(Protocol):
    """What a task reads from the training loop (``pipeline.training.epochs._Loop`` implements it): declared
    here so that tasks do not import the loop that imports them."""

    model: torch.nn.Module  # the DDP wrapper when distributed
    unwrapped: torch.nn.Module
    device: torch.device
    amp: torch.dtype | None
    config: Any
    dist: Any
    train_set: Any
    embedding_dim: int | None

    def eval_loader(self, dataset) -> Any: ...

    def mean_over_ranks(self, total: torch.Tensor) -> float: ...


LossFn = Callable[..., tuple[torch.Tensor, dict]]


def default_loss(lambda_vocab: float) -> LossFn:
    from pipeline.models.loss import ReverseSDLoss

    return ReverseSDLoss(lambda_vocab)


def _unpack(batch, device: torch.device, non_blocking: bool):
    pixels, target, labels, index = batch[:4]
    context = batch[4] if len(batch) > 4 else None
    move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
    return move(pixels), move(target), move(labels), index, (move(context) if context is not None else None)


def _forward(model, unwrapped, pixels, context, amp_dtype, device, prefix_features: bool = False):
    """The model on a batch; ``prefix_features``: ``pixels`` is the frozen prefix's cached output."""
    ctx = context if getattr(unwrapped, "uses_context", False) else None
    with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext():
        if prefix_features:
            embedding, logits = model(None, context=ctx, prefix_features=pixels)
        else:
            embedding, logits = model(pixels, context=ctx)
    return embedding.float(), (logits.float() if logits is not None else None)


def _row_cosine(embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(embedding.float(), target.float(), dim=-1)


def _hash_array(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def init_heads_from_targets(model: torch.nn.Module, train_set) -> None:
    """Mean training target and word frequencies into the heads (ReverseSDHeads.init_from_targets).

    Every rank computes them from the same full dataset, so DDP replicas stay equal; a resumed run then
    loads its checkpoint over them."""
    heads = getattr(model, "heads", None)
    targets = getattr(train_set, "targets", None)
    if heads is None or not hasattr(heads, "init_from_targets") or targets is None or len(targets) == 0:
        return
    mean = torch.from_numpy(np.asarray(targets, dtype=np.float32).mean(axis=0))
    frequency = None
    labels, vocab_size = getattr(train_set, "labels", None), getattr(heads, "vocab_size", 0)
    if labels is not None and vocab_size:
        from pipeline.training.datasets import LabelLists

        counts = np.bincount(LabelLists(labels).values, minlength=vocab_size)[:vocab_size]
        frequency = torch.from_numpy(counts / len(targets))
    heads.init_from_targets(mean, frequency)


@dataclass
class StepOutput:
    """One micro-batch's training step as a task returns it to the loop."""

    loss: torch.Tensor  # the micro-batch's mean loss; the loop weights it for accumulation and runs backward
    size: int  # samples in the micro-batch
    sums: dict[str, torch.Tensor]  # per-epoch figures (task.stat_keys) summed over the micro-batch, float64
    per_sample: torch.Tensor  # one value per sample (cosine, LM loss) for on_batch
    index: Any  # the samples' dataset indices


class TrainTask:
    """What the shared loop needs to know about a model: forward + loss of a batch, the per-epoch figures,
    the validation metric and what identifies the training data.  Subclasses override the methods."""

    stat_keys: tuple[str, ...] = ("train_loss",)  # the keys of StepOutput.sums, in history order
    val_key = "val_cosine"  # the history field of the validation metric
    higher_is_better = True  # direction of val_key for best-epoch selection
    load_kwargs: dict = {}  # extra keyword arguments for checkpoint.load_checkpoint on resume

    def setup(self, loop: _Loop, train_set) -> None:
        """Called once the model is on its device, before DDP wraps it (every rank the same)."""

    def data_hash(self, train_set) -> str:
        raise NotImplementedError

    def train_step(self, loop: _Loop, batch) -> StepOutput:
        raise NotImplementedError

    def evaluate(self, loop: _Loop, dataset) -> float:
        raise NotImplementedError

    def score(self, record: dict) -> float:
        """The record's validation metric, higher = better (NaN when there is none)."""
        value = float(record.get(self.val_key, float("nan")))
        return value if self.higher_is_better else -value


class EmbeddingTask(TrainTask):
    """The paper's regressors: image (+ caption context) -> unit embedding and vocabulary logits, trained with
    ``loss_fn`` (default ReverseSDLoss(lambda_vocab)); validated by the mean cosine to the targets."""

    stat_keys = ("train_loss", "train_cosine")

    def __init__(self, loss_fn: LossFn | None = None):
        self.loss_fn = loss_fn

    def setup(self, loop: _Loop, train_set) -> None:
        if loop.config.init_heads_from_targets:
            init_heads_from_targets(loop.unwrapped, train_set)
        if self.loss_fn is None:
            self.loss_fn = default_loss(loop.config.lambda_vocab)

    def data_hash(self, train_set) -> str:
        return _hash_array(getattr(train_set, "targets", np.zeros(0)))

    def train_step(self, loop: _Loop, batch) -> StepOutput:
        dev, cfg = loop.device, loop.config
        pixels, target, labels, index, context = _unpack(batch, dev, dev.type == "cuda")
        cached = is_cached(loop.train_set)
        embedding, logits = _forward(loop.model, loop.unwrapped, pixels, context, loop.amp, dev, cached)
        if labels.shape[-1] == 0:
            labels_arg, logits_arg = None, None
        else:
            labels_arg, logits_arg = labels, logits
        loss, _ = self.loss_fn(embedding, target, logits_arg, labels_arg)
        if logits is not None and (logits_arg is None or (loop.dist.enabled and cfg.lambda_vocab == 0)):
            # Keep the vocabulary head in the graph with zero weight: DDP needs every parameter used.
            loss = loss + 0.0 * logits.sum()
        with torch.no_grad():
            cosine = _row_cosine(embedding.detach(), target)
        loop.embedding_dim = int(embedding.shape[-1])
        size = pixels.shape[0]
        sums = {"train_loss": loss.detach().double() * size, "train_cosine": cosine.double().sum()}
        return StepOutput(loss, size, sums, cosine.detach(), index)

    def evaluate(self, loop: _Loop, dataset) -> float:
        """Mean cosine on ``dataset``, each rank scoring its own shard."""
        loader = loop.eval_loader(dataset)
        loop.unwrapped.eval()
        total = torch.zeros(2, device=loop.device, dtype=torch.float64)
        with torch.inference_mode():
            for batch in loader:
                pixels, target, _, _, context = _unpack(batch, loop.device, loop.device.type == "cuda")
                embedding, _ = _forward(
                    loop.unwrapped, loop.unwrapped, pixels, context, loop.amp, loop.device, is_cached(dataset)
                )
                total[0] += _row_cosine(embedding, target).double().sum()
                total[1] += pixels.shape[0]
        return loop.mean_over_ranks(total)
