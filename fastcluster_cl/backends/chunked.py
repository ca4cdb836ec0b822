"""Chunked backend: pure PyTorch in square tiles, never holding more than one block x block tile
of the 2N x 2N similarity matrix.

Memory is O(N*D + block^2). When 2N <= block the one tile is the whole matrix: its
exponentials are then kept from the forward for the backward (`_forward`). S is symmetric, so
only the upper-triangle tiles (I <= J) are computed: each serves the row sums of block I and,
transposed, those of block J (half the matmul and exp work of the reference). Rows are shifted
by the fixed bound 1/|tau| >= S_ik when exp(-2/|tau|) cannot underflow; below that temperature
a first pass finds each row's exact max.
Above one tile, the backward is one more pass over the same tiles using the saved per-row lse
(docs/design.md):

    dL/dzn_i = 1/tau * ( sum_j (w_i P_ij + w_j P_ji) zn_j - (w_i + w_pos(i)) zn_pos(i) ),

with P_ij = exp(S_ij - lse_i) and w_i the incoming gradient of row i's term (1/(2N) for the mean),

followed by the backward of the L2 normalisation. This is the fast path on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial

import torch

from .. import validation
from . import reference
from .autograd import nt_xent as nt_xent_autograd
from .autograd import nt_xent_bank as nt_xent_bank_autograd
from .autograd.nt_xent import fake_grad_rows, fake_row_values, register_fast_path
from .numerics import (
    NORM_EPS,
    accumulation_dtype,
    fixed_shift_safe,
    l2_normalize,
    l2_normalize_backward,
)
from .objective_sides import Objective, cc_side

# The DEC and anchor losses are O(N K) elementwise: the reference's are the CPU path too.
from .reference import anchor_loss, anchor_loss_terms, dec_loss, dec_loss_terms  # noqa: F401

DEFAULT_BLOCK = 1024
# CC's cluster side runs as one op each way (`objective_sides.cc_side`) while its 2K cluster rows
# are at most this many: it holds the (2K)^2 similarities and their softmax, 64 MiB each in
# float32 at the limit (K = 2048), and does the work in two matrix products. Beyond it the
# chunked NT-Xent runs on the 2K rows in tiles.
CLUSTER_GRAM_ROWS = 4096


def _tiles(rows: int, block: int) -> Iterator[tuple[slice, slice, bool]]:
    """Upper-triangle tiles (I, J), I <= J, and whether the tile is on the diagonal."""
    starts = range(0, rows, block)
    for i0 in starts:
        for j0 in starts:
            if j0 >= i0:
                yield slice(i0, min(i0 + block, rows)), slice(j0, min(j0 + block, rows)), i0 == j0


def _tile(zn: torch.Tensor, rows: slice, cols: slice, inv_tau: float) -> torch.Tensor:
    """S for the tile, a fresh tensor that callers transform in place: on the CPU each
    (2N)^2-sized allocation costs page faults, not only its pass over memory."""
    return torch.mm(zn[rows], zn[cols].T).mul_(inv_tau)


def _row_shift(zn: torch.Tensor, inv_tau: float, block: int) -> torch.Tensor | None:
    """None when the uniform shift 1/tau is safe, else each row's max over k != i."""
    if fixed_shift_safe(inv_tau, zn.dtype):
        return None
    m = torch.full((zn.shape[0],), float("-inf"), dtype=zn.dtype, device=zn.device)
    for rows, cols, diagonal in _tiles(zn.shape[0], block):
        s = _tile(zn, rows, cols, inv_tau)
        if diagonal:
            s.fill_diagonal_(float("-inf"))
        m[rows] = torch.maximum(m[rows], s.amax(1))
        m[cols] = torch.maximum(m[cols], s.amax(0))
    return m


def _negatives_lse(zn: torch.Tensor, inv_tau: float, block: int) -> torch.Tensor:
    """log sum_{k != i, pos(i)} exp(S_ik), the negatives alone, from upper-triangle tiles (the
    positive (i, i + N) lies in them on the diagonal N + I - J of tile (I, J); a diagonal tile
    also holds (i + N, i))."""
    shift = _row_shift(zn, inv_tau, block)
    bound = abs(inv_tau)
    half = zn.shape[0] // 2
    total = torch.zeros(zn.shape[0], dtype=zn.dtype, device=zn.device)
    for rows, cols, diagonal in _tiles(zn.shape[0], block):
        s = _tile(zn, rows, cols, inv_tau)
        if shift is None:
            e_rows = e_cols = s.sub_(bound).exp_()
        else:
            e_cols = torch.exp(s - shift[None, cols])
            e_rows = s.sub_(shift[rows, None]).exp_()
        positive = half + rows.start - cols.start
        e_rows.diagonal(positive).fill_(0.0)
        if e_cols is not e_rows:
            e_cols.diagonal(positive).fill_(0.0)
        if diagonal:  # all of the tile is read by rows: (i + N, i) too
            e_rows.fill_diagonal_(0.0)
            e_rows.diagonal(-half).fill_(0.0)
            total[rows] += e_rows.sum(1)
        else:
            total[rows] += e_rows.sum(1)
            total[cols] += e_cols.sum(0)
    return torch.log(total) + (bound if shift is None else shift)


def _row_losses(
    negatives_lse: torch.Tensor, gap: torch.Tensor, inv_tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row losses, masked lse) from the negatives' lse and the positives' 1 - cos: with
    t = lse_neg - S_pos, the row's loss log(exp(S_pos) + exp(lse_neg)) - S_pos is softplus(t),
    exact when it is tiny (correlated views at a small temperature), where lse - S_pos would
    cancel two numbers near 1/tau; the lse the backward needs is S_pos + the loss."""
    s_pos = torch.rsub(gap, inv_tau, alpha=inv_tau)  # (1 - gap) / tau
    row_loss = _softplus(negatives_lse - s_pos)
    return row_loss, s_pos + row_loss


def _normalize_with_gap(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(zn, norm) as `numerics.l2_normalize`, and 1 - cos(z_i, z_pos(i)) for the 2N rows of
    Z = [z_a; z_b], without cancellation. On the CPU, where reading a value costs no device
    sync: float32 rows take the float32 norm unless a sum of squares overflowed (a non-finite
    norm; the float64 one then; squares that underflow belong to norms below the clamp), and
    when every norm is above the clamp (every zn a unit row) the gap is ||zn_a - zn_b||^2 / 2
    alone (`reference.positive_gap` otherwise)."""
    on_cpu = not validation.syncs_host(z.device)
    zn = None
    if on_cpu and z.dtype == torch.float32:
        norm = torch.linalg.vector_norm(z, dim=1, keepdim=True)
        low, high = torch.aminmax(norm)
        if math.isfinite(float(high)):  # non-negative norms: all finite
            unit = float(low) > NORM_EPS
            zn = z / norm.clamp_min_(NORM_EPS)
    if zn is None:
        zn, norm = l2_normalize(z)
        unit = on_cpu and bool(norm.min() > NORM_EPS)
    n = zn.shape[0] // 2
    if unit:
        gap = torch.linalg.vector_norm(zn[:n] - zn[n:], dim=1).square_().mul_(0.5)
    else:
        gap = reference.positive_gap(zn[:n], norm[:n], zn[n:], norm[n:])
    return zn, norm, torch.cat([gap, gap])


def _softplus(t: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(t)) to the last bit: torch's softplus turns linear above t = 20, a relative
    error of exp(-20) that the float64 tests see."""
    return torch.logaddexp(t, torch.zeros_like(t))


# Row-range primitives over the full raw Z = [z_a; z_b] (2N x D, any dtype, normalised inside),
# shared with the Triton and CUDA backends: the distributed NT-Xent
# (`fastcluster_cl.backends.gathered`) calls them on a rank's local rows against the all-gathered
# Z. Rectangular tiles (rows of the range x all columns); the single-process path above keeps
# its symmetric upper-triangle tiles.


def _range_tiles(row_start: int, row_end: int, cols: int, block: int):
    """(row block, column block, offset of the global diagonal inside the tile)."""
    for r0 in range(row_start, row_end, block):
        rows = slice(r0, min(r0 + block, row_end))
        yield rows, [(slice(c0, min(c0 + block, cols)), r0 - c0) for c0 in range(0, cols, block)]


def _normalized_range(z: torch.Tensor, row_start: int, row_end: int, block: int) -> torch.Tensor:
    """Check the row range and return the normalised Z in the accumulation dtype."""
    if not 0 <= row_start < row_end <= z.shape[0] or z.shape[0] % 2:
        raise ValueError(
            f"rows [{row_start}, {row_end}) must be a non-empty range in the "
            f"{z.shape[0]} rows of Z = [z_a; z_b] (an even count)"
        )
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return l2_normalize(z)


@torch.library.custom_op("fastcluster_cl::nt_xent_chunked_lse_rows", mutates_args=())
def lse_rows(
    z: torch.Tensor, row_start: int, row_end: int, inv_tau: float, block: int = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse_i, lse_i - S_i,pos(i)) for rows i in [row_start, row_end), lse_i = log sum_{k != i}
    exp(zn_i . zn_k * inv_tau), zn the row-normalised z.

    The negatives are summed apart from the positive (`_row_losses`: no cancellation near a
    zero loss), shifted by the fixed bound 1/tau when exp(-2/tau) cannot underflow, else
    combined per column block with logsumexp / logaddexp (exact, one exp per entry plus the row
    max)."""
    zn, norm = _normalized_range(z, row_start, row_end, block)
    fixed_shift = fixed_shift_safe(inv_tau, zn.dtype)
    half = zn.shape[0] // 2
    out = []
    for rows, col_tiles in _range_tiles(row_start, row_end, zn.shape[0], block):
        count = rows.stop - rows.start
        acc = (
            torch.zeros(count, dtype=zn.dtype, device=zn.device)
            if fixed_shift
            else torch.full((count,), float("-inf"), dtype=zn.dtype, device=zn.device)
        )
        for cols, offset in col_tiles:
            s = _tile(zn, rows, cols, inv_tau)
            # i itself, and its positive (column i + N or i - N): the negatives alone
            for diagonal in (offset, offset + half, offset - half):
                s.diagonal(diagonal).fill_(float("-inf"))
            if fixed_shift:
                acc += torch.exp(s - abs(inv_tau)).sum(1)
            else:
                acc = torch.logaddexp(acc, torch.logsumexp(s, 1))
        out.append(torch.log(acc) + abs(inv_tau) if fixed_shift else acc)
    pos = _positive_of(row_start, row_end, zn)
    rows = slice(row_start, row_end)
    gap = reference.positive_gap(zn[rows], norm[rows], zn[pos], norm[pos])
    row_loss, lse = _row_losses(torch.cat(out), gap, inv_tau)
    return lse, row_loss


@lse_rows.register_fake
def _(z, row_start, row_end, inv_tau, block=DEFAULT_BLOCK):
    return fake_row_values(z, row_start, row_end)


def _positive_of(row_start: int, row_end: int, zn: torch.Tensor) -> torch.Tensor:
    return (torch.arange(row_start, row_end, device=zn.device) + zn.shape[0] // 2) % zn.shape[0]


@torch.library.custom_op("fastcluster_cl::nt_xent_chunked_grad_rows", mutates_args=())
def grad_rows(
    z: torch.Tensor,
    lse: torch.Tensor,
    row_loss: torch.Tensor,
    row_start: int,
    row_end: int,
    inv_tau: float,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """sum_j (P_ij + P_ji) zn_j - 2 zn_pos(i) for rows i in [row_start, row_end), with
    P_ij = exp(S_ij - lse_i), P_ii = 0 and `lse` the masked lse of all 2N rows: dL/dzn_i of the
    mean NT-Xent over the 2N rows, times 2N * tau (zn the row-normalised z). `row_loss` is part
    of the primitive's contract for the kernels, which round the tile weights and so take the
    positive's weight from it; in fp32 tiles subtracting 2 zn_pos is as exact."""
    del row_loss
    zn = _normalized_range(z, row_start, row_end, block)[0]
    if lse.shape != zn.shape[:1]:
        raise ValueError(
            f"lse must hold one value per row of Z ({zn.shape[0]}), got {tuple(lse.shape)}"
        )
    out = []
    for rows, col_tiles in _range_tiles(row_start, row_end, zn.shape[0], block):
        g = torch.zeros(rows.stop - rows.start, zn.shape[1], dtype=zn.dtype, device=zn.device)
        for cols, offset in col_tiles:
            s = _tile(zn, rows, cols, inv_tau)
            a = torch.exp(s - lse[rows, None]) + torch.exp(s - lse[None, cols])
            a.diagonal(offset).fill_(0.0)
            g += a @ zn[cols]
        out.append(g)
    return torch.cat(out) - 2.0 * zn[_positive_of(row_start, row_end, zn)]


@grad_rows.register_fake
def _(z, lse, row_loss, row_start, row_end, inv_tau, block=DEFAULT_BLOCK):
    return fake_grad_rows(z, row_start, row_end)


# The whole-matrix fast path (symmetric upper-triangle tiles), as torch.library ops with fake
# implementations; `nt_xent_autograd.NTXent` is their autograd, and theirs when called directly.


_T = torch.Tensor


def _forward(
    z_a: torch.Tensor, z_b: torch.Tensor, inv_tau: float, per_row: bool, block: int
) -> tuple[_T, _T, _T, _T, _T, _T, _T]:
    """(the 2N row losses of Z = [z_a; z_b], or their mean if not per_row; the masked lse and
    the row losses of the 2N rows; when 2N <= block, E = exp(S - shift) over the negatives,
    r = exp(shift - lse) per row (P = E r), zn and the norms, else four empty tensors).

    When the whole matrix is one tile, its exponentials and the normalised rows are kept for
    the backward instead of recomputed there (one matrix product, one exp pass and the
    normalisation fewer): the path that decides small batches. (2N)^2 + 2N D values are held
    until the backward, at most block^2 + 2N D and less than the reference's autograd keeps."""
    nt_xent_autograd.check_views(z_a, z_b)
    zn, norm, gap = _normalize_with_gap(torch.cat([z_a, z_b]))
    if zn.shape[0] > block:
        row_loss, lse = _row_losses(_negatives_lse(zn, inv_tau, block), gap, inv_tau)
        kept = tuple(zn.new_empty(0) for _ in range(4))
    else:
        e, shift = _negatives_exp(zn, inv_tau)
        row_loss, lse = _row_losses(e.sum(1).log_().add_(shift), gap, inv_tau)
        kept = (e, torch.exp(torch.sub(shift, lse)), zn, norm)
    loss = row_loss.clone() if per_row else row_loss.mean()
    return loss, lse, row_loss, *kept


def _negatives_exp(zn: torch.Tensor, inv_tau: float) -> tuple[torch.Tensor, torch.Tensor | float]:
    """(exp(S_ik - shift_i) with the diagonal and the positives set to 0, shift) over the
    whole matrix: shift the bound 1/|tau| (a float) where exp(-2/|tau|) stays normal, else
    each row's max over k != i."""
    half = zn.shape[0] // 2
    if fixed_shift_safe(inv_tau, zn.dtype):
        shift = abs(inv_tau)  # S - shift in the product's own pass
        e = torch.addmm(zn.new_full((), -shift), zn, zn.T, alpha=inv_tau).exp_()
    else:
        s = _tile(zn, slice(None), slice(None), inv_tau)
        shift = s.fill_diagonal_(float("-inf")).amax(1)
        e = s.sub_(shift[:, None]).exp_()
    # the diagonals 0 and +-N: those of the four N x N blocks
    e.view(2, half, 2, half).diagonal(dim1=1, dim2=3).fill_(0.0)
    return e, shift


_fused_forward = torch.library.custom_op(
    "fastcluster_cl::nt_xent_chunked_fwd", _forward, mutates_args=()
)


@_fused_forward.register_fake
def _(z_a, z_b, inv_tau, per_row, block):
    nt_xent_autograd.check_views(z_a, z_b)
    z = z_a
    acc = accumulation_dtype(z.dtype)
    rows = 2 * z.shape[0]
    kept = rows <= block
    return (
        z.new_empty((rows,) if per_row else (), dtype=acc),
        z.new_empty(rows, dtype=acc),
        z.new_empty(rows, dtype=acc),
        z.new_empty((rows, rows) if kept else (0,), dtype=acc),
        z.new_empty(rows if kept else 0, dtype=acc),
        z.new_empty((rows, z.shape[1]) if kept else (0,), dtype=acc),
        z.new_empty((rows, 1) if kept else (0,), dtype=acc),
    )


def _backward(
    z: torch.Tensor,
    grad: torch.Tensor,
    inv_tau: float,
    lse: torch.Tensor,
    row_loss: torch.Tensor,
    e: torch.Tensor,
    r: torch.Tensor,
    zn: torch.Tensor,
    norm: torch.Tensor,
    block: int,
) -> torch.Tensor:
    """dL/dz from the incoming gradient of the mean (0-d) or of each row loss ((2N,)): the
    module docstring's formula with w_i that row's gradient, then the normalisation's backward.
    With the forward's exponentials (one tile) the negatives' weights are w_i P_ij + w_j P_ji =
    E_ij c_i + E_ji c_j, c = w r (E symmetric under the fixed shift: E (c_i + c_j), no
    transpose), and the positive's w_i expm1(-loss_i) + w_pos expm1(-loss_pos), free of
    cancellation. w is scaled to |w| <= 1 first (`per_row_weights`; the mean's equal weights
    factor out): r reaches exp(2 / |tau|) / (2N - 1), and c_i + c_j must not overflow where E
    is 0."""
    rows_total = z.shape[0]
    half = rows_total // 2
    w = grad.to(lse.dtype)
    if e.numel():
        weight = torch.expm1(-row_loss)
        if w.dim() == 0:  # the mean's: every row's weight is grad / 2N, factored out
            scale, c = w * (inv_tau / rows_total), r
        else:
            scale, w = nt_xent_autograd.per_row_weights(w, lse.dtype)
            scale, c = scale * inv_tau, w * r
            weight.mul_(w)
        if fixed_shift_safe(inv_tau, e.dtype):
            a = torch.add(c[:, None], c[None, :]).mul_(e)
        else:
            a = e * c[:, None]
            a = a + a.T
        # the positives' weights, the same for i and pos(i), on A's diagonals +-N (E is 0
        # there): one product for both terms
        pair = weight.view(2, half).sum(0)
        a.diagonal(half).copy_(pair)
        a.diagonal(-half).copy_(pair)
        g = a @ zn
        return l2_normalize_backward(zn, norm, g, scale).to(z.dtype)
    w = w.expand(rows_total) / rows_total if w.dim() == 0 else w
    zn, norm = l2_normalize(z)
    g = torch.zeros_like(zn)
    for rows, cols, diagonal in _tiles(rows_total, block):
        s = _tile(zn, rows, cols, inv_tau)
        if diagonal:  # S_II is symmetric: w_J P_JI^T is the transpose of w_I P_IJ
            a = s.sub_(lse[rows, None]).exp_().mul_(w[rows, None])
            a = a + a.T
            a.fill_diagonal_(0.0)
            g[rows] += a @ zn[cols]
        else:  # w_I P_IJ + w_J P_JI^T
            by_cols = torch.sub(s, lse[None, cols]).exp_().mul_(w[None, cols])
            a = s.sub_(lse[rows, None]).exp_().mul_(w[rows, None]).add_(by_cols)
            g[rows] += a @ zn[cols]
            g[cols] += a.T @ zn[rows]
    g -= (w + w.roll(half))[:, None] * zn.roll(half, 0)
    return l2_normalize_backward(zn, norm, g, inv_tau).to(z.dtype)


_fused_backward = torch.library.custom_op(
    "fastcluster_cl::nt_xent_chunked_bwd", _backward, mutates_args=()
)


@_fused_backward.register_fake
def _(z, grad, inv_tau, lse, row_loss, e, r, zn, norm, block):
    return torch.empty_like(z)


NT_XENT = register_fast_path(
    "chunked",
    lse_rows,
    grad_rows,
    _fused_forward,
    _fused_backward,
    eager=(_forward, _backward),
    # with the forward's one tile (its exponentials e = state[2]) the backward reads Z's shape
    reads_rows=lambda state, options: not state[2].numel(),
)


def _check_block(block_size: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def nt_xent_terms(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, block_size: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """NT-Xent's 2N per-row terms (`reference.nt_xent_terms`) in block_size x block_size tiles."""
    _check_block(block_size)
    return nt_xent_autograd.nt_xent_terms(z_a, z_b, temperature, "chunked", block_size)


def nt_xent(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, block_size: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """NT-Xent (see `fastcluster_cl.nt_xent`) in block_size x block_size tiles."""
    _check_block(block_size)
    return nt_xent_autograd.nt_xent(z_a, z_b, temperature, "chunked", block_size)


# NT-Xent against a memory bank (`reference.nt_xent_bank_terms`): the N rows of z_a against the
# M bank rows in column blocks of `block`, never an N x M matrix; custom autograd
# (`nt_xent_bank_autograd`) from the saved row losses.


def _bank_rows(z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor, inv_tau: float):
    """(zn_a, norm_a, zn_b, norm_b, the bank in the accumulation dtype, S_pos)."""
    zn_a, norm_a = l2_normalize(z_a)
    zn_b, norm_b = l2_normalize(z_b)
    positive = 1.0 - reference.positive_gap(zn_a, norm_a, zn_b, norm_b)
    return zn_a, norm_a, zn_b, norm_b, bank.to(zn_a.dtype), positive * inv_tau


def _bank_column_blocks(bank: torch.Tensor, block: int):
    for c0 in range(0, bank.shape[0], block):
        yield bank[c0 : c0 + block]


@torch.library.custom_op("fastcluster_cl::nt_xent_bank_chunked_fwd", mutates_args=())
def _bank_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    bank: torch.Tensor,
    inv_tau: float,
    per_row: bool,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the N row losses, or their mean; the row losses). Per row,
    t = log sum_k exp(S_ik - S_pos) = log sum_k exp(S_ik - 1/tau) + (1/tau - S_pos) under the
    fixed shift (1 - cos from ||zn_a - zn_b||^2 / 2: no large terms cancel), else from the
    blocks' logsumexp; the loss is softplus(t), accurate when it is tiny."""
    zn_a, _, _, _, bank, s_pos = _bank_rows(z_a, z_b, bank, inv_tau)
    fixed_shift = fixed_shift_safe(inv_tau, zn_a.dtype)
    total = (
        torch.zeros(zn_a.shape[0], dtype=zn_a.dtype, device=zn_a.device)
        if fixed_shift
        else torch.full((zn_a.shape[0],), float("-inf"), dtype=zn_a.dtype, device=zn_a.device)
    )
    for cols in _bank_column_blocks(bank, block):
        s = (zn_a @ cols.T) * inv_tau
        if fixed_shift:
            total += torch.exp(s - abs(inv_tau)).sum(1)
        else:
            total = torch.logaddexp(total, torch.logsumexp(s, 1))
    t = (torch.log(total) + (abs(inv_tau) - s_pos)) if fixed_shift else total - s_pos
    row_loss = _softplus(t)
    return (row_loss.clone() if per_row else row_loss.mean()), row_loss


@_bank_forward.register_fake
def _(z_a, z_b, bank, inv_tau, per_row, block):
    return nt_xent_bank_autograd.fake_forward(
        z_a, per_row, z_a.new_empty(z_a.shape[0], dtype=accumulation_dtype(z_a.dtype))
    )


@torch.library.custom_op("fastcluster_cl::nt_xent_bank_chunked_bwd", mutates_args=())
def _bank_backward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    bank: torch.Tensor,
    grad: torch.Tensor,
    inv_tau: float,
    row_loss: torch.Tensor,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dz_a, dL/dz_b) from the mean's gradient (0-d) or one per row ((N,)): see
    `nt_xent_bank_autograd` for the formula."""
    zn_a, norm_a, zn_b, norm_b, bank, s_pos = _bank_rows(z_a, z_b, bank, inv_tau)
    n = zn_a.shape[0]
    w = grad.to(zn_a.dtype)
    w = (w.expand(n) / n if w.dim() == 0 else w) * inv_tau
    lse = s_pos + row_loss
    g_a = torch.zeros_like(zn_a)
    for cols in _bank_column_blocks(bank, block):
        g_a += torch.exp((zn_a @ cols.T) * inv_tau - lse[:, None]) @ cols
    pos = torch.expm1(-row_loss)[:, None]  # P_pos - 1, no cancellation
    g_a = (g_a + pos * zn_b) * w[:, None]
    g_b = pos * zn_a * w[:, None]
    return (
        l2_normalize_backward(zn_a, norm_a, g_a).to(z_a.dtype),
        l2_normalize_backward(zn_b, norm_b, g_b).to(z_b.dtype),
    )


@_bank_backward.register_fake
def _(z_a, z_b, bank, grad, inv_tau, row_loss, block):
    return torch.empty_like(z_a), torch.empty_like(z_b)


nt_xent_bank_autograd.register_bank_autograd(_bank_forward, _bank_backward, "chunked")


def nt_xent_bank(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    bank: torch.Tensor,
    temperature: float,
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """`reference.nt_xent_bank` over column blocks of block_size bank rows."""
    _check_block(block_size)
    return nt_xent_bank_autograd.nt_xent_bank(
        _bank_forward, z_a, z_b, bank, temperature, False, block_size
    )


def nt_xent_bank_terms(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    bank: torch.Tensor,
    temperature: float,
    block_size: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """`reference.nt_xent_bank_terms` over column blocks (per-row gradients supported)."""
    _check_block(block_size)
    return nt_xent_bank_autograd.nt_xent_bank(
        _bank_forward, z_a, z_b, bank, temperature, True, block_size
    )


def student_t(h: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    """`reference.student_t` with the distances as one matrix product,
    ||h_i - mu_k||^2 = ||h_i||^2 + ||mu_k||^2 - 2 h_i . mu_k, instead of an (N, K, F)
    difference tensor (its memory traffic, not its arithmetic, was the anchor objective's CPU
    time); autograd's backward is matrix products too. The product runs in float64 whatever
    the input dtype, so that the cancellation for a point near its center is far below the
    float32 reference's own rounding (docs/results.md has the CPU measurements)."""
    h64, c64 = h.to(torch.float64), centers.to(torch.float64)
    dist2 = ((h64 * h64).sum(1, keepdim=True) + (c64 * c64).sum(1) - 2.0 * h64 @ c64.T).clamp_min(
        0.0
    )
    q = torch.softmax(-(alpha + 1) / 2 * torch.log1p(dist2 / alpha), dim=1)
    return q.to(accumulation_dtype(h.dtype))


# Above CLUSTER_GRAM_ROWS the cluster-level contrasts reuse the chunked NT-Xent on their 2K rows;
# dec_loss and anchor_loss are O(N*K) with no N x N matrix to chunk and are the reference ones.
def cc_cluster_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float):
    """`reference.cc_cluster_loss`: one op each way (`objective_sides.cc_side`) for at most
    `CLUSTER_GRAM_ROWS` cluster rows, else the chunked NT-Xent on them."""
    if 2 * logits_a.shape[1] <= CLUSTER_GRAM_ROWS:
        return cc_side(logits_a, logits_b, temperature)
    return reference.cc_cluster_loss(logits_a, logits_b, temperature, instance_loss=nt_xent)


cc_cluster_loss_terms = partial(reference.cc_cluster_loss_terms, instance_terms=nt_xent_terms)


def anchor_objective(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    h0: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    centers: torch.Tensor,
    temperature: float,
    alpha: float,
    weights: tuple[float, float, float],
) -> torch.Tensor:
    """`reference.anchor_objective` as one autograd node (`objective_sides.Objective`): the
    chunked NT-Xent and the anchor side (the three assignments, DEC and the anchor terms)."""
    return Objective.apply(
        "anchor", weights, DEFAULT_BLOCK, z_a, z_b, 1.0 / temperature, h0, h_a, h_b, centers, alpha
    )


def cc_objective(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    instance_temperature: float,
    cluster_temperature: float,
    weights: tuple[float, float],
) -> torch.Tensor:
    """`reference.cc_objective`: the chunked NT-Xent plus `cc_cluster_loss`, as one autograd
    node (`objective_sides.Objective`) for at most `CLUSTER_GRAM_ROWS` cluster rows."""
    if 2 * logits_a.shape[1] > CLUSTER_GRAM_ROWS:
        acc = accumulation_dtype(z_a.dtype)
        parts = torch.stack(
            [
                nt_xent(z_a, z_b, instance_temperature).to(acc),
                cc_cluster_loss(logits_a, logits_b, cluster_temperature).to(acc),
            ]
        )
        return reference.with_total(parts, weights)
    return Objective.apply(
        "cc",
        weights,
        DEFAULT_BLOCK,
        z_a,
        z_b,
        1.0 / instance_temperature,
        logits_a,
        logits_b,
        cluster_temperature,
    )
