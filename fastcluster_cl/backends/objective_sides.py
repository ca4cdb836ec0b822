"""The clustering sides of the chunked backend's whole objectives, each one custom op pair with a
closed-form backward, and `Objective`: a whole objective (the chunked NT-Xent's fast path and a
side) as one autograd node. At the batches CPU users train at, a step of many small autograd
operations costs more than their arithmetic (docs/results.md); here each side is a few matrix
products and (N, K)-sized passes each way. The ops run while torch.compile traces; eager calls
run their plain functions (no op dispatch).

Anchor side (the anchor method's three Student-t assignments, DEC and the anchor terms): the
three views' distances are one float64 product (||h||^2 + ||mu||^2 - 2 h mu^T, as
`chunked.student_t`). With logits l = -(alpha + 1) / 2 log1p(d2 / alpha) and q = softmax(l) per
row, a term -(1/N) sum_ik t_ik log q_ik with a fixed target t has dL/dl = (q sum_k t - t) / N:
DEC's target is p = dec_target(q0), the anchor terms' are q0 (for q_a and q_b), each zero where
q underflows below the smallest normal of h's accumulation dtype (the reference's safe_log
clamps the log there and passes no gradient); then dL/dd2 =
dL/dl * -(alpha + 1) / 2 / (alpha + d2) and, with G = dL/dd2 (rows of h, columns of centers),

    dL/dh = 2 (rowsum(G) h - G mu),    dL/dmu = 2 (colsum(G) mu - G^T h).

CC side (Contrastive Clustering's cluster loss): both views' softmax in one pass, NT-Xent over
the 2K normalised columns as one 2K x 2K matrix (used while 2K fits one chunked tile), with
dL/dS = (P - [positive]) / 2K, dxn = (G + G^T) xn / tau, then the normalisation's, the
entropy terms' (log P_k + 1) / N and the softmax's backward. On CUDA its two fp32 products run
on the tensor cores as bf16 parts where they are large (`numerics.fp32_product`: fp32's
accuracy).
"""

from __future__ import annotations

import math

import torch

from .autograd import nt_xent as nt_xent_autograd
from .autograd.pairs import guard, refuse_double_backward
from .numerics import (
    NORM_EPS,
    accumulation_dtype,
    fp32_gram,
    fp32_product,
    outside_autocast,
    safe_log,
)
from .reference import dec_target

_F64 = torch.float64


def _features(h0: torch.Tensor, h_a: torch.Tensor, h_b: torch.Tensor) -> torch.Tensor:
    """[h0; h_a; h_b] as one (3N, F) float64 matrix."""
    out = h0.new_empty((3 * h0.shape[0], h0.shape[1]), dtype=_F64)
    for view, h in zip(out.split(h0.shape[0]), (h0, h_a, h_b)):
        view.copy_(h)
    return out


def _anchor_side_forward(
    h0: torch.Tensor, h_a: torch.Tensor, h_b: torch.Tensor, centers: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """([dec_loss(q0), anchor_loss(q0, q_a, q_b)] in float64, and for the backward q (3N, K),
    DEC's target p (N, K), 1 / (alpha + d2) (3N, K), 0 where the distance was clamped, and the
    float64 features [h0; h_a; h_b])."""
    h, mu = _features(h0, h_a, h_b), centers.to(_F64)
    norms = torch.linalg.vector_norm(h, dim=1, keepdim=True).square_()
    raw = torch.addmm(norms + torch.linalg.vector_norm(mu, dim=1).square_(), h, mu.T, alpha=-2.0)
    d2 = raw.clamp_min(0.0)
    log_q = torch.log_softmax(torch.log1p(d2 / alpha).mul_(-(alpha + 1) / 2), dim=1)
    q = log_q.exp()
    n = h0.shape[0]
    q0 = q[:n]
    p = dec_target(q0)
    # the reference's safe_log: log q clamped where q falls below the smallest normal of h's
    # accumulation dtype (such an entry then gets no gradient: the backward masks its target)
    safe = log_q.clamp_min(math.log(torch.finfo(accumulation_dtype(h0.dtype)).tiny))
    dec = (torch.special.xlogy(p, p) - p * safe[:n]).sum() / n
    anchor = (2 * torch.special.xlogy(q0, q0) - q0 * (safe[n : 2 * n] + safe[2 * n :])).sum() / n
    inv = torch.where(raw >= 0, d2.add_(alpha).reciprocal_(), 0.0)
    return torch.stack([dec, anchor]), q, p, inv, h


anchor_side_forward = torch.library.custom_op(
    "fastcluster_cl::anchor_side_fwd", _anchor_side_forward, mutates_args=()
)


@anchor_side_forward.register_fake
def _(h0, h_a, h_b, centers, alpha):
    rows, k = 3 * h0.shape[0], centers.shape[0]
    return (
        h0.new_empty(2, dtype=_F64),
        h0.new_empty((rows, k), dtype=_F64),
        h0.new_empty((h0.shape[0], k), dtype=_F64),
        h0.new_empty((rows, k), dtype=_F64),
        h0.new_empty((rows, h0.shape[1]), dtype=_F64),
    )


def _anchor_side_backward(
    h0: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    centers: torch.Tensor,
    alpha: float,
    grad: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    inv: torch.Tensor,
    h: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh0, dh_a, dh_b, dcenters) from the incoming gradient of [dec, anchor] (module
    docstring); h is the features' float64 stack."""
    n = h0.shape[0]
    g_dec, g_anchor = (grad.to(_F64) / n).unbind()
    kept = q >= torch.finfo(accumulation_dtype(h0.dtype)).tiny  # where safe_log is not clamped
    q0 = q[:n]
    # dL/dl = q sum_k t - t per row with the target t zero where the log was clamped
    target = torch.cat([p * kept[:n], (q0 * kept[n:].view(2, n, -1)).view(2 * n, -1)])
    dl = q * target.sum(1, keepdim=True) - target
    dl[:n] *= g_dec
    dl[n:] *= g_anchor
    gd = dl.mul_(inv).mul_(-(alpha + 1))  # 2 dL/dd2
    mu = centers.to(_F64)
    dh = torch.addmm(h * gd.sum(1, keepdim=True), gd, mu, alpha=-1.0)
    dmu = torch.addmm(mu * gd.sum(0)[:, None], gd.T, h, alpha=-1.0).to(centers.dtype)
    return (*(view.to(h0.dtype, copy=True) for view in dh.split(n)), dmu)


anchor_side_backward = torch.library.custom_op(
    "fastcluster_cl::anchor_side_bwd", _anchor_side_backward, mutates_args=()
)


@anchor_side_backward.register_fake
def _(h0, h_a, h_b, centers, alpha, grad, q, p, inv, h):
    return (*(torch.empty_like(h0) for _ in range(3)), torch.empty_like(centers))


def _cc_similarities(
    q: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log P: the log-softmax of the 2K columns' similarities over k != j (2K, 2K), the
    normalised columns (N, 2K), their clamped norms (2K,)). The column entries are in [0, 1], so
    the accumulation dtype holds their squares (where one underflows, the norm is below the
    clamp)."""
    norm = torch.linalg.vector_norm(q, dim=0).clamp_min_(NORM_EPS)
    xn = q / norm
    s = fp32_gram(xn).mul_(1.0 / temperature).fill_diagonal_(float("-inf"))
    return torch.log_softmax(s, 1), xn, norm


def cc_assignments(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Q = [softmax(c_a), softmax(c_b)] (N x 2K) in the accumulation dtype: one softmax over
    both views' logits side by side."""
    n, k = logits_a.shape
    acc = accumulation_dtype(logits_a.dtype)
    return torch.cat([logits_a, logits_b], 1).view(n, 2, k).softmax(-1, dtype=acc).view(n, 2 * k)


def _cc_side_forward(
    logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cc_cluster_loss in the accumulation dtype, and for the backward q = [q_a, q_b] (N, 2K),
    the normalised columns (N, 2K), their norms (2K,) and P (2K, 2K), 0 on the diagonal)."""
    k = logits_a.shape[1]
    q = cc_assignments(logits_a, logits_b)
    log_p, xn, norm = _cc_similarities(q, temperature)
    positives = log_p.roll(k, 1).trace()  # sum_j log P_(j, j +- K)
    shares = q.mean(0)
    entropy = torch.special.xlogy(shares, shares).sum()
    value = torch.add(entropy, positives, alpha=-1.0 / (2 * k)).add_(2 * math.log(k))
    return value, q, xn, norm, log_p.exp()


cc_side_forward = torch.library.custom_op(
    "fastcluster_cl::cc_side_fwd", _cc_side_forward, mutates_args=()
)


@cc_side_forward.register_fake
def _(logits_a, logits_b, temperature):
    n, k = logits_a.shape
    acc = accumulation_dtype(logits_a.dtype)
    return (
        logits_a.new_empty((), dtype=acc),
        logits_a.new_empty((n, 2 * k), dtype=acc),
        logits_a.new_empty((n, 2 * k), dtype=acc),
        logits_a.new_empty(2 * k, dtype=acc),
        logits_a.new_empty((2 * k, 2 * k), dtype=acc),
    )


def _cc_side_backward(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    temperature: float,
    grad: torch.Tensor,
    q: torch.Tensor,
    xn: torch.Tensor,
    norm: torch.Tensor,
    prob: torch.Tensor,
) -> torch.Tensor:
    """[dlogits_a; dlogits_b] (2, N, K) in the logits' dtype from the incoming gradient of the
    loss (module docstring): one buffer, each gradient a contiguous half of it (a leaf's .grad
    then shares that storage with the other's)."""
    n, k = logits_a.shape
    g = grad.to(q.dtype)
    # (W + W^T) xn with W = g (P - [positive]) / 2K: the positive of column j is j +- K
    dxn = fp32_product(xn, prob + prob.T).sub_(xn.roll(k, 1), alpha=2.0)
    dxn.mul_(g / (2 * k * temperature))
    radial = (xn * dxn).sum(0).masked_fill_(norm <= NORM_EPS, 0.0)
    shares = q.mean(0)
    entropy = (safe_log(shares) + (shares >= torch.finfo(q.dtype).tiny)) * (g / n)
    dq = dxn.addcmul_(xn, radial, value=-1.0).div_(norm).add_(entropy).view(n, 2, k)
    q3 = q.view(n, 2, k)
    dl = logits_a.new_empty(2, n, k)  # the softmax's backward, written view-major
    torch.mul(dq.sub_(torch.linalg.vecdot(q3, dq).unsqueeze(-1)), q3, out=dl.permute(1, 0, 2))
    return dl


cc_side_backward = torch.library.custom_op(
    "fastcluster_cl::cc_side_bwd", _cc_side_backward, mutates_args=()
)


@cc_side_backward.register_fake
def _(logits_a, logits_b, temperature, grad, q, xn, norm, prob):
    return logits_a.new_empty(2, *logits_a.shape)


# Each side: (forward op, its function, backward op, its function). The forward takes the
# tensors, then the floats, and returns (value, *state); the backward takes the same arguments,
# the value's gradient and the state, and returns one gradient per tensor argument (or, all of
# one shape, stacked along dim 0: cc's two logit gradients in one buffer).
_SIDES = {
    "anchor": (
        anchor_side_forward,
        _anchor_side_forward,
        anchor_side_backward,
        _anchor_side_backward,
    ),
    "cc": (cc_side_forward, _cc_side_forward, cc_side_backward, _cc_side_backward),
}
refuse_double_backward(anchor_side_backward, "chunked")
refuse_double_backward(cc_side_backward, "chunked")


def _run_side(side: str, compiling: bool, args):
    forward_op, forward, _, _ = _SIDES[side]
    return (forward_op if compiling else forward)(*args)


def _side_grads(side: str, compiling: bool, inputs, floats, grad, state):
    """One gradient per tensor argument (a backward may return them stacked along dim 0)."""
    _, _, backward_op, backward = _SIDES[side]
    grads = (backward_op if compiling else backward)(*inputs, *floats, grad, *state)
    return grads.unbind(0) if isinstance(grads, torch.Tensor) else grads


def _split_args(args) -> tuple[list, tuple]:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return tensors, tuple(args[len(tensors) :])


class Side(torch.autograd.Function):
    """A side's value through its ops while torch.compile traces, else through their plain
    functions (an op call's dispatch costs tens of microseconds, a few percent of a step)."""

    @staticmethod
    @outside_autocast
    def forward(ctx, side, *args):
        ctx.compiling = torch.compiler.is_compiling()
        value, *state = _run_side(side, ctx.compiling, args)
        tensors, ctx.floats = _split_args(args)
        ctx.side, ctx.tensors = side, len(tensors)
        ctx.save_for_backward(*tensors, *state)
        return value

    @staticmethod
    @outside_autocast  # .backward() may be called inside an autocast region
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        inputs = saved[: ctx.tensors]
        with torch.no_grad():
            grads = _side_grads(
                ctx.side, ctx.compiling, inputs, ctx.floats, grad, saved[ctx.tensors :]
            )
        return None, *(guard(g, "chunked", *inputs) for g in grads), *(None for _ in ctx.floats)


class Objective(torch.autograd.Function):
    """A whole objective as one autograd node: [total, instance, *side parts] with instance the
    chunked NT-Xent of (z_a, z_b) (its fast path) and total = weights . parts. One node instead
    of the NT-Xent's, the side's and the weighted sum's: at small batches their bookkeeping is a
    tenth of the step."""

    @staticmethod
    @outside_autocast
    def forward(ctx, side, weights, block, z_a, z_b, inv_tau, *args):
        nt_forward, _ = nt_xent_autograd.backend_spec("chunked").fast_path()
        loss, *nt_state = nt_forward(z_a, z_b, inv_tau, False, block)
        ctx.compiling = torch.compiler.is_compiling()
        value, *state = _run_side(side, ctx.compiling, args)
        tensors, ctx.floats = _split_args(args)
        ctx.side, ctx.tensors, ctx.inv_tau, ctx.block = side, len(tensors), inv_tau, block
        ctx.nt_state = len(nt_state)
        ctx.save_for_backward(z_a, z_b, *nt_state, *tensors, *state)
        acc = accumulation_dtype(z_a.dtype)
        loss, value = loss.to(acc), value.to(acc)
        parts = torch.stack([loss, value]) if value.dim() == 0 else torch.cat([loss[None], value])
        ctx.weights = parts.new_tensor(weights)
        return torch.cat([(parts @ ctx.weights)[None], parts])

    @staticmethod
    @outside_autocast
    def backward(ctx, grad):
        z_a, z_b, *saved = ctx.saved_tensors
        nt_state, saved = saved[: ctx.nt_state], saved[ctx.nt_state :]
        inputs, state = saved[: ctx.tensors], saved[ctx.tensors :]
        g = torch.addcmul(grad[1:], grad[0], ctx.weights)  # each part's own + the total's
        spec = nt_xent_autograd.backend_spec("chunked")
        with torch.no_grad():
            z = spec.backward_rows(z_a, z_b, nt_state, (ctx.block,))
            dz = spec.fast_path()[1](z, g[0], ctx.inv_tau, *nt_state, ctx.block)
            grads = _side_grads(ctx.side, ctx.compiling, inputs, ctx.floats, g[1:], state)
        n = z_a.shape[0]
        dz = guard(dz, "chunked", z_a, z_b)
        return (
            None,
            None,
            None,
            dz[:n],
            dz[n:],
            None,
            *(guard(g, "chunked", *inputs) for g in grads),
            *(None for _ in ctx.floats),
        )


def cc_side(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """`reference.cc_cluster_loss` (in the accumulation dtype), differentiable in both logits.
    Holds the 2K x 2K similarity matrix."""
    return Side.apply("cc", logits_a, logits_b, temperature)
