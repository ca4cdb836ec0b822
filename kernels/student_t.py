"""Student-t soft assignment (DEC / arXiv 2109.12714 center head) in Triton.

q_ik = softmax_k( -(alpha+1)/2 * log(1 + d_ik / alpha) ),  d_ik = ||h_i - mu_k||^2, computed as
||h_i||^2 - 2 h_i . mu_k + ||mu_k||^2 (clamped at 0) so the cross term is a tensor-core dot.

Forward (`_fwd_kernel`, row-parallel): each program takes BLOCK_M rows and walks the centers in
tiles of BLOCK_K (`_BLOCK_K`, at most 64), so its registers and shared memory do not grow with
K: for each tile it builds the (BLOCK_M, BLOCK_K) distances (F in chunks of BLOCK_F, at most
32), writes the logits into q and updates the row max and rescaled sum of exp (online softmax);
a second pass over its own rows of q turns the logits into probabilities. Backward
(`_bwd_kernel`, row-parallel, no atomics) starts from the saved q: one pass over the K tiles
takes sum_k q dq, a second recomputes each tile's distances and writes g = dL/dd (N x K).
dh = 2 (rowsum(g) h - g mu) and dmu = -2 (g^T h - colsum(g) mu) are cuBLAS GEMMs on the host,
which keeps them deterministic and the kernel free of an (N x F) accumulator.

Floors (N rows, K centers, F features, b bytes): forward 2 N K F FLOPs, N K logs/exps, reads
N F b ceil(K / BLOCK_K) (h once per center tile, L2-resident after the first) + P K F b
(P programs; the centers are L2-resident), writes N K acc floats twice and reads them once;
backward 2 N K F FLOPs in the kernel + 4 N K F in the host GEMMs, reads q and dq twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcluster_cl.backends.autograd.pairs import register_pair

from ._common import (
    acc_dtype,
    check_dtype,
    device_guard,
    dot,
    dot_precision,
    float_param,
    split_floats,
    torch_acc_dtype,
    upcast_dots,
)

MAX_CENTERS = 1024
_BLOCK_M = 32
_BLOCK_K = 64  # centers per tile: every K up to MAX_CENTERS runs in ceil(K / 64) tiles
_BLOCK_F = 32  # features per chunk of the distance dot


@triton.jit
def _distances(
    H,
    MU,
    stride_h,
    stride_mu,
    offs_m,
    mask_m,
    offs_k,
    mask_k,
    F,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """(BLOCK_M, BLOCK_K) squared distances ||h_i - mu_k||^2 for one tile of centers,
    accumulated over F chunks."""
    cross = tl.zeros([BLOCK_M, BLOCK_K], ACC)
    hh = tl.zeros([BLOCK_M], ACC)
    mm = tl.zeros([BLOCK_K], ACC)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        h = tl.load(
            H + offs_m[:, None] * stride_h + offs_f[None, :],
            mask=mask_m[:, None] & mask_f[None, :],
            other=0.0,
        )
        mu = tl.load(
            MU + offs_k[:, None] * stride_mu + offs_f[None, :],
            mask=mask_k[:, None] & mask_f[None, :],
            other=0.0,
        )
        if H.dtype.element_ty == MU.dtype.element_ty:
            cross += dot(h, tl.trans(mu), ACC, PREC, UPCAST)
        else:  # e.g. bf16 features and fp32 centers (the one-pass objective's AMP inputs)
            cross += dot(h.to(ACC), tl.trans(mu.to(ACC)), ACC, PREC, False)
        hf = h.to(ACC)
        muf = mu.to(ACC)
        hh += tl.sum(hf * hf, axis=1)
        mm += tl.sum(muf * muf, axis=1)
    return tl.maximum(hh[:, None] - 2.0 * cross + mm[None, :], 0.0)


@triton.jit
def _fwd_kernel(
    H,
    MU,
    Q,
    alpha_hi,
    alpha_lo,
    n,
    K,
    F,
    stride_h,
    stride_mu,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Pass 1 over the K tiles writes the logits into Q and keeps the row max and the rescaled
    row sum of exp (online softmax); pass 2 turns this program's logits into q in place."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    alpha = float_param(alpha_hi, alpha_lo, ACC)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    s = tl.zeros([BLOCK_M], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        d = _distances(
            H,
            MU,
            stride_h,
            stride_mu,
            offs_m,
            mask_m,
            offs_k,
            mask_k,
            F,
            ACC,
            PREC,
            UPCAST,
            BLOCK_M,
            BLOCK_K,
            BLOCK_F,
        )
        logit = tl.where(
            mask_k[None, :], -(alpha + 1.0) / 2.0 * tl.log(1.0 + d / alpha), float("-inf")
        )
        m_new = tl.maximum(m, tl.max(logit, axis=1))  # finite: each tile has a center
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)
        m = m_new
        tl.store(
            Q + offs_m[:, None] * K + offs_k[None, :], logit, mask=mask_m[:, None] & mask_k[None, :]
        )
    tl.debug_barrier()  # pass 2 reads logits that other threads of this program wrote
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k[None, :] < K)
        ptrs = Q + offs_m[:, None] * K + offs_k[None, :]
        logit = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, tl.exp(logit - m[:, None]) / s[:, None], mask=mask)


@triton.jit
def _bwd_kernel(
    H,
    MU,
    Q,
    DQ,
    G,
    alpha_hi,
    alpha_lo,
    n,
    K,
    F,
    stride_h,
    stride_mu,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """G = 2 dL/dd from the forward's q (the factor 2 of d's gradients taken here, free): pass
    1 over the K tiles takes sum_k q dq, pass 2 recomputes the distances of each tile and writes
    its G."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    alpha = float_param(alpha_hi, alpha_lo, ACC)
    qdq = tl.zeros([BLOCK_M], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k[None, :] < K)
        q = tl.load(Q + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        dq = tl.load(DQ + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(ACC)
        qdq += tl.sum(q * dq, axis=1)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_m[:, None] & mask_k[None, :]
        d = _distances(
            H,
            MU,
            stride_h,
            stride_mu,
            offs_m,
            mask_m,
            offs_k,
            mask_k,
            F,
            ACC,
            PREC,
            UPCAST,
            BLOCK_M,
            BLOCK_K,
            BLOCK_F,
        )
        q = tl.load(Q + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        dq = tl.load(DQ + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(ACC)
        dlogit = q * (dq - qdq[:, None])
        g = dlogit * (-(alpha + 1.0)) / (alpha + d)  # 2 dL/dd_ik
        tl.store(G + offs_m[:, None] * K + offs_k[None, :], g, mask=mask)


def _blocks(k: int, f: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_F): centers in tiles of at most `_BLOCK_K`, features in chunks of at most
    `_BLOCK_F` (the backward spills registers on sm_90 at 64 x 64, the static report)."""
    if k > MAX_CENTERS:
        raise ValueError(
            f"backend='triton' supports at most {MAX_CENTERS} centers, got {k}; "
            "use backend='chunked' for more"
        )
    return (
        min(_BLOCK_K, max(16, triton.next_power_of_2(k))),
        min(_BLOCK_F, max(16, triton.next_power_of_2(f))),
    )


def _launch_args(h: torch.Tensor, centers: torch.Tensor, alpha: float) -> dict:
    """The kernels' scalar arguments (alpha as two fp32 halves, `split_floats`: no tensor to
    fill per call) and constexprs."""
    f, k = h.shape[1], centers.shape[0]
    block_k, block_f = _blocks(k, f)
    return dict(
        **split_floats(alpha=alpha),
        ACC=acc_dtype(h.dtype),
        PREC=dot_precision(h.dtype),
        UPCAST=upcast_dots(h.dtype),
        BLOCK_M=_BLOCK_M,
        BLOCK_K=block_k,
        BLOCK_F=block_f,
    )


# The forward and backward as torch.library ops with fake implementations (custom_op around the
# launchers, as nt_xent's); `backends.autograd.pairs.register_pair` is their autograd.


@torch.library.custom_op("fastcluster_cl::student_t_triton_fwd", mutates_args=())
def student_t_forward(h: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    """(h (N x F), centers (K x F), alpha) -> q (N x K) in the accumulation dtype."""
    (n, f), k = h.shape, centers.shape[0]
    consts = _launch_args(h, centers, alpha)
    q = torch.empty(n, k, dtype=torch_acc_dtype(h.dtype), device=h.device)
    with device_guard(h):
        _fwd_kernel[(triton.cdiv(n, _BLOCK_M),)](
            H=h,
            MU=centers,
            Q=q,
            n=n,
            K=k,
            F=f,
            stride_h=h.stride(0),
            stride_mu=centers.stride(0),
            **consts,
        )
    return q


@student_t_forward.register_fake
def _(h, centers, alpha):
    return h.new_empty(h.shape[0], centers.shape[0], dtype=torch_acc_dtype(h.dtype))


@torch.library.custom_op("fastcluster_cl::student_t_triton_bwd", mutates_args=())
def student_t_backward(
    h: torch.Tensor, centers: torch.Tensor, q: torch.Tensor, dq: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, dcenters) from dq = dL/dq and the forward's q."""
    (n, f), k = h.shape, centers.shape[0]
    consts = _launch_args(h, centers, alpha)
    acc = torch_acc_dtype(h.dtype)
    g = torch.empty(n, k, dtype=acc, device=h.device)
    with device_guard(h):
        _bwd_kernel[(triton.cdiv(n, _BLOCK_M),)](
            H=h,
            MU=centers,
            Q=q,
            DQ=dq.contiguous(),
            G=g,
            n=n,
            K=k,
            F=f,
            stride_h=h.stride(0),
            stride_mu=centers.stride(0),
            **consts,
        )
    # d = |h|^2 - 2 h.mu + |mu|^2, G = 2 dL/dd: dh = rowsum(G) h - G mu and
    # dmu = colsum(G) mu - G^T h, each one product added onto its scaled rows (three launches)
    h_acc, mu = h.to(acc), centers.to(acc)
    dh = torch.addmm(h_acc * g.sum(1, keepdim=True), g, mu, alpha=-1.0)
    d_mu = torch.addmm(mu * g.sum(0)[:, None], g.T, h_acc, alpha=-1.0)
    return dh.to(h.dtype), d_mu.to(centers.dtype)


@student_t_backward.register_fake
def _(h, centers, q, dq, alpha):
    return torch.empty_like(h), torch.empty_like(centers)


register_pair(
    student_t_forward,
    student_t_backward,
    "triton",
    lambda inputs, outputs, grads: (inputs[0], inputs[1], outputs[0], grads[0], inputs[2]),
    wrt=(0, 1),
)


def student_t(h: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    """Student-t assignment (see `fastcluster_cl.student_t`) with the fused kernels."""
    check_dtype(h, centers)
    common = torch.promote_types(h.dtype, centers.dtype)  # e.g. bf16 features, fp32 centers
    return student_t_forward(
        h.to(common).contiguous(), centers.to(common).contiguous(), float(alpha)
    )
