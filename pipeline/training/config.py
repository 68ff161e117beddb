"""What goes into a training run (TrainConfig) and what comes out (TrainResult and the figures a person
reads beside it): plain data, shared by the loop, the captioner's fine-tuning and the assets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


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
    GPU) and the feature cache (kind, used, built, build seconds).  Plain numbers, strings and booleans."""
    out = {
        "images_per_s": round(float(metrics.get("images_per_s") or 0.0), 2),
        "data_wait_fraction": round(float(metrics.get("data_wait_fraction") or 0.0), 4),
        "device": str(metrics.get("device") or "unknown"),
    }
    if metrics.get("peak_gpu_memory_mb") is not None:
        out["peak_gpu_memory_mb"] = round(float(metrics["peak_gpu_memory_mb"]), 1)
    cache = metrics.get("feature_cache") or {}
    out["feature_cache_kind"] = str(cache.get("kind") or "none")  # features (a frozen prefix's) | pixels | none
    out["feature_cache_used"] = bool(cache.get("used"))
    out["feature_cache_built"] = bool(cache.get("built"))
    out["feature_cache_build_s"] = round(float(cache.get("build_seconds") or 0.0), 2)
    return out


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
