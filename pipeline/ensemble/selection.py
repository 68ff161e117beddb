"""Model selection on val: each backbone's best recipe, and DAKL's gamma and alpha.

DAKL is tuned with val as the unlabeled target domain, then refitted once per split with that split as the
target domain (its unlabeled points add features, never labels), as the paper adapts to the test images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.metrics import normalise_rows, row_cosines

DAKL_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0)
DAKL_ALPHAS = (0.01, 0.1, 1.0)


def best_recipes(
    per_model: Mapping[tuple[str, str], np.ndarray],
    val_mask: np.ndarray,
    val_targets: np.ndarray,
    backbones: Sequence[str],
    recipes: Sequence[str],
) -> dict[str, str]:
    """backbone -> the recipe whose predictions have the highest mean val cosine (first in ``recipes`` on a
    tie); backbones without a model are left out."""
    best = {}
    for backbone in backbones:
        scored = {
            r: float(row_cosines(per_model[(backbone, r)][val_mask], val_targets).mean())
            for r in recipes
            if (backbone, r) in per_model
        }
        if scored:
            best[backbone] = max(scored, key=scored.get)
    return best


@dataclass(frozen=True)
class DAKLResult:
    gamma: float
    alpha: float
    val_cosine: float  # of the chosen gamma and alpha
    sweep: list[dict]  # {"gamma", "alpha", "val_cosine"} for every pair, gamma-major
    predictions: dict[str, np.ndarray]  # split -> unit-length [n, d] predictions, refitted on that split


def sweep_dakl(
    X: np.ndarray,
    Y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    gammas: Sequence[float] = DAKL_GAMMAS,
    alphas: Sequence[float] = DAKL_ALPHAS,
) -> list[dict]:
    """Val cosine of DAKL fitted on centroids X, labels Y with val_x as the target, for every gamma x alpha."""
    from pipeline.ensemble.dakl import DAKLRegressor

    sweep = []
    for gamma in gammas:
        for alpha in alphas:
            model = DAKLRegressor(gamma=gamma, alpha=alpha).fit(X, Y, val_x)
            cosine = float(row_cosines(model.predict(val_x), val_y).mean())
            sweep.append({"gamma": gamma, "alpha": alpha, "val_cosine": cosine})
    return sweep


def select_dakl(
    X: np.ndarray,
    Y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    splits: Mapping[str, np.ndarray],
    gammas: Sequence[float] = DAKL_GAMMAS,
    alphas: Sequence[float] = DAKL_ALPHAS,
) -> DAKLResult:
    """The paper's DAKL step: gamma and alpha chosen on val (first best in sweep order), then for each of
    ``splits`` (name -> ensemble predictions) a fit with that split as the target domain and its predictions."""
    from pipeline.ensemble.dakl import DAKLRegressor

    sweep = sweep_dakl(X, Y, val_x, val_y, gammas, alphas)
    best = max(sweep, key=lambda r: r["val_cosine"])
    predictions = {
        name: normalise_rows(DAKLRegressor(gamma=best["gamma"], alpha=best["alpha"]).fit(X, Y, x).predict(x))
        for name, x in splits.items()
    }
    return DAKLResult(best["gamma"], best["alpha"], best["val_cosine"], sweep, predictions)
