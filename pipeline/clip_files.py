"""Which CLIP weights may be loaded, decided before transformers reads a byte of them.

Only safetensors weights are loaded: a directory holding only a pickle checkpoint (pytorch_model.bin ...) is
refused unread (unpickling can run any code), and a safetensors file is checked to be whole (its header
parses and its tensors end exactly at the end of the file), so a truncated download fails in one line
naming the file.  A hub id is looked up with one request, no retries: when the hub cannot be reached the
local cache is used alone, and a model not cached fails at once instead of retrying for minutes.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path


class ModelFilesError(RuntimeError):
    """CLIP weights that are not loaded (a pickle, a truncated file, no such model, no hub and no cache)."""


# Weights files that are pickles: loading one can run any code it holds, so none is ever loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]


def check_safetensors(path: str | os.PathLike) -> None:
    """ModelFilesError unless ``path`` is a whole safetensors file: its header parses and the tensors it
    describes end exactly at the end of the file (a truncated or padded download fails here, by name)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length <= 0 or 8 + length > size or length > 100 * 2**20:
            raise ModelFilesError(f"{path} is not a whole safetensors file (its header is cut off or damaged)")
        try:
            header = json.loads(f.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ModelFilesError(f"{path} is not a whole safetensors file (its header does not parse)") from None
    if 8 + length + end != size:
        raise ModelFilesError(
            f"{path} is not a whole safetensors file: {size:,} bytes where its header describes "
            f"{8 + length + end:,} (truncated or damaged: download or save it again)"
        )


def check_clip_directory(directory: str | os.PathLike) -> None:
    """ModelFilesError unless ``directory`` holds safetensors weights, each whole: a pickle-only checkpoint
    (pytorch_model.bin ...) is refused unread, as is a truncated safetensors file."""
    files = sorted(p for p in Path(directory).iterdir() if p.is_file())
    weights = [p for p in files if p.suffix == ".safetensors"]
    pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    if not weights:
        if pickles:
            raise ModelFilesError(
                f"cannot load the CLIP model {str(directory)!r}: it holds only a pickle checkpoint "
                f"({', '.join(pickles)}), which is never loaded (unpickling can run code); save the model with "
                "save_pretrained(..., safe_serialization=True) to get model.safetensors"
            )
        return  # no weights at all: from_pretrained says the directory holds no model
    for path in weights:
        check_safetensors(path)


def _cached(model: str) -> bool:
    """Whether a hub model's config is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


@functools.lru_cache(maxsize=8)  # one request per model and process (the CLI checks before loading)
def _hub_reachable(model: str) -> bool:
    """One request, no retries: True when the hub answers for ``model``; False when the hub cannot be reached
    (no network, a firewall, a dead HF_ENDPOINT); ModelFilesError when the hub says there is no such model."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        HfApi().model_info(model, timeout=10)
    except RepositoryNotFoundError as exc:
        raise ModelFilesError(
            f"cannot load the CLIP model {model!r}: the hub has no such model, or it is private or gated "
            f"(log in with hf auth login); --clip takes a hub id or a local directory: {_first_line(exc)}"
        ) from None
    except HFValidationError as exc:
        raise ModelFilesError(
            f"cannot load the CLIP model {model!r}: neither a local directory nor a hub id ({_first_line(exc)})"
        ) from None
    except Exception:  # noqa: BLE001 - connection refused, DNS, timeouts, a proxy's error page, 5xx ...
        return False
    return True


def local_files_only(model: str, offline: bool) -> bool:
    """Whether ``model`` (a directory or a hub id) is to be loaded from local files alone; ModelFilesError
    when it is not to be loaded at all.  ``offline``: HF_HUB_OFFLINE is set."""
    if os.path.isdir(model):
        check_clip_directory(model)
        return True
    if os.path.lexists(model):
        raise ModelFilesError(
            f"cannot load the CLIP model {model!r}: it is a file; --clip takes a directory or a hub id"
        )
    if not offline and _hub_reachable(model):
        return False
    if not _cached(model):
        why = (
            "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache: set HF_HUB_OFFLINE=0 to download it"
            if offline
            else "the hub cannot be reached and it is not in the local Hugging Face cache"
        )
        raise ModelFilesError(f"cannot load the CLIP model {model!r} ({why}; --clip takes a local directory)")
    return True
