"""The one-pass objectives of backend "triton" (kernels/objective/): `anchor_objective` and
`cc_objective` against `reference.anchor_objective` / `cc_objective` (values and every
gradient), their launch and torch-op counts, their ops under torch.library.opcheck, and the
double-backward refusal. Under the Triton interpreter on the CPU (tests/conftest.py)."""

import sys

import pytest
import torch
from launch_count import OpCounter, counting
from lowp import correlated_views
from tolerances import lowp_bounds

import fastcluster_cl as fc
from fastcluster_cl import kernels, validation
from fastcluster_cl.backends import reference

F64 = torch.float64
OPS = torch.ops.fastcluster_cl
ANCHOR_WEIGHTS = (1.0, 0.7, 0.3)
CC_WEIGHTS = (1.0, 0.6)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def anchor_inputs(n=37, d=48, f=40, k=10, seed=0, centre_scale=1.0, noise=0.3):
    """float64 (z_a, z_b, h0, h_a, h_b, centres): correlated views, each h near h0."""
    z_a, z_b = correlated_views(n, d, seed)
    g = _gen(seed + 1)
    h0 = torch.randn(n, f, generator=g, dtype=F64)
    h_a, h_b = (h0 + noise * torch.randn(n, f, generator=g, dtype=F64) for _ in range(2))
    centres = centre_scale * torch.randn(k, f, generator=g, dtype=F64)
    return [z_a, z_b, h0, h_a, h_b, centres]


def cc_inputs(n=37, d=48, k=10, seed=0, scale=1.0):
    z_a, z_b = correlated_views(n, d, seed)
    g = _gen(seed + 1)
    logits_a = scale * torch.randn(n, k, generator=g, dtype=F64)
    logits_b = logits_a + 0.5 * scale * torch.randn(n, k, generator=g, dtype=F64)
    return [z_a, z_b, logits_a, logits_b]


def _anchor(fn, inputs, tau, alpha=1.0):
    return fn(*inputs, tau, alpha, ANCHOR_WEIGHTS)


def _cc(fn, inputs, tau, cluster_tau=1.0):
    return fn(*inputs, tau, cluster_tau, CC_WEIGHTS)


def run(objective, fn, inputs, dtypes, seed=5, **kw):
    """(value (float64), gradients (float64)) of objective(fn, leaves) under a random
    incoming gradient of every output element; inputs cast to `dtypes` first."""
    leaves = [x.to(dt).requires_grad_() for x, dt in zip(inputs, dtypes)]
    out = objective(fn, leaves, **kw)
    grad_out = torch.randn(out.shape, generator=_gen(seed), dtype=F64)
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


# -- values and gradients in float64 and float32 ----------------------------------------------


@pytest.mark.parametrize(
    "k, tau", [(k, tau) for k in (10, 7) for tau in (0.05, 0.1, 0.5)] + [(70, 0.1)]
)  # K = 70 crosses the centre tiles
def test_anchor_float64(k, tau):
    compare(
        _anchor,
        kernels.anchor_objective,
        reference.anchor_objective,
        anchor_inputs(k=k),
        [F64] * 6,
        1e-10,
        [1e-10] * 6,
        tau=tau,
    )


@pytest.mark.parametrize("k", [10, 7])
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5])
def test_cc_float64(k, tau):
    compare(
        _cc,
        kernels.cc_objective,
        reference.cc_objective,
        cc_inputs(k=k),
        [F64] * 4,
        1e-10,
        [1e-10] * 4,
        tau=tau,
    )


def test_anchor_float32():
    compare(
        _anchor,
        kernels.anchor_objective,
        reference.anchor_objective,
        anchor_inputs(),
        [torch.float32] * 6,
        1e-5,
        [1e-5] * 6,
        tau=0.1,
    )


def test_cc_float32():
    compare(
        _cc,
        kernels.cc_objective,
        reference.cc_objective,
        cc_inputs(k=7),
        [torch.float32] * 4,
        1e-5,
        [1e-5] * 4,
        tau=0.1,
    )


@pytest.mark.parametrize("case", ["one-hot", "uniform"])
def test_anchor_assignment_extremes(case):
    """Centres far apart (q nearly one-hot) or all within 1e-3 of one point (q uniform to
    ~1e-3: identical centres give exactly zero h and centre gradients, nothing to compare)."""
    inputs = anchor_inputs(k=7, centre_scale=30.0 if case == "one-hot" else 1e-3)
    if case == "uniform":
        inputs[5] += inputs[2][0]
    compare(
        _anchor,
        kernels.anchor_objective,
        reference.anchor_objective,
        inputs,
        [F64] * 6,
        1e-10,
        [1e-9] * 6,
        tau=0.5,
    )


@pytest.mark.parametrize("scale", [50.0, 0.01])
def test_cc_assignment_extremes(scale):
    """Logits x50 (nearly one-hot softmax) and x0.01 (nearly uniform)."""
    compare(
        _cc,
        kernels.cc_objective,
        reference.cc_objective,
        cc_inputs(k=10, scale=scale),
        [F64] * 4,
        1e-10,
        [1e-9] * 4,
        tau=0.5,
    )


# -- low precision: bounds from a full-precision-accumulating path on the same inputs --------


def _low_precision_bounds(objective, ref_fn, inputs, dtypes, **kw):
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_anchor_low_precision(dtype):
    """bf16/fp16 z and h with float32 centres (AMP training)."""
    inputs = anchor_inputs(k=10)
    dtypes = [dtype] * 5 + [torch.float32]
    value_tol, grad_tols = _low_precision_bounds(
        _anchor, reference.anchor_objective, inputs, dtypes, tau=0.1
    )
    compare(
        _anchor,
        kernels.anchor_objective,
        reference.anchor_objective,
        inputs,
        dtypes,
        value_tol,
        grad_tols,
        tau=0.1,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cc_low_precision(dtype):
    inputs = cc_inputs(k=10)
    dtypes = [dtype] * 4
    value_tol, grad_tols = _low_precision_bounds(
        _cc, reference.cc_objective, inputs, dtypes, tau=0.1
    )
    compare(
        _cc,
        kernels.cc_objective,
        reference.cc_objective,
        inputs,
        dtypes,
        value_tol,
        grad_tols,
        tau=0.1,
    )


# -- extreme inputs: finite values and gradients -----------------------------------------------


def test_extreme_norms():
    """Rows with |z| ~ 1e19 and ~1e-30 in float32 (their squares overflow / underflow):
    normalised exactly, as the reference does in float64."""
    inputs = anchor_inputs(n=20, d=24, f=16, k=7)
    for z in inputs[:2]:
        z[3] *= 1e19
        z[11] *= 1e-30
    compare(
        _anchor,
        kernels.anchor_objective,
        reference.anchor_objective,
        inputs,
        [torch.float32] * 6,
        1e-5,
        [1e-5] * 6,
        tau=0.1,
    )
    cc = cc_inputs(n=20, d=24, k=7)
    cc[:2] = inputs[:2]
    compare(
        _cc,
        kernels.cc_objective,
        reference.cc_objective,
        cc,
        [torch.float32] * 4,
        1e-5,
        [1e-5] * 4,
        tau=0.1,
    )


def test_zero_mass_clusters():
    """A centre whose Student-t mass underflows in float32 (f_k = 0: DEC's target 0, not 0/0)
    and a CC column whose softmax underflows (P_k = 0, the column norm clamped): finite, and
    equal to the reference computed in float32 (which underflows alike)."""
    inputs = anchor_inputs(n=20, d=24, f=16, k=7)
    inputs[5][6] += 1e3  # alpha = 100: (1 + d2/alpha)^-50.5 ~ 1e-202 -> 0 in float32
    compare(
        _anchor,
        kernels.anchor_objective,
        reference.anchor_objective,
        [x.float().double() for x in inputs],
        [torch.float32] * 6,
        1e-5,
        [1e-5] * 6,
        tau=0.5,
        alpha=100.0,
    )
    value, grads = run(
        _anchor, kernels.anchor_objective, inputs, [torch.float32] * 6, tau=0.5, alpha=100.0
    )
    want, want_grads = run(
        _anchor, reference.anchor_objective, inputs, [torch.float32] * 6, tau=0.5, alpha=100.0
    )
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want_grads):
        assert torch.isfinite(g).all() and rel(g, w) < 1e-4
    cc = cc_inputs(n=20, d=24, k=7)
    for logits in cc[2:]:
        logits[:, 4] -= 200.0
    value, grads = run(_cc, kernels.cc_objective, cc, [torch.float32] * 4, tau=0.5)
    want, want_grads = run(_cc, reference.cc_objective, cc, [torch.float32] * 4, tau=0.5)
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want_grads):
        assert torch.isfinite(g).all() and rel(g, w) < 1e-4


# -- launches and torch ops --------------------------------------------------------------------


def _small_anchor():
    return [x.float().requires_grad_() for x in anchor_inputs(n=8, d=16, f=16, k=5)]


def _small_cc():
    return [x.float().requires_grad_() for x in cc_inputs(n=8, d=16, k=5)]


def _count(loss_fn):
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


@pytest.mark.parametrize("method", ["anchor", "cc"])
def test_fused_launch_and_op_counts(method):
    """One forward + backward of the total: at most 2 Triton launches each way and 12 torch
    compute ops in all (measured: 2 + 2 launches; no torch op forward (no host-to-device copy
    of the scalars either), 2 backward: the autograd seed and the select's backward)."""
    if method == "anchor":
        x = _small_anchor()
        counts = _count(lambda: kernels.anchor_objective(*x, 0.2, 1.0, ANCHOR_WEIGHTS)[0])
    else:
        x = _small_cc()
        counts = _count(lambda: kernels.cc_objective(*x, 0.2, 1.0, CC_WEIGHTS)[0])
    fwd, bwd, fwd_ops, ops = counts
    assert fwd <= 2 and bwd <= 2 and fwd_ops == 0 and ops <= 12, counts


@pytest.mark.parametrize("method", ["anchor", "cc"])
def test_cluster_contrastive_loss_runs_the_one_pass_path(method):
    """What users and the trainer call: ClusterContrastiveLoss(method, backend="triton") on the
    centre head's features (anchor) or the logits (cc), within the same budget, and equal to
    the separate ops."""
    crit = fc.ClusterContrastiveLoss(
        method, 0.2, weights={"cluster": 0.7, "anchor": 0.3}, backend="triton"
    )
    if method == "anchor":
        z_a, z_b, h0, h_a, h_b, mu = _small_anchor()
        inputs = dict(h0=h0, h_a=h_a, h_b=h_b, centers=mu)
    else:
        z_a, z_b, la, lb = _small_cc()
        inputs = dict(logits_a=la, logits_b=lb)
    fwd, bwd, fwd_ops, ops = _count(lambda: crit(z_a, z_b, **inputs).total)
    # the budget is 12 torch ops; what is measured (docs/ops.md) is pinned: the autograd
    # seed and the total's select_backward
    assert fwd <= 2 and bwd <= 2 and fwd_ops == 0 and ops <= 2, (fwd, bwd, fwd_ops, ops)
    objective = fc.anchor_objective if method == "anchor" else fc.cc_objective
    args = (z_a, z_b, *inputs.values())
    kwargs = dict(instance_temperature=0.2, weights=crit.weights, backend="triton")
    fused, separate = objective(*args, **kwargs), objective(*args, **kwargs, fused=False)
    torch.testing.assert_close(fused.total, separate.total, rtol=2e-5, atol=1e-6)
    for name in separate.parts:
        torch.testing.assert_close(fused.parts[name], separate.parts[name], rtol=2e-5, atol=1e-6)


def test_inputs_beyond_the_kernels_limits_run_the_separate_ops():
    """F = 600 > 512 (e.g. ResNet-50 features are 2048 wide) and cc's K = 70 > 64: the public
    objectives run the separate ops instead of refusing, with the same values."""
    g = torch.Generator().manual_seed(5)
    z_a, z_b = (torch.randn(6, 8, generator=g) for _ in range(2))
    h0, h_a, h_b = (torch.randn(6, 600, generator=g) for _ in range(3))
    mu = torch.randn(3, 600, generator=g)
    assert not kernels.anchor_objective_fits(z_a, z_b, h0, h_a, h_b, mu)
    got = fc.anchor_objective(z_a, z_b, h0, h_a, h_b, mu, backend="triton")
    want = fc.anchor_objective(z_a, z_b, h0, h_a, h_b, mu, backend="torch")
    torch.testing.assert_close(got.total, want.total, rtol=1e-5, atol=1e-6)
    la, lb = (torch.randn(6, 70, generator=g) for _ in range(2))
    assert not kernels.cc_objective_fits(z_a, z_b, la, lb)
    with pytest.raises(ValueError, match="at most 64 clusters"):  # the separate op's own limit
        fc.cc_objective(z_a, z_b, la, lb, backend="triton")
    with pytest.raises(ValueError, match="finite"):
        fc.cc_objective(z_a, z_b, la[:, :4], lb[:, :4], weights={"cluster": float("inf")})


def test_counter_sees_ops_inside_custom_ops():
    """The counter is not blind inside the package's ops: the unfused anchor path (student_t,
    nt_xent, dec_anchor_losses) shows its launches and the torch ops of its ops' bodies (the
    Student-t backward's host GEMMs)."""
    z_a, z_b, h0, h_a, h_b, mu = _small_anchor()

    def unfused():
        q = [kernels.student_t(h, mu, 1.0) for h in (h0, h_a, h_b)]
        dec, anchor = kernels.dec_anchor_losses(*q)
        return kernels.nt_xent(z_a, z_b, 0.2) + 0.7 * dec + 0.3 * anchor

    with validation.value_checks(False):
        with counting() as (fwd, fwd_ops):
            loss = unfused()
        with counting() as (bwd, bwd_ops):
            loss.backward()
    assert sum(fwd.values()) >= 7 and sum(bwd.values()) >= 5
    assert bwd_ops.ops["aten::matmul"] == 6  # inside student_t_triton_bwd, x3
    assert bwd_ops.custom["fastcluster_cl::student_t_triton_bwd"] == 3
    assert fwd_ops.compute_ops + bwd_ops.compute_ops > 40


# -- the registered ops ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["anchor", "cc"])
def test_opcheck(method):
    """opcheck of the forward op (with inputs that require grad: its autograd too) and of the
    backward op on the arguments its autograd passes (without grad: it refuses a second)."""
    if method == "anchor":
        args, constants = anchor_inputs(n=6, d=5, f=4, k=3), (0.4, 1.0, list(ANCHOR_WEIGHTS))
    else:
        args, constants = cc_inputs(n=6, d=5, k=3), (0.4, 1.0, list(CC_WEIGHTS))
    forward = getattr(OPS, f"{method}_objective_triton_fwd").default
    backward = getattr(OPS, f"{method}_objective_triton_bwd").default
    torch.library.opcheck(forward, (*(a.requires_grad_() for a in args), *constants))
    out = forward(*(a.detach() for a in args), *constants)
    grad = torch.randn(out[0].shape, generator=_gen(3), dtype=out[0].dtype)
    torch.library.opcheck(
        backward,
        (*(a.detach() for a in args), grad, *out[1:], 0.4),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_double_backward_is_refused():
    x = [t.requires_grad_() for t in cc_inputs(n=6, d=5, k=3)]
    (g,) = torch.autograd.grad(
        kernels.cc_objective(*x, 0.4, 1.0, CC_WEIGHTS)[0], x[0], create_graph=True
    )
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.pow(2).sum().backward()


def test_op_counter_ignores_views_and_allocations():
    x = torch.ones(4)
    with OpCounter() as ops:
        y = torch.empty(3)
        x.view(2, 2)
        torch.zeros(2)
        (x + 1).sum()
    assert y.shape == (3,) and dict(ops.ops) == {
        "aten::zeros": 1,
        "aten::add.Tensor": 1,
        "aten::sum": 1,
    }


@pytest.mark.parametrize("method", ["anchor", "cc"])
def test_gpu_tiles_under_the_interpreter(monkeypatch, method):
    """The tensor-core launch shapes (forward 128 x 16 with 8 warps, backward 64 x 64; the
    interpreter otherwise runs 32 x 32) give the same result on fp16 inputs: both accumulate in
    fp32 on the same fp16 operands, so only the summation order (and the fp16 rounding of the
    gradients) differs. N = 150 > 128: several programs at the GPU shapes too (the partial
    column sums' and d centers' reductions across programs)."""
    from fastcluster_cl.kernels.objective import instance as objective

    if method == "anchor":
        objective_fn, inputs = _anchor, anchor_inputs(n=150, d=48, f=40, k=20)
        dtypes = [torch.float16] * 5 + [torch.float32]
        fn = kernels.anchor_objective
    else:
        objective_fn, inputs, dtypes = _cc, cc_inputs(n=150, d=48, k=20), [torch.float16] * 4
        fn = kernels.cc_objective
    want, want_grads = run(objective_fn, fn, inputs, dtypes, tau=0.1)
    monkeypatch.setattr(
        sys.modules["fastcluster_cl.kernels.nt_xent"], "_is_interpreted", lambda: False
    )
    assert objective.instance_config(48, torch.float16)[0].block[:2] == (128, 16)
    value, grads = run(objective_fn, fn, inputs, dtypes, tau=0.1)
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want_grads):
        assert rel(g, w) < 2e-3
