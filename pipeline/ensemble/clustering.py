"""k-means centroids of the training predictions, and their labels, for DAKL (paper-notes, "Ensemble and DAKL").

faiss-cpu does the work: its Lloyd iterations are one BLAS GEMM per iteration and it is about 10x faster
than scikit-learn's MiniBatchKMeans at k = 10,000 (bench/kmeans.py prints the comparison and the inertia).

Geometry: cosine. The embeddings (and the ensemble's predictions) are compared by cosine everywhere else
(the metric, DAKL's K^), so the clustering is spherical: centroids are kept at unit length and points
are assigned by inner product, which for unit centroids is the L2 assignment of cosine geometry whatever
the points' norms. ``spherical=False`` gives plain Euclidean k-means.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from pipeline.metrics import normalise_rows

log = logging.getLogger(__name__)

__all__ = ["kmeans_centroids", "label_centroids", "inertia", "nearest"]


def _faiss():
    import faiss

    # faiss uses every core it sees; on a shared machine let OMP_NUM_THREADS decide, as numpy does.
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        faiss.omp_set_num_threads(int(threads))
    return faiss


def _as_float32_matrix(X, name: str) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n x d), got shape {X.shape}")
    if not np.isfinite(X).all():
        bad = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise ValueError(f"{name} has {len(bad)} rows with NaN or inf (first: row {bad[0]})")
    return X


def kmeans_centroids(
    X: np.ndarray,
    k: int,
    seed: int = 0,
    n_iter: int = 10,
    spherical: bool = True,
    max_points_per_centroid: int = 32,
    init: str = "auto",
    verbose: bool = False,
) -> np.ndarray:
    """k centroids (k x d, float32) of the rows of X by faiss k-means.

    Cost is one (points x k x d) GEMM per iteration, so:
    n_iter = 10 Lloyd iterations (faiss's own default is 25; the objective gains little after ~10).
    max_points_per_centroid = 32 caps the training sample at 32 k points, drawn uniformly by faiss (at
    k = 10,000, 320,000 of the 670,000 training predictions): about half the time of faiss's default 256
    for a small objective cost; bench/kmeans.py prints both.
    init: "k-means++" (D^2 sampling, as scikit-learn), "afk-mc2" (its MCMC approximation), "random"
    (uniform rows: faiss's default, which can merge well-separated clusters and split others), or "auto":
    k-means++ up to k = 2,000 and random above, where D^2 sampling costs more than the whole clustering.
    k larger than the number of rows is clamped to it (with a warning), since a centroid needs a point.
    """
    X = _as_float32_matrix(X, "X")
    n, d = X.shape
    if n == 0:
        raise ValueError("kmeans_centroids needs at least one row")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        log.warning("kmeans_centroids: k=%d is more than the %d samples; clamping k to %d", k, n, n)
        k = n
    if k == n:  # every point its own centroid: nothing to learn (faiss would warn and shuffle)
        C = X.copy()
        if spherical:
            C = normalise_rows(C)
        return C
    faiss = _faiss()
    inits = {
        "k-means++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        "afk-mc2": faiss.ClusteringInitMethod_AFK_MC2,
        "random": faiss.ClusteringInitMethod_RANDOM,
    }
    if init == "auto":
        init = "k-means++" if k <= 2000 else "random"
    if init not in inits:
        raise ValueError(f"init must be one of {sorted(inits)}, got {init!r}")
    km = faiss.Kmeans(
        d,
        int(k),
        niter=int(n_iter),
        seed=int(seed),
        spherical=bool(spherical),
        max_points_per_centroid=int(max_points_per_centroid),
        min_points_per_centroid=1,
        init_method=inits[init],
        verbose=verbose,
    )
    km.train(X)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def nearest(queries: np.ndarray, base: np.ndarray, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """For each query row, (similarity-or-distance, index) of its nearest base row, by exact faiss search.

    metric "cosine": both sides normalised, inner product (higher is nearer); "l2": squared L2 (lower).
    """
    faiss = _faiss()
    q = _as_float32_matrix(queries, "queries")
    b = _as_float32_matrix(base, "base")
    if q.shape[1] != b.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} columns but base has {b.shape[1]}")
    if len(b) == 0:
        raise ValueError("base is empty")
    if metric == "cosine":
        q, b = q.copy(), b.copy()
        faiss.normalize_L2(q)
        faiss.normalize_L2(b)
        index = faiss.IndexFlatIP(b.shape[1])
    elif metric == "l2":
        index = faiss.IndexFlatL2(b.shape[1])
    else:
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    index.add(b)
    distances, indices = index.search(q, 1)
    return distances[:, 0], indices[:, 0].astype(np.int64)


def label_centroids(
    centroids: np.ndarray, train_predictions: np.ndarray, train_targets: np.ndarray, metric: str = "cosine"
) -> tuple[np.ndarray, np.ndarray]:
    """Label each centroid with the TRUE embedding of the training sample whose PREDICTION is nearest to it.

    Returns (labels k x p, nearest_index k,): labels[i] = train_targets[nearest_index[i]]. The centroids
    live in prediction space, so the search is over predictions; the label is the sample's target.
    """
    train_targets = np.asarray(train_targets)
    if len(train_targets) != len(train_predictions):
        raise ValueError(
            f"train_predictions has {len(train_predictions)} rows but train_targets has {len(train_targets)}"
        )
    _, idx = nearest(centroids, train_predictions, metric=metric)
    return train_targets[idx], idx


def inertia(X: np.ndarray, centroids: np.ndarray, metric: str = "l2") -> float:
    """The k-means objective of `centroids` on X, for comparing clusterings.

    "l2": sum of squared L2 distances to the nearest centroid (scikit-learn's inertia_), the fair yardstick
    for Euclidean k-means. "cosine": sum of (1 - max cosine) = half the L2 inertia with both sides at unit
    length, the objective spherical k-means minimises (unit centroids sit at L2 distance from the shorter
    means Euclidean k-means would use, so L2 inertia alone would misjudge them).
    """
    if metric == "cosine":
        sims, _ = nearest(X, centroids, metric="cosine")
        return float((1.0 - sims.astype(np.float64)).sum())
    if metric != "l2":
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    D, _ = nearest(X, centroids, metric="l2")
    return float(np.maximum(D, 0).astype(np.float64).sum())
