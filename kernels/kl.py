"""The two KL losses on assignments, in Triton: DEC's self-training KL and the anchor loss.

DEC (`dec_loss`): f_k = sum_i q_ik; p_ik = (q_ik^2 / f_k) / sum_j (q_ij^2 / f_j) held fixed;
L = (1/N) sum_i KL(p_i || q_i). The forward is a column-sum launch (`_colsum_kernel`, persistent
programs per tile of columns writing deterministic partials of f) and a row launch
(`_dec_kernel`) that rebuilds p_i from q_i and f and writes the per-row KL; the backward launch
re-reads q (and f) and writes dq_ik = -(grad / N) p_ik / q_ik. f_k is clamped at the smallest
normal (`reference.dec_target`): a cluster with no mass in the batch has target 0, not NaN.
Every kernel walks K in tiles of `_BLOCK_K` columns, so registers and compile time do not grow
with K (a whole 4096-wide row per program took over 15 minutes to compile); the row launches
of DEC take two passes over the tiles, the first for the row totals sum_j q_ij^2 / f_j.
Reads of q: forward 3, backward 2; the target p never reaches memory. Floors: O(N K) FLOPs,
forward 3 N K b bytes read, backward 2 N K b read + N K b written.

Anchor (`anchor_loss`): L = (1/N) sum_i KL(q0_i || qa_i) + KL(q0_i || qb_i), q0 detached. One
row launch reads q0, qa, qb once and writes per-row terms; the backward reads each once more and
writes dqa = -(grad / N) q0 / qa, dqb likewise. Floors: forward 3 N K b read, backward 3 N K b
read + 2 N K b written.

Anchor method's cluster side fused (`dec_anchor_losses`, what `ClusterContrastiveLoss("anchor")`
uses on this backend): both losses read q0, so one column-sum launch over q0 and one row launch
reading q0 twice (DEC's two passes) and qa, qb once give both per-row terms; one backward
launch reads the same again and writes dq0 (DEC's), dqa, dqb. Saves one read of q0 in the
forward and one in the backward, and two launches each way, over calling `dec_loss` and
`anchor_loss`.

log q is clamped at the accumulation dtype's smallest normal, as `numerics.safe_log`: a zero
probability has a finite log and a zero gradient (one-hot assignments stay NaN-free).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcluster_cl.backends.autograd.pairs import register_pair

from ._common import acc_dtype, check_dtype, device_guard, torch_acc_dtype

MAX_CLUSTERS = 4096
_BLOCK_M = 32
# Columns per tile and warps per program: registers and compile time independent of K, no
# spills on sm_90 (at 128 x 4 warps the fused kernels spill: the static report).
_BLOCK_K = 64
_WARPS = 8
_MAX_PROGRAMS = 128


@triton.jit
def _load(Q, stride, offs_m, mask_m, offs_k, K, ACC: tl.constexpr):
    return tl.load(
        Q + offs_m[:, None] * stride + offs_k[None, :],
        mask=mask_m[:, None] & (offs_k[None, :] < K),
        other=0.0,
    ).to(ACC)


@triton.jit
def _store(DQ, stride, offs_m, mask_m, offs_k, K, value):
    tl.store(
        DQ + offs_m[:, None] * stride + offs_k[None, :],
        value.to(DQ.dtype.element_ty),
        mask=mask_m[:, None] & (offs_k[None, :] < K),
    )


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
def _colsum_kernel(
    Q,
    PARTIAL,
    n,
    K,
    stride,
    stride_partial,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (p, j) sums rows p, p + P, ... of q over the j-th tile of BLOCK_K columns."""
    pid = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_K], ACC)
    for r0 in range(pid * BLOCK_M, n, tl.num_programs(0) * BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        total += tl.sum(_load(Q, stride, offs_m, offs_m < n, offs_k, K, ACC), axis=0)
    tl.store(PARTIAL + pid * stride_partial + offs_k, total)


@triton.jit
def _dec_weights(Q, F, stride, offs_m, mask_m, offs_k, K, ACC: tl.constexpr, TINY: tl.constexpr):
    """q (one tile) and its unnormalised DEC target q^2 / max(f, tiny): a cluster with no mass
    in the batch (f = 0, so q = 0 in its column) gets weight 0, not 0/0."""
    q = _load(Q, stride, offs_m, mask_m, offs_k, K, ACC)
    f = tl.load(F + offs_k, mask=offs_k < K, other=1.0)
    return q, q * q / tl.maximum(f, TINY)[None, :]


@triton.jit
def _dec_row_totals(
    Q,
    F,
    stride,
    offs_m,
    mask_m,
    K,
    ACC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """sum_k q_ik^2 / f_k over the K tiles (DEC's first pass); 1 for all-zero rows (padding)."""
    total = tl.zeros([BLOCK_M], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q, w = _dec_weights(Q, F, stride, offs_m, mask_m, offs_k, K, ACC, TINY)
        total += tl.sum(w, axis=1)
    return tl.where(total > 0, total, 1.0)


@triton.jit
def _dec_kernel(
    Q,
    F,
    OUT,
    n,
    K,
    stride,
    GRAD,
    stride_out,
    BACKWARD: tl.constexpr,
    ACC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Forward: OUT[i] = KL(p_i || q_i). Backward: OUT = dq = -(GRAD / n) p / q. Two passes
    over the K tiles: the row totals of the target, then the target tile by tile."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    total = _dec_row_totals(Q, F, stride, offs_m, mask_m, K, ACC, TINY, BLOCK_M, BLOCK_K)
    kl = tl.zeros([BLOCK_M], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q, w = _dec_weights(Q, F, stride, offs_m, mask_m, offs_k, K, ACC, TINY)
        p = w / total[:, None]
        if BACKWARD:
            scale = -tl.load(GRAD).to(ACC) / n
            _store(OUT, stride_out, offs_m, mask_m, offs_k, K, scale * _ratio(p, q, TINY))
        else:
            kl += tl.sum(_xlogx(p) - p * _safe_log(q, TINY), axis=1)
    if not BACKWARD:
        tl.store(OUT + offs_m, kl, mask=mask_m)


@triton.jit
def _anchor_kernel(
    Q0,
    QA,
    QB,
    OUT,
    DQA,
    DQB,
    GRAD,
    n,
    K,
    stride0,
    stride_a,
    stride_b,
    stride_da,
    stride_db,
    BACKWARD: tl.constexpr,
    ACC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    acc = tl.zeros([BLOCK_M], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q0 = _load(Q0, stride0, offs_m, mask_m, offs_k, K, ACC)
        qa = _load(QA, stride_a, offs_m, mask_m, offs_k, K, ACC)
        qb = _load(QB, stride_b, offs_m, mask_m, offs_k, K, ACC)
        if BACKWARD:
            scale = -tl.load(GRAD).to(ACC) / n
            _store(DQA, stride_da, offs_m, mask_m, offs_k, K, scale * _ratio(q0, qa, TINY))
            _store(DQB, stride_db, offs_m, mask_m, offs_k, K, scale * _ratio(q0, qb, TINY))
        else:
            terms = 2.0 * _xlogx(q0) - q0 * (_safe_log(qa, TINY) + _safe_log(qb, TINY))
            acc += tl.sum(terms, axis=1)
    if not BACKWARD:
        tl.store(OUT + offs_m, acc, mask=mask_m)


@triton.jit
def _dec_anchor_kernel(
    Q0,
    QA,
    QB,
    F,
    OUT,
    DQ0,
    DQA,
    DQB,
    GRAD,
    n,
    K,
    stride0,
    stride_a,
    stride_b,
    stride_d0,
    stride_da,
    stride_db,
    BACKWARD: tl.constexpr,
    ACC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Forward: OUT[0, i] = KL(p_i || q0_i) (DEC), OUT[1, i] = the anchor terms of row i.
    Backward: DQ0 = DEC's gradient (GRAD[0]), DQA, DQB = the anchor's (GRAD[1])."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    total = _dec_row_totals(Q0, F, stride0, offs_m, mask_m, K, ACC, TINY, BLOCK_M, BLOCK_K)
    dec = tl.zeros([BLOCK_M], ACC)
    anchor = tl.zeros([BLOCK_M], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q0, w = _dec_weights(Q0, F, stride0, offs_m, mask_m, offs_k, K, ACC, TINY)
        qa = _load(QA, stride_a, offs_m, mask_m, offs_k, K, ACC)
        qb = _load(QB, stride_b, offs_m, mask_m, offs_k, K, ACC)
        p = w / total[:, None]
        if BACKWARD:
            dec_scale = -tl.load(GRAD).to(ACC) / n
            anchor_scale = -tl.load(GRAD + 1).to(ACC) / n
            _store(DQ0, stride_d0, offs_m, mask_m, offs_k, K, dec_scale * _ratio(p, q0, TINY))
            _store(DQA, stride_da, offs_m, mask_m, offs_k, K, anchor_scale * _ratio(q0, qa, TINY))
            _store(DQB, stride_db, offs_m, mask_m, offs_k, K, anchor_scale * _ratio(q0, qb, TINY))
        else:
            dec += tl.sum(_xlogx(p) - p * _safe_log(q0, TINY), axis=1)
            anchor += tl.sum(
                2.0 * _xlogx(q0) - q0 * (_safe_log(qa, TINY) + _safe_log(qb, TINY)), axis=1
            )
    if not BACKWARD:
        tl.store(OUT + offs_m, dec, mask=mask_m)
        tl.store(OUT + n + offs_m, anchor, mask=mask_m)


def _block_k(k: int) -> int:
    """Columns per tile: at most `_BLOCK_K` whatever K (the kernels loop over the tiles)."""
    if k > MAX_CLUSTERS:
        raise ValueError(
            f"backend='triton' supports at most {MAX_CLUSTERS} clusters, got {k}; "
            "use backend='chunked' for more"
        )
    return min(_BLOCK_K, max(16, triton.next_power_of_2(k)))


def _consts(dtype: torch.dtype, k: int) -> dict:
    acc = torch_acc_dtype(dtype)
    return dict(
        ACC=acc_dtype(dtype),
        TINY=torch.finfo(acc).tiny,
        BLOCK_M=_BLOCK_M,
        BLOCK_K=_block_k(k),
        num_warps=_WARPS,
    )


def _column_sums(q: torch.Tensor) -> torch.Tensor:
    """f_k = sum_i q_ik from deterministic per-program partials."""
    n, k = q.shape
    block_k = _block_k(k)
    tiles = triton.cdiv(k, block_k)
    programs = min(triton.cdiv(n, _BLOCK_M), _MAX_PROGRAMS)
    partial = torch.empty(
        programs, tiles * block_k, dtype=torch_acc_dtype(q.dtype), device=q.device
    )
    with device_guard(q):
        _colsum_kernel[(programs, tiles)](
            Q=q,
            PARTIAL=partial,
            n=n,
            K=k,
            stride=q.stride(0),
            stride_partial=partial.stride(0),
            ACC=acc_dtype(q.dtype),
            BLOCK_M=_BLOCK_M,
            BLOCK_K=block_k,
            num_warps=_WARPS,
        )
    return partial.sum(0)[:k].contiguous()


def _rows_grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, _BLOCK_M),)


# DEC, anchor and the two fused as torch.library ops with fake implementations (custom_op around
# the launchers, as nt_xent's); `backends.autograd.pairs.register_pair` is their autograd. The
# forwards return the mean loss (and DEC's column sums f, its backward's state).


@torch.library.custom_op("fastcluster_cl::dec_triton_fwd", mutates_args=())
def dec_forward(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N x K) -> (DEC KL loss, f = column sums (K,)), both in the accumulation dtype."""
    n, k = q.shape
    f = _column_sums(q)
    rows = torch.empty(n, dtype=torch_acc_dtype(q.dtype), device=q.device)
    with device_guard(q):
        _dec_kernel[_rows_grid(n)](
            Q=q,
            F=f,
            OUT=rows,
            n=n,
            K=k,
            stride=q.stride(0),
            GRAD=f,
            stride_out=0,
            BACKWARD=False,
            **_consts(q.dtype, k),
        )
    return rows.mean(), f


@dec_forward.register_fake
def _(q):
    acc = torch_acc_dtype(q.dtype)
    return q.new_empty((), dtype=acc), q.new_empty(q.shape[1], dtype=acc)


@torch.library.custom_op("fastcluster_cl::dec_triton_bwd", mutates_args=())
def dec_backward(q: torch.Tensor, f: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dq from the gradient of the mean loss (0-d) and the forward's f."""
    n, k = q.shape
    dq = torch.empty_like(q)
    with device_guard(q):
        _dec_kernel[_rows_grid(n)](
            Q=q,
            F=f,
            OUT=dq,
            n=n,
            K=k,
            stride=q.stride(0),
            GRAD=grad.to(f.dtype).contiguous(),
            stride_out=dq.stride(0),
            BACKWARD=True,
            **_consts(q.dtype, k),
        )
    return dq


@dec_backward.register_fake
def _(q, f, grad):
    return torch.empty_like(q)


@torch.library.custom_op("fastcluster_cl::anchor_triton_fwd", mutates_args=())
def anchor_forward(q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """(q0, qa, qb) -> the anchor loss (accumulation dtype); no gradient to q0."""
    n, k = q0.shape
    rows = torch.empty(n, dtype=torch_acc_dtype(q0.dtype), device=q0.device)
    with device_guard(q0):
        _anchor_kernel[_rows_grid(n)](
            Q0=q0,
            QA=q_a,
            QB=q_b,
            OUT=rows,
            DQA=q_a,
            DQB=q_b,
            GRAD=rows,
            n=n,
            K=k,
            stride0=q0.stride(0),
            stride_a=q_a.stride(0),
            stride_b=q_b.stride(0),
            stride_da=0,
            stride_db=0,
            BACKWARD=False,
            **_consts(q0.dtype, k),
        )
    return rows.mean()


@anchor_forward.register_fake
def _(q0, q_a, q_b):
    return q0.new_empty((), dtype=torch_acc_dtype(q0.dtype))


@torch.library.custom_op("fastcluster_cl::anchor_triton_bwd", mutates_args=())
def anchor_backward(
    q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dqa, dL/dqb) from the gradient of the mean loss (0-d)."""
    n, k = q0.shape
    grad = grad.to(torch_acc_dtype(q0.dtype)).contiguous()
    d_a, d_b = torch.empty_like(q_a), torch.empty_like(q_b)
    with device_guard(q0):
        _anchor_kernel[_rows_grid(n)](
            Q0=q0,
            QA=q_a,
            QB=q_b,
            OUT=grad,
            DQA=d_a,
            DQB=d_b,
            GRAD=grad,
            n=n,
            K=k,
            stride0=q0.stride(0),
            stride_a=q_a.stride(0),
            stride_b=q_b.stride(0),
            stride_da=d_a.stride(0),
            stride_db=d_b.stride(0),
            BACKWARD=True,
            **_consts(q0.dtype, k),
        )
    return d_a, d_b


@anchor_backward.register_fake
def _(q0, q_a, q_b, grad):
    return torch.empty_like(q_a), torch.empty_like(q_b)


@torch.library.custom_op("fastcluster_cl::dec_anchor_triton_fwd", mutates_args=())
def dec_anchor_forward(
    q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q0, qa, qb) -> (DEC loss of q0, anchor loss, f = column sums of q0), fused."""
    n, k = q0.shape
    f = _column_sums(q0)
    rows = torch.empty(2, n, dtype=torch_acc_dtype(q0.dtype), device=q0.device)
    with device_guard(q0):
        _dec_anchor_kernel[_rows_grid(n)](
            Q0=q0,
            QA=q_a,
            QB=q_b,
            F=f,
            OUT=rows,
            DQ0=q0,
            DQA=q_a,
            DQB=q_b,
            GRAD=f,
            n=n,
            K=k,
            stride0=q0.stride(0),
            stride_a=q_a.stride(0),
            stride_b=q_b.stride(0),
            stride_d0=0,
            stride_da=0,
            stride_db=0,
            BACKWARD=False,
            **_consts(q0.dtype, k),
        )
    return rows[0].mean(), rows[1].mean(), f


@dec_anchor_forward.register_fake
def _(q0, q_a, q_b):
    acc = torch_acc_dtype(q0.dtype)
    return (
        q0.new_empty((), dtype=acc),
        q0.new_empty((), dtype=acc),
        q0.new_empty(q0.shape[1], dtype=acc),
    )


@torch.library.custom_op("fastcluster_cl::dec_anchor_triton_bwd", mutates_args=())
def dec_anchor_backward(
    q0: torch.Tensor,
    q_a: torch.Tensor,
    q_b: torch.Tensor,
    f: torch.Tensor,
    grad_dec: torch.Tensor,
    grad_anchor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq0, dqa, dqb): q0 gets DEC's gradient only (the anchor holds it fixed)."""
    n, k = q0.shape
    grads = torch.stack([grad_dec.to(f.dtype), grad_anchor.to(f.dtype)])
    d0, d_a, d_b = torch.empty_like(q0), torch.empty_like(q_a), torch.empty_like(q_b)
    with device_guard(q0):
        _dec_anchor_kernel[_rows_grid(n)](
            Q0=q0,
            QA=q_a,
            QB=q_b,
            F=f,
            OUT=grads,
            DQ0=d0,
            DQA=d_a,
            DQB=d_b,
            GRAD=grads,
            n=n,
            K=k,
            stride0=q0.stride(0),
            stride_a=q_a.stride(0),
            stride_b=q_b.stride(0),
            stride_d0=d0.stride(0),
            stride_da=d_a.stride(0),
            stride_db=d_b.stride(0),
            BACKWARD=True,
            **_consts(q0.dtype, k),
        )
    return d0, d_a, d_b


@dec_anchor_backward.register_fake
def _(q0, q_a, q_b, f, grad_dec, grad_anchor):
    return torch.empty_like(q0), torch.empty_like(q_a), torch.empty_like(q_b)


register_pair(
    dec_forward,
    dec_backward,
    "triton",
    lambda inputs, outputs, grads: (inputs[0], outputs[1], grads[0]),
    wrt=(0,),
)
register_pair(
    anchor_forward,
    anchor_backward,
    "triton",
    lambda inputs, outputs, grads: (*inputs, grads[0]),
    wrt=(1, 2),
)
register_pair(
    dec_anchor_forward,
    dec_anchor_backward,
    "triton",
    lambda inputs, outputs, grads: (*inputs, outputs[2], *grads[:2]),
    wrt=(0, 1, 2),
)


def _common_inputs(q0, q_a, q_b):
    """One accumulation dtype for the three, chosen by q0 as the reference does."""
    check_dtype(q0, q_a, q_b)
    common = q0.dtype if all(t.dtype == q0.dtype for t in (q_a, q_b)) else torch_acc_dtype(q0.dtype)
    return [t.to(common).contiguous() for t in (q0, q_a, q_b)]


def dec_loss(q: torch.Tensor) -> torch.Tensor:
    """DEC KL loss (see `fastcluster_cl.dec_loss`) with the Triton kernels."""
    check_dtype(q)
    return dec_forward(q.contiguous())[0]


def anchor_loss(q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """Anchor loss (see `fastcluster_cl.anchor_loss`) with the Triton kernels."""
    q0, q_a, q_b = _common_inputs(q0, q_a, q_b)
    return anchor_forward(q0.detach(), q_a, q_b)


def dec_anchor_losses(
    q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dec_loss(q0), anchor_loss(q0, q_a, q_b)) in fused launches: the anchor method's
    clustering terms. q0 receives DEC's gradient only (the anchor treats it as fixed)."""
    return dec_anchor_forward(*_common_inputs(q0, q_a, q_b))[:2]
