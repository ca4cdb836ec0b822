"""`anchor_objective` (the anchor method's whole loss in one pass) on backends "triton" and
"chunked" against `reference.anchor_objective` in float64: values and every gradient, at small
temperatures on correlated views, one-hot and uniform assignments, extreme norms, a zero-mass
center, bf16 and fp16 inputs. The CUDA twin's: backends/test_cuda_objectives.py; launches and
ops: backends/test_triton_objectives.py."""

import pytest
import torch
from objectives import (
    F64,
    anchor_call,
    anchor_inputs,
    compare,
    low_precision_bounds,
    rel,
    run,
)

from fastcluster_cl import kernels
from fastcluster_cl.backends import chunked, reference

# The one-pass objective of each backend that has one and runs here: triton (interpreted)
# and chunked (one autograd node: the chunked NT-Xent and the clustering side).
FUSED = pytest.mark.parametrize(
    "fused", [kernels.anchor_objective, chunked.anchor_objective], ids=["triton", "chunked"]
)


@FUSED
@pytest.mark.parametrize(
    "k, tau", [(k, tau) for k in (10, 7) for tau in (0.05, 0.1, 0.5)] + [(70, 0.1)]
)  # K = 70 crosses the center tiles
def test_anchor_float64(k, tau, fused):
    compare(
        anchor_call,
        fused,
        reference.anchor_objective,
        anchor_inputs(k=k),
        [F64] * 6,
        1e-10,
        [1e-10] * 6,
        tau=tau,
    )


@FUSED
def test_anchor_features_cross_the_gradient_chunks(fused):
    """F = 300: the fused backward's dh rows and dmu tiles in chunks of 64 features, the last
    partial, over two center tiles."""
    compare(
        anchor_call,
        fused,
        reference.anchor_objective,
        anchor_inputs(k=20, f=300),
        [F64] * 6,
        1e-10,
        [1e-10] * 6,
        tau=0.1,
    )


@FUSED
def test_anchor_float32(fused):
    compare(
        anchor_call,
        fused,
        reference.anchor_objective,
        anchor_inputs(),
        [torch.float32] * 6,
        1e-5,
        [1e-5] * 6,
        tau=0.1,
    )


@FUSED
@pytest.mark.parametrize("case", ["one-hot", "uniform"])
def test_anchor_assignment_extremes(case, fused):
    """Centers far apart (q nearly one-hot) or all within 1e-3 of one point (q uniform to
    ~1e-3: identical centers give exactly zero h and center gradients, nothing to compare)."""
    inputs = anchor_inputs(k=7, center_scale=30.0 if case == "one-hot" else 1e-3)
    if case == "uniform":
        inputs[5] += inputs[2][0]
    compare(
        anchor_call,
        fused,
        reference.anchor_objective,
        inputs,
        [F64] * 6,
        1e-10,
        [1e-9] * 6,
        tau=0.5,
    )


@FUSED
@pytest.mark.parametrize(
    "dtype, f", [(torch.bfloat16, 40), (torch.float16, 40), (torch.bfloat16, 300)]
)
def test_anchor_low_precision(dtype, f, fused):
    """bf16/fp16 z and h with float32 centers (AMP training), F within one gradient chunk, and
    across five over two center tiles."""
    inputs = anchor_inputs(k=10 if f < 64 else 20, f=f)
    dtypes = [dtype] * 5 + [torch.float32]
    value_tol, grad_tols = low_precision_bounds(
        anchor_call, reference.anchor_objective, inputs, dtypes, tau=0.1
    )
    compare(
        anchor_call,
        fused,
        reference.anchor_objective,
        inputs,
        dtypes,
        value_tol,
        grad_tols,
        tau=0.1,
    )


@FUSED
def test_extreme_norms(fused):
    """Rows with |z| ~ 1e19 and ~1e-30 in float32 (their squares overflow / underflow):
    normalised exactly, as the reference does in float64."""
    inputs = anchor_inputs(n=20, d=24, f=16, k=7)
    for z in inputs[:2]:
        z[3] *= 1e19
        z[11] *= 1e-30
    compare(
        anchor_call,
        fused,
        reference.anchor_objective,
        inputs,
        [torch.float32] * 6,
        1e-5,
        [1e-5] * 6,
        tau=0.1,
    )


@FUSED
def test_zero_mass_center(fused):
    """A center whose Student-t mass underflows in float32 (f_k = 0: DEC's target 0, not 0/0)
    and a CC column whose softmax underflows (P_k = 0, the column norm clamped): finite, and
    equal to the reference computed in float32 (which underflows alike)."""
    inputs = anchor_inputs(n=20, d=24, f=16, k=7)
    inputs[5][6] += 1e3  # alpha = 100: (1 + d2/alpha)^-50.5 ~ 1e-202 -> 0 in float32
    compare(
        anchor_call,
        fused,
        reference.anchor_objective,
        [x.float().double() for x in inputs],
        [torch.float32] * 6,
        1e-5,
        [1e-5] * 6,
        tau=0.5,
        alpha=100.0,
    )
    value, grads = run(anchor_call, fused, inputs, [torch.float32] * 6, tau=0.5, alpha=100.0)
    want, want_grads = run(
        anchor_call, reference.anchor_objective, inputs, [torch.float32] * 6, tau=0.5, alpha=100.0
    )
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want_grads):
        assert torch.isfinite(g).all() and rel(g, w) < 1e-4


@FUSED
@pytest.mark.parametrize("dtype, alpha, far", [(torch.float32, 20.0, 1e3), (F64, 100.0, 1e5)])
def test_underflowing_view_assignment_is_clamped_as_the_reference(dtype, alpha, far, fused):
    """A view whose Student-t row underflows where the clean view has mass: the reference's
    safe_log clamps log q there (and passes no gradient), so the anchor term is bounded; the
    fused objective gives the reference's value and gradients in the same dtype."""
    inputs = [x.clone() for x in anchor_inputs(n=4, d=8, f=6, k=3)]
    centers = inputs[5]
    centers[1] = centers[0] + far
    inputs[2][0] = centers[0]  # h0 row 0 at center 0
    inputs[3][0] = centers[1] - 0.01  # h_a row 0 far from center 0, at center 1
    value, grads = run(anchor_call, fused, inputs, [dtype] * 6, tau=0.5, alpha=alpha)
    want, want_grads = run(
        anchor_call, reference.anchor_objective, inputs, [dtype] * 6, tau=0.5, alpha=alpha
    )
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want_grads):
        assert torch.isfinite(g).all() and rel(g, w) < 1e-4
