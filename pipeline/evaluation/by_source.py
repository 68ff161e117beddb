"""The report's figures per data source (DiffusionDB parts, REVERSE_SD_IMAGES folders): the same scores as
Table 1, on each source's test rows alone, so a user sees where the figures come from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from pipeline.evaluation.report import score_test_split


def mean_by_source(values: np.ndarray, sources: Sequence[str]) -> dict[str, float]:
    """Per source (sorted by name), the mean of ``values`` over its rows (``sources`` row-aligned)."""
    values, sources = np.asarray(values, dtype=np.float64), np.asarray(sources, dtype=object)
    if len(values) != len(sources):
        raise ValueError(f"{len(values)} values but {len(sources)} sources")
    return {source: float(values[sources == source].mean()) for source in sorted(set(sources.tolist()))}


def score_by_source(
    sources: Sequence[str],
    test_targets: np.ndarray,
    train_targets: np.ndarray,
    models: Mapping[str, np.ndarray],
    ensembles: Mapping[tuple[str, str], np.ndarray],
    dakl: np.ndarray | None,
    extra_rows: Mapping[str, tuple[np.ndarray, Sequence[str]]] | None = None,
) -> dict[str, dict[str, float]]:
    """Table 1 per data source: source -> the figures score_test_split gives on that source's test rows alone
    (``sources`` row-aligned with ``test_targets`` and every prediction), sources sorted by name.

    The mean-embedding baseline stays the mean of *all* training targets (the predictor is the same for every
    source; only the rows it is scored on differ).  ``extra_rows``: figures scored outside (the k-NN baseline),
    key -> (per-row cosines, their rows' sources), each averaged per source."""
    sources = np.asarray(sources, dtype=object)
    if len(sources) != len(test_targets):
        raise ValueError(f"{len(sources)} sources for {len(test_targets)} test rows")
    out = {}
    for source in sorted(set(sources.tolist())):
        rows = sources == source
        out[source] = score_test_split(
            test_targets[rows],
            train_targets,
            {name: predictions[rows] for name, predictions in models.items()},
            {key: predictions[rows] for key, predictions in ensembles.items()},
            None if dakl is None else dakl[rows],
        ).cosine
    for key, (values, row_sources) in (extra_rows or {}).items():
        for source, value in mean_by_source(values, row_sources).items():
            out.setdefault(source, {})[key] = value
    return out


def pooled_mean(means: Mapping[str, float], counts: Mapping[str, int]) -> float:
    """The mean over all rows from per-group means and row counts (groups with no rows count for nothing)."""
    total = sum(counts[g] for g in means)
    return float(sum(means[g] * counts[g] for g in means) / total) if total else float("nan")
