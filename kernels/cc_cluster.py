"""Contrastive Clustering's cluster-level loss, fused: softmax assignment, column statistics and
the assignment Gram in one row-parallel launch; a K-sized epilogue does the rest.

The column contrast is NT-Xent over the 2K columns of Q = [q_a, q_b] (N x 2K), q = softmax(c).
Everything it needs is in the Gram G = Q^T Q (2K x 2K): column norms sqrt(G_kk) and cosine
similarities G_kl / (|q_k| |q_l|). The anti-collapse term needs the column sums. So the forward
kernel (`_stats_kernel`) streams the N rows of both logit matrices once, computes each row
block's softmax in registers and accumulates G_aa, G_ab, G_bb and the column sums; a fixed number
of persistent programs each write one partial (deterministic, no atomics), summed on the host.
The epilogue (`cluster_epilogue`: one single-program launch each way on the 2K x 2K Gram) does
the normalisation, the masked lse and the entropies, and gives dG and d(colsum) in closed form
(it was ~40 torch ops under autograd, launch-bound). The backward kernel (`_grad_kernel`)
re-reads the logits once: dQ = Q (dG + dG^T) + 1 dcolsum^T, then the softmax backward.

Floors (N rows, K clusters, b bytes per logit): forward 6 N K^2 FLOPs (three K x K Grams) + N K
exps, reads each logit matrix once (2 N K b bytes), writes P * (3 K^2 + 2K) floats; backward
8 N K^2 FLOPs, reads each logit matrix once and writes its gradient (4 N K b bytes). The N x K
assignments never reach memory. K is limited to `MAX_CLUSTERS` (the Gram tiles live in registers;
larger K would need the Gram tiled over K, not done yet).
"""

from __future__ import annotations

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
    float_param,
    round_to,
    split_floats,
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


@triton.jit
def _column_terms(GRAM, k, inv_tau, ACC: tl.constexpr, EPS2: tl.constexpr, BLOCK: tl.constexpr):
    """The 2K columns' NT-Xent terms from their Gram G (2k x 2k, row-major): (row indices,
    column indices, the valid entries j != i, the positives j = i +- k, the clamped norms'
    squares d2, S = G / (d_i d_j) / tau, the rows' lse over j != i (0 on padding rows))."""
    k2 = 2 * k
    rows = tl.arange(0, BLOCK)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    inside = (rows < k2) & (cols < k2)
    g = tl.load(GRAM + rows * k2 + cols, mask=inside, other=0.0).to(ACC)
    diagonal = rows == cols
    eps2 = tl.full([], EPS2, ACC)  # a bare constexpr would be rounded to fp32
    d2_rows = tl.maximum(tl.sum(tl.where(diagonal, g, 0.0), axis=1), eps2)
    d2_cols = tl.maximum(tl.sum(tl.where(diagonal, g, 0.0), axis=0), eps2)
    s = g / (tl.sqrt(d2_rows)[:, None] * tl.sqrt(d2_cols)[None, :]) * inv_tau
    valid = inside & (rows != cols)
    positive = inside & (cols == (rows + k) % k2)
    masked = tl.where(valid, s, float("-inf"))
    top = tl.where(tl.arange(0, BLOCK) < k2, tl.max(masked, axis=1), 0.0)
    total = tl.sum(tl.where(valid, tl.exp(masked - top[:, None]), 0.0), axis=1)
    lse = tl.where(tl.arange(0, BLOCK) < k2, top + tl.log(tl.maximum(total, 1e-30)), 0.0)
    return rows, cols, valid, positive, d2_rows, s, lse


@triton.jit(do_not_specialize=["k", "n"])  # k = 1, n = 1 would become constexprs
def _epilogue_fwd_kernel(
    GRAM,
    COLSUM,
    OUT,
    k,
    n,
    inv_tau_hi,
    inv_tau_lo,
    ACC: tl.constexpr,
    EPS2: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: NT-Xent over the 2K normalised columns from their Gram, plus
    2 log K + sum_k P_k log max(P_k, tiny) over both views (P = column sums / N)."""
    inv_tau = float_param(inv_tau_hi, inv_tau_lo, ACC)
    rows, cols, valid, positive, d2, s, lse = _column_terms(GRAM, k, inv_tau, ACC, EPS2, BLOCK)
    instance = (tl.sum(lse) - tl.sum(tl.where(positive, s, 0.0))) / (2 * k)
    offs = tl.arange(0, BLOCK)
    p = tl.load(COLSUM + offs, mask=offs < 2 * k, other=0.0).to(ACC) / n
    entropy = tl.sum(p * tl.log(tl.maximum(p, TINY)))
    tl.store(OUT, instance + 2 * tl.log(k.to(ACC)) + entropy)


@triton.jit(do_not_specialize=["k", "n"])  # k = 1, n = 1 would become constexprs
def _epilogue_bwd_kernel(
    GRAM,
    COLSUM,
    GRAD,
    DGRAM,
    DCOLSUM,
    k,
    n,
    inv_tau_hi,
    inv_tau_lo,
    ACC: tl.constexpr,
    EPS2: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The gradients of `_epilogue_fwd_kernel`'s value: with W = (P - [positive]) g / 2K (P the
    rows' softmax over j != i), dG_ij = W_ij / (d_i d_j tau) and, through the clamped norms
    d_i = sqrt(max(G_ii, eps^2)), dG_ii += -(sum_j W_ij S_ij + W_ji S_ji) / (2 d_i^2) where
    G_ii >= eps^2; dcolsum = g (log max(P_k, tiny) + [P_k >= tiny]) / N."""
    inv_tau = float_param(inv_tau_hi, inv_tau_lo, ACC)
    rows, cols, valid, positive, d2, s, lse = _column_terms(GRAM, k, inv_tau, ACC, EPS2, BLOCK)
    g = tl.load(GRAD).to(ACC)
    k2 = 2 * k
    prob = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
    w = (prob - tl.where(positive, 1.0, 0.0)) * (g / k2)
    d = tl.sqrt(d2)
    ws = w * s
    radial = tl.sum(ws, axis=1) + tl.sum(tl.trans(ws), axis=1)
    diagonal = tl.load(GRAM + tl.arange(0, BLOCK) * (k2 + 1), mask=tl.arange(0, BLOCK) < k2)
    unclamped = diagonal.to(ACC) >= tl.full([], EPS2, ACC)
    d_norm = tl.where(unclamped, -radial / (2 * d2), 0.0)
    d_cols = tl.sum(tl.where(rows == cols, d[:, None], 0.0), axis=0)  # d along the columns
    dgram = w * inv_tau / (d[:, None] * d_cols[None, :]) + tl.where(
        rows == cols, d_norm[:, None], 0.0
    )
    tl.store(DGRAM + rows * k2 + cols, dgram, mask=(rows < k2) & (cols < k2))
    offs = tl.arange(0, BLOCK)
    mask = offs < k2
    p = tl.load(COLSUM + offs, mask=mask, other=1.0).to(ACC) / n
    dp = tl.log(tl.maximum(p, TINY)) + tl.where(p >= TINY, 1.0, 0.0)
    tl.store(DCOLSUM + offs, dp * (g / n), mask=mask)


def _epilogue_consts(gram: torch.Tensor) -> dict:
    _block_k(gram.shape[0] // 2)  # refuses more than MAX_CLUSTERS clusters
    acc, block = gram.dtype, max(16, triton.next_power_of_2(gram.shape[0]))
    return dict(
        ACC=acc_dtype(acc),
        EPS2=NORM_EPS**2,
        TINY=torch.finfo(acc).tiny,
        BLOCK=block,
        num_warps=max(4, block * block // 1024),  # 128 x 128 on 8 warps spilled 112 B (sm_90a)
    )


@torch.library.custom_op("fastcluster_cl::cc_cluster_epilogue_triton_fwd", mutates_args=())
def cluster_epilogue(
    gram: torch.Tensor, colsum: torch.Tensor, n: int, temperature: float
) -> torch.Tensor:
    """The K-sized terms of the loss (0-d, the Gram's dtype) from the Gram of the 2K columns and
    their sums (`cluster_stats`), in one single-program launch (`_epilogue_fwd_kernel`)."""
    gram, colsum = gram.contiguous(), colsum.contiguous()
    out = torch.empty((), dtype=gram.dtype, device=gram.device)
    with device_guard(gram):
        _epilogue_fwd_kernel[(1,)](
            GRAM=gram,
            COLSUM=colsum,
            OUT=out,
            k=gram.shape[0] // 2,
            n=n,
            **split_floats(inv_tau=1.0 / temperature),
            **_epilogue_consts(gram),
        )
    return out


@cluster_epilogue.register_fake
def _(gram, colsum, n, temperature):
    return gram.new_empty(())


@torch.library.custom_op("fastcluster_cl::cc_cluster_epilogue_triton_bwd", mutates_args=())
def cluster_epilogue_backward(
    gram: torch.Tensor, colsum: torch.Tensor, n: int, temperature: float, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dgram, dL/dcolsum) of `cluster_epilogue` (`_epilogue_bwd_kernel`, one program)."""
    gram, colsum = gram.contiguous(), colsum.contiguous()
    d_gram, d_colsum = torch.empty_like(gram), torch.empty_like(colsum)
    with device_guard(gram):
        _epilogue_bwd_kernel[(1,)](
            GRAM=gram,
            COLSUM=colsum,
            GRAD=grad.to(gram.dtype).contiguous(),
            DGRAM=d_gram,
            DCOLSUM=d_colsum,
            k=gram.shape[0] // 2,
            n=n,
            **split_floats(inv_tau=1.0 / temperature),
            **_epilogue_consts(gram),
        )
    return d_gram, d_colsum


@cluster_epilogue_backward.register_fake
def _(gram, colsum, n, temperature, grad):
    return gram.new_empty(gram.shape), colsum.new_empty(colsum.shape)


register_pair(
    cluster_epilogue,
    cluster_epilogue_backward,
    "triton",
    lambda inputs, outputs, grads: (*inputs, grads[0]),
    wrt=(0, 1),
)


def cc_cluster_loss(
    logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float
) -> torch.Tensor:
    """CC cluster-level loss (see `fastcluster_cl.cc_cluster_loss`) with the fused kernels."""
    check_dtype(logits_a, logits_b)
    gram, colsum = cluster_stats(logits_a.contiguous(), logits_b.contiguous())
    return cluster_epilogue(gram, colsum, logits_a.shape[0], temperature)
