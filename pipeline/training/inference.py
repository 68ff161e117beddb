"""The model over a whole dataset in order, outside train_model's bookkeeping: every sample's training
cosine over preliminary epochs (the curriculum's difficulty), predicted embeddings, backbone features."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pipeline.constants import EMBED_DIM
from pipeline.training.config import TrainConfig, throughput_summary
from pipeline.training.device import _unwrap, autocast_dtype, device_name, resolve_device
from pipeline.training.epochs import _Loop
from pipeline.training.feature_cache import feature_cache_for
from pipeline.training.tasks import EmbeddingTask, LossFn, TrainTask, _forward, _is_cached, _loader, _unpack


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

    out = _collect(model, dataset, batch_size, dev, num_workers, embed, getattr(model, "embedding_dim", EMBED_DIM))
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
