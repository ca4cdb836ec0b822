"""The one dtype tolerance table of the op tests (ops/test_op_*.py) and the checks that use it.

Every backend's values and gradients are compared with the float64 reference run on the same
dtype-rounded inputs (`check_against_reference`):

- values: |got - want| <= atol + rtol |want|;
- gradients: |got - want| <= atol * max|want| + rtol |want| (atol relative to the largest
  reference entry: gradients scale like 1/N; at least the dtype's smallest normal number);

with (rtol, atol) from TOLERANCE, widened by `widen(tau)` for the contrasts (rounding errors of
S = zn zn^T / tau grow like 1/tau). Ops that compute in fp32 from the rounded inputs (student_t,
dec, anchor) take fp32's value tolerance whatever the input dtype (`FP32_MATH`); kernels that
also round their gradients once to the input dtype (dec and anchor on backend="cuda") are held to
that (`ROUNDED_ONCE`).

In the low-precision regime users train in (correlated views at small tau) a fixed number hid
1000% errors once, so fp16/bf16 there are bounded by the fp32-accumulating chunked path instead
(`lowp_bounds`): twice its error on the same inputs, the gradient's floored at twice the rounding
of the float64 reference gradient to the dtype, the loss's at 1e-6."""

from typing import NamedTuple

import torch

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


class Tol(NamedTuple):
    value_rtol: float
    value_atol: float
    grad_rtol: float
    grad_atol: float  # relative to the largest reference gradient entry


# Against the float64 reference on the same rounded inputs, at tau >= 0.5 for the contrasts.
# float32: SIMT and tensor-core-free products summed in another order (GPU and emulated);
# float16/bfloat16: fp16 tile weights and products (11 / 8 mantissa bits).
TOLERANCE = {
    F64: Tol(1e-10, 1e-12, 1e-9, 1e-12),
    F32: Tol(1e-5, 2e-5, 1e-4, 1e-4),
    F16: Tol(2e-2, 4e-3, 2e-2, 1e-2),
    BF16: Tol(5e-2, 3e-2, 5e-2, 4e-2),
}
LOWP = (F16, BF16)
ACCUMULATION = "accumulation"  # out_dtype of what is not a loss (student_t, the raw backends)
FP32_MATH = "fp32_math"  # values computed in fp32 from the rounded inputs: fp32's value tolerance
ROUNDED_ONCE = "rounded_once"  # and gradients rounded once to the input dtype: within 4 ulp


def widen(tau: float) -> float:
    """The contrasts' tolerance factor at temperature tau."""
    return max(1.0, 0.5 / tau)


def _assert_grad(got, want, rtol, atol, what, scale=None):
    """atol relative to the largest reference entry (or to `scale`), floored at the smallest
    normal number of got's dtype (gradients that underflow it cannot be held)."""
    assert torch.isfinite(got).all(), what
    scale = want.abs().max().item() if scale is None else scale
    torch.testing.assert_close(
        got.to(F64),
        want,
        rtol=rtol,
        atol=max(atol * scale, torch.finfo(got.dtype).tiny),
        msg=lambda m: f"{what}: {m}",
    )


def check_against_reference(
    fn,
    ref,
    inputs,
    dtype,
    *,
    device="cpu",
    weights=None,
    loosen=1.0,
    kind=None,
    out_dtype=None,
    grad_scale=None,
):
    """fn(*inputs in dtype on device) against ref(*the same values in float64): the outputs and
    the gradients of sum(weights * output) (every input ref differentiates; an input without a
    reference gradient must get none or zeros). kind: FP32_MATH (values to fp32's tolerance) or
    ROUNDED_ONCE (and gradients within 4 ulp of the dtype), see the module docstring.
    out_dtype: the expected result dtype (default: the input dtype, as the public losses
    return; ACCUMULATION: float32, float64 for float64 inputs); a result rounded to fp16/bf16
    is allowed that one rounding (one unit of its last place) on top. grad_scale: what the
    gradients' atol is relative to, where not their largest entry (gradients at rounding level,
    whose check is only that they stay finite and small)."""
    x = [t.to(device, dtype).detach().clone().requires_grad_() for t in inputs]
    x64 = [t.detach().to(F64).requires_grad_() for t in x]
    got, want = fn(*x), ref(*x64)
    accumulation = F64 if dtype == F64 else F32
    expected = accumulation if out_dtype == ACCUMULATION else (out_dtype or dtype)
    assert got.dtype == expected, (got.dtype, expected)
    tol = TOLERANCE[dtype]
    value = TOLERANCE[accumulation] if kind in (FP32_MATH, ROUNDED_ONCE) else tol
    rounding = torch.finfo(got.dtype).eps if got.dtype in LOWP else 0.0
    torch.testing.assert_close(
        got.to(F64), want, rtol=value.value_rtol * loosen + rounding, atol=value.value_atol * loosen
    )
    w = torch.ones_like(want) if weights is None else weights.to(want)
    (got * w.to(got)).sum().backward()
    (want * w).sum().backward()
    for i, (a, b) in enumerate(zip(x, x64)):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), f"input {i} got a gradient"
            continue
        assert a.grad.dtype == dtype, f"input {i}: gradient in {a.grad.dtype}"
        if kind == ROUNDED_ONCE:
            _assert_grad(a.grad, b.grad, 4 * torch.finfo(dtype).eps, 1e-6, f"gradient {i}")
        else:
            _assert_grad(
                a.grad,
                b.grad,
                tol.grad_rtol * loosen,
                tol.grad_atol * loosen,
                f"gradient {i}",
                grad_scale,
            )


def relative_errors(loss_fn, ref_fn, inputs, dtype):
    """(relative Frobenius error of the gradient, relative error of the loss) of
    loss_fn(*inputs rounded to dtype) against ref_fn in float64 on the same rounded values."""
    x = [t.to(dtype).requires_grad_() for t in inputs]
    x64 = [t.detach().to(F64).requires_grad_() for t in x]
    loss = loss_fn(*x)
    loss.backward()
    want = ref_fn(*x64)
    want.backward()
    got, ref = torch.cat([t.grad for t in x]).to(F64), torch.cat([t.grad for t in x64])
    assert torch.isfinite(got).all()
    return ((got - ref).norm() / ref.norm()).item(), abs(loss.item() / want.item() - 1)


def lowp_bounds(chunked_fn, ref_fn, inputs, dtype):
    """(gradient bound, loss bound) for a backend in dtype: twice the errors of `chunked_fn`
    (backend="chunked", fp32 accumulation) on the same inputs, the gradient's floored at twice
    the rounding of the float64 reference gradient to dtype, the loss's at 1e-6."""
    grad, loss = relative_errors(chunked_fn, ref_fn, inputs, dtype)
    x = [t.to(dtype).to(F64).requires_grad_() for t in inputs]
    ref_fn(*x).backward()
    ref = torch.cat([t.grad for t in x])
    rounding = ((ref.to(dtype).to(F64) - ref).norm() / ref.norm()).item()
    return 2 * max(grad, rounding), max(2 * loss, 1e-6)


def assert_within_lowp_bounds(loss_fn, chunked_fn, ref_fn, inputs, dtype):
    grad_err, loss_err = relative_errors(loss_fn, ref_fn, inputs, dtype)
    grad_bound, loss_bound = lowp_bounds(chunked_fn, ref_fn, inputs, dtype)
    assert grad_err <= grad_bound and loss_err <= loss_bound, (
        grad_err,
        loss_err,
        grad_bound,
        loss_bound,
    )
