"""Projection and cluster heads.

Every cluster head maps backbone features h (N, F) to a dict of outputs and offers
`probabilities(out)` (N, K), so evaluation and the anchor method treat them alike:
- SoftmaxClusterHead (Contrastive Clustering): an MLP to K logits, q = softmax.
- CenterHead (arXiv 2109.12714): learnable centers in feature space, initialised by k-means,
  Student-t assignment.
- TCCHead (You Never Cluster Alone): cosine logits of the normalised instance projection to K
  learnable cluster embeddings, and the instance residual of TCC's cluster-conditioned
  embedding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..backends.numerics import accumulation_dtype
from ..functional import student_t


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear - ReLU - Linear, the shape of CC's instance and cluster projectors."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


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


def _read_old_spelling(module, state_dict, prefix, *args) -> None:
    """State dicts written by version 0.1.0 name the parameter `centres`: read it as `centers`, so
    that their checkpoints still load."""
    old = prefix + "centres"
    if old in state_dict:
        state_dict[prefix + "centers"] = state_dict.pop(old)


class CenterHead(nn.Module):
    """Deep embedding cluster center predictor of arXiv 2109.12714.

    K learnable centers mu (K, F) in the backbone's feature space; q_ik is the Student-t kernel
    (1 + ||h_i - mu_k||^2 / alpha)^(-(alpha+1)/2), normalised over k. `init_centers` sets mu by
    k-means on features of the (untrained or warmed-up) network; until then `initialised` is
    False and the trainer calls it before the first step.
    """

    def __init__(self, in_dim: int, num_clusters: int, alpha: float = 1.0):
        super().__init__()
        self.num_clusters = num_clusters
        self.alpha = alpha
        self.centers = nn.Parameter(torch.zeros(num_clusters, in_dim))
        self.register_buffer("initialised", torch.tensor(False))
        self.register_load_state_dict_pre_hook(_read_old_spelling)

    @torch.no_grad()
    def init_centers(self, features: np.ndarray | torch.Tensor, seed: int = 0) -> None:
        """k-means (k-means++, 10 restarts, scikit-learn) on `features` (M, F), M >= K."""
        from sklearn.cluster import KMeans

        features = np.asarray(torch.as_tensor(features).float().cpu())
        if features.shape[0] < self.num_clusters:
            raise ValueError(
                f"k-means needs at least {self.num_clusters} feature rows, got {features.shape[0]}"
            )
        km = KMeans(n_clusters=self.num_clusters, n_init=10, random_state=seed).fit(features)
        self.centers.copy_(torch.as_tensor(km.cluster_centers_, dtype=self.centers.dtype))
        self.initialised.fill_(True)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        # Under autocast h may be bf16 while the centers stay fp32: student_t takes that pair
        # (computed in fp32, on the tensor cores on Triton), the objective's way.
        centers = self.centers.to(accumulation_dtype(h.dtype))
        return {"q": student_t(h, centers, self.alpha)}

    def probabilities(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """q from the head's outputs, or from the features h of a model's outputs (training
        computes the assignment inside the loss, `fastcluster_cl.anchor_objective`)."""
        return out["q"] if "q" in out else self(out["h"])["q"]


def max_separated(num: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`num` unit vectors in R^dim with pairwise cosine -1/(num-1) (the vertices of a regular
    simplex, the Max-Mahalanobis centers of TCC's prototype), randomly rotated; needs
    dim >= num - 1. With fewer dimensions: `num` random orthonormal-as-possible unit vectors
    (nn.init.orthogonal_)."""
    if dim < num - 1:
        w = torch.empty(num, dim)
        nn.init.orthogonal_(w, generator=generator)
        return nn.functional.normalize(w, dim=1)
    simplex = torch.eye(num) - 1.0 / num  # centered basis: rank num - 1
    u, _, _ = torch.linalg.svd(simplex)  # its (num - 1)-dim span
    coords = simplex @ u[:, : num - 1]  # (num, num - 1)
    basis = torch.empty(dim, num - 1)
    nn.init.orthogonal_(basis, generator=generator)  # random isometric embedding
    return nn.functional.normalize(coords @ basis.T, dim=1)


class TCCHead(nn.Module):
    """TCC's assignment head on the normalised instance projection v = normalise(z) (D):
    K learnable cluster embeddings C (K, D), maximally separated at initialisation; logits
    l_ik = v_i . normalise(C_k) (cosine, in [-1, 1]); q = softmax(l / lambda) with lambda the
    Gumbel temperature. Also the instance residual r = W v (one linear layer) of TCC's
    cluster-conditioned embedding normalise(normalise(pi C) + alpha normalise(r)).
    Provenance of each choice: docs/methods.md."""

    def __init__(self, dim: int, num_clusters: int, temperature: float = 0.3):
        super().__init__()
        self.num_clusters = num_clusters
        self.temperature = temperature
        self.centers = nn.Parameter(max_separated(num_clusters, dim))
        self.residual = nn.Linear(dim, dim)
        self.register_load_state_dict_pre_hook(_read_old_spelling)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        v = nn.functional.normalize(z.float(), dim=1)
        c = nn.functional.normalize(self.centers.float(), dim=1)
        return {"logits": v @ c.T, "r": self.residual(v)}

    def probabilities(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.softmax(out["logits"].float() / self.temperature, dim=1)
