"""What a checkpoint was trained for (backbone, recipe, settings hash), and whether that is what a reader
expects: one line naming both when it is not."""

from __future__ import annotations

import hashlib
import json

from pipeline.constants import BACKBONE_NAMES, RECIPES
from pipeline.storage import PathLike, as_path

IDENTITY_KEYS = ("backbone", "recipe", "settings_hash")


def settings_hash(settings: dict) -> str:
    """A short hash of the result-changing training settings (``TrainConfig.result_dict()``)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_identity(metadata: dict[str, str], model_cfg: dict | None = None) -> dict[str, str | None]:
    """backbone / recipe / settings_hash a checkpoint records (None for what an older checkpoint does not)."""
    recorded = {key: metadata.get(key) or None for key in IDENTITY_KEYS}
    if recorded["backbone"] is None and model_cfg:
        recorded["backbone"] = model_cfg.get("backbone")
    return recorded


def layout_identity(path: PathLike) -> dict[str, str]:
    """backbone / recipe that the folder trained_models/<backbone>/<recipe>/ of a checkpoint file names ({} else)."""
    p = as_path(path)
    recipe, backbone = p.parent.name, p.parent.parent.name
    if recipe in RECIPES and backbone in BACKBONE_NAMES:
        return {"backbone": backbone, "recipe": recipe}
    return {}


def identity_mismatch(path: PathLike, recorded: dict, expected: dict) -> str | None:
    """One line naming both when ``recorded`` disagrees with ``expected`` on a key both give, else None."""
    wrong = [k for k in IDENTITY_KEYS if expected.get(k) and recorded.get(k) and recorded[k] != expected[k]]
    if not wrong:
        return None
    trained = ", ".join(f"{k.replace('_', ' ')} {recorded[k]}" for k in IDENTITY_KEYS if recorded.get(k))
    this = "/".join(str(expected[k]) for k in ("backbone", "recipe") if expected.get(k))
    if "settings_hash" in wrong:
        this = f"{this} with settings hash {expected['settings_hash']}".lstrip(" /")
    return f"checkpoint {path} was trained for {trained}; this is {this or 'another model'}"
