"""Benchmark: pipeline.ensemble.clustering.kmeans_centroids (faiss) at the paper's scale, and against scikit-learn.

    .venv/bin/python bench/kmeans.py [--n 670000] [--k 10000] [--n-iter 10] [--max-points-per-centroid 32]
                                     [--sub-n 20000] [--sub-k 500] [--skip-full]

Synthetic unit-norm 384-d "embeddings" with cluster structure (2k overlapping topic directions plus
noise, so clusters overlap as sentence embeddings do). Part 1 times kmeans_centroids at n x k (default
670,000 x 10,000, the paper's train split and k; goal < 5 minutes on 2 cores) and label_centroids on the
same data, and prints the objective. Part 2, on a subsample (default 20,000 points, k = 500), prints
time and quality of faiss (spherical and Euclidean) beside scikit-learn KMeans and MiniBatchKMeans:
L2 inertia (what Euclidean k-means minimises) and the cosine objective sum(1 - max cos) (what spherical
k-means minimises), each as a ratio to scikit-learn KMeans. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from options import add_options, bench_parser  # noqa: E402

from pipeline.ensemble.clustering import inertia, kmeans_centroids, label_centroids  # noqa: E402


def make_embeddings(n: int, d: int, topics: int, seed: int = 0, noise: float = 1.2) -> np.ndarray:
    """n unit vectors: a random topic direction plus isotropic noise (|noise| ~ `noise` x |topic|)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    X = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = centres[rng.integers(topics, size=stop - start)]
        block += (noise / np.sqrt(d)) * rng.standard_normal((stop - start, d), dtype=np.float32)
        X[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return X


def full_scale(args) -> None:
    X = make_embeddings(args.n, args.d, 2 * args.k, seed=0)
    print(
        f"== kmeans_centroids: n={args.n:,} d={args.d} k={args.k:,} n_iter={args.n_iter} "
        f"max_points_per_centroid={args.max_points_per_centroid} (trains on "
        f"{min(args.n, args.k * args.max_points_per_centroid):,} points)"
    )
    t0 = time.perf_counter()
    C = kmeans_centroids(X, args.k, seed=0, n_iter=args.n_iter, max_points_per_centroid=args.max_points_per_centroid)
    t_km = time.perf_counter() - t0
    # labels: the centroids' nearest "training predictions" (here X itself), targets = a stand-in matrix
    t0 = time.perf_counter()
    _, idx = label_centroids(C, X, np.arange(len(X))[:, None])
    t_label = time.perf_counter() - t0
    obj = inertia(X, C, "cosine")
    print(f"kmeans_centroids  {t_km:8.1f} s   (goal < 300 s)")
    print(f"label_centroids   {t_label:8.1f} s   ({len(np.unique(idx)):,} distinct nearest samples)")
    print(f"cosine objective  {obj / len(X):8.4f} per point (mean 1 - cos to nearest centroid)")


def subsample_comparison(args) -> None:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    X = make_embeddings(args.sub_n, args.d, 2 * args.sub_k, seed=1)
    k = args.sub_k
    rows = []

    def timed(name, fn):
        t0 = time.perf_counter()
        C = np.asarray(fn(), dtype=np.float32)
        rows.append((name, time.perf_counter() - t0, inertia(X, C), inertia(X, C, "cosine")))

    timed(
        f"faiss spherical (ours, n_iter={args.n_iter})",
        lambda: kmeans_centroids(
            X, k, seed=0, n_iter=args.n_iter, max_points_per_centroid=args.max_points_per_centroid
        ),
    )
    timed(
        "faiss spherical, all points, n_iter=25",
        lambda: kmeans_centroids(X, k, seed=0, n_iter=25, max_points_per_centroid=10**6),
    )
    timed(
        f"faiss euclidean (n_iter={args.n_iter})",
        lambda: kmeans_centroids(
            X, k, seed=0, n_iter=args.n_iter, spherical=False, max_points_per_centroid=args.max_points_per_centroid
        ),
    )
    timed("sklearn KMeans (n_init=1)", lambda: KMeans(k, n_init=1, random_state=0).fit(X).cluster_centers_)
    timed(
        "sklearn MiniBatchKMeans (3 inits)",
        lambda: MiniBatchKMeans(k, batch_size=4096, n_init=3, random_state=0).fit(X).cluster_centers_,
    )
    ref = next(r for r in rows if r[0].startswith("sklearn KMeans"))
    print(f"\n== subsample: n={args.sub_n:,} k={k} d={args.d}")
    print(
        f"{'method':44s} {'time s':>8s} {'vs KMeans':>9s} {'L2 inertia':>11s} {'ratio':>6s} {'cos obj':>9s} {'ratio':>6s}"
    )
    for name, t, l2, cos in rows:
        print(f"{name:44s} {t:8.2f} {ref[1] / t:8.1f}x {l2:11.1f} {l2 / ref[2]:6.3f} {cos:9.1f} {cos / ref[3]:6.3f}")
    print("(ratio < 1: better objective than scikit-learn KMeans; 'vs KMeans' > 1: faster)")


def main() -> None:
    ap = bench_parser(__doc__)
    add_options(
        ap,
        n=(670_000, "points of the full-scale run (the paper's train split)"),
        k=(10_000, "centroids of the full-scale run (the paper's k)"),
        d=(384, "embedding dimension (all-MiniLM-L6-v2's)"),
        n_iter=(10, "k-means iterations"),
        max_points_per_centroid=(32, "faiss trains on at most k x this many points"),
        sub_n=(20_000, "points of the comparison with scikit-learn"),
        sub_k=(500, "centroids of the comparison with scikit-learn"),
        skip_full=(False, "leave out the full-scale run"),
        skip_sub=(False, "leave out the comparison with scikit-learn"),
    )
    args = ap.parse_args()
    if not args.skip_full:
        full_scale(args)
    if not args.skip_sub:
        subsample_comparison(args)


if __name__ == "__main__":
    main()
