"""PNG plots of a finished run (matplotlib, Agg backend): loss curves, the confusion matrix of
the cluster head against the labels (clusters reordered by the Hungarian match), and a 2-D
embedding (t-SNE) of the features coloured by predicted cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(steps: list[dict], path: str | Path) -> Path:
    """Total loss and each part against the step, from the "step" records of log.jsonl."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["step"] for r in steps]
    parts = sorted({k for r in steps for k in r if k.startswith("loss_")})
    for key in ["loss"] + parts:  # parts absent in some steps (center warmup) plot as gaps
        ax.plot(x, [r.get(key, float("nan")) for r in steps], label=key, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Counts (classes x clusters) with the clusters' columns in Hungarian-matched order."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import confusion_matrix

    classes, clusters = np.unique(y_true), np.unique(y_pred)
    labels = np.union1d(classes, clusters)
    counts = confusion_matrix(y_true, y_pred, labels=labels)[np.searchsorted(labels, classes)]
    rows, cols = linear_sum_assignment(counts, maximize=True)
    order = list(cols[np.argsort(rows)]) + [c for c in range(counts.shape[1]) if c not in cols]
    return counts[:, order]


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, path: str | Path) -> Path:
    plt = _pyplot()
    counts = confusion(y_true, y_pred)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(counts, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set_xlabel("cluster (matched order)")
    ax.set_ylabel("class")
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_embedding(
    features: np.ndarray,
    y_pred: np.ndarray,
    path: str | Path,
    max_points: int = 2000,
    seed: int = 0,
) -> Path:
    """t-SNE of up to `max_points` feature rows (a random subset), coloured by cluster."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(features))[:max_points]
    x = np.asarray(features, dtype=np.float32)[idx]
    perplexity = float(min(30, max(2, (len(x) - 1) / 3)))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        x
    )
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(emb[:, 0], emb[:, 1], c=y_pred[idx], cmap="tab20", s=4)
    ax.set_title("t-SNE of features, coloured by cluster")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
