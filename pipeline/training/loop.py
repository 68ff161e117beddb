"""The trainer: AdamW + cosine schedule with warm-up, gradient accumulation, bf16 autocast on CUDA, a checkpoint
every epoch and exact resume, curriculum stages, DistributedDataParallel under torchrun.

Design choices that matter for results:
- ``batch_size`` is the GLOBAL batch (over all DDP ranks and accumulation steps together is
  ``batch_size * grad_accum_steps``), so a config means the same optimisation on 1 or 8 GPUs.
- Stages: ``stages=None`` trains ``epochs`` epochs over the whole training set; a list of index arrays (the
  curriculum) trains ``stage_epochs`` epochs on each stage in turn.  The learning-rate schedule spans the
  optimizer steps of all stages together (one warm-up, one cosine decay), as in one uninterrupted run.
- Every random choice of an epoch (the in-stage shuffle, dropout, workers) is seeded from
  (seed, stage, epoch), so resuming from the checkpoint of epoch k gives the same weights as never stopping.
- Checkpoints carry a fingerprint of what changes results (training config, model config, data, stages); a
  checkpoint directory holding another run's checkpoints is cleared instead of resumed.
- Frozen parts computed once: given a ``cache_dir``, a model with a frozen prefix (clip's tower, unet's VAE)
  has it run once per dataset (pipeline/training/feature_cache.py) and every epoch, evaluation and
  prediction runs only the trainable rest on the cached output; same sampler, seeds, stages and fingerprint,
  so the same model (up to the rounding of a kernel chosen by batch size) and interchangeable checkpoints.
- One loop for every model: what is specific to a model (forward, loss, per-epoch figures, the validation
  metric) is a small task object (``TrainTask``); the embedding regressors use ``EmbeddingTask``, the
  captioner pipeline.captioning.training.CaptionTask, and both get DDP, accumulation, best-epoch selection
  and resume from this one loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.storage import as_path, atomic_local_path
from pipeline.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_config,
    read_state,
    remove_checkpoints,
    save_checkpoint,
)
from pipeline.training.datasets import StageSampler, epoch_seed, make_loader
from pipeline.training.feature_cache import FeatureCache, feature_cache_for, feature_loader

LossFn = Callable[..., tuple[torch.Tensor, dict]]


@dataclass
class TrainConfig:
    """Training settings.  ``result_dict()`` are those that change the trained weights (for code versions)."""

    epochs: int = 3  # epochs over the whole set when no curriculum stages are given
    stage_epochs: int = 1  # epochs per curriculum stage when stages are given
    batch_size: int = 64  # global batch per micro-step, over all ranks
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    lambda_vocab: float = 0.1
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    num_workers: int = 0
    log_every: int = 50  # optimizer steps between progress logs (0: epoch logs only)
    eval_batch_size: int | None = None
    keep_checkpoints: int | None = 2
    init_heads_from_targets: bool = True  # heads start at the mean target / word frequencies (see heads.py)
    keep_best: bool = True  # early stopping: the final checkpoint holds the best-val epoch's weights

    def to_dict(self) -> dict:
        return asdict(self)

    def result_dict(self) -> dict:
        """The settings that change the trained weights (not device, workers, logging)."""
        ignore = {"device", "num_workers", "log_every", "eval_batch_size", "keep_checkpoints"}
        return {k: v for k, v in asdict(self).items() if k not in ignore}


@dataclass
class TrainResult:
    """What a training run gives back.  Fields after ``extra`` are newer and have defaults, so a metrics.json
    written by an older run still builds one (``TrainResult(**metrics)``)."""

    history: list[dict]
    best_val_cosine: float
    final_val_cosine: float
    checkpoint_path: str | None
    images_per_s: float  # training images per second (all ranks), mean over the epochs trained
    resumed_epochs: int = 0  # epochs restored from a checkpoint instead of trained in this call
    extra: dict = field(default_factory=dict)
    data_wait_fraction: float = 0.0  # time blocked on the data loader / training time, epochs trained
    peak_gpu_memory_mb: float | None = None  # torch.cuda.max_memory_allocated over the run; None on CPU
    device: str | None = None  # e.g. "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"
    # pipeline.training.feature_cache: {"used", "built", "reused", "build_seconds", "files", "directory"};
    # None when no cache directory was given or the model has no frozen prefix
    feature_cache: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def run_figures(metrics: dict) -> dict:
    """The figures of a run a person wants beside its results (asset metadata), from TrainResult.to_dict() or
    preliminary_cosines' ``metrics``: images/s, data-wait fraction, device, peak GPU memory (only when on a
    GPU) and the feature cache (used, built, build seconds).  Plain numbers, strings and booleans."""
    out = {
        "images_per_s": round(float(metrics.get("images_per_s") or 0.0), 2),
        "data_wait_fraction": round(float(metrics.get("data_wait_fraction") or 0.0), 4),
        "device": str(metrics.get("device") or "unknown"),
    }
    if metrics.get("peak_gpu_memory_mb") is not None:
        out["peak_gpu_memory_mb"] = round(float(metrics["peak_gpu_memory_mb"]), 1)
    cache = metrics.get("feature_cache") or {}
    out["feature_cache_used"] = bool(cache.get("used"))
    out["feature_cache_built"] = bool(cache.get("built"))
    out["feature_cache_build_s"] = round(float(cache.get("build_seconds") or 0.0), 2)
    return out


# -- environment -----------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random; call before building a model for reproducible init."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """ "auto" is CUDA when present (the local rank's GPU under torchrun), else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", 0)) if is_distributed_env() else torch.cuda.current_device()
        )
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision in ("auto", "bf16"):
        return torch.bfloat16
    raise ValueError(f"unknown precision {precision!r} (auto | bf16 | fp32)")


def device_name(device: torch.device) -> str:
    """The device as a person reads it: "cpu", or "cuda:0 (NVIDIA H100 80GB HBM3)"."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def throughput_summary(epochs: Sequence[dict], device: torch.device | None = None) -> dict:
    """images_per_s (mean), data_wait_fraction (total wait / total time) and peak_gpu_memory_mb (max; None
    off CUDA) over per-epoch records holding images_per_s, data_wait_fraction, gpu_mem_mb and seconds."""
    seconds = [float(e.get("seconds") or 0.0) for e in epochs]
    if sum(seconds) > 0:
        wait = sum(float(e.get("data_wait_fraction", 0.0)) * t for e, t in zip(epochs, seconds)) / sum(seconds)
    else:
        wait = float(np.mean([e.get("data_wait_fraction", 0.0) for e in epochs])) if epochs else 0.0
    peaks = [float(e["gpu_mem_mb"]) for e in epochs if e.get("gpu_mem_mb")]
    on_gpu = device.type == "cuda" if device is not None else bool(peaks)
    return {
        "images_per_s": float(np.mean([e["images_per_s"] for e in epochs])) if epochs else 0.0,
        "data_wait_fraction": float(wait),
        "peak_gpu_memory_mb": (max(peaks) if peaks else 0.0) if on_gpu else None,
    }


def is_distributed_env() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when WORLD_SIZE > 1; idempotent."""
    if not is_distributed_env():
        return DistContext()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


# -- pieces ----------------------------------------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else model.parameters()
    return [p for p in params if p.requires_grad]


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW on the trainable parameters; no weight decay on biases and norm scales (1-d tensors)."""
    params = _trainable(model)
    if not params:
        raise ValueError("model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=config.lr)


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 0 over ``total_steps`` (transformers' get_cosine_schedule_with_warmup)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step + 1) / float(warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def _is_cached(dataset) -> bool:
    return bool(getattr(dataset, "prefix_features", False))


def _loader(dataset, batch_size: int, *, num_workers: int, pin_memory: bool, sampler=None, seed: int = 0):
    """make_loader, or for cached features (a gather from a mapped file, a whole batch at once in the main
    process) feature_loader: the same batches either way."""
    if _is_cached(dataset):
        return feature_loader(dataset, batch_size, sampler=sampler, seed=seed, pin_memory=pin_memory)
    return make_loader(dataset, batch_size, seed=seed, num_workers=num_workers, sampler=sampler, pin_memory=pin_memory)


def _row_cosine(embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(embedding.float(), target.float(), dim=-1)


def _hash_array(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def run_fingerprint(
    config: TrainConfig, model: torch.nn.Module, train_set, stages: Sequence[np.ndarray], task: TrainTask | None = None
) -> str:
    """What decides the trained weights: config, model config, training data, stage membership."""
    payload = {
        "config": config.result_dict(),
        "model": model_config(model),
        "n": len(train_set),
        "targets": (task or EmbeddingTask()).data_hash(train_set),
        "stages": [_hash_array(np.asarray(s, dtype=np.int64)) for s in stages],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


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


# -- tasks: what differs between the models the loop trains ----------------------------------------------
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
        cached = _is_cached(loop.train_set)
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
                    loop.unwrapped, loop.unwrapped, pixels, context, loop.amp, loop.device, _is_cached(dataset)
                )
                total[0] += _row_cosine(embedding, target).double().sum()
                total[1] += pixels.shape[0]
        return loop.mean_over_ranks(total)


# -- the epoch loop --------------------------------------------------------------------------------------
class _Loop:
    """One training run's moving parts; shared by train_model and preliminary_cosines."""

    def __init__(
        self, model, train_set, config: TrainConfig, stages, epochs_per_stage, task: TrainTask, on_log, cache_dir=None
    ):
        self.config = config
        self.task = task
        self.device = resolve_device(config.device)
        self.dist = init_distributed(self.device)
        self.amp = autocast_dtype(config.precision, self.device)
        self.unwrapped = model.to(self.device)
        task.setup(self, train_set)
        self.model = self.unwrapped
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.unwrapped, device_ids=ids)
        self.stages = [np.asarray(s, dtype=np.int64) for s in stages]
        self.plan = [(s, e) for s in range(len(self.stages)) for e in range(epochs_per_stage)]
        world = self.dist.world_size
        if config.batch_size % world:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world} DDP ranks")
        self.rank_batch = config.batch_size // world
        self.accum = max(1, int(config.grad_accum_steps))
        # The frozen prefix (CLIP tower, VAE) run once per dataset when a cache directory is given.
        self.feature_cache: FeatureCache | None = feature_cache_for(
            self.unwrapped,
            cache_dir,
            device=self.device,
            amp_dtype=self.amp,
            batch_size=config.eval_batch_size or self.rank_batch,
            num_workers=config.num_workers,
            dist=self.dist,
        )
        train_set = self.prepare(train_set)
        self.train_set = train_set
        self.sampler = StageSampler(self.stages[0] if self.stages else [], True, config.seed, self.dist.rank, world)
        self.loader = _loader(
            train_set,
            self.rank_batch,
            seed=config.seed,
            num_workers=config.num_workers,
            sampler=self.sampler,
            pin_memory=self.device.type == "cuda",
        )
        self.total_steps = sum(self._steps_in(len(self.stages[s])) for s, _ in self.plan)
        self.optimizer = make_optimizer(self.unwrapped, config)
        warmup = int(round(config.warmup_fraction * self.total_steps))
        self.scheduler = cosine_with_warmup(self.optimizer, self.total_steps, warmup)
        self.on_log = on_log if self.dist.is_main else None
        self.step = 0
        self.embedding_dim: int | None = None
        self._eval_loaders: dict[int, tuple[object, torch.utils.data.DataLoader]] = {}

    def prepare(self, dataset):
        """``dataset`` with the frozen prefix's cached output in place of pixels when a cache is in use."""
        return self.feature_cache.wrap(dataset) if self.feature_cache is not None else dataset

    def cache_summary(self) -> dict | None:
        return self.feature_cache.summary() if self.feature_cache is not None else None

    def _rank_samples(self, n_stage: int) -> int:
        return -(-n_stage // self.dist.world_size) if n_stage else 0

    def _steps_in(self, n_stage: int) -> int:
        micro = -(-self._rank_samples(n_stage) // self.rank_batch)
        return -(-micro // self.accum)

    def train_epoch(self, stage: int, epoch: int, on_batch: Callable | None = None) -> dict:
        """One epoch over stage ``stage``'s subset; returns loss / cosine / throughput figures."""
        cfg, dev = self.config, self.device
        self.sampler.set_stage(self.stages[stage])
        self.sampler.set_epoch(stage, epoch)
        self.loader.generator.manual_seed(epoch_seed(cfg.seed, stage, epoch, salt=10_000 + self.dist.rank))
        # Dropout and any other randomness of this epoch depend only on (seed, stage, epoch, rank).
        seed_everything(epoch_seed(cfg.seed, stage, epoch, salt=1 + self.dist.rank))
        self.model.train()
        n_rank = len(self.sampler)
        group_span = self.rank_batch * self.accum
        n_micro = len(self.loader)
        sums = {k: torch.zeros((), device=dev, dtype=torch.float64) for k in self.task.stat_keys}
        seen = 0
        wait = 0.0
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        started = time.perf_counter()
        iterator = iter(self.loader)
        self.optimizer.zero_grad(set_to_none=True)
        for i in range(n_micro):
            t_wait = time.perf_counter()
            batch = next(iterator)
            wait += time.perf_counter() - t_wait
            group_start = (i // self.accum) * group_span
            last_in_group = (i + 1) % self.accum == 0 or i == n_micro - 1
            sync = contextlib.nullcontext()
            if self.dist.enabled and not last_in_group:
                sync = self.model.no_sync()
            with sync:
                out = self.task.train_step(self, batch)
                weight = out.size / min(group_span, n_rank - group_start)  # mean over the whole group
                (out.loss * weight).backward()
            for key in self.task.stat_keys:
                sums[key] += out.sums[key]
            seen += out.size
            if on_batch is not None:
                on_batch(out.index, out.per_sample)
            if last_in_group:
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(_trainable(self.unwrapped), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.on_log and cfg.log_every and self.step % cfg.log_every == 0:
                    self.on_log(
                        {
                            "event": "step",
                            "stage": stage,
                            "epoch": epoch,
                            "step": self.step,
                            "of": self.total_steps,
                            "loss": round(float(out.loss.detach()), 5),
                            "lr": self.scheduler.get_last_lr()[0],
                        }
                    )
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - started
        totals = torch.stack([*sums.values(), torch.tensor(float(seen), device=dev, dtype=torch.float64)])
        if self.dist.enabled:
            dist.all_reduce(totals)
        count = max(float(totals[-1]), 1.0)
        return {
            **{key: float(totals[k]) / count for k, key in enumerate(sums)},
            "images_per_s": float(totals[-1]) / max(elapsed, 1e-9),
            "data_wait_fraction": wait / max(elapsed, 1e-9),
            "gpu_mem_mb": (torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else 0.0,
            "seconds": elapsed,
        }

    def save(self, checkpoint_dir, progress: dict, index: int) -> str | None:
        """Checkpoint number ``index`` from rank 0 (the others wait); its weights path on rank 0, else None."""
        path = None
        if self.dist.is_main:
            path = str(
                save_checkpoint(
                    checkpoint_dir,
                    self.unwrapped,
                    self.optimizer,
                    self.scheduler,
                    progress=progress,
                    config=self.config.to_dict(),
                    index=index,
                    embedding_dim=self.embedding_dim,
                    keep_last=self.config.keep_checkpoints,
                )
            )
        self.dist.barrier()
        return path

    def evaluate(self, dataset) -> float:
        """The task's validation metric on ``dataset`` (NaN without one)."""
        if dataset is None or len(dataset) == 0:
            return float("nan")
        return self.task.evaluate(self, dataset)

    def eval_loader(self, dataset):
        """This rank's shard of ``dataset`` in order; one loader per dataset, so its workers persist."""
        cfg = self.config
        cached = self._eval_loaders.get(id(dataset))
        if cached is None or cached[0] is not dataset:
            shard = np.arange(self.dist.rank, len(dataset), self.dist.world_size)
            batch, pin = cfg.eval_batch_size or self.rank_batch, self.device.type == "cuda"
            if _is_cached(dataset):
                loader = feature_loader(dataset, batch, sampler=shard.tolist(), pin_memory=pin)
            else:
                loader = make_loader(
                    torch.utils.data.Subset(dataset, shard.tolist()), batch, num_workers=cfg.num_workers, pin_memory=pin
                )
            self._eval_loaders[id(dataset)] = (dataset, loader)
        return self._eval_loaders[id(dataset)][1]

    def mean_over_ranks(self, total: torch.Tensor) -> float:
        """``total`` = (sum, count) of this rank's shard -> the mean over all ranks (NaN for no samples)."""
        if self.dist.enabled:
            dist.all_reduce(total)
        return float(total[0] / total[1]) if float(total[1]) else float("nan")


def _check_stages(stages, n: int) -> list[np.ndarray]:
    if stages is None:
        return [np.arange(n)]
    out = []
    for k, s in enumerate(stages):
        arr = np.asarray(s, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise ValueError(f"stage {k} has indices outside the training set of {n}")
        if arr.size == 0:
            raise ValueError(f"stage {k} is empty: every curriculum stage needs at least one sample")
        out.append(arr)
    if not out:
        raise ValueError("stages is an empty list")
    return out


# -- public API ------------------------------------------------------------------------------------------
def train_model(
    model: torch.nn.Module,
    train_set,
    val_set,
    config: TrainConfig,
    checkpoint_dir,
    stages: list[np.ndarray] | None = None,
    on_log: Callable[[dict], None] | None = None,
    resume: bool = True,
    loss_fn: LossFn | None = None,
    cache_dir=None,
    task: TrainTask | None = None,
    on_batch: Callable[[int, int, Any, torch.Tensor], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place; a checkpoint after every epoch; resume from the latest matching checkpoint.

    ``stages`` (curriculum index arrays, e.g. from curriculum_stages) are trained in order,
    ``config.stage_epochs`` epochs each; without them ``config.epochs`` epochs over everything.
    ``on_log`` gets every epoch's record (the history entries, plus "event": "epoch") and a progress record
    every ``config.log_every`` optimizer steps; under DDP only rank 0 logs and writes checkpoints.
    ``loss_fn`` defaults to pipeline.models.loss.ReverseSDLoss(config.lambda_vocab).
    ``cache_dir``: when given and the model has a frozen prefix (``model.frozen_prefix()``: CLIP's tower,
    the unet's VAE), the prefix runs once per dataset into a feature cache there
    (pipeline.training.feature_cache) and training / validation run only the trainable rest on the cached
    output: the same model, without recomputing the frozen part every epoch.  Without one, nothing changes.
    ``task`` says what the model is trained to do (default EmbeddingTask(loss_fn)); the history records
    its per-epoch figures and validation metric, and best-epoch selection follows that metric.
    ``on_batch(stage, epoch, indices, per-sample values)`` sees every training micro-batch.
    """
    if task is None:
        task = EmbeddingTask(loss_fn)
    elif loss_fn is not None:
        raise ValueError("give loss_fn to the task, not beside it")
    stage_list = _check_stages(stages, len(train_set))
    per_stage = config.stage_epochs if stages is not None else config.epochs
    loop = _Loop(model, train_set, config, stage_list, per_stage, task, on_log, cache_dir)
    val_set = loop.prepare(val_set)
    fingerprint = run_fingerprint(config, loop.unwrapped, train_set, stage_list, task)

    history: list[dict] = []
    start = 0
    latest = latest_checkpoint(checkpoint_dir) if resume else None
    resumed_progress: dict = {}
    if latest is not None:
        progress = read_state(latest).get("progress", {})  # is it this run's?
        if progress.get("fingerprint") == fingerprint:
            resumed_progress = progress
            load_checkpoint(
                latest, loop.unwrapped, loop.optimizer, loop.scheduler, restore_rng=True, **task.load_kwargs
            )
            start = int(progress["completed"])
            loop.step = int(progress["step"])
            history = list(progress.get("history", []))
            loop.embedding_dim = progress.get("embedding_dim")
        else:
            latest = None
    if latest is None and list_checkpoints(checkpoint_dir):
        loop.dist.barrier()
        if loop.dist.is_main:
            remove_checkpoints(checkpoint_dir)  # another run's (or resume=False): start clean
        loop.dist.barrier()
    checkpoint_path = str(latest) if latest is not None else None

    trained: list[dict] = []  # the epochs trained in this call (a resumed run's restored ones excluded)
    best = None
    if config.keep_best and val_set is not None and len(val_set):
        best = _BestWeights(checkpoint_dir, fingerprint, history, loop.dist.is_main, task.score)
    for position, (stage, epoch) in enumerate(loop.plan):
        if position < start:
            continue
        batch_hook = None
        if on_batch is not None:
            batch_hook = lambda index, values, stage=stage, epoch=epoch: on_batch(stage, epoch, index, values)  # noqa: E731
        stats = loop.train_epoch(stage, epoch, on_batch=batch_hook)
        val_value = loop.evaluate(val_set)
        record = {
            "stage": stage,
            "epoch": epoch,
            "stage_size": int(len(stage_list[stage])),
            **{key: stats[key] for key in task.stat_keys},
            task.val_key: val_value,
            "images_per_s": stats["images_per_s"],
            "data_wait_fraction": stats["data_wait_fraction"],
            "gpu_mem_mb": stats["gpu_mem_mb"],
            "seconds": stats["seconds"],
            "lr": loop.scheduler.get_last_lr()[0],
            "step": loop.step,
        }
        if best is not None:
            best.offer(position, task.score(record), loop.unwrapped)
        history.append(record)
        trained.append(stats)
        progress = {
            "completed": position + 1,
            "stage": stage,
            "epoch": epoch,
            "step": loop.step,
            "fingerprint": fingerprint,
            "history": history,
            "embedding_dim": loop.embedding_dim,
        }
        checkpoint_path = loop.save(checkpoint_dir, progress, position + 1) or checkpoint_path
        if loop.on_log:
            loop.on_log({"event": "epoch", **record})

    selected = len(history) - 1
    if start == len(loop.plan) and "selected_epoch" in resumed_progress:
        selected = int(resumed_progress["selected_epoch"])  # a finished run, selection already applied
    elif best is not None and best.position is not None and best.position != len(history) - 1:
        loop.dist.barrier()
        if best.load_into(loop.unwrapped):
            # Early stopping: the best epoch's weights become the model and the latest checkpoint, so every
            # reader (model_predictions, predict, a resume) gets the selected model.
            selected = best.position
            progress = {
                "completed": len(loop.plan),
                "step": loop.step,
                "fingerprint": fingerprint,
                "history": history,
                "embedding_dim": loop.embedding_dim,
                "selected_epoch": selected,
            }
            checkpoint_path = loop.save(checkpoint_dir, progress, len(loop.plan) + 1) or checkpoint_path
    if best is not None and loop.dist.is_main:
        best.discard()  # the final checkpoint holds the selected weights now
    speed = throughput_summary(trained or history, loop.device)
    extra = {
        "world_size": loop.dist.world_size,
        "total_steps": loop.total_steps,
        "fingerprint": fingerprint,
        "selected_epoch": selected,
    }
    key = task.val_key
    vals = [h[key] for h in history if not math.isnan(h[key])]
    best_val = (max(vals) if task.higher_is_better else min(vals)) if vals else float("nan")
    final_val = history[selected][key] if history else float("nan")
    if key != "val_cosine":  # TrainResult's fields are named for the cosine; other metrics go to extra
        extra.update({f"best_{key}": best_val, f"final_{key}": final_val})
        best_val = final_val = float("nan")
    if loop.dist.enabled:
        extra["replica_max_abs_diff"] = replica_max_abs_diff(loop.unwrapped)
    return TrainResult(
        history=history,
        best_val_cosine=best_val,
        final_val_cosine=final_val,
        checkpoint_path=checkpoint_path,
        images_per_s=speed["images_per_s"],
        resumed_epochs=start,
        extra=extra,
        data_wait_fraction=speed["data_wait_fraction"],
        peak_gpu_memory_mb=speed["peak_gpu_memory_mb"],
        device=device_name(loop.device),
        feature_cache=loop.cache_summary(),
    )


class _BestWeights:
    """Early stopping that survives a kill: the best-val epoch's weights live in best-weights.safetensors
    beside the checkpoints (written before that epoch's checkpoint), tagged with the run's fingerprint and
    the epoch, so a resumed run selects exactly what an uninterrupted one would."""

    FILE = "best-weights.safetensors"

    def __init__(
        self,
        checkpoint_dir,
        fingerprint: str,
        restored_history: list[dict],
        is_main: bool,
        score: Callable[[dict], float] = lambda record: float(record.get("val_cosine", float("nan"))),
    ):
        self.path = as_path(checkpoint_dir) / self.FILE
        self.fingerprint, self.is_main = fingerprint, is_main
        self.position, self.value = None, -math.inf
        for i, record in enumerate(restored_history):
            value = score(record)
            if not math.isnan(value) and value > self.value:
                self.position, self.value = i, value

    def offer(self, position: int, value: float, model: torch.nn.Module) -> None:
        if math.isnan(value) or value <= self.value:
            return
        self.position, self.value = position, value
        if self.is_main:
            from safetensors.torch import save_file

            from pipeline.training.checkpoint import _plain_state_dict  # tied weights cloned, as safetensors needs

            state = _plain_state_dict(model)
            meta = {"fingerprint": self.fingerprint, "position": str(position)}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_local_path(self.path, suffix=".safetensors") as tmp:
                save_file(state, str(tmp), metadata=meta)

    def discard(self) -> None:
        if self.path.exists():
            self.path.unlink()

    def load_into(self, model: torch.nn.Module) -> bool:
        """Load the selected epoch's weights; False (weights left as they are) if the file is not this run's."""
        from pipeline.training.checkpoint import _read_safetensors  # local paths and fsspec URLs alike

        if not self.path.exists():
            return False
        state, meta = _read_safetensors(self.path)
        if meta.get("fingerprint") != self.fingerprint or meta.get("position") != str(self.position):
            return False
        model.load_state_dict(state)
        return True


def replica_max_abs_diff(model: torch.nn.Module) -> float:
    """Largest |weight - rank 0's weight| over all parameters and ranks (0.0 when the replicas agree)."""
    worst = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        reference = p.detach().clone()
        dist.broadcast(reference, src=0)
        worst = torch.maximum(worst, (p.detach() - reference).abs().max().double())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def preliminary_cosines(
    model: torch.nn.Module,
    train_set,
    config: TrainConfig,
    epochs: int,
    loss_fn: LossFn | None = None,
    metrics: dict | None = None,
    cache_dir=None,
    task: TrainTask | None = None,
) -> np.ndarray:
    """Train ``epochs`` preliminary epochs over the whole set; return every sample's cosine per epoch [epochs, n].

    The cosine is the one of the training forward pass of that epoch (the model as it is when the sample's
    batch comes up, in train mode), recorded by the dataset index each item carries; this costs no extra
    pass.  No checkpoints.  Under DDP the ranks' records are summed, so every rank returns the full matrix.
    ``metrics``, when given, is filled with the run's images_per_s, data_wait_fraction, peak_gpu_memory_mb
    (None on CPU), device, feature_cache (as in TrainResult) and per-epoch "epochs" records.
    ``cache_dir``: the frozen prefix's feature cache, as in train_model.  ``task`` as in train_model: the
    matrix then holds the task's per-sample training value (e.g. the captioner's LM loss) instead.
    """
    if task is None:
        task = EmbeddingTask(loss_fn)
    elif loss_fn is not None:
        raise ValueError("give loss_fn to the task, not beside it")
    n = len(train_set)
    loop = _Loop(model, train_set, config, [np.arange(n)], epochs, task, None, cache_dir)
    out = np.full((epochs, n), np.nan, dtype=np.float64)
    epoch_stats: list[dict] = []
    for position, (stage, epoch) in enumerate(loop.plan):
        sums = torch.zeros(n, dtype=torch.float64, device=loop.device)
        counts = torch.zeros(n, dtype=torch.float64, device=loop.device)

        def record(index, cosine, sums=sums, counts=counts):
            idx = torch.as_tensor(index, dtype=torch.long, device=loop.device)
            sums.index_add_(0, idx, cosine.double())  # padded duplicates average out
            counts.index_add_(0, idx, torch.ones_like(cosine, dtype=torch.float64))

        epoch_stats.append(loop.train_epoch(stage, epoch, on_batch=record))
        if loop.dist.enabled:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        c = counts.cpu().numpy()
        out[position] = np.where(c > 0, sums.cpu().numpy() / np.maximum(c, 1), np.nan)
    if metrics is not None:
        metrics.update(
            throughput_summary(epoch_stats, loop.device),
            device=device_name(loop.device),
            feature_cache=loop.cache_summary(),
            epochs=[{k: v for k, v in e.items() if k not in task.stat_keys} for e in epoch_stats],
        )
    return out


def predict_embeddings(
    model: torch.nn.Module,
    dataset,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    num_workers: int = 0,
    precision: str = "auto",
    cache_dir=None,
    metrics: dict | None = None,
) -> np.ndarray:
    """Predicted embeddings (n, D) float32 in dataset order; eval mode, no autograd.

    ``cache_dir``: the frozen prefix's feature cache, as in train_model (the splits trained on are cached
    already, under the same key: same frozen weights, images and precision).  ``metrics``, when given, gets
    "feature_cache" (None without a cache)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    amp = autocast_dtype(precision, dev)
    unwrapped = _unwrap(model).to(dev)
    cache = feature_cache_for(
        unwrapped, cache_dir, device=dev, amp_dtype=amp, batch_size=batch_size, num_workers=num_workers
    )
    if cache is not None:
        dataset = cache.wrap(dataset)
    cached = _is_cached(dataset)

    def embed(model, pixels, context):
        return _forward(model, model, pixels, context, amp, dev, cached)[0]

    out = _collect(model, dataset, batch_size, dev, num_workers, embed, getattr(model, "embedding_dim", 384))
    if metrics is not None:
        metrics["feature_cache"] = cache.summary() if cache is not None else None
    return out


def backbone_features(
    model: torch.nn.Module, dataset, batch_size: int = 64, device: str | torch.device = "auto", num_workers: int = 0
) -> np.ndarray:
    """The backbone's pooled image features (n, feature_dim) float32, before any head.

    For the frozen CLIP tower these are the paper's k-NN baseline features (CLIP image embeddings).
    """
    dev = resolve_device(device) if isinstance(device, str) else device

    def features(model, pixels, context):
        return model.backbone(pixels, context if getattr(model, "uses_context", False) else None)

    return _collect(model, dataset, batch_size, dev, num_workers, features, int(_unwrap(model).backbone.feature_dim))


def _collect(model, dataset, batch_size: int, dev: torch.device, num_workers: int, output, width: int) -> np.ndarray:
    """``output(model, pixels, context)`` over the dataset in order, eval mode, no autograd: (n, width) float32."""
    model = _unwrap(model).to(dev).eval()
    loader = _loader(dataset, batch_size, num_workers=num_workers, pin_memory=dev.type == "cuda")
    chunks = []
    with torch.inference_mode():
        for batch in loader:
            pixels, _, _, _, context = _unpack(batch, dev, dev.type == "cuda")
            chunks.append(output(model, pixels, context).float().cpu().numpy())
    if not chunks:
        return np.zeros((0, width), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)
