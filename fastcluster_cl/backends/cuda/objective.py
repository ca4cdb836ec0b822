"""The one-pass anchor and CC objectives on the CUDA twin (csrc/objective.cu)."""

from __future__ import annotations

import torch

from ..autograd.pairs import register_pair
from . import build

# ---- One-pass fused objectives (csrc/objective.cu) --------------------------------------------
# reference.anchor_objective / cc_objective in one row-parallel kernel plus a one-block
# epilogue (forward) and one row kernel plus one small kernel (backward). The forward ops return
# the result and the fp32 state the backward reads, never an N x K matrix (the backward
# recomputes the assignments): rows (5, 2N) = per row of [z_a; z_b] its inverse scaled norm,
# norm, lse, loss and power-of-two scale; anchor: assign (7, N) = the Student-t lse of h0, h_a,
# h_b per row, DEC's row totals T = sum_k q0^2 / f and c_dec = sum_k p [q0 >= tiny], c_a and
# c_b = sum_k q0 [q_v >= tiny] (the clamped log's exact gradient), and the column sums f (K,) of
# q0; cc: row_lse (2, N) = the softmax lse of each view's row, the 2K x 2K Gram of the columns
# and (3, 2K) = each column's lse, loss and sum (K at most CC_MAX_CLUSTERS). The incoming
# gradient and the weights are folded in the backward kernels; centers enter in fp32 (the
# cast's autograd brings their gradient back to their dtype).
CC_MAX_CLUSTERS = 64  # FCL_CC_MAX_CLUSTERS of csrc/fcl_kernels.h


@torch.library.custom_op("fastcluster_cl::anchor_objective_cuda_fwd", mutates_args=())
def anchor_objective_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    h0: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    centers: torch.Tensor,
    inv_tau: float,
    alpha: float,
    w_instance: float,
    w_cluster: float,
    w_anchor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (4,) = [total, instance, DEC, anchor], rows, assign, f); centers float32."""
    out, rows, assign, f = build.extension().anchor_objective_forward(
        z_a, z_b, h0, h_a, h_b, centers, inv_tau, alpha, w_instance, w_cluster, w_anchor
    )
    return out, rows, assign, f


@anchor_objective_forward.register_fake
def _(z_a, z_b, h0, h_a, h_b, centers, inv_tau, alpha, w_instance, w_cluster, w_anchor):
    (n, _), k, f32 = z_a.shape, centers.shape[0], torch.float32
    return (
        z_a.new_empty(4, dtype=f32),
        z_a.new_empty(5, 2 * n, dtype=f32),
        z_a.new_empty(7, n, dtype=f32),
        z_a.new_empty(k, dtype=f32),
    )


@torch.library.custom_op("fastcluster_cl::anchor_objective_cuda_bwd", mutates_args=())
def anchor_objective_backward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    h0: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    centers: torch.Tensor,
    rows: torch.Tensor,
    assign: torch.Tensor,
    f: torch.Tensor,
    grad: torch.Tensor,
    inv_tau: float,
    alpha: float,
    w_instance: float,
    w_cluster: float,
    w_anchor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz_a, dz_b, dh0, dh_a, dh_b, dcenters) from dL/dout (4,)."""
    grads = build.extension().anchor_objective_backward(
        z_a,
        z_b,
        h0,
        h_a,
        h_b,
        centers,
        rows,
        assign,
        f,
        grad.float().contiguous(),
        inv_tau,
        alpha,
        w_instance,
        w_cluster,
        w_anchor,
    )
    return tuple(grads)


@anchor_objective_backward.register_fake
def _(
    z_a,
    z_b,
    h0,
    h_a,
    h_b,
    centers,
    rows,
    assign,
    f,
    grad,
    inv_tau,
    alpha,
    w_instance,
    w_cluster,
    w_anchor,
):
    return tuple(torch.empty_like(t) for t in (z_a, z_b, h0, h_a, h_b, centers))


@torch.library.custom_op("fastcluster_cl::cc_objective_cuda_fwd", mutates_args=())
def cc_objective_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    inv_tau: float,
    inv_tau_c: float,
    w_instance: float,
    w_cluster: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (3,) = [total, instance, cluster], rows, row_lse, gram, cluster_rows)."""
    out, rows, row_lse, gram, cluster_rows = build.extension().cc_objective_forward(
        z_a, z_b, logits_a, logits_b, inv_tau, inv_tau_c, w_instance, w_cluster
    )
    return out, rows, row_lse, gram, cluster_rows


@cc_objective_forward.register_fake
def _(z_a, z_b, logits_a, logits_b, inv_tau, inv_tau_c, w_instance, w_cluster):
    (n, _), k, f32 = z_a.shape, logits_a.shape[1], torch.float32
    return (
        z_a.new_empty(3, dtype=f32),
        z_a.new_empty(5, 2 * n, dtype=f32),
        z_a.new_empty(2, n, dtype=f32),
        z_a.new_empty(2 * k, 2 * k, dtype=f32),
        z_a.new_empty(3, 2 * k, dtype=f32),
    )


@torch.library.custom_op("fastcluster_cl::cc_objective_cuda_bwd", mutates_args=())
def cc_objective_backward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    rows: torch.Tensor,
    row_lse: torch.Tensor,
    gram: torch.Tensor,
    cluster_rows: torch.Tensor,
    grad: torch.Tensor,
    inv_tau: float,
    inv_tau_c: float,
    w_instance: float,
    w_cluster: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz_a, dz_b, dlogits_a, dlogits_b) from dL/dout (3,)."""
    grads = build.extension().cc_objective_backward(
        z_a,
        z_b,
        logits_a,
        logits_b,
        rows,
        row_lse,
        gram,
        cluster_rows,
        grad.float().contiguous(),
        inv_tau,
        inv_tau_c,
        w_instance,
        w_cluster,
    )
    return tuple(grads)


@cc_objective_backward.register_fake
def _(
    z_a,
    z_b,
    logits_a,
    logits_b,
    rows,
    row_lse,
    gram,
    cluster_rows,
    grad,
    inv_tau,
    inv_tau_c,
    w_instance,
    w_cluster,
):
    return tuple(torch.empty_like(t) for t in (z_a, z_b, logits_a, logits_b))


register_pair(
    anchor_objective_forward,
    anchor_objective_backward,
    "cuda",
    lambda inputs, outputs, grads: (*inputs[:6], *outputs[1:], grads[0], *inputs[6:]),
    wrt=range(6),
)
register_pair(
    cc_objective_forward,
    cc_objective_backward,
    "cuda",
    lambda inputs, outputs, grads: (*inputs[:4], *outputs[1:], grads[0], *inputs[4:]),
    wrt=range(4),
)


def _weights(weights, count: int) -> tuple[float, ...]:
    weights = tuple(float(w) for w in weights)
    if len(weights) != count:
        raise ValueError(f"weights must hold {count} numbers, got {weights}")
    return weights


def _check_rows(name: str, t: torch.Tensor, z: torch.Tensor) -> None:
    if t.dim() != 2 or t.shape[0] != z.shape[0] or t.device != z.device:
        raise ValueError(
            f"{name} must be (N, *) on {z.device} with N = {z.shape[0]} (the rows "
            f"of z_a), got {tuple(t.shape)} on {t.device}"
        )


def anchor_objective(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    h0: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    centers: torch.Tensor,
    temperature: float,
    alpha: float,
    weights: tuple[float, float, float],
) -> torch.Tensor:
    """`reference.anchor_objective` in one fused forward and backward: float32 (4,) =
    [total, instance, cluster (DEC on q0), anchor]; differentiable w.r.t. z, h and centers."""
    build.check_inputs(("z_a", "z_b"), (z_a, z_b))
    build.check_inputs(("h0", "h_a", "h_b"), (h0, h_a, h_b))
    _check_rows("h0", h0, z_a)
    if (
        centers.dtype not in build.DTYPES
        or centers.device != h0.device
        or centers.dim() != 2
        or centers.shape[1] != h0.shape[1]
    ):
        raise ValueError(
            f"centers must be (K, {h0.shape[1]}) float32/float16/bfloat16 on "
            f"{h0.device}, got {tuple(centers.shape)} {centers.dtype} "
            f"{centers.device}"
        )
    return anchor_objective_forward(
        z_a.contiguous(),
        z_b.contiguous(),
        h0.contiguous(),
        h_a.contiguous(),
        h_b.contiguous(),
        centers.float().contiguous(),
        1.0 / float(temperature),
        float(alpha),
        *_weights(weights, 3),
    )[0]


def cc_objective_fits(
    z_a: torch.Tensor, z_b: torch.Tensor, logits_a: torch.Tensor, logits_b: torch.Tensor
) -> bool:
    """Whether the one-pass kernels take these inputs (K <= CC_MAX_CLUSTERS); the public
    `cc_objective` runs the separate ops (CUDA NT-Xent on the 2K columns) for the others."""
    return logits_a.shape[1] <= CC_MAX_CLUSTERS


def cc_objective(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    instance_temperature: float,
    cluster_temperature: float,
    weights: tuple[float, float],
) -> torch.Tensor:
    """`reference.cc_objective` in one fused forward and backward: float32 (3,) =
    [total, instance, cluster]; differentiable w.r.t. z and the logits."""
    build.check_inputs(("z_a", "z_b"), (z_a, z_b))
    build.check_inputs(("logits_a", "logits_b"), (logits_a, logits_b))
    _check_rows("logits_a", logits_a, z_a)
    if logits_a.shape[1] > CC_MAX_CLUSTERS:
        raise ValueError(
            f"backend='cuda' fuses the cc objective for at most {CC_MAX_CLUSTERS} "
            f"clusters, got K = {logits_a.shape[1]}; fc.cc_objective runs the separate ops "
            "beyond"
        )
    return cc_objective_forward(
        z_a.contiguous(),
        z_b.contiguous(),
        logits_a.contiguous(),
        logits_b.contiguous(),
        1.0 / float(instance_temperature),
        1.0 / float(cluster_temperature),
        *_weights(weights, 2),
    )[0]
