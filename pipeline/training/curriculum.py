"""Curriculum learning ("CL") of the paper: difficulty from preliminary epochs, easy / medium / hard buckets,
and the stages a model is retrained on (easy, easy+medium, all, all).

A sample is easy when the model already predicts its prompt embedding well early on: difficulty is the mean
cosine over the preliminary epochs (higher = easier).  Stages are index sets in bucket order; the trainer
shuffles only within a stage, so harder samples never leak into an early stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

BUCKETS = ("easy", "medium", "hard")


def difficulty_from_history(cosines: np.ndarray) -> np.ndarray:
    """Mean cosine per sample over the preliminary epochs ([epochs, n] -> [n]); higher = easier.

    NaN entries (a sample not seen in some epoch) are ignored; a sample never seen gets -inf (hardest),
    so it is trained last rather than silently treated as easy.
    """
    history = np.asarray(cosines, dtype=np.float64)
    if history.ndim == 1:
        history = history[None, :]
    if history.ndim != 2:
        raise ValueError(f"cosine history must be [epochs, n], got shape {history.shape}")
    seen = ~np.isnan(history)
    counts = seen.sum(axis=0)
    sums = np.where(seen, history, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)
    return mean


def bucket_by_difficulty(
    difficulty: np.ndarray, thirds: bool = True, thresholds: tuple[float, float] | None = None
) -> np.ndarray:
    """Label each sample "easy" / "medium" / "hard".

    thirds=True: by rank, the easiest third (highest mean cosine) is easy, the next third medium, the rest
    hard; ties broken by index (lower index first) so the split is deterministic.  Sizes differ by at most
    one, extra samples going to the easier buckets.  With thirds=False, ``thresholds`` = (hard_below,
    easy_at_or_above) on the mean cosine is used instead.
    """
    d = np.asarray(difficulty, dtype=np.float64)
    n = d.shape[0]
    out = np.empty(n, dtype=object)
    if thirds:
        # lexsort: last key is primary -> sort by -difficulty, then by index.
        order = np.lexsort((np.arange(n), -d))
        sizes = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
        start = 0
        for name, size in zip(BUCKETS, sizes):
            out[order[start : start + size]] = name
            start += size
        return out
    if thresholds is None:
        raise ValueError("thirds=False needs thresholds=(hard_below, easy_at_or_above)")
    low, high = thresholds
    if low > high:
        raise ValueError(f"thresholds must be ordered (hard_below <= easy_at_or_above), got {thresholds}")
    out[:] = "medium"
    out[d >= high] = "easy"
    out[d < low] = "hard"
    return out


def curriculum_stages(buckets: np.ndarray) -> list[np.ndarray]:
    """The mlc_cl schedule: [easy, easy+medium, all, all] as sorted index arrays.

    The last two stages both cover every sample (all, then a final pass over all), as in the paper's recipe.
    Indices are sorted within a stage; the trainer's sampler decides the in-stage order.
    """
    labels = np.asarray(buckets, dtype=object)
    unknown = set(labels.tolist()) - set(BUCKETS)
    if unknown:
        raise ValueError(f"unknown difficulty buckets {sorted(map(str, unknown))}; expected {BUCKETS}")
    easy = np.flatnonzero(labels == "easy")
    easy_medium = np.flatnonzero((labels == "easy") | (labels == "medium"))
    everything = np.arange(labels.shape[0])
    return [easy, easy_medium, everything, everything.copy()]


def align_buckets(
    image_ids: Sequence[str], scored_ids: Iterable[str], scored_buckets: Iterable[str], default: str = "hard"
) -> np.ndarray:
    """The bucket of each of ``image_ids`` (the training order) from difficulty scores given as parallel
    ``scored_ids`` / ``scored_buckets``; a sample without a score gets ``default`` (hard: trained last)."""
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    buckets = np.array([default] * len(image_ids), dtype=object)
    for image_id, bucket in zip(scored_ids, scored_buckets):
        if image_id in position:
            buckets[position[image_id]] = bucket
    return buckets


def aligned_stages(
    image_ids: Sequence[str], scored_ids: Iterable[str], scored_buckets: Iterable[str]
) -> list[np.ndarray]:
    """The mlc_cl stages over the training order ``image_ids``, from a backbone's difficulty scores."""
    return curriculum_stages(align_buckets(image_ids, scored_ids, scored_buckets))
