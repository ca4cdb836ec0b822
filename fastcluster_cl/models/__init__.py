"""Clustering models: a backbone, an instance projection head and a cluster head.

`build_model(method, ...)` picks the cluster head the method needs (anchor: center head,
cc: softmax head, tcc: TCC head) and `method_loss_inputs` turns the model outputs of the views
into the keyword inputs of `fastcluster_cl.ClusterContrastiveLoss`.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import BACKBONES, RESNETS, DigitCNN, ResNetBackbone, SmallCNN, build_backbone
from .heads import CenterHead, ProjectionHead, SoftmaxClusterHead, TCCHead

METHOD_HEADS = {"anchor": "center", "cc": "softmax", "tcc": "tcc"}


class ClusteringModel(nn.Module):
    """backbone -> h (N, F); projector(h) -> z (N, D); cluster_head(h) -> head outputs.

    forward returns {"h", "z", **head outputs}; `probabilities` gives the (N, K) assignment and
    `predict` its argmax.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_clusters: int,
        head: str = "softmax",
        projection_dim: int = 128,
        hidden_dim: int = 512,
        gumbel_temperature: float = 0.3,
    ):
        super().__init__()
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
        self.backbone = backbone
        feat = backbone.feature_dim
        self.projector = ProjectionHead(feat, hidden_dim, projection_dim)
        if head == "softmax":
            self.cluster_head = SoftmaxClusterHead(feat, num_clusters, hidden_dim)
        elif head == "center":
            self.cluster_head = CenterHead(feat, num_clusters)
        elif head == "tcc":
            # TCC's head works on the instance projection z, not on h
            self.cluster_head = TCCHead(projection_dim, num_clusters, gumbel_temperature)
        else:
            raise ValueError(f"head must be 'softmax', 'center' or 'tcc', got {head!r}")
        self.head = head

    def forward(self, x: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]):
        """One batch -> its outputs; a list of views -> a list of their outputs, each view a
        separate pass through the network, so BatchNorm normalises every view with its own
        batch statistics (as CC and arXiv 2109.12714 do). One call, so DDP sees one forward."""
        if isinstance(x, (list, tuple)):
            return [self._forward(v) for v in x]
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.backbone(x)
        z = self.projector(h)
        if self.head == "center":
            # the anchor objective computes the Student-t assignment from h and the centers
            # inside its fused pass (`probabilities` computes it on demand). The centers leave
            # through the forward (as a view) so that DDP sees them used by it.
            centers = self.cluster_head.centers
            return {"h": h, "z": z, "centers": centers.view_as(centers)}
        return {"h": h, "z": z, **self.cluster_head(z if self.head == "tcc" else h)}

    def probabilities(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.cluster_head.probabilities(out)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.probabilities(self(x)).argmax(1)


def build_model(
    method: str,
    backbone: str,
    num_clusters: int,
    in_channels: int,
    cifar_stem: bool = False,
    projection_dim: int = 128,
    hidden_dim: int = 512,
    gumbel_temperature: float = 0.3,
) -> ClusteringModel:
    """The model for `method` ("anchor", "cc", "tcc") on `backbone` (see BACKBONES)."""
    if method not in METHOD_HEADS:
        raise ValueError(f"method must be one of {tuple(METHOD_HEADS)}, got {method!r}")
    return ClusteringModel(
        build_backbone(backbone, in_channels, cifar_stem),
        num_clusters,
        METHOD_HEADS[method],
        projection_dim,
        hidden_dim,
        gumbel_temperature,
    )


def method_loss_inputs(
    model: ClusteringModel, method: str, out_a: dict, out_b: dict, out_0: dict | None = None
) -> dict[str, torch.Tensor]:
    """Keyword inputs of ClusterContrastiveLoss(method) from the outputs of views a, b and, for
    the anchor method, the clean view 0."""
    if method == "anchor":
        if out_0 is None:
            raise ValueError("the anchor method needs the clean view's outputs (out_0)")
        return {"h0": out_0["h"], "h_a": out_a["h"], "h_b": out_b["h"], "centers": out_0["centers"]}
    if method == "cc":
        return {"logits_a": out_a["logits"], "logits_b": out_b["logits"]}
    if method == "tcc":
        return {
            "logits_a": out_a["logits"],
            "logits_b": out_b["logits"],
            "centers": model.cluster_head.centers,
            "r_a": out_a["r"],
            "r_b": out_b["r"],
        }
    raise ValueError(f"method must be one of {tuple(METHOD_HEADS)}, got {method!r}")


__all__ = [
    "BACKBONES",
    "RESNETS",
    "ResNetBackbone",
    "SmallCNN",
    "DigitCNN",
    "build_backbone",
    "ProjectionHead",
    "SoftmaxClusterHead",
    "CenterHead",
    "TCCHead",
    "ClusteringModel",
    "METHOD_HEADS",
    "build_model",
    "method_loss_inputs",
]
