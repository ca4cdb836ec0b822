"""The pieces both one-pass objectives share: the instance NT-Xent rows and their gradient
(column pairs streamed against a program's row pair, `kernels.nt_xent` numerics), the (hi, lo)
fp32 scalars, the fixed-order partial sums, and their host-side launch settings."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcluster_cl.backends.numerics import fixed_shift_safe

from .._common import (
    NORM_EPS,
    acc_dtype,
    check_dtype,
    dot,
    dot_precision,
    feature_block,
    upcast_dots,
)
from ..nt_xent import (
    _LOG2E,
    LaunchConfig,
    _edge_tile,
    _load_rows,
    _row_weight,
    _scaled_dtype,
    accumulate_negatives,
    backward_config,
    forward_config,
    grad_block,
    largest,
    narrow_wide_rows,
    nt_xent_weight_scale,
    row_losses,
    scaled_rows,
    tile_logits,
)

_EPS = tl.constexpr(NORM_EPS)


# ---------------------------------------------------------------------------------------------
# shared pieces


@triton.jit
def _instance_rows(
    ZA,
    ZB,
    ZS,
    RS,
    NORMS,
    ROW_W,
    ROW_LOSS,
    inv_tau,
    INST_PART,
    pid,
    n,
    D,
    stride_a,
    stride_b,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """NT-Xent of program pid's rows I and I + N (I = [pid BLOCK_M, (pid + 1) BLOCK_M))
    against all 2N columns, normalising each column tile on the fly; writes the rows' Zs, rs,
    norms, backward row weights and row losses, INST_PART[pid] = the sum of the block's row
    losses and INST_PART[programs + pid] their largest (`store_largest_loss`). Returns
    (offs_m, mask_m) of I."""
    row_lo = pid * BLOCK_M
    offs_m = row_lo + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    offs_d = tl.arange(0, BLOCK_D)
    mask_md = mask_m[:, None] & (offs_d[None, :] < D)
    shift = inv_tau * _LOG2E
    zs_a, rs_a, norm_a = scaled_rows(
        _load_rows(ZA, stride_a, offs_m, mask_m, D, BLOCK_D), TINY, ACC
    )
    zs_b, rs_b, norm_b = scaled_rows(
        _load_rows(ZB, stride_b, offs_m, mask_m, D, BLOCK_D), TINY, ACC
    )
    zi_a = zs_a.to(ZS.dtype.element_ty)
    zi_b = zs_b.to(ZS.dtype.element_ty)
    tl.store(ZS + offs_m[:, None] * D + offs_d[None, :], zi_a, mask=mask_md)
    tl.store(ZS + (offs_m + n)[:, None] * D + offs_d[None, :], zi_b, mask=mask_md)
    tl.store(RS + offs_m, rs_a, mask=mask_m)
    tl.store(RS + n + offs_m, rs_b, mask=mask_m)
    tl.store(NORMS + offs_m, norm_a, mask=mask_m)
    tl.store(NORMS + n + offs_m, norm_b, mask=mask_m)
    # 1 - zn_a . zn_b as ||zn_a - zn_b||^2 / 2 for unit rows: no cancellation (prologue's).
    gap = zs_a * rs_a[:, None] - zs_b * rs_b[:, None]
    dist = tl.where(
        (norm_a > _EPS) & (norm_b > _EPS),
        0.5 * tl.sum(gap * gap, axis=1),
        1.0 - tl.sum(zs_a * rs_a[:, None] * zs_b * rs_b[:, None], axis=1),
    )
    q_a = rs_a * shift
    q_b = rs_b * shift
    tot_a = tl.zeros([BLOCK_M], ACC)
    tot_b = tl.zeros([BLOCK_M], ACC)
    m_a = tl.full([BLOCK_M], 0.0, ACC) - shift  # see nt_xent._lse_fwd_kernel
    m_b = tl.full([BLOCK_M], 0.0, ACC) - shift
    for c0 in range(0, n, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        zc_a, rc_a, _ = scaled_rows(_load_rows(ZA, stride_a, offs_n, mask_n, D, BLOCK_D), TINY, ACC)
        zc_b, rc_b, _ = scaled_rows(_load_rows(ZB, stride_b, offs_n, mask_n, D, BLOCK_D), TINY, ACC)
        zc_a = tl.trans(zc_a.to(ZS.dtype.element_ty))
        zc_b = tl.trans(zc_b.to(ZS.dtype.element_ty))
        x_aa = tile_logits(dot(zi_a, zc_a, ACC, PREC, UPCAST), q_a, rc_a, shift, FIXED_SHIFT)
        x_ab = tile_logits(dot(zi_a, zc_b, ACC, PREC, UPCAST), q_a, rc_b, shift, FIXED_SHIFT)
        x_ba = tile_logits(dot(zi_b, zc_a, ACC, PREC, UPCAST), q_b, rc_a, shift, FIXED_SHIFT)
        x_bb = tile_logits(dot(zi_b, zc_b, ACC, PREC, UPCAST), q_b, rc_b, shift, FIXED_SHIFT)
        if _edge_tile(c0, BLOCK_N, row_lo, BLOCK_M, n):
            # column j of either half is row i's diagonal or positive exactly when j = i
            negative = mask_n[None, :] & (offs_m[:, None] != offs_n[None, :])
            x_aa = tl.where(negative, x_aa, float("-inf"))
            x_ab = tl.where(negative, x_ab, float("-inf"))
            x_ba = tl.where(negative, x_ba, float("-inf"))
            x_bb = tl.where(negative, x_bb, float("-inf"))
        tot_a, m_a = accumulate_negatives(x_aa, tot_a, m_a, FIXED_SHIFT)
        tot_a, m_a = accumulate_negatives(x_ab, tot_a, m_a, FIXED_SHIFT)
        tot_b, m_b = accumulate_negatives(x_ba, tot_b, m_b, FIXED_SHIFT)
        tot_b, m_b = accumulate_negatives(x_bb, tot_b, m_b, FIXED_SHIFT)
    lse_a, loss_a = row_losses(tot_a, m_a, dist, inv_tau, FIXED_SHIFT, ACC)
    lse_b, loss_b = row_losses(tot_b, m_b, dist, inv_tau, FIXED_SHIFT, ACC)
    tl.store(ROW_W + offs_m, _row_weight(lse_a, inv_tau, FIXED_SHIFT), mask=mask_m)
    tl.store(ROW_W + n + offs_m, _row_weight(lse_b, inv_tau, FIXED_SHIFT), mask=mask_m)
    tl.store(ROW_LOSS + offs_m, loss_a, mask=mask_m)
    tl.store(ROW_LOSS + n + offs_m, loss_b, mask=mask_m)
    tl.store(INST_PART + pid, tl.sum(tl.where(mask_m, loss_a + loss_b, 0.0), axis=0))
    largest_loss = tl.max(tl.where(mask_m, tl.maximum(loss_a, loss_b), 0.0), axis=0)
    tl.store(INST_PART + tl.num_programs(0) + pid, largest_loss)
    return offs_m, mask_m


@triton.jit
def store_largest_loss(PARAMS, INST_PART, parts):
    """The epilogues' PARAMS[5]: the largest of the 2N row losses (from the row programs'
    maxima in INST_PART[parts, 2 parts)), which sets the backward's tile weight scale."""
    tl.store(PARAMS + 5, largest(INST_PART + parts, parts, 128))  # 128 a step, as `_sum`


@triton.jit
def _instance_grad(
    ZS,
    RS,
    NORMS,
    ROW_W,
    ROW_LOSS,
    DZA,
    DZB,
    PARAMS,
    g_inst,
    row_lo,
    n,
    D,
    stride_da,
    stride_db,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dz of rows I (into DZA) and I + N (into DZB): the fast path's backward body, its tile
    weights scaled from the largest row loss (PARAMS[5], `nt_xent.nt_xent_weight_scale`)."""
    sigma = nt_xent_weight_scale(PARAMS + 5, 1)
    grad_block(
        ZS,
        RS,
        NORMS,
        ROW_W,
        ROW_LOSS,
        ROW_W,
        DZA,
        tl.load(PARAMS),
        g_inst,
        sigma,
        2 * n,
        n,
        D,
        stride_da,
        0,
        row_lo,
        n,
        0,
        False,
        True,
        False,
        FIXED_SHIFT,
        ACC,
        PREC,
        UPCAST,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
    )
    grad_block(
        ZS,
        RS,
        NORMS,
        ROW_W,
        ROW_LOSS,
        ROW_W,
        DZB,
        tl.load(PARAMS),
        g_inst,
        sigma,
        2 * n,
        n,
        D,
        stride_db,
        n,
        n + row_lo,
        2 * n,
        0,
        False,
        True,
        False,
        FIXED_SHIFT,
        ACC,
        PREC,
        UPCAST,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
    )


@triton.jit
def _store_params(PARAMS, pid, v0, v1, v2, v3, v4):
    """Program 0 writes the five scalars the later launches read (PARAMS[0, 5), a forward
    output the backward gets: no host-to-device copy, no fill; the epilogue adds PARAMS[5])."""
    offs = tl.arange(0, 8)
    values = tl.where(
        offs == 0, v0, tl.where(offs == 1, v1, tl.where(offs == 2, v2, tl.where(offs == 3, v3, v4)))
    )
    tl.store(PARAMS + offs, values, mask=(offs < 5) & (pid == 0))


@triton.jit
def _sum(P, count, ACC: tl.constexpr):
    """sum of P[0 .. count) in a fixed order."""
    offs = tl.arange(0, 128)
    total = tl.zeros([128], ACC)
    for s in range(0, count, 128):
        total += tl.load(P + s + offs, mask=s + offs < count, other=0.0).to(ACC)
    return tl.sum(total, axis=0)


# ---------------------------------------------------------------------------------------------
# host side


def _acc(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def instance_config(d: int, dtype: torch.dtype) -> tuple[LaunchConfig, LaunchConfig]:
    """(forward, backward) launches of the NT-Xent part for D features of Zs in `dtype`. The
    forward normalises every column tile it loads, work that only more rows per program
    amortise: on the tensor-core path (the fast path's 64 x 128) 128 rows per half and
    16-column tiles, 8 warps (sm_90: issue ceiling 0.42 -> 0.50 over 64 x 32 with 4 warps, no
    spills; 128 x 32 spilled); elsewhere the fast path's rows and at most 32 columns (each step
    is four products). The backward is the fast path's. Rows wider than 128 features keep 32 x
    32 tiles both ways: the one-pass kernels (their epilogue in the backward, the cluster
    side's registers beside it) have not been compiled at the fast path's 64-row tiles there."""
    narrow = narrow_wide_rows(d)
    if narrow:
        return narrow, narrow
    fwd = forward_config(d, dtype)
    block_m, block_n, block_d = fwd.block
    if (block_m, block_n) == (64, 128):
        forward = LaunchConfig((128, 16, block_d), num_warps=8, num_stages=fwd.num_stages)
    else:
        forward = LaunchConfig((block_m, min(block_n, 32), block_d), fwd.num_warps, fwd.num_stages)
    return forward, backward_config(d, dtype)


def _instance_state(z_a: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The forward's per-row outputs the NT-Xent backward reads: Zs, rs, norms, row weights,
    row losses (2N x D and 2N)."""
    n, d = z_a.shape
    zs = torch.empty(2 * n, d, dtype=_scaled_dtype(z_a.dtype), device=z_a.device)
    rs = torch.empty(2 * n, dtype=acc, device=z_a.device)
    return zs, rs, torch.empty_like(rs), torch.empty_like(rs), torch.empty_like(rs)


def _instance_consts(z_a: torch.Tensor, inv_tau: float, acc: torch.dtype, config) -> dict:
    zs_dtype = _scaled_dtype(z_a.dtype)
    return dict(
        FIXED_SHIFT=fixed_shift_safe(inv_tau, acc),
        ACC=acc_dtype(acc),
        PREC=dot_precision(zs_dtype),
        UPCAST=upcast_dots(zs_dtype),
        **config.constexprs,
    )


def _check_instance(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    check_dtype(z_a, z_b)
    if z_a.dim() != 2 or z_a.shape != z_b.shape or z_a.dtype != z_b.dtype:
        raise ValueError(
            f"z_a and z_b must be (N, D) of one dtype, got {tuple(z_a.shape)} "
            f"{z_a.dtype} and {tuple(z_b.shape)} {z_b.dtype}"
        )
    feature_block(z_a.shape[1], "z")


def _float64_all_or_none(*tensors: torch.Tensor) -> bool:
    return len({t.dtype == torch.float64 for t in tensors}) == 1
