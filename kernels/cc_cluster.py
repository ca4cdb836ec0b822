"""Contrastive Clustering's cluster-level loss, fused: softmax assignment, column statistics and
the assignment Gram in one row-parallel launch; a K-sized epilogue does the rest.

The column contrast is NT-Xent over the 2K columns of Q = [q_a, q_b] (N x 2K), q = softmax(c).
Everything it needs is in the Gram G = Q^T Q (2K x 2K): column norms sqrt(G_kk) and cosine
similarities G_kl / (|q_k| |q_l|). The anti-collapse term needs the column sums. So the forward
kernel (`_stats_kernel`) streams the N rows of both logit matrices once, computes each row
block's softmax in registers and accumulates G_aa, G_ab, G_bb and the column sums; a fixed number
of persistent programs each write one partial (no atomics), which one merge launch
(`_stats_merge_kernel`) adds in a fixed order (blocks of 16 partials, in program order) into G
and the column sums (run-to-run deterministic).
The epilogue (`cluster_epilogue`: one launch each way on the 2K x 2K Gram, a single program up
to 32 clusters, else a program per row block) does the normalisation, the masked lse and the
entropies, and gives dG and d(colsum) in closed form (it was ~40 torch ops under autograd,
launch-bound). The backward kernel (`_grad_kernel`) re-reads the logits once: dQ = Q (dG +
dG^T) + 1 dcolsum^T, then the softmax backward; one small launch (`_grad_operands_kernel`)
gives it dG + dG^T and dcolsum padded to its tiles.

Floors (N rows, K clusters, b bytes per logit): forward 6 N K^2 FLOPs (three K x K Grams) + N K
exps, reads each logit matrix once (2 N K b bytes), writes P * (3 K^2 + 2K) floats; backward
8 N K^2 FLOPs, reads each logit matrix once and writes its gradient (4 N K b bytes). The N x K
assignments never reach memory. The fused kernels hold at most `MAX_CLUSTERS` clusters (the
Gram tiles live in registers); above, `gram_stats` gives the same (G, column sums) with the
softmaxes written by one launch (`_assignments_kernel`, with their bf16 parts where the
products take them), the Gram and its backward product on cuBLAS, and the epilogue tiles the
2K x 2K matrix by rows: a row block a program, the columns swept in tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcluster_cl.backends.autograd.pairs import register_pair
from fastcluster_cl.backends.numerics import (
    bf16_parts,
    parts_gram,
    parts_product,
    products_by_parts,
)

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
# The statistics' merge: Gram rows a program (3 x 8 programs at K = 64), partials a step.
_MERGE_ROWS = 8
_MERGE_PARTIALS = 16


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
def _stats_merge_kernel(
    GRAM,
    COLSUM,
    G,
    C,
    K,
    programs,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The statistics programs' partials added in a fixed order, blocks of BLOCK_P in program
    order (run-to-run deterministic): program (b, r) sums rows [r, r + BLOCK_R) of Gram block
    b (aa, ab, bb) into G = [[G_aa, G_ab], [G_ab^T, G_bb]] (2K x 2K, G_ab^T from the same
    rows), program (0, 0) the column sums into C (2K). One launch for the sums, slices and
    concatenations on the host."""
    block = tl.program_id(0)
    flat = tl.arange(0, BLOCK_R * BLOCK_K)
    rows = tl.program_id(1) * BLOCK_R + flat // BLOCK_K
    cols = flat % BLOCK_K
    parts = tl.arange(0, BLOCK_P)[:, None]
    acc = tl.zeros([BLOCK_R * BLOCK_K], ACC)
    for p0 in range(0, programs, BLOCK_P):
        tile = ((p0 + parts) * 3 + block) * BLOCK_K * BLOCK_K + (rows * BLOCK_K + cols)[None, :]
        acc += tl.sum(tl.load(GRAM + tile, mask=p0 + parts < programs, other=0.0), axis=0)
    mask = (rows < K) & (cols < K)
    row = block // 2  # aa: (0, 0), ab: (0, 1), bb: (1, 1)
    col = (block + 1) // 2
    two_k = 2 * K
    tl.store(G + (row * K + rows) * two_k + col * K + cols, acc, mask=mask)
    if block == 1:
        tl.store(G + (K + cols) * two_k + rows, acc, mask=mask)
    if (block == 0) & (tl.program_id(1) == 0):
        offs = tl.arange(0, 2 * BLOCK_K)
        sums = tl.zeros([2 * BLOCK_K], ACC)
        for p0 in range(0, programs, BLOCK_P):
            ptrs = COLSUM + (p0 + parts) * 2 * BLOCK_K + offs[None, :]
            sums += tl.sum(tl.load(ptrs, mask=p0 + parts < programs, other=0.0), axis=0)
        view = offs // BLOCK_K  # a: 0, b: 1
        lane = offs % BLOCK_K
        tl.store(C + view * K + lane, sums, mask=lane < K)


@triton.jit
def _grad_operands_kernel(DG, DCS, M, DC, K, BLOCK_K: tl.constexpr):
    """The backward's operands: program b = 2 i + j writes M's block (i, j) of dG + dG^T,
    dG[iK + r, jK + c] + dG[jK + c, iK + r], zero-padded to BLOCK_K; programs 0 and 1 the
    column-sum gradients, padded. One launch for the fills and adds on the host."""
    block = tl.program_id(0)
    i = block // 2
    j = block % 2
    offs = tl.arange(0, BLOCK_K)
    mask = (offs[:, None] < K) & (offs[None, :] < K)
    two_k = 2 * K
    d = tl.load(DG + (i * K + offs[:, None]) * two_k + j * K + offs[None, :], mask=mask, other=0.0)
    d += tl.load(DG + (j * K + offs[None, :]) * two_k + i * K + offs[:, None], mask=mask, other=0.0)
    tl.store(M + block * BLOCK_K * BLOCK_K + offs[:, None] * BLOCK_K + offs[None, :], d)
    if block < 2:
        dc = tl.load(DCS + block * K + offs, mask=offs < K, other=0.0)
        tl.store(DC + block * BLOCK_K + offs, dc)


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
            f"the fused cluster statistics take at most {MAX_CLUSTERS} clusters, got K = {k}; "
            "cc_cluster_loss takes more through gram_stats"
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
        full = torch.empty(2 * k, 2 * k, dtype=acc, device=logits_a.device)
        sums = torch.empty(2 * k, dtype=acc, device=logits_a.device)
        _stats_merge_kernel[(3, triton.cdiv(k, _MERGE_ROWS))](
            GRAM=gram,
            COLSUM=colsum,
            G=full,
            C=sums,
            K=k,
            programs=programs,
            ACC=acc_dtype(logits_a.dtype),
            BLOCK_P=_MERGE_PARTIALS,
            BLOCK_R=_MERGE_ROWS,
            BLOCK_K=block_k,
        )
    return full, sums


@torch.library.custom_op("fastcluster_cl::cc_cluster_triton_bwd", mutates_args=())
def cluster_stats_backward(
    logits_a: torch.Tensor, logits_b: torch.Tensor, d_gram: torch.Tensor, d_colsum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dlogits_a, dL/dlogits_b) from the gradients of G and of the column sums: one launch
    re-reading the logits, dQ = Q (dG + dG^T) + 1 dcolsum^T, then the softmax backward."""
    n, k = logits_a.shape
    block_k = _block_k(k)
    acc = torch_acc_dtype(logits_a.dtype)
    m = torch.empty(2, 2, block_k, block_k, dtype=acc, device=logits_a.device)
    dc = torch.empty(2, block_k, dtype=acc, device=logits_a.device)
    d_a, d_b = torch.empty_like(logits_a), torch.empty_like(logits_b)
    with device_guard(logits_a):
        _grad_operands_kernel[(4,)](
            DG=d_gram.contiguous(),
            DCS=d_colsum.contiguous(),
            M=m,
            DC=dc,
            K=k,
            BLOCK_K=block_k,
        )
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


# Above MAX_CLUSTERS the statistics come from cuBLAS: the softmaxes written (N x 2K, with their
# bf16 parts where the products take them: `_assignments_kernel`), their Gram and its backward
# product (fp32 as `numerics.parts_gram` / `parts_product` where that pays, else torch's fp32
# matmul), the same op pair's signature.
_ASSIGN_ROWS = 8
_ASSIGN_COLUMNS = 256


@triton.jit
def _assignments_kernel(
    LA,
    LB,
    Q,
    HI,
    MID,
    LO,
    n,
    K,
    stride_a,
    stride_b,
    PARTS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Q = [softmax(c_a), softmax(c_b)] (N x 2K in ACC) on rows [program_id(0) BLOCK_M, +
    BLOCK_M) of view program_id(1), any K: the rows' max and sum of exp over column chunks of
    BLOCK_K (online), then the chunks again, written; with PARTS also Q's `bf16_parts` (hi,
    mid, lo: N x 2K bf16 each), where the Gram and the backward product take them (one pass
    in place of torch's five over Q)."""
    if tl.program_id(1) == 0:
        logits, stride, column = LA, stride_a, 0
    else:
        logits, stride, column = LB, stride_b, K
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    rows = offs_m.to(tl.int64)  # N x 2K passes 2^31 at K = 1000 from about a million rows
    offs_k = tl.arange(0, BLOCK_K)
    top = tl.full([BLOCK_M], float("-inf"), ACC)
    total = tl.zeros([BLOCK_M], ACC)
    for k0 in range(0, K, BLOCK_K):
        mask = mask_m[:, None] & (k0 + offs_k < K)[None, :]
        x = tl.load(
            logits + rows[:, None] * stride + (k0 + offs_k)[None, :],
            mask=mask,
            other=float("-inf"),
        ).to(ACC)
        new_top = tl.maximum(top, tl.max(x, axis=1))
        # no exp(-inf - -inf): an unchanged max keeps the sum, a -inf logit adds nothing
        total = total * tl.where(top == new_top, 1.0, tl.exp(top - new_top)) + tl.sum(
            tl.where(x > float("-inf"), tl.exp(x - new_top[:, None]), 0.0), axis=1
        )
        top = new_top
    for k0 in range(0, K, BLOCK_K):
        mask = mask_m[:, None] & (k0 + offs_k < K)[None, :]
        x = tl.load(logits + rows[:, None] * stride + (k0 + offs_k)[None, :], mask=mask).to(ACC)
        q = tl.exp(x - top[:, None]) / total[:, None]
        at = rows[:, None] * (2 * K) + (column + k0 + offs_k)[None, :]
        tl.store(Q + at, q, mask=mask)
        if PARTS:  # as `numerics.bf16_parts`, rounded to nearest even (`round_to`)
            hi = round_to(q, tl.bfloat16)
            rest = q - hi.to(ACC)
            mid = round_to(rest, tl.bfloat16)
            tl.store(HI + at, hi, mask=mask)
            tl.store(MID + at, mid, mask=mask)
            tl.store(LO + at, round_to(rest - mid.to(ACC), tl.bfloat16), mask=mask)


def _assignments(logits_a: torch.Tensor, logits_b: torch.Tensor, parts: bool) -> tuple:
    """(Q = `objective_sides.cc_assignments`, its `bf16_parts` or None) from one launch."""
    n, k = logits_a.shape
    q = torch.empty(n, 2 * k, dtype=torch_acc_dtype(logits_a.dtype), device=logits_a.device)
    split = [torch.empty_like(q, dtype=torch.bfloat16) for _ in range(3)] if parts else [q] * 3
    with device_guard(logits_a):
        _assignments_kernel[(triton.cdiv(n, _ASSIGN_ROWS), 2)](
            LA=logits_a,
            LB=logits_b,
            Q=q,
            HI=split[0],
            MID=split[1],
            LO=split[2],
            n=n,
            K=k,
            stride_a=logits_a.stride(0),
            stride_b=logits_b.stride(0),
            PARTS=parts,
            ACC=acc_dtype(q.dtype),
            BLOCK_M=_ASSIGN_ROWS,
            BLOCK_K=min(_ASSIGN_COLUMNS, triton.next_power_of_2(k)),
        )
    return q, split if parts else None


@torch.library.custom_op("fastcluster_cl::cc_cluster_gram_triton_fwd", mutates_args=())
def gram_stats(logits_a: torch.Tensor, logits_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`cluster_stats` for any K: G = Q^T Q and the column sums of Q, Q written."""
    n, k = logits_a.shape
    acc = torch_acc_dtype(logits_a.dtype)
    by_parts = products_by_parts(2 * k, n, 2 * k, acc, logits_a.device, split=True)
    q, parts = _assignments(logits_a, logits_b, by_parts)
    return (parts_gram(parts) if parts else q.T @ q), q.sum(0)


@torch.library.custom_op("fastcluster_cl::cc_cluster_gram_triton_bwd", mutates_args=())
def gram_stats_backward(
    logits_a: torch.Tensor, logits_b: torch.Tensor, d_gram: torch.Tensor, d_colsum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cluster_stats_backward` for any K: Q recomputed, dQ = Q (dG + dG^T) + 1 dcolsum^T, then
    the softmax backward."""
    n, k = logits_a.shape
    acc = torch_acc_dtype(logits_a.dtype)
    by_parts = products_by_parts(n, 2 * k, 2 * k, acc, logits_a.device, split=True)
    q, parts = _assignments(logits_a, logits_b, by_parts)
    sym = d_gram + d_gram.T
    dq = parts_product(parts, bf16_parts(sym)) if parts else q @ sym
    dq = dq.add_(d_colsum).view(n, 2, k)
    q3 = q.view(n, 2, k)
    dq.sub_(torch.linalg.vecdot(q3, dq).unsqueeze(-1))
    d_a, d_b = torch.empty_like(logits_a), torch.empty_like(logits_b)
    torch.mul(dq[:, 0], q3[:, 0], out=d_a)
    torch.mul(dq[:, 1], q3[:, 1], out=d_b)
    return d_a, d_b


def _stats_fake(logits_a, logits_b):
    k2, acc = 2 * logits_a.shape[1], torch_acc_dtype(logits_a.dtype)
    return logits_a.new_empty(k2, k2, dtype=acc), logits_a.new_empty(k2, dtype=acc)


def _stats_backward_fake(logits_a, logits_b, d_gram, d_colsum):
    return torch.empty_like(logits_a), torch.empty_like(logits_b)


for _forward, _backward in (
    (cluster_stats, cluster_stats_backward),
    (gram_stats, gram_stats_backward),
):
    _forward.register_fake(_stats_fake)
    _backward.register_fake(_stats_backward_fake)
    register_pair(
        _forward,
        _backward,
        "triton",
        lambda inputs, outputs, grads: (*inputs, *grads[:2]),
        wrt=(0, 1),
    )


@triton.jit
def _norms(GRAM, offs, mask, k2, ACC: tl.constexpr, EPS2: tl.constexpr):
    """(d^2, d) of the columns `offs`: G_ii clamped at eps^2, and its root."""
    eps2 = tl.full([], EPS2, ACC)  # a bare constexpr would be rounded to fp32
    d2 = tl.maximum(
        tl.load(GRAM + offs.to(tl.int64) * (k2 + 1), mask=mask, other=1.0).to(ACC), eps2
    )
    return d2, tl.sqrt(d2)


@triton.jit
def _similarities(GRAM, offs_r, mask_r, d_r, offs_c, mask_c, d_c, k, inv_tau, ACC: tl.constexpr):
    """S = G / (d_i d_j) / tau on the tile (rows offs_r, columns offs_c) of the 2k x 2k Gram,
    with the entries it holds j != i (valid) and j = i +- k (positive; symmetric in i, j)."""
    k2 = 2 * k
    inside = mask_r[:, None] & mask_c[None, :]
    at = offs_r[:, None].to(tl.int64) * k2 + offs_c[None, :]  # (2K)^2 passes 2^31 at K = 23171
    g = tl.load(GRAM + at, mask=inside, other=0.0).to(ACC)
    s = g / (d_r[:, None] * d_c[None, :]) * inv_tau
    valid = inside & (offs_r[:, None] != offs_c[None, :])
    positive = inside & (offs_c[None, :] == (offs_r[:, None] + k) % k2)
    return s, valid, positive


@triton.jit
def _column_tile(
    GRAM,
    c0,
    offs_r,
    mask_r,
    d_r,
    k,
    inv_tau,
    ACC: tl.constexpr,
    EPS2: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The column tile from c0 of the rows offs_r: (its columns, their mask, their norms d, and
    `_similarities` on it)."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < 2 * k
    d_c = _norms(GRAM, offs_c, mask_c, 2 * k, ACC, EPS2)[1]
    s, valid, positive = _similarities(
        GRAM, offs_r, mask_r, d_r, offs_c, mask_c, d_c, k, inv_tau, ACC
    )
    return offs_c, mask_c, d_c, s, valid, positive


@triton.jit
def _row_lse(
    GRAM,
    offs_r,
    mask_r,
    d_r,
    k,
    inv_tau,
    ACC: tl.constexpr,
    EPS2: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(lse over j != i of S_ij, S_i,pos(i)) of the rows offs_r (0 on padding rows), a column
    tile at a time, online: the running max from -inf, each tile's sum shifted by it (by 0
    while no entry of the row is seen)."""
    k2 = 2 * k
    total = tl.zeros([BLOCK_R], ACC)
    top = total + float("-inf")
    pos = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, k2, BLOCK_C):
        offs_c, mask_c, d_c, s, valid, positive = _column_tile(
            GRAM, c0, offs_r, mask_r, d_r, k, inv_tau, ACC, EPS2, BLOCK_C
        )
        masked = tl.where(valid, s, float("-inf"))
        new_top = tl.maximum(top, tl.max(masked, axis=1))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        total = total * tl.exp(top - shift) + tl.sum(tl.exp(masked - shift[:, None]), axis=1)
        top = new_top
        pos += tl.sum(tl.where(positive, s, 0.0), axis=1)
    return tl.where(mask_r, top + tl.log(tl.maximum(total, 1e-30)), 0.0), pos


@triton.jit(do_not_specialize=["k", "n"])  # k = 1, n = 1 would become constexprs
def _epilogue_fwd_kernel(
    GRAM,
    COLSUM,
    OUT,
    LSE,
    k,
    n,
    inv_tau_hi,
    inv_tau_lo,
    ACC: tl.constexpr,
    EPS2: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE: tl.constexpr,
):
    """Rows [pid BLOCK_R, +BLOCK_R) of NT-Xent over the 2K normalised columns, from their Gram:
    each row's lse to LSE and its share of the loss, (lse_i - S_i,pos(i)) / 2K + P_i log
    max(P_i, tiny) + log(K) / K (P = column sums / N), to OUT (2K,); SINGLE (one program holds
    every row): their sum, the loss, to OUT (0-d)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < 2 * k
    inv_tau = float_param(inv_tau_hi, inv_tau_lo, ACC)
    d_r = _norms(GRAM, offs_r, mask_r, 2 * k, ACC, EPS2)[1]
    lse, pos = _row_lse(GRAM, offs_r, mask_r, d_r, k, inv_tau, ACC, EPS2, BLOCK_R, BLOCK_C)
    tl.store(LSE + offs_r, lse, mask=mask_r)
    p = tl.load(COLSUM + offs_r, mask=mask_r, other=1.0).to(ACC) / n
    share = (lse - pos) / (2 * k) + p * tl.log(tl.maximum(p, TINY)) + tl.log(k.to(ACC)) / k
    share = tl.where(mask_r, share, 0.0)
    if SINGLE:
        tl.store(OUT, tl.sum(share))
    else:
        tl.store(OUT + offs_r, share, mask=mask_r)


@triton.jit(do_not_specialize=["k", "n"])  # k = 1, n = 1 would become constexprs
def _epilogue_bwd_kernel(
    GRAM,
    COLSUM,
    GRAD,
    LSE,
    DGRAM,
    DCOLSUM,
    k,
    n,
    inv_tau_hi,
    inv_tau_lo,
    ACC: tl.constexpr,
    EPS2: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SINGLE: tl.constexpr,
):
    """Rows [pid BLOCK_R, +BLOCK_R) of the gradients of `_epilogue_fwd_kernel`'s loss, given
    every row's lse in LSE (the forward's). With W = (P - [positive]) g / 2K (P the rows'
    softmax over j != i), dG_ij = W_ij / (d_i d_j tau) and, through the clamped norms d_i =
    sqrt(max(G_ii, eps^2)), dG_ii = -(sum_j W_ij S_ij + W_ji S_ji) / (2 d_i^2) where G_ii >=
    eps^2; dcolsum = g (log max(P_k, tiny) + [P_k >= tiny]) / N."""
    k2 = 2 * k
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < k2
    inv_tau = float_param(inv_tau_hi, inv_tau_lo, ACC)
    d2_r, d_r = _norms(GRAM, offs_r, mask_r, k2, ACC, EPS2)
    lse_r = tl.load(LSE + offs_r, mask=mask_r, other=0.0)
    g = tl.load(GRAD).to(ACC)
    scale = g / k2
    radial = tl.zeros([BLOCK_R], ACC)
    for c0 in range(0, k2, BLOCK_C):
        offs_c, mask_c, d_c, s, valid, positive = _column_tile(
            GRAM, c0, offs_r, mask_r, d_r, k, inv_tau, ACC, EPS2, BLOCK_C
        )
        w = (tl.where(valid, tl.exp(s - lse_r[:, None]), 0.0) - positive.to(ACC)) * scale
        ws = w * s
        if SINGLE:  # the tile is the whole matrix: W_ji S_ji is its transpose
            ws_t = tl.trans(ws)
        else:  # S_ji from G_ji itself (a Gram's two triangles may round differently)
            lse_c = tl.load(LSE + offs_c, mask=mask_c, other=0.0)
            s_t = tl.trans(
                _similarities(GRAM, offs_c, mask_c, d_c, offs_r, mask_r, d_r, k, inv_tau, ACC)[0]
            )
            w_t = tl.where(valid, tl.exp(s_t - lse_c[None, :]), 0.0) - positive.to(ACC)
            ws_t = w_t * scale * s_t
        radial += tl.sum(ws, axis=1) + tl.sum(ws_t, axis=1)
        dgram = w * inv_tau / (d_r[:, None] * d_c[None, :])
        tl.store(DGRAM + offs_r[:, None].to(tl.int64) * k2 + offs_c[None, :], dgram, mask=valid)
    diagonal = offs_r.to(tl.int64) * (k2 + 1)
    unclamped = tl.load(GRAM + diagonal, mask=mask_r, other=0.0).to(ACC) >= tl.full([], EPS2, ACC)
    tl.store(DGRAM + diagonal, tl.where(unclamped, -radial / (2 * d2_r), 0.0), mask=mask_r)
    p = tl.load(COLSUM + offs_r, mask=mask_r, other=1.0).to(ACC) / n
    dp = tl.log(tl.maximum(p, TINY)) + tl.where(p >= TINY, 1.0, 0.0)
    tl.store(DCOLSUM + offs_r, dp * (g / n), mask=mask_r)


# One program holds the whole 2K x 2K Gram up to this size (K <= 32; at 2K = 128 its backward
# spilled 24 B on 16 warps, sm_90a); beyond, programs take EPILOGUE_ROWS rows each, sweeping
# the columns EPILOGUE_COLUMNS at a time (the cost model: 8 rows beat 16 and 4 at K = 1000,
# 250 programs; benchmarks/static_notes.md section 18).
SINGLE_EPILOGUE = 64
EPILOGUE_ROWS = 8
EPILOGUE_COLUMNS = 128


def _epilogue_launch(gram: torch.Tensor) -> tuple[int, dict]:
    """(programs, constexprs and warps) of the epilogue kernels on `gram`."""
    k2, acc = gram.shape[0], gram.dtype
    single = k2 <= SINGLE_EPILOGUE
    block = max(16, triton.next_power_of_2(k2))
    rows, columns = (block, block) if single else (EPILOGUE_ROWS, EPILOGUE_COLUMNS)
    return triton.cdiv(k2, rows), dict(
        ACC=acc_dtype(acc),
        EPS2=NORM_EPS**2,
        TINY=torch.finfo(acc).tiny,
        BLOCK_R=rows,
        BLOCK_C=columns,
        SINGLE=single,
        num_warps=4,
    )


def _epilogue_args(gram: torch.Tensor, n: int, temperature: float) -> tuple[int, dict]:
    """(programs, the arguments both epilogue kernels take beside their tensors)."""
    programs, consts = _epilogue_launch(gram)
    return programs, dict(
        k=gram.shape[0] // 2, n=n, **split_floats(inv_tau=1.0 / temperature), **consts
    )


@torch.library.custom_op("fastcluster_cl::cc_cluster_epilogue_triton_fwd", mutates_args=())
def cluster_epilogue(
    gram: torch.Tensor, colsum: torch.Tensor, n: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the K-sized terms of the loss (0-d), every row's lse (2K,) for the backward), in the
    Gram's dtype, from the Gram of the 2K columns and their sums (`cluster_stats`): one
    single-program launch up to 32 clusters, else a program a row block and the sum of the
    rows' shares (`_epilogue_fwd_kernel`)."""
    gram, colsum = gram.contiguous(), colsum.contiguous()
    programs, args = _epilogue_args(gram, n, temperature)
    out = gram.new_empty(() if args["SINGLE"] else gram.shape[0])
    lse = gram.new_empty(gram.shape[0])
    with device_guard(gram):
        _epilogue_fwd_kernel[(programs,)](GRAM=gram, COLSUM=colsum, OUT=out, LSE=lse, **args)
    return (out if args["SINGLE"] else out.sum()), lse


@cluster_epilogue.register_fake
def _(gram, colsum, n, temperature):
    return gram.new_empty(()), gram.new_empty(gram.shape[0])


@torch.library.custom_op("fastcluster_cl::cc_cluster_epilogue_triton_bwd", mutates_args=())
def cluster_epilogue_backward(
    gram: torch.Tensor,
    colsum: torch.Tensor,
    n: int,
    temperature: float,
    lse: torch.Tensor,
    grad: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dgram, dL/dcolsum) of `cluster_epilogue`'s loss from its rows' lse
    (`_epilogue_bwd_kernel`, the forward's grid)."""
    gram, colsum = gram.contiguous(), colsum.contiguous()
    d_gram, d_colsum = torch.empty_like(gram), torch.empty_like(colsum)
    programs, args = _epilogue_args(gram, n, temperature)
    with device_guard(gram):
        _epilogue_bwd_kernel[(programs,)](
            GRAM=gram,
            COLSUM=colsum,
            GRAD=grad.to(gram.dtype).contiguous(),
            LSE=lse.contiguous(),
            DGRAM=d_gram,
            DCOLSUM=d_colsum,
            **args,
        )
    return d_gram, d_colsum


@cluster_epilogue_backward.register_fake
def _(gram, colsum, n, temperature, lse, grad):
    return gram.new_empty(gram.shape), colsum.new_empty(colsum.shape)


register_pair(
    cluster_epilogue,
    cluster_epilogue_backward,
    "triton",
    lambda inputs, outputs, grads: (
        *inputs,
        outputs[1],
        outputs[1].new_zeros(()) if grads[0] is None else grads[0],  # an unused loss
    ),
    wrt=(0, 1),
    materialize_grads=False,  # the lse is backward state: no zero fill for it
    save_result=False,
)


def cc_cluster_loss(
    logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float
) -> torch.Tensor:
    """CC cluster-level loss (see `fastcluster_cl.cc_cluster_loss`) with the fused kernels."""
    check_dtype(logits_a, logits_b)
    stats = cluster_stats if logits_a.shape[1] <= MAX_CLUSTERS else gram_stats
    gram, colsum = stats(logits_a.contiguous(), logits_b.contiguous())
    return cluster_epilogue(gram, colsum, logits_a.shape[0], temperature)[0]
