"""The two KL losses on assignments, in Triton: DEC's self-training KL and the anchor loss.

DEC (`dec_loss`): f_k = sum_i q_ik; p_ik = w_ik / T_i with w_ik = q_ik^2 / f_k and T_i = sum_j
w_ij, held fixed; L = (1/N) sum_i KL(p_i || q_i). Since w / q = q / f, KL(p_i || q_i) = sum_k
w_ik log(q_ik / f_k) / T_i - log T_i: the row launch needs no first pass for T. The forward is
a column-sum launch (`_colsum_kernel`, persistent programs per tile of columns writing
deterministic partials of f) and a row launch (`_rows_kernel`) that reads q once and writes the
per-row KL and T; the backward (`_grads_kernel`, no row reductions: one pass) reads q, f and T
and writes dq_ik = -(grad / N) p_ik / q_ik. f_k is clamped at the smallest normal
(`reference.dec_target`): a cluster with no mass in the batch has target 0, not NaN. Every
kernel walks K in tiles of `_BLOCK_K` columns, so registers and compile time do not grow with K
(a whole 4096-wide row per program took over 15 minutes to compile); where the row blocks are
few (N = 256: 8 of 32 rows) the row launch splits the cluster tiles across programs
(`_common.tile_splits`, as flash-decoding) and `_merge_rows_kernel` adds the splits' sums in a
fixed order (run-to-run deterministic). Reads of q: forward 2 (the column sums, the rows),
backward 1; the target p never reaches memory. Floors: O(N K) FLOPs, forward 2 N K b bytes
read, backward N K b read + N K b written.

Anchor (`anchor_loss`): L = (1/N) sum_i KL(q0_i || qa_i) + KL(q0_i || qb_i), q0 detached. The
same row launch reads q0, qa, qb once and writes per-row terms; the backward reads each once
more and writes dqa = -(grad / N) q0 / qa, dqb likewise. Floors: forward 3 N K b read,
backward 3 N K b read + 2 N K b written.

Anchor method's cluster side fused (`dec_anchor_losses`, what `ClusterContrastiveLoss("anchor")`
uses on this backend): both losses read q0, so one column-sum launch over q0 and one row launch
reading q0, qa, qb once give both per-row terms; one backward launch reads the same again and
writes dq0 (DEC's), dqa, dqb. Saves one read of q0 each way, and two launches each way, over
calling `dec_loss` and `anchor_loss`.

log q is clamped at the accumulation dtype's smallest normal, as `numerics.safe_log`: a zero
probability has a finite log and a zero gradient (one-hot assignments stay NaN-free).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcluster_cl.backends.autograd.pairs import register_pair

from ._common import acc_dtype, check_dtype, device_guard, tile_splits, torch_acc_dtype
from .nt_xent import column_range

MAX_CLUSTERS = 4096
_BLOCK_M = 32
# Columns per tile and warps per program: registers and compile time independent of K, no
# spills on sm_90 (at 128 x 4 warps the fused kernels spill: the static report).
_BLOCK_K = 64
_WARPS = 8
_MAX_PROGRAMS = 128
_MERGE_ROWS = 128  # rows a program of the split forward's merge
# Cluster tiles a row sweeps before it splits (512 clusters): below, the merge's launch costs
# more than the split saves (predicted, N = 256: K = 100 162.8 -> 165.5 us split, K = 1000
# 223.8 -> 196.2).
_SPLIT_SWEEP = 8


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
def _clamped_sums(F, offs_k, K, TINY: tl.constexpr):
    """The column sums f of a tile's clusters, clamped at tiny (1, ..., padding), as a row: a
    cluster with no mass in the batch (f = 0, so q = 0 in its column) gets DEC weight 0, not
    0/0."""
    return tl.maximum(tl.load(F + offs_k, mask=offs_k < K, other=1.0), TINY)[None, :]


@triton.jit
def _dec_weights(Q, F, stride, offs_m, mask_m, offs_k, K, ACC: tl.constexpr, TINY: tl.constexpr):
    """q (one tile) and its unnormalised DEC target q^2 / max(f, tiny) (`_clamped_sums`)."""
    q = _load(Q, stride, offs_m, mask_m, offs_k, K, ACC)
    return q, q * q / _clamped_sums(F, offs_k, K, TINY)


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
    """sum_k q_ik^2 / f_k over the K tiles (the one-pass anchor objective's first pass over its
    rows); 1 for all-zero rows (padding)."""
    total = tl.zeros([BLOCK_M], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q, w = _dec_weights(Q, F, stride, offs_m, mask_m, offs_k, K, ACC, TINY)
        total += tl.sum(w, axis=1)
    return tl.where(total > 0, total, 1.0)


@triton.jit
def _row_sums(
    Q0,
    QA,
    QB,
    F,
    offs_m,
    mask_m,
    n,
    k_start,
    k_end,
    K,
    stride0,
    stride_a,
    stride_b,
    DEC: tl.constexpr,
    ANCHOR: tl.constexpr,
    ACC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The rows' sums over the cluster tiles [k_start, k_end): DEC's target mass T = sum w
    (w = q0^2 / max(f, tiny)) and sum w (log w - safe_log(q0) + log n), which is sum w log(n q0
    / f) for q0 >= tiny (w / q0 = q0 / f: one log an element, of a number near 1 for
    near-uniform rows, so that the KL near 0 keeps its digits), and the anchor's terms 2 q0
    log q0 - q0 (log qa + log qb). One read of each input, one pass: DEC's target needs no row
    total first, KL(p || q0) follows from the two sums (`_finish_rows`)."""
    mass = tl.zeros([BLOCK_M], ACC)
    dec = tl.zeros([BLOCK_M], ACC)
    anchor = tl.zeros([BLOCK_M], ACC)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q0 = _load(Q0, stride0, offs_m, mask_m, offs_k, K, ACC)
        if DEC:
            f = _clamped_sums(F, offs_k, K, TINY)
            w = q0 * q0 / f
            # below tiny (zero, negative) safe_log(q0) is log(tiny): n w / tiny; 0 log 0 = 0
            ratio = tl.where(q0 >= TINY, n * q0 / f, n * w / TINY)
            mass += tl.sum(w, axis=1)
            dec += tl.sum(w * tl.log(tl.where(w > 0, ratio, 1.0)), axis=1)
        if ANCHOR:
            qa = _load(QA, stride_a, offs_m, mask_m, offs_k, K, ACC)
            qb = _load(QB, stride_b, offs_m, mask_m, offs_k, K, ACC)
            terms = 2.0 * _xlogx(q0) - q0 * (_safe_log(qa, TINY) + _safe_log(qb, TINY))
            anchor += tl.sum(terms, axis=1)
    return mass, dec, anchor


@triton.jit
def _finish_rows(
    mass, dec, anchor, ROWS, TOTAL, offs_m, mask_m, n, DEC: tl.constexpr, ANCHOR: tl.constexpr
):
    """The rows' losses from their sums (`_row_sums`): ROWS[0] = KL(p || q0) = sum w log(n q0 /
    f) / T - log(n T) with T = sum w (0 for a row without mass: padding, or every w below the
    smallest subnormal), T to TOTAL (the backward's p = w / T); ROWS[1] = the anchor's
    terms."""
    if DEC:
        total = tl.where(mass > 0, mass, 1.0)
        kl = tl.where(mass > 0, dec / total - tl.log(n * total), 0.0)
        tl.store(ROWS + offs_m, kl, mask=mask_m)
        tl.store(TOTAL + offs_m, mass, mask=mask_m)
    if ANCHOR:
        tl.store(ROWS + n + offs_m, anchor, mask=mask_m)


@triton.jit
def _rows_kernel(
    Q0,
    QA,
    QB,
    F,
    ROWS,
    TOTAL,
    PART,
    n,
    K,
    stride0,
    stride_a,
    stride_b,
    tiles_per_split,
    DEC: tl.constexpr,
    ANCHOR: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The forward of BLOCK_M rows over split program_id(1)'s cluster tiles: SPLIT, its sums to
    PART (3 x splits x n) for `_merge_rows_kernel`; else the rows' losses (`_finish_rows`)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    k_start, k_end = column_range(K, tiles_per_split * BLOCK_K, SPLIT)
    mass, dec, anchor = _row_sums(
        Q0,
        QA,
        QB,
        F,
        offs_m,
        mask_m,
        n,
        k_start,
        k_end,
        K,
        stride0,
        stride_a,
        stride_b,
        DEC,
        ANCHOR,
        ACC,
        TINY,
        BLOCK_M,
        BLOCK_K,
    )
    if SPLIT:
        part = PART + tl.program_id(1) * n + offs_m
        size = tl.num_programs(1) * n
        if DEC:
            tl.store(part, mass, mask=mask_m)
            tl.store(part + size, dec, mask=mask_m)
        if ANCHOR:
            tl.store(part + 2 * size, anchor, mask=mask_m)
    else:
        _finish_rows(mass, dec, anchor, ROWS, TOTAL, offs_m, mask_m, n, DEC, ANCHOR)


@triton.jit
def _merge_rows_kernel(
    PART,
    ROWS,
    TOTAL,
    n,
    splits,
    DEC: tl.constexpr,
    ANCHOR: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The splits' row sums added in split order (run-to-run deterministic), then the rows'
    losses (`_finish_rows`)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    mass = tl.zeros([BLOCK_M], ACC)
    dec = tl.zeros([BLOCK_M], ACC)
    anchor = tl.zeros([BLOCK_M], ACC)
    for split in range(0, splits):
        part = PART + split * n + offs_m
        if DEC:
            mass += tl.load(part, mask=mask_m, other=0.0)
            dec += tl.load(part + splits * n, mask=mask_m, other=0.0)
        if ANCHOR:
            anchor += tl.load(part + 2 * splits * n, mask=mask_m, other=0.0)
    _finish_rows(mass, dec, anchor, ROWS, TOTAL, offs_m, mask_m, n, DEC, ANCHOR)


@triton.jit
def _grads_kernel(
    Q0,
    QA,
    QB,
    F,
    TOTAL,
    GRAD_DEC,
    GRAD_ANCHOR,
    DQ0,
    DQA,
    DQB,
    n,
    K,
    stride0,
    stride_a,
    stride_b,
    stride_d0,
    stride_da,
    stride_db,
    tiles_per_split,
    DEC: tl.constexpr,
    ANCHOR: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The gradients of BLOCK_M rows on split program_id(1)'s cluster tiles (the forward's
    splits), from the forward's f and row masses T: DEC's dq0 = -(grad / n) p / q0 = -(grad /
    n) (q0 / max(f, tiny)) / T, the anchor's dqa = -(grad / n) q0 / qa and dqb likewise (each 0
    where its divisor is below tiny, as `_ratio`; DEC's 0 on rows without mass, whose target
    is 0). No row reduction: one pass."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    k_start, k_end = column_range(K, tiles_per_split * BLOCK_K, SPLIT)
    if DEC:
        mass = tl.load(TOTAL + offs_m, mask=mask_m, other=0.0)[:, None]
        total = tl.where(mass > 0, mass, 1.0)
        dec_scale = -tl.load(GRAD_DEC).to(ACC) / n
    if ANCHOR:
        anchor_scale = -tl.load(GRAD_ANCHOR).to(ACC) / n
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q0 = _load(Q0, stride0, offs_m, mask_m, offs_k, K, ACC)
        if DEC:
            f = _clamped_sums(F, offs_k, K, TINY)
            p_over_q = tl.where((q0 >= TINY) & (mass > 0), q0 / f / total, 0.0)
            _store(DQ0, stride_d0, offs_m, mask_m, offs_k, K, dec_scale * p_over_q)
        if ANCHOR:
            qa = _load(QA, stride_a, offs_m, mask_m, offs_k, K, ACC)
            qb = _load(QB, stride_b, offs_m, mask_m, offs_k, K, ACC)
            dqa = anchor_scale * _ratio(q0, qa, TINY)
            _store(DQA, stride_da, offs_m, mask_m, offs_k, K, dqa)
            _store(DQB, stride_db, offs_m, mask_m, offs_k, K, anchor_scale * _ratio(q0, qb, TINY))


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


def _splits(n: int, k: int, block_k: int) -> tuple[int, int, int]:
    """(row blocks, splits, cluster tiles per split) of the row launches (`tile_splits`)."""
    row_blocks = triton.cdiv(n, _BLOCK_M)
    return row_blocks, *tile_splits(row_blocks, triton.cdiv(k, block_k), _SPLIT_SWEEP)


def _launch_forward(q0, q_a, q_b, dec: bool, anchor: bool):
    """The rows' losses (2, N: DEC's, the anchor's) and DEC's state (f, row masses T): the
    column sums, then the row launch over its cluster splits and, split, the merge."""
    n, k = q0.shape
    consts = _consts(q0.dtype, k)
    acc = torch_acc_dtype(q0.dtype)
    rows = torch.empty(2, n, dtype=acc, device=q0.device)
    # a launch's unused pointers take a tensor it has (none may be empty: a null pointer)
    f = _column_sums(q0) if dec else rows
    total = torch.empty(n, dtype=acc, device=q0.device) if dec else rows
    row_blocks, splits, per_split = _splits(n, k, consts["BLOCK_K"])
    part = torch.empty(3, splits, n, dtype=acc, device=q0.device) if splits > 1 else rows
    flags = dict(DEC=dec, ANCHOR=anchor)
    with device_guard(q0):
        _rows_kernel[(row_blocks, splits)](
            Q0=q0,
            QA=q_a,
            QB=q_b,
            F=f,
            ROWS=rows,
            TOTAL=total,
            PART=part,
            n=n,
            K=k,
            stride0=q0.stride(0),
            stride_a=q_a.stride(0),
            stride_b=q_b.stride(0),
            tiles_per_split=per_split,
            SPLIT=splits > 1,
            **flags,
            **consts,
        )
        if splits > 1:
            _merge_rows_kernel[(triton.cdiv(n, _MERGE_ROWS),)](
                PART=part,
                ROWS=rows,
                TOTAL=total,
                n=n,
                splits=splits,
                ACC=consts["ACC"],
                BLOCK_M=_MERGE_ROWS,
                **flags,
            )
    return rows, f, total


def _launch_backward(q0, q_a, q_b, f, total, grad_dec, grad_anchor, dec: bool, anchor: bool):
    """(dq0 if dec, dqa and dqb if anchor) in one launch over the forward's splits."""
    n, k = q0.shape
    consts = _consts(q0.dtype, k)
    acc = torch_acc_dtype(q0.dtype)
    row_blocks, splits, per_split = _splits(n, k, consts["BLOCK_K"])
    d0 = torch.empty_like(q0) if dec else q0
    d_a, d_b = (torch.empty_like(q_a), torch.empty_like(q_b)) if anchor else (q_a, q_b)
    with device_guard(q0):
        _grads_kernel[(row_blocks, splits)](
            Q0=q0,
            QA=q_a,
            QB=q_b,
            F=f,
            TOTAL=total,
            GRAD_DEC=grad_dec.to(acc).contiguous(),
            GRAD_ANCHOR=grad_anchor.to(acc).contiguous(),
            DQ0=d0,
            DQA=d_a,
            DQB=d_b,
            n=n,
            K=k,
            stride0=q0.stride(0),
            stride_a=q_a.stride(0),
            stride_b=q_b.stride(0),
            stride_d0=d0.stride(0),
            stride_da=d_a.stride(0),
            stride_db=d_b.stride(0),
            tiles_per_split=per_split,
            DEC=dec,
            ANCHOR=anchor,
            SPLIT=splits > 1,
            **consts,
        )
    return d0, d_a, d_b


# DEC, anchor and the two fused as torch.library ops with fake implementations (custom_op around
# the launchers, as nt_xent's); `backends.autograd.pairs.register_pair` is their autograd. The
# forwards return the mean loss (and DEC's column sums f and row masses T, its backward's state).


@torch.library.custom_op("fastcluster_cl::dec_triton_fwd", mutates_args=())
def dec_forward(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (N x K) -> (DEC KL loss, f = column sums (K,), row masses T (N,)), in the accumulation
    dtype."""
    rows, f, total = _launch_forward(q, q, q, dec=True, anchor=False)
    return rows[0].mean(), f, total


@dec_forward.register_fake
def _(q):
    acc = torch_acc_dtype(q.dtype)
    n, k = q.shape
    return q.new_empty((), dtype=acc), q.new_empty(k, dtype=acc), q.new_empty(n, dtype=acc)


@torch.library.custom_op("fastcluster_cl::dec_triton_bwd", mutates_args=())
def dec_backward(
    q: torch.Tensor, f: torch.Tensor, total: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """dL/dq from the gradient of the mean loss (0-d) and the forward's f and T."""
    return _launch_backward(q, q, q, f, total, grad, grad, dec=True, anchor=False)[0]


@dec_backward.register_fake
def _(q, f, total, grad):
    return torch.empty_like(q)


@torch.library.custom_op("fastcluster_cl::anchor_triton_fwd", mutates_args=())
def anchor_forward(q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """(q0, qa, qb) -> the anchor loss (accumulation dtype); no gradient to q0."""
    return _launch_forward(q0, q_a, q_b, dec=False, anchor=True)[0][1].mean()


@anchor_forward.register_fake
def _(q0, q_a, q_b):
    return q0.new_empty((), dtype=torch_acc_dtype(q0.dtype))


@torch.library.custom_op("fastcluster_cl::anchor_triton_bwd", mutates_args=())
def anchor_backward(
    q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dqa, dL/dqb) from the gradient of the mean loss (0-d)."""
    _, d_a, d_b = _launch_backward(q0, q_a, q_b, q0, q0, grad, grad, dec=False, anchor=True)
    return d_a, d_b


@anchor_backward.register_fake
def _(q0, q_a, q_b, grad):
    return torch.empty_like(q_a), torch.empty_like(q_b)


@torch.library.custom_op("fastcluster_cl::dec_anchor_triton_fwd", mutates_args=())
def dec_anchor_forward(
    q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q0, qa, qb) -> (DEC loss of q0, anchor loss, f = column sums of q0, row masses T),
    fused: one read of each input."""
    rows, f, total = _launch_forward(q0, q_a, q_b, dec=True, anchor=True)
    return rows[0].mean(), rows[1].mean(), f, total


@dec_anchor_forward.register_fake
def _(q0, q_a, q_b):
    acc = torch_acc_dtype(q0.dtype)
    n, k = q0.shape
    return (
        q0.new_empty((), dtype=acc),
        q0.new_empty((), dtype=acc),
        q0.new_empty(k, dtype=acc),
        q0.new_empty(n, dtype=acc),
    )


@torch.library.custom_op("fastcluster_cl::dec_anchor_triton_bwd", mutates_args=())
def dec_anchor_backward(
    q0: torch.Tensor,
    q_a: torch.Tensor,
    q_b: torch.Tensor,
    f: torch.Tensor,
    total: torch.Tensor,
    grad_dec: torch.Tensor,
    grad_anchor: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq0, dqa, dqb): q0 gets DEC's gradient only (the anchor holds it fixed)."""
    return _launch_backward(q0, q_a, q_b, f, total, grad_dec, grad_anchor, dec=True, anchor=True)


@dec_anchor_backward.register_fake
def _(q0, q_a, q_b, f, total, grad_dec, grad_anchor):
    return torch.empty_like(q0), torch.empty_like(q_a), torch.empty_like(q_b)


register_pair(
    dec_forward,
    dec_backward,
    "triton",
    lambda inputs, outputs, grads: (inputs[0], *outputs[1:], grads[0]),
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
    lambda inputs, outputs, grads: (*inputs, *outputs[2:], *grads[:2]),
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
