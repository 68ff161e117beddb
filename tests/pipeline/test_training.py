"""Trainer, dataset and checkpoint tests on a tiny stand-in model with 32 px images (CPU, seconds).

The stand-in follows the model interface of pipeline.models (forward(pixels, context) -> (unit embedding,
vocab logits or None), image_size / mean / std / uses_context / config_dict; the optimizer takes the
parameters that require grad); one test runs the real tiny ViT when pipeline.models is present.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.models import create_model
from pipeline.models.loss import ReverseSDLoss
from pipeline.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_model_weights,
    read_state,
    save_checkpoint,
)
from pipeline.training.datasets import PairDataset
from pipeline.training.loop import (
    TrainConfig,
    TrainResult,
    predict_embeddings,
    preliminary_cosines,
    seed_everything,
    train_model,
)
from pipeline.training.resume import load_checkpoint

SIZE = 32
K = 6


# -- stand-ins -------------------------------------------------------------------------------------------
class TinyModel(nn.Module):
    """Conv stem -> 384-d embedding head (unit norm) -> vocabulary head on the embedding (the paper's default)."""

    def __init__(self, vocab_size: int = K, embedding_dim: int = 384, dropout: float = 0.1, image_size: int = SIZE):
        super().__init__()
        self.vocab_size, self.embedding_dim, self.dropout_p, self.image_size = (
            vocab_size,
            embedding_dim,
            dropout,
            image_size,
        )
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.uses_context = False
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.GELU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(32, embedding_dim)
        self.vocab = nn.Linear(embedding_dim, vocab_size) if vocab_size else None

    def forward(self, pixel_values, context=None):
        raw = self.head(self.drop(self.stem(pixel_values)))
        return F.normalize(raw, dim=-1), (self.vocab(raw) if self.vocab is not None else None)

    def config_dict(self) -> dict:
        return {"vocab_size": self.vocab_size, "embedding_dim": self.embedding_dim, "dropout": self.dropout_p}


def make_loss(lambda_vocab: float = 0.1) -> ReverseSDLoss:
    """The product's joint loss (1 - cosine + lambda * BCE), never a stand-in: a missing one fails here."""
    return ReverseSDLoss(lambda_vocab)


def make_tiny_model(seed: int = 0, **kwargs) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel(**kwargs)


def toy_data(n: int, seed: int = 0, dim: int = 384):
    """Images whose colour (and a bright square's position) determine the target: a learnable mapping."""
    rng = np.random.default_rng(seed)
    projection = np.random.default_rng(1234).normal(size=(6, dim))
    images, features, labels = [], [], []
    for _ in range(n):
        colour = rng.integers(0, 256, size=3)
        corner = rng.integers(0, 2, size=2)
        array = np.tile(colour.astype(np.uint8), (SIZE * 2, SIZE * 2, 1))  # 64 px: the dataset resizes to 32
        y, x = corner * SIZE
        array[y : y + SIZE, x : x + SIZE] = 255 - colour
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        images.append(buf.getvalue())
        features.append(np.concatenate([colour / 255.0 - 0.5, corner - 0.5, [0.3]]))
        labels.append(np.flatnonzero(np.concatenate([colour > 127, corner > 0]))[:K])
    targets = np.asarray(features) @ projection
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    return images, targets.astype(np.float32), labels


def datasets(model, n_train=48, n_val=16):
    images, targets, labels = toy_data(n_train + n_val)
    train = PairDataset.for_model(images[:n_train], targets[:n_train], labels[:n_train], model)
    val = PairDataset.for_model(images[n_train:], targets[n_train:], labels[n_train:], model)
    return train, val


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


TINY_CONFIG = dict(epochs=2, batch_size=8, lr=3e-3, warmup_fraction=0.1, seed=0, device="cpu", log_every=0)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY_CONFIG, **kw})


# -- dataset ---------------------------------------------------------------------------------------------
def test_pair_dataset_decodes_normalises_and_labels():
    images, targets, labels = toy_data(3)
    ds = PairDataset(
        pa.array(images, type=pa.binary()),
        targets,
        labels,
        image_size=SIZE,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        vocab_size=K,
    )
    pixels, target, multi_hot, index = ds[2]
    assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == torch.float32
    raw = np.asarray(Image.open(io.BytesIO(images[2])).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    expected = (torch.from_numpy(raw.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(pixels, expected, atol=1e-5)
    assert torch.equal(target, torch.from_numpy(targets[2]))
    assert multi_hot.shape == (K,) and set(torch.nonzero(multi_hot).flatten().tolist()) == set(labels[2].tolist())
    assert index == 2
    no_labels = PairDataset(images, targets, None, image_size=SIZE)
    assert no_labels[0][2].shape == (0,)


def test_pair_dataset_names_a_bad_row():
    images, targets, _ = toy_data(2)
    ds = PairDataset([images[0], b"not an image"], targets, None, image_size=SIZE)
    with pytest.raises(ValueError, match="row 1"):
        ds[1]


# -- checkpoints -----------------------------------------------------------------------------------------
def test_checkpoint_round_trip_safetensors_and_weights_only_state(tmp_path):
    model = make_tiny_model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
    model(torch.randn(2, 3, SIZE, SIZE))[0].sum().backward()
    optimizer.step()
    scheduler.step()
    torch.manual_seed(7)
    path = save_checkpoint(
        tmp_path,
        model,
        optimizer,
        scheduler,
        progress={"completed": 3, "history": [{"a": 1.0}]},
        config={"lr": 1e-3},
        index=3,
    )
    after_save = torch.rand(4)  # what the RNG gives next, to compare after restoring
    assert path.name == "ckpt-00003.safetensors" and latest_checkpoint(tmp_path) == path
    # the weights file is plain safetensors with the model config in its metadata
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["model_config"]) == model.config_dict()
    # the state file loads with weights_only=True (no pickled objects)
    state = torch.load(str(path).replace(".safetensors", ".state.pt"), weights_only=True)
    assert state["progress"]["completed"] == 3 and state["progress"]["history"] == [{"a": 1.0}]
    assert read_state(tmp_path)["config"] == {"lr": 1e-3}

    fresh = make_tiny_model(99)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 0.5)
    torch.manual_seed(12345)
    load_checkpoint(tmp_path, fresh, fresh_opt, fresh_sched, restore_rng=True)
    assert torch.equal(torch.rand(4), after_save)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    for a, b in zip(optimizer.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert fresh_sched.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"]

    state_dict, config = load_model_weights(path)
    assert config == model.config_dict() and set(state_dict) == set(model.state_dict())


def test_embedding_size_mismatch_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, make_tiny_model(0, embedding_dim=512), index=1)
    with pytest.raises(CheckpointError, match="checkpoint embedding size 512 != expected 384"):
        load_model_weights(tmp_path)
    state, _ = load_model_weights(tmp_path, expected_embedding_dim=512)
    assert state["head.weight"].shape[0] == 512


def test_keeps_only_the_last_checkpoints(tmp_path):
    model = make_tiny_model(0)
    for i in range(1, 5):
        save_checkpoint(tmp_path, model, index=i, keep_last=2)
    kept = ["ckpt-00003.safetensors", "ckpt-00003.state.pt", "ckpt-00004.safetensors", "ckpt-00004.state.pt"]
    # each file with its SHA-256 sidecar, the pruned ones' sidecars gone too
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == sorted(kept + [k + ".sha256" for k in kept])


def test_a_garbled_checkpoint_is_refused_naming_the_file(tmp_path):
    """safetensors has no checksum: tensor bytes flipped in place would load silently without the sidecar."""
    from pipeline.training.checkpoint import CheckpointError

    model = make_tiny_model(0)
    save_checkpoint(tmp_path, model, index=1)
    weights = tmp_path / "ckpt-00001.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x5A  # a tensor byte, not the header: safetensors itself would accept it
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ckpt-00001\.safetensors is damaged \(altered"):
        load_model_weights(weights)


# -- training --------------------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    config = cfg(epochs=3)
    straight_model = make_tiny_model(0)
    train, val = datasets(straight_model)
    straight = train_model(straight_model, train, val, config, tmp_path / "a", loss_fn=make_loss())

    def stop_after_first_epoch(record):
        if record.get("event") == "epoch" and record["epoch"] == 0:
            raise Interrupt

    first = make_tiny_model(0)
    with pytest.raises(Interrupt):
        train_model(first, train, val, config, tmp_path / "b", on_log=stop_after_first_epoch, loss_fn=make_loss())
    torch.manual_seed(555)
    np.random.seed(555)  # a fresh process would have other RNG states: resume must not depend on them
    resumed_model = make_tiny_model(42)  # other init: the checkpoint must overwrite it
    resumed = train_model(resumed_model, train, val, config, tmp_path / "b", loss_fn=make_loss())

    assert resumed.resumed_epochs == 1 and len(resumed.history) == 3
    assert [h["val_cosine"] for h in resumed.history] == pytest.approx([h["val_cosine"] for h in straight.history])
    a, b = weights(straight_model), weights(resumed_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished run resumes to itself without training.
    again = train_model(make_tiny_model(3), train, val, config, tmp_path / "b", loss_fn=make_loss())
    assert again.resumed_epochs == 3 and again.checkpoint_path == resumed.checkpoint_path


def test_changed_config_starts_fresh_instead_of_resuming(tmp_path):
    model = make_tiny_model(0)
    train, val = datasets(model, 16, 8)
    train_model(model, train, val, cfg(epochs=1), tmp_path, loss_fn=make_loss())
    result = train_model(make_tiny_model(0), train, val, cfg(epochs=1, lr=1e-3), tmp_path, loss_fn=make_loss())
    assert result.resumed_epochs == 0 and len(result.history) == 1
    assert [p.name for p in sorted(tmp_path.glob("*.safetensors"))] == ["ckpt-00001.safetensors"]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    runs = []
    for i, seed in enumerate([0, 0, 1]):
        model = make_tiny_model(0)
        train, val = datasets(model, 32, 8)
        train_model(model, train, val, cfg(epochs=1, seed=seed), tmp_path / str(i), loss_fn=make_loss())
        runs.append(weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_loader_workers_do_not_change_the_result(tmp_path):
    runs = []
    for workers in (0, 2):
        model = make_tiny_model(0)
        train, val = datasets(model, 24, 8)
        result = train_model(
            model, train, val, cfg(epochs=2, num_workers=workers), tmp_path / str(workers), loss_fn=make_loss()
        )
        runs.append((weights(model), result.final_val_cosine))
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert runs[0][1] == runs[1][1]


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    results = []
    for batch, accum in [(8, 1), (4, 2)]:
        model = make_tiny_model(0, dropout=0.0)
        train, val = datasets(model, 20, 4)  # 20 = 2 full groups of 8 + a group of 4 (uneven tail)
        train_model(
            model,
            train,
            val,
            cfg(epochs=1, batch_size=batch, grad_accum_steps=accum, precision="fp32"),
            tmp_path / str(batch),
            loss_fn=make_loss(),
        )
        results.append(weights(model))
    init = weights(make_tiny_model(0, dropout=0.0))
    assert not torch.equal(results[0]["head.weight"], init["head.weight"])
    for k in results[0]:
        assert torch.allclose(results[0][k], results[1][k], atol=1e-5, rtol=1e-4), k


def test_training_learns_the_toy_problem(tmp_path):
    model = make_tiny_model(0, dropout=0.0)
    train, val = datasets(model, 96, 32)
    before = predict_embeddings(model, val, batch_size=16, device="cpu")
    start = float(np.mean(np.sum(before * val.targets, axis=1)))
    logs = []
    result = train_model(
        model, train, val, cfg(epochs=6, batch_size=16, lr=1e-2), tmp_path, on_log=logs.append, loss_fn=make_loss()
    )
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.final_val_cosine > start + 0.2, (start, result.final_val_cosine)
    mean_baseline = float(np.mean(val.targets @ (m := train.targets.mean(0)) / np.linalg.norm(m)))
    assert result.best_val_cosine > mean_baseline
    epochs = [r for r in logs if r.get("event") == "epoch"]
    assert len(epochs) == 6 and all(r["images_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1 for r in epochs)
    assert set(result.history[0]) >= {
        "stage",
        "epoch",
        "train_loss",
        "train_cosine",
        "val_cosine",
        "images_per_s",
        "data_wait_fraction",
        "gpu_mem_mb",
    }


def test_throughput_metrics_are_recorded_and_old_metrics_still_load(tmp_path):
    model = make_tiny_model(0, dropout=0.0)
    train, val = datasets(model, 24, 8)
    result = train_model(model, train, val, cfg(epochs=2, num_workers=1), tmp_path, loss_fn=make_loss())
    assert result.images_per_s > 0 and 0 <= result.data_wait_fraction <= 1
    assert result.peak_gpu_memory_mb is None and result.device == "cpu"  # no GPU: no peak memory figure
    assert all(r["seconds"] > 0 for r in result.history)
    # metrics.json round trip (the DDP launcher's), and one written before these fields existed.
    data = json.loads(json.dumps(result.to_dict(), default=float))
    assert TrainResult(**data).data_wait_fraction == result.data_wait_fraction
    old = {k: v for k, v in data.items() if k not in ("data_wait_fraction", "peak_gpu_memory_mb", "device")}
    assert TrainResult(**old).peak_gpu_memory_mb is None
    metrics: dict = {}
    history = preliminary_cosines(model, train, cfg(batch_size=8), epochs=2, loss_fn=make_loss(), metrics=metrics)
    assert history.shape == (2, 24)
    assert metrics["images_per_s"] > 0 and 0 <= metrics["data_wait_fraction"] <= 1
    assert metrics["peak_gpu_memory_mb"] is None and metrics["device"] == "cpu" and len(metrics["epochs"]) == 2


def test_predict_embeddings_is_in_dataset_order_and_unit_length():
    model = make_tiny_model(0)
    train, _ = datasets(model, 10, 0)
    out = predict_embeddings(model, train, batch_size=4, device="cpu")
    assert out.shape == (10, 384) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    model.eval()
    with torch.no_grad():
        one = model(train[7][0][None])[0][0].numpy()
    assert np.allclose(out[7], one, atol=1e-5)


def test_preliminary_cosines_are_recorded_per_sample_index():
    # lr = 0: the model does not move, so each epoch's recorded cosine must equal an eval pass's, row by row;
    # a mix-up of indices (shuffled batches) would show.
    model = make_tiny_model(0, dropout=0.0)
    train, _ = datasets(model, 21, 0)
    history = preliminary_cosines(model, train, cfg(lr=0.0, batch_size=4), epochs=2, loss_fn=make_loss())
    assert history.shape == (2, 21) and np.isfinite(history).all()
    expected = np.sum(predict_embeddings(model, train, 8, "cpu") * train.targets, axis=1)
    assert np.allclose(history, expected[None], atol=1e-5)


def test_real_tiny_vit_trains_and_round_trips(tmp_path):

    seed_everything(0)
    model = create_model("vit", variant="tiny", vocab_size=K)
    images, targets, labels = toy_data(12)
    train = PairDataset.for_model(images[:8], targets[:8], labels[:8], model)
    val = PairDataset.for_model(images[8:], targets[8:], labels[8:], model)
    result = train_model(model, train, val, cfg(epochs=1, batch_size=4), tmp_path)
    state, config = load_model_weights(result.checkpoint_path)
    rebuilt = create_model(**config)
    rebuilt.load_state_dict(state)
    assert np.allclose(predict_embeddings(rebuilt, val, 4, "cpu"), predict_embeddings(model, val, 4, "cpu"), atol=1e-5)
