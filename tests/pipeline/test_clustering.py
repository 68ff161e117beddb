"""k-means centroids (faiss), their labels, and inertia."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.cluster import KMeans

from pipeline.ensemble.clustering import inertia, kmeans_centroids, label_centroids, nearest


def blobs(n: int = 3000, d: int = 32, k: int = 12, spread: float = 0.15, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = rng.integers(k, size=n)
    x = centers[labels] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), centers, labels


def test_returns_k_unit_centroids_that_find_the_blobs():
    X, centers, _ = blobs()
    C = kmeans_centroids(X, 12, seed=0, n_iter=20)
    assert C.shape == (12, 32) and C.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(C, axis=1), 1, atol=1e-5)  # spherical
    # nearly every true centre has a centroid close by (faiss's k-means++ is not greedy like
    # scikit-learn's, so one merge of two blobs can happen on a given seed)
    sims, _ = nearest(centers.astype(np.float32), C)
    assert (sims > 0.95).sum() >= 10
    # uniform-random init is what "auto" avoids at small k: it finds fewer blobs here
    random = kmeans_centroids(X, 12, seed=0, n_iter=20, init="random")
    assert (nearest(centers.astype(np.float32), random)[0] > 0.95).sum() < (sims > 0.95).sum()
    assert inertia(X, C) < inertia(X, random)


def test_inertia_close_to_scikit_learn_on_embedding_like_data():
    X, _, _ = blobs(n=4000, d=48, k=60, spread=1.5, seed=9)  # overlapping clusters, like embeddings
    sk = KMeans(40, n_init=1, random_state=0).fit(X)
    euclidean = kmeans_centroids(X, 40, seed=0, n_iter=20, spherical=False)
    assert inertia(X, euclidean) <= 1.1 * sk.inertia_
    spherical = kmeans_centroids(X, 40, seed=0, n_iter=20)
    assert inertia(X, spherical, "cosine") <= 1.1 * inertia(X, sk.cluster_centers_, "cosine")
    # the cosine objective is half the L2 inertia of unit vectors against unit centroids
    assert inertia(X, spherical, "cosine") == pytest.approx(inertia(X, spherical) / 2, rel=1e-4)


def test_euclidean_mode_and_inertia_matches_sklearn_definition():
    X, _, _ = blobs(n=800, seed=1)
    C = kmeans_centroids(X, 5, spherical=False)
    assert not np.allclose(np.linalg.norm(C, axis=1), 1, atol=1e-3)  # means of unit vectors are shorter
    sk = KMeans(5, n_init=1, random_state=0).fit(X)
    expected = float(((X[:, None, :] - sk.cluster_centers_[None]) ** 2).sum(-1).min(1).sum())
    assert inertia(X, sk.cluster_centers_) == pytest.approx(expected, rel=1e-4)
    assert sk.inertia_ == pytest.approx(expected, rel=1e-4)


def test_deterministic_with_seed_and_seed_matters():
    X, _, _ = blobs(n=2000, k=40, spread=0.6, seed=2)
    a = kmeans_centroids(X, 30, seed=7)
    b = kmeans_centroids(X, 30, seed=7)
    c = kmeans_centroids(X, 30, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_k_is_clamped_to_the_number_of_samples(caplog):
    X, _, _ = blobs(n=10, seed=3)
    with caplog.at_level(logging.WARNING):
        C = kmeans_centroids(X, 50)
    assert C.shape == (10, X.shape[1])
    assert "clamping k to 10" in caplog.text
    # each sample is its own centroid
    np.testing.assert_allclose(np.sort(nearest(X, C)[0]), 1, atol=1e-5)


def test_bad_input_is_refused():
    X, _, _ = blobs(n=50, seed=4)
    with pytest.raises(ValueError, match="k must"):
        kmeans_centroids(X, 0)
    bad = X.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="row 7"):
        kmeans_centroids(bad, 3)
    with pytest.raises(ValueError, match="2-D"):
        kmeans_centroids(X[0], 3)


def test_label_centroids_takes_the_target_of_the_nearest_prediction():
    rng = np.random.default_rng(5)
    predictions = rng.standard_normal((500, 16)).astype(np.float32)
    targets = rng.standard_normal((500, 8)).astype(np.float32)  # a different space (p != d) on purpose
    chosen = np.array([3, 141, 499, 0])
    centroids = predictions[chosen] * 2.0 + 1e-3 * rng.standard_normal((4, 16)).astype(np.float32)
    labels, idx = label_centroids(centroids, predictions, targets)
    np.testing.assert_array_equal(idx, chosen)
    np.testing.assert_array_equal(labels, targets[chosen])
    # the same against brute force, for random centroids, in both metrics
    centroids = rng.standard_normal((50, 16)).astype(np.float32)
    pn = predictions / np.linalg.norm(predictions, axis=1, keepdims=True)
    cn = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    _, idx = label_centroids(centroids, predictions, targets)
    np.testing.assert_array_equal(idx, (cn @ pn.T).argmax(1))
    _, idx_l2 = label_centroids(centroids, predictions, targets, metric="l2")
    np.testing.assert_array_equal(idx_l2, ((centroids[:, None] - predictions[None]) ** 2).sum(-1).argmin(1))
    with pytest.raises(ValueError, match="rows"):
        label_centroids(centroids, predictions, targets[:-1])
