"""The model over a whole dataset in order, outside train_model's bookkeeping: every sample's training
cosine over preliminary epochs (the curriculum's difficulty), predicted embeddings, backbone features."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from pipeline.constants import EMBED_DIM
from pipeline.training.config import TrainConfig, throughput_summary
from pipeline.training.data import TrainingData, is_cached, loader_for
from pipeline.training.device import _unwrap, autocast_dtype, device_name, resolve_device
from pipeline.training.epochs import _Loop
from pipeline.training.tasks import EmbeddingTask, LossFn, TrainTask, _forward, _unpack


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
    ``train_set``: the run's data path (pipeline.training.data.data_path; its "train" split), or the training
    dataset with ``cache_dir`` beside it, as in train_model.  ``task`` as in train_model: the matrix then
    holds the task's per-sample training value (e.g. the captioner's LM loss) instead.
    """
    if task is None:
        task = EmbeddingTask(loss_fn)
    elif loss_fn is not None:
        raise ValueError("give loss_fn to the task, not beside it")
    data = TrainingData.of(train_set, cache_dir=cache_dir)
    n = len(data["train"])
    loop = _Loop(model, data, config, [np.arange(n)], epochs, task, None)
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
            feature_cache=data.summary(),
            epochs=[{k: v for k, v in e.items() if k not in task.stat_keys} for e in epoch_stats],
        )
    return out


def predict_embeddings(
    model: torch.nn.Module,
    dataset,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    num_workers: int | None = None,
    precision: str = "auto",
    cache_dir=None,
    metrics: dict | None = None,
    split: str | None = None,
) -> np.ndarray:
    """Predicted embeddings (n, D) float32 in dataset order; eval mode, no autograd.

    ``dataset``: a run's data path (pipeline.training.data.data_path) with ``split`` naming the split to
    predict, or a dataset with ``cache_dir`` beside it.  The frozen prefix's feature cache is the one of
    train_model (the splits trained on are cached already, under the same key: same frozen weights, images
    and precision), opened once for every split of one data path.  ``num_workers``: the data path's when
    None (else 0).  ``metrics``, when given, gets "feature_cache" for this split (None without a cache)."""
    data, split = _data_and_split(dataset, split, cache_dir)
    workers = data.workers(0) if num_workers is None else int(num_workers)
    dev = resolve_device(device) if isinstance(device, str) else device
    amp = autocast_dtype(precision, dev)
    unwrapped = _unwrap(model).to(dev)
    data.open(unwrapped, device=dev, amp_dtype=amp, batch_size=batch_size, num_workers=workers)
    read = data.dataset(split)
    cached = is_cached(read)

    def embed(model, pixels, context):
        return _forward(model, model, pixels, context, amp, dev, cached)[0]

    width = getattr(model, "embedding_dim", EMBED_DIM)
    out = _collect(model, read, batch_size, dev, workers, embed, width)
    if metrics is not None:
        metrics["feature_cache"] = data.summary(split)
    return out


def _data_and_split(dataset, split: str | None, cache_dir) -> tuple[TrainingData, str]:
    if isinstance(dataset, TrainingData):
        if split is None or cache_dir is not None:
            raise ValueError("with a data path, name the split to predict and give no cache_dir")
        return dataset, split
    if split is not None:
        raise ValueError("split names a split of a data path; a dataset is predicted whole")
    return TrainingData({"data": dataset}, cache_dir), "data"


def backbone_features(
    model: torch.nn.Module,
    dataset,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    num_workers: int | None = None,
    split: str | None = None,
) -> np.ndarray:
    """The backbone's pooled image features (n, feature_dim) float32, before any head, from the pixels.

    For the frozen CLIP tower these are the paper's k-NN baseline features (CLIP image embeddings).
    ``dataset`` and ``split`` as in predict_embeddings (no feature cache: these are the prefix's own output).
    """
    data, split = _data_and_split(dataset, split, None)
    workers = data.workers(0) if num_workers is None else int(num_workers)
    dev = resolve_device(device) if isinstance(device, str) else device

    def features(model, pixels, context):
        return model.backbone(pixels, context if getattr(model, "uses_context", False) else None)

    width = int(_unwrap(model).backbone.feature_dim)
    return _collect(model, data[split], batch_size, dev, workers, features, width)


def _collect(model, dataset, batch_size: int, dev: torch.device, num_workers: int, output, width: int) -> np.ndarray:
    """``output(model, pixels, context)`` over ``dataset`` (a split as the model reads it) in order, eval mode,
    no autograd: (n, width) float32."""
    model = _unwrap(model).to(dev).eval()
    loader = loader_for(dataset, batch_size, num_workers=num_workers, pin_memory=dev.type == "cuda")
    chunks = []
    with torch.inference_mode():
        for batch in loader:
            pixels, _, _, _, context = _unpack(batch, dev, dev.type == "cuda")
            chunks.append(output(model, pixels, context).float().cpu().numpy())
    if not chunks:
        return np.zeros((0, width), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)
