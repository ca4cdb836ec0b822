"""fastcluster_cl: fused contrastive clustering losses for PyTorch.

Functional losses (`nt_xent`, `nt_xent_bank`, `cc_cluster_loss`, `student_t`, `dec_loss`,
`anchor_loss`), whole objectives (`anchor_objective`, `cc_objective`: one fused pass each way on
the triton and cuda backends; `tcc_loss`) and their nn.Module wrappers, each with backends torch /
chunked / triton / cuda (see `fastcluster_cl.functional`). Metrics live in
`fastcluster_cl.metrics`.
"""

from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

from .functional import (  # noqa: E402
    anchor_loss,
    anchor_objective,
    cc_cluster_loss,
    cc_objective,
    dec_loss,
    nt_xent,
    nt_xent_bank,
    student_t,
    tcc_loss,
)
from .modules import (  # noqa: E402
    AnchorLoss,
    CCClusterLoss,
    ClusterContrastiveLoss,
    DECLoss,
    LossOutput,
    MemoryBank,
    NTXentLoss,
)

__version__ = "0.1.0"
__all__ = [
    "nt_xent",
    "nt_xent_bank",
    "cc_cluster_loss",
    "student_t",
    "dec_loss",
    "anchor_loss",
    "tcc_loss",
    "anchor_objective",
    "cc_objective",
    "NTXentLoss",
    "MemoryBank",
    "CCClusterLoss",
    "DECLoss",
    "AnchorLoss",
    "ClusterContrastiveLoss",
    "LossOutput",
]
