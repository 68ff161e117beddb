"""The paper's ensemble: the element-wise median (or mean) of the backbones' predicted embeddings.

Ensembles are formed per recipe (every backbone's baseline, mlc or mlc_cl model) and over each backbone's
best recipe on val (pipeline.ensemble.selection.best_recipes). The median over the best recipes is what the
DAKL stage starts from and what `reverse-sd predict` uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.ensemble.selection import best_recipes
from pipeline.metrics import normalise_rows, row_cosines

ENSEMBLE_METHODS = ("median", "mean")
BEST = "best"  # the group of each backbone's best recipe on val


def ensemble_column(method: str, group: str) -> str:
    """The ensemble_predictions column of ``method`` over ``group`` (a recipe, or BEST): "median_best"."""
    return f"{method}_{group}"


DAKL_INPUT = ensemble_column("median", BEST)  # the paper's ensemble, which DAKL refines


def combine(members: Sequence[np.ndarray] | np.ndarray, method: str = "median") -> np.ndarray:
    """Unit-length rows of the element-wise median (or mean) of the members' [n, d] predictions."""
    stack = np.stack(members) if len(members) and not isinstance(members, np.ndarray) else np.asarray(members)
    if stack.ndim != 3 or not len(stack):
        raise ValueError(f"members must be one or more [n, d] matrices, got shape {stack.shape}")
    if method == "median":
        combined = np.median(stack, axis=0)
    elif method == "mean":
        combined = stack.mean(axis=0)
    else:
        raise ValueError(f"ensemble method {method!r} is not one of {ENSEMBLE_METHODS}")
    return normalise_rows(combined)


@dataclass(frozen=True)
class Ensembles:
    best_recipe: dict[str, str]  # backbone -> its best recipe on val, in backbone order
    predictions: dict[str, np.ndarray]  # ensemble_column(method, group) -> [n, d] unit rows
    val_cosine: dict[str, float]  # same keys: mean cosine on the val rows


def build_ensembles(
    per_model: Mapping[tuple[str, str], np.ndarray],
    val_mask: np.ndarray,
    val_targets: np.ndarray,
    backbones: Sequence[str],
    recipes: Sequence[str],
    methods: Sequence[str] = ENSEMBLE_METHODS,
) -> Ensembles:
    """Every ensemble of the report from the models' aligned predictions.

    ``per_model`` maps (backbone, recipe) to that model's predictions for the same [n] rows; ``val_mask``
    marks the val rows, whose targets are ``val_targets``. Groups: each recipe over the backbones that
    have it, then BEST over each backbone's best recipe; an empty group is left out.
    """
    best = best_recipes(per_model, val_mask, val_targets, backbones, recipes)
    groups = {r: [per_model[(b, r)] for b in backbones if (b, r) in per_model] for r in recipes}
    groups[BEST] = [per_model[(b, r)] for b, r in best.items()]
    predictions, val_cosine = {}, {}
    for group, members in groups.items():
        if not members:
            continue
        stack = np.stack(members)
        for method in methods:
            name = ensemble_column(method, group)
            predictions[name] = combine(stack, method)
            val_cosine[name] = float(row_cosines(predictions[name][val_mask], val_targets).mean())
    return Ensembles(best_recipe=best, predictions=predictions, val_cosine=val_cosine)
