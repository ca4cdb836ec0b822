"""The whole objective of the anchor method and of Contrastive Clustering in one pass: instance
NT-Xent, the clustering terms and the weighted total in two launches forward and two backward,
with no torch compute between them (`fastcluster_cl.backends.reference.anchor_objective` and
`cc_objective` define the math).

Layout. Z = [z_a; z_b] (2N x D) is never concatenated: program p owns the N-row indices
I = [p BLOCK_M, (p + 1) BLOCK_M) and handles rows i and i + N of Z, so a row's positive pair,
and the assignments of sample i (q0_i, qa_i, qb_i for the anchor method; both views' softmax
rows for CC) live in the same program. Columns are streamed as pairs of tiles (z_a rows J,
z_b rows J): against both, row i's diagonal and positive are the column j = i, so one mask
serves the four products of a column pair (`nt_xent._edge_tile` with N rows).

Forward row launch (`_anchor_rows_kernel` / `_cc_rows_kernel`), per program:
  * NT-Xent (`_instance_rows`): there is no prologue launch, so each column tile is normalised
    as it is loaded (`nt_xent.scaled_rows`: the exact power-of-two row scaling of the NT-Xent
    prologue, safe for |z| ~ 1e19 or 1e-30, then cast to the fp16 copy for bf16/fp16 inputs),
    which costs O(BLOCK_N D) elementwise work per tile beside the O(BLOCK_M BLOCK_N D) GEMMs.
    The program writes its own rows of what the backward (`nt_xent.grad_block`) reads: Zs, rs,
    norms, the row weights and row losses (2N x D and 2N-sized), and its partial loss sum.
    Row losses use `accumulate_negatives` / `row_losses` (fixed shift or online max, the
    cancellation-free positive term ||zn_i - zn_pos||^2 / 2).
  * anchor, in slices of `_SUB_M` rows (registers independent of BLOCK_M): Student-t logits of
    h0, h_a, h_b against all K centres in tiles (`student_t._distances`; mixed bf16 features
    and fp32 centres meet in fp32), an online log-sum-exp per view (pass 1), then pass 2 recomputes
    the logits and forms q = exp(logit - lse): the anchor terms KL(q0||qa) + KL(q0||qb) (log q
    clamped at the smallest normal as `numerics.safe_log`), q0's partial column sums f (one
    row per slice: deterministic), q0 itself (an N x K temporary for the epilogue, not saved),
    and per row lse_v and c_v = sum_k q0_k [q_v,k >= tiny] (the clamp-aware gradient's sums).
  * cc: softmax rows of both views (`cc_cluster.softmax_rows`), the block's partial Gram of
    [P_a P_b] (three K x K blocks) and column sums.
  * scalars (1/tau, alpha or 1/tau_cluster, the weights) arrive as (hi, lo) fp32 kernel
    arguments (`_param`: fp64 precision kept) and program 0 writes them into the params tensor
    the later launches read: no host-to-device copy (torch.tensor(..., device="cuda") would
    synchronise the host), no fill.
Epilogue (one program, `_anchor_epilogue_kernel` O(N K) / `_cc_epilogue_kernel` O(K^2)): sums
the partials in a fixed order; anchor: f, DEC's row totals T_i = sum_k q0^2 / f and KL(p||q0)
per row (`kl._dec_row_totals`, `kl._dec_weights`), and c_dec = sum_k p [q0 >= tiny]; cc: the
2K x 2K cluster NT-Xent from the normalised Gram and the marginal entropies; then the means and
the weighted total written straight into the (4,) / (3,) output.

Backward: the incoming gradient g (4,) / (3,) and the weights w fold into one scalar per part
(g_part + g_total w_part) inside the kernels.
  * anchor: one row launch (`_anchor_grad_kernel`): NT-Xent dz of both row blocks through
    `nt_xent.grad_block` (the fast path's kernel body: expm1 positive weights, 2^14-scaled fp16
    tile weights, the normalisation's backward), and the Student-t rows recomputed from h and
    the centres with the saved lse, f, T, c, in 16-row slices and one view at a time (the
    static report: three views at once spilled): with G = dL/dlogit,
        DEC    G0 = g_dec (q0 c_dec - p [q0 >= tiny]) / N   (p detached)
        anchor Ga = g_anc (qa c_a - q0 [qa >= tiny]) / N, likewise b, none into q0,
    w = -G (alpha + 1) / (alpha + d2), dh = (sum_k w) h - w mu, and the block's partial
    dmu = colsum(w) mu - w^T h (added up over the slices and views in the program's own
    partial, barriers between them); a second small launch
    (`_sum_partials_kernel`) reduces the partial dmu in a fixed order.
  * cc: a one-program launch (`_cc_cluster_grad_kernel`) turns the saved Gram and column sums
    into M = dG + dG^T and dL/dcolsum, then the row launch (`_cc_grad_kernel`) writes dz
    (`grad_block`) and dlogits (`cc_cluster.cluster_grad_rows`: dQ = Q M + dc, softmax
    backward).

Launch shapes (`instance_config`): on the tensor-core path the forward takes 128 rows per half
and 16-column tiles with 8 warps (the per-column normalisation amortised over more rows), the
backward the fast path's 64 x 64; under the interpreter 32 x 32. The static sm_90a numbers and
how they were reached are in benchmarks/static_notes.md (section 8): no spills anywhere, every
product at the MMA floor, one exp per similarity element; the forward's issue ceiling is 0.50
(the fast path's 0.98: the column normalisation the prologue would have done once).

Saved for the backward: the 2N x D fp16/input-dtype copy Zs and 2N-, N-, K-sized vectors (and
the 2K x 2K Gram for cc); never an N x K or 2N x 2N matrix.

Limits: D and F at most `MAX_FEATURES` (rows in registers); K at most `student_t.MAX_CENTRES`
(anchor, tiled) and `cc_cluster.MAX_CLUSTERS` (cc, the Gram in registers); float64 for all
inputs or none. `anchor_objective_fits` / `cc_objective_fits` say whether a call is within them:
`fastcluster_cl.functional` runs the separate ops (the same function) for calls that are not.
No spills at the sizes of the static report (K 10 / 100, F 128); larger ones spill (sm_90a:
cc rows 672 B at K = 32, 2472 B at K = 64; anchor grad 256 B at F = 256, 1408 B at F = 512).
The anchor epilogue
is one program walking N x K (fine at training sizes: N K ~ 1e5 elements; a multi-program
epilogue would need a third launch or atomics). The partial dmu is (programs x K x F) floats.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from fastcluster_cl.backends.autograd.pairs import register_pair
from fastcluster_cl.backends.numerics import fixed_shift_safe

from ._common import (
    MAX_FEATURES,
    NORM_EPS,
    acc_dtype,
    check_dtype,
    device_guard,
    dot,
    dot_precision,
    feature_block,
    round_to,
    upcast_dots,
)
from .cc_cluster import MAX_CLUSTERS as _CC_MAX_CLUSTERS
from .cc_cluster import _load_square, cluster_grad_rows, softmax_rows
from .kl import _dec_row_totals, _dec_weights, _safe_log, _xlogx
from .nt_xent import (
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
    row_losses,
    scaled_rows,
)
from .student_t import MAX_CENTRES, _distances
from .student_t import _blocks as _student_blocks

_EPS = tl.constexpr(NORM_EPS)
_ROWS = 32  # rows of the one-program epilogue's row loop
_SUB_M = 16  # rows per slice of the assignment side of the row launches
_SMALL_WARPS = 8  # the one-program cc launches (K = 64 spilled 1.2 KB on sm_90 with 4)
_REDUCE = 256  # elements per program of the partial sums' reduction


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
    norms, backward row weights and row losses, and INST_PART[pid] = the sum of the block's
    row losses. Returns (offs_m, mask_m) of I."""
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
        x_aa = dot(zi_a, zc_a, ACC, PREC, UPCAST) * q_a[:, None] * rc_a[None, :]
        x_ab = dot(zi_a, zc_b, ACC, PREC, UPCAST) * q_a[:, None] * rc_b[None, :]
        x_ba = dot(zi_b, zc_a, ACC, PREC, UPCAST) * q_b[:, None] * rc_a[None, :]
        x_bb = dot(zi_b, zc_b, ACC, PREC, UPCAST) * q_b[:, None] * rc_b[None, :]
        if _edge_tile(c0, BLOCK_N, row_lo, BLOCK_M, n):
            # column j of either half is row i's diagonal or positive exactly when j = i
            negative = mask_n[None, :] & (offs_m[:, None] != offs_n[None, :])
            x_aa = tl.where(negative, x_aa, float("-inf"))
            x_ab = tl.where(negative, x_ab, float("-inf"))
            x_ba = tl.where(negative, x_ba, float("-inf"))
            x_bb = tl.where(negative, x_bb, float("-inf"))
        tot_a, m_a = accumulate_negatives(x_aa, tot_a, m_a, shift, FIXED_SHIFT)
        tot_a, m_a = accumulate_negatives(x_ab, tot_a, m_a, shift, FIXED_SHIFT)
        tot_b, m_b = accumulate_negatives(x_ba, tot_b, m_b, shift, FIXED_SHIFT)
        tot_b, m_b = accumulate_negatives(x_bb, tot_b, m_b, shift, FIXED_SHIFT)
    lse_a, loss_a = row_losses(tot_a, m_a, dist, inv_tau, FIXED_SHIFT, ACC)
    lse_b, loss_b = row_losses(tot_b, m_b, dist, inv_tau, FIXED_SHIFT, ACC)
    tl.store(ROW_W + offs_m, _row_weight(lse_a, inv_tau, FIXED_SHIFT), mask=mask_m)
    tl.store(ROW_W + n + offs_m, _row_weight(lse_b, inv_tau, FIXED_SHIFT), mask=mask_m)
    tl.store(ROW_LOSS + offs_m, loss_a, mask=mask_m)
    tl.store(ROW_LOSS + n + offs_m, loss_b, mask=mask_m)
    tl.store(INST_PART + pid, tl.sum(tl.where(mask_m, loss_a + loss_b, 0.0), axis=0))
    return offs_m, mask_m


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
    """dz of rows I (into DZA) and I + N (into DZB): the fast path's backward body."""
    grad_block(
        ZS,
        RS,
        NORMS,
        ROW_W,
        ROW_LOSS,
        ROW_W,
        DZA,
        PARAMS,
        g_inst,
        2 * n,
        n,
        D,
        stride_da,
        0,
        row_lo,
        n,
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
        PARAMS,
        g_inst,
        2 * n,
        n,
        D,
        stride_db,
        n,
        n + row_lo,
        2 * n,
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
def _param(hi, lo, ACC: tl.constexpr):
    """A host float passed as two fp32 kernel arguments (hi = fp32(x), lo = fp32(x - hi)), as
    a scalar of ACC: x to ~2^-48 in fp64 (Triton passes Python floats as fp32)."""
    return tl.sum((hi + tl.zeros([1], ACC)) + (lo + tl.zeros([1], ACC)), axis=0)


@triton.jit
def _store_params(PARAMS, pid, v0, v1, v2, v3, v4):
    """Program 0 writes the five scalars the later launches read (PARAMS, a forward output
    the backward gets: no host-to-device copy, no fill)."""
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


@triton.jit
def _sum_partials_kernel(
    PART, OUT, parts, size, part_stride, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    """OUT[e] = sum_p PART[p part_stride + e] in the order p = 0, 1, ... (deterministic)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    total = tl.zeros([BLOCK], ACC)
    for p in range(0, parts):
        total += tl.load(PART + p * part_stride + offs, mask=mask, other=0.0)
    tl.store(OUT + offs, total.to(OUT.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# anchor method


@triton.jit
def _student_logits(
    H,
    MU,
    stride_h,
    stride_mu,
    offs_m,
    mask_m,
    offs_k,
    mask_k,
    F,
    alpha,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """(d2, logit) of one centre tile: logit = -(alpha+1)/2 log(1 + d2/alpha), -inf on padding."""
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
    )
    logit = tl.where(mask_k[None, :], -(alpha + 1.0) / 2.0 * tl.log(1.0 + d / alpha), float("-inf"))
    return d, logit


@triton.jit
def _three_views(
    H0,
    HA,
    HB,
    MU,
    stride_h0,
    stride_ha,
    stride_hb,
    stride_mu,
    offs_m,
    mask_m,
    k0,
    K,
    F,
    alpha,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """The centre tile [k0, k0 + BLOCK_K) of the three views: (offs_k, mask_k, d2_0, logit_0,
    d2_a, logit_a, d2_b, logit_b)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    d0, l0 = _student_logits(
        H0,
        MU,
        stride_h0,
        stride_mu,
        offs_m,
        mask_m,
        offs_k,
        mask_k,
        F,
        alpha,
        ACC,
        PREC,
        UPCAST,
        BLOCK_M,
        BLOCK_K,
        BLOCK_F,
    )
    da, la = _student_logits(
        HA,
        MU,
        stride_ha,
        stride_mu,
        offs_m,
        mask_m,
        offs_k,
        mask_k,
        F,
        alpha,
        ACC,
        PREC,
        UPCAST,
        BLOCK_M,
        BLOCK_K,
        BLOCK_F,
    )
    db, lb = _student_logits(
        HB,
        MU,
        stride_hb,
        stride_mu,
        offs_m,
        mask_m,
        offs_k,
        mask_k,
        F,
        alpha,
        ACC,
        PREC,
        UPCAST,
        BLOCK_M,
        BLOCK_K,
        BLOCK_F,
    )
    return offs_k, mask_k, d0, l0, da, la, db, lb


@triton.jit
def _online_lse(m, s, logit):
    m_new = tl.maximum(m, tl.max(logit, axis=1))  # finite: each tile holds a centre
    return m_new, s * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)


@triton.jit
def _assignment_rows(
    H0,
    HA,
    HB,
    MU,
    Q0,
    F_PART,
    LSE,
    CAB,
    alpha,
    part,
    row_lo,
    n,
    K,
    F,
    stride_h0,
    stride_ha,
    stride_hb,
    stride_mu,
    k_pad,
    ACC: tl.constexpr,
    HPREC: tl.constexpr,
    HUPCAST: tl.constexpr,
    TINY: tl.constexpr,
    SUB_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """The anchor side of rows [row_lo, row_lo + SUB_M): pass 1 each view's log-sum-exp over
    the centre tiles, pass 2 q, the anchor terms, q0 and its column sums (F_PART row `part`).
    Writes lse and c_a, c_b; returns the rows' summed anchor terms."""
    offs_m = row_lo + tl.arange(0, SUB_M)
    mask_m = offs_m < n
    m0 = tl.full([SUB_M], float("-inf"), ACC)
    ma = tl.full([SUB_M], float("-inf"), ACC)
    mb = tl.full([SUB_M], float("-inf"), ACC)
    s0 = tl.zeros([SUB_M], ACC)
    sa = tl.zeros([SUB_M], ACC)
    sb = tl.zeros([SUB_M], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k, mask_k, _, l0, _, la, _, lb = _three_views(
            H0,
            HA,
            HB,
            MU,
            stride_h0,
            stride_ha,
            stride_hb,
            stride_mu,
            offs_m,
            mask_m,
            k0,
            K,
            F,
            alpha,
            ACC,
            HPREC,
            HUPCAST,
            SUB_M,
            BLOCK_K,
            BLOCK_F,
        )
        m0, s0 = _online_lse(m0, s0, l0)
        ma, sa = _online_lse(ma, sa, la)
        mb, sb = _online_lse(mb, sb, lb)
    lse0 = m0 + tl.log(s0)
    lsea = ma + tl.log(sa)
    lseb = mb + tl.log(sb)
    anchor = tl.zeros([SUB_M], ACC)
    c_a = tl.zeros([SUB_M], ACC)
    c_b = tl.zeros([SUB_M], ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k, mask_k, _, l0, _, la, _, lb = _three_views(
            H0,
            HA,
            HB,
            MU,
            stride_h0,
            stride_ha,
            stride_hb,
            stride_mu,
            offs_m,
            mask_m,
            k0,
            K,
            F,
            alpha,
            ACC,
            HPREC,
            HUPCAST,
            SUB_M,
            BLOCK_K,
            BLOCK_F,
        )
        tile = mask_m[:, None] & mask_k[None, :]
        q0 = tl.where(tile, tl.exp(l0 - lse0[:, None]), 0.0)
        qa = tl.where(tile, tl.exp(la - lsea[:, None]), 0.0)
        qb = tl.where(tile, tl.exp(lb - lseb[:, None]), 0.0)
        anchor += tl.sum(
            2.0 * _xlogx(q0) - q0 * (_safe_log(qa, TINY) + _safe_log(qb, TINY)), axis=1
        )
        c_a += tl.sum(tl.where(qa >= TINY, q0, 0.0), axis=1)
        c_b += tl.sum(tl.where(qb >= TINY, q0, 0.0), axis=1)
        tl.store(Q0 + offs_m[:, None] * K + offs_k[None, :], q0, mask=tile)
        tl.store(F_PART + part * k_pad + offs_k, tl.sum(q0, axis=0))
    tl.store(LSE + offs_m, lse0, mask=mask_m)
    tl.store(LSE + n + offs_m, lsea, mask=mask_m)
    tl.store(LSE + 2 * n + offs_m, lseb, mask=mask_m)
    tl.store(CAB + offs_m, c_a, mask=mask_m)
    tl.store(CAB + n + offs_m, c_b, mask=mask_m)
    return tl.sum(tl.where(mask_m, anchor, 0.0), axis=0)


@triton.jit
def _anchor_rows_kernel(
    ZA,
    ZB,
    ZS,
    RS,
    NORMS,
    ROW_W,
    ROW_LOSS,
    PARAMS,
    INST_PART,
    H0,
    HA,
    HB,
    MU,
    Q0,
    F_PART,
    ANCHOR_PART,
    LSE,
    CAB,
    n,
    D,
    K,
    F,
    stride_a,
    stride_b,
    stride_h0,
    stride_ha,
    stride_hb,
    stride_mu,
    k_pad,
    t_hi,
    t_lo,
    a_hi,
    a_lo,
    w0_hi,
    w0_lo,
    w1_hi,
    w1_lo,
    w2_hi,
    w2_lo,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    HPREC: tl.constexpr,
    HUPCAST: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SUB_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """The forward row launch of the anchor method; the assignments in SUB_M-row slices (the
    registers of three views' distance tiles do not grow with BLOCK_M), F_PART one row per
    slice."""
    pid = tl.program_id(0)
    _instance_rows(
        ZA,
        ZB,
        ZS,
        RS,
        NORMS,
        ROW_W,
        ROW_LOSS,
        _param(t_hi, t_lo, ACC),
        INST_PART,
        pid,
        n,
        D,
        stride_a,
        stride_b,
        FIXED_SHIFT,
        ACC,
        PREC,
        UPCAST,
        TINY,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
    )
    alpha = _param(a_hi, a_lo, ACC)
    anchor = tl.zeros([1], ACC)
    for s in tl.static_range(BLOCK_M // SUB_M):
        anchor += _assignment_rows(
            H0,
            HA,
            HB,
            MU,
            Q0,
            F_PART,
            LSE,
            CAB,
            alpha,
            pid * (BLOCK_M // SUB_M) + s,
            pid * BLOCK_M + s * SUB_M,
            n,
            K,
            F,
            stride_h0,
            stride_ha,
            stride_hb,
            stride_mu,
            k_pad,
            ACC,
            HPREC,
            HUPCAST,
            TINY,
            SUB_M,
            BLOCK_K,
            BLOCK_F,
        )
    tl.store(ANCHOR_PART + pid + tl.arange(0, 1), anchor)
    # last: nothing of it is live across the loops
    _store_params(
        PARAMS,
        pid,
        _param(t_hi, t_lo, ACC),
        alpha,
        _param(w0_hi, w0_lo, ACC),
        _param(w1_hi, w1_lo, ACC),
        _param(w2_hi, w2_lo, ACC),
    )


@triton.jit
def _anchor_epilogue_kernel(
    Q0,
    F_PART,
    INST_PART,
    ANCHOR_PART,
    PARAMS,
    FSUM,
    TOTALS,
    CDEC,
    OUT,
    n,
    K,
    parts,
    slices,
    k_pad,
    ACC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: f from the partials, DEC per row (saving T and c_dec), the (4,) output."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        f = tl.zeros([BLOCK_K], ACC)
        for p in range(0, slices):
            f += tl.load(F_PART + p * k_pad + offs_k)
        tl.store(FSUM + offs_k, f, mask=offs_k < K)
    tl.debug_barrier()  # the row loop reads f that other threads wrote
    dec_sum = tl.zeros([BLOCK_M], ACC)
    for r0 in range(0, n, BLOCK_M):
        offs_m = r0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n
        total = _dec_row_totals(Q0, FSUM, K, offs_m, mask_m, K, ACC, TINY, BLOCK_M, BLOCK_K)
        dec = tl.zeros([BLOCK_M], ACC)
        c_dec = tl.zeros([BLOCK_M], ACC)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            q, w = _dec_weights(Q0, FSUM, K, offs_m, mask_m, offs_k, K, ACC, TINY)
            p = w / total[:, None]
            dec += tl.sum(_xlogx(p) - p * _safe_log(q, TINY), axis=1)
            c_dec += tl.sum(tl.where(q >= TINY, p, 0.0), axis=1)
        tl.store(TOTALS + offs_m, total, mask=mask_m)
        tl.store(CDEC + offs_m, c_dec, mask=mask_m)
        dec_sum += tl.where(mask_m, dec, 0.0)
    instance = _sum(INST_PART, parts, ACC) / (2 * n)
    cluster = tl.sum(dec_sum, axis=0) / n
    anchor = _sum(ANCHOR_PART, parts, ACC) / n
    total = (
        tl.load(PARAMS + 2) * instance
        + tl.load(PARAMS + 3) * cluster
        + tl.load(PARAMS + 4) * anchor
    )
    tl.store(OUT, total)
    tl.store(OUT + 1, instance)
    tl.store(OUT + 2, cluster)
    tl.store(OUT + 3, anchor)


@triton.jit
def _view_grad(G, d, alpha, tile, mu, h, sw, wmu, ACC: tl.constexpr, PREC: tl.constexpr):
    """w = -G (alpha+1) / (alpha + d2) of one view's centre tile (0 on padding), G = dL/dlogit:
    returns (w, sw + sum_k w, wmu + w mu, the tile's w^T h)."""
    w = tl.where(tile, -G * (alpha + 1.0) / (alpha + d), 0.0)
    return (
        w,
        sw + tl.sum(w, axis=1),
        wmu + dot(w, mu, ACC, PREC, False),
        dot(tl.trans(w), h, ACC, PREC, False),
    )


@triton.jit
def _load_h(H, stride, offs_m, mask_m, F, ACC: tl.constexpr, BLOCK_FULL: tl.constexpr):
    offs_f = tl.arange(0, BLOCK_FULL)
    return tl.load(
        H + offs_m[:, None] * stride + offs_f[None, :],
        mask=mask_m[:, None] & (offs_f[None, :] < F),
        other=0.0,
    ).to(ACC)


@triton.jit
def _store_h(DH, stride, offs_m, mask_m, F, sw, wmu, h, BLOCK_FULL: tl.constexpr):
    offs_f = tl.arange(0, BLOCK_FULL)
    tl.store(
        DH + offs_m[:, None] * stride + offs_f[None, :],
        round_to(sw[:, None] * h - wmu, DH.dtype.element_ty),
        mask=mask_m[:, None] & (offs_f[None, :] < F),
    )


@triton.jit
def _assignment_grad_rows(
    H0,
    HV,
    DHV,
    MU,
    FSUM,
    TOTALS,
    CDEC,
    LSE,
    CAB,
    DMU_PART,
    g,
    alpha,
    pid,
    row_lo,
    n,
    K,
    F,
    stride_h0,
    stride_v,
    stride_mu,
    k_pad,
    slice_index,
    VIEW: tl.constexpr,
    ACC: tl.constexpr,
    HPREC: tl.constexpr,
    HUPCAST: tl.constexpr,
    TINY: tl.constexpr,
    SUB_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_FULL: tl.constexpr,
):
    """One view's dh of rows [row_lo, row_lo + SUB_M) (VIEW 0: h0, DEC's gradient g; 1, 2:
    h_a, h_b, the anchor's) and its part of the program's partial dmu (stored by view 0 of
    slice 0, added by the others). One view at a time: only one view's (rows x F) and
    (tile x F) terms are live."""
    offs_m = row_lo + tl.arange(0, SUB_M)
    mask_m = offs_m < n
    lse0 = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    if VIEW == 0:
        c = tl.load(CDEC + offs_m, mask=mask_m, other=0.0)
        totals = tl.load(TOTALS + offs_m, mask=mask_m, other=1.0)
        lse_v = lse0
    else:
        c = tl.load(CAB + (VIEW - 1) * n + offs_m, mask=mask_m, other=0.0)
        totals = c
        lse_v = tl.load(LSE + VIEW * n + offs_m, mask=mask_m, other=0.0)
    h = _load_h(HV, stride_v, offs_m, mask_m, F, ACC, BLOCK_FULL)
    sw = tl.zeros([SUB_M], ACC)
    wmu = tl.zeros([SUB_M, BLOCK_FULL], ACC)
    offs_f = tl.arange(0, BLOCK_FULL)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        tile = mask_m[:, None] & mask_k[None, :]
        d, l0 = _student_logits(
            H0,
            MU,
            stride_h0,
            stride_mu,
            offs_m,
            mask_m,
            offs_k,
            mask_k,
            F,
            alpha,
            ACC,
            HPREC,
            HUPCAST,
            SUB_M,
            BLOCK_K,
            BLOCK_F,
        )
        q0 = tl.where(tile, tl.exp(l0 - lse0[:, None]), 0.0)
        # dL/dlogit: DEC (target p detached) into q0, the anchor (q0 detached) into qa and qb
        if VIEW == 0:
            f = tl.load(FSUM + offs_k, mask=mask_k, other=1.0)
            p = q0 * q0 / tl.maximum(f, TINY)[None, :] / totals[:, None]
            grad = g * (q0 * c[:, None] - tl.where(q0 >= TINY, p, 0.0))
        else:
            d, lv = _student_logits(
                HV,
                MU,
                stride_v,
                stride_mu,
                offs_m,
                mask_m,
                offs_k,
                mask_k,
                F,
                alpha,
                ACC,
                HPREC,
                HUPCAST,
                SUB_M,
                BLOCK_K,
                BLOCK_F,
            )
            qv = tl.where(tile, tl.exp(lv - lse_v[:, None]), 0.0)
            grad = g * (qv * c[:, None] - tl.where(qv >= TINY, q0, 0.0))
        mu = tl.load(
            MU + offs_k[:, None] * stride_mu + offs_f[None, :],
            mask=mask_k[:, None] & (offs_f[None, :] < F),
            other=0.0,
        ).to(ACC)
        w, sw, wmu, wh = _view_grad(grad, d, alpha, tile, mu, h, sw, wmu, ACC, HPREC)
        dmu = tl.sum(w, axis=0)[:, None] * mu - wh
        ptrs = DMU_PART + (pid * k_pad + offs_k)[:, None] * F + offs_f[None, :]
        mask = mask_k[:, None] & (offs_f[None, :] < F)
        dmu += tl.load(ptrs, mask=mask & (slice_index + VIEW > 0), other=0.0)
        tl.store(ptrs, dmu, mask=mask)
    _store_h(DHV, stride_v, offs_m, mask_m, F, sw, wmu, h, BLOCK_FULL)


@triton.jit
def _anchor_grad_kernel(
    ZS,
    RS,
    NORMS,
    ROW_W,
    ROW_LOSS,
    PARAMS,
    GRAD,
    DZA,
    DZB,
    H0,
    HA,
    HB,
    MU,
    FSUM,
    TOTALS,
    CDEC,
    LSE,
    CAB,
    DH0,
    DHA,
    DHB,
    DMU_PART,
    n,
    D,
    K,
    F,
    stride_da,
    stride_db,
    stride_h0,
    stride_ha,
    stride_hb,
    stride_mu,
    k_pad,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    HPREC: tl.constexpr,
    HUPCAST: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SUB_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    BLOCK_FULL: tl.constexpr,
):
    """The backward row launch of the anchor method: dz of rows I and I + N, then dh and the
    partial dmu in SUB_M-row slices (registers independent of BLOCK_M)."""
    pid = tl.program_id(0)
    row_lo = pid * BLOCK_M
    g_inst = tl.load(GRAD + 1).to(ACC) + tl.load(GRAD).to(ACC) * tl.load(PARAMS + 2)
    _instance_grad(
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
        FIXED_SHIFT,
        ACC,
        PREC,
        UPCAST,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
    )
    # loaded after the NT-Xent loops, not held across them
    g_total = tl.load(GRAD).to(ACC)
    g_dec = (tl.load(GRAD + 2).to(ACC) + g_total * tl.load(PARAMS + 3)) / n
    g_anc = (tl.load(GRAD + 3).to(ACC) + g_total * tl.load(PARAMS + 4)) / n
    alpha = tl.load(PARAMS + 1).to(ACC)
    # the slices and views add to the partial dmu in turn: a barrier after each
    for s in range(0, BLOCK_M // SUB_M):  # not unrolled: one copy of the slice's code
        lo = row_lo + s * SUB_M
        _assignment_grad_rows(
            H0,
            H0,
            DH0,
            MU,
            FSUM,
            TOTALS,
            CDEC,
            LSE,
            CAB,
            DMU_PART,
            g_dec,
            alpha,
            pid,
            lo,
            n,
            K,
            F,
            stride_h0,
            stride_h0,
            stride_mu,
            k_pad,
            s,
            0,
            ACC,
            HPREC,
            HUPCAST,
            TINY,
            SUB_M,
            BLOCK_K,
            BLOCK_F,
            BLOCK_FULL,
        )
        tl.debug_barrier()
        _assignment_grad_rows(
            H0,
            HA,
            DHA,
            MU,
            FSUM,
            TOTALS,
            CDEC,
            LSE,
            CAB,
            DMU_PART,
            g_anc,
            alpha,
            pid,
            lo,
            n,
            K,
            F,
            stride_h0,
            stride_ha,
            stride_mu,
            k_pad,
            s,
            1,
            ACC,
            HPREC,
            HUPCAST,
            TINY,
            SUB_M,
            BLOCK_K,
            BLOCK_F,
            BLOCK_FULL,
        )
        tl.debug_barrier()
        _assignment_grad_rows(
            H0,
            HB,
            DHB,
            MU,
            FSUM,
            TOTALS,
            CDEC,
            LSE,
            CAB,
            DMU_PART,
            g_anc,
            alpha,
            pid,
            lo,
            n,
            K,
            F,
            stride_h0,
            stride_hb,
            stride_mu,
            k_pad,
            s,
            2,
            ACC,
            HPREC,
            HUPCAST,
            TINY,
            SUB_M,
            BLOCK_K,
            BLOCK_F,
            BLOCK_FULL,
        )
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------
# Contrastive Clustering


@triton.jit
def _cc_rows_kernel(
    ZA,
    ZB,
    ZS,
    RS,
    NORMS,
    ROW_W,
    ROW_LOSS,
    PARAMS,
    INST_PART,
    LA,
    LB,
    GRAM_PART,
    COL_PART,
    n,
    D,
    K,
    stride_a,
    stride_b,
    stride_la,
    stride_lb,
    t_hi,
    t_lo,
    c_hi,
    c_lo,
    w0_hi,
    w0_lo,
    w1_hi,
    w1_lo,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    CPREC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m, mask_m = _instance_rows(
        ZA,
        ZB,
        ZS,
        RS,
        NORMS,
        ROW_W,
        ROW_LOSS,
        _param(t_hi, t_lo, ACC),
        INST_PART,
        pid,
        n,
        D,
        stride_a,
        stride_b,
        FIXED_SHIFT,
        ACC,
        PREC,
        UPCAST,
        TINY,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
    )
    q_a = softmax_rows(LA, stride_la, offs_m, mask_m, K, ACC, BLOCK_K)
    q_b = softmax_rows(LB, stride_lb, offs_m, mask_m, K, ACC, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    sq = BLOCK_K * BLOCK_K
    tile = offs_k[:, None] * BLOCK_K + offs_k[None, :]
    base = GRAM_PART + pid * 3 * sq
    tl.store(base + tile, dot(tl.trans(q_a), q_a, ACC, CPREC, False))
    tl.store(base + sq + tile, dot(tl.trans(q_a), q_b, ACC, CPREC, False))
    tl.store(base + 2 * sq + tile, dot(tl.trans(q_b), q_b, ACC, CPREC, False))
    tl.store(COL_PART + pid * 2 * BLOCK_K + offs_k, tl.sum(q_a, axis=0))
    tl.store(COL_PART + pid * 2 * BLOCK_K + BLOCK_K + offs_k, tl.sum(q_b, axis=0))
    # last: nothing of it is live across the loops
    _store_params(
        PARAMS,
        pid,
        _param(t_hi, t_lo, ACC),
        _param(c_hi, c_lo, ACC),
        _param(w0_hi, w0_lo, ACC),
        _param(w1_hi, w1_lo, ACC),
        0.0,
    )


@triton.jit
def _diagonal(m, BLOCK_K: tl.constexpr):
    """(the diagonal of a square tile as a row-indexed vector, as a column-indexed vector)."""
    offs = tl.arange(0, BLOCK_K)
    on = offs[:, None] == offs[None, :]
    return tl.sum(tl.where(on, m, 0.0), axis=1), tl.sum(tl.where(on, m, 0.0), axis=0)


@triton.jit
def _cluster_similarities(GRAM, K, inv_tau, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """The 2K x 2K cluster NT-Xent's pieces from the Gram blocks (aa, ab, bb): the normalised
    columns' cosines C, the logits S = C / tau of the blocks (diagonal and padding -inf), each
    row's lse, and the norms max(|q_k|, eps) by row and by column index."""
    sq = BLOCK_K * BLOCK_K
    g_aa = _load_square(GRAM, BLOCK_K)
    g_ab = _load_square(GRAM + sq, BLOCK_K)
    g_bb = _load_square(GRAM + 2 * sq, BLOCK_K)
    offs = tl.arange(0, BLOCK_K)
    valid = offs < K
    both = valid[:, None] & valid[None, :]
    keep = both & (offs[:, None] != offs[None, :])
    da_r, da_c = _diagonal(g_aa, BLOCK_K)
    db_r, db_c = _diagonal(g_bb, BLOCK_K)
    na_r = tl.sqrt(tl.maximum(da_r, _EPS * _EPS))
    na_c = tl.sqrt(tl.maximum(da_c, _EPS * _EPS))
    nb_r = tl.sqrt(tl.maximum(db_r, _EPS * _EPS))
    nb_c = tl.sqrt(tl.maximum(db_c, _EPS * _EPS))
    c_aa = g_aa / (na_r[:, None] * na_c[None, :])
    c_ab = g_ab / (na_r[:, None] * nb_c[None, :])
    c_bb = g_bb / (nb_r[:, None] * nb_c[None, :])
    s_aa = tl.where(keep, c_aa * inv_tau, float("-inf"))
    s_ab = tl.where(both, c_ab * inv_tau, float("-inf"))
    s_bb = tl.where(keep, c_bb * inv_tau, float("-inf"))
    s_ba = tl.trans(s_ab)
    m_a = tl.maximum(tl.max(s_aa, axis=1), tl.max(s_ab, axis=1))
    m_b = tl.maximum(tl.max(s_ba, axis=1), tl.max(s_bb, axis=1))
    m_a = tl.where(valid, m_a, 0.0)
    m_b = tl.where(valid, m_b, 0.0)
    lse_a = m_a + tl.log(
        tl.sum(tl.exp(s_aa - m_a[:, None]), axis=1) + tl.sum(tl.exp(s_ab - m_a[:, None]), axis=1)
    )
    lse_b = m_b + tl.log(
        tl.sum(tl.exp(s_ba - m_b[:, None]), axis=1) + tl.sum(tl.exp(s_bb - m_b[:, None]), axis=1)
    )
    return (c_aa, c_ab, c_bb, s_aa, s_ab, s_bb, lse_a, lse_b, na_r, na_c, nb_r, nb_c, da_r, db_r)


@triton.jit
def _cc_epilogue_kernel(
    GRAM_PART,
    COL_PART,
    INST_PART,
    PARAMS,
    GRAM,
    COLSUM,
    OUT,
    n,
    K,
    parts,
    ACC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: the Gram and column sums from the partials (saved for the backward), the
    cluster loss and the (3,) output."""
    offs = tl.arange(0, BLOCK_K)
    sq = BLOCK_K * BLOCK_K
    tile = offs[:, None] * BLOCK_K + offs[None, :]
    for b in range(0, 3):
        g = tl.zeros([BLOCK_K, BLOCK_K], ACC)
        for p in range(0, parts):
            g += tl.load(GRAM_PART + (p * 3 + b) * sq + tile)
        tl.store(GRAM + b * sq + tile, g)
    col_a = tl.zeros([BLOCK_K], ACC)
    col_b = tl.zeros([BLOCK_K], ACC)
    for p in range(0, parts):
        col_a += tl.load(COL_PART + p * 2 * BLOCK_K + offs)
        col_b += tl.load(COL_PART + p * 2 * BLOCK_K + BLOCK_K + offs)
    tl.store(COLSUM + offs, col_a)
    tl.store(COLSUM + BLOCK_K + offs, col_b)
    tl.debug_barrier()  # the similarities read the Gram other threads wrote
    inv_tau_c = tl.load(PARAMS + 1).to(ACC)
    (c_aa, c_ab, c_bb, s_aa, s_ab, s_bb, lse_a, lse_b, na_r, na_c, nb_r, nb_c, da_r, db_r) = (
        _cluster_similarities(GRAM, K, inv_tau_c, ACC, BLOCK_K)
    )
    valid = offs < K
    pos, _ = _diagonal(c_ab * inv_tau_c, BLOCK_K)
    kf = tl.sum(valid.to(ACC), axis=0)
    contrast = tl.sum(tl.where(valid, lse_a + lse_b - 2.0 * pos, 0.0), axis=0) / (2.0 * kf)
    p_a = col_a / n
    p_b = col_b / n
    entropy = tl.sum(
        tl.where(
            valid, p_a * tl.log(tl.maximum(p_a, TINY)) + p_b * tl.log(tl.maximum(p_b, TINY)), 0.0
        ),
        axis=0,
    )
    cluster = contrast + entropy + 2.0 * tl.log(kf)
    instance = _sum(INST_PART, parts, ACC) / (2 * n)
    tl.store(OUT, tl.load(PARAMS + 2) * instance + tl.load(PARAMS + 3) * cluster)
    tl.store(OUT + 1, instance)
    tl.store(OUT + 2, cluster)


@triton.jit
def _cc_cluster_grad_kernel(
    GRAM,
    COLSUM,
    PARAMS,
    GRAD,
    M,
    DC,
    n,
    K,
    ACC: tl.constexpr,
    TINY: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program: M = dG + dG^T (blocks aa, ab, ba, bb) and dL/dcolsum (a, b) of the cluster
    loss, times its folded incoming gradient."""
    g_clu = tl.load(GRAD + 2).to(ACC) + tl.load(GRAD).to(ACC) * tl.load(PARAMS + 3)
    inv_tau_c = tl.load(PARAMS + 1).to(ACC)
    (c_aa, c_ab, c_bb, s_aa, s_ab, s_bb, lse_a, lse_b, na_r, na_c, nb_r, nb_c, da_r, db_r) = (
        _cluster_similarities(GRAM, K, inv_tau_c, ACC, BLOCK_K)
    )
    offs = tl.arange(0, BLOCK_K)
    valid = offs < K
    both = valid[:, None] & valid[None, :]
    eye = (offs[:, None] == offs[None, :]) & both
    kf = tl.sum(valid.to(ACC), axis=0)
    scale = g_clu * inv_tau_c / (2.0 * kf)
    # dL/dC = (P - [positive]) g / (2K tau), row by row of the 2K x 2K matrix
    a_aa = tl.where(both, tl.exp(s_aa - lse_a[:, None]), 0.0) * scale
    a_ab = (tl.where(both, tl.exp(s_ab - lse_a[:, None]), 0.0) - tl.where(eye, 1.0, 0.0)) * scale
    a_ba = (
        tl.where(both, tl.exp(tl.trans(s_ab) - lse_b[:, None]), 0.0) - tl.where(eye, 1.0, 0.0)
    ) * scale
    a_bb = tl.where(both, tl.exp(s_bb - lse_b[:, None]), 0.0) * scale
    b_aa = a_aa + tl.trans(a_aa)
    b_ab = a_ab + tl.trans(a_ba)
    b_bb = a_bb + tl.trans(a_bb)
    # through the norms: d n_k / d G_kk = 1 / (2 n_k) where G_kk > eps^2
    r_a = tl.sum(b_aa * c_aa, axis=1) + tl.sum(b_ab * c_ab, axis=1)
    r_b = tl.sum(b_ab * c_ab, axis=0) + tl.sum(b_bb * c_bb, axis=1)
    r_a = tl.where(da_r > _EPS * _EPS, r_a / (na_r * na_r), 0.0)
    r_b = tl.where(db_r > _EPS * _EPS, r_b / (nb_r * nb_r), 0.0)
    m_aa = b_aa / (na_r[:, None] * na_c[None, :]) - tl.where(eye, r_a[:, None], 0.0)
    m_ab = tl.where(both, b_ab / (na_r[:, None] * nb_c[None, :]), 0.0)
    m_bb = b_bb / (nb_r[:, None] * nb_c[None, :]) - tl.where(eye, r_b[:, None], 0.0)
    sq = BLOCK_K * BLOCK_K
    tile = offs[:, None] * BLOCK_K + offs[None, :]
    tl.store(M + tile, tl.where(both, m_aa, 0.0))
    tl.store(M + sq + tile, m_ab)
    tl.store(M + 2 * sq + tile, tl.trans(m_ab))
    tl.store(M + 3 * sq + tile, tl.where(both, m_bb, 0.0))
    # marginal entropy: d/dcolsum_k (p log max(p, tiny)) = (log max(p, tiny) + [p >= tiny]) / N
    for v in range(0, 2):
        p = tl.load(COLSUM + v * BLOCK_K + offs) / n
        dc = (tl.log(tl.maximum(p, TINY)) + tl.where(p >= TINY, 1.0, 0.0)) * (g_clu / n)
        tl.store(DC + v * BLOCK_K + offs, tl.where(valid, dc, 0.0))


@triton.jit
def _cc_grad_kernel(
    ZS,
    RS,
    NORMS,
    ROW_W,
    ROW_LOSS,
    PARAMS,
    GRAD,
    DZA,
    DZB,
    LA,
    LB,
    DLA,
    DLB,
    M,
    DC,
    n,
    D,
    K,
    stride_da,
    stride_db,
    stride_la,
    stride_lb,
    stride_dla,
    stride_dlb,
    FIXED_SHIFT: tl.constexpr,
    ACC: tl.constexpr,
    PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    CPREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row_lo = tl.program_id(0) * BLOCK_M
    g_inst = tl.load(GRAD + 1).to(ACC) + tl.load(GRAD).to(ACC) * tl.load(PARAMS + 2)
    _instance_grad(
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
        FIXED_SHIFT,
        ACC,
        PREC,
        UPCAST,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
    )
    offs_m = row_lo + tl.arange(0, BLOCK_M)
    cluster_grad_rows(
        LA,
        LB,
        DLA,
        DLB,
        M,
        DC,
        offs_m,
        offs_m < n,
        K,
        stride_la,
        stride_lb,
        stride_dla,
        stride_dlb,
        ACC,
        CPREC,
        BLOCK_K,
    )


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
    is four products). The backward is the fast path's."""
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


def _split(values: list[float]) -> list[float]:
    """Each float as (hi, lo) fp32 kernel arguments (`_param`): no host-to-device copy, which
    torch would synchronise (torch.tensor(..., device="cuda")), and fp64 precision kept."""
    out = []
    for v in values:
        hi = struct.unpack("f", struct.pack("f", v))[0]
        out += [hi, struct.unpack("f", struct.pack("f", v - hi))[0]]
    return out


def _check_instance(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    check_dtype(z_a, z_b)
    if z_a.dim() != 2 or z_a.shape != z_b.shape or z_a.dtype != z_b.dtype:
        raise ValueError(
            f"z_a and z_b must be (N, D) of one dtype, got {tuple(z_a.shape)} "
            f"{z_a.dtype} and {tuple(z_b.shape)} {z_b.dtype}"
        )
    feature_block(z_a.shape[1], "z")


# -- anchor --

_FWD_BLOCK_K = 32  # centre tiles of the forward (64 spilled 24 B on sm_90 at K = 100)
_BWD_BLOCK_K = 16  # and of the backward, whose (tile x F) products w^T h live per view


def _anchor_blocks(k: int, f: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_F, BLOCK_FULL): centre tiles (`student_t._blocks`, capped as above:
    the static report), F chunks of the distance dots, the full F of the dh rows."""
    block_k, block_f = _student_blocks(k, f)
    return (
        min(block_k, _BWD_BLOCK_K if backward else _FWD_BLOCK_K),
        block_f,
        feature_block(f, "h"),
    )


def _centre_consts(h: torch.Tensor, centers: torch.Tensor, acc: torch.dtype) -> dict:
    """The Student-t dots' precision: the operands' own dtype where h and the centres share it
    (bf16 tensor cores for bf16), else both in the accumulation dtype."""
    same = h.dtype == centers.dtype
    return dict(
        HPREC=dot_precision(h.dtype if same else acc),
        HUPCAST=upcast_dots(h.dtype) if same else False,
    )


@torch.library.custom_op("fastcluster_cl::anchor_objective_triton_fwd", mutates_args=())
def anchor_objective_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    h0: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    centers: torch.Tensor,
    temperature: float,
    alpha: float,
    weights: list[float],
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """[total, instance, cluster (DEC on q0), anchor] (4,) and the backward's state: (Zs, rs,
    norms, row weights, row losses, params, f, T, c_dec, lse (3, N), c_ab (2, N))."""
    (n, d), (k, f_dim) = z_a.shape, centers.shape
    acc = _acc(z_a, h0, centers)
    dev = z_a.device
    fwd, _ = instance_config(d, _scaled_dtype(z_a.dtype))
    block_m = fwd.block[0]
    block_k, block_f, _ = _anchor_blocks(k, f_dim)
    parts = triton.cdiv(n, block_m)
    slices = parts * (block_m // _SUB_M)
    k_pad = triton.cdiv(k, block_k) * block_k
    params = torch.empty(5, dtype=acc, device=dev)  # written by the row launch
    zs, rs, norms, row_w, row_loss = _instance_state(z_a, acc)
    q0 = torch.empty(n, k, dtype=acc, device=dev)  # temporary, not saved
    f_part = torch.empty(slices, k_pad, dtype=acc, device=dev)
    inst_part, anchor_part = (torch.empty(parts, dtype=acc, device=dev) for _ in range(2))
    lse = torch.empty(3, n, dtype=acc, device=dev)
    c_ab = torch.empty(2, n, dtype=acc, device=dev)
    f_sum = torch.empty(k, dtype=acc, device=dev)
    totals, c_dec = torch.empty(n, dtype=acc, device=dev), torch.empty(n, dtype=acc, device=dev)
    out = torch.empty(4, dtype=acc, device=dev)
    tiny = torch.finfo(acc).tiny
    with device_guard(z_a):
        _anchor_rows_kernel[(parts,)](
            z_a,
            z_b,
            zs,
            rs,
            norms,
            row_w,
            row_loss,
            params,
            inst_part,
            h0,
            h_a,
            h_b,
            centers,
            q0,
            f_part,
            anchor_part,
            lse,
            c_ab,
            n,
            d,
            k,
            f_dim,
            z_a.stride(0),
            z_b.stride(0),
            h0.stride(0),
            h_a.stride(0),
            h_b.stride(0),
            centers.stride(0),
            k_pad,
            *_split([1.0 / temperature, alpha, *weights]),
            TINY=tiny,
            SUB_M=_SUB_M,
            BLOCK_K=block_k,
            BLOCK_F=block_f,
            **_instance_consts(z_a, 1.0 / temperature, acc, fwd),
            **_centre_consts(h0, centers, acc),
            num_warps=fwd.num_warps,
            num_stages=fwd.num_stages,
        )
        _anchor_epilogue_kernel[(1,)](
            q0,
            f_part,
            inst_part,
            anchor_part,
            params,
            f_sum,
            totals,
            c_dec,
            out,
            n,
            k,
            parts,
            slices,
            k_pad,
            ACC=acc_dtype(acc),
            TINY=tiny,
            BLOCK_M=_ROWS,
            BLOCK_K=block_k,
        )
    return out, zs, rs, norms, row_w, row_loss, params, f_sum, totals, c_dec, lse, c_ab


@anchor_objective_forward.register_fake
def _(z_a, z_b, h0, h_a, h_b, centers, temperature, alpha, weights):
    n, k = z_a.shape[0], centers.shape[0]
    acc = _acc(z_a, h0, centers)
    vec = z_a.new_empty(n, dtype=acc)
    return (
        z_a.new_empty(4, dtype=acc),
        *_instance_state(z_a, acc),
        z_a.new_empty(5, dtype=acc),
        z_a.new_empty(k, dtype=acc),
        vec,
        torch.empty_like(vec),
        z_a.new_empty(3, n, dtype=acc),
        z_a.new_empty(2, n, dtype=acc),
    )


@torch.library.custom_op("fastcluster_cl::anchor_objective_triton_bwd", mutates_args=())
def anchor_objective_backward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    h0: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    centers: torch.Tensor,
    grad: torch.Tensor,
    zs: torch.Tensor,
    rs: torch.Tensor,
    norms: torch.Tensor,
    row_w: torch.Tensor,
    row_loss: torch.Tensor,
    params: torch.Tensor,
    f_sum: torch.Tensor,
    totals: torch.Tensor,
    c_dec: torch.Tensor,
    lse: torch.Tensor,
    c_ab: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz_a, dz_b, dh0, dh_a, dh_b, dcenters) from the gradient of the (4,) output."""
    (n, d), (k, f_dim) = z_a.shape, centers.shape
    acc = rs.dtype
    dev = z_a.device
    _, bwd = instance_config(d, zs.dtype)
    block_m = bwd.block[0]
    block_k, block_f, block_full = _anchor_blocks(k, f_dim, backward=True)
    parts = triton.cdiv(n, block_m)
    k_pad = triton.cdiv(k, block_k) * block_k
    dz_a, dz_b = torch.empty_like(z_a), torch.empty_like(z_b)
    dh0, dh_a, dh_b = torch.empty_like(h0), torch.empty_like(h_a), torch.empty_like(h_b)
    d_mu = torch.empty_like(centers)
    dmu_part = torch.empty(parts, k_pad, f_dim, dtype=acc, device=dev)
    with device_guard(z_a):
        _anchor_grad_kernel[(parts,)](
            zs,
            rs,
            norms,
            row_w,
            row_loss,
            params,
            grad.contiguous(),
            dz_a,
            dz_b,
            h0,
            h_a,
            h_b,
            centers,
            f_sum,
            totals,
            c_dec,
            lse,
            c_ab,
            dh0,
            dh_a,
            dh_b,
            dmu_part,
            n,
            d,
            k,
            f_dim,
            dz_a.stride(0),
            dz_b.stride(0),
            h0.stride(0),
            h_a.stride(0),
            h_b.stride(0),
            centers.stride(0),
            k_pad,
            FIXED_SHIFT=fixed_shift_safe(1.0 / temperature, acc),
            ACC=acc_dtype(acc),
            PREC=dot_precision(zs.dtype),
            UPCAST=upcast_dots(zs.dtype),
            **_centre_consts(h0, centers, acc),
            TINY=torch.finfo(acc).tiny,
            SUB_M=_SUB_M,
            BLOCK_K=block_k,
            BLOCK_F=block_f,
            BLOCK_FULL=block_full,
            **bwd.constexprs,
            num_warps=bwd.num_warps,
            num_stages=bwd.num_stages,
        )
        size = k * f_dim
        _sum_partials_kernel[(triton.cdiv(size, _REDUCE),)](
            dmu_part, d_mu, parts, size, k_pad * f_dim, ACC=acc_dtype(acc), BLOCK=_REDUCE
        )
    return dz_a, dz_b, dh0, dh_a, dh_b, d_mu


@anchor_objective_backward.register_fake
def _(
    z_a,
    z_b,
    h0,
    h_a,
    h_b,
    centers,
    grad,
    zs,
    rs,
    norms,
    row_w,
    row_loss,
    params,
    f_sum,
    totals,
    c_dec,
    lse,
    c_ab,
    temperature,
):
    return (
        torch.empty_like(z_a),
        torch.empty_like(z_b),
        torch.empty_like(h0),
        torch.empty_like(h_a),
        torch.empty_like(h_b),
        torch.empty_like(centers),
    )


# The forward's outputs after the first are state for the backward: they get no gradient, and
# their incoming gradients are not materialised (no zero fills).
register_pair(
    anchor_objective_forward,
    anchor_objective_backward,
    "triton",
    lambda inputs, outputs, grads: (*inputs[:6], grads[0], *outputs[1:], inputs[6]),
    wrt=range(6),
    materialize_grads=False,
)


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
    """The anchor method's objective (`reference.anchor_objective`) in one pass: (4,) =
    [total, instance, cluster, anchor], fp32 (fp64 for fp64 inputs)."""
    _check_instance(z_a, z_b)
    check_dtype(h0, h_a, h_b, centers)
    if not (
        h0.shape == h_a.shape == h_b.shape
        and h0.dtype == h_a.dtype == h_b.dtype
        and h0.dim() == 2
        and h0.shape[0] == z_a.shape[0]
        and centers.dim() == 2
        and centers.shape[1] == h0.shape[1]
    ):
        raise ValueError(
            f"h0, h_a, h_b must be (N, F) of one dtype with N = {z_a.shape[0]} and "
            f"centers (K, F), got {tuple(h0.shape)}, {tuple(h_a.shape)}, "
            f"{tuple(h_b.shape)} and {tuple(centers.shape)}"
        )
    _anchor_blocks(*centers.shape)
    return anchor_objective_forward(
        z_a.contiguous(),
        z_b.contiguous(),
        h0.contiguous(),
        h_a.contiguous(),
        h_b.contiguous(),
        centers.contiguous(),
        float(temperature),
        float(alpha),
        [float(w) for w in weights],
    )[0]


def _float64_all_or_none(*tensors: torch.Tensor) -> bool:
    return len({t.dtype == torch.float64 for t in tensors}) == 1


def anchor_objective_fits(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    h0: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    centers: torch.Tensor,
) -> bool:
    """Whether the one-pass kernels take these inputs (see the module's limits)."""
    return (
        z_a.shape[1] <= MAX_FEATURES
        and h0.shape[1] <= MAX_FEATURES
        and centers.shape[0] <= MAX_CENTRES
        and _float64_all_or_none(z_a, h0, centers)
    )


# -- Contrastive Clustering --


def _cc_block_k(k: int) -> int:
    if k > _CC_MAX_CLUSTERS:
        raise ValueError(
            f"backend='triton' fuses the cluster contrast for at most "
            f"{_CC_MAX_CLUSTERS} clusters, got K = {k}; use backend='chunked'"
        )
    return max(16, triton.next_power_of_2(k))


@torch.library.custom_op("fastcluster_cl::cc_objective_triton_fwd", mutates_args=())
def cc_objective_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    instance_temperature: float,
    cluster_temperature: float,
    weights: list[float],
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """[total, instance, cluster] (3,) and the backward's state: (Zs, rs, norms, row weights,
    row losses, params, the Gram blocks (3, BK, BK), the column sums (2, BK))."""
    (n, d), k = z_a.shape, logits_a.shape[1]
    acc = _acc(z_a, logits_a)
    dev = z_a.device
    fwd, _ = instance_config(d, _scaled_dtype(z_a.dtype))
    block_k = _cc_block_k(k)
    parts = triton.cdiv(n, fwd.block[0])
    params = torch.empty(5, dtype=acc, device=dev)  # written by the row launch
    zs, rs, norms, row_w, row_loss = _instance_state(z_a, acc)
    inst_part = torch.empty(parts, dtype=acc, device=dev)
    gram_part = torch.empty(parts, 3, block_k, block_k, dtype=acc, device=dev)
    col_part = torch.empty(parts, 2, block_k, dtype=acc, device=dev)
    gram = torch.empty(3, block_k, block_k, dtype=acc, device=dev)
    colsum = torch.empty(2, block_k, dtype=acc, device=dev)
    out = torch.empty(3, dtype=acc, device=dev)
    tiny = torch.finfo(acc).tiny
    with device_guard(z_a):
        _cc_rows_kernel[(parts,)](
            z_a,
            z_b,
            zs,
            rs,
            norms,
            row_w,
            row_loss,
            params,
            inst_part,
            logits_a,
            logits_b,
            gram_part,
            col_part,
            n,
            d,
            k,
            z_a.stride(0),
            z_b.stride(0),
            logits_a.stride(0),
            logits_b.stride(0),
            *_split([1.0 / instance_temperature, 1.0 / cluster_temperature, *weights]),
            CPREC=dot_precision(acc),
            TINY=tiny,
            BLOCK_K=block_k,
            **_instance_consts(z_a, 1.0 / instance_temperature, acc, fwd),
            num_warps=fwd.num_warps,
            num_stages=fwd.num_stages,
        )
        _cc_epilogue_kernel[(1,)](
            gram_part,
            col_part,
            inst_part,
            params,
            gram,
            colsum,
            out,
            n,
            k,
            parts,
            ACC=acc_dtype(acc),
            TINY=tiny,
            BLOCK_K=block_k,
            num_warps=_SMALL_WARPS,
        )
    return out, zs, rs, norms, row_w, row_loss, params, gram, colsum


@cc_objective_forward.register_fake
def _(z_a, z_b, logits_a, logits_b, instance_temperature, cluster_temperature, weights):
    block_k, acc = _cc_block_k(logits_a.shape[1]), _acc(z_a, logits_a)
    return (
        z_a.new_empty(3, dtype=acc),
        *_instance_state(z_a, acc),
        z_a.new_empty(5, dtype=acc),
        z_a.new_empty(3, block_k, block_k, dtype=acc),
        z_a.new_empty(2, block_k, dtype=acc),
    )


@torch.library.custom_op("fastcluster_cl::cc_objective_triton_bwd", mutates_args=())
def cc_objective_backward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    grad: torch.Tensor,
    zs: torch.Tensor,
    rs: torch.Tensor,
    norms: torch.Tensor,
    row_w: torch.Tensor,
    row_loss: torch.Tensor,
    params: torch.Tensor,
    gram: torch.Tensor,
    colsum: torch.Tensor,
    instance_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz_a, dz_b, dlogits_a, dlogits_b) from the gradient of the (3,) output."""
    (n, d), k = z_a.shape, logits_a.shape[1]
    acc = rs.dtype
    _, bwd = instance_config(d, zs.dtype)
    block_k = _cc_block_k(k)
    dz_a, dz_b = torch.empty_like(z_a), torch.empty_like(z_b)
    dl_a, dl_b = torch.empty_like(logits_a), torch.empty_like(logits_b)
    m = torch.empty(4, block_k, block_k, dtype=acc, device=z_a.device)
    dc = torch.empty(2, block_k, dtype=acc, device=z_a.device)
    grad = grad.contiguous()
    with device_guard(z_a):
        _cc_cluster_grad_kernel[(1,)](
            gram,
            colsum,
            params,
            grad,
            m,
            dc,
            n,
            k,
            ACC=acc_dtype(acc),
            TINY=torch.finfo(acc).tiny,
            BLOCK_K=block_k,
            num_warps=_SMALL_WARPS,
        )
        _cc_grad_kernel[(triton.cdiv(n, bwd.block[0]),)](
            zs,
            rs,
            norms,
            row_w,
            row_loss,
            params,
            grad,
            dz_a,
            dz_b,
            logits_a,
            logits_b,
            dl_a,
            dl_b,
            m,
            dc,
            n,
            d,
            k,
            dz_a.stride(0),
            dz_b.stride(0),
            logits_a.stride(0),
            logits_b.stride(0),
            dl_a.stride(0),
            dl_b.stride(0),
            FIXED_SHIFT=fixed_shift_safe(1.0 / instance_temperature, acc),
            ACC=acc_dtype(acc),
            PREC=dot_precision(zs.dtype),
            UPCAST=upcast_dots(zs.dtype),
            CPREC=dot_precision(acc),
            BLOCK_K=block_k,
            **bwd.constexprs,
            num_warps=bwd.num_warps,
            num_stages=bwd.num_stages,
        )
    return dz_a, dz_b, dl_a, dl_b


@cc_objective_backward.register_fake
def _(
    z_a,
    z_b,
    logits_a,
    logits_b,
    grad,
    zs,
    rs,
    norms,
    row_w,
    row_loss,
    params,
    gram,
    colsum,
    instance_temperature,
):
    return (
        torch.empty_like(z_a),
        torch.empty_like(z_b),
        torch.empty_like(logits_a),
        torch.empty_like(logits_b),
    )


register_pair(
    cc_objective_forward,
    cc_objective_backward,
    "triton",
    lambda inputs, outputs, grads: (*inputs[:4], grads[0], *outputs[1:], inputs[4]),
    wrt=range(4),
    materialize_grads=False,
)


def cc_objective_fits(
    z_a: torch.Tensor, z_b: torch.Tensor, logits_a: torch.Tensor, logits_b: torch.Tensor
) -> bool:
    """Whether the one-pass kernels take these inputs (see the module's limits)."""
    return (
        z_a.shape[1] <= MAX_FEATURES
        and logits_a.shape[1] <= _CC_MAX_CLUSTERS
        and _float64_all_or_none(z_a, logits_a)
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
    """Contrastive Clustering's objective (`reference.cc_objective`) in one pass: (3,) =
    [total, instance, cluster], fp32 (fp64 for fp64 inputs)."""
    _check_instance(z_a, z_b)
    check_dtype(logits_a, logits_b)
    if not (
        logits_a.dim() == 2
        and logits_a.shape == logits_b.shape
        and logits_a.dtype == logits_b.dtype
        and logits_a.shape[0] == z_a.shape[0]
    ):
        raise ValueError(
            f"logits_a and logits_b must be (N, K) of one dtype with N = "
            f"{z_a.shape[0]}, got {tuple(logits_a.shape)} and "
            f"{tuple(logits_b.shape)}"
        )
    _cc_block_k(logits_a.shape[1])
    return cc_objective_forward(
        z_a.contiguous(),
        z_b.contiguous(),
        logits_a.contiguous(),
        logits_b.contiguous(),
        float(instance_temperature),
        float(cluster_temperature),
        [float(w) for w in weights],
    )[0]
