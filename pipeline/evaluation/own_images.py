"""`reverse-sd evaluate`'s arithmetic: per-image cosines of the predicted and the real prompt's embedding (the
Kaggle metric, on the user's own images), summarised by model and by generator.  Pure functions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.metrics import row_cosines


def image_cosines(predicted: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per row, the cosine of a predicted embedding with its prompt's SBERT embedding."""
    return row_cosines(np.asarray(predicted, dtype=np.float64), np.asarray(targets, dtype=np.float64))


def summarise(rows: Sequence[dict], models: Sequence[str], skipped: int = 0) -> dict:
    """The summary record: n, mean (the first model's: the default one), each model's mean, and per generator
    (n, mean of the default model).  ``rows`` hold "generator" and "cosines" (model -> cosine)."""
    default = models[0] if models else None

    def mean(values: list[float]) -> float | None:
        return round(float(np.mean(values)), 6) if values else None

    generators: dict[str, list[float]] = {}
    for row in rows:
        generators.setdefault(row.get("generator") or "unknown", []).append(row["cosines"][default])
    return {
        "summary": True,
        "model": default,
        "n": len(rows),
        "mean": mean([row["cosines"][default] for row in rows]) if default else None,
        "models": {m: mean([row["cosines"][m] for row in rows]) for m in models},
        "generators": {g: {"n": len(v), "mean": mean(v)} for g, v in sorted(generators.items())},
        "skipped": skipped,
    }
