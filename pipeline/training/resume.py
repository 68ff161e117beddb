"""What a checkpoint was trained for, and which checkpoint a resume may use.

Identity: a checkpoint's metadata records what it was trained for, ``backbone`` (also in model_config),
``recipe`` (baseline | mlc | mlc_cl, when the trainer was told) and ``settings_hash`` (``settings_hash`` of
the result-changing training settings).  A checkpoint whose recorded identity differs from what is asked
(``load_model``'s backbone / recipe, or the folder trained_models/<backbone>/<recipe>/ it sits in; a resume's
model, recipe and settings) is refused by name: "checkpoint X was trained for backbone swin, recipe mlc;
this is vit/baseline".  Older checkpoints without recipe / settings_hash still load: what they do not
record is not checked (their backbone still is, from model_config).

Resume (``newest_usable``): the newest checkpoint that is intact and fits is used; damaged or mismatched
newer ones are passed over, each with the reason, so a damaged latest checkpoint is rebuilt instead of
failing every run the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.constants import EMBED_DIM as EMBEDDING_DIM
from pipeline.storage import PathLike, as_path
from pipeline.training.checkpoint import (
    CheckpointError,
    _load_weights,
    _resolve,
    _unwrap,
    check_state_fits,
    list_checkpoints,
    load_model_weights,
    read_state,
    restore_rng_state,
)
from pipeline.training.identity import checkpoint_identity


@dataclass
class Checkpoint:
    """One checkpoint read and verified: its weights file, tensors, model config, metadata and trainer state."""

    path: Any
    weights: dict[str, torch.Tensor]
    model_config: dict
    metadata: dict[str, str]
    state: dict[str, Any]

    @property
    def identity(self) -> dict[str, str | None]:
        return checkpoint_identity(self.metadata, self.model_config)


def read_checkpoint(
    weights_path: PathLike,
    expected_embedding_dim: int | None = EMBEDDING_DIM,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Read and verify one complete checkpoint (weights and trainer state); CheckpointError if damaged."""
    weights, model_cfg, metadata = _load_weights(as_path(weights_path), expected_embedding_dim)
    state = read_state(weights_path, map_location)
    return Checkpoint(as_path(weights_path), weights, model_cfg, metadata, state)


def newest_usable(
    directory: PathLike,
    check: Callable[[Checkpoint], str | None] = lambda checkpoint: None,
    expected_embedding_dim: int | None = EMBEDDING_DIM,
    map_location: str | torch.device = "cpu",
) -> tuple[Checkpoint | None, list[tuple[Any, str]]]:
    """The newest checkpoint of ``directory`` that is intact and that ``check`` accepts (``check`` returns
    None, or why not), and the (weights path, reason) of every newer one passed over, newest first.

    Only the checkpoints down to the first usable one are read, so an intact latest costs one read."""
    passed: list[tuple[Any, str]] = []
    for _, weights_path in reversed(list_checkpoints(directory)):
        try:
            candidate = read_checkpoint(weights_path, expected_embedding_dim, map_location)
        except CheckpointError as exc:
            passed.append((weights_path, str(exc)))
            continue
        reason = check(candidate)
        if reason is None:
            return candidate, passed
        passed.append((weights_path, reason))
    return None, passed


def restore(
    checkpoint: Checkpoint,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a read checkpoint into the given objects; return its trainer state (progress, config, model_config)."""
    state = checkpoint.state
    if model is not None:
        check_state_fits(model, checkpoint.weights, checkpoint.path)
        _unwrap(model).load_state_dict(checkpoint.weights)
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and "rng" in state:
        restore_rng_state(state["rng"])
    state.setdefault("model_config", checkpoint.model_config)
    state["weights_path"] = str(checkpoint.path)
    return state


def load_checkpoint(
    path: PathLike,
    model: torch.nn.Module | None = None,
    *objects: Any,
    map_location: str | torch.device = "cpu",
    expected_embedding_dim: int | None = EMBEDDING_DIM,
    **restore_options: Any,
) -> dict[str, Any]:
    """Load a checkpoint into the given objects (as restore takes them: model, optimizer, scheduler,
    restore_rng); return its state (progress, config, model_config).

    The trainer state is read with ``torch.load(weights_only=True)``.
    """
    weights_path = _resolve(path)
    weights, model_cfg = load_model_weights(weights_path, expected_embedding_dim)
    if model is not None:
        check_state_fits(model, weights, weights_path)
    state = read_state(weights_path, map_location)
    return restore(Checkpoint(weights_path, weights, model_cfg, {}, state), model, *objects, **restore_options)
