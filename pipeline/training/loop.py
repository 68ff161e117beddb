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
- One data path: the splits, their datasets, the feature cache and the loaders are built in one place,
  pipeline/training/data.py (``data_path``), and read by the loop, the preliminary epochs and prediction alike.
- Frozen parts computed once: given a cache directory, a model with a frozen prefix (clip's tower, unet's VAE)
  has it run once per dataset (pipeline/training/feature_cache.py) and every epoch, evaluation and
  prediction runs only the trainable rest on the cached output; same sampler, seeds, stages and fingerprint,
  so the same model (up to the rounding of a kernel chosen by batch size) and interchangeable checkpoints.
- One loop for every model: what is specific to a model (forward, loss, per-epoch figures, the validation
  metric) is a small task object (``TrainTask``); the embedding regressors use ``EmbeddingTask``, the
  captioner pipeline.captioning.training.CaptionTask, and both get DDP, accumulation, best-epoch selection
  and resume from this one loop.

The trainer's parts live beside this module, one concern each: device.py (seeding, device, precision, the
torchrun group), config.py (TrainConfig, TrainResult), data.py (the data path), optim.py (AdamW, the schedule), tasks.py (TrainTask,
EmbeddingTask), epochs.py (the epoch loop), inference.py (preliminary cosines, predictions).  This module
holds train_model with its resume and early stopping, and re-exports the public names, so callers import
from one place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.constants import EMBED_DIM
from pipeline.storage import as_path, atomic_local_path
from pipeline.training.checkpoint import (
    CheckpointError,
    check_state_fits,
    list_checkpoints,
    model_config,
    plural,
    remove_checkpoint,
    remove_checkpoints,
)
from pipeline.training.config import TrainConfig, TrainResult, run_figures, throughput_summary
from pipeline.training.data import TrainingData, data_path
from pipeline.training.device import (
    DistContext,
    autocast_dtype,
    device_name,
    init_distributed,
    is_distributed_env,
    replica_max_abs_diff,
    resolve_device,
    seed_everything,
)
from pipeline.training.epochs import _Loop
from pipeline.training.identity import checkpoint_identity, identity_mismatch, settings_hash
from pipeline.training.inference import backbone_features, predict_embeddings, preliminary_cosines
from pipeline.training.optim import cosine_with_warmup, make_optimizer
from pipeline.training.resume import Checkpoint, newest_usable, restore
from pipeline.training.tasks import (
    EmbeddingTask,
    LossFn,
    StepOutput,
    TrainTask,
    _hash_array,
    default_loss,
    init_heads_from_targets,
)

__all__ = [
    "DistContext",
    "EmbeddingTask",
    "LossFn",
    "StepOutput",
    "TrainConfig",
    "TrainResult",
    "TrainTask",
    "TrainingData",
    "autocast_dtype",
    "backbone_features",
    "cosine_with_warmup",
    "data_path",
    "default_loss",
    "device_name",
    "init_distributed",
    "init_heads_from_targets",
    "is_distributed_env",
    "make_optimizer",
    "predict_embeddings",
    "preliminary_cosines",
    "replica_max_abs_diff",
    "resolve_device",
    "run_figures",
    "run_fingerprint",
    "seed_everything",
    "throughput_summary",
    "train_model",
]

_log = logging.getLogger(__name__)


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


def train_model(
    model: torch.nn.Module,
    train_set,
    val_set=None,
    config: TrainConfig | None = None,
    checkpoint_dir=None,
    stages: list[np.ndarray] | None = None,
    on_log: Callable[[dict], None] | None = None,
    resume: bool = True,
    loss_fn: LossFn | None = None,
    cache_dir=None,
    task: TrainTask | None = None,
    on_batch: Callable[[int, int, Any, torch.Tensor], None] | None = None,
    recipe: str | None = None,
    log: Any | None = None,
) -> TrainResult:
    """Train ``model`` in place; a checkpoint after every epoch; resume from the latest matching checkpoint.

    ``train_set``: the run's data path (pipeline.training.data.data_path: its "train" and "val" splits, its
    feature cache directory and loader settings), or the training dataset, with ``val_set`` and ``cache_dir``
    beside it (they then make the data path the same way).  ``config`` and ``checkpoint_dir`` are required.
    ``stages`` (curriculum index arrays, e.g. from curriculum_stages) are trained in order,
    ``config.stage_epochs`` epochs each; without them ``config.epochs`` epochs over everything.
    ``on_log`` gets every epoch's record (the history entries, plus "event": "epoch") and a progress record
    every ``config.log_every`` optimizer steps; under DDP only rank 0 logs and writes checkpoints.
    ``loss_fn`` defaults to pipeline.models.loss.ReverseSDLoss(config.lambda_vocab).
    A cache directory (the data path's, or ``cache_dir``): when the model has a frozen prefix
    (``model.frozen_prefix()``: CLIP's tower, the unet's VAE), the prefix runs once per dataset into a feature
    cache there (pipeline.training.feature_cache) and training / validation run only the trainable rest on
    the cached output: the same model, without recomputing the frozen part every epoch.  Without one, nothing
    changes.
    ``task`` says what the model is trained to do (default EmbeddingTask(loss_fn)); the history records
    its per-epoch figures and validation metric, and best-epoch selection follows that metric.
    ``on_batch(stage, epoch, indices, per-sample values)`` sees every training micro-batch.
    ``recipe`` (baseline | mlc | mlc_cl) is recorded in the checkpoints with the backbone and the settings
    hash; a checkpoint trained for another backbone, recipe or settings is not resumed from.
    Resume takes the newest intact checkpoint of this run; a damaged or mismatched newer one is passed over
    and deleted, with a warning on ``log`` (a logging.Logger or Dagster's context.log; default this module's
    logger) naming it and what was used instead (an older checkpoint, or training from scratch).
    """
    if task is None:
        task = EmbeddingTask(loss_fn)
    elif loss_fn is not None:
        raise ValueError("give loss_fn to the task, not beside it")
    if config is None or checkpoint_dir is None:
        raise TypeError("train_model needs a config and a checkpoint_dir")
    data = TrainingData.of(train_set, val_set, cache_dir)
    train_set = data["train"]
    stage_list = _check_stages(stages, len(train_set))
    per_stage = config.stage_epochs if stages is not None else config.epochs
    loop = _Loop(model, data, config, stage_list, per_stage, task, on_log)
    val_set = data.dataset("val")
    fingerprint = run_fingerprint(config, loop.unwrapped, train_set, stage_list, task)

    log = log or _log
    identity = {
        "backbone": model_config(loop.unwrapped).get("backbone"),
        "recipe": recipe,
        "settings_hash": settings_hash(config.result_dict()),
    }
    loop.identity = identity

    history: list[dict] = []
    start = 0
    found, resumed_progress = None, {}
    if resume and list_checkpoints(checkpoint_dir):
        found = _resume_from(checkpoint_dir, loop, task, identity, fingerprint, log)
    latest = found.path if found is not None else None
    if found is not None:
        progress = found.state.get("progress", {})
        resumed_progress = progress
        restore(found, loop.unwrapped, loop.optimizer, loop.scheduler, restore_rng=True)
        start = int(progress["completed"])
        loop.step = int(progress["step"])
        history = list(progress.get("history", []))
        loop.embedding_dim = progress.get("embedding_dim")
    elif list_checkpoints(checkpoint_dir):
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
        feature_cache=data.summary(),
    )


def _resume_from(checkpoint_dir, loop, task: TrainTask, identity: dict, fingerprint: str, log) -> Checkpoint | None:
    """The newest checkpoint this run can resume from (intact, trained for this model / recipe / settings, this
    run's fingerprint, fitting the model), or None; the newer ones passed over are logged and deleted."""
    expected_dim = task.load_kwargs.get("expected_embedding_dim", EMBED_DIM)
    other_runs = set()  # intact and this model's, from a run with other settings: expected, no warning

    def check(candidate: Checkpoint) -> str | None:
        mismatch = identity_mismatch(
            candidate.path, checkpoint_identity(candidate.metadata, candidate.model_config), identity
        )
        if mismatch:
            return mismatch
        if candidate.state.get("progress", {}).get("fingerprint") != fingerprint:
            other_runs.add(candidate.path)
            return f"checkpoint {candidate.path} is another run's (other settings, data or curriculum)"
        try:
            check_state_fits(loop.unwrapped, candidate.weights, candidate.path)
        except CheckpointError as exc:
            return str(exc)
        return None

    found, passed = newest_usable(checkpoint_dir, check, expected_dim)
    if loop.dist.is_main:
        instead = (
            f"resuming from {found.path.name} ({plural(int(found.state['progress']['completed']), 'epoch')} done) instead"
            if found is not None
            else "training from scratch instead"
        )
        for path, reason in passed:
            (log.info if path in other_runs else log.warning)(f"not resuming from {path.name}: {reason}; {instead}")
    if found is not None and passed:
        loop.dist.barrier()  # every rank has read its checkpoint before rank 0 deletes the ones passed over
        if loop.dist.is_main:
            for path, _ in passed:
                remove_checkpoint(path)
        loop.dist.barrier()
    return found


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
