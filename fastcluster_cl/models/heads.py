"""Projection and cluster heads.

Every cluster head maps backbone features h (N, F) to a dict of outputs and offers
`probabilities(out)` (N, K), so evaluation and the anchor method treat them alike:
- SoftmaxClusterHead (Contrastive Clustering): an MLP to K logits, q = softmax.
- CentreHead (arXiv 2109.12714): learnable centres in feature space, initialised by k-means,
  Student-t assignment.
- TCCHead (You Never Cluster Alone): the softmax head's logits plus a representation MLP whose
  outputs are pooled into the cluster representations of TCC's cluster-level loss.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..functional import student_t


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear - ReLU - Linear, the shape of CC's instance and cluster projectors."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class ProjectionHead(nn.Module):
    """Instance projection for NT-Xent: F -> hidden (512) -> out (128), as in CC."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128):
        super().__init__()
        self.net = mlp(in_dim, hidden_dim, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class SoftmaxClusterHead(nn.Module):
    """CC's cluster projector: F -> hidden -> K logits; probabilities by softmax."""

    def __init__(self, in_dim: int, num_clusters: int, hidden_dim: int = 512):
        super().__init__()
        self.num_clusters = num_clusters
        self.net = mlp(in_dim, hidden_dim, num_clusters)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(h)}

    def probabilities(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.softmax(out["logits"].float(), dim=1)


class CentreHead(nn.Module):
    """Deep embedding cluster centre predictor of arXiv 2109.12714.

    K learnable centres mu (K, F) in the backbone's feature space; q_ik is the Student-t kernel
    (1 + ||h_i - mu_k||^2 / alpha)^(-(alpha+1)/2), normalised over k. `init_centres` sets mu by
    k-means on features of the (untrained or warmed-up) network; until then `initialised` is
    False and the trainer calls it before the first step.
    """

    def __init__(self, in_dim: int, num_clusters: int, alpha: float = 1.0):
        super().__init__()
        self.num_clusters = num_clusters
        self.alpha = alpha
        self.centres = nn.Parameter(torch.zeros(num_clusters, in_dim))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def init_centres(self, features: np.ndarray | torch.Tensor, seed: int = 0) -> None:
        """k-means (k-means++, 10 restarts, scikit-learn) on `features` (M, F), M >= K."""
        from sklearn.cluster import KMeans

        features = np.asarray(torch.as_tensor(features).float().cpu())
        if features.shape[0] < self.num_clusters:
            raise ValueError(f"k-means needs at least {self.num_clusters} feature rows, got "
                             f"{features.shape[0]}")
        km = KMeans(n_clusters=self.num_clusters, n_init=10, random_state=seed).fit(features)
        self.centres.copy_(torch.as_tensor(km.cluster_centers_, dtype=self.centres.dtype))
        self.initialised.fill_(True)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        # Student-t in fp32: under autocast h may be bf16 while the centres stay fp32.
        return {"q": student_t(h.float(), self.centres.float(), self.alpha)}

    def probabilities(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return out["q"]


class TCCHead(SoftmaxClusterHead):
    """TCC: softmax cluster logits plus representations r (N, rep_dim) that the loss pools into
    cluster representations s_k = normalise(sum_i y_ik r_i)."""

    def __init__(self, in_dim: int, num_clusters: int, hidden_dim: int = 512,
                 rep_dim: int = 128):
        super().__init__(in_dim, num_clusters, hidden_dim)
        self.representation = mlp(in_dim, hidden_dim, rep_dim)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(h), "r": self.representation(h)}
