"""Fused NT-Xent (SimCLR / CC instance loss) in Triton: the 2N x 2N similarity matrix is never
written.

Z = [z_a; z_b] (2N x D, any of fp16/bf16/fp32/fp64), zn_i = z_i / max(||z_i||, 1e-12),
S = zn zn^T / tau, pos(i) = i + N for i < N else i - N.

Prologue (`_scale_rows_kernel`, one O(N D) launch over the pairs (i, i + N)): each row is
multiplied by the exact power of two p_i that brings its largest element into [1, 2), giving Zs
(stored as fp16 for fp16 and bf16 inputs, else in the input dtype), rs_i = 1 / max(||zs_i||,
eps p_i) (so zn_i = zs_i rs_i exactly), the clamped true norm, and per pair
dist = 1 - tau S_i,pos(i) = ||zn_i - zn_pos||^2 / 2, free of the cancellation of 1 - cos. The
scaling makes rows of any finite magnitude safe (|z| ~ 1e19 in fp32 no longer overflows
z_i . z_j), and the fp16 copy of bf16 inputs holds the same values (but for elements below
2^-14 of their row's largest, which lose bits as fp16 subnormals, and below 2^-24, which flush:
negligible against the bf16 rounding of the row's large elements) while letting the backward
round its tile weights to fp16's 11-bit rather than bf16's 8-bit mantissa.

Forward (`_lse_fwd_kernel`, row-parallel; column splits below): each program owns BLOCK_M rows,
keeps them in registers, and streams every column block of Zs (of its split):
x = S log2(e) = (zs_I zs_J^T) q_I rs_J with q = rs log2(e) / tau (one row scale, exp2 on the
tile). Per row it accumulates
sum_{k != i} 2^(x_ik - shift): shift = log2(e)/tau (|S| <= 1/tau) when exp(-2/tau) stays a
normal number, else the online row max. The diagonal and padding masks are applied only on the
tiles that hold them, and so is the positive pair: with t = log sum_neg exp(S_ik - S_i,pos(i))
(= ln(total) + dist/tau under the fixed shift: no large terms cancel), the row's loss is
lse_i - S_i,pos(i) = log(1 + e^t), accurate even when it is tiny. Writes lse_i and that loss.
Saved for backward: Zs, rs, the norms, the row losses, the backward's per-row weights
(u = exp(1/tau - lse) with the fixed shift, else lse log2(e); 2N floats each) and each
writing program's largest loss (LOSS_MAX).

Backward (`_grad_kernel`, row-parallel, no atomics; column splits below): S is symmetric, so
P_ji = exp(S_ij - lse_j) comes from the same tile as P_ij = exp(S_ij - lse_i):

    g_i = 1/(tau*2N) * sum_j A_ij zn_j,   A_ij = P_ij + P_ji - 2 [j = pos(i)],
    dz_i = (g_i - zn_i (zn_i . g_i)) / ||z_i||      (the normalisation's backward, fused)

With the fixed shift A_ij = 2^(x - shift) (u_i + u_j), u = 2^(shift - lse log2 e): one exp per
element. The positive pair's -2 joins its weight before the weights are rounded for the tensor
cores: A_i,pos(i) is close to 2 for correlated views at small tau, and subtracting 2 zn_pos after
a rounded product cancelled catastrophically (20x gradient errors in bf16 at tau 0.05). A zn_J is
computed as (A diag(rs_J) sigma) zs_J / sigma with a power of two sigma per launch
(`weight_scale`): the forward writes each program's largest row loss (LOSS_MAX), the backward
bounds |A rs| <= 2 min(max loss, 1) from them, so the scaled weights cannot overflow fp16 and
the largest keep fp16's 11-bit precision however solved the batch (a fixed 2^14 flushed every
weight of rows whose loss was below ~1e-11).

Per-row gradients (reduction="none"; `PER_ROW`): row i's loss has the incoming gradient g_i,
A_ij = g_i P_ij + g_j P_ji (fixed shift: 2^(x - shift) (g_i u_i + g_j u_j), still one exp),
the positive's g_i (P_i,pos - 1) + g_pos (P_pos,i - 1). The kernel takes c = g / max|g| (on the
device, no host sync), so |c| <= 1 and the weight bound holds as for the mean, and scales the
rows by max|g| / tau. Weights below ~2^-38 of the largest bound still flush (negligible in the
batch's gradient). The mean path is unchanged (a constexpr branch: the same sm_90 code).

Column splits (`column_splits`, flash-decoding's split-K): where the row blocks alone would
leave most SMs idle (2N up to a few thousand rows, and a rank's rows against every gathered
column under gather_distributed), each launch also cuts its columns into splits, one program
per (row block, split). The forward's splits write their rows' negative sums (and, without the
fixed shift, their maxima) and `_lse_merge_kernel` adds them in split order; the backward's
write their rows' sum_j A_ij zn_j in the accumulation dtype and `_grad_merge_kernel` adds them
in split order and runs the epilogue. No atomics: run-to-run deterministic, and the split count
depends on the shape only, not the GPU.

Floors (R = 2N rows, D features, b bytes per input element):
  forward  2 R^2 D FLOPs, R^2 exps. Reads of Zs: own rows once, all columns once per row block
           (R / BLOCK_M passes, L2-resident at these sizes); byte floor 2 R D b read + 8 R written.
  backward 4 R^2 D FLOPs (the S tile and A zs_J), R^2 exps with the fixed shift. Reads of Zs:
           own rows twice (tile operand, epilogue), all columns once per row block, lse once per
           row block; writes R D b (split: splits x R x D accumulation-dtype partials, written
           and read back once more, L2-resident at the sizes that split).
The symmetric upper-triangle variant (each tile serving its rows and, transposed, its columns;
half the GEMM/exp work, at the price of relaxed atomics on the column sums / column gradient
rows, whose summation order is not deterministic) is `symmetric_masked_lse` + `symmetric_grad`.
Which one the fast path (`nt_xent_triton_fwd`) uses awaits a GPU measurement, so `SYMMETRIC` (env
FASTCLUSTER_CL_SYMMETRIC=1) defaults to off: the row-parallel kernels.

Rows wider than the registers hold (`wide`: MAX_FEATURES < D <= MAX_ROW_FEATURES, e.g.
ResNet-50's 2048 features): a program keeps no rows; each tile's scores sum feature chunks of
both operands streamed from L2 (`chunked_scores`). The backward is two GEMMs per slab of
`slab_rows` rows (`_wide_grad`): `_weight_slab_kernel` writes the slab's scaled tile weights
sigma A_ij rs_j against every column (Zs's dtype, the same rounding as the row kernels'
tensor-core operand; the slab is never larger than Zs), then `_slab_product_kernel`
multiplies them with Zs (split-K where its output tiles are few), and `_grad_merge_kernel`
adds the slab's splits and runs the epilogue over whole rows. Each part is a GEMM of
(2N)^2 D multiply-adds, predicted L2-bound on an H100: the whole loss 2.5x the floor at
2N = 8192, 2.2x at 65536 (the earlier backward, which recomputed the scores for each block
of 512 features, 9.4-10.7x).

Row-range primitives for the distributed backend (each rank owns rows [row_start, row_end) of the
all-gathered raw Z): `lse_rows` and `grad_rows`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastcluster_cl.backends.autograd import nt_xent as nt_xent_autograd
from fastcluster_cl.backends.autograd.nt_xent import (
    fake_grad_rows,
    fake_row_values,
    register_fast_path,
)
from fastcluster_cl.backends.numerics import fixed_shift_safe, l2_normalize, l2_normalize_backward

from ._common import (
    MAX_FEATURES,
    NORM_EPS,
    SPLIT_PROGRAMS,
    acc_dtype,
    check_dtype,
    device_guard,
    dot,
    dot_precision,
    even_splits,
    feature_block,
    float_param,
    product_splits,
    round_to,
    split_floats,
    torch_acc_dtype,
    upcast_dots,
)
from ._common import is_interpreted as _is_interpreted

_EPS = tl.constexpr(NORM_EPS)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
SYMMETRIC = os.environ.get("FASTCLUSTER_CL_SYMMETRIC", "0") == "1"


@triton.jit
def _load_rows(Z, stride, offs, mask, D, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(
        Z + offs[:, None] * stride + offs_d[None, :],
        mask=mask[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )


@triton.jit
def _pow2_floor(x, ACC: tl.constexpr):
    """The largest power of two <= x (x positive and normal): the exponent bits alone, exact."""
    if ACC == tl.float64:
        return (x.to(tl.int64, bitcast=True) & 0x7FF0000000000000).to(tl.float64, bitcast=True)
    else:
        return (x.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def scaled_rows(z, TINY: tl.constexpr, ACC: tl.constexpr):
    """(zs, rs, norms) of loaded rows z: zs = p z (ACC) with p the power of two putting the
    row's largest |element| in [1, 2) (exact), rs = 1 / max(||zs||, eps p) (so zn = zs rs),
    norms = max(||z||, eps): finite for rows of any finite magnitude."""
    z = z.to(ACC)
    p = 1.0 / _pow2_floor(tl.maximum(tl.max(tl.abs(z), axis=1), TINY), ACC)
    zs = z * p[:, None]
    ns = tl.sqrt(tl.sum(zs * zs, axis=1))
    return zs, 1.0 / tl.maximum(ns, p * _EPS), tl.maximum(ns / p, _EPS)


@triton.jit
def _scale_row_block(
    Z,
    ZS,
    RS,
    NORMS,
    offs_r,
    mask_r,
    D,
    stride,
    TINY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Zs = p z (p the power of two putting the row's largest |element| in [1, 2); exact),
    rs = 1 / max(||zs||, eps p), norms = max(||z||, eps). Returns zn (ACC) and the norms."""
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_r[:, None] & (offs_d[None, :] < D)
    z = tl.load(Z + offs_r[:, None] * stride + offs_d[None, :], mask=mask, other=0.0)
    zs, rs, norms = scaled_rows(z, TINY, ACC)
    tl.store(ZS + offs_r[:, None] * D + offs_d[None, :], zs.to(ZS.dtype.element_ty), mask=mask)
    tl.store(RS + offs_r, rs, mask=mask_r)
    tl.store(NORMS + offs_r, norms, mask=mask_r)
    return zs * rs[:, None], norms


@triton.jit
def _scale_rows_kernel(
    ZA,
    ZB,
    ZS,
    RS,
    NORMS,
    DIST,
    half,
    D,
    stride_a,
    stride_b,
    TINY: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The prologue over pairs (i, i + N) of Z = [z_a; z_b], read from the two views (Z is never
    concatenated): both rows' Zs, rs and norms, and the pair's dist = 1 - zn_i . zn_pos(i) = 1 -
    tau S_i,pos(i), as ||zn_i - zn_pos||^2 / 2 for unit rows (no cancellation for correlated
    views); rows clamped by eps (||z|| < eps) are not unit."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < half
    zn_a, norm_a = _scale_row_block(
        ZA, ZS, RS, NORMS, offs_r, mask_r, D, stride_a, TINY, ACC, BLOCK_D
    )
    zn_b, norm_b = _scale_row_block(
        ZB, ZS + half * D, RS + half, NORMS + half, offs_r, mask_r, D, stride_b, TINY, ACC, BLOCK_D
    )
    gap = zn_a - zn_b
    dist = tl.where(
        (norm_a > _EPS) & (norm_b > _EPS),
        0.5 * tl.sum(gap * gap, axis=1),
        1.0 - tl.sum(zn_a * zn_b, axis=1),
    )
    tl.store(DIST + offs_r, dist, mask=mask_r)


@triton.jit
def row_block(Z, RS, inv_tau, offs_m, mask_m, D, BLOCK_D: tl.constexpr):
    """A program's own rows: (shift = log2(e)/tau, zs_I, rs_I, q_I = rs_I shift), where
    x = S log2(e) = (zs_I zs_J^T) q_I rs_J on every tile."""
    shift = inv_tau * _LOG2E
    zi = _load_rows(Z, D, offs_m, mask_m, D, BLOCK_D)
    ri = tl.load(RS + offs_m, mask=mask_m, other=1.0)
    return shift, zi, ri, ri * shift


@triton.jit
def chunked_scores(
    Z,
    offs_m,
    mask_m,
    offs_n,
    mask_n,
    D,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """zs_I zs_J^T of a tile over feature chunks of BLOCK_K, both operands loaded per chunk:
    rows wider than the registers hold (the forward's `WIDE`, the backward's weight slab); the
    rows' chunks come back from L2."""
    s = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        in_row = (k0 + offs_k)[None, :] < D
        a = tl.load(
            Z + offs_m[:, None] * D + (k0 + offs_k)[None, :],
            mask=mask_m[:, None] & in_row,
            other=0.0,
        )
        b = tl.load(
            Z + offs_n[:, None] * D + (k0 + offs_k)[None, :],
            mask=mask_n[:, None] & in_row,
            other=0.0,
        )
        s += dot(a, tl.trans(b), ACC, PREC, UPCAST)
    return s


@triton.jit
def tile_scores(
    Z,
    zi,
    zj,
    offs_m,
    mask_m,
    offs_n,
    mask_n,
    D,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WIDE: tl.constexpr,
):
    """zs_I zs_J^T of a tile: from the held rows zi and the loaded columns zj, or for rows too
    wide to hold (`WIDE`) over feature chunks (`chunked_scores`; zi, zj unused)."""
    if WIDE:
        return chunked_scores(
            Z, offs_m, mask_m, offs_n, mask_n, D, ACC, PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K
        )
    else:
        return dot(zi, tl.trans(zj), ACC, PREC, UPCAST)


@triton.jit
def _positive_rows(offs_m, half):
    return tl.where(offs_m < half, offs_m + half, offs_m - half)


@triton.jit
def _overlaps(c0, BLOCK_N: tl.constexpr, lo, hi):
    """Whether columns [c0, c0 + BLOCK_N) meet [lo, hi)."""
    return (lo < hi) & (c0 < hi) & (lo < c0 + BLOCK_N)


@triton.jit
def _edge_tile(c0, BLOCK_N: tl.constexpr, row_lo, BLOCK_M: tl.constexpr, rows_total):
    """Whether the tile holds a diagonal element S_ii or padding columns: only those tiles pay
    for the masks."""
    return _overlaps(c0, BLOCK_N, row_lo, row_lo + BLOCK_M) | (c0 + BLOCK_N > rows_total)


@triton.jit
def _positive_tile(c0, BLOCK_N: tl.constexpr, row_lo, BLOCK_M: tl.constexpr, half):
    """Whether the tile holds a positive pair (i, pos(i)) of the rows [row_lo, row_lo + BLOCK_M)."""
    row_hi = row_lo + BLOCK_M
    return _overlaps(c0, BLOCK_N, row_lo + half, tl.minimum(row_hi, half) + half) | _overlaps(
        c0, BLOCK_N, tl.maximum(row_lo, half) - half, row_hi - half
    )


@triton.jit
def _expm1(x, ACC: tl.constexpr):
    """exp(x) - 1 without the cancellation of the difference for small |x|: a series there in
    fp32 (its error, ~1e-9, is below fp32's), Kahan's (u - 1) x / log(u) in fp64."""
    u = tl.exp(x)
    if ACC == tl.float64:
        return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * x / tl.log(u)))
    else:
        series = x * (
            1.0
            + x
            * (
                0.5
                + x
                * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (1.0 / 720 + x * (1.0 / 5040)))))
            )
        )
        return tl.where(tl.abs(x) < 0.1, series, u - 1.0)


@triton.jit
def _softplus(t, ACC: tl.constexpr):
    """log(1 + exp(t)), accurate where exp(t) is tiny: log1p(y) by a series in fp32 (error
    ~1e-9), by Kahan's log(w) y / (w - 1), w = 1 + y, in fp64."""
    y = tl.exp(tl.minimum(t, 15.0))
    if ACC == tl.float64:
        w = 1.0 + y
        log1p = tl.where(w == 1.0, y, tl.log(w) * y / (w - 1.0))
    else:
        series = y * (
            1.0
            - y
            * (
                0.5
                - y * (1.0 / 3 - y * (0.25 - y * (0.2 - y * (1.0 / 6 - y * (1.0 / 7 - y * 0.125)))))
            )
        )
        log1p = tl.where(y < 0.1, series, tl.log(1.0 + y))
    return tl.where(t > 15.0, t + tl.exp(-t), log1p)


@triton.jit
def row_logits(s, q_i, shift, FIXED_SHIFT: tl.constexpr):
    """A tile's base-2 logits x = s q_I (= S log2(e)) from its scores, less the fixed shift
    where it applies: one FFMA an element (a multiply and a subtraction before: sm_90a 524 ->
    460 instructions a 64 x 128 forward tile, benchmarks/static_notes.md section 29)."""
    if FIXED_SHIFT:
        return tl.fma(s, q_i[:, None], -shift)
    else:
        return s * q_i[:, None]


@triton.jit
def tile_logits(s, q_i, r_j, shift, FIXED_SHIFT: tl.constexpr):
    """`row_logits` of scores zs_I zs_J^T, whose columns scale by rs_J."""
    return row_logits(s * r_j[None, :], q_i, shift, FIXED_SHIFT)


@triton.jit
def accumulate_negatives(x, total, m_i, FIXED_SHIFT: tl.constexpr):
    """Add a tile's 2^x (`row_logits`, masked entries -inf) to the running row sums: x is
    already relative to the fixed shift, else relative to the online row max m_i (rescaling
    the sum when it grows). (total, m_i)."""
    if FIXED_SHIFT:
        return total + tl.sum(tl.exp2(x), axis=1), m_i
    else:
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        return (total * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1), m_new)


@triton.jit
def row_losses(total, m_i, dist, inv_tau, FIXED_SHIFT: tl.constexpr, ACC: tl.constexpr):
    """(lse, loss) of rows whose negatives summed to `total` (see `accumulate_negatives`), with
    dist = 1 - tau S_pos: t = log sum_neg exp(S_ik - S_pos) (= ln(total) + dist / tau under the
    fixed shift: no large terms cancel), loss = log(1 + e^t), lse = S_pos + loss."""
    if FIXED_SHIFT:
        t = tl.log2(total) * _LN2 + dist * inv_tau
    else:
        t = (tl.log2(total) + m_i) * _LN2 - (1.0 - dist) * inv_tau
    loss = _softplus(t, ACC)
    return (1.0 - dist) * inv_tau + loss, loss


@triton.jit
def column_range(rows_total, split_columns, SPLIT: tl.constexpr):
    """The columns [lo, hi) of this program's split (program_id(1)); without SPLIT all of them
    from a constant 0, which keeps the masked tiles' branches cold: a loop from a
    program-dependent start compiled them into selects on every tile (sm_90a: 429 -> 567
    instructions a backward tile, static_notes.md section 11)."""
    if SPLIT:
        lo = tl.program_id(1) * split_columns
        return lo, tl.minimum(lo + split_columns, rows_total)
    else:
        return 0, rows_total


@triton.jit
def _lse_fwd_kernel(
    Z,
    RS,
    DIST,
    LSE,
    ROW_LOSS,
    ROW_W,
    LOSS_MAX,
    PART,
    inv_tau_hi,
    inv_tau_lo,
    rows_total,
    half,
    D,
    row_start,
    row_end,
    split_columns,
    SPLIT: tl.constexpr,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WIDE: tl.constexpr = False,
    BLOCK_K: tl.constexpr = 16,
):
    """Rows [row_start, row_end) against the columns of `column_range`. SPLIT: the row sums
    and maxima of split program_id(1) go to PART (2 x splits x rows) for `_lse_merge_kernel`;
    else the program sweeps every column and writes the rows' results. WIDE: the rows are not
    held, each tile's scores sum feature chunks of BLOCK_K (`chunked_scores`)."""
    pid = tl.program_id(0)
    row_lo = row_start + pid * BLOCK_M
    offs_m = row_lo + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    inv_tau = float_param(inv_tau_hi, inv_tau_lo, ACC)
    shift, zi, ri, qi = row_block(Z, RS, inv_tau, offs_m, mask_m, D, BLOCK_D)
    pos = _positive_rows(offs_m, half)
    total = tl.zeros([BLOCK_M], ACC)  # sum over the negatives k != i, pos(i)
    # The online max starts at the lower bound of x (-shift), not -inf: a tile that masks every
    # column of a row then rescales by 2^0, not 2^(-inf + inf) = NaN.
    m_i = tl.full([BLOCK_M], 0.0, ACC) - shift
    col_lo, col_hi = column_range(rows_total, split_columns, SPLIT)
    for c0 in range(col_lo, col_hi, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < rows_total
        zj = _load_rows(Z, D, offs_n, mask_n, D, BLOCK_D)  # (unused when WIDE)
        rj = tl.load(RS + offs_n, mask=mask_n, other=1.0)
        s = tile_scores(
            Z,
            zi,
            zj,
            offs_m,
            mask_m,
            offs_n,
            mask_n,
            D,
            ACC,
            PREC,
            UPCAST,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            WIDE,
        )
        x = tile_logits(s, qi, rj, shift, FIXED_SHIFT)
        if _edge_tile(c0, BLOCK_N, row_lo, BLOCK_M, rows_total) | _positive_tile(
            c0, BLOCK_N, row_lo, BLOCK_M, half
        ):
            negative = (
                mask_n[None, :]
                & (offs_m[:, None] != offs_n[None, :])
                & (offs_n[None, :] != pos[:, None])
            )
            x = tl.where(negative, x, float("-inf"))
        total, m_i = accumulate_negatives(x, total, m_i, FIXED_SHIFT)
    if SPLIT:
        store_split_sums(PART, total, m_i, offs_m - row_start, row_end - row_start, mask_m)
    else:
        _store_row_results(
            LSE,
            ROW_LOSS,
            ROW_W,
            LOSS_MAX,
            DIST,
            total,
            m_i,
            inv_tau,
            offs_m,
            mask_m,
            row_start,
            half,
            FIXED_SHIFT,
            ACC,
        )


@triton.jit
def store_split_sums(PART, total, m_i, local, rows, mask):
    """A split's row sums and maxima (`accumulate_negatives`) into PART (2 x splits x rows):
    split s = program_id(1) at s rows, its maxima splits rows further (`_lse_merge_kernel`)."""
    part = PART + tl.program_id(1) * rows + local
    tl.store(part, total, mask=mask)
    tl.store(part + tl.num_programs(1) * rows, m_i, mask=mask)


@triton.jit
def sum_split_rows(
    PART, local, mask, size, splits, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    """The splits' partial rows at `local` (split s's block `size` elements after split
    s - 1's), added in split order: the backward merges' first step."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for s in range(0, splits):
        acc += tl.load(PART + s * size + local, mask=mask, other=0.0)
    return acc


@triton.jit
def _store_row_results(
    LSE,
    ROW_LOSS,
    ROW_W,
    LOSS_MAX,
    DIST,
    total,
    m_i,
    inv_tau,
    offs_m,
    mask_m,
    row_start,
    half,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
):
    """lse, the row loss and the backward's row weight of rows whose negatives summed to
    (total, m_i) (`accumulate_negatives`), and their largest loss at LOSS_MAX[program_id(0)]
    (`weight_scale`)."""
    dist = tl.load(DIST + tl.where(offs_m < half, offs_m, offs_m - half), mask=mask_m, other=0.0)
    lse, loss = row_losses(total, m_i, dist, inv_tau, FIXED_SHIFT, ACC)
    tl.store(LSE + offs_m - row_start, lse, mask=mask_m)
    tl.store(ROW_W + offs_m - row_start, _row_weight(lse, inv_tau, FIXED_SHIFT), mask=mask_m)
    tl.store(ROW_LOSS + offs_m - row_start, loss, mask=mask_m)
    tl.store(LOSS_MAX + tl.program_id(0), tl.max(tl.where(mask_m, loss, 0.0), axis=0))


@triton.jit
def _lse_merge_kernel(
    PART,
    DIST,
    LSE,
    ROW_LOSS,
    ROW_W,
    LOSS_MAX,
    inv_tau_hi,
    inv_tau_lo,
    half,
    row_start,
    row_end,
    splits,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The split forward's rows: their column ranges' sums merged in split order (under the
    fixed shift a plain sum; else each rescaled to the largest maximum), then as unsplit."""
    offs_m = row_start + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask_m = offs_m < row_end
    rows = row_end - row_start
    inv_tau = float_param(inv_tau_hi, inv_tau_lo, ACC)
    m_i = tl.full([BLOCK], float("-inf"), ACC)
    if not FIXED_SHIFT:
        for s in range(0, splits):
            m_s = tl.load(PART + (splits + s) * rows + offs_m - row_start, mask=mask_m, other=0.0)
            m_i = tl.maximum(m_i, m_s)
    total = tl.zeros([BLOCK], ACC)
    for s in range(0, splits):
        part = tl.load(PART + s * rows + offs_m - row_start, mask=mask_m, other=0.0)
        if FIXED_SHIFT:
            total += part
        else:
            m_s = tl.load(PART + (splits + s) * rows + offs_m - row_start, mask=mask_m, other=0.0)
            total += part * tl.exp2(m_s - m_i)
    _store_row_results(
        LSE,
        ROW_LOSS,
        ROW_W,
        LOSS_MAX,
        DIST,
        total,
        m_i,
        inv_tau,
        offs_m,
        mask_m,
        row_start,
        half,
        FIXED_SHIFT,
        ACC,
    )


# The backward's scan of the forward programs' largest losses takes this many a step.
LOSS_SCAN_STEP = 1024


@triton.jit
def largest(X, count, BLOCK: tl.constexpr = LOSS_SCAN_STEP):
    """max(X[0:count], 0) in fp32, BLOCK a step: the batch's largest row loss from the
    forward's per-program maxima (LOSS_MAX)."""
    offs = tl.arange(0, BLOCK)
    top = tl.zeros([BLOCK], tl.float32)
    for b0 in range(0, count, BLOCK):
        got = tl.load(X + b0 + offs, mask=b0 + offs < count, other=0.0)
        top = tl.maximum(top, got.to(tl.float32))
    return tl.max(top, axis=0)


@triton.jit
def weight_scale(bound):
    """The power of two sigma = 2^(15 - ceil(log2 bound)) (bound clamped to [2^-100, 2]) by
    which the backward multiplies its tile weights (all at most `bound`) before their cast to
    fp16 and divides out of the fp32 sum: the scaled weights stay at most 2^15 (fp16's largest
    is 65504) and the largest of them keep fp16's 11-bit precision, the ~1/(2N) weights of a
    large batch clear of its subnormals (unscaled, 2N = 65536 with ||z|| ~ 1e3 flushed 72% of
    them), however small the losses. Exact: built on the bits."""
    bits = tl.minimum(tl.maximum(bound, 7.888609052210118e-31), 2.0).to(tl.int32, bitcast=True)
    ceil_log2 = ((bits >> 23) & 255) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return ((142 - ceil_log2) << 23).to(tl.float32, bitcast=True)


@triton.jit
def nt_xent_weight_scale(LOSS_MAX, loss_blocks):
    """`weight_scale` of NT-Xent's tile weights: |A_ij| <= m_i + m_j with m = 1 - e^-loss (a
    negative's P_ij <= 1 - P_i,pos; the positive's |P - 1| = m), m <= min(loss, 1), rs <= 1."""
    return weight_scale(2.0 * tl.minimum(largest(LOSS_MAX, loss_blocks), 1.0))


@triton.jit
def _row_weight(lse, inv_tau, FIXED_SHIFT: tl.constexpr):
    """The backward's per-row term w: u = exp(1/tau - lse) with the fixed shift, else
    lse log2(e) (see `_weights`)."""
    if FIXED_SHIFT:
        return tl.exp(inv_tau - lse)
    else:
        return lse * _LOG2E


@triton.jit
def _weights(x, w_i, w_j, FIXED_SHIFT: tl.constexpr):
    """A_ij = P_ij + P_ji = 2^(x - l2_i) + 2^(x - l2_j) (x = S_ij log2 e, l2 = lse log2 e = w);
    with the fixed shift one exp per element: 2^x (u_i + u_j), x less the shift
    (`row_logits`), u = 2^(shift - l2) = w (saved per row by the forward)."""
    if FIXED_SHIFT:
        return tl.exp2(x) * (w_i[:, None] + w_j[None, :])
    else:
        return tl.exp2(x - w_i[:, None]) + tl.exp2(x - w_j[None, :])


@triton.jit
def _row_weighted(x, w_i, w_j, c_i, c_j, FIXED_SHIFT: tl.constexpr):
    """c_i P_ij + c_j P_ji (`_weights` with each row's loss weighted by c): with the fixed
    shift still one exp per element, 2^x (c_i u_i + c_j u_j)."""
    if FIXED_SHIFT:
        return _weights(x, c_i * w_i, c_j * w_j, FIXED_SHIFT)
    else:
        return c_i[:, None] * tl.exp2(x - w_i[:, None]) + c_j[None, :] * tl.exp2(x - w_j[None, :])


@triton.jit(do_not_specialize=["loss_blocks"])  # 1 would become a constexpr: a recompile
def _grad_kernel(
    Z,
    RS,
    NORMS,
    ROW_W,
    ROW_LOSS,
    ROW_G,
    LOSS_MAX,
    DZ,
    inv_tau_hi,
    inv_tau_lo,
    GRAD_OUT,
    loss_blocks,
    rows_total,
    half,
    D,
    dz_stride,
    row_start,
    row_end,
    split_columns,
    split_stride,
    SPLIT: tl.constexpr,
    EPILOGUE: tl.constexpr,
    PER_ROW: tl.constexpr,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows [row_start, row_end) of sum_j A_ij zn_j; with EPILOGUE times GRAD_OUT / (tau R) and
    through the normalisation's backward. PER_ROW (EPILOGUE only): row i's loss weighted by
    c_i = ROW_G[i], |c| <= 1 (the incoming gradients over their largest magnitude, which
    GRAD_OUT then holds): A_ij = c_i P_ij + c_j P_ji, the positive's c_i (P_i,pos - 1) +
    c_pos (P_pos,i - 1), scaled by GRAD_OUT / tau; |c| <= 1 keeps the mean's weight bound
    (`nt_xent_weight_scale`, from the forward's LOSS_MAX[0:loss_blocks]). SPLIT: the
    columns of split s = program_id(1) (`column_range`), its rows stored split_stride
    elements after split 0's for `_grad_merge_kernel`. Rows too wide to hold (`wide`) take
    `_weight_slab_kernel` and `_slab_product_kernel` instead."""
    grad_block(
        Z,
        RS,
        NORMS,
        ROW_W,
        ROW_LOSS,
        ROW_G,
        DZ + tl.program_id(1) * split_stride,
        float_param(inv_tau_hi, inv_tau_lo, ACC),
        tl.load(GRAD_OUT),
        nt_xent_weight_scale(LOSS_MAX, loss_blocks),
        rows_total,
        half,
        D,
        dz_stride,
        row_start,
        row_start + tl.program_id(0) * BLOCK_M,
        row_end,
        split_columns,
        SPLIT,
        EPILOGUE,
        PER_ROW,
        FIXED_SHIFT,
        ACC,
        PREC,
        UPCAST,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
    )


@triton.jit
def row_terms(
    ROW_W, ROW_LOSS, ROW_G, offs_m, mask_m, half, PER_ROW: tl.constexpr, ACC: tl.constexpr
):
    """The backward's per-row terms of rows offs_m: (w, pos(i), the positive's weight term,
    c = ROW_G (PER_ROW; else w, unused)). P_i,pos(i) - 1 = expm1(-loss_i): the positive's
    weight A - 2 without cancellation."""
    w_i = tl.load(ROW_W + offs_m, mask=mask_m, other=0.0)
    pos_i = _expm1(-tl.load(ROW_LOSS + offs_m, mask=mask_m, other=0.0), ACC)
    c_i = w_i
    if PER_ROW:
        c_i = tl.load(ROW_G + offs_m, mask=mask_m, other=0.0)
        pos_i = c_i * pos_i
    return w_i, _positive_rows(offs_m, half), pos_i, c_i


@triton.jit
def tile_weights(
    x,
    ROW_W,
    ROW_LOSS,
    ROW_G,
    w_i,
    pos,
    pos_i,
    c_i,
    offs_m,
    offs_n,
    mask_n,
    c0,
    row_lo,
    rows_total,
    half,
    PER_ROW: tl.constexpr,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """A_ij of the tile (rows [row_lo, row_lo + BLOCK_M), columns [c0, c0 + BLOCK_N)) from
    its logits x (`row_logits`) and the rows' `row_terms`: zero on the diagonal and padding
    columns, the positive's expm1 terms at (i, pos(i))."""
    w_j = tl.load(ROW_W + offs_n, mask=mask_n, other=0.0)
    if PER_ROW:
        c_j = tl.load(ROW_G + offs_n, mask=mask_n, other=0.0)
        a = _row_weighted(x, w_i, w_j, c_i, c_j, FIXED_SHIFT)
    else:
        a = _weights(x, w_i, w_j, FIXED_SHIFT)
    if _edge_tile(c0, BLOCK_N, row_lo, BLOCK_M, rows_total):
        a = tl.where(mask_n[None, :] & (offs_m[:, None] != offs_n[None, :]), a, 0.0)
    if _positive_tile(c0, BLOCK_N, row_lo, BLOCK_M, half):
        pos_j = _expm1(-tl.load(ROW_LOSS + offs_n, mask=mask_n, other=0.0), ACC)
        if PER_ROW:
            pos_j = c_j * pos_j
        a = tl.where(offs_n[None, :] == pos[:, None], pos_i[:, None] + pos_j[None, :], a)
    return a


@triton.jit
def grad_block(
    Z,
    RS,
    NORMS,
    ROW_W,
    ROW_LOSS,
    ROW_G,
    DZ,
    inv_tau,
    grad_out,
    sigma,
    rows_total,
    half,
    D,
    dz_stride,
    row_start,
    row_lo,
    row_end,
    split_columns,
    SPLIT: tl.constexpr,
    EPILOGUE: tl.constexpr,
    PER_ROW: tl.constexpr,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """`_grad_kernel`'s rows [row_lo, row_lo + BLOCK_M) (of [.., row_end)) against the columns
    of `column_range`, `grad_out` the incoming gradient's value (EPILOGUE), sigma the tile
    weights' scale (`weight_scale`): dz row r stored at DZ + (r - row_start) dz_stride."""
    offs_m = row_lo + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    offs_d = tl.arange(0, BLOCK_D)
    shift, zi, ri, qi = row_block(Z, RS, inv_tau, offs_m, mask_m, D, BLOCK_D)
    w_i, pos, pos_i, c_i = row_terms(ROW_W, ROW_LOSS, ROW_G, offs_m, mask_m, half, PER_ROW, ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    col_lo, col_hi = column_range(rows_total, split_columns, SPLIT)
    for c0 in range(col_lo, col_hi, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < rows_total
        zj = _load_rows(Z, D, offs_n, mask_n, D, BLOCK_D)
        rj = tl.load(RS + offs_n, mask=mask_n, other=1.0)
        x = tile_logits(dot(zi, tl.trans(zj), ACC, PREC, UPCAST), qi, rj, shift, FIXED_SHIFT)
        a = tile_weights(
            x,
            ROW_W,
            ROW_LOSS,
            ROW_G,
            w_i,
            pos,
            pos_i,
            c_i,
            offs_m,
            offs_n,
            mask_n,
            c0,
            row_lo,
            rows_total,
            half,
            PER_ROW,
            FIXED_SHIFT,
            ACC,
            BLOCK_M,
            BLOCK_N,
        )
        # A @ zn_J = (A diag(rs_J)) @ zs_J: scale the tile, not the (BLOCK_N, D) operand.
        acc += dot((a * (rj * sigma)[None, :]).to(zj.dtype), zj, ACC, PREC, UPCAST)
    g = acc * (1.0 / sigma)
    if EPILOGUE:
        g = _epilogue(
            g, Z, NORMS, ri, grad_out, inv_tau, rows_total, offs_m, mask_m, D, PER_ROW, ACC, BLOCK_D
        )
    tl.store(
        DZ + (offs_m - row_start)[:, None] * dz_stride + offs_d[None, :],
        round_to(g, DZ.dtype.element_ty),
        mask=mask_m[:, None] & (offs_d[None, :] < D),
    )


@triton.jit(do_not_specialize=["loss_blocks", "slab_start", "slab_end"])  # one compile a shape
def _weight_slab_kernel(
    Z,
    RS,
    ROW_W,
    ROW_LOSS,
    ROW_G,
    LOSS_MAX,
    SLAB,
    inv_tau_hi,
    inv_tau_lo,
    loss_blocks,
    rows_total,
    half,
    D,
    slab_start,
    slab_end,
    PER_ROW: tl.constexpr,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows too wide to hold (`wide`), first half of the backward: rows [slab_start, slab_end) of
    the scaled weights sigma A_ij rs_j (`tile_weights`, sigma from `nt_xent_weight_scale`)
    against every column, in Zs's dtype, SLAB[i - slab_start, j]: one tile a program (row block
    program_id(0), column block program_id(1)), its scores over feature chunks of BLOCK_K."""
    row_lo = slab_start + tl.program_id(0) * BLOCK_M
    offs_m = row_lo + tl.arange(0, BLOCK_M)
    mask_m = offs_m < slab_end
    c0 = tl.program_id(1) * BLOCK_N
    offs_n = c0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < rows_total
    shift = float_param(inv_tau_hi, inv_tau_lo, ACC) * _LOG2E
    qi = tl.load(RS + offs_m, mask=mask_m, other=1.0) * shift
    rj = tl.load(RS + offs_n, mask=mask_n, other=1.0)
    w_i, pos, pos_i, c_i = row_terms(ROW_W, ROW_LOSS, ROW_G, offs_m, mask_m, half, PER_ROW, ACC)
    s = chunked_scores(
        Z, offs_m, mask_m, offs_n, mask_n, D, ACC, PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K
    )
    a = tile_weights(
        tile_logits(s, qi, rj, shift, FIXED_SHIFT),
        ROW_W,
        ROW_LOSS,
        ROW_G,
        w_i,
        pos,
        pos_i,
        c_i,
        offs_m,
        offs_n,
        mask_n,
        c0,
        row_lo,
        rows_total,
        half,
        PER_ROW,
        FIXED_SHIFT,
        ACC,
        BLOCK_M,
        BLOCK_N,
    )
    sigma = nt_xent_weight_scale(LOSS_MAX, loss_blocks)
    tl.store(
        SLAB + (offs_m - slab_start)[:, None] * rows_total + offs_n[None, :],
        (a * (rj * sigma)[None, :]).to(SLAB.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit(do_not_specialize=["loss_blocks", "height"])
def _slab_product_kernel(
    SLAB,
    Z,
    LOSS_MAX,
    PART,
    loss_blocks,
    rows_total,
    D,
    height,
    split_columns,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Second half of the wide backward: the GEMM SLAB @ Zs / sigma, the slab's height rows
    of sum_j A_ij zn_j into PART (splits x height x D partial rows for `_grad_merge_kernel`).
    A program owns an output tile (rows program_id(0), features program_id(1)) and sums the
    columns of split program_id(2) (split_columns each)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < height
    offs_d = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    col_lo = tl.program_id(2) * split_columns
    col_hi = tl.minimum(col_lo + split_columns, rows_total)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(col_lo, col_hi, BLOCK_K):
        mask_k = k0 + offs_k < col_hi
        w = tl.load(
            SLAB + offs_m[:, None] * rows_total + (k0 + offs_k)[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        z = tl.load(
            Z + (k0 + offs_k)[:, None] * D + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc += dot(w, z, ACC, PREC, UPCAST)
    g = acc * (1.0 / nt_xent_weight_scale(LOSS_MAX, loss_blocks))
    tl.store(
        PART + (tl.program_id(2) * height + offs_m)[:, None] * D + offs_d[None, :],
        g,
        mask=mask_m[:, None] & mask_d[None, :],
    )


@triton.jit
def _epilogue(
    g,
    Z,
    NORMS,
    ri,
    grad_out,
    inv_tau,
    rows_total,
    offs_m,
    mask_m,
    D,
    PER_ROW: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows' sum_j A_ij zn_j times grad_out / (tau R) (PER_ROW: grad_out / tau), through the
    normalisation's backward: dL/dz."""
    if PER_ROW:
        g = g * (grad_out.to(ACC) * inv_tau)
    else:
        g = g * (grad_out.to(ACC) * inv_tau / rows_total)
    # z_I reloaded (L2-resident) rather than kept live across the loop: fewer registers.
    zn = _load_rows(Z, D, offs_m, mask_m, D, BLOCK_D).to(ACC) * ri[:, None]
    norm = tl.load(NORMS + offs_m, mask=mask_m, other=1.0)
    radial = tl.where(norm > _EPS, tl.sum(zn * g, axis=1), 0.0)
    return (g - zn * radial[:, None]) / norm[:, None]


@triton.jit
def _grad_merge_kernel(
    Z,
    RS,
    NORMS,
    PART,
    DZ,
    inv_tau_hi,
    inv_tau_lo,
    GRAD_OUT,
    rows_total,
    D,
    row_start,
    row_end,
    splits,
    EPILOGUE: tl.constexpr,
    PER_ROW: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The split backward's rows: the splits' sums of A_ij zn_j (PART, splits x rows x D, in
    the accumulation dtype) added in split order, then `_grad_kernel`'s epilogue."""
    offs_m = row_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_m[:, None] & (offs_d[None, :] < D)
    rows = row_end - row_start
    local = (offs_m - row_start)[:, None] * D + offs_d[None, :]
    g = sum_split_rows(PART, local, mask, rows * D, splits, ACC, BLOCK_M, BLOCK_D)
    if EPILOGUE:
        ri = tl.load(RS + offs_m, mask=mask_m, other=1.0)
        inv_tau = float_param(inv_tau_hi, inv_tau_lo, ACC)
        g = _epilogue(
            g,
            Z,
            NORMS,
            ri,
            tl.load(GRAD_OUT),
            inv_tau,
            rows_total,
            offs_m,
            mask_m,
            D,
            PER_ROW,
            ACC,
            BLOCK_D,
        )
    tl.store(DZ + local, round_to(g, DZ.dtype.element_ty), mask=mask)


@triton.jit
def _symmetric_fwd_kernel(
    Z,
    RS,
    ROW_SUM,
    COL_SUM,
    inv_tau_hi,
    inv_tau_lo,
    rows_total,
    half,
    D,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Upper-triangle tiles (I <= J), fixed shift 1/tau, over the negatives (k != i, pos(i)):
    tile (I, J) adds its row sums to rows I (registers) and its column sums to rows J (relaxed
    atomics: only their sum matters)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK + tl.arange(0, BLOCK)
    mask_m = offs_m < rows_total
    inv_tau = float_param(inv_tau_hi, inv_tau_lo, ACC)
    shift, zi, ri, qi = row_block(Z, RS, inv_tau, offs_m, mask_m, D, BLOCK_D)
    total = tl.zeros([BLOCK], ACC)
    for c0 in range(pid * BLOCK, rows_total, BLOCK):
        offs_n = c0 + tl.arange(0, BLOCK)
        mask_n = offs_n < rows_total
        zj = _load_rows(Z, D, offs_n, mask_n, D, BLOCK_D)
        rj = tl.load(RS + offs_n, mask=mask_n, other=1.0)
        x = tile_logits(dot(zi, tl.trans(zj), ACC, PREC, UPCAST), qi, rj, shift, True)
        negative = (
            mask_m[:, None]
            & mask_n[None, :]
            & (offs_m[:, None] != offs_n[None, :])
            & (offs_n[None, :] != _positive_rows(offs_m, half)[:, None])
        )
        e = tl.where(negative, tl.exp2(x), 0.0)
        total += tl.sum(e, axis=1)
        if c0 != pid * BLOCK:  # the diagonal tile's columns are its own rows, already counted
            tl.atomic_add(COL_SUM + offs_n, tl.sum(e, axis=0), mask=mask_n, sem="relaxed")
    tl.store(ROW_SUM + offs_m, total, mask=mask_m)


@triton.jit
def _symmetric_grad_kernel(
    Z,
    RS,
    ROW_W,
    ROW_LOSS,
    LOSS_MAX,
    G,
    inv_tau_hi,
    inv_tau_lo,
    rows_total,
    half,
    D,
    g_stride,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Upper-triangle tiles: A (as in `_grad_kernel`, the positive pairs' -2 included) from tile
    (I, J) gives rows I their A zn_J (registers) and rows J their A^T zn_I (relaxed atomics into
    G, fp32/fp64, zero-initialised)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK + tl.arange(0, BLOCK)
    mask_m = offs_m < rows_total
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d[None, :] < D
    inv_tau = float_param(inv_tau_hi, inv_tau_lo, ACC)
    shift, zi, ri, qi = row_block(Z, RS, inv_tau, offs_m, mask_m, D, BLOCK_D)
    w_i = tl.load(ROW_W + offs_m, mask=mask_m, other=0.0)
    pos = _positive_rows(offs_m, half)
    pos_i = _expm1(-tl.load(ROW_LOSS + offs_m, mask=mask_m, other=0.0), ACC)
    sigma = nt_xent_weight_scale(LOSS_MAX, 1)
    acc = tl.zeros([BLOCK, BLOCK_D], ACC)
    for c0 in range(pid * BLOCK, rows_total, BLOCK):
        offs_n = c0 + tl.arange(0, BLOCK)
        mask_n = offs_n < rows_total
        zj = _load_rows(Z, D, offs_n, mask_n, D, BLOCK_D)
        rj = tl.load(RS + offs_n, mask=mask_n, other=1.0)
        w_j = tl.load(ROW_W + offs_n, mask=mask_n, other=0.0)
        x = tile_logits(dot(zi, tl.trans(zj), ACC, PREC, UPCAST), qi, rj, shift, FIXED_SHIFT)
        valid = mask_m[:, None] & mask_n[None, :] & (offs_m[:, None] != offs_n[None, :])
        a = tl.where(valid, _weights(x, w_i, w_j, FIXED_SHIFT), 0.0)
        pos_j = _expm1(-tl.load(ROW_LOSS + offs_n, mask=mask_n, other=0.0), ACC)
        a = tl.where(offs_n[None, :] == pos[:, None], pos_i[:, None] + pos_j[None, :], a)
        acc += dot((a * (rj * sigma)[None, :]).to(zj.dtype), zj, ACC, PREC, UPCAST)
        if c0 != pid * BLOCK:
            col = dot(tl.trans(a * (ri * sigma)[:, None]).to(zi.dtype), zi, ACC, PREC, UPCAST)
            tl.atomic_add(
                G + offs_n[:, None] * g_stride + offs_d[None, :],
                col * (1.0 / sigma),
                mask=mask_n[:, None] & mask_d,
                sem="relaxed",
            )
    tl.atomic_add(
        G + offs_m[:, None] * g_stride + offs_d[None, :],
        acc * (1.0 / sigma),
        mask=mask_m[:, None] & mask_d,
        sem="relaxed",
    )


# A launch splits only sweeps of at least MIN_SWEEP_TILES column tiles, into runs of at least
# MIN_SPLIT_TILES: shorter, the merge launch (a few microseconds) costs about what the split
# saves (the cost model's NT-Xent table, benchmarks/static_notes.md section 11).
MIN_SWEEP_TILES = 16
MIN_SPLIT_TILES = 2
# Rows per program of the forward's merge (the backward's merges `prologue_rows`, D wide).
LSE_MERGE_ROWS = 128
# The fast path's widest rows. Up to MAX_FEATURES a program holds its rows in registers; wider
# (`wide`: ResNet-50's 2048 features) each tile's scores sum feature chunks streamed from L2,
# and the backward is two GEMMs over a slab of tile weights (`_wide_grad`).
MAX_ROW_FEATURES = 2048


def wide(d: int) -> bool:
    """Whether rows of d features take the feature-chunked kernels: the forward's `WIDE`
    tiles, the backward's weight slabs (`_wide_grad`)."""
    return d > MAX_FEATURES


def row_width(d: int, what: str = "the NT-Xent input") -> int:
    """Power-of-two width of a whole row of d features (the prologue's and the merge's tiles);
    refuses rows wider than the fast path takes."""
    return feature_block(d, what, MAX_ROW_FEATURES, " for NT-Xent")


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes, warps and pipeline stages of one launch (also what the static sm_90 report
    compiles: benchmarks/static_notes.md records how each was chosen)."""

    block: tuple[int, int, int]  # (BLOCK_M, BLOCK_N, BLOCK_D); the slab product's (M, N, K)
    num_warps: int = 4
    num_stages: int = 2
    chunk: int | None = None  # rows too wide to hold (`wide`): the scores' feature chunk

    @property
    def wide(self) -> bool:
        return self.chunk is not None

    @property
    def constexprs(self) -> dict:
        wide = {"WIDE": True, "BLOCK_K": self.chunk} if self.wide else {}
        return dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_D"), self.block), **wide)

    @property
    def options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, **self.constexprs)


def small_tiles(block_d: int, dtype: torch.dtype) -> bool:
    """32 x 32 tiles: under the interpreter (fastest there), for fp64, and for 4-byte rows wider
    than 128 features. 2-byte rows take 64-row tensor-core tiles at every width."""
    return _is_interpreted() or dtype == torch.float64 or (block_d > 128 and dtype == torch.float32)


def narrow_wide_rows(d: int, epilogue: bool = True) -> LaunchConfig | None:
    """32 x 32 tiles (one stage without the epilogue) for rows wider than 128 features, for the
    kernels not compiled at the fast path's 64-row tiles there (memory bank, symmetric, the
    one-pass objectives); None for narrower rows."""
    block_d = feature_block(d, "the NT-Xent input")
    if block_d <= 128:
        return None
    return LaunchConfig((32, 32, block_d), num_stages=2 if epilogue else 1)


def epilogue_in_backward(d: int) -> bool:
    """Whether an unsplit backward launch runs the epilogue itself: for rows of at most 128
    features. Wider, the fp32 rows go to `_grad_merge_kernel` (one split) for it: at D = 256
    the 64 x 32 launch spilled 152 B holding the epilogue (sm_90a)."""
    return row_width(d) <= 128


# From this many rows a forward launch (2N; a rank's rows under gather_distributed) takes
# 128-row tiles (`forward_config`); below FEW_WIDE_ROWS rows too wide to hold take 64 x 64.
TALL_ROWS = 4096
FEW_WIDE_ROWS = 1024


def forward_config(d: int, dtype: torch.dtype, rows: int = 0) -> LaunchConfig:
    """The forward's launch for `rows` rows of D features of Zs in `dtype`. Each program reads
    every column tile of its split from L2, the limit from 2N = 2048: 128-row tiles on two
    warpgroups halve that traffic where they keep 2 CTAs/SM (sm_90, benchmarks/static_notes.md
    section 23). 2-byte rows up to 128 features: 64 x 128 tiles, one warpgroup, two stages
    (128 registers, issue ceiling 0.98); from TALL_ROWS rows 128 x 64, three stages (80
    registers; predicted 3186 -> 1597 us at N = 32768, but fewer programs below: 10.0 -> 12.0
    us at N = 256). 129-256 features: 128 x 32 tiles, two stages (57 registers; was 64 x 64 on
    one warpgroup: 6313 -> 3160 us at N = 32768, the same at N = 256). 257-512: 64 x 64, one
    stage (64 x 128 needed 328 KB of shared memory); 32 x 32 mma.sync tiles were shared-memory
    bound. Wider rows (`wide`) stream chunks of 64 features through 128 x 128 tiles, two
    warpgroups (64 x 64, chunks of 32, for 4-byte rows): their scores come from L2 at 64
    multiply-adds a loaded element (64 x 64 tiles: 32, predicted 2x slower at N = 4096,
    D = 2048); from TALL_ROWS rows chunks of 32 through 128 x 256 tiles, three stages (195
    registers; 85 multiply-adds an element: 51569 -> 38684 us at N = 32768), below FEW_WIDE_ROWS
    64 x 64 tiles on one warpgroup (4x the programs: 16.0 -> 10.3 us at N = 256). The
    backward's weight slab (`_weight_slab_kernel`) takes the same tiles."""
    if wide(d):
        row_width(d)
        if _is_interpreted() or dtype == torch.float64:
            return LaunchConfig((32, 32, 128), chunk=128)
        if dtype == torch.float32:
            return LaunchConfig((64, 64, 32), chunk=32)
        if rows >= TALL_ROWS:
            return LaunchConfig((128, 256, 32), num_warps=8, num_stages=3, chunk=32)
        if rows < FEW_WIDE_ROWS:
            return LaunchConfig((64, 64, 64), num_warps=4, chunk=64)
        return LaunchConfig((128, 128, 64), num_warps=8, chunk=64)
    block_d = feature_block(d, "the NT-Xent input")
    if small_tiles(block_d, dtype):
        return LaunchConfig((32, 32, block_d))
    if dtype == torch.float32:  # 4-byte tiles: 64 columns keep 2 CTAs/SM in shared memory
        return LaunchConfig((64, 64, block_d))
    if block_d == 256:
        return LaunchConfig((128, 32, block_d), num_warps=8)
    if block_d > 256:
        return LaunchConfig((64, 64, block_d), num_stages=1)
    if rows >= TALL_ROWS:
        return LaunchConfig((128, 64, block_d), num_warps=8, num_stages=3)
    return LaunchConfig((64, 128, block_d))


def backward_config(
    d: int, dtype: torch.dtype, precision: str | None = None, epilogue: bool = True
) -> LaunchConfig:
    """The backward's launch (dot `precision`: by default what torch allows now): 64 x 64
    tiles, one warpgroup owning its rows, two stages (sm_90: no spills, 2 CTAs/SM; 8 warps on
    64 rows held 1 CTA/SM, 3 stages spilled); 64 x 32 for 2-byte rows of 256 features, 32 x 32
    for 512. Narrow 32 x 32 tiles of rows wider than 128 take one stage without the `epilogue`
    in the kernel (column splits, the row primitive, `epilogue_in_backward`): ptxas fitted two
    into 168 registers for 3 CTAs/SM and spilled 8 B. Rows too wide to hold (`wide`): the
    tiles (rows, features, columns a k-step) of `_slab_product_kernel`, the GEMM of the weight
    slab with Zs: 128 x 256 x 64 on two warpgroups, three stages for 2-byte rows (tutorial 03's
    Hopper GEMM; 128 x 128 predicted 1.33x slower), 64 x 64 x 32 for 4-byte, 32 x 32 x 32
    interpreted or fp64; the slab's weights take the forward's tiles (`forward_config`)."""
    if wide(d):
        row_width(d)
        if _is_interpreted() or dtype == torch.float64:
            return LaunchConfig((32, 32, 32))
        if dtype == torch.float32:
            return LaunchConfig((64, 64, 32))
        return LaunchConfig((128, 256, 64), num_warps=8, num_stages=3)
    block_d = feature_block(d, "the NT-Xent input")
    precision = precision or dot_precision(dtype)
    narrow = LaunchConfig((32, 32, block_d), num_stages=2 if epilogue or block_d <= 128 else 1)
    if small_tiles(block_d, dtype):
        return narrow
    if dtype == torch.float32 and precision == "ieee":  # FMA products: 64 x 32 spilled 200 B
        return LaunchConfig((32, 32, block_d))
    if dtype == torch.float32:  # 4-byte tiles: 64 columns spilled 56 B
        return LaunchConfig((64, 32, block_d))
    if block_d == 256:  # 64 x 64 spilled 16 B
        return LaunchConfig((64, 32, block_d))
    if block_d > 256:  # 64 rows of fp32 accumulator at D = 512 spilled 1 KiB
        return narrow
    return LaunchConfig((64, 64, block_d))


def slab_rows(d: int) -> int:
    """Rows of the wide backward's weight slab (rows x 2N in Zs's dtype) per pair of launches:
    D rounded down to 128, so that the slab is never larger than Zs."""
    return d // 128 * 128


def _check_rows(z: torch.Tensor, row_start: int, row_end: int) -> None:
    check_dtype(z)
    if z.dim() != 2 or z.shape[0] % 2:
        raise ValueError(f"Z must be (2N, D), got {tuple(z.shape)}")
    if not 0 <= row_start < row_end <= z.shape[0]:
        raise ValueError(
            f"need 0 <= row_start < row_end <= {z.shape[0]}, got [{row_start}, {row_end})"
        )


def _scaled_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype in (torch.float16, torch.bfloat16) else dtype


def prologue_rows(d: int) -> int:
    """Row pairs per prologue program, and rows per program of the split backward's merge: 32
    at D <= 128, fewer for wider rows (at D = 512, 32 spilled 616 B on sm_90; 2 at 2048)."""
    return max(2, 4096 // row_width(d, "Z"))


def _scale_rows(z_a: torch.Tensor, z_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The prologue (see the module docstring) of Z = [z_a; z_b], two views of one shape (any
    row stride; a view whose columns are not adjacent is copied first): (Zs, rs, norms,
    dist)."""
    nt_xent_autograd.check_views(z_a, z_b)
    z_a, z_b = (z if z.stride(1) == 1 else z.contiguous() for z in (z_a, z_b))
    half, d = z_a.shape
    rows = 2 * half
    acc = torch_acc_dtype(z_a.dtype)
    zs = torch.empty(rows, d, dtype=_scaled_dtype(z_a.dtype), device=z_a.device)
    rs = torch.empty(rows, dtype=acc, device=z_a.device)
    norms = torch.empty_like(rs)
    dist = torch.empty(half, dtype=acc, device=z_a.device)
    block_r = prologue_rows(d)
    with device_guard(z_a):
        _scale_rows_kernel[(triton.cdiv(half, block_r),)](
            ZA=z_a,
            ZB=z_b,
            ZS=zs,
            RS=rs,
            NORMS=norms,
            DIST=dist,
            half=half,
            D=d,
            stride_a=z_a.stride(0),
            stride_b=z_b.stride(0),
            TINY=torch.finfo(acc).tiny,
            ACC=acc_dtype(z_a.dtype),
            BLOCK_R=block_r,
            BLOCK_D=row_width(d, "Z"),
        )
    return zs, rs, norms, dist


def column_splits(rows: int, columns: int, config: LaunchConfig) -> tuple[int, int]:
    """(splits, columns per split) of a row-parallel launch over `rows` x `columns`: a sweep
    of at least `MIN_SWEEP_TILES` column blocks is cut into runs of at least `MIN_SPLIT_TILES`
    (but the last, which holds what is left),
    toward `SPLIT_PROGRAMS` programs (flash-decoding's split-K; under the interpreter any
    sweep into single blocks, so that the tests' few-tile batches run the split launches, and
    so for rows too wide to hold, whose tile is a loop over feature chunks: at 2N = 512,
    D = 2048 the SMs fill, 125 -> 94 us predicted). Each split sums its range and a merge
    launch adds the splits in a fixed order: results are run-to-run deterministic and the same
    on every GPU."""
    row_blocks = triton.cdiv(rows, config.block[0])
    column_blocks = triton.cdiv(columns, config.block[1])
    single = _is_interpreted() or config.wide
    sweep, least = (1, 1) if single else (MIN_SWEEP_TILES, MIN_SPLIT_TILES)
    wanted = min(column_blocks // least, SPLIT_PROGRAMS // row_blocks)
    splits, per_split = even_splits(column_blocks, wanted if column_blocks >= sweep else 1)
    return splits, per_split * config.block[1]


def forward_plan(
    rows: int, rows_total: int, d: int, dtype: torch.dtype
) -> tuple[LaunchConfig, int, int, int]:
    """`_lse`'s launch for `rows` rows against `rows_total` of Zs in `dtype`: (config, column
    splits, columns per split, programs writing row results: the forward's or the merge's)."""
    config = forward_config(d, dtype, rows)
    splits, split_columns = column_splits(rows, rows_total, config)
    writers = triton.cdiv(rows, LSE_MERGE_ROWS if splits > 1 else config.block[0])
    return config, splits, split_columns, writers


def backward_plan(
    rows: int, rows_total: int, d: int, dtype: torch.dtype, epilogue: bool = True
) -> tuple[LaunchConfig, int, int, bool]:
    """`_grad_kernel`'s launch (rows that fit the registers) for `rows` rows against
    `rows_total` of Zs in `dtype`: (config, column splits, columns per split, whether the
    `epilogue` runs in it rather than in the merge)."""
    splits, split_columns = column_splits(rows, rows_total, backward_config(d, dtype))
    in_kernel = epilogue and splits == 1 and epilogue_in_backward(d)
    return backward_config(d, dtype, epilogue=in_kernel), splits, split_columns, in_kernel


def wide_backward_plan(
    rows: int, rows_total: int, d: int, dtype: torch.dtype
) -> tuple[LaunchConfig, LaunchConfig, int, int, int]:
    """`_wide_grad`'s launches for `rows` rows against `rows_total` of Zs in `dtype`: (the
    weights' tiles, the forward's; the product's; the slab height; the product's splits and
    columns per split)."""
    weights, product = forward_config(d, dtype, rows), backward_config(d, dtype)
    height = min(slab_rows(d), rows)
    block_m, block_n, block_k = product.block
    tiles = triton.cdiv(height, block_m) * triton.cdiv(d, block_n)
    return weights, product, height, *product_splits(tiles, rows_total, block_k)


def _lse(zs, rs, dist, row_start, row_end, inv_tau):
    """Launch the row-parallel forward: (lse, lse - S_pos, the backward's row weights, the
    writing programs' largest losses) of rows [row_start, row_end); with column splits, then
    the merge."""
    rows_total, d = zs.shape
    rows = row_end - row_start
    config, splits, split_columns, writers = forward_plan(rows, rows_total, d, zs.dtype)
    acc = rs.dtype
    lse = torch.empty(rows, dtype=acc, device=zs.device)
    row_loss, row_w = torch.empty_like(lse), torch.empty_like(lse)
    part = torch.empty(2, splits, rows, dtype=acc, device=zs.device) if splits > 1 else lse
    loss_max = torch.empty(writers, dtype=acc, device=zs.device)
    with device_guard(zs):
        _lse_fwd_kernel[(triton.cdiv(rows, config.block[0]), splits)](
            Z=zs,
            RS=rs,
            DIST=dist,
            LSE=lse,
            ROW_LOSS=row_loss,
            ROW_W=row_w,
            LOSS_MAX=loss_max,
            PART=part,
            **split_floats(inv_tau=inv_tau),
            rows_total=rows_total,
            half=rows_total // 2,
            D=d,
            row_start=row_start,
            row_end=row_end,
            split_columns=split_columns,
            SPLIT=splits > 1,
            FIXED_SHIFT=fixed_shift_safe(inv_tau, acc),
            ACC=acc_dtype(acc),
            PREC=dot_precision(zs.dtype),
            UPCAST=upcast_dots(zs.dtype),
            **config.options,
        )
        if splits > 1:
            merge_row_sums(
                part, dist, lse, row_loss, row_w, loss_max, inv_tau, rows_total // 2, row_start
            )
    return lse, row_loss, row_w, loss_max


def merge_row_sums(part, dist, lse, row_loss, row_w, loss_max, inv_tau, half, row_start):
    """Launch `_lse_merge_kernel` on a split forward's PART (2 x splits x rows): lse, the row
    losses and the backward's row weights of rows [row_start, row_start + rows), and each
    program's largest loss (cdiv(rows, LSE_MERGE_ROWS) of them)."""
    splits, rows = part.shape[1:]
    _lse_merge_kernel[(triton.cdiv(rows, LSE_MERGE_ROWS),)](
        PART=part,
        DIST=dist,
        LSE=lse,
        ROW_LOSS=row_loss,
        ROW_W=row_w,
        LOSS_MAX=loss_max,
        **split_floats(inv_tau=inv_tau),
        half=half,
        row_start=row_start,
        row_end=row_start + rows,
        splits=splits,
        FIXED_SHIFT=fixed_shift_safe(inv_tau, part.dtype),
        ACC=acc_dtype(part.dtype),
        BLOCK=LSE_MERGE_ROWS,
    )


def _row_weights(lse: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """`_row_weight` on the host, for callers that hold only lse (the distributed path)."""
    if fixed_shift_safe(inv_tau, lse.dtype):
        return torch.exp(inv_tau - lse)
    return lse * 1.4426950408889634


def _grad(
    zs,
    rs,
    norms,
    row_w,
    row_loss,
    loss_max,
    row_start,
    row_end,
    inv_tau,
    grad_out,
    out_dtype,
    row_g=None,
):
    """Launch the row-parallel backward. With grad_out (a 0-d tensor) the epilogue scales and
    applies the normalisation's backward (dL/dz in out_dtype); without it the rows are
    sum_j (P_ij + P_ji) zn_j - 2 zn_pos(i), unscaled. With `row_g` (per-row weights,
    |row_g| <= 1) grad_out is their scale: row i's loss has the gradient grad_out * row_g_i
    (see `nt_xent_autograd.per_row_weights`). `loss_max`: values whose largest is the largest
    of all 2N row losses (the forward's per-program maxima). Rows too wide to hold (`wide`)
    take `_wide_grad`."""
    rows_total, d = zs.shape
    rows = row_end - row_start
    dz = torch.empty(rows, d, dtype=out_dtype, device=zs.device)
    epilogue = grad_out is not None
    grad_out = grad_out if epilogue else rs  # read, unused, without the epilogue
    flags = dict(EPILOGUE=epilogue, PER_ROW=row_g is not None, ACC=acc_dtype(rs.dtype))
    row_g = row_w if row_g is None else row_g  # read, unused, without PER_ROW
    rows_out = RowsOut(zs, rs, norms, dz, row_start, grad_out, inv_tau, flags)
    with device_guard(zs):
        if wide(d):
            _wide_grad(rows_out, row_w, row_loss, row_g, loss_max)
            return dz
        config, splits, split_columns, in_kernel = backward_plan(
            rows, rows_total, d, zs.dtype, epilogue
        )
        merged = splits > 1 or (epilogue and not in_kernel)
        part = torch.empty(splits, rows, d, dtype=rs.dtype, device=zs.device) if merged else dz
        _grad_kernel[(triton.cdiv(rows, config.block[0]), splits)](
            Z=zs,
            RS=rs,
            NORMS=norms,
            ROW_W=row_w,
            ROW_LOSS=row_loss,
            ROW_G=row_g,
            LOSS_MAX=loss_max,
            DZ=part,
            **split_floats(inv_tau=inv_tau),
            GRAD_OUT=grad_out,
            loss_blocks=loss_max.numel(),
            rows_total=rows_total,
            half=rows_total // 2,
            D=d,
            dz_stride=d,
            row_start=row_start,
            row_end=row_end,
            split_columns=split_columns,
            split_stride=rows * d,
            SPLIT=splits > 1,
            **dict(flags, EPILOGUE=in_kernel),
            FIXED_SHIFT=fixed_shift_safe(inv_tau, rs.dtype),
            PREC=dot_precision(zs.dtype),
            UPCAST=upcast_dots(zs.dtype),
            **config.options,
        )
        if merged:
            rows_out.merge(part, row_start, row_end)
    return dz


@dataclass(frozen=True)
class RowsOut:
    """Where a backward's rows go: dz (rows [dz_start, ..) of Zs) through `_grad_merge_kernel`,
    with what its epilogue reads."""

    zs: torch.Tensor
    rs: torch.Tensor
    norms: torch.Tensor
    dz: torch.Tensor
    dz_start: int
    grad_out: torch.Tensor
    inv_tau: float
    flags: dict

    def merge(self, part: torch.Tensor, lo: int, hi: int) -> None:
        """Rows [lo, hi) of dz from their partial sums PART (splits x (hi - lo) x D, the
        accumulation dtype), added in split order, through the epilogue (`EPILOGUE`)."""
        rows_total, d = self.zs.shape
        _grad_merge_kernel[(triton.cdiv(hi - lo, prologue_rows(d)),)](
            Z=self.zs,
            RS=self.rs,
            NORMS=self.norms,
            PART=part,
            DZ=self.dz[lo - self.dz_start :],
            **split_floats(inv_tau=self.inv_tau),
            GRAD_OUT=self.grad_out,
            rows_total=rows_total,
            D=d,
            row_start=lo,
            row_end=hi,
            splits=part.shape[0],
            **self.flags,
            BLOCK_M=prologue_rows(d),
            BLOCK_D=row_width(d),
        )


def _wide_grad(out: RowsOut, row_w, row_loss, row_g, loss_max):
    """The backward of rows too wide to hold (`wide`), a GEMM in place of recomputing the
    scores per feature block, slab by slab of `slab_rows` rows: `_weight_slab_kernel` writes
    the slab's scaled weights sigma A_ij rs_j against every column (the scores over feature
    chunks, as the forward's), `_slab_product_kernel` multiplies them with Zs into fp32
    partial rows (split-K where its output tiles are few, `_common.product_splits`), and the
    merge turns them into the slab's rows of dz. Workspace: the slab (never larger than Zs)
    and splits x slab x D partial sums."""
    zs, rs, inv_tau = out.zs, out.rs, out.inv_tau
    rows_total, d = zs.shape
    row_start, row_end = out.dz_start, out.dz_start + out.dz.shape[0]
    weights, product, height, splits, split_columns = wide_backward_plan(
        row_end - row_start, rows_total, d, zs.dtype
    )
    block_m, block_n, block_k = product.block
    part = torch.empty(splits * height * d, dtype=rs.dtype, device=zs.device)
    slab = torch.empty(height, rows_total, dtype=zs.dtype, device=zs.device)
    dots = dict(ACC=out.flags["ACC"], PREC=dot_precision(zs.dtype), UPCAST=upcast_dots(zs.dtype))
    for lo in range(row_start, row_end, height):
        hi = min(lo + height, row_end)
        row_blocks = triton.cdiv(hi - lo, weights.block[0])
        _weight_slab_kernel[(row_blocks, triton.cdiv(rows_total, weights.block[1]))](
            Z=zs,
            RS=rs,
            ROW_W=row_w,
            ROW_LOSS=row_loss,
            ROW_G=row_g,
            LOSS_MAX=loss_max,
            SLAB=slab,
            **split_floats(inv_tau=inv_tau),
            loss_blocks=loss_max.numel(),
            rows_total=rows_total,
            half=rows_total // 2,
            D=d,
            slab_start=lo,
            slab_end=hi,
            PER_ROW=out.flags["PER_ROW"],
            FIXED_SHIFT=fixed_shift_safe(inv_tau, rs.dtype),
            **dots,
            BLOCK_M=weights.block[0],
            BLOCK_N=weights.block[1],
            BLOCK_K=weights.chunk,
            num_warps=weights.num_warps,
            num_stages=weights.num_stages,
        )
        slab_part = part[: splits * (hi - lo) * d].view(splits, hi - lo, d)
        _slab_product_kernel[(triton.cdiv(hi - lo, block_m), triton.cdiv(d, block_n), splits)](
            SLAB=slab,
            Z=zs,
            LOSS_MAX=loss_max,
            PART=slab_part,
            loss_blocks=loss_max.numel(),
            rows_total=rows_total,
            D=d,
            height=hi - lo,
            split_columns=split_columns,
            **dots,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=product.num_warps,
            num_stages=product.num_stages,
        )
        out.merge(slab_part, lo, hi)


@torch.library.custom_op("fastcluster_cl::nt_xent_triton_lse_rows", mutates_args=())
def lse_rows(
    z: torch.Tensor, row_start: int, row_end: int, inv_tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows [row_start, row_end) of the full Z = [z_a; z_b] (2N x D, raw: normalised on the
    fly) against all its rows: lse_i = log sum_{k != i} exp(S_ik) and the row loss
    lse_i - S_i,pos(i), each of shape (row_end - row_start,) in the accumulation dtype."""
    z = z.contiguous()
    _check_rows(z, row_start, row_end)
    zs, rs, _, dist = _scale_rows(*z.chunk(2))
    return _lse(zs, rs, dist, row_start, row_end, inv_tau)[:2]


@lse_rows.register_fake
def _(z, row_start, row_end, inv_tau):
    return fake_row_values(z, row_start, row_end)


@torch.library.custom_op("fastcluster_cl::nt_xent_triton_grad_rows", mutates_args=())
def grad_rows(
    z: torch.Tensor,
    lse: torch.Tensor,
    row_loss: torch.Tensor,
    row_start: int,
    row_end: int,
    inv_tau: float,
) -> torch.Tensor:
    """sum_j (P_ij + P_ji) zn_j - 2 zn_pos(i) for rows [row_start, row_end) of the raw Z,
    P_ij = exp(S_ij - lse_i), with `lse` and `row_loss` the full (2N,) vectors of `lse_rows`
    (the largest row loss bounds the fp16 tile weights: they must be consistent). Unscaled:
    the caller multiplies by grad_out * inv_tau / (2N) and applies the normalisation's
    backward. Shape (rows, D), in the accumulation dtype."""
    return _rows_backward(z, lse, row_loss, row_start, row_end, inv_tau, None)


def _rows_backward(z, lse, row_loss, row_start, row_end, inv_tau, grad_out):
    """`_grad` on rows [row_start, row_end) of the raw z from the full (2N,) lse and row losses:
    unscaled in the accumulation dtype without grad_out, else dL/dz in z's dtype."""
    z = z.contiguous()
    _check_rows(z, row_start, row_end)
    for name, v in (("lse", lse), ("row_loss", row_loss)):
        if v.shape != (z.shape[0],):
            raise ValueError(
                f"{name} must be the full ({z.shape[0]},) vector, got {tuple(v.shape)}"
            )
    zs, rs, norms, _ = _scale_rows(*z.chunk(2))
    row_loss = row_loss.to(rs.dtype).contiguous()
    return _grad(
        zs,
        rs,
        norms,
        _row_weights(lse.to(rs.dtype), inv_tau).contiguous(),
        row_loss,
        row_loss.amax().reshape(1),
        row_start,
        row_end,
        inv_tau,
        None if grad_out is None else grad_out.to(rs.dtype).contiguous(),
        rs.dtype if grad_out is None else z.dtype,
    )


@grad_rows.register_fake
def _(z, lse, row_loss, row_start, row_end, inv_tau):
    return fake_grad_rows(z, row_start, row_end)


@torch.library.custom_op("fastcluster_cl::nt_xent_triton_dz_rows", mutates_args=())
def dz_rows(
    z: torch.Tensor,
    lse: torch.Tensor,
    row_loss: torch.Tensor,
    row_start: int,
    row_end: int,
    inv_tau: float,
    grad_out: torch.Tensor,
) -> torch.Tensor:
    """dL/dz of rows [row_start, row_end) of the raw Z for L = grad_out (0-d) times the mean of
    all 2N row losses, in z's dtype: `grad_rows` with the scaling and the normalisation's
    backward in the kernel's epilogue (or its merge's)."""
    return _rows_backward(z, lse, row_loss, row_start, row_end, inv_tau, grad_out)


@dz_rows.register_fake
def _(z, lse, row_loss, row_start, row_end, inv_tau, grad_out):
    return fake_grad_rows(z, row_start, row_end, z.dtype)


def symmetric_masked_lse(z: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """All 2N row lse of the raw Z from upper-triangle tiles only (half the GEMM and exp work of
    `lse_rows`). Needs the fixed shift (2/tau within the exp range) and fp32 or wider
    column-sum atomics; the summation order of the atomics is not deterministic."""
    z = z.contiguous()
    _check_rows(z, 0, z.shape[0])
    acc = torch_acc_dtype(z.dtype)
    if not fixed_shift_safe(inv_tau, acc):
        raise ValueError(
            f"the symmetric forward needs the fixed shift (2/tau within the exp "
            f"range of {acc}), got tau = {1 / inv_tau}"
        )
    zs, rs, _, dist = _scale_rows(*z.chunk(2))
    return _symmetric_lse(zs, rs, dist, inv_tau)[0]


def _symmetric_block(d: int, dtype: torch.dtype) -> tuple[int, int]:
    """(square tile side, feature width) of the symmetric kernels: the forward's rows
    (`narrow_wide_rows` for rows wider than 128 features)."""
    block, _, block_d = (narrow_wide_rows(d) or forward_config(d, dtype)).block
    return block, block_d


def _symmetric_lse(
    zs: torch.Tensor, rs: torch.Tensor, dist: torch.Tensor, inv_tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the symmetric forward on the scaled rows: the 2N row lse and losses, the losses
    as in `_lse_fwd_kernel` (softplus(log sum_neg exp(S - 1/tau) + dist/tau): no cancellation)."""
    rows_total, d = zs.shape
    block, block_d = _symmetric_block(d, zs.dtype)
    row_sum = torch.empty(rows_total, dtype=rs.dtype, device=zs.device)
    col_sum = torch.zeros(rows_total, dtype=rs.dtype, device=zs.device)
    with device_guard(zs):
        _symmetric_fwd_kernel[(triton.cdiv(rows_total, block),)](
            Z=zs,
            RS=rs,
            ROW_SUM=row_sum,
            COL_SUM=col_sum,
            **split_floats(inv_tau=inv_tau),
            rows_total=rows_total,
            half=rows_total // 2,
            D=d,
            ACC=acc_dtype(rs.dtype),
            PREC=dot_precision(zs.dtype),
            UPCAST=upcast_dots(zs.dtype),
            BLOCK=block,
            BLOCK_D=block_d,
        )
    dist = dist.repeat(2)
    row_loss = torch.nn.functional.softplus(torch.log(row_sum + col_sum) + dist * inv_tau)
    return (1.0 - dist) * inv_tau + row_loss, row_loss


def symmetric_grad(
    z: torch.Tensor, lse: torch.Tensor, row_loss: torch.Tensor, inv_tau: float
) -> torch.Tensor:
    """`grad_rows` over all 2N rows of the raw z (normalised on the fly) from upper-triangle
    tiles: sum_j (P_ij + P_ji) zn_j - 2 zn_pos(i), unscaled, in the accumulation dtype."""
    z = z.contiguous()
    _check_rows(z, 0, z.shape[0])
    zs, rs = _scale_rows(*z.chunk(2))[:2]
    row_loss = row_loss.to(rs.dtype).contiguous()
    return _symmetric_grad(
        zs,
        rs,
        _row_weights(lse.to(rs.dtype), inv_tau).contiguous(),
        row_loss,
        row_loss.amax().reshape(1),
        inv_tau,
    )


def _symmetric_grad(
    zs: torch.Tensor,
    rs: torch.Tensor,
    row_w: torch.Tensor,
    row_loss: torch.Tensor,
    loss_max: torch.Tensor,
    inv_tau: float,
) -> torch.Tensor:
    """Launch the symmetric backward on the scaled rows and the forward's row weights, its tile
    weights scaled from the largest row loss (`loss_max`, one value)."""
    rows_total, d = zs.shape
    block, block_d = _symmetric_block(d, zs.dtype)
    g = torch.zeros(rows_total, d, dtype=rs.dtype, device=zs.device)
    with device_guard(zs):
        _symmetric_grad_kernel[(triton.cdiv(rows_total, block),)](
            Z=zs,
            RS=rs,
            ROW_W=row_w,
            ROW_LOSS=row_loss,
            LOSS_MAX=loss_max,
            G=g,
            **split_floats(inv_tau=inv_tau),
            rows_total=rows_total,
            half=rows_total // 2,
            D=d,
            g_stride=g.stride(0),
            FIXED_SHIFT=fixed_shift_safe(inv_tau, rs.dtype),
            ACC=acc_dtype(rs.dtype),
            PREC=dot_precision(zs.dtype),
            UPCAST=upcast_dots(zs.dtype),
            BLOCK=block,
            BLOCK_D=block_d,
        )
    return g


# The single-process fast path as torch.library ops with fake implementations: custom_op around
# the launchers (torch.library.triton_op + wrap_triton cannot run under TRITON_INTERPRET: its
# fake and AOT tracing hand fake tensors to the interpreter). `nt_xent_autograd.NTXent` is their
# autograd, and theirs when called directly. The forward's state is the prologue's Zs, rs and
# norms, the backward's per-row weights (one exp per element), the row losses and the forward
# programs' largest losses (the backward's weight scale).


@torch.library.custom_op("fastcluster_cl::nt_xent_triton_fwd", mutates_args=())
def _fused_forward(
    z_a: torch.Tensor, z_b: torch.Tensor, inv_tau: float, per_row: bool, symmetric: bool
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """(the 2N row losses, or their mean; Zs, rs, norms, row weights, row losses, the largest
    losses of the forward's programs). `symmetric`: the upper-triangle forward (fixed shift
    only)."""
    zs, rs, norms, dist = _scale_rows(z_a, z_b)
    if symmetric:
        lse, row_loss = _symmetric_lse(zs, rs, dist, inv_tau)
        row_w, loss_max = _row_weights(lse, inv_tau), row_loss.amax().reshape(1)
    else:
        _, row_loss, row_w, loss_max = _lse(zs, rs, dist, 0, zs.shape[0], inv_tau)
    loss = row_loss.clone() if per_row else row_loss.mean()
    return loss, zs, rs, norms, row_w, row_loss, loss_max


@_fused_forward.register_fake
def _(z_a, z_b, inv_tau, per_row, symmetric):
    nt_xent_autograd.check_views(z_a, z_b)
    z = z_a
    acc, rows, d = torch_acc_dtype(z.dtype), 2 * z.shape[0], z.shape[1]
    vector = z.new_empty(rows, dtype=acc)
    writers = 1 if symmetric else forward_plan(rows, rows, d, _scaled_dtype(z.dtype))[3]
    return (
        z.new_empty((rows,) if per_row else (), dtype=acc),
        z.new_empty(rows, d, dtype=_scaled_dtype(z.dtype)),
        vector,
        torch.empty_like(vector),
        torch.empty_like(vector),
        torch.empty_like(vector),
        z.new_empty(writers, dtype=acc),
    )


@torch.library.custom_op("fastcluster_cl::nt_xent_triton_bwd", mutates_args=())
def _fused_backward(
    z: torch.Tensor,
    grad: torch.Tensor,
    inv_tau: float,
    zs: torch.Tensor,
    rs: torch.Tensor,
    norms: torch.Tensor,
    row_w: torch.Tensor,
    row_loss: torch.Tensor,
    loss_max: torch.Tensor,
    symmetric: bool,
) -> torch.Tensor:
    """dL/dz (z's dtype) from the gradient of the mean loss (0-d) or of each row's loss (2N,),
    the latter always through the row-parallel kernel."""
    if symmetric and grad.dim() == 0:
        g = _symmetric_grad(zs, rs, row_w, row_loss, loss_max, inv_tau)
        g = g * (grad * inv_tau / z.shape[0])
        zn, norm = l2_normalize(z)
        return l2_normalize_backward(zn, norm, g).to(z.dtype)
    grad_out, row_g = grad.contiguous(), None
    if grad.dim() != 0:
        scale, row_g = nt_xent_autograd.per_row_weights(grad, rs.dtype)
        grad_out = scale.reshape(1)
    rows = zs.shape[0]
    return _grad(
        zs, rs, norms, row_w, row_loss, loss_max, 0, rows, inv_tau, grad_out, z.dtype, row_g
    )


@_fused_backward.register_fake
def _(z, grad, inv_tau, zs, rs, norms, row_w, row_loss, loss_max, symmetric):
    return torch.empty_like(z)


NT_XENT = register_fast_path(
    "triton",
    lse_rows,
    grad_rows,
    _fused_forward,
    _fused_backward,
    dz_rows=dz_rows,
    # the row-parallel backward reads Zs; only the symmetric one normalises Z again
    reads_rows=lambda state, options: options[0],
)


def _checked_options(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> tuple:
    check_dtype(z_a, z_b)
    row_width(z_a.shape[1], "z")
    symmetric = SYMMETRIC and not wide(z_a.shape[1])  # its kernels hold whole rows
    return (symmetric and fixed_shift_safe(1.0 / temperature, z_a.dtype),)


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (see `fastcluster_cl.nt_xent`) with the fused Triton kernels; the loss is fp32,
    or fp64 for fp64 inputs."""
    return nt_xent_autograd.nt_xent(
        z_a, z_b, temperature, "triton", *_checked_options(z_a, z_b, temperature)
    )


def nt_xent_terms(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The 2N per-row terms with the fused Triton kernels (per-row gradients: each row's loss
    weighted by its incoming gradient in the backward kernel)."""
    return nt_xent_autograd.nt_xent_terms(
        z_a, z_b, temperature, "triton", *_checked_options(z_a, z_b, temperature)
    )
