"""Student-t soft assignment (DEC / arXiv 2109.12714 centre head) in Triton.

q_ik = softmax_k( -(alpha+1)/2 * log(1 + d_ik / alpha) ),  d_ik = ||h_i - mu_k||^2, computed as
||h_i||^2 - 2 h_i . mu_k + ||mu_k||^2 (clamped at 0) so the cross term is a tensor-core dot.

Forward (`_fwd_kernel`, row-parallel): each program reads its BLOCK_M rows of h once and all
centres once (F in BLOCK_F chunks), builds the (BLOCK_M, K) distances, the softmax in registers,
and writes q (the op's output). Backward (`_bwd_kernel`, row-parallel, no atomics): re-reads h
and the centres twice (once for the distances, once for dh = 2 (rowsum(g) h - g mu) with
g = dL/dd), writes dh and g (N x K); dmu = -2 (g^T h - colsum(g) mu) is one cuBLAS GEMM on the
host, which keeps it deterministic.

Floors (N rows, K centres, F features, b bytes): forward 2 N K F FLOPs, N K logs/exps, reads
N F b + P K F b (P programs; the centres are L2-resident), writes N K acc floats; backward
4 N K F FLOPs in the kernel + 2 N K F in the host GEMM, reads h twice and q's inputs once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, check_dtype, dot, dot_precision, torch_acc_dtype,
                      upcast_dots)

MAX_CENTRES = 1024
_BLOCK_M = 32


@triton.jit
def _distances(H, MU, stride_h, stride_mu, offs_m, mask_m, K, F, ACC: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr):
    """(BLOCK_M, BLOCK_K) squared distances ||h_i - mu_k||^2, accumulated over F chunks."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    cross = tl.zeros([BLOCK_M, BLOCK_K], ACC)
    hh = tl.zeros([BLOCK_M], ACC)
    mm = tl.zeros([BLOCK_K], ACC)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        h = tl.load(H + offs_m[:, None] * stride_h + offs_f[None, :],
                    mask=mask_m[:, None] & mask_f[None, :], other=0.0)
        mu = tl.load(MU + offs_k[:, None] * stride_mu + offs_f[None, :],
                     mask=mask_k[:, None] & mask_f[None, :], other=0.0)
        cross += dot(h, tl.trans(mu), ACC, PREC, UPCAST)
        hf = h.to(ACC)
        muf = mu.to(ACC)
        hh += tl.sum(hf * hf, axis=1)
        mm += tl.sum(muf * muf, axis=1)
    return tl.maximum(hh[:, None] - 2.0 * cross + mm[None, :], 0.0)


@triton.jit
def _assign(d, alpha, mask_k, BLOCK_K: tl.constexpr):
    logit = tl.where(mask_k[None, :], -(alpha + 1.0) / 2.0 * tl.log(1.0 + d / alpha),
                     float("-inf"))
    e = tl.exp(logit - tl.max(logit, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _fwd_kernel(H, MU, Q, ALPHA, n, K, F, stride_h, stride_mu,
                ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    alpha = tl.load(ALPHA)
    d = _distances(H, MU, stride_h, stride_mu, offs_m, mask_m, K, F, ACC, PREC, UPCAST,
                   BLOCK_M, BLOCK_K, BLOCK_F)
    q = _assign(d, alpha, mask_k, BLOCK_K)
    tl.store(Q + offs_m[:, None] * K + offs_k[None, :], q,
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _bwd_kernel(H, MU, DQ, DH, G, ALPHA, n, K, F, stride_h, stride_mu, stride_dh,
                ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_F: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mask_mk = mask_m[:, None] & mask_k[None, :]
    alpha = tl.load(ALPHA)
    d = _distances(H, MU, stride_h, stride_mu, offs_m, mask_m, K, F, ACC, PREC, UPCAST,
                   BLOCK_M, BLOCK_K, BLOCK_F)
    q = _assign(d, alpha, mask_k, BLOCK_K)
    dq = tl.load(DQ + offs_m[:, None] * K + offs_k[None, :], mask=mask_mk, other=0.0).to(ACC)
    dlogit = q * (dq - tl.sum(q * dq, axis=1)[:, None])
    g = tl.where(mask_mk, dlogit * (-(alpha + 1.0) / 2.0) / (alpha + d), 0.0)   # dL/dd_ik
    tl.store(G + offs_m[:, None] * K + offs_k[None, :], g, mask=mask_mk)
    row = tl.sum(g, axis=1)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        h = tl.load(H + offs_m[:, None] * stride_h + offs_f[None, :],
                    mask=mask_m[:, None] & mask_f[None, :], other=0.0).to(ACC)
        mu = tl.load(MU + offs_k[:, None] * stride_mu + offs_f[None, :],
                     mask=mask_k[:, None] & mask_f[None, :], other=0.0).to(ACC)
        dh = 2.0 * (row[:, None] * h - dot(g, mu, ACC, PREC, False))
        tl.store(DH + offs_m[:, None] * stride_dh + offs_f[None, :], dh.to(DH.dtype.element_ty),
                 mask=mask_m[:, None] & mask_f[None, :])


def _blocks(k: int, f: int) -> tuple[int, int]:
    if k > MAX_CENTRES:
        raise ValueError(f"backend='triton' supports at most {MAX_CENTRES} centres, got {k}; "
                         "use backend='chunked' for more")
    return max(16, triton.next_power_of_2(k)), min(64, max(16, triton.next_power_of_2(f)))


class StudentTFunction(torch.autograd.Function):
    """(h (N x F), centres (K x F), alpha) -> q (N x K) in the accumulation dtype."""

    @staticmethod
    def forward(ctx, h, centers, alpha):
        (n, f), k = h.shape, centers.shape[0]
        block_k, block_f = _blocks(k, f)
        acc = torch_acc_dtype(h.dtype)
        alpha_t = torch.full((1,), alpha, dtype=acc, device=h.device)
        q = torch.empty(n, k, dtype=acc, device=h.device)
        _fwd_kernel[(triton.cdiv(n, _BLOCK_M),)](
            h, centers, q, alpha_t, n, k, f, h.stride(0), centers.stride(0),
            ACC=acc_dtype(h.dtype), PREC=dot_precision(h.dtype), UPCAST=upcast_dots(h.dtype),
            BLOCK_M=_BLOCK_M, BLOCK_K=block_k, BLOCK_F=block_f)
        ctx.save_for_backward(h, centers, alpha_t)
        return q

    @staticmethod
    def backward(ctx, dq):
        h, centers, alpha_t = ctx.saved_tensors
        (n, f), k = h.shape, centers.shape[0]
        block_k, block_f = _blocks(k, f)
        acc = torch_acc_dtype(h.dtype)
        dh = torch.empty_like(h)
        g = torch.empty(n, k, dtype=acc, device=h.device)
        _bwd_kernel[(triton.cdiv(n, _BLOCK_M),)](
            h, centers, dq.contiguous(), dh, g, alpha_t, n, k, f, h.stride(0),
            centers.stride(0), dh.stride(0), ACC=acc_dtype(h.dtype), PREC=dot_precision(acc),
            UPCAST=upcast_dots(h.dtype), BLOCK_M=_BLOCK_M, BLOCK_K=block_k, BLOCK_F=block_f)
        mu = centers.to(acc)
        d_mu = -2.0 * (g.T @ h.to(acc) - g.sum(0)[:, None] * mu)
        return dh, d_mu.to(centers.dtype), None


def student_t(h: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    """Student-t assignment (see `fastcluster_cl.student_t`) with the fused kernels."""
    check_dtype(h, centers)
    common = torch.promote_types(h.dtype, centers.dtype)  # e.g. bf16 features, fp32 centres
    return StudentTFunction.apply(h.to(common).contiguous(), centers.to(common).contiguous(),
                                  alpha)
