"""The two KL losses on assignments, in Triton: DEC's self-training KL and the anchor loss.

DEC (`dec_loss`): f_k = sum_i q_ik; p_ik = (q_ik^2 / f_k) / sum_j (q_ij^2 / f_j) held fixed;
L = (1/N) sum_i KL(p_i || q_i). The forward is a column-sum launch (`_colsum_kernel`, persistent
programs writing deterministic partials of f) and a row launch (`_dec_kernel`) that rebuilds
p_i from q_i and f and writes the per-row KL; the backward launch re-reads q (and f) and writes
dq_ik = -(grad / N) p_ik / q_ik. Reads of q: forward 2, backward 1; the target p never reaches
memory. Floors: O(N K) FLOPs, forward 2 N K b bytes read, backward N K b read + N K b written.

Anchor (`anchor_loss`): L = (1/N) sum_i KL(q0_i || qa_i) + KL(q0_i || qb_i), q0 detached. One
row launch reads q0, qa, qb once and writes per-row terms; the backward reads each once more and
writes dqa = -(grad / N) q0 / qa, dqb likewise. Floors: forward 3 N K b read, backward 3 N K b
read + 2 N K b written.

log q is clamped at the accumulation dtype's smallest normal, as `reference.safe_log`: a zero
probability has a finite log and a zero gradient (one-hot assignments stay NaN-free).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_dtype, torch_acc_dtype

MAX_CLUSTERS = 4096
_BLOCK_M = 32
_MAX_PROGRAMS = 128


@triton.jit
def _load(Q, stride, offs_m, mask_m, K, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    return tl.load(Q + offs_m[:, None] * stride + offs_k[None, :],
                   mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0).to(ACC)


@triton.jit
def _store(DQ, stride, offs_m, mask_m, K, value, BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    tl.store(DQ + offs_m[:, None] * stride + offs_k[None, :], value.to(DQ.dtype.element_ty),
             mask=mask_m[:, None] & (offs_k[None, :] < K))


@triton.jit
def _xlogx(p):
    return tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0)


@triton.jit
def _safe_log(q, TINY: tl.constexpr):
    return tl.log(tl.maximum(q, TINY))


@triton.jit
def _ratio(p, q, TINY: tl.constexpr):
    """p / q where q >= tiny, else 0: the gradient of p * safe_log(q)."""
    return tl.where(q >= TINY, p / tl.maximum(q, TINY), 0.0)


@triton.jit
def _colsum_kernel(Q, PARTIAL, n, K, stride, ACC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    total = tl.zeros([BLOCK_K], ACC)
    for r0 in range(pid * BLOCK_M, n, tl.num_programs(0) * BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        total += tl.sum(_load(Q, stride, offs_m, offs_m < n, K, ACC, BLOCK_K), axis=0)
    tl.store(PARTIAL + pid * BLOCK_K + tl.arange(0, BLOCK_K), total)


@triton.jit
def _dec_target(q, f, mask_k):
    w = tl.where(mask_k[None, :], q * q / f[None, :], 0.0)
    total = tl.sum(w, axis=1)
    return w / tl.where(total > 0, total, 1.0)[:, None]  # padding rows are all zero


@triton.jit
def _dec_kernel(Q, F, OUT, n, K, stride, GRAD, stride_out, BACKWARD: tl.constexpr,
                ACC: tl.constexpr, TINY: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Forward: OUT[i] = KL(p_i || q_i). Backward: OUT = dq = -(GRAD / n) p / q."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    q = _load(Q, stride, offs_m, mask_m, K, ACC, BLOCK_K)
    f = tl.load(F + offs_k, mask=mask_k, other=1.0)
    p = _dec_target(q, f, mask_k)
    if BACKWARD:
        scale = -tl.load(GRAD).to(ACC) / n
        _store(OUT, stride_out, offs_m, mask_m, K, scale * _ratio(p, q, TINY), BLOCK_K)
    else:
        kl = tl.sum(_xlogx(p) - p * _safe_log(q, TINY), axis=1)
        tl.store(OUT + offs_m, kl, mask=mask_m)


@triton.jit
def _anchor_kernel(Q0, QA, QB, OUT, DQA, DQB, GRAD, n, K, stride0, stride_a, stride_b,
                   stride_da, stride_db, BACKWARD: tl.constexpr, ACC: tl.constexpr,
                   TINY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    q0 = _load(Q0, stride0, offs_m, mask_m, K, ACC, BLOCK_K)
    qa = _load(QA, stride_a, offs_m, mask_m, K, ACC, BLOCK_K)
    qb = _load(QB, stride_b, offs_m, mask_m, K, ACC, BLOCK_K)
    if BACKWARD:
        scale = -tl.load(GRAD).to(ACC) / n
        _store(DQA, stride_da, offs_m, mask_m, K, scale * _ratio(q0, qa, TINY), BLOCK_K)
        _store(DQB, stride_db, offs_m, mask_m, K, scale * _ratio(q0, qb, TINY), BLOCK_K)
    else:
        terms = 2.0 * _xlogx(q0) - q0 * (_safe_log(qa, TINY) + _safe_log(qb, TINY))
        tl.store(OUT + offs_m, tl.sum(terms, axis=1), mask=mask_m)


def _block_k(k: int) -> int:
    if k > MAX_CLUSTERS:
        raise ValueError(f"backend='triton' supports at most {MAX_CLUSTERS} clusters, got {k}; "
                         "use backend='chunked' for more")
    return max(16, triton.next_power_of_2(k))


def _consts(dtype: torch.dtype) -> dict:
    acc = torch_acc_dtype(dtype)
    return dict(ACC=acc_dtype(dtype), TINY=torch.finfo(acc).tiny, BLOCK_M=_BLOCK_M)


class DECFunction(torch.autograd.Function):
    """q (N x K) -> DEC KL loss (accumulation dtype); saves q and f = column sums (K,)."""

    @staticmethod
    def forward(ctx, q):
        n, k = q.shape
        block_k = _block_k(k)
        acc = torch_acc_dtype(q.dtype)
        programs = min(triton.cdiv(n, _BLOCK_M), _MAX_PROGRAMS)
        partial = torch.empty(programs, block_k, dtype=acc, device=q.device)
        _colsum_kernel[(programs,)](q, partial, n, k, q.stride(0), ACC=acc_dtype(q.dtype),
                                    BLOCK_M=_BLOCK_M, BLOCK_K=block_k)
        f = partial.sum(0)[:k].contiguous()
        rows = torch.empty(n, dtype=acc, device=q.device)
        _dec_kernel[(triton.cdiv(n, _BLOCK_M),)](q, f, rows, n, k, q.stride(0), f, 0,
                                                 BACKWARD=False, BLOCK_K=block_k,
                                                 **_consts(q.dtype))
        ctx.save_for_backward(q, f)
        return rows.mean()

    @staticmethod
    def backward(ctx, grad):
        q, f = ctx.saved_tensors
        n, k = q.shape
        dq = torch.empty_like(q)
        _dec_kernel[(triton.cdiv(n, _BLOCK_M),)](q, f, dq, n, k, q.stride(0), grad.contiguous(),
                                                 dq.stride(0), BACKWARD=True,
                                                 BLOCK_K=_block_k(k), **_consts(q.dtype))
        return dq


class AnchorFunction(torch.autograd.Function):
    """(q0, qa, qb) -> anchor loss; no gradient to q0 (the clean view is the fixed anchor)."""

    @staticmethod
    def forward(ctx, q0, q_a, q_b):
        n, k = q0.shape
        rows = torch.empty(n, dtype=torch_acc_dtype(q0.dtype), device=q0.device)
        _anchor_kernel[(triton.cdiv(n, _BLOCK_M),)](
            q0, q_a, q_b, rows, q_a, q_b, rows, n, k, q0.stride(0), q_a.stride(0),
            q_b.stride(0), 0, 0, BACKWARD=False, BLOCK_K=_block_k(k), **_consts(q0.dtype))
        ctx.save_for_backward(q0, q_a, q_b)
        return rows.mean()

    @staticmethod
    def backward(ctx, grad):
        q0, q_a, q_b = ctx.saved_tensors
        n, k = q0.shape
        d_a, d_b = torch.empty_like(q_a), torch.empty_like(q_b)
        _anchor_kernel[(triton.cdiv(n, _BLOCK_M),)](
            q0, q_a, q_b, grad, d_a, d_b, grad.contiguous(), n, k, q0.stride(0), q_a.stride(0),
            q_b.stride(0), d_a.stride(0), d_b.stride(0), BACKWARD=True, BLOCK_K=_block_k(k),
            **_consts(q0.dtype))
        return None, d_a, d_b


def dec_loss(q: torch.Tensor) -> torch.Tensor:
    """DEC KL loss (see `fastcluster_cl.dec_loss`) with the Triton kernels."""
    check_dtype(q)
    return DECFunction.apply(q.contiguous())


def anchor_loss(q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """Anchor loss (see `fastcluster_cl.anchor_loss`) with the Triton kernels."""
    check_dtype(q0, q_a, q_b)
    # One accumulation dtype for the three, chosen by q0 as the reference does.
    acc = torch_acc_dtype(q0.dtype)
    common = q0.dtype if all(t.dtype == q0.dtype for t in (q_a, q_b)) else acc
    return AnchorFunction.apply(q0.detach().to(common).contiguous(),
                                q_a.to(common).contiguous(), q_b.to(common).contiguous())
