"""The anchor method's whole objective in one pass (`reference.anchor_objective`): the
instance NT-Xent, the Student-t assignments of three views, DEC and the anchor terms, in two
launches forward and two backward (the package docstring has the layout)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcluster_cl.backends.autograd.pairs import register_pair
from fastcluster_cl.backends.numerics import fixed_shift_safe

from .._common import (
    MAX_FEATURES,
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
from ..kl import _dec_row_totals, _dec_weights, _safe_log, _xlogx
from ..nt_xent import (
    _scaled_dtype,
)
from ..student_t import MAX_CENTERS, _distances
from ..student_t import _blocks as _student_blocks
from .instance import (
    _acc,
    _check_instance,
    _float64_all_or_none,
    _instance_consts,
    _instance_grad,
    _instance_rows,
    _instance_state,
    _store_params,
    _sum,
    instance_config,
    store_largest_loss,
)

_ROWS = 32  # rows of the one-program epilogue's row loop
_SUB_M = 16  # rows per slice of the assignment side of the row launches
_REDUCE = 256  # elements per program of the partial sums' reduction


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
    """(d2, logit) of one center tile: logit = -(alpha+1)/2 log(1 + d2/alpha), -inf on padding."""
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
        False,
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
    """The center tile [k0, k0 + BLOCK_K) of the three views: (offs_k, mask_k, d2_0, logit_0,
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
    m_new = tl.maximum(m, tl.max(logit, axis=1))  # finite: each tile holds a center
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
    the center tiles, pass 2 q, the anchor terms, q0 and its column sums (F_PART row `part`).
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
        float_param(t_hi, t_lo, ACC),
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
    alpha = float_param(a_hi, a_lo, ACC)
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
        float_param(t_hi, t_lo, ACC),
        alpha,
        float_param(w0_hi, w0_lo, ACC),
        float_param(w1_hi, w1_lo, ACC),
        float_param(w2_hi, w2_lo, ACC),
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
    store_largest_loss(PARAMS, INST_PART, parts)
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
    WEIGHTS,
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
    BLOCK_FH: tl.constexpr,
):
    """One view's dh of rows [row_lo, row_lo + SUB_M) (VIEW 0: h0, DEC's gradient g; 1, 2:
    h_a, h_b, the anchor's) and its part of the program's partial dmu (stored by view 0 of
    slice 0, added by the others). With w = -G (alpha + 1) / (alpha + d2) (G = dL/dlogit, 0 on
    padding): dh = (sum_k w) h - w mu and dmu = (sum_rows w) mu - w^T h. First every center
    tile's w (the distances over all F) into the program's rows of WEIGHTS, then the F-wide
    terms in chunks of BLOCK_FH features: no (rows x F) or (tile x F) term is held whole (at
    F = 512 they spilled)."""
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
    w_rows = WEIGHTS + (pid * SUB_M + tl.arange(0, SUB_M))[:, None] * k_pad
    sw = tl.zeros([SUB_M], ACC)
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
        w = tl.where(tile, -grad * (alpha + 1.0) / (alpha + d), 0.0)
        sw += tl.sum(w, axis=1)
        tl.store(w_rows + offs_k[None, :], w)
    tl.debug_barrier()  # the tiles' w, stored in one layout, are read in another
    for f0 in range(0, F, BLOCK_FH):
        offs_f = f0 + tl.arange(0, BLOCK_FH)
        mask_f = offs_f < F
        rows = mask_m[:, None] & mask_f[None, :]
        h = tl.load(HV + offs_m[:, None] * stride_v + offs_f[None, :], mask=rows, other=0.0).to(ACC)
        wmu = tl.zeros([SUB_M, BLOCK_FH], ACC)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            centers = (offs_k < K)[:, None] & mask_f[None, :]
            w = tl.load(w_rows + offs_k[None, :])
            mu = tl.load(
                MU + offs_k[:, None] * stride_mu + offs_f[None, :], mask=centers, other=0.0
            ).to(ACC)
            wmu += dot(w, mu, ACC, HPREC, False)
            dmu = tl.sum(w, axis=0)[:, None] * mu - dot(tl.trans(w), h, ACC, HPREC, False)
            ptrs = DMU_PART + (pid * k_pad + offs_k)[:, None] * F + offs_f[None, :]
            dmu += tl.load(ptrs, mask=centers & (slice_index + VIEW > 0), other=0.0)
            tl.store(ptrs, dmu, mask=centers)
        tl.store(
            DHV + offs_m[:, None] * stride_v + offs_f[None, :],
            round_to(sw[:, None] * h - wmu, DHV.dtype.element_ty),
            mask=rows,
        )


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
    WEIGHTS,
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
    BLOCK_FH: tl.constexpr,
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
    # the slices and views add to the partial dmu and reuse WEIGHTS in turn: a barrier after each
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
            WEIGHTS,
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
            BLOCK_FH,
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
            WEIGHTS,
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
            BLOCK_FH,
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
            WEIGHTS,
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
            BLOCK_FH,
        )
        tl.debug_barrier()


# -- anchor --

_FWD_BLOCK_K = 32  # center tiles of the forward (64 spilled 24 B on sm_90 at K = 100)
_BWD_BLOCK_K = 16  # and of the backward, whose (tile x BLOCK_FH) products w^T h live per view


# Features per chunk of the backward's dh rows and dmu tiles (sm_90: whole 512-feature terms
# spilled 1408 B, chunks of 128 32 B; 64 is the widest without spills).
_BWD_BLOCK_FH = 64


def _anchor_blocks(k: int, f: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_F, BLOCK_FH): center tiles (`student_t._blocks`, capped as above: the
    static report), F chunks of the distance dots, F chunks of the backward's dh and dmu."""
    block_k, block_f = _student_blocks(k, f)
    return (
        min(block_k, _BWD_BLOCK_K if backward else _FWD_BLOCK_K),
        block_f,
        min(feature_block(f, "h"), _BWD_BLOCK_FH),
    )


def _center_consts(h: torch.Tensor, centers: torch.Tensor, acc: torch.dtype) -> dict:
    """The Student-t dots' precision: the operands' own dtype where h and the centers share it
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
    params = torch.empty(6, dtype=acc, device=dev)  # written by the row and epilogue launches
    zs, rs, norms, row_w, row_loss = _instance_state(z_a, acc)
    q0 = torch.empty(n, k, dtype=acc, device=dev)  # temporary, not saved
    f_part = torch.empty(slices, k_pad, dtype=acc, device=dev)
    inst_part = torch.empty(2 * parts, dtype=acc, device=dev)  # sums, then maxima
    anchor_part = torch.empty(parts, dtype=acc, device=dev)
    lse = torch.empty(3, n, dtype=acc, device=dev)
    c_ab = torch.empty(2, n, dtype=acc, device=dev)
    f_sum = torch.empty(k, dtype=acc, device=dev)
    totals, c_dec = torch.empty(n, dtype=acc, device=dev), torch.empty(n, dtype=acc, device=dev)
    out = torch.empty(4, dtype=acc, device=dev)
    tiny = torch.finfo(acc).tiny
    with device_guard(z_a):
        _anchor_rows_kernel[(parts,)](
            ZA=z_a,
            ZB=z_b,
            ZS=zs,
            RS=rs,
            NORMS=norms,
            ROW_W=row_w,
            ROW_LOSS=row_loss,
            PARAMS=params,
            INST_PART=inst_part,
            H0=h0,
            HA=h_a,
            HB=h_b,
            MU=centers,
            Q0=q0,
            F_PART=f_part,
            ANCHOR_PART=anchor_part,
            LSE=lse,
            CAB=c_ab,
            n=n,
            D=d,
            K=k,
            F=f_dim,
            stride_a=z_a.stride(0),
            stride_b=z_b.stride(0),
            stride_h0=h0.stride(0),
            stride_ha=h_a.stride(0),
            stride_hb=h_b.stride(0),
            stride_mu=centers.stride(0),
            k_pad=k_pad,
            **split_floats(
                t=1.0 / temperature, a=alpha, w0=weights[0], w1=weights[1], w2=weights[2]
            ),
            TINY=tiny,
            SUB_M=_SUB_M,
            BLOCK_K=block_k,
            BLOCK_F=block_f,
            **_instance_consts(z_a, 1.0 / temperature, acc, fwd),
            **_center_consts(h0, centers, acc),
            num_warps=fwd.num_warps,
            num_stages=fwd.num_stages,
        )
        _anchor_epilogue_kernel[(1,)](
            Q0=q0,
            F_PART=f_part,
            INST_PART=inst_part,
            ANCHOR_PART=anchor_part,
            PARAMS=params,
            FSUM=f_sum,
            TOTALS=totals,
            CDEC=c_dec,
            OUT=out,
            n=n,
            K=k,
            parts=parts,
            slices=slices,
            k_pad=k_pad,
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
        z_a.new_empty(6, dtype=acc),
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
    block_k, block_f, block_fh = _anchor_blocks(k, f_dim, backward=True)
    parts = triton.cdiv(n, block_m)
    k_pad = triton.cdiv(k, block_k) * block_k
    weights = torch.empty(parts, _SUB_M, k_pad, dtype=acc, device=dev)
    dz_a, dz_b = torch.empty_like(z_a), torch.empty_like(z_b)
    dh0, dh_a, dh_b = torch.empty_like(h0), torch.empty_like(h_a), torch.empty_like(h_b)
    d_mu = torch.empty_like(centers)
    dmu_part = torch.empty(parts, k_pad, f_dim, dtype=acc, device=dev)
    with device_guard(z_a):
        _anchor_grad_kernel[(parts,)](
            ZS=zs,
            RS=rs,
            NORMS=norms,
            ROW_W=row_w,
            ROW_LOSS=row_loss,
            PARAMS=params,
            GRAD=grad.contiguous(),
            DZA=dz_a,
            DZB=dz_b,
            H0=h0,
            HA=h_a,
            HB=h_b,
            MU=centers,
            FSUM=f_sum,
            TOTALS=totals,
            CDEC=c_dec,
            LSE=lse,
            CAB=c_ab,
            DH0=dh0,
            DHA=dh_a,
            DHB=dh_b,
            DMU_PART=dmu_part,
            WEIGHTS=weights,
            n=n,
            D=d,
            K=k,
            F=f_dim,
            stride_da=dz_a.stride(0),
            stride_db=dz_b.stride(0),
            stride_h0=h0.stride(0),
            stride_ha=h_a.stride(0),
            stride_hb=h_b.stride(0),
            stride_mu=centers.stride(0),
            k_pad=k_pad,
            FIXED_SHIFT=fixed_shift_safe(1.0 / temperature, acc),
            ACC=acc_dtype(acc),
            PREC=dot_precision(zs.dtype),
            UPCAST=upcast_dots(zs.dtype),
            **_center_consts(h0, centers, acc),
            TINY=torch.finfo(acc).tiny,
            SUB_M=_SUB_M,
            BLOCK_K=block_k,
            BLOCK_F=block_f,
            BLOCK_FH=block_fh,
            **bwd.constexprs,
            num_warps=bwd.num_warps,
            num_stages=bwd.num_stages,
        )
        size = k * f_dim
        _sum_partials_kernel[(triton.cdiv(size, _REDUCE),)](
            PART=dmu_part,
            OUT=d_mu,
            parts=parts,
            size=size,
            part_stride=k_pad * f_dim,
            ACC=acc_dtype(acc),
            BLOCK=_REDUCE,
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
        and centers.shape[0] <= MAX_CENTERS
        and _float64_all_or_none(z_a, h0, centers)
    )
