"""Contrastive Clustering's whole objective in one pass (`reference.cc_objective`): the
instance NT-Xent, both views' softmax assignments, the cluster contrast over their Gram and
the marginal entropies (the package docstring has the layout)."""

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
    float_param,
    split_floats,
    upcast_dots,
)
from ..cc_cluster import MAX_CLUSTERS as _CC_MAX_CLUSTERS
from ..cc_cluster import _load_square, cluster_grad_rows, softmax_rows
from ..nt_xent import (
    _scaled_dtype,
)
from .instance import (
    _EPS,
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

_SMALL_WARPS = 8  # the one-program cc launches (no spills at K = 64 on sm_90a; 4 spilled)
_SUB_M = tl.constexpr(16)  # rows per slice of the softmax rows and Gram (a dot's K: >= 16)


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
    # the block's partial Gram of [P_a P_b] and column sums, _SUB_M rows of softmax at a time
    # (registers independent of BLOCK_M: the whole block's rows at K = 20 spilled)
    g_aa = tl.zeros([BLOCK_K, BLOCK_K], ACC)
    g_ab = tl.zeros([BLOCK_K, BLOCK_K], ACC)
    g_bb = tl.zeros([BLOCK_K, BLOCK_K], ACC)
    c_a = tl.zeros([BLOCK_K], ACC)
    c_b = tl.zeros([BLOCK_K], ACC)
    for start in range(0, BLOCK_M, _SUB_M):
        rows = pid * BLOCK_M + start + tl.arange(0, _SUB_M)
        q_a = softmax_rows(LA, stride_la, rows, rows < n, K, ACC, BLOCK_K)
        q_b = softmax_rows(LB, stride_lb, rows, rows < n, K, ACC, BLOCK_K)
        g_aa += dot(tl.trans(q_a), q_a, ACC, CPREC, False)
        g_ab += dot(tl.trans(q_a), q_b, ACC, CPREC, False)
        g_bb += dot(tl.trans(q_b), q_b, ACC, CPREC, False)
        c_a += tl.sum(q_a, axis=0)
        c_b += tl.sum(q_b, axis=0)
    offs_k = tl.arange(0, BLOCK_K)
    sq = BLOCK_K * BLOCK_K
    tile = offs_k[:, None] * BLOCK_K + offs_k[None, :]
    base = GRAM_PART + pid * 3 * sq
    tl.store(base + tile, g_aa)
    tl.store(base + sq + tile, g_ab)
    tl.store(base + 2 * sq + tile, g_bb)
    tl.store(COL_PART + pid * 2 * BLOCK_K + offs_k, c_a)
    tl.store(COL_PART + pid * 2 * BLOCK_K + BLOCK_K + offs_k, c_b)
    # last: nothing of it is live across the loops
    _store_params(
        PARAMS,
        pid,
        float_param(t_hi, t_lo, ACC),
        float_param(c_hi, c_lo, ACC),
        float_param(w0_hi, w0_lo, ACC),
        float_param(w1_hi, w1_lo, ACC),
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
    store_largest_loss(PARAMS, INST_PART, parts)
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
    for start in range(0, BLOCK_M, _SUB_M):  # the logit rows in slices, as the forward
        rows = row_lo + start + tl.arange(0, _SUB_M)
        cluster_grad_rows(
            LA,
            LB,
            DLA,
            DLB,
            M,
            DC,
            rows,
            rows < n,
            K,
            stride_la,
            stride_lb,
            stride_dla,
            stride_dlb,
            ACC,
            CPREC,
            BLOCK_K,
        )


# -- Contrastive Clustering --


def _cc_block_k(k: int) -> int:
    if k > _CC_MAX_CLUSTERS:
        raise ValueError(
            f"backend='triton' fuses the cc objective for at most {_CC_MAX_CLUSTERS} "
            f"clusters, got K = {k}; fc.cc_objective runs the separate ops beyond"
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
    params = torch.empty(6, dtype=acc, device=dev)  # written by the row and epilogue launches
    zs, rs, norms, row_w, row_loss = _instance_state(z_a, acc)
    inst_part = torch.empty(2 * parts, dtype=acc, device=dev)
    gram_part = torch.empty(parts, 3, block_k, block_k, dtype=acc, device=dev)
    col_part = torch.empty(parts, 2, block_k, dtype=acc, device=dev)
    gram = torch.empty(3, block_k, block_k, dtype=acc, device=dev)
    colsum = torch.empty(2, block_k, dtype=acc, device=dev)
    out = torch.empty(3, dtype=acc, device=dev)
    tiny = torch.finfo(acc).tiny
    with device_guard(z_a):
        _cc_rows_kernel[(parts,)](
            ZA=z_a,
            ZB=z_b,
            ZS=zs,
            RS=rs,
            NORMS=norms,
            ROW_W=row_w,
            ROW_LOSS=row_loss,
            PARAMS=params,
            INST_PART=inst_part,
            LA=logits_a,
            LB=logits_b,
            GRAM_PART=gram_part,
            COL_PART=col_part,
            n=n,
            D=d,
            K=k,
            stride_a=z_a.stride(0),
            stride_b=z_b.stride(0),
            stride_la=logits_a.stride(0),
            stride_lb=logits_b.stride(0),
            **split_floats(
                t=1.0 / instance_temperature,
                c=1.0 / cluster_temperature,
                w0=weights[0],
                w1=weights[1],
            ),
            CPREC=dot_precision(acc),
            TINY=tiny,
            BLOCK_K=block_k,
            **_instance_consts(z_a, 1.0 / instance_temperature, acc, fwd),
            num_warps=fwd.num_warps,
            num_stages=fwd.num_stages,
        )
        _cc_epilogue_kernel[(1,)](
            GRAM_PART=gram_part,
            COL_PART=col_part,
            INST_PART=inst_part,
            PARAMS=params,
            GRAM=gram,
            COLSUM=colsum,
            OUT=out,
            n=n,
            K=k,
            parts=parts,
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
        z_a.new_empty(6, dtype=acc),
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
            GRAM=gram,
            COLSUM=colsum,
            PARAMS=params,
            GRAD=grad,
            M=m,
            DC=dc,
            n=n,
            K=k,
            ACC=acc_dtype(acc),
            TINY=torch.finfo(acc).tiny,
            BLOCK_K=block_k,
            num_warps=_SMALL_WARPS,
        )
        _cc_grad_kernel[(triton.cdiv(n, bwd.block[0]),)](
            ZS=zs,
            RS=rs,
            NORMS=norms,
            ROW_W=row_w,
            ROW_LOSS=row_loss,
            PARAMS=params,
            GRAD=grad,
            DZA=dz_a,
            DZB=dz_b,
            LA=logits_a,
            LB=logits_b,
            DLA=dl_a,
            DLB=dl_b,
            M=m,
            DC=dc,
            n=n,
            D=d,
            K=k,
            stride_da=dz_a.stride(0),
            stride_db=dz_b.stride(0),
            stride_la=logits_a.stride(0),
            stride_lb=logits_b.stride(0),
            stride_dla=dl_a.stride(0),
            stride_dlb=dl_b.stride(0),
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
