"""Student-t soft assignment (DEC / arXiv 2109.12714 center head) in Triton.

q_ik = softmax_k( -(alpha+1)/2 * log(1 + d_ik / alpha) ),  d_ik = ||h_i - mu_k||^2, computed as
||h_i||^2 - 2 h_i . mu_k + ||mu_k||^2 (clamped at 0) so the cross term is a tensor-core dot.

Forward (`_fwd_kernel`): each program takes BLOCK_M rows and a split of the center tiles
(BLOCK_K centers, `_BLOCK_K`, at most 64; `center_splits`, flash-decoding style, so that a
large K fills the GPU), so its registers and shared memory do not grow with K: for each tile it
builds the (BLOCK_M, BLOCK_K) distances (F in chunks of BLOCK_F, at most 32), writes the logits
into q and updates the row max and rescaled sum of exp (online softmax). With one split a
second pass over its rows of q turns the logits into probabilities; with several, each split's
(max, sum) pair goes to a partial buffer and `_normalize_kernel` merges them in a fixed order
(deterministic) and normalises one tile per program. Backward (`_bwd_kernel`, same grid, no
atomics) starts from the saved q: sum_k q dq per row (in the program with one split, else
`_row_dot_kernel` first), then each tile's distances again and g = dL/dd (N x K).
dh = 2 (rowsum(g) h - g mu) and dmu = -2 (g^T h - colsum(g) mu) are separate products, which
keeps them deterministic and the kernel free of an (N x F) accumulator: for bf16 features
`_gradient_product_kernel` (64 x 64 output tiles, 64 x 128 where those fill the GPU, the inner
dimension split where the tiles are few, `_common.product_splits`, merged in order by
`_gradient_merge_kernel`), else cuBLAS on the host.

bf16 features against float32 centers (AMP: the centers are an fp32 parameter) keep the
products on the tensor cores: each center chunk is split into three bf16 parts, mu = hi + mid +
lo (exactly, but for fp32 numbers whose parts fall below bf16's normal range), and h . mu is
the sum of three products of bf16 numbers, each exact in the fp32 accumulator: the cross term
carries the fp32 computation's error, not bf16's (two parts left 2^-18 relative of mu, 4.5-5x
the fp32 error at points near their centers: tests/backends/test_triton_kernels.py). The
gradient products split the fp32 factor(s) the same way (`_bf16_parts`).

Floors (N rows, K centers, F features, b bytes): forward 2 N K F FLOPs, N K logs/exps, reads
N F b ceil(K / BLOCK_K) (h once per center tile, L2-resident after the first) + P K F b
(P programs; the centers are L2-resident), writes N K acc floats twice and reads them once;
backward 2 N K F FLOPs in the kernel + 4 N K F in the two products, reads q and dq twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcluster_cl.backends.autograd.pairs import register_pair

from ._common import (
    SPLIT_PROGRAMS,
    acc_dtype,
    check_dtype,
    device_guard,
    dot,
    dot_precision,
    float_param,
    product_splits,
    round_to,
    split_floats,
    tile_splits,
    torch_acc_dtype,
    upcast_dots,
)

MAX_CENTERS = 1024
_BLOCK_M = 64
_BLOCK_K = 64  # centers per tile: every K up to MAX_CENTERS runs in ceil(K / 64) tiles
_BLOCK_F = 32  # features per chunk of the distance dot


@triton.jit
def _bf16_parts(x):
    """fp32 x as hi + mid + lo in bf16: exact (3 x 8 bits cover fp32's 24) but for parts below
    bf16's normal range. Products of bf16 parts are exact in an fp32 accumulator."""
    hi = round_to(x, tl.bfloat16)
    rest = x - hi.to(tl.float32)
    mid = round_to(rest, tl.bfloat16)
    lo = round_to(rest - mid.to(tl.float32), tl.bfloat16)
    return hi, mid, lo


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
    SPLIT_CENTERS: tl.constexpr,
):
    """(BLOCK_M, BLOCK_K) squared distances ||h_i - mu_k||^2 for one tile of centers,
    accumulated over F chunks; bf16 h against fp32 centers on the tensor cores when
    SPLIT_CENTERS (the one-pass anchor kernels keep the FP32 pipe: their registers are full)."""
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
        elif (
            SPLIT_CENTERS
            and H.dtype.element_ty == tl.bfloat16
            and MU.dtype.element_ty == tl.float32
        ):
            # AMP's bf16 features, fp32 centers: mu = hi + mid + lo in bf16 (exact: 3 x 8 bits
            # cover fp32's 24), three tensor-core products each exact in the fp32 accumulator
            hi, mid, lo = _bf16_parts(mu)
            cross += dot(h, tl.trans(hi), ACC, PREC, UPCAST)
            cross += dot(h, tl.trans(mid), ACC, PREC, UPCAST)
            cross += dot(h, tl.trans(lo), ACC, PREC, UPCAST)
        else:  # other mixed inputs (fp16 features, fp32 centers) on the FP32 pipe
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
    PART,
    alpha_hi,
    alpha_lo,
    n,
    K,
    F,
    stride_h,
    stride_mu,
    tiles_per_split,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Pass 1 over this split's center tiles writes the logits into Q and keeps the row max and
    the rescaled row sum of exp (online softmax). One split (not SPLIT): pass 2 turns the
    logits into q in place; else the (max, sum) pair goes to PART (2, splits, n)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    alpha = float_param(alpha_hi, alpha_lo, ACC)
    k_start = tl.program_id(1) * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + tiles_per_split * BLOCK_K, K)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    s = tl.zeros([BLOCK_M], ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
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
            True,
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
    if SPLIT:
        split, splits = tl.program_id(1), tl.num_programs(1)
        tl.store(PART + split * n + offs_m, m, mask=mask_m)
        tl.store(PART + (splits + split) * n + offs_m, s, mask=mask_m)
    else:
        tl.debug_barrier()  # pass 2 reads logits that other threads of this program wrote
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = mask_m[:, None] & (offs_k[None, :] < K)
            ptrs = Q + offs_m[:, None] * K + offs_k[None, :]
            logit = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, tl.exp(logit - m[:, None]) / s[:, None], mask=mask)


@triton.jit
def _normalize_kernel(
    Q,
    PART,
    n,
    K,
    splits,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """q = exp(logit - m) / s on one center tile of BLOCK_M rows, with the rows' (m, s) merged
    from the splits' partials in split order (run-to-run deterministic)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    s = tl.zeros([BLOCK_M], ACC)
    for split in range(0, splits):
        m_split = tl.load(PART + split * n + offs_m, mask=mask_m, other=0.0)
        s_split = tl.load(PART + (splits + split) * n + offs_m, mask=mask_m, other=0.0)
        m_new = tl.maximum(m, m_split)
        s = s * tl.exp(m - m_new) + s_split * tl.exp(m_split - m_new)
        m = m_new
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = mask_m[:, None] & (offs_k[None, :] < K)
    ptrs = Q + offs_m[:, None] * K + offs_k[None, :]
    logit = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, tl.exp(logit - m[:, None]) / s[:, None], mask=mask)


@triton.jit
def _row_dot(Q, DQ, offs_m, mask_m, K, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k q dq of BLOCK_M rows, over the center tiles in order."""
    qdq = tl.zeros(offs_m.shape, ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k[None, :] < K)
        q = tl.load(Q + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        dq = tl.load(DQ + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(ACC)
        qdq += tl.sum(q * dq, axis=1)
    return qdq


@triton.jit
def _row_dot_kernel(
    Q, DQ, QDQ, n, K, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """QDQ = sum_k q dq per row, for a backward whose center tiles are split."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    tl.store(QDQ + offs_m, _row_dot(Q, DQ, offs_m, mask_m, K, ACC, BLOCK_K), mask=mask_m)


@triton.jit
def _bwd_kernel(
    H,
    MU,
    Q,
    DQ,
    QDQ,
    G,
    alpha_hi,
    alpha_lo,
    n,
    K,
    F,
    stride_h,
    stride_mu,
    tiles_per_split,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """G = 2 dL/dd from the forward's q (the factor 2 of d's gradients taken here, free) on this
    split's center tiles: sum_k q dq (from QDQ when SPLIT, else over all K here), then each
    tile's distances again and its G."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    alpha = float_param(alpha_hi, alpha_lo, ACC)
    if SPLIT:
        qdq = tl.load(QDQ + offs_m, mask=mask_m, other=0.0)
    else:
        qdq = _row_dot(Q, DQ, offs_m, mask_m, K, ACC, BLOCK_K)
    k_start = tl.program_id(1) * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + tiles_per_split * BLOCK_K, K)
    for k0 in range(k_start, k_end, BLOCK_K):
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
            True,
        )
        q = tl.load(Q + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        dq = tl.load(DQ + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(ACC)
        dlogit = q * (dq - qdq[:, None])
        g = dlogit * (-(alpha + 1.0)) / (alpha + d)  # 2 dL/dd_ik
        tl.store(G + offs_m[:, None] * K + offs_k[None, :], g, mask=mask)


@triton.jit
def _gradient_product_kernel(
    A,
    B,
    X,
    SCALE,
    OUT,
    PART,
    rows,
    cols,
    inner,
    inner_per_split,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_x,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """OUT = SCALE[:, None] X - A B on the tensor cores at fp32's accuracy: A (fp32, the
    distances' gradient G or its transpose) as three bf16 parts; B as it is when bf16 (three
    products), else as three parts too (the six products of parts above 2^-24 relative). The
    Student-t backward's dh = rowsum(G) h - G mu and dmu = colsum(G) mu - G^T h. With SPLIT,
    this program's range of the inner dimension goes to PART[split] (`_gradient_merge_kernel`
    adds the splits and applies the rest)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < rows, offs_n < cols
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_start = tl.program_id(2) * inner_per_split
    for k0 in range(k_start, tl.minimum(k_start + inner_per_split, inner), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < inner
        a = tl.load(
            A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        a_hi, a_mid, a_lo = _bf16_parts(a)
        if B.dtype.element_ty == tl.bfloat16:
            acc += dot(a_hi, b, tl.float32, "ieee", UPCAST)
            acc += dot(a_mid, b, tl.float32, "ieee", UPCAST)
            acc += dot(a_lo, b, tl.float32, "ieee", UPCAST)
        else:
            b_hi, b_mid, b_lo = _bf16_parts(b)
            acc += dot(a_hi, b_hi, tl.float32, "ieee", UPCAST)
            acc += dot(a_hi, b_mid, tl.float32, "ieee", UPCAST)
            acc += dot(a_mid, b_hi, tl.float32, "ieee", UPCAST)
            acc += dot(a_hi, b_lo, tl.float32, "ieee", UPCAST)
            acc += dot(a_mid, b_mid, tl.float32, "ieee", UPCAST)
            acc += dot(a_lo, b_hi, tl.float32, "ieee", UPCAST)
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        part = PART + (tl.program_id(2) * rows + offs_m[:, None]) * cols + offs_n[None, :]
        tl.store(part, acc, mask=mask)
    else:
        _scaled_minus(acc, X, SCALE, OUT, offs_m, offs_n, rows, cols, stride_x)


@triton.jit
def _scaled_minus(product, X, SCALE, OUT, offs_m, offs_n, rows, cols, stride_x):
    """OUT = SCALE[:, None] X - product on one tile, rounded once to OUT's dtype."""
    mask_m = offs_m < rows
    mask = mask_m[:, None] & (offs_n < cols)[None, :]
    x = tl.load(X + offs_m[:, None] * stride_x + offs_n[None, :], mask=mask, other=0.0)
    scale = tl.load(SCALE + offs_m, mask=mask_m, other=0.0)
    out = round_to(scale[:, None] * x.to(tl.float32) - product, OUT.dtype.element_ty)
    tl.store(OUT + offs_m[:, None] * cols + offs_n[None, :], out, mask=mask)


@triton.jit
def _gradient_merge_kernel(
    PART,
    X,
    SCALE,
    OUT,
    rows,
    cols,
    splits,
    stride_x,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The split gradient product: its partial products added in split order (run-to-run
    deterministic), then OUT = SCALE[:, None] X - the sum."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < rows)[:, None] & (offs_n < cols)[None, :]
    product = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for split in range(0, splits):
        part = PART + (split * rows + offs_m[:, None]) * cols + offs_n[None, :]
        product += tl.load(part, mask=mask, other=0.0)
    _scaled_minus(product, X, SCALE, OUT, offs_m, offs_n, rows, cols, stride_x)


def _blocks(k: int, f: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_F): centers in tiles of at most `_BLOCK_K`, features in chunks of at most
    `_BLOCK_F` (64-feature chunks spilled the backward's registers on sm_90, the static
    report)."""
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


def center_splits(n: int, k: int, block_k: int) -> tuple[int, int]:
    """(splits, center tiles per split) of a launch over n rows and k centers
    (`_common.tile_splits`)."""
    return tile_splits(triton.cdiv(n, _BLOCK_M), triton.cdiv(k, block_k))


# The forward and backward as torch.library ops with fake implementations (custom_op around the
# launchers, as nt_xent's); `backends.autograd.pairs.register_pair` is their autograd.


@torch.library.custom_op("fastcluster_cl::student_t_triton_fwd", mutates_args=())
def student_t_forward(h: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    """(h (N x F), centers (K x F), alpha) -> q (N x K) in the accumulation dtype."""
    (n, f), k = h.shape, centers.shape[0]
    consts = _launch_args(h, centers, alpha)
    acc = torch_acc_dtype(h.dtype)
    q = torch.empty(n, k, dtype=acc, device=h.device)
    splits, per_split = center_splits(n, k, consts["BLOCK_K"])
    part = torch.empty(2, splits, n, dtype=acc, device=h.device) if splits > 1 else q
    with device_guard(h):
        _fwd_kernel[(triton.cdiv(n, _BLOCK_M), splits)](
            H=h,
            MU=centers,
            Q=q,
            PART=part,
            n=n,
            K=k,
            F=f,
            stride_h=h.stride(0),
            stride_mu=centers.stride(0),
            tiles_per_split=per_split,
            SPLIT=splits > 1,
            **consts,
        )
        if splits > 1:
            _normalize_kernel[(triton.cdiv(n, _BLOCK_M), triton.cdiv(k, consts["BLOCK_K"]))](
                Q=q,
                PART=part,
                n=n,
                K=k,
                splits=splits,
                ACC=consts["ACC"],
                BLOCK_M=_BLOCK_M,
                BLOCK_K=consts["BLOCK_K"],
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
    dq = dq.contiguous()
    splits, per_split = center_splits(n, k, consts["BLOCK_K"])
    qdq = torch.empty(n, dtype=acc, device=h.device) if splits > 1 else g
    with device_guard(h):
        if splits > 1:
            _row_dot_kernel[(triton.cdiv(n, _BLOCK_M),)](
                Q=q,
                DQ=dq,
                QDQ=qdq,
                n=n,
                K=k,
                ACC=consts["ACC"],
                BLOCK_M=_BLOCK_M,
                BLOCK_K=consts["BLOCK_K"],
            )
        _bwd_kernel[(triton.cdiv(n, _BLOCK_M), splits)](
            H=h,
            MU=centers,
            Q=q,
            DQ=dq,
            QDQ=qdq,
            G=g,
            n=n,
            K=k,
            F=f,
            stride_h=h.stride(0),
            stride_mu=centers.stride(0),
            tiles_per_split=per_split,
            SPLIT=splits > 1,
            **consts,
        )
    # d = |h|^2 - 2 h.mu + |mu|^2, G = 2 dL/dd: dh = rowsum(G) h - G mu and
    # dmu = colsum(G) mu - G^T h: with bf16 features on the tensor cores (`_gradient_product`),
    # else each one torch product added onto its scaled rows
    if h.dtype == torch.bfloat16:
        return _gradient_product(g, centers, h, g.sum(1)), _gradient_product(
            g.T, h, centers, g.sum(0)
        )
    h_acc, mu = h.to(acc), centers.to(acc)
    dh = torch.addmm(h_acc * g.sum(1, keepdim=True), g, mu, alpha=-1.0)
    d_mu = torch.addmm(mu * g.sum(0)[:, None], g.T, h_acc, alpha=-1.0)
    return dh.to(h.dtype), d_mu.to(centers.dtype)


_PRODUCT_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
# Where they still fill the GPU (`SPLIT_PROGRAMS` / 2 tiles), 64 x 128 output tiles on one
# warpgroup (sm_90a: 199-254 registers, no spills, 2 CTAs/SM): a third less L2 traffic a
# multiply-add (benchmarks/static_notes.md section 28).
_LARGE_PRODUCT_BLOCKS = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32)


def product_blocks(rows: int, cols: int) -> dict:
    """The gradient product's tiles for a rows x cols output."""
    large = _LARGE_PRODUCT_BLOCKS
    tiles = triton.cdiv(rows, large["BLOCK_M"]) * triton.cdiv(cols, large["BLOCK_N"])
    return large if tiles >= SPLIT_PROGRAMS // 2 else _PRODUCT_BLOCKS


def _gradient_product(
    a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """scale[:, None] x - a b in x's dtype (`_gradient_product_kernel`, split-K and
    `_gradient_merge_kernel` where its output tiles are few): a fp32 (G or G^T, any strides),
    b bf16 or fp32, x with unit column stride."""
    (rows, inner), cols = a.shape, b.shape[1]
    out = torch.empty(rows, cols, dtype=x.dtype, device=x.device)
    blocks = product_blocks(rows, cols)
    grid = (triton.cdiv(rows, blocks["BLOCK_M"]), triton.cdiv(cols, blocks["BLOCK_N"]))
    splits, per_split = product_splits(grid[0] * grid[1], inner, blocks["BLOCK_K"])
    part = (
        torch.empty(splits, rows, cols, dtype=torch.float32, device=x.device) if splits > 1 else out
    )
    with device_guard(x):
        _gradient_product_kernel[(*grid, splits)](
            A=a,
            B=b,
            X=x,
            SCALE=scale,
            OUT=out,
            PART=part,
            rows=rows,
            cols=cols,
            inner=inner,
            inner_per_split=per_split,
            stride_am=a.stride(0),
            stride_ak=a.stride(1),
            stride_bk=b.stride(0),
            stride_bn=b.stride(1),
            stride_x=x.stride(0),
            UPCAST=upcast_dots(torch.bfloat16),
            SPLIT=splits > 1,
            **blocks,
        )
        if splits > 1:
            _gradient_merge_kernel[grid](
                PART=part,
                X=x,
                SCALE=scale,
                OUT=out,
                rows=rows,
                cols=cols,
                splits=splits,
                stride_x=x.stride(0),
                BLOCK_M=blocks["BLOCK_M"],
                BLOCK_N=blocks["BLOCK_N"],
            )
    return out


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
    if (h.dtype, centers.dtype) != (torch.bfloat16, torch.float32):  # AMP's pair stays mixed
        common = torch.promote_types(h.dtype, centers.dtype)
        h, centers = h.to(common), centers.to(common)
    return student_t_forward(h.contiguous(), centers.contiguous(), float(alpha))
