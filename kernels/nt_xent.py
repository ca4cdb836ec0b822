"""Fused NT-Xent (SimCLR / CC instance loss) in Triton: the 2N x 2N similarity matrix is never
written.

Z = [z_a; z_b] (2N x D, any of fp16/bf16/fp32/fp64), zn_i = z_i / max(||z_i||, 1e-12),
S = zn zn^T / tau, pos(i) = i + N for i < N else i - N.

Forward (`_lse_fwd_kernel`, one row-parallel launch): each program owns BLOCK_M rows, keeps them
in registers, and streams every column block of Z once: S tile = (z_I z_J^T) * r_I r_J / tau with
r the inverse row norms computed from the tiles already loaded (the L2 normalisation is fused: zn
is never written). Per row it accumulates sum_{k != i} exp(S_ik - shift): shift = 1/tau (fixed,
exact bound |S| <= 1/tau) when exp(-2/tau) stays normal, else the online row max. It also reads
the positive row and writes lse_i - S_{i,pos(i)}. Saved for backward: Z (the input) and lse (2N).

Backward (`_grad_kernel`, one row-parallel launch, no atomics): S is symmetric, so
P_ji = exp(S_ij - lse_j) comes from the same tile as P_ij = exp(S_ij - lse_i):

    g_i = 1/(tau*2N) * ( sum_j (P_ij + P_ji) zn_j - 2 zn_pos(i) ),
    dz_i = (g_i - zn_i (zn_i . g_i)) / ||z_i||      (the normalisation's backward, fused)

Floors (R = 2N rows, D features, b bytes per input element):
  forward  2 R^2 D FLOPs, R^2 exps; reads of Z: its own rows once, all columns once per row block
           (R / BLOCK_M passes, served from L2 at these sizes), the positive rows once; writes
           2R floats. Byte floor R*D*b read + 8R written.
  backward 4 R^2 D FLOPs (the S tile and A @ zn_J), 2 R^2 exps; reads of Z: own rows once, all
           columns once per row block, positive rows once; lse once per row block; writes R*D*b.
The symmetric upper-triangle variant (each tile serving its rows and, transposed, its columns;
half the GEMM/exp work, at the price of atomics on the column sums) is `symmetric_masked_lse`;
which one the autograd Function uses awaits a GPU measurement (no GPU in the session that wrote
this), so `SYMMETRIC_FORWARD` defaults to the row-parallel kernel.

Row-range primitives for the distributed backend (each rank owns rows [row_start, row_end) of the
all-gathered, already-normalised Z): `masked_lse_rows` and `grad_rows`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import (NORM_EPS, acc_dtype, check_dtype, dot, dot_precision, feature_block,
                      torch_acc_dtype, upcast_dots)

_EPS = tl.constexpr(NORM_EPS)
# Largest 2/tau for which exp(S - 1/tau) >= exp(-2/tau) stays a normal number (as chunked.py).
_SHIFT_RANGE = {torch.float64: 700.0}
_SHIFT_RANGE_DEFAULT = 80.0
SYMMETRIC_FORWARD = os.environ.get("FASTCLUSTER_CL_SYMMETRIC", "0") == "1"


@triton.jit
def _load_rows(Z, stride, offs, mask, D, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(Z + offs[:, None] * stride + offs_d[None, :],
                   mask=mask[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _inv_norm(z, NORMALIZE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """1 / max(||z_row||, eps) per row, or ones when the rows are already normalised."""
    if NORMALIZE:
        zf = z.to(ACC)
        return 1.0 / tl.maximum(tl.sqrt(tl.sum(zf * zf, axis=1)), _EPS)
    else:
        return tl.full([BLOCK], 1.0, ACC)


@triton.jit
def _sim_tile(zi, ri, zj, rj, inv_tau, ACC: tl.constexpr, PREC: tl.constexpr,
              UPCAST: tl.constexpr):
    s = dot(zi, tl.trans(zj), ACC, PREC, UPCAST)
    return s * (ri[:, None] * inv_tau) * rj[None, :]


@triton.jit
def _positive_rows(offs_m, half):
    return tl.where(offs_m < half, offs_m + half, offs_m - half)


@triton.jit
def _lse_fwd_kernel(Z, LSE, ROW_LOSS, INV_TAU, rows_total, half, D, stride, row_start, row_end,
                    NORMALIZE: tl.constexpr, FIXED_SHIFT: tl.constexpr, WITH_POS: tl.constexpr,
                    ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = row_start + pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    inv_tau = tl.load(INV_TAU)
    zi = _load_rows(Z, stride, offs_m, mask_m, D, BLOCK_D)
    ri = _inv_norm(zi, NORMALIZE, ACC, BLOCK_M)
    total = tl.zeros([BLOCK_M], ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    for c0 in range(0, rows_total, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < rows_total
        zj = _load_rows(Z, stride, offs_n, mask_n, D, BLOCK_D)
        rj = _inv_norm(zj, NORMALIZE, ACC, BLOCK_N)
        s = _sim_tile(zi, ri, zj, rj, inv_tau, ACC, PREC, UPCAST)
        valid = mask_n[None, :] & (offs_m[:, None] != offs_n[None, :])
        if FIXED_SHIFT:
            total += tl.sum(tl.where(valid, tl.exp(s - inv_tau), 0.0), axis=1)
        else:
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            total = total * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m_i = m_new
    if FIXED_SHIFT:
        lse = tl.log(total) + inv_tau
    else:
        lse = tl.log(total) + m_i
    tl.store(LSE + offs_m - row_start, lse, mask=mask_m)
    if WITH_POS:
        zp = _load_rows(Z, stride, _positive_rows(offs_m, half), mask_m, D, BLOCK_D)
        rp = _inv_norm(zp, NORMALIZE, ACC, BLOCK_M)
        positive = tl.sum(zi.to(ACC) * zp.to(ACC), axis=1) * ri * rp * inv_tau
        tl.store(ROW_LOSS + offs_m - row_start, lse - positive, mask=mask_m)


@triton.jit
def _grad_kernel(Z, LSE, DZ, INV_TAU, GRAD_OUT, rows_total, half, D, stride, dz_stride,
                 row_start, row_end,
                 NORMALIZE: tl.constexpr, EPILOGUE: tl.constexpr, ACC: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = row_start + pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    offs_d = tl.arange(0, BLOCK_D)
    inv_tau = tl.load(INV_TAU)
    zi = _load_rows(Z, stride, offs_m, mask_m, D, BLOCK_D)
    ri = _inv_norm(zi, NORMALIZE, ACC, BLOCK_M)
    lse_i = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for c0 in range(0, rows_total, BLOCK_N):
        offs_n = c0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < rows_total
        zj = _load_rows(Z, stride, offs_n, mask_n, D, BLOCK_D)
        rj = _inv_norm(zj, NORMALIZE, ACC, BLOCK_N)
        lse_j = tl.load(LSE + offs_n, mask=mask_n, other=0.0)
        s = _sim_tile(zi, ri, zj, rj, inv_tau, ACC, PREC, UPCAST)
        valid = mask_n[None, :] & (offs_m[:, None] != offs_n[None, :])
        a = tl.where(valid, tl.exp(s - lse_i[:, None]) + tl.exp(s - lse_j[None, :]), 0.0)
        zn_j = (zj.to(ACC) * rj[:, None]).to(zj.dtype)
        acc += dot(a.to(zj.dtype), zn_j, ACC, PREC, UPCAST)
    zp = _load_rows(Z, stride, _positive_rows(offs_m, half), mask_m, D, BLOCK_D)
    g = acc - 2.0 * zp.to(ACC) * _inv_norm(zp, NORMALIZE, ACC, BLOCK_M)[:, None]
    if EPILOGUE:
        g = g * (tl.load(GRAD_OUT).to(ACC) * inv_tau / rows_total)
        zf = zi.to(ACC)
        norm = tl.sqrt(tl.sum(zf * zf, axis=1))
        zn = zf * ri[:, None]
        radial = tl.where(norm > _EPS, tl.sum(zn * g, axis=1), 0.0)
        g = (g - zn * radial[:, None]) * ri[:, None]
        g = tl.where(mask_m[:, None], g, 0.0)  # padding rows (zero, so 1/eps-scaled) stay finite
    tl.store(DZ + (offs_m - row_start)[:, None] * dz_stride + offs_d[None, :],
             g.to(DZ.dtype.element_ty), mask=mask_m[:, None] & (offs_d[None, :] < D))


@triton.jit
def _symmetric_fwd_kernel(Z, ROW_SUM, COL_SUM, INV_TAU, rows_total, D, stride,
                          NORMALIZE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                          UPCAST: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Upper-triangle tiles (I <= J), fixed shift 1/tau: tile (I, J) adds its row sums to rows I
    (registers) and its column sums to rows J (atomics)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK + tl.arange(0, BLOCK)
    mask_m = offs_m < rows_total
    inv_tau = tl.load(INV_TAU)
    zi = _load_rows(Z, stride, offs_m, mask_m, D, BLOCK_D)
    ri = _inv_norm(zi, NORMALIZE, ACC, BLOCK)
    total = tl.zeros([BLOCK], ACC)
    for c0 in range(pid * BLOCK, rows_total, BLOCK):
        offs_n = c0 + tl.arange(0, BLOCK)
        mask_n = offs_n < rows_total
        zj = _load_rows(Z, stride, offs_n, mask_n, D, BLOCK_D)
        rj = _inv_norm(zj, NORMALIZE, ACC, BLOCK)
        s = _sim_tile(zi, ri, zj, rj, inv_tau, ACC, PREC, UPCAST)
        valid = mask_m[:, None] & mask_n[None, :] & (offs_m[:, None] != offs_n[None, :])
        e = tl.where(valid, tl.exp(s - inv_tau), 0.0)
        total += tl.sum(e, axis=1)
        if c0 != pid * BLOCK:  # the diagonal tile's columns are its own rows, already counted
            tl.atomic_add(COL_SUM + offs_n, tl.sum(e, axis=0), mask=mask_n)
    tl.store(ROW_SUM + offs_m, total, mask=mask_m)


def _is_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D). The interpreter is fastest at 32 (DESIGN.md)."""
    block_d = feature_block(d, "the NT-Xent input")
    if _is_interpreted() or block_d > 128:
        return 32, 32, block_d
    return 64, 64, block_d


def fixed_shift_safe(inv_tau: float, dtype: torch.dtype) -> bool:
    """Whether shift 1/tau keeps every exp(S_ik - 1/tau) >= exp(-2/tau) a normal number."""
    return 2.0 * inv_tau <= _SHIFT_RANGE.get(dtype, _SHIFT_RANGE_DEFAULT)


def _inv_tau_tensor(inv_tau: float, z: torch.Tensor) -> torch.Tensor:
    return torch.full((1,), inv_tau, dtype=torch_acc_dtype(z.dtype), device=z.device)


def _check_rows(z: torch.Tensor, row_start: int, row_end: int) -> None:
    check_dtype(z)
    if z.dim() != 2 or z.shape[0] % 2:
        raise ValueError(f"Z must be (2N, D), got {tuple(z.shape)}")
    if not 0 <= row_start < row_end <= z.shape[0]:
        raise ValueError(f"need 0 <= row_start < row_end <= {z.shape[0]}, "
                         f"got [{row_start}, {row_end})")


def _lse(z, row_start, row_end, inv_tau, normalize, with_pos):
    """Launch the row-parallel forward: (lse, lse - S_pos or None) for rows [row_start, row_end)."""
    rows_total, d = z.shape
    block_m, block_n, block_d = _blocks(d)
    acc = torch_acc_dtype(z.dtype)
    lse = torch.empty(row_end - row_start, dtype=acc, device=z.device)
    row_loss = torch.empty_like(lse) if with_pos else lse
    _lse_fwd_kernel[(triton.cdiv(row_end - row_start, block_m),)](
        z, lse, row_loss, _inv_tau_tensor(inv_tau, z), rows_total, rows_total // 2, d,
        z.stride(0), row_start, row_end,
        NORMALIZE=normalize, FIXED_SHIFT=fixed_shift_safe(inv_tau, acc), WITH_POS=with_pos,
        ACC=acc_dtype(z.dtype), PREC=dot_precision(z.dtype), UPCAST=upcast_dots(z.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return lse, (row_loss if with_pos else None)


def _grad(z, lse, row_start, row_end, inv_tau, grad_out, out_dtype):
    """Launch the row-parallel backward. With grad_out (a 0-d tensor) the epilogue scales and
    applies the normalisation's backward (z raw); without it z is normalised and g unscaled."""
    rows_total, d = z.shape
    block_m, block_n, block_d = _blocks(d)
    dz = torch.empty(row_end - row_start, d, dtype=out_dtype, device=z.device)
    epilogue = grad_out is not None
    inv = _inv_tau_tensor(inv_tau, z)
    _grad_kernel[(triton.cdiv(row_end - row_start, block_m),)](
        z, lse, dz, inv, grad_out if epilogue else inv, rows_total, rows_total // 2, d,
        z.stride(0), dz.stride(0), row_start, row_end,
        NORMALIZE=epilogue, EPILOGUE=epilogue, ACC=acc_dtype(z.dtype),
        PREC=dot_precision(z.dtype), UPCAST=upcast_dots(z.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return dz


def masked_lse_rows(zn: torch.Tensor, row_start: int, row_end: int,
                    inv_tau: float) -> torch.Tensor:
    """lse_i = log sum_{k != i} exp(zn_i . zn_k * inv_tau) for rows [row_start, row_end) of the
    full normalised Z (2N x D) against all its columns; shape (row_end - row_start,)."""
    zn = zn.contiguous()
    _check_rows(zn, row_start, row_end)
    return _lse(zn, row_start, row_end, inv_tau, normalize=False, with_pos=False)[0]


def grad_rows(zn: torch.Tensor, lse: torch.Tensor, row_start: int, row_end: int,
              inv_tau: float) -> torch.Tensor:
    """sum_j (P_ij + P_ji) zn_j - 2 zn_pos(i) for rows [row_start, row_end), P_ij =
    exp(S_ij - lse_i), lse the full (2N,) vector. Unscaled: the caller multiplies by
    grad_out * inv_tau / (2N) and applies the normalisation's backward. Shape (rows, D)."""
    zn = zn.contiguous()
    _check_rows(zn, row_start, row_end)
    if lse.shape != (zn.shape[0],):
        raise ValueError(f"lse must be the full ({zn.shape[0]},) vector, got {tuple(lse.shape)}")
    lse = lse.to(torch_acc_dtype(zn.dtype)).contiguous()
    return _grad(zn, lse, row_start, row_end, inv_tau, None, torch_acc_dtype(zn.dtype))


def symmetric_masked_lse(z: torch.Tensor, inv_tau: float, normalize: bool = True) -> torch.Tensor:
    """All 2N row lse from upper-triangle tiles only (half the GEMM and exp work of
    `masked_lse_rows`). Needs the fixed shift (2/tau within the exp range) and fp32 or wider
    column-sum atomics; the summation order of the atomics is not deterministic."""
    z = z.contiguous()
    _check_rows(z, 0, z.shape[0])
    acc = torch_acc_dtype(z.dtype)
    if not fixed_shift_safe(inv_tau, acc):
        raise ValueError(f"the symmetric forward needs the fixed shift, 2/tau <= "
                         f"{_SHIFT_RANGE.get(acc, _SHIFT_RANGE_DEFAULT)} for {acc} "
                         f"accumulation, got tau = {1 / inv_tau}")
    rows_total, d = z.shape
    block, _, block_d = _blocks(d)
    row_sum = torch.empty(rows_total, dtype=acc, device=z.device)
    col_sum = torch.zeros(rows_total, dtype=acc, device=z.device)
    _symmetric_fwd_kernel[(triton.cdiv(rows_total, block),)](
        z, row_sum, col_sum, _inv_tau_tensor(inv_tau, z), rows_total, d, z.stride(0),
        NORMALIZE=normalize, ACC=acc_dtype(z.dtype), PREC=dot_precision(z.dtype),
        UPCAST=upcast_dots(z.dtype), BLOCK=block, BLOCK_D=block_d)
    return torch.log(row_sum + col_sum) + inv_tau


def _positive_logits(z: torch.Tensor, inv_tau: float) -> torch.Tensor:
    zf = z.to(torch_acc_dtype(z.dtype))
    zn = zf / zf.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return (zn * zn.roll(z.shape[0] // 2, 0)).sum(1) * inv_tau


class NTXentFunction(torch.autograd.Function):
    """NT-Xent over [z_a; z_b] with the fused kernels; returns the mean loss (fp32, or fp64 for
    fp64 inputs). Saves the concatenated input and the (2N,) row lse."""

    @staticmethod
    def forward(ctx, z_a, z_b, temperature):
        z = torch.cat([z_a, z_b]).contiguous()
        inv_tau = 1.0 / temperature
        if SYMMETRIC_FORWARD and fixed_shift_safe(inv_tau, torch_acc_dtype(z.dtype)):
            lse = symmetric_masked_lse(z, inv_tau)
            row_loss = lse - _positive_logits(z, inv_tau)
        else:
            lse, row_loss = _lse(z, 0, z.shape[0], inv_tau, normalize=True, with_pos=True)
        ctx.save_for_backward(z, lse)
        ctx.inv_tau = inv_tau
        return row_loss.mean()

    @staticmethod
    def backward(ctx, grad_out):
        z, lse = ctx.saved_tensors
        n = z.shape[0] // 2
        dz = _grad(z, lse, 0, z.shape[0], ctx.inv_tau, grad_out.contiguous(), z.dtype)
        return dz[:n], dz[n:], None


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (see `fastcluster_cl.nt_xent`) with the fused Triton kernels."""
    check_dtype(z_a, z_b)
    feature_block(z_a.shape[1], "z")
    return NTXentFunction.apply(z_a, z_b, temperature)
