"""Inputs and comparisons of the one-pass objectives' tests (ops/test_op_anchor_objective.py,
test_op_cc_objective.py, backends/test_triton_objectives.py)."""

import torch
from launch_count import counting
from lowp import correlated_views
from tolerances import lowp_bounds

import fastcluster_cl as fc
from fastcluster_cl import validation
from fastcluster_cl.backends import reference

F64 = torch.float64
ANCHOR_WEIGHTS = (1.0, 0.7, 0.3)
CC_WEIGHTS = (1.0, 0.6)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def anchor_inputs(n=37, d=48, f=40, k=10, seed=0, center_scale=1.0, noise=0.3):
    """float64 (z_a, z_b, h0, h_a, h_b, centers): correlated views, each h near h0."""
    z_a, z_b = correlated_views(n, d, seed)
    g = gen(seed + 1)
    h0 = torch.randn(n, f, generator=g, dtype=F64)
    h_a, h_b = (h0 + noise * torch.randn(n, f, generator=g, dtype=F64) for _ in range(2))
    centers = center_scale * torch.randn(k, f, generator=g, dtype=F64)
    return [z_a, z_b, h0, h_a, h_b, centers]


def cc_inputs(n=37, d=48, k=10, seed=0, scale=1.0):
    z_a, z_b = correlated_views(n, d, seed)
    g = gen(seed + 1)
    logits_a = scale * torch.randn(n, k, generator=g, dtype=F64)
    logits_b = logits_a + 0.5 * scale * torch.randn(n, k, generator=g, dtype=F64)
    return [z_a, z_b, logits_a, logits_b]


def anchor_call(fn, inputs, tau, alpha=1.0):
    return fn(*inputs, tau, alpha, ANCHOR_WEIGHTS)


def cc_call(fn, inputs, tau, cluster_tau=1.0):
    return fn(*inputs, tau, cluster_tau, CC_WEIGHTS)


def run(objective, fn, inputs, dtypes, seed=5, **kw):
    """(value (float64), gradients (float64)) of objective(fn, leaves) under a random
    incoming gradient of every output element; inputs cast to `dtypes` first."""
    leaves = [x.to(dt).requires_grad_() for x, dt in zip(inputs, dtypes)]
    out = objective(fn, leaves, **kw)
    grad_out = torch.randn(out.shape, generator=gen(seed), dtype=F64)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach().to(F64), [g.to(F64) for g in grads]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def compare(objective, fused, ref_fn, inputs, dtypes, value_tol, grad_tols, **kw):
    """The fused objective in `dtypes` against `ref_fn` in float64 on the same rounded inputs;
    grad_tols: one relative (Frobenius) tolerance per input."""
    rounded = [x.to(dt).to(F64) for x, dt in zip(inputs, dtypes)]
    value, grads = run(objective, fused, inputs, dtypes, **kw)
    want, want_grads = run(objective, ref_fn, rounded, [F64] * len(inputs), **kw)
    assert torch.isfinite(value).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(value, want, rtol=value_tol, atol=value_tol)
    for i, (g, w, tol) in enumerate(zip(grads, want_grads, grad_tols)):
        assert rel(g, w) <= tol, f"input {i}: relative gradient error {rel(g, w):.3g} > {tol:.3g}"


def low_precision_bounds(objective, ref_fn, inputs, dtypes, **kw):
    """(value bound, gradient bounds): twice the error of the float32 reference on the same
    rounded inputs, each gradient's floored at twice the rounding of the float64 gradient to
    its input's dtype (what storing it costs) and the value's at 1e-6; the z gradients' at
    those of backend "chunked" on the instance loss (tolerances.lowp_bounds)."""
    rounded = [x.to(dt).to(F64) for x, dt in zip(inputs, dtypes)]
    want, want_grads = run(objective, ref_fn, rounded, [F64] * len(inputs), **kw)
    v32, g32 = run(objective, ref_fn, rounded, [torch.float32] * len(inputs), **kw)
    value = max(2 * rel(v32, want), 1e-6)
    grads = [
        2 * max(rel(g, w), rel(w.to(dt).to(F64), w)) for g, w, dt in zip(g32, want_grads, dtypes)
    ]
    tau = kw["tau"]
    nt_bound = lowp_bounds(
        lambda a, b: fc.nt_xent(a, b, tau, backend="chunked"),
        lambda a, b: reference.nt_xent(a, b, tau),
        inputs[:2],
        dtypes[0],
    )[0]
    return value, [max(grads[0], nt_bound), max(grads[1], nt_bound), *grads[2:]]


def small_anchor():
    return [x.float().requires_grad_() for x in anchor_inputs(n=8, d=16, f=16, k=5)]


def small_cc():
    return [x.float().requires_grad_() for x in cc_inputs(n=8, d=16, k=5)]


def count_launches(loss_fn):
    """(forward launches, backward launches, forward torch compute ops, all torch compute ops)
    of loss_fn().backward()."""
    with validation.value_checks(False):
        with counting() as (fwd, fwd_ops):
            loss = loss_fn()
        with counting() as (bwd, bwd_ops):
            loss.backward()
    print(f"forward {dict(fwd)} {dict(fwd_ops.ops)}; backward {dict(bwd)} {dict(bwd_ops.ops)}")
    return (
        sum(fwd.values()),
        sum(bwd.values()),
        fwd_ops.compute_ops,
        fwd_ops.compute_ops + bwd_ops.compute_ops,
    )
