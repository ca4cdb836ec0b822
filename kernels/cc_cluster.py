"""Contrastive Clustering's cluster-level loss, fused: softmax assignment, column statistics and
the assignment Gram in one row-parallel launch; a K-sized epilogue does the rest.

The column contrast is NT-Xent over the 2K columns of Q = [q_a, q_b] (N x 2K), q = softmax(c).
Everything it needs is in the Gram G = Q^T Q (2K x 2K): column norms sqrt(G_kk) and cosine
similarities G_kl / (|q_k| |q_l|). The anti-collapse term needs the column sums. So the forward
kernel (`_stats_kernel`) streams the N rows of both logit matrices once, computes each row
block's softmax in registers and accumulates G_aa, G_ab, G_bb and the column sums; a fixed number
of persistent programs each write one partial (deterministic, no atomics), summed on the host.
The epilogue (`_epilogue`, plain torch on 2K x 2K) does the normalisation, the masked lse and the
entropies, and autograd gives dG and d(colsum). The backward kernel (`_grad_kernel`) re-reads the
logits once: dQ = Q (dG + dG^T) + 1 dcolsum^T, then the softmax backward.

Floors (N rows, K clusters, b bytes per logit): forward 6 N K^2 FLOPs (three K x K Grams) + N K
exps, reads each logit matrix once (2 N K b bytes), writes P * (3 K^2 + 2K) floats; backward
8 N K^2 FLOPs, reads each logit matrix once and writes its gradient (4 N K b bytes). The N x K
assignments never reach memory. K is limited to `MAX_CLUSTERS` (the Gram tiles live in registers;
larger K would need the Gram tiled over K, not done yet).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastcluster_cl.backends.autograd.pairs import register_pair

from ._common import (
    NORM_EPS,
    acc_dtype,
    check_dtype,
    device_guard,
    dot_precision,
    round_to,
    torch_acc_dtype,
)

# K = 128 overflows sm_90 shared memory in the backward (four K x K blocks) and spills in the
# forward (three Gram accumulators); K = 64 compiles with neither (the static report).
MAX_CLUSTERS = 64
_BLOCK_M = 32
_MAX_PROGRAMS = 128


@triton.jit
def softmax_rows(L, stride, offs_m, mask_m, K, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row softmax of a (BLOCK_M, K) block; rows outside the matrix and padded columns are 0."""
    offs_k = tl.arange(0, BLOCK_K)
    mask = mask_m[:, None] & (offs_k[None, :] < K)
    x = tl.load(L + offs_m[:, None] * stride + offs_k[None, :], mask=mask, other=float("-inf")).to(
        ACC
    )
    m = tl.where(mask_m, tl.max(x, axis=1), 0.0)
    e = tl.where(mask, tl.exp(x - m[:, None]), 0.0)
    return e / tl.where(mask_m, tl.sum(e, axis=1), 1.0)[:, None]


@triton.jit
def _stats_kernel(
    LA,
    LB,
    GRAM,
    COLSUM,
    n,
    K,
    stride_a,
    stride_b,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    g_aa = tl.zeros([BLOCK_K, BLOCK_K], ACC)
    g_ab = tl.zeros([BLOCK_K, BLOCK_K], ACC)
    g_bb = tl.zeros([BLOCK_K, BLOCK_K], ACC)
    c_a = tl.zeros([BLOCK_K], ACC)
    c_b = tl.zeros([BLOCK_K], ACC)
    for r0 in range(pid * BLOCK_M, n, programs * BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n
        q_a = softmax_rows(LA, stride_a, offs_m, mask_m, K, ACC, BLOCK_K)
        q_b = softmax_rows(LB, stride_b, offs_m, mask_m, K, ACC, BLOCK_K)
        g_aa += tl.dot(tl.trans(q_a), q_a, out_dtype=ACC, input_precision=PREC)
        g_ab += tl.dot(tl.trans(q_a), q_b, out_dtype=ACC, input_precision=PREC)
        g_bb += tl.dot(tl.trans(q_b), q_b, out_dtype=ACC, input_precision=PREC)
        c_a += tl.sum(q_a, axis=0)
        c_b += tl.sum(q_b, axis=0)
    offs_k = tl.arange(0, BLOCK_K)
    tile = offs_k[:, None] * BLOCK_K + offs_k[None, :]
    base = GRAM + pid * 3 * BLOCK_K * BLOCK_K
    tl.store(base + tile, g_aa)
    tl.store(base + BLOCK_K * BLOCK_K + tile, g_ab)
    tl.store(base + 2 * BLOCK_K * BLOCK_K + tile, g_bb)
    tl.store(COLSUM + pid * 2 * BLOCK_K + offs_k, c_a)
    tl.store(COLSUM + pid * 2 * BLOCK_K + BLOCK_K + offs_k, c_b)


@triton.jit
def _load_square(M, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    return tl.load(M + offs_k[:, None] * BLOCK_K + offs_k[None, :])


@triton.jit
def _softmax_grad_store(DL, stride, offs_m, mask_m, q, dq, K, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    dl = q * (dq - tl.sum(q * dq, axis=1)[:, None])
    tl.store(
        DL + offs_m[:, None] * stride + offs_k[None, :],
        round_to(dl, DL.dtype.element_ty),
        mask=mask_m[:, None] & (offs_k[None, :] < K),
    )


@triton.jit
def _grad_kernel(
    LA,
    LB,
    DLA,
    DLB,
    M,
    DC,
    n,
    K,
    stride_a,
    stride_b,
    stride_da,
    stride_db,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """M holds the four K x K blocks (aa, ab, ba, bb) of dG + dG^T, DC the two column-sum
    gradients, each zero-padded to BLOCK_K."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cluster_grad_rows(
        LA,
        LB,
        DLA,
        DLB,
        M,
        DC,
        offs_m,
        offs_m < n,
        K,
        stride_a,
        stride_b,
        stride_da,
        stride_db,
        ACC,
        PREC,
        BLOCK_K,
    )


@triton.jit
def cluster_grad_rows(
    LA,
    LB,
    DLA,
    DLB,
    M,
    DC,
    offs_m,
    mask_m,
    K,
    stride_a,
    stride_b,
    stride_da,
    stride_db,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """`_grad_kernel` on the logit rows offs_m: dQ = Q M + DC, then the softmax backward."""
    offs_k = tl.arange(0, BLOCK_K)
    q_a = softmax_rows(LA, stride_a, offs_m, mask_m, K, ACC, BLOCK_K)
    q_b = softmax_rows(LB, stride_b, offs_m, mask_m, K, ACC, BLOCK_K)
    sq = BLOCK_K * BLOCK_K
    m_aa = _load_square(M, BLOCK_K)
    m_ab = _load_square(M + sq, BLOCK_K)
    m_ba = _load_square(M + 2 * sq, BLOCK_K)
    m_bb = _load_square(M + 3 * sq, BLOCK_K)
    dq_a = (
        tl.dot(q_a, m_aa, out_dtype=ACC, input_precision=PREC)
        + tl.dot(q_b, m_ba, out_dtype=ACC, input_precision=PREC)
        + tl.load(DC + offs_k)[None, :]
    )
    dq_b = (
        tl.dot(q_a, m_ab, out_dtype=ACC, input_precision=PREC)
        + tl.dot(q_b, m_bb, out_dtype=ACC, input_precision=PREC)
        + tl.load(DC + BLOCK_K + offs_k)[None, :]
    )
    _softmax_grad_store(DLA, stride_da, offs_m, mask_m, q_a, dq_a, K, BLOCK_K)
    _softmax_grad_store(DLB, stride_db, offs_m, mask_m, q_b, dq_b, K, BLOCK_K)


def _block_k(k: int) -> int:
    if k > MAX_CLUSTERS:
        raise ValueError(
            f"backend='triton' fuses the cluster contrast for at most {MAX_CLUSTERS}"
            f" clusters, got K = {k}; use backend='chunked' for more"
        )
    return max(16, triton.next_power_of_2(k))


# The statistics and their backward as torch.library ops with fake implementations (custom_op
# around the launchers, as nt_xent's: see there); `backends.autograd.pairs.register_pair` makes the
# forward op differentiable through the backward op.


@torch.library.custom_op("fastcluster_cl::cc_cluster_triton_fwd", mutates_args=())
def cluster_stats(
    logits_a: torch.Tensor, logits_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits_a, logits_b) -> (G = Q^T Q (2K x 2K), column sums of Q (2K,)), Q = [softmax(c_a),
    softmax(c_b)], in the accumulation dtype; the N x 2K matrix Q is never written."""
    n, k = logits_a.shape
    block_k = _block_k(k)
    acc = torch_acc_dtype(logits_a.dtype)
    programs = min(triton.cdiv(n, _BLOCK_M), _MAX_PROGRAMS)
    gram = torch.empty(programs, 3, block_k, block_k, dtype=acc, device=logits_a.device)
    colsum = torch.empty(programs, 2, block_k, dtype=acc, device=logits_a.device)
    with device_guard(logits_a):
        _stats_kernel[(programs,)](
            LA=logits_a,
            LB=logits_b,
            GRAM=gram,
            COLSUM=colsum,
            n=n,
            K=k,
            stride_a=logits_a.stride(0),
            stride_b=logits_b.stride(0),
            ACC=acc_dtype(logits_a.dtype),
            PREC=dot_precision(acc),
            BLOCK_M=_BLOCK_M,
            BLOCK_K=block_k,
        )
    g_aa, g_ab, g_bb = gram.sum(0)[:, :k, :k].unbind(0)
    full = torch.cat([torch.cat([g_aa, g_ab], 1), torch.cat([g_ab.T, g_bb], 1)], 0)
    return full, colsum.sum(0)[:, :k].reshape(2 * k)


@cluster_stats.register_fake
def _(logits_a, logits_b):
    k2, acc = 2 * logits_a.shape[1], torch_acc_dtype(logits_a.dtype)
    return logits_a.new_empty(k2, k2, dtype=acc), logits_a.new_empty(k2, dtype=acc)


@torch.library.custom_op("fastcluster_cl::cc_cluster_triton_bwd", mutates_args=())
def cluster_stats_backward(
    logits_a: torch.Tensor, logits_b: torch.Tensor, d_gram: torch.Tensor, d_colsum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dlogits_a, dL/dlogits_b) from the gradients of G and of the column sums: one launch
    re-reading the logits, dQ = Q (dG + dG^T) + 1 dcolsum^T, then the softmax backward."""
    n, k = logits_a.shape
    block_k = _block_k(k)
    acc = torch_acc_dtype(logits_a.dtype)
    m = torch.zeros(4, block_k, block_k, dtype=acc, device=logits_a.device)
    dc = torch.zeros(2, block_k, dtype=acc, device=logits_a.device)
    sym = (d_gram + d_gram.T).to(acc)
    m[0, :k, :k], m[1, :k, :k] = sym[:k, :k], sym[:k, k:]
    m[2, :k, :k], m[3, :k, :k] = sym[k:, :k], sym[k:, k:]
    dc[:, :k] = d_colsum.to(acc).reshape(2, k)
    d_a, d_b = torch.empty_like(logits_a), torch.empty_like(logits_b)
    with device_guard(logits_a):
        _grad_kernel[(triton.cdiv(n, _BLOCK_M),)](
            LA=logits_a,
            LB=logits_b,
            DLA=d_a,
            DLB=d_b,
            M=m,
            DC=dc,
            n=n,
            K=k,
            stride_a=logits_a.stride(0),
            stride_b=logits_b.stride(0),
            stride_da=d_a.stride(0),
            stride_db=d_b.stride(0),
            ACC=acc_dtype(logits_a.dtype),
            PREC=dot_precision(acc),
            BLOCK_M=_BLOCK_M,
            BLOCK_K=block_k,
        )
    return d_a, d_b


@cluster_stats_backward.register_fake
def _(logits_a, logits_b, d_gram, d_colsum):
    return torch.empty_like(logits_a), torch.empty_like(logits_b)


register_pair(
    cluster_stats,
    cluster_stats_backward,
    "triton",
    lambda inputs, outputs, grads: (*inputs, *grads[:2]),
    wrt=(0, 1),
)


def _epilogue(gram: torch.Tensor, colsum: torch.Tensor, n: int, temperature: float):
    """The K-sized terms: NT-Xent over the 2K normalised columns from their Gram, plus
    log K + sum_k P_k log P_k for each view (P = column sums / N)."""
    k2 = gram.shape[0]
    k = k2 // 2
    # max(|q_k|, eps) as sqrt(max(G_kk, eps^2)): a zero column gets a zero, not NaN, gradient.
    norm = gram.diagonal().clamp_min(NORM_EPS**2).sqrt()
    s = gram / (norm[:, None] * norm[None, :]) / temperature
    eye = torch.eye(k2, dtype=torch.bool, device=gram.device)
    lse = torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=1)
    idx = torch.arange(k2, device=gram.device)
    instance = (lse - s[idx, (idx + k) % k2]).mean()
    p = colsum.reshape(2, k) / n
    # p log max(p, tiny), not xlogy: a column that underflows to P_k = 0 has xlogy's derivative
    # log P_k + 1 = -inf, and -inf times the softmax's zero Jacobian is a NaN gradient.
    entropy = p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
    return instance + 2 * math.log(k) + entropy.sum()


def cc_cluster_loss(
    logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float
) -> torch.Tensor:
    """CC cluster-level loss (see `fastcluster_cl.cc_cluster_loss`) with the fused kernels."""
    check_dtype(logits_a, logits_b)
    gram, colsum = cluster_stats(logits_a.contiguous(), logits_b.contiguous())
    return _epilogue(gram, colsum, logits_a.shape[0], temperature)
