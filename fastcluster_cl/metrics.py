"""Clustering metrics with the field's protocol: ACC by Hungarian matching
(scipy's linear_sum_assignment), NMI with scikit-learn's default arithmetic normalisation, ARI
from scikit-learn, and k-means on features (scikit-learn) as a baseline evaluation."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def _labels(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("cannot score an empty labelling")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.issubdtype(y.dtype, np.integer):
            raise TypeError(f"{name} must hold integer labels, got {y.dtype}")
    return y_true, y_pred


def nmi(y_true, y_pred) -> float:
    """Normalised mutual information (arithmetic normalisation), in [0, 1]."""
    return float(normalized_mutual_info_score(*_labels(y_true, y_pred)))


def ari(y_true, y_pred) -> float:
    """Adjusted Rand index, 1 for identical partitions, about 0 for random ones."""
    return float(adjusted_rand_score(*_labels(y_true, y_pred)))


def acc(y_true, y_pred) -> float:
    """Clustering accuracy: the best one-to-one map of clusters to classes (Hungarian)."""
    y_true, y_pred = _labels(y_true, y_pred)
    _, true_ids = np.unique(y_true, return_inverse=True)
    _, pred_ids = np.unique(y_pred, return_inverse=True)
    counts = np.zeros((pred_ids.max() + 1, true_ids.max() + 1), dtype=np.int64)
    np.add.at(counts, (pred_ids, true_ids), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / y_true.size)


def cluster_metrics(y_true, y_pred) -> dict[str, float]:
    """{"nmi", "acc", "ari"} of a predicted clustering."""
    return {"nmi": nmi(y_true, y_pred), "acc": acc(y_true, y_pred), "ari": ari(y_true, y_pred)}


def kmeans_metrics(features, y_true, n_clusters: int, seed: int = 0) -> dict[str, float]:
    """Run k-means (k-means++, 10 restarts) on `features` (N, F) and score it against y_true."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] != np.asarray(y_true).size:
        raise ValueError(f"features must be (N, F) with N = len(y_true), got {features.shape}")
    if not 2 <= n_clusters <= features.shape[0]:
        raise ValueError(f"n_clusters must be in [2, N={features.shape[0]}], got {n_clusters}")
    pred = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(features)
    return cluster_metrics(y_true, pred)
