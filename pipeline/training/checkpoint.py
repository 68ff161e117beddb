"""Checkpoints: model weights as safetensors, trainer state beside them, both written atomically.

Layout of a checkpoint directory (one per backbone x recipe):

    ckpt-00003.safetensors   model.state_dict(); metadata: model_config (JSON), embedding_dim, train_config, progress
    ckpt-00003.state.pt      optimizer, scheduler, RNG states and progress, tensors and plain containers only

The number is the count of epochs completed over all stages.  The state file is written before the
weights, so a weights file present means a complete checkpoint; ``latest_checkpoint`` returns the weights
file of the newest one.  What a killed write leaves (hidden temporaries, a state file without its
weights) is never listed, and is swept away by the next save.  The state file holds nothing but tensors,
numbers, strings, lists and dicts and is read with ``torch.load(weights_only=True)``: no pickled objects,
nothing executable in a checkpoint.  A checkpoint that does not fit (unreadable file, other embedding
size, other shapes) is a one-line CheckpointError naming the file, never a torch traceback.

What a checkpoint was trained for, and which one a resume may use: pipeline.training.resume.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load_bytes
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from pipeline.constants import EMBED_DIM as EMBEDDING_DIM
from pipeline.storage import IntegrityError, PathLike, as_path, atomic_local_path, sidecar_path, verify
from pipeline.training.identity import checkpoint_identity, identity_mismatch, layout_identity

_NAME = re.compile(r"^ckpt-(\d+)\.safetensors$")
_STATE_NAME = re.compile(r"^ckpt-(\d+)\.state\.pt$")
# pipeline.storage's atomic temporaries of checkpoints and of the trainer's best-weights file
_TEMPORARY = re.compile(r"^\.(ckpt-\d+|best-weights)\.(safetensors|state\.pt)\..*\.tmp")
# The embedding head's output projection in pipeline.models (a Linear, or the last Linear of an MLP).
_EMBEDDING_OUT = re.compile(r"(?:^|\.)heads\.embedding\.net(?:\.(\d+))?\.weight$")


def plural(count: int, word: str, words: str | None = None) -> str:
    """ "1 epoch", "2 epochs" ("words" for an irregular plural)."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


class CheckpointError(ValueError):
    """A checkpoint that does not fit what is asked of it (wrong embedding size, missing state)."""


# -- RNG state as tensors / plain lists ----------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Every RNG the trainer touches, as tensors and plain lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [int(py_state[0]), list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_meta"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- paths ---------------------------------------------------------------------------------------------
def checkpoint_paths(directory: PathLike, index: int) -> tuple[Any, Any]:
    root = as_path(directory)
    return root / f"ckpt-{index:05d}.safetensors", root / f"ckpt-{index:05d}.state.pt"


def list_checkpoints(directory: PathLike) -> list[tuple[int, Any]]:
    """(index, weights path) of every complete checkpoint in ``directory``, oldest first."""
    root = as_path(directory)
    if not root.exists():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found, key=lambda item: item[0])


def latest_checkpoint(directory: PathLike) -> Any | None:
    """The weights file (.safetensors) of the newest complete checkpoint, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def state_path_for(weights_path: PathLike) -> Any:
    path = as_path(weights_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".state.pt")


# -- saving --------------------------------------------------------------------------------------------
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; tensors sharing storage (tied weights) are cloned, which safetensors needs."""
    out, seen = {}, set()
    for name, tensor in _unwrap(model).state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[name] = t
    return out


def model_config(model: torch.nn.Module) -> dict:
    m = _unwrap(model)
    return m.config_dict() if hasattr(m, "config_dict") else {}


def save_checkpoint(
    directory: PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    progress: dict | None = None,
    config: dict | None = None,
    index: int = 0,
    embedding_dim: int | None = None,
    rng: bool = True,
    keep_last: int | None = 2,
    identity: dict | None = None,
) -> Any:
    """Write checkpoint number ``index`` (state first, then weights, each atomically); return the weights path.

    ``progress`` is the trainer's position and history (plain values); ``config`` the training config.
    ``keep_last`` older checkpoints are kept (None keeps all) so a long run does not fill the disk.
    ``identity`` (recipe, settings_hash; backbone defaults to the model config's) goes into the metadata.
    """
    weights_path, state_path = checkpoint_paths(directory, index)
    m_config = model_config(model)
    dim = embedding_dim or getattr(_unwrap(model), "embedding_dim", None) or m_config.get("embedding_dim")
    state: dict[str, Any] = {
        "progress": progress or {},
        "config": config or {},
        "model_config": m_config,
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if rng:
        state["rng"] = capture_rng_state()
    with atomic_local_path(state_path, suffix=".pt") as tmp:
        torch.save(state, tmp)
    metadata = {
        "format": "pt",
        "model_config": json.dumps(m_config, sort_keys=True),
        "train_config": json.dumps(config or {}, sort_keys=True, default=str),
        "progress": json.dumps({k: v for k, v in (progress or {}).items() if k != "history"}, default=str),
    }
    if dim:
        metadata["embedding_dim"] = str(int(dim))
    recorded = {"backbone": m_config.get("backbone"), **(identity or {})}
    metadata.update({k: str(v) for k, v in recorded.items() if k in ("backbone", "recipe", "settings_hash") and v})
    with atomic_local_path(weights_path, suffix=".safetensors") as tmp:
        st_save_file(_plain_state_dict(model), str(tmp), metadata=metadata)
    if keep_last is not None:
        prune_checkpoints(directory, keep_last)
    return weights_path


def prune_checkpoints(directory: PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (weights first, so no half checkpoint looks complete),
    and what killed writes left behind."""
    found = list_checkpoints(directory)
    for _, weights in found[: max(len(found) - keep_last, 0)]:
        state = state_path_for(weights)
        weights.unlink()
        for other in (state, sidecar_path(weights), sidecar_path(state)):
            if other.exists():
                other.unlink()
    remove_leftovers(directory)


def remove_leftovers(directory: PathLike) -> int:
    """Delete the temporaries of killed writes and state files without weights; returns how many.

    A killed SwinV2-L save leaves gigabytes of temporary state, once per kill.  Call it only when this
    process is the one writer of ``directory`` (the trainer's rank 0, right after a save).
    """
    root = as_path(directory)
    if not root.exists():
        return 0
    complete = {index for index, _ in list_checkpoints(root)}
    removed = 0
    for entry in list(root.iterdir()):
        state = _STATE_NAME.match(entry.name)
        if _TEMPORARY.match(entry.name) or (state and int(state.group(1)) not in complete):
            entry.unlink()
            removed += 1
    return removed


def remove_checkpoint(weights_path: PathLike) -> None:
    """Delete one checkpoint (weights first, then its state and both sidecars)."""
    weights = as_path(weights_path)
    state = state_path_for(weights)
    for other in (weights, state, sidecar_path(weights), sidecar_path(state)):
        if other.exists():
            other.unlink()


def remove_checkpoints(directory: PathLike) -> int:
    """Delete every checkpoint of ``directory`` (a fresh run with another config), and any leftovers; returns
    how many checkpoints."""
    found = list_checkpoints(directory)
    prune_checkpoints(directory, 0)
    return len(found)


# -- loading -------------------------------------------------------------------------------------------
def _read_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata); anything unreadable (truncated, not safetensors) is a CheckpointError naming the file."""
    from safetensors import SafetensorError, safe_open

    p = as_path(path)
    try:
        verify(p)  # safetensors carries no checksum: garbled tensor bytes would load silently
    except IntegrityError as exc:
        raise CheckpointError(f"checkpoint {exc}: re-materialize trained_models") from None
    try:
        if isinstance(p, Path):
            with safe_open(str(p), framework="pt") as f:
                metadata = f.metadata() or {}
            return st_load_file(str(p)), metadata
        data = p.read_bytes()
        # safetensors' header: 8-byte little-endian length, then JSON with "__metadata__".
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
        return st_load_bytes(data), metadata
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"{p} is not a readable safetensors checkpoint: {exc}") from exc


def _embedding_size(state: dict[str, torch.Tensor]) -> int | None:
    """The embedding head's output size as the tensors say (metadata can be absent or wrong)."""
    found = []
    for key, tensor in state.items():
        match = _EMBEDDING_OUT.search(key)
        if match and tensor.ndim == 2:
            found.append((int(match.group(1) or -1), int(tensor.shape[0])))
    return max(found)[1] if found else None


def check_state_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], path: PathLike) -> None:
    """Raise CheckpointError naming the file and the first tensor whose name or shape the model does not have.

    torch's own load_state_dict error is a page of every mismatch; this is one line a user can act on.
    """
    expected = _unwrap(model).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"checkpoint {path} does not fit the model: {key} has shape {list(tensor.shape)}, "
                f"the model expects {list(expected[key].shape)}"
            )
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: {plural(len(missing), 'missing tensor')} "
            f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )


def _resolve(path: PathLike) -> Any:
    p = as_path(path)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"no checkpoint in {p}")
        return latest
    return p


def load_model_weights(
    path: PathLike, expected_embedding_dim: int | None = EMBEDDING_DIM
) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, model config) of a checkpoint (its weights file or its directory's newest).

    The model config is what ``model.config_dict()`` returned, so ``create_model(**config)`` rebuilds the
    model.  Raises CheckpointError when the checkpoint's embedding size (its metadata, its config, or the
    embedding head's tensors) is not ``expected_embedding_dim``, or when those disagree.
    """
    state, config, _ = _load_weights(_resolve(path), expected_embedding_dim)
    return state, config


def _load_weights(weights_path, expected_embedding_dim: int | None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state_dict, model config, safetensors metadata) of one weights file, checked as load_model_weights says."""
    state, metadata = _read_safetensors(weights_path)
    try:
        config = json.loads(metadata.get("model_config", "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {weights_path} has an unreadable model_config: {exc}") from exc
    declared = [metadata.get("embedding_dim"), config.get("embedding_dim"), config.get("embed_dim")]
    sizes = [int(d) for d in declared if d is not None]
    tensor_size = _embedding_size(state)
    if tensor_size is not None:
        sizes.append(tensor_size)
    want = int(expected_embedding_dim) if expected_embedding_dim is not None else (sizes[0] if sizes else None)
    wrong = next((d for d in sizes if d != want), None)
    if wrong is not None:
        raise CheckpointError(f"checkpoint embedding size {wrong} != expected {want} ({weights_path})")
    return state, config, metadata


def read_state(path: PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The trainer state beside a checkpoint's weights (``torch.load(weights_only=True)``), weights not read."""
    state_file = state_path_for(_resolve(path))
    if not state_file.exists():
        raise CheckpointError(f"checkpoint has no trainer state ({state_file})")
    try:
        verify(state_file)
    except IntegrityError as exc:
        raise CheckpointError(f"trainer state {exc}") from None
    try:
        if isinstance(state_file, Path):
            state = torch.load(state_file, map_location=map_location, weights_only=True)
        else:
            state = torch.load(io.BytesIO(state_file.read_bytes()), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, refused pickle op, bad bytes: torch raises many types
        raise CheckpointError(f"trainer state {state_file} is unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"trainer state {state_file} is a {type(state).__name__}, not a dict")
    return state


def load_model(
    path: PathLike,
    *,
    device: str | torch.device | None = None,
    expected_embedding_dim: int | None = EMBEDDING_DIM,
    backbone: str | None = None,
    recipe: str | None = None,
    factory: Callable[..., torch.nn.Module] | None = None,
) -> torch.nn.Module:
    """The model of a checkpoint (its weights file or its directory's newest), in eval mode, for inference.

    The one place a checkpoint becomes a model: the weights are read and their SHA-256 sidecar verified
    (``load_model_weights``), the architecture is rebuilt from the recorded model config by ``factory``
    (default ``pipeline.models.create_model``, the backbone registry), the weights are checked against it
    and loaded, and the model is moved to ``device`` when one is given.  ``model.config_dict()`` gives the
    recorded config back.  ``backbone`` / ``recipe``, when given, are what the checkpoint must have been
    trained for; when neither is given, the folder trained_models/<backbone>/<recipe>/ holding it says
    (a checkpoint copied in from another model is refused by name, not loaded until a shape error).
    Every failure is a one-line CheckpointError (a ValueError) naming the file.  Resuming training is
    ``resume.load_checkpoint``, which also restores optimizer, scheduler and RNG state.
    """
    weights_path = _resolve(path)
    state, config, metadata = _load_weights(weights_path, expected_embedding_dim)
    expected = {"backbone": backbone, "recipe": recipe}
    if backbone is None and recipe is None:
        expected = layout_identity(weights_path)
    recorded = checkpoint_identity(metadata, config)
    if expected.get("backbone") and not recorded["backbone"]:
        recorded["backbone"] = "none recorded"  # an unknown model is no more this backbone than another one
    mismatch = identity_mismatch(weights_path, recorded, expected)
    if mismatch:
        raise CheckpointError(mismatch)
    if factory is None:
        from pipeline.models import create_model as factory
    model = factory(**config)
    check_state_fits(model, state, weights_path)
    model.load_state_dict(state)
    model.eval()
    return model if device is None else model.to(device)
