"""The one-pass fused objectives of the CUDA twin (csrc/objective.cu): anchor_objective and
cc_objective against reference.anchor_objective / cc_objective in float64, values and
gradients of every input. On CPU through the host emulation (support/emulation.py: its build of
csrc/*.cu and its launch rewriting; the `emulated` fixture of tests/conftest.py), on a GPU
through the real extension (marked gpu).

Each error (every value of the output, the relative Frobenius error of each input's gradient)
is bounded by twice that of the reference on the same rounded inputs, which accumulates in fp32
and rounds its gradients to the input dtype (support/lowp.py); floored for float32 inputs at fixed
tight tolerances (1e-5 relative for values, 1e-4 for gradients), for bf16/fp16 at twice the
rounding of the float64 gradient to the dtype. (The floor matters: near one-hot Student-t rows
make the anchor gradient qa - q0 cancel in fp32, in the reference as here.)"""

import ctypes
import math

import pytest
import torch
from emulation import _ptr
from lowp import F64, correlated_views

from fastcluster_cl.backends import cuda as cuda_backend
from fastcluster_cl.backends import reference

UPSTREAM = {4: (1.3, 0.2, -0.4, 0.7), 3: (1.1, -0.3, 0.6)}  # dL/dout: folds every part
FP32_VALUE_RTOL, FP32_GRAD_RTOL = 1e-5, 1e-4


# ----------------------------------------------------------------------------- inputs (float64)


def anchor_inputs(n, d, f, k, assignment="spread", seed=0):
    """(z_a, z_b, h0, h_a, h_b, centers): correlated views; h near the centers ("spread"),
    each h0 on one of well separated centers ("onehot", q0 ~ one-hot), every h and center
    within 1e-2 of the origin ("uniform", q ~ 1 / K), or h0 halfway between two far centers
    and h_a, h_b on one each ("split": with alpha ~ 100 most qa, qb entries, some where q0 is
    ~ 1/2, fall below float32's smallest normal, a float64 one does not)."""
    gen = torch.Generator().manual_seed(seed)
    z_a, z_b = correlated_views(n, d, seed)
    scale = {"spread": 1.0, "onehot": 30.0, "uniform": 1e-2, "split": 4.0}[assignment]
    centers = scale * torch.randn(k, f, generator=gen, dtype=F64)
    if assignment == "split":
        first, second = centers[torch.arange(n) % k], centers[(torch.arange(n) + 1) % k]
        h0, h_a, h_b = (
            c + 0.1 * torch.randn(n, f, generator=gen, dtype=F64)
            for c in (0.5 * (first + second), first, second)
        )
        return z_a, z_b, h0, h_a, h_b, centers
    if assignment == "onehot":
        h0 = centers[torch.arange(n) % k].clone()
    else:
        h0 = scale * torch.randn(n, f, generator=gen, dtype=F64)
    noise = 0.1 * (1.0 if assignment != "uniform" else scale)
    h_a, h_b = (h0 + noise * torch.randn(n, f, generator=gen, dtype=F64) for _ in range(2))
    return z_a, z_b, h0, h_a, h_b, centers


def cc_inputs(n, d, k, assignment="spread", seed=0):
    """(z_a, z_b, logits_a, logits_b): correlated views and correlated logits, spread,
    one-hot (softmax ~ 1e-13 off the arg max) or near uniform (logits ~ 1e-3)."""
    gen = torch.Generator().manual_seed(seed)
    z_a, z_b = correlated_views(n, d, seed)
    if assignment == "onehot":
        logits_a = 30.0 * torch.nn.functional.one_hot(torch.arange(n) % k, k).to(F64)
        return z_a, z_b, logits_a, logits_a + 0.5 * torch.randn(n, k, generator=gen, dtype=F64)
    scale = {"spread": 2.0, "uniform": 1e-3}[assignment]
    logits_a = scale * torch.randn(n, k, generator=gen, dtype=F64)
    return z_a, z_b, logits_a, logits_a + 0.3 * scale * torch.randn(n, k, generator=gen, dtype=F64)


# ------------------------------------------------------------------------------------- checks


def _run(fn, inputs, args):
    """(value, gradients of every input) of fn(*inputs, *args) under the upstream gradient."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    value = fn(*inputs, *args)
    upstream = torch.tensor(UPSTREAM[value.numel()], dtype=value.dtype, device=value.device)
    grads = torch.autograd.grad(value, inputs, upstream)
    return value.detach(), grads


def _errors(value, grads, want_value, want_grads):
    """(|value - want| per entry, relative Frobenius error per gradient) against float64."""
    value_err = (value.double().cpu() - want_value).abs()
    grad_err = [
        ((g.double().cpu() - w).norm() / w.norm()).item() for g, w in zip(grads, want_grads)
    ]
    return value_err, grad_err


def check_objective(ours, ref, inputs, dtypes, args, device):
    """ours on `inputs` (float64, cast to `dtypes`, moved to `device`) against ref in float64
    on the same rounded inputs."""
    rounded = [t.to(dtype) for t, dtype in zip(inputs, dtypes)]
    want_value, want_grads = _run(ref, [t.to(F64) for t in rounded], args)
    value, grads = _run(ours, [t.to(device) for t in rounded], args)
    assert value.dtype == torch.float32 and torch.isfinite(value).all()
    for g, t in zip(grads, rounded):
        assert g.dtype == t.dtype and g.shape == t.shape and torch.isfinite(g).all()
    value_err, grad_err = _errors(value, grads, want_value, want_grads)
    # twice the error of the fp32-accumulating reference on the same rounded inputs
    ref_value, ref_grads = _run(ref, rounded, args)
    ref_value_err, ref_grad_err = _errors(ref_value, ref_grads, want_value, want_grads)
    if all(dtype == torch.float32 for dtype in dtypes):  # floored at fixed tight tolerances
        value_floor = FP32_VALUE_RTOL * want_value.abs().clamp_min(1.0)
        grad_floor = [FP32_GRAD_RTOL] * len(grads)
    else:  # floored at twice the rounding of the float64 gradient to the dtype
        value_floor = 1e-6 * want_value.abs().clamp_min(1.0)
        grad_floor = [
            2 * ((w.to(t.dtype).to(F64) - w).norm() / w.norm()).item()
            for w, t in zip(want_grads, rounded)
        ]
    value_bound = torch.maximum(2 * ref_value_err, value_floor)
    grad_bound = [max(2 * e, floor) for e, floor in zip(ref_grad_err, grad_floor)]
    assert (value_err <= value_bound).all(), (value_err, value_bound, value, want_value)
    for i, (err, bound) in enumerate(zip(grad_err, grad_bound)):
        assert err <= bound, f"input {i}: gradient error {err:.3g} > bound {bound:.3g}"


ANCHOR_WEIGHTS = (1.0, 0.7, 0.4)


def check_anchor(
    n, d, f, k, tau, dtype, assignment, centers_dtype=torch.float32, alpha=1.0, device="cpu"
):
    inputs = anchor_inputs(n, d, f, k, assignment)
    dtypes = [dtype] * 5 + [centers_dtype]
    check_objective(
        cuda_backend.anchor_objective,
        reference.anchor_objective,
        inputs,
        dtypes,
        (tau, alpha, ANCHOR_WEIGHTS),
        device,
    )


def check_cc(n, d, k, tau, tau_c, dtype, assignment, device="cpu"):
    check_objective(
        cuda_backend.cc_objective,
        reference.cc_objective,
        cc_inputs(n, d, k, assignment),
        [dtype] * 4,
        (tau, tau_c, (1.0, 0.8)),
        device,
    )


# ------------------------------------------------------------------------------------ emulated
# N = 13: one row block, one column tile (2N = 26 < 32), ragged everywhere; N = 20: two row
# blocks (the epilogues' fixed-order reduction) and two column tiles; K = 40 crosses the 32
# columns a warp's lanes own; D = 40 takes two feature steps.


@pytest.mark.parametrize(
    "n,d,f,k,tau,assignment",
    [
        (13, 24, 20, 7, 0.05, "spread"),
        (13, 24, 20, 7, 0.5, "onehot"),
        (13, 24, 20, 7, 0.5, "uniform"),
        (20, 40, 9, 40, 0.5, "spread"),
    ],
)
def test_anchor_objective_fp32(emulated, n, d, f, k, tau, assignment):
    check_anchor(n, d, f, k, tau, torch.float32, assignment, alpha=0.7 if k == 40 else 1.0)


def test_anchor_objective_underflowing_assignments(emulated):
    """Most qa, qb entries below float32's smallest normal (some where q0 ~ 1/2): against
    float64 within twice the fp32 reference's error (large here: float32 clamps log q at the
    smallest normal, float64 does not), and the value and gradient of that same clamped
    function as the fp32 reference (the clamp-aware gradient, sum_k q0 [qa >= tiny] != 1)."""
    inputs = anchor_inputs(13, 24, 20, 7, "split")
    args = (0.5, 100.0, ANCHOR_WEIGHTS)
    rounded = [t.float() for t in inputs]
    q_a = reference.student_t(rounded[3], rounded[5], args[1])
    assert (q_a < torch.finfo(torch.float32).tiny).float().mean() > 0.5
    check_objective(
        cuda_backend.anchor_objective,
        reference.anchor_objective,
        inputs,
        [torch.float32] * 6,
        args,
        "cpu",
    )
    value, grads = _run(cuda_backend.anchor_objective, rounded, args)
    ref_value, ref_grads = _run(reference.anchor_objective, rounded, args)
    torch.testing.assert_close(value, ref_value, rtol=FP32_VALUE_RTOL, atol=0.0)
    for i, (g, w) in enumerate(zip(grads, ref_grads)):
        err = ((g - w).norm() / w.norm()).item()
        assert err <= FP32_GRAD_RTOL, f"input {i}: {err:.3g} from the fp32 reference"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_anchor_objective_low_precision(emulated, dtype, tau):
    check_anchor(13, 24, 20, 7, tau, dtype, "spread")


# N = 40, D = 72, K = 40 on the tensor-core path: three row blocks, three column tiles, three
# feature steps (the last ragged) and clusters past a warp's 32 lanes.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_anchor_objective_low_precision_multi_tile(emulated, dtype):
    check_anchor(40, 72, 24, 40, 0.1, dtype, "spread")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cc_objective_low_precision_multi_tile(emulated, dtype):
    check_cc(40, 72, 40, 0.1, 1.0, dtype, "spread")


def test_anchor_objective_low_precision_centers(emulated):
    """bf16 centers: their gradient comes back through the fp32 cast."""
    check_anchor(13, 24, 20, 7, 0.5, torch.bfloat16, "spread", centers_dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "n,d,k,tau,tau_c,assignment",
    [
        (13, 24, 7, 0.05, 1.0, "spread"),
        (13, 24, 7, 0.5, 0.5, "onehot"),
        (13, 24, 7, 0.5, 1.0, "uniform"),
        (20, 40, 40, 0.5, 1.0, "spread"),
        (2, 3, 2, 0.5, 1.0, "spread"),
    ],
)
def test_cc_objective_fp32(emulated, n, d, k, tau, tau_c, assignment):
    check_cc(n, d, k, tau, tau_c, torch.float32, assignment)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_objectives_extreme_row_norms(emulated, dtype):
    """A row of norm ~1e20 (its squares overflow fp32) and one of ~1e-18 (clamped at 1e-12):
    the power-of-two row scaling normalises both exactly, as the float64 reference does."""
    z_a, z_b, logits_a, logits_b = cc_inputs(13, 24, 7)
    z_a[0] *= 1e19
    z_b[1] *= 1e-19
    check_objective(
        cuda_backend.cc_objective,
        reference.cc_objective,
        (z_a, z_b, logits_a, logits_b),
        [dtype] * 4,
        (0.1, 1.0, (1.0, 0.8)),
        "cpu",
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_cc_objective_low_precision(emulated, dtype, tau):
    check_cc(13, 24, 7, tau, 1.0, dtype, "spread")


OBJECTIVE_OPS = {
    "anchor_objective": lambda: (
        *(t.float() for t in anchor_inputs(5, 6, 4, 3)),
        2.0,
        1.0,
        1.0,
        0.7,
        0.4,
    ),
    "cc_objective": lambda: (*(t.float() for t in cc_inputs(5, 6, 3)), 2.0, 1.0, 1.0, 0.8),
}


@pytest.mark.parametrize("name", OBJECTIVE_OPS)
def test_opcheck_objective_ops(emulated, name):
    """Schema, fake implementations, autograd registration and AOT dispatch of the forward and
    backward ops, with the arguments their autograd passes (emulated launchers)."""
    from fastcluster_cl.backends.autograd import pairs

    forward = getattr(torch.ops.fastcluster_cl, f"{name}_cuda_fwd").default
    pair = pairs.PAIRS[f"fastcluster_cl::{name}_cuda_fwd"]
    inputs = list(OBJECTIVE_OPS[name]())
    for i in pair.wrt:
        inputs[i].requires_grad_()
    torch.library.opcheck(forward, tuple(inputs))
    detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in inputs]
    outputs = forward(*detached)
    grads = [torch.randn_like(out) for out in outputs]
    backward = getattr(torch.ops.fastcluster_cl, f"{name}_cuda_bwd").default
    torch.library.opcheck(
        backward,
        tuple(pair.backward_args(detached, outputs, grads)),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("name", ["anchor", "cc"])
def test_objectives_save_no_assignment_matrix(emulated, name):
    """What the autograd keeps for the backward: the inputs and row-, K- and 2K x 2K-sized
    statistics, never an N x K (or 2N x 2N) tensor."""
    n, k = 13, 9  # K unlike every fixed size of the state
    if name == "anchor":
        inputs = [t.float().requires_grad_() for t in anchor_inputs(n, 24, 20, k)]
        fn, args = cuda_backend.anchor_objective, (0.5, 1.0, ANCHOR_WEIGHTS)
    else:
        inputs = [t.float().requires_grad_() for t in cc_inputs(n, 24, k)]
        fn, args = cuda_backend.cc_objective, (0.5, 1.0, (1.0, 0.8))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        value = fn(*inputs, *args)
    ids = {id(t) for t in inputs}
    state = [tuple(t.shape) for t in saved if id(t) not in ids]
    assert state, "the forward op's state was not saved through autograd"
    for shape in state:
        assert math.prod(shape) <= max(7 * n, 5 * 2 * n, (2 * k) ** 2), state
        assert not (n in shape and k in shape) and shape.count(2 * n) < 2, state
    torch.autograd.grad(value.sum(), inputs)  # the backward runs from that state


def test_cc_objective_refuses_too_many_clusters(emulated):
    z_a, z_b, logits_a, logits_b = (t.float() for t in cc_inputs(5, 6, 65))
    with pytest.raises(
        ValueError, match="at most 64 clusters, got K = 65; fc.cc_objective runs the separate"
    ):
        cuda_backend.cc_objective(z_a, z_b, logits_a, logits_b, 0.5, 1.0, (1.0, 1.0))


def test_objective_double_backward_is_refused_clearly(emulated):
    z_a, z_b, logits_a, logits_b = (t.float().requires_grad_() for t in cc_inputs(5, 6, 3))
    (g,) = torch.autograd.grad(
        cuda_backend.cc_objective(z_a, z_b, logits_a, logits_b, 0.5, 1.0, (1.0, 1.0))[0],
        z_a,
        create_graph=True,
    )
    with pytest.raises(
        RuntimeError,
        match="double backward is not supported by backend='cuda'; use backend='torch'",
    ):
        torch.autograd.grad(g.pow(2).sum(), z_a)


def test_objective_launchers_reject_bad_arguments(csrc_lib):
    out = torch.zeros(8)
    assert (
        csrc_lib.fcl_cc_objective_forward(
            0,
            _ptr(out),
            _ptr(out),
            0,
            4,
            0,
            _ptr(out),
            _ptr(out),
            3,
            ctypes.c_float(1.0),
            ctypes.c_float(1.0),
            ctypes.c_float(1.0),
            ctypes.c_float(1.0),
            _ptr(out),
            _ptr(out),
            _ptr(out),
            _ptr(out),
            _ptr(out),
            _ptr(out),
            None,
        )
        != 0
    )
    for k in (0, 65):  # no clusters; more than FCL_CC_MAX_CLUSTERS (nothing is launched)
        assert (
            csrc_lib.fcl_cc_objective_forward(
                0,
                _ptr(out),
                _ptr(out),
                2,
                4,
                0,
                _ptr(out),
                _ptr(out),
                k,
                ctypes.c_float(1.0),
                ctypes.c_float(1.0),
                ctypes.c_float(1.0),
                ctypes.c_float(1.0),
                _ptr(out),
                _ptr(out),
                _ptr(out),
                _ptr(out),
                _ptr(out),
                _ptr(out),
                None,
            )
            != 0
        )


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d,f,k", [(37, 48, 20, 10), (300, 128, 64, 50), (1000, 256, 32, 10)])
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_objectives_on_gpu(n, d, f, k, dtype, tau):
    check_anchor(n, d, f, k, tau, dtype, "spread", device="cuda")
    check_cc(n, d, k, tau, 1.0, dtype, "spread", device="cuda")
