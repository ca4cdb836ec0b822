"""nn.Module wrappers of the functional losses: they hold hyper-parameters, validate them at
construction, and call `fastcluster_cl.functional`."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import functional as FL
from .losses.dispatch import BACKENDS
from .validation import check_gather_distributed, check_positive, check_reduction


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class NTXentLoss(nn.Module):
    """NT-Xent instance loss (SimCLR; CC's instance loss). See `fastcluster_cl.nt_xent`.

    Attributes:
        temperature: tau > 0. backend, gather_distributed, reduction ("none": the 2N per-row
        terms): see `fastcluster_cl.functional`.
    Raises:
        ValueError: temperature <= 0, unknown backend or reduction, gather_distributed without
        torch.distributed (here); bad shapes or NaN (in forward).

    Example:
        >>> loss = NTXentLoss(temperature=0.5)(torch.randn(8, 16), torch.randn(8, 16))
    """

    def __init__(self, temperature: float = 0.5, backend: str = "auto",
                 gather_distributed: bool = False, reduction: str = "mean"):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.backend = _check_backend(backend)
        self.gather_distributed = check_gather_distributed(gather_distributed)
        self.reduction = check_reduction(reduction)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """z_a, z_b: (N, D) projections of the two views. Returns the loss (see reduction)."""
        return FL.nt_xent(z_a, z_b, self.temperature, backend=self.backend,
                          gather_distributed=self.gather_distributed, reduction=self.reduction)


class CCClusterLoss(nn.Module):
    """Contrastive Clustering's cluster-level loss. See `fastcluster_cl.cc_cluster_loss`
    (reduction "none": the 2K per-column terms; from_probs: the inputs are probabilities).

    Example:
        >>> loss = CCClusterLoss()(torch.randn(8, 10), torch.randn(8, 10))
    """

    def __init__(self, temperature: float = 1.0, backend: str = "auto",
                 gather_distributed: bool = False, reduction: str = "mean",
                 from_probs: bool = False):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.backend = _check_backend(backend)
        self.gather_distributed = check_gather_distributed(gather_distributed)
        self.reduction = check_reduction(reduction)
        self.from_probs = bool(from_probs)

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        """logits_a, logits_b: (N, K) cluster logits (probabilities with from_probs)."""
        return FL.cc_cluster_loss(logits_a, logits_b, self.temperature, backend=self.backend,
                                  gather_distributed=self.gather_distributed,
                                  reduction=self.reduction, from_probs=self.from_probs)


class DECLoss(nn.Module):
    """DEC KL loss against the batch's sharpened target. See `fastcluster_cl.dec_loss`
    (reduction "none": the N per-row terms)."""

    def __init__(self, backend: str = "auto", gather_distributed: bool = False,
                 reduction: str = "mean"):
        super().__init__()
        self.backend = _check_backend(backend)
        self.gather_distributed = check_gather_distributed(gather_distributed)
        self.reduction = check_reduction(reduction)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q: (N, K) probabilities. Returns the loss (see reduction)."""
        return FL.dec_loss(q, backend=self.backend, gather_distributed=self.gather_distributed,
                           reduction=self.reduction)


class AnchorLoss(nn.Module):
    """Anchor loss of arXiv 2109.12714. See `fastcluster_cl.anchor_loss` (reduction "none":
    the N per-row terms)."""

    def __init__(self, backend: str = "auto", reduction: str = "mean"):
        super().__init__()
        self.backend = _check_backend(backend)
        self.reduction = check_reduction(reduction)

    def forward(self, q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
        """q0, q_a, q_b: (N, K) probabilities of the clean and augmented views."""
        return FL.anchor_loss(q0, q_a, q_b, backend=self.backend, reduction=self.reduction)


class LossOutput(NamedTuple):
    """The weighted total and each unweighted part, keyed by name."""
    total: torch.Tensor
    parts: dict[str, torch.Tensor]


_METHOD_INPUTS = {
    "anchor": ("q0", "q_a", "q_b"),
    "cc": ("logits_a", "logits_b"),
    "tcc": ("logits_a", "logits_b", "centres", "r_a", "r_b"),
}


_WEIGHTS = ("instance", "cluster", "anchor", "prior", "feature")


class ClusterContrastiveLoss(nn.Module):
    """The whole objective of one method: instance NT-Xent plus its clustering terms.

    Methods (DESIGN.md, "The objective"):
        "anchor": arXiv 2109.12714, L_ins + w_clu * DEC KL(q0) + w_anc * anchor(q0, qa, qb);
                  needs q0, q_a, q_b (e.g. from `fastcluster_cl.student_t`).
        "cc":     Contrastive Clustering, L_ins + w_clu * cc_cluster_loss; needs logits_a/b.
        "tcc":    You Never Cluster Alone (`fastcluster_cl.functional.tcc_loss`): w_ins * the
                  instance NT-Xent over the cluster-conditioned embeddings + w_clu * the
                  NT-Xent over the 2K pooled cluster rows + w_prior * the prior term, plus
                  w_feature * plain NT-Xent on z (default weight 0); needs logits_a/b (cosine),
                  centres (K, D), r_a/b (N, D).

    Attributes:
        method, instance_temperature (0.5), cluster_temperature (1.0), weights (dict of part
        weights: "instance", "cluster", "anchor", and for tcc "prior" (1) and "feature" (0)),
        gumbel_tau (tcc's lambda, 0.3), tcc_prior ("kl" | "marginal"), backend,
        gather_distributed (every term over the batch of all ranks; the anchor loss is per row
        and needs no communication), reduction: applied to every part ("none": each part holds
        its per-term values, see `fastcluster_cl.functional`, and total is the weighted sum of
        their means, the "mean" total).
    Raises:
        ValueError: unknown method, backend or reduction, temperature <= 0, negative weight,
        gather_distributed without torch.distributed (here);
        a missing input for the method, bad shapes, NaN (in forward).

    Example:
        >>> crit = ClusterContrastiveLoss("cc")
        >>> out = crit(z_a, z_b, logits_a=c_a, logits_b=c_b)
        >>> out.total.backward(); out.parts["instance"], out.parts["cluster"]
    """

    def __init__(self, method: str = "anchor", instance_temperature: float = 0.5,
                 cluster_temperature: float = 1.0, weights: dict[str, float] | None = None,
                 gumbel_tau: float = 0.3, backend: str = "auto",
                 gather_distributed: bool = False, reduction: str = "mean",
                 tcc_prior: str = "kl"):
        super().__init__()
        if method not in _METHOD_INPUTS:
            raise ValueError(f"method must be one of {tuple(_METHOD_INPUTS)}, got {method!r}")
        self.method = method
        self.instance_temperature = check_positive("instance_temperature", instance_temperature)
        self.cluster_temperature = check_positive("cluster_temperature", cluster_temperature)
        self.gumbel_tau = check_positive("gumbel_tau", gumbel_tau)
        self.weights = {"instance": 1.0, "cluster": 1.0, "anchor": 1.0, "prior": 1.0,
                        "feature": 0.0, **(weights or {})}
        for name, w in self.weights.items():
            if name not in _WEIGHTS or not w >= 0:
                raise ValueError(f"weights takes {_WEIGHTS} >= 0, got {name}={w}")
        if tcc_prior not in FL.TCC_PRIORS:
            raise ValueError(f"tcc_prior must be one of {FL.TCC_PRIORS}, got {tcc_prior!r}")
        self.tcc_prior = tcc_prior
        self.backend = _check_backend(backend)
        self.gather_distributed = check_gather_distributed(gather_distributed)
        self.reduction = check_reduction(reduction)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, **inputs: torch.Tensor) -> LossOutput:
        """z_a, z_b: (N, D) projections. Keyword inputs by method: anchor: q0, q_a, q_b (N, K)
        probabilities; cc: logits_a, logits_b (N, K); tcc: logits_a, logits_b (N, K) cosine
        logits, centres (K, D), r_a, r_b (N, D) (`fastcluster_cl.models.TCCHead`)."""
        needed = _METHOD_INPUTS[self.method]
        missing = [name for name in needed if inputs.get(name) is None]
        extra = sorted(set(inputs) - set(needed))
        if missing or extra:
            raise TypeError(f"method {self.method!r} takes {needed}; missing {missing}, "
                            f"unexpected {extra}")
        common = dict(backend=self.backend, gather_distributed=self.gather_distributed,
                      reduction=self.reduction)
        if self.method == "tcc":
            parts = FL.tcc_loss(z_a, z_b, inputs["logits_a"], inputs["logits_b"],
                                inputs["centres"], inputs["r_a"], inputs["r_b"],
                                instance_temperature=self.instance_temperature,
                                cluster_temperature=self.cluster_temperature,
                                gumbel_temperature=self.gumbel_tau, prior=self.tcc_prior,
                                **common)
            if self.weights["feature"] > 0:
                parts["feature"] = FL.nt_xent(z_a, z_b, self.instance_temperature, **common)
            parts = dict(parts)
        else:
            parts = {"instance": FL.nt_xent(z_a, z_b, self.instance_temperature, **common)}
        if self.method == "anchor":
            parts["cluster"], parts["anchor"] = FL.dec_anchor_losses(
                inputs["q0"], inputs["q_a"], inputs["q_b"], **common)
        elif self.method == "cc":
            parts["cluster"] = FL.cc_cluster_loss(inputs["logits_a"], inputs["logits_b"],
                                                  self.cluster_temperature, **common)
        total = sum(self.weights[name] * (value.mean() if self.reduction == "none" else value)
                    for name, value in parts.items())
        return LossOutput(total, parts)
