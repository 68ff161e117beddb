"""Resume takes the newest usable checkpoint: a damaged or foreign latest one is passed over (and deleted),
with a warning naming it and what was used instead; none usable means training from scratch."""

from __future__ import annotations

import logging
import shutil

import pytest
from test_training import Interrupt, TinyModel, cfg, datasets, make_loss, make_tiny_model

from pipeline.storage import sidecar_path
from pipeline.training.checkpoint import list_checkpoints, save_checkpoint
from pipeline.training.loop import train_model


class Backbone(TinyModel):
    """The stand-in with a backbone name in its config, as pipeline.models' models have."""

    def __init__(self, backbone: str = "vit", **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def config_dict(self) -> dict:
        return {**super().config_dict(), "backbone": self.backbone}


def _interrupted_run(directory, epochs: int, stop_after: int, model=None, recipe=None):
    """Train ``epochs`` epochs but stop after epoch ``stop_after`` (checkpoints 1..stop_after+1 written)."""
    model = model or make_tiny_model(0)
    train, val = datasets(model, 16, 8)

    def stop(record):
        if record.get("event") == "epoch" and record["epoch"] == stop_after:
            raise Interrupt

    extra = {"recipe": recipe} if recipe else {}
    with pytest.raises(Interrupt):
        train_model(
            model,
            train,
            val,
            cfg(epochs=epochs, keep_checkpoints=None),
            directory,
            on_log=stop,
            loss_fn=make_loss(),
            **extra,
        )
    return train, val


def _flip_a_byte(path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _names(directory) -> list[str]:
    return [p.name for _, p in list_checkpoints(directory)]


def test_a_damaged_latest_checkpoint_resumes_from_the_newest_intact_one(tmp_path, caplog):
    train, val = _interrupted_run(tmp_path, epochs=4, stop_after=1)  # ckpt-00001, ckpt-00002
    assert _names(tmp_path) == ["ckpt-00001.safetensors", "ckpt-00002.safetensors"]
    _flip_a_byte(tmp_path / "ckpt-00002.safetensors")  # size kept: only the SHA-256 sees it
    with caplog.at_level(logging.INFO, logger="pipeline.training.loop"):
        result = train_model(
            make_tiny_model(7), train, val, cfg(epochs=4, keep_checkpoints=None), tmp_path, loss_fn=make_loss()
        )
    assert result.resumed_epochs == 1 and len(result.history) == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "ckpt-00002.safetensors" in warnings[0] and "damaged" in warnings[0]
    assert "resuming from ckpt-00001.safetensors" in warnings[0]
    # the damaged checkpoint was rebuilt: every checkpoint is intact now, and the next run resumes to the end
    assert _names(tmp_path)[-1] == "ckpt-00004.safetensors"
    again = train_model(make_tiny_model(3), train, val, cfg(epochs=4), tmp_path, loss_fn=make_loss())
    assert again.resumed_epochs == 4


def test_a_damaged_trainer_state_without_a_sidecar_counts_as_damaged(tmp_path, caplog):
    train, val = _interrupted_run(tmp_path, epochs=3, stop_after=1)
    state = tmp_path / "ckpt-00002.state.pt"
    state.write_bytes(state.read_bytes()[:50])  # truncated, and no record to compare it with
    sidecar_path(state).unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline.training.loop"):
        result = train_model(make_tiny_model(7), train, val, cfg(epochs=3), tmp_path, loss_fn=make_loss())
    assert result.resumed_epochs == 1
    assert any("ckpt-00002.safetensors" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)


def test_no_intact_checkpoint_trains_from_scratch_and_says_so(tmp_path, caplog):
    train, val = _interrupted_run(tmp_path, epochs=3, stop_after=0)  # ckpt-00001 only
    _flip_a_byte(tmp_path / "ckpt-00001.safetensors")
    with caplog.at_level(logging.WARNING, logger="pipeline.training.loop"):
        result = train_model(make_tiny_model(0), train, val, cfg(epochs=3), tmp_path, loss_fn=make_loss())
    assert result.resumed_epochs == 0 and len(result.history) == 3
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ckpt-00001.safetensors" in m and "training from scratch instead" in m for m in messages), messages


def _copy_in(weights, directory) -> None:
    for path in (weights, weights.with_name(weights.name.replace(".safetensors", ".state.pt"))):
        shutil.copy(path, directory / path.name)
        shutil.copy(sidecar_path(path), directory / sidecar_path(path).name)


def test_a_checkpoint_of_another_backbone_is_passed_over_by_name(tmp_path, caplog):
    """A swin checkpoint copied in as the newest one: once it wiped the folder (or failed on shapes); now the
    run resumes from its own newest checkpoint and names the foreign one."""
    train, val = _interrupted_run(tmp_path / "vit", epochs=3, stop_after=0, model=Backbone("vit"))
    _copy_in(save_checkpoint(tmp_path / "swin", Backbone("swin"), index=2, rng=False), tmp_path / "vit")
    with caplog.at_level(logging.WARNING, logger="pipeline.training.loop"):
        result = train_model(Backbone("vit"), train, val, cfg(epochs=3), tmp_path / "vit", loss_fn=make_loss())
    assert result.resumed_epochs == 1  # from its own ckpt-00001, not wiped
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "ckpt-00002.safetensors was trained for backbone swin; this is vit" in m
        and "resuming from ckpt-00001.safetensors" in m
        for m in messages
    ), messages


def test_a_checkpoint_of_another_recipe_is_passed_over_and_logged_on_the_given_logger(tmp_path, caplog):
    """The recipe is recorded when the trainer is told it (assets/training.py does), and the warning goes to
    the logger given (the asset passes Dagster's context.log)."""
    directory = tmp_path / "vit" / "baseline"
    train, val = _interrupted_run(directory, epochs=3, stop_after=0, model=Backbone("vit"), recipe="baseline")
    other = tmp_path / "other"
    save_checkpoint(other, Backbone("vit"), index=2, identity={"recipe": "mlc"}, rng=False)
    _copy_in(other / "ckpt-00002.safetensors", directory)
    logger = logging.getLogger("a-run-log")
    with caplog.at_level(logging.WARNING, logger="a-run-log"):
        result = train_model(
            Backbone("vit"), train, val, cfg(epochs=3), directory, loss_fn=make_loss(), recipe="baseline", log=logger
        )
    assert result.resumed_epochs == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "a-run-log"]
    assert any("trained for backbone vit, recipe mlc; this is vit/baseline" in m for m in messages), messages
