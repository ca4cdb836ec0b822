"""Evaluation: the features and cluster-head predictions of every clean image, their NMI / ACC /
ARI against the labels, and k-means on the features beside them."""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch

from ..metrics import cluster_metrics, kmeans_metrics
from .runtime import model_input


@torch.no_grad()
def extract_features(
    model, loader, device: torch.device, amp_dtype: torch.dtype | None, train_mode: bool = False
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(features h, cluster-head predictions, labels) of every clean image of `loader`, in
    dataset order; no predictions while the centers await their initialisation. train_mode:
    BatchNorm on batch statistics, as the loss sees them (its running statistics are restored
    afterwards)."""
    buffers = copy.deepcopy(dict(model.named_buffers())) if train_mode else None
    model.train(train_mode)
    feats, preds, labels, index = [], [], [], []
    try:
        for batch in loader:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(model_input(batch, ("clean",), device))
                if bool(getattr(model.cluster_head, "initialised", True)):
                    preds.append(model.probabilities(out).argmax(1).cpu())
            feats.append(out["h"].float().cpu())
            labels.append(torch.as_tensor(batch["label"]).cpu())
            index.append(torch.as_tensor(batch["index"]).cpu())
    finally:
        model.train()
        if buffers is not None:  # train-mode BN updated its running stats: undo that
            for name, buf in model.named_buffers():
                buf.copy_(buffers[name])
    order = torch.argsort(torch.cat(index)).numpy()  # back to dataset order
    pred = torch.cat(preds).numpy()[order] if preds else None
    return torch.cat(feats).numpy()[order], pred, torch.cat(labels).numpy()[order]


def evaluate(
    model, loader, device: torch.device, amp_dtype: torch.dtype | None, num_clusters: int, seed: int
) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None, np.ndarray]:
    """(metrics, features, predictions, labels): the cluster head's nmi / acc / ari and
    k-means on the features, raw and L2-normalised. Unlabelled images (label -1, STL-10's
    extra split) are not scored."""
    start = time.perf_counter()
    feats, pred, labels = extract_features(model, loader, device, amp_dtype)
    known = labels >= 0
    head = cluster_metrics(labels[known], pred[known]) if pred is not None else {}
    metrics = {
        **head,
        "kmeans": kmeans_metrics(feats[known], labels[known], num_clusters, seed=seed),
        # k-means on L2-normalised features: the cosine geometry the contrastive losses train
        # (less prone to merging clusters than raw features)
        "kmeans_l2": kmeans_metrics(_l2_rows(feats[known]), labels[known], num_clusters, seed=seed),
        "eval_seconds": time.perf_counter() - start,
    }
    return metrics, feats, pred, labels


def _l2_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def flat(metrics: dict[str, Any]) -> dict[str, Any]:
    """{"kmeans": {"nmi": x}} -> {"kmeans_nmi": x}, for JSONL records and TensorBoard tags."""
    flat = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            flat.update({f"{k}_{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat
