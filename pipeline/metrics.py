"""The method's arithmetic on embeddings, written once: unit-length rows, cosines, the Kaggle metric, and the
two baselines every figure is compared with (the mean training embedding; k nearest training images)."""

from __future__ import annotations

import numpy as np


def normalise_rows(matrix: np.ndarray, dtype=None) -> np.ndarray:
    """Unit-length rows (last axis; zero rows stay zero), computed in ``dtype`` when given, else the input's."""
    matrix = np.asarray(matrix, dtype=dtype)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=-1, keepdims=True), 1e-12)


def row_cosines(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per row, the cosine of a prediction with its target."""
    return (normalise_rows(predictions) * normalise_rows(targets)).sum(axis=-1)


def mean_cosine(predictions: np.ndarray, targets: np.ndarray) -> float:
    """The paper's and Kaggle's metric: mean row-wise cosine."""
    return float(row_cosines(predictions, targets).mean())


def mean_embedding_baseline(train_targets: np.ndarray, eval_targets: np.ndarray) -> float:
    """Mean cosine of the (normalised) mean training embedding against each evaluation target."""
    mean = normalise_rows(train_targets.mean(axis=0, keepdims=True))
    return mean_cosine(np.broadcast_to(mean, eval_targets.shape), eval_targets)


def knn_baseline(
    train_features: np.ndarray, train_targets: np.ndarray, test_features: np.ndarray, k: int = 5
) -> np.ndarray:
    """Predict each test embedding as the mean target of its k nearest training images (cosine)."""
    from sklearn.neighbors import NearestNeighbors

    k = max(1, min(k, len(train_features)))
    index = NearestNeighbors(n_neighbors=k, metric="cosine").fit(train_features)
    _, neighbours = index.kneighbors(test_features)
    return normalise_rows(train_targets[neighbours].mean(axis=1))
