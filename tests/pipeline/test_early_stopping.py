"""Early stopping (keep_best) and heads initialised from the training targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_training import Interrupt, cfg, make_loss, make_tiny_model, toy_data

from pipeline.training.checkpoint import latest_checkpoint, list_checkpoints, load_model_weights
from pipeline.training.datasets import PairDataset
from pipeline.training.loop import init_heads_from_targets, predict_embeddings, train_model


def _diverging_sets(model, n_train=40, n_val=12):
    """A val set whose targets are the negated training mapping: the better the model fits train, the
    worse val gets, so the first epoch is the best one on val."""
    images, targets, labels = toy_data(n_train + n_val)
    train = PairDataset.for_model(images[:n_train], targets[:n_train], labels[:n_train], model)
    val = PairDataset.for_model(images[n_train:], -targets[n_train:], labels[n_train:], model)
    return train, val


def test_keep_best_leaves_the_best_val_epoch_as_the_latest_checkpoint(tmp_path):
    plain_model = make_tiny_model(0)
    train, val = _diverging_sets(plain_model)
    plain = train_model(
        plain_model,
        train,
        val,
        cfg(epochs=3, keep_best=False, keep_checkpoints=None),
        tmp_path / "plain",
        loss_fn=make_loss(),
    )
    vals = [h["val_cosine"] for h in plain.history]
    best_epoch = int(np.argmax(vals))
    assert best_epoch < 2, vals  # the set-up must make a late epoch worse, or this test proves nothing

    model = make_tiny_model(0)
    result = train_model(model, train, val, cfg(epochs=3), tmp_path / "best", loss_fn=make_loss())
    assert result.extra["selected_epoch"] == best_epoch
    assert result.final_val_cosine == pytest.approx(max(vals))
    assert [h["val_cosine"] for h in result.history] == pytest.approx(vals)  # same trajectory
    selected, _ = load_model_weights(latest_checkpoint(tmp_path / "best"))
    expected, _ = load_model_weights(dict(list_checkpoints(tmp_path / "plain"))[best_epoch + 1])
    assert all(torch.equal(selected[k], expected[k]) for k in expected)
    cosine = (predict_embeddings(model, val, 8, "cpu") * val.targets).sum(axis=1).mean()
    assert cosine == pytest.approx(max(vals), abs=1e-5)  # the model in memory is the selected one too


def test_keep_best_after_a_kill_selects_what_an_uninterrupted_run_selects(tmp_path):
    straight_model = make_tiny_model(0)
    train, val = _diverging_sets(straight_model)
    straight = train_model(straight_model, train, val, cfg(epochs=3), tmp_path / "a", loss_fn=make_loss())

    def stop_after_second_epoch(record):
        if record.get("event") == "epoch" and record["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_model(
            make_tiny_model(0),
            train,
            val,
            cfg(epochs=3),
            tmp_path / "b",
            on_log=stop_after_second_epoch,
            loss_fn=make_loss(),
        )
    resumed_model = make_tiny_model(7)
    resumed = train_model(resumed_model, train, val, cfg(epochs=3), tmp_path / "b", loss_fn=make_loss())
    assert resumed.resumed_epochs == 2
    assert resumed.extra["selected_epoch"] == straight.extra["selected_epoch"]
    a, b = straight_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_heads_start_at_the_mean_target_and_word_frequencies():
    from pipeline.models import create_model

    torch.manual_seed(0)
    model = create_model("vit", variant="tiny", vocab_size=6)
    images, targets, labels = toy_data(20)
    dataset = PairDataset.for_model(images, targets, labels, model)
    init_heads_from_targets(model, dataset)
    model.eval()
    pixels = torch.stack([dataset[i][0] for i in range(4)])
    embedding, _ = model(pixels)
    mean = targets.mean(axis=0)
    expected = torch.from_numpy(mean / np.linalg.norm(mean))
    assert torch.allclose(embedding, expected.expand_as(embedding), atol=1e-6)  # every image: the mean
    frequency = np.bincount(np.concatenate(labels), minlength=6) / len(labels)
    p = np.clip(frequency, 1e-4, 1 - 1e-4)
    bias = model.heads.vocabulary.linear.bias.detach().numpy()
    assert np.allclose(bias, np.log(p / (1 - p)), atol=1e-5)  # each word's log-odds before any update


def test_keep_best_under_an_object_store_checkpoint_dir():
    """The best-weights file round-trips through fsspec like the checkpoints (memory:// here)."""
    import uuid

    model = make_tiny_model(0)
    train, val = _diverging_sets(model)
    root = f"memory://early-stopping-{uuid.uuid4().hex}/vit/mlc"
    result = train_model(model, train, val, cfg(epochs=3), root, loss_fn=make_loss())
    vals = [h["val_cosine"] for h in result.history]
    assert result.extra["selected_epoch"] == int(np.argmax(vals)) < 2
    selected, _ = load_model_weights(latest_checkpoint(root))
    assert all(torch.equal(selected[k], v) for k, v in model.state_dict().items())
