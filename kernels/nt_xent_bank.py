"""NT-Xent against a memory bank in Triton (lightly's NTXentLoss with memory_bank_size; see
`fastcluster_cl.functional.nt_xent_bank`): the N x M similarity matrix is never written.

Rows i < N of z_a are the anchors, zn_b_i their positives, the M bank rows (unit vectors, used as
given) their negatives: S_ik = zn_a_i . bank_k / tau, S_pos_i = zn_a_i . zn_b_i / tau.

Prologue: `nt_xent._scale_rows_kernel` over Z = [z_a; z_b] (pairs (i, i + N)): Zs (fp16 for
fp16/bf16 inputs), rs, the clamped norms and dist_i = 1 - tau S_pos_i = ||zn_a_i - zn_b_i||^2 / 2
(no cancellation for correlated views). The bank is cast to Zs's dtype (fp16 for fp16/bf16
inputs: unit rows lose nothing to its range).

Forward (`_bank_fwd_kernel`, row-parallel): each program owns BLOCK_M rows of z_a and streams the
bank's column blocks: x = S log2(e) = (zs_I bank_J^T) q_I, q = rs log2(e) / tau, and per row
sum_k 2^(x_ik - shift), shift = log2(e)/tau (|S| <= 1/tau for unit bank rows) where exp(-2/tau)
is a normal number, else the online row max. As in `nt_xent`, t = log sum_k exp(S_ik - S_pos)
= ln(total) + dist/tau under the fixed shift, and loss = softplus(t). Writes the row losses and
the backward's per-row weight (u = exp(1/tau - lse) with the fixed shift, else lse log2 e).

Backward (`_bank_grad_kernel`, row-parallel, no atomics, no gradient to the bank): per row block
G = sum_k P_ik bank_k over the bank's column blocks, P_ik = 2^(x - shift) u_i (one exp per
element), the tile weights scaled before their cast to the bank's dtype by the power of two
`nt_xent.weight_scale` of the block's largest P <= 1 - P_pos <= min(loss, 1) (no fp16 overflow;
the largest weights keep fp16's precision however small the losses), then in the epilogue,
with w_i the row's incoming gradient (1/N for the mean) and P_pos - 1 = expm1(-loss_i) in fp32:

    g_a = w_i/tau (G_i + (P_pos - 1) zn_b_i),   g_b = w_i/tau (P_pos - 1) zn_a_i,

each through the normalisation's backward (fused), written to dz_a and dz_b.

Column splits (`nt_xent.column_splits`, as the NT-Xent kernels): where N / BLOCK_M row programs
would leave most SMs idle against a long bank, both launches also split the bank's columns
across programs; the forward's splits are merged by `nt_xent._lse_merge_kernel`, the
backward's (each split's G rows in the accumulation dtype) by `_bank_grad_merge_kernel`, which
then writes dz_a and dz_b. Merged in split order, no atomics: deterministic.

Floors (N anchors, M bank rows, D features): forward 2 N M D FLOPs and N M exps; backward
4 N M D FLOPs and N M exps; the bank is read once per row block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcluster_cl.backends.autograd import nt_xent_bank as nt_xent_bank_autograd
from fastcluster_cl.backends.numerics import fixed_shift_safe

from ._common import (
    acc_dtype,
    check_dtype,
    device_guard,
    dot,
    dot_precision,
    feature_block,
    float_param,
    round_to,
    split_floats,
    upcast_dots,
)
from .nt_xent import (
    _EPS,
    _LOG2E,
    LSE_MERGE_ROWS,
    LaunchConfig,
    _expm1,
    _load_rows,
    _row_weight,
    _scale_rows,
    _scaled_dtype,
    accumulate_negatives,
    backward_config,
    column_range,
    column_splits,
    forward_config,
    merge_row_sums,
    narrow_wide_rows,
    prologue_rows,
    row_block,
    row_logits,
    row_losses,
    store_split_sums,
    sum_split_rows,
    weight_scale,
)


@triton.jit
def _bank_scores(
    zi,
    bj,
    BANK_LO,
    offs_n,
    mask_n,
    D,
    HI_LO: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """zs_I bank_J^T accumulated in ACC; with HI_LO the bank is hi + lo (two fp16 halves of a
    wider bank, see `nt_xent_bank_autograd.bank_operands`): a second product restores its
    precision."""
    s = dot(zi, tl.trans(bj), ACC, PREC, UPCAST)
    if HI_LO:
        lo = _load_rows(BANK_LO, D, offs_n, mask_n, D, BLOCK_D)
        s += dot(zi, tl.trans(lo), ACC, PREC, UPCAST)
    return s


@triton.jit
def _bank_fwd_kernel(
    ZS,
    RS,
    DIST,
    BANK,
    BANK_LO,
    ROW_LOSS,
    ROW_W,
    PART,
    inv_tau_hi,
    inv_tau_lo,
    n,
    M,
    D,
    split_columns,
    SPLIT: tl.constexpr,
    HI_LO: tl.constexpr,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows of z_a against the bank columns of `column_range`; SPLIT: the rows' sums (and
    maxima) to PART for `nt_xent._lse_merge_kernel`, as `nt_xent._lse_fwd_kernel`."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    inv_tau = float_param(inv_tau_hi, inv_tau_lo, ACC)
    shift, zi, ri, qi = row_block(ZS, RS, inv_tau, offs_m, mask_m, D, BLOCK_D)
    total = tl.zeros([BLOCK_M], ACC)
    m_i = tl.full([BLOCK_M], 0.0, ACC) - shift  # x >= -shift: see _lse_fwd_kernel
    col_lo, col_hi = column_range(M, split_columns, SPLIT)
    for c0 in range(col_lo, col_hi, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < M
        bj = _load_rows(BANK, D, offs_n, mask_n, D, BLOCK_D)
        scores = _bank_scores(zi, bj, BANK_LO, offs_n, mask_n, D, HI_LO, ACC, PREC, UPCAST, BLOCK_D)
        x = row_logits(scores, qi, shift, FIXED_SHIFT)
        if c0 + BLOCK_N > M:  # only the last tile holds padding columns
            x = tl.where(mask_n[None, :], x, float("-inf"))
        total, m_i = accumulate_negatives(x, total, m_i, FIXED_SHIFT)
    if SPLIT:
        store_split_sums(PART, total, m_i, offs_m, n, mask_m)
    else:
        lse, loss = row_losses(
            total, m_i, tl.load(DIST + offs_m, mask=mask_m, other=0.0), inv_tau, FIXED_SHIFT, ACC
        )
        tl.store(ROW_LOSS + offs_m, loss, mask=mask_m)
        tl.store(ROW_W + offs_m, _row_weight(lse, inv_tau, FIXED_SHIFT), mask=mask_m)


@triton.jit
def _positive_terms(W, ROW_LOSS, DIST, offs_m, mask_m, inv_tau, ACC: tl.constexpr):
    """(c = w/tau (P_pos - 1), the positive's weight in fp32, never rounded for the tensor
    cores; cos = zn_a . zn_b = 1 - dist) of the rows."""
    c = (
        tl.load(W + offs_m, mask=mask_m, other=0.0).to(ACC)
        * inv_tau
        * _expm1(-tl.load(ROW_LOSS + offs_m, mask=mask_m, other=0.0), ACC)
    )
    return c, 1.0 - tl.load(DIST + offs_m, mask=mask_m, other=0.0)


@triton.jit
def _store_dz_b(
    ZS, RS, NORMS, DZB, c, cos, offs_m, mask_m, n, D, ACC: tl.constexpr, BLOCK_D: tl.constexpr
):
    """dz_b = (g_b - zn_b (zn_b . g_b)) / norm_b with g_b = c zn_a: no bank term."""
    offs_d = tl.arange(0, BLOCK_D)
    out = offs_m[:, None] * D + offs_d[None, :]
    mask = mask_m[:, None] & (offs_d[None, :] < D)
    ri = tl.load(RS + offs_m, mask=mask_m, other=1.0)
    rb = tl.load(RS + offs_m + n, mask=mask_m, other=1.0)
    norm_b = tl.load(NORMS + offs_m + n, mask=mask_m, other=1.0)
    zn_a = _load_rows(ZS, D, offs_m, mask_m, D, BLOCK_D).to(ACC) * ri[:, None]
    zn_b = _load_rows(ZS, D, offs_m + n, mask_m, D, BLOCK_D).to(ACC) * rb[:, None]
    radial_b = tl.where(norm_b > _EPS, c * cos, 0.0)
    dz_b = (c[:, None] * zn_a - zn_b * radial_b[:, None]) / norm_b[:, None]
    tl.store(DZB + out, round_to(dz_b, DZB.dtype.element_ty), mask=mask)


@triton.jit
def _store_dz_a(
    acc,
    ZS,
    RS,
    NORMS,
    W,
    DZA,
    c,
    cos,
    inv_tau,
    offs_m,
    mask_m,
    n,
    D,
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dz_a = (g_a - zn_a (zn_a . g_a)) / norm_a, g_a = w/tau G + c zn_b, from acc = G =
    sum_k P_ik bank_k; zn . g_a = w/tau (zn_a . G) + c cos. zn_a and zn_b reloaded
    (L2-resident) one at a time."""
    offs_d = tl.arange(0, BLOCK_D)
    out = offs_m[:, None] * D + offs_d[None, :]
    mask = mask_m[:, None] & (offs_d[None, :] < D)
    ri = tl.load(RS + offs_m, mask=mask_m, other=1.0)
    rb = tl.load(RS + offs_m + n, mask=mask_m, other=1.0)
    norm_a = tl.load(NORMS + offs_m, mask=mask_m, other=1.0)
    wt = tl.load(W + offs_m, mask=mask_m, other=0.0).to(ACC) * inv_tau
    zn_a = _load_rows(ZS, D, offs_m, mask_m, D, BLOCK_D).to(ACC) * ri[:, None]
    radial_a = tl.where(norm_a > _EPS, wt * tl.sum(zn_a * acc, axis=1) + c * cos, 0.0)
    g = (acc * wt[:, None] - zn_a * radial_a[:, None]) / norm_a[:, None]
    zn_b = _load_rows(ZS, D, offs_m + n, mask_m, D, BLOCK_D).to(ACC) * rb[:, None]
    g += zn_b * (c / norm_a)[:, None]
    tl.store(DZA + out, round_to(g, DZA.dtype.element_ty), mask=mask)


@triton.jit
def _bank_grad_kernel(
    ZS,
    RS,
    NORMS,
    DIST,
    BANK,
    BANK_LO,
    ROW_W,
    ROW_LOSS,
    W,
    DZA,
    DZB,
    PART,
    inv_tau_hi,
    inv_tau_lo,
    n,
    M,
    D,
    split_columns,
    SPLIT: tl.constexpr,
    HI_LO: tl.constexpr,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dz_a and dz_b of a row block; SPLIT: only the block's G over the bank columns of
    `column_range`, to PART (splits x N x D, accumulation dtype) for `_bank_grad_merge_kernel`."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    inv_tau = float_param(inv_tau_hi, inv_tau_lo, ACC)
    shift = inv_tau * _LOG2E
    if not SPLIT:  # written before the loop: fewer tiles live at once (no spills)
        c, cos = _positive_terms(W, ROW_LOSS, DIST, offs_m, mask_m, inv_tau, ACC)
        _store_dz_b(ZS, RS, NORMS, DZB, c, cos, offs_m, mask_m, n, D, ACC, BLOCK_D)
    ri = tl.load(RS + offs_m, mask=mask_m, other=1.0)
    zi = _load_rows(ZS, D, offs_m, mask_m, D, BLOCK_D)
    qi = ri * shift
    u_i = tl.load(ROW_W + offs_m, mask=mask_m, other=0.0)
    loss = tl.load(ROW_LOSS + offs_m, mask=mask_m, other=0.0)
    sigma = weight_scale(tl.minimum(tl.max(loss, axis=0), 1.0).to(tl.float32))
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    col_lo, col_hi = column_range(M, split_columns, SPLIT)
    for c0 in range(col_lo, col_hi, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < M
        bj = _load_rows(BANK, D, offs_n, mask_n, D, BLOCK_D)
        scores = _bank_scores(zi, bj, BANK_LO, offs_n, mask_n, D, HI_LO, ACC, PREC, UPCAST, BLOCK_D)
        x = row_logits(scores, qi, shift, FIXED_SHIFT)
        if FIXED_SHIFT:
            p = tl.exp2(x) * u_i[:, None]
        else:
            p = tl.exp2(x - u_i[:, None])
        if c0 + BLOCK_N > M:
            p = tl.where(mask_n[None, :], p, 0.0)
        acc += dot((p * sigma).to(bj.dtype), bj, ACC, PREC, UPCAST)
    acc *= 1.0 / sigma
    if SPLIT:
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(
            PART + tl.program_id(1) * n * D + offs_m[:, None] * D + offs_d[None, :],
            acc,
            mask=mask_m[:, None] & (offs_d[None, :] < D),
        )
    else:
        _store_dz_a(acc, ZS, RS, NORMS, W, DZA, c, cos, inv_tau, offs_m, mask_m, n, D, ACC, BLOCK_D)


@triton.jit
def _bank_grad_merge_kernel(
    ZS,
    RS,
    NORMS,
    DIST,
    ROW_LOSS,
    W,
    PART,
    DZA,
    DZB,
    inv_tau_hi,
    inv_tau_lo,
    n,
    D,
    splits,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The split backward's rows: the splits' G added in split order, then dz_a and dz_b
    as `_bank_grad_kernel` writes them unsplit."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    offs_d = tl.arange(0, BLOCK_D)
    local = offs_m[:, None] * D + offs_d[None, :]
    mask = mask_m[:, None] & (offs_d[None, :] < D)
    acc = sum_split_rows(PART, local, mask, n * D, splits, ACC, BLOCK_M, BLOCK_D)
    inv_tau = float_param(inv_tau_hi, inv_tau_lo, ACC)
    c, cos = _positive_terms(W, ROW_LOSS, DIST, offs_m, mask_m, inv_tau, ACC)
    _store_dz_b(ZS, RS, NORMS, DZB, c, cos, offs_m, mask_m, n, D, ACC, BLOCK_D)
    _store_dz_a(acc, ZS, RS, NORMS, W, DZA, c, cos, inv_tau, offs_m, mask_m, n, D, ACC, BLOCK_D)


def bank_forward_config(d: int, dtype: torch.dtype) -> LaunchConfig:
    """`nt_xent.forward_config`, 32 x 32 for rows wider than 128 (`nt_xent.narrow_wide_rows`:
    the bank kernels, another accumulator and the fp32 bank's two parts, are not compiled at
    64-row tiles there)."""
    return narrow_wide_rows(d) or forward_config(d, dtype)


def bank_backward_config(
    d: int, dtype: torch.dtype, precision: str | None = None, epilogue: bool = True
):
    """`nt_xent.backward_config`, but 32 rows for 4-byte Zs: the fp32 operand held across the
    loop spilled 24 B at 64 x 32 (sm_90a static report); `nt_xent.narrow_wide_rows` for rows
    wider than 128."""
    feature_block(d, "the memory bank's rows")  # no wide rows (`nt_xent.wide`) here
    config = backward_config(d, dtype, precision, epilogue)
    if dtype == torch.float32:
        return LaunchConfig((32, 32, config.block[2]), config.num_warps, config.num_stages)
    return narrow_wide_rows(d, epilogue) or config


def _launch_forward(zs, rs, dist, bank, bank_lo, hi_lo, inv_tau):
    """The row losses and the backward's row weights; with column splits
    (`nt_xent.column_splits` over the bank), then `nt_xent.merge_row_sums`."""
    n, d, m = zs.shape[0] // 2, zs.shape[1], bank.shape[0]
    config = bank_forward_config(d, zs.dtype)
    row_loss = torch.empty(n, dtype=rs.dtype, device=zs.device)
    row_w = torch.empty_like(row_loss)
    splits, split_columns = column_splits(n, m, config)
    part = torch.empty(2, splits, n, dtype=rs.dtype, device=zs.device) if splits > 1 else row_w
    with device_guard(zs):
        _bank_fwd_kernel[(triton.cdiv(n, config.block[0]), splits)](
            ZS=zs,
            RS=rs,
            DIST=dist,
            BANK=bank,
            BANK_LO=bank_lo,
            ROW_LOSS=row_loss,
            ROW_W=row_w,
            PART=part,
            **split_floats(inv_tau=inv_tau),
            n=n,
            M=m,
            D=d,
            split_columns=split_columns,
            SPLIT=splits > 1,
            HI_LO=hi_lo,
            FIXED_SHIFT=fixed_shift_safe(inv_tau, rs.dtype),
            ACC=acc_dtype(rs.dtype),
            PREC=dot_precision(zs.dtype),
            UPCAST=upcast_dots(zs.dtype),
            **config.options,
        )
        if splits > 1:  # lse and the largest losses to scratch: the backward needs neither
            scratch = torch.empty(triton.cdiv(n, LSE_MERGE_ROWS), dtype=rs.dtype, device=zs.device)
            merge_row_sums(
                part, dist, torch.empty_like(row_loss), row_loss, row_w, scratch, inv_tau, n, 0
            )
    return row_loss, row_w


def _launch_backward(
    zs, rs, norms, dist, bank, bank_lo, hi_lo, row_w, row_loss, w, inv_tau, out_dtype
):
    """(dz_a, dz_b); with column splits over the bank, then `_bank_grad_merge_kernel`."""
    n, d, m = zs.shape[0] // 2, zs.shape[1], bank.shape[0]
    dz_a = torch.empty(n, d, dtype=out_dtype, device=zs.device)
    dz_b = torch.empty_like(dz_a)
    splits, split_columns = column_splits(n, m, bank_backward_config(d, zs.dtype))
    config = bank_backward_config(d, zs.dtype, epilogue=splits == 1)
    part = torch.empty(splits, n, d, dtype=rs.dtype, device=zs.device) if splits > 1 else dz_a
    scalars = dict(**split_floats(inv_tau=inv_tau), n=n, D=d)
    with device_guard(zs):
        _bank_grad_kernel[(triton.cdiv(n, config.block[0]), splits)](
            ZS=zs,
            RS=rs,
            NORMS=norms,
            DIST=dist,
            BANK=bank,
            BANK_LO=bank_lo,
            ROW_W=row_w,
            ROW_LOSS=row_loss,
            W=w,
            DZA=dz_a,
            DZB=dz_b,
            PART=part,
            **scalars,
            M=m,
            split_columns=split_columns,
            SPLIT=splits > 1,
            HI_LO=hi_lo,
            FIXED_SHIFT=fixed_shift_safe(inv_tau, rs.dtype),
            ACC=acc_dtype(rs.dtype),
            PREC=dot_precision(zs.dtype),
            UPCAST=upcast_dots(zs.dtype),
            **config.options,
        )
        if splits > 1:
            _bank_grad_merge_kernel[(triton.cdiv(n, prologue_rows(d)),)](
                ZS=zs,
                RS=rs,
                NORMS=norms,
                DIST=dist,
                ROW_LOSS=row_loss,
                W=w,
                PART=part,
                DZA=dz_a,
                DZB=dz_b,
                **scalars,
                splits=splits,
                ACC=acc_dtype(rs.dtype),
                BLOCK_M=prologue_rows(d),
                BLOCK_D=config.block[2],
            )
    return dz_a, dz_b


def _forward(zs, rs, dist, bank, inv_tau):
    return _launch_forward(
        zs, rs, dist, *nt_xent_bank_autograd.bank_operands(bank, zs.dtype), inv_tau
    )


def _backward(zs, rs, norms, dist, bank, row_w, row_loss, w, inv_tau, out_dtype):
    return _launch_backward(
        zs,
        rs,
        norms,
        dist,
        *nt_xent_bank_autograd.bank_operands(bank, zs.dtype),
        row_w,
        row_loss,
        w,
        inv_tau,
        out_dtype,
    )


_fused_forward, _fused_backward = nt_xent_bank_autograd.define_scaled_row_ops(
    "triton",
    _scale_rows,
    _forward,
    _backward,
    _scaled_dtype,
)


def _check(z_a: torch.Tensor, bank: torch.Tensor) -> None:
    check_dtype(z_a, bank)
    feature_block(z_a.shape[1], "z")


def nt_xent_bank(
    z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`fastcluster_cl.nt_xent_bank` with the fused kernels (fp32 loss, fp64 for fp64)."""
    _check(z_a, bank)
    return nt_xent_bank_autograd.nt_xent_bank(_fused_forward, z_a, z_b, bank, temperature, False)


def nt_xent_bank_terms(
    z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The N row terms (their backward takes one gradient per row)."""
    _check(z_a, bank)
    return nt_xent_bank_autograd.nt_xent_bank(_fused_forward, z_a, z_b, bank, temperature, True)
