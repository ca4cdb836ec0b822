"""Bad input gives a clear error naming the problem, never a NaN loss."""

import fractions
import math

import numpy as np
import pytest
import torch

import fastcluster_cl as fc
from fastcluster_cl import validation
from fastcluster_cl.validation import value_checks


def z(n=4, d=3, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype)


@pytest.mark.parametrize("tau", [0.0, 5e-9, math.inf, math.nan])
def test_nt_xent_rejects_bad_temperature(tau):
    with pytest.raises(
        ValueError,
        match=r"temperature must be a finite number with "
        r"\|temperature\| >= 1e-8",
    ):
        fc.nt_xent(z(), z(), tau)


def test_negative_nt_xent_temperature_runs_where_it_is_exact():
    """lightly accepts tau < 0; torch and chunked compute it, the fused kernels refuse it."""
    a, b = z(), z()
    want = fc.nt_xent(a.double(), b.double(), -0.5, backend="torch")
    torch.testing.assert_close(fc.nt_xent(a.double(), b.double(), -0.5, backend="chunked"), want)
    with pytest.raises(ValueError, match="negative temperature .* not 'triton'"):
        fc.nt_xent(a, b, -0.5, backend="triton")


def test_temperature_type_is_checked():
    with pytest.raises(TypeError, match="temperature must be a float"):
        fc.nt_xent(z(), z(), "0.5")


@pytest.mark.parametrize(
    "a,b,match",
    [
        (z(4, 3), z(5, 3), "the views must match"),
        (z(4, 3), z(4, 2), "the views must match"),
        (torch.randn(4), torch.randn(4), "must be 2-D"),
        (z(0, 3), z(0, 3), "an empty batch"),
        (z(4, 0), z(4, 0), "at least 1 columns"),
    ],
)
def test_nt_xent_rejects_bad_shapes(a, b, match):
    with pytest.raises(ValueError, match=match):
        fc.nt_xent(a, b)


def test_mixed_dtypes_and_integer_inputs():
    with pytest.raises(TypeError, match="cast them to one dtype"):
        fc.nt_xent(z(), z(dtype=torch.float64))
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fc.nt_xent(torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64))


def test_mixed_devices():
    meta = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="move them to one device"):
        fc.nt_xent(z(), meta)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_raise(bad):
    a = z()
    a[1, 2] = bad
    with pytest.raises(ValueError, match="z_a contains NaN or inf"):
        fc.nt_xent(a, z())
    with pytest.raises(ValueError, match="logits_b contains NaN or inf"):
        fc.cc_cluster_loss(z(), a)


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_z_is_named_after_the_loss_reads_it(backend, bad):
    """z's check reads the loss (`check_finite_through`): a NaN or inf in either view still
    raises naming it, for NT-Xent per row and both objectives (one pass and separate ops, per
    row, with the instance part weighted 0, in bf16); huge finite z (squares overflowing
    float32) do not raise."""
    n, k = 6, 3
    logits, h, mu = torch.randn(n, k), torch.randn(n, 4), torch.randn(k, 4)
    zero = {"instance": 0.0}
    calls = {
        "nt_xent": lambda a, b: fc.nt_xent(a, b, backend=backend),
        "nt_xent rows": lambda a, b: fc.nt_xent(a, b, backend=backend, reduction="none"),
        "nt_xent bf16": lambda a, b: fc.nt_xent(a.bfloat16(), b.bfloat16(), backend=backend),
        "cc_objective": lambda a, b: fc.cc_objective(a, b, logits, logits, backend=backend),
        "cc_objective, instance weight 0": lambda a, b: fc.cc_objective(
            a, b, logits, logits, backend=backend, weights=zero
        ),
        "cc_objective rows": lambda a, b: fc.cc_objective(
            a, b, logits, logits, backend=backend, reduction="none"
        ),
        "anchor_objective": lambda a, b: fc.anchor_objective(a, b, h, h, h, mu, backend=backend),
        "anchor_objective, instance weight 0": lambda a, b: fc.anchor_objective(
            a, b, h, h, h, mu, backend=backend, weights=zero
        ),
        "anchor_objective, separate ops": lambda a, b: fc.anchor_objective(
            a, b, h, h, h, mu, backend=backend, fused=False
        ),
    }
    for call in calls.values():
        for view in ("z_a", "z_b"):
            a, b = z(n, 5), z(n, 5)
            (a if view == "z_a" else b)[2, 1] = bad
            with pytest.raises(ValueError, match=f"{view} contains NaN or inf"):
                call(a, b)
        out = call(z(n, 5) * 1e30, z(n, 5) * 1e30)
        assert torch.isfinite(out.total if isinstance(out, tuple) else out).all()


def test_value_checks_can_be_disabled():
    a = z()
    a[0, 0] = math.nan
    with value_checks(False):
        assert torch.isnan(fc.nt_xent(a, z(), backend="torch"))
    with pytest.raises(ValueError):
        fc.nt_xent(a, z())


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        fc.nt_xent(z(), z(), backend="fast")


def test_cluster_losses_need_two_clusters():
    with pytest.raises(ValueError, match="at least 2 columns"):
        fc.cc_cluster_loss(z(4, 1), z(4, 1))
    with pytest.raises(ValueError, match="at least 2 rows"):
        fc.student_t(z(4, 3), z(1, 3))
    with pytest.raises(ValueError, match="at least 2 columns"):
        fc.dec_loss(torch.ones(4, 1))


def test_student_t_takes_autocasts_fp32_centers():
    """bf16 / fp16 features with fp32 centers (autocast's parameter) are the computation on the
    features cast to fp32; other mixed pairs are refused."""
    h, mu = z(6, 3).bfloat16(), z(2, 3)
    torch.testing.assert_close(fc.student_t(h, mu), fc.student_t(h.float(), mu), rtol=0, atol=0)
    with pytest.raises(TypeError, match="cast them to one dtype"):
        fc.student_t(z(4, 3), z(2, 3).bfloat16())


def test_student_t_checks():
    with pytest.raises(ValueError, match="features but centers have"):
        fc.student_t(z(4, 3), z(2, 5))
    with pytest.raises(ValueError, match="alpha must be a finite number >= 1e-8, got 0$"):
        fc.student_t(z(4, 3), z(2, 3), alpha=0)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 1e-8"):
        fc.cc_cluster_loss(z(4, 3), z(4, 3), 1e-310)  # its inverse overflows: was a NaN loss
    with pytest.raises(TypeError, match="alpha must be a float, got str"):
        fc.student_t(z(4, 3), z(2, 3), alpha="1")
    h, mu = z(4, 3), z(2, 3)
    want = fc.student_t(h, mu, alpha=0.5)
    for alpha in (np.float32(0.5), np.float64(0.5), fractions.Fraction(1, 2)):  # any real type
        torch.testing.assert_close(fc.student_t(h, mu, alpha=alpha), want)


def test_probabilities_are_checked():
    q = torch.softmax(z(4, 3), 1)
    with pytest.raises(ValueError, match="must hold probabilities"):
        fc.dec_loss(z(4, 3))
    with pytest.raises(ValueError, match="must hold probabilities"):
        fc.anchor_loss(q, q, q * 2)
    with pytest.raises(ValueError, match="the views must match"):
        fc.anchor_loss(q, q, q[:3])


def test_tcc_checks_rows_and_gumbel_temperature():
    c, v = z(4, 3), z(5, 6)
    with pytest.raises(ValueError, match=r"tcc_loss needs logits \(N=5, K\)"):
        fc.tcc_loss(v, v, c, c, z(3, 6), v, v)
    v = z(4, 6)
    with pytest.raises(ValueError, match="gumbel_temperature"):
        fc.tcc_loss(v, v, c, c, z(3, 6), v, v, gumbel_temperature=0.0)


def test_backend_without_the_op_raises_instead_of_falling_back(monkeypatch):
    from fastcluster_cl import validation
    from fastcluster_cl.backends import dispatch

    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    monkeypatch.setitem(dispatch._LOADED, "cuda", validation)  # a module without nt_xent
    with pytest.raises(NotImplementedError, match="has no nt_xent"):
        fc.nt_xent(z(), z(), backend="cuda")


def test_tcc_checks_devices_and_takes_mixed_dtypes():
    """Under AMP the projections and logits are bf16 and the cluster embeddings an fp32
    parameter: accepted (computed in the projections' accumulation dtype); one device only."""
    c, v, mu = z(4, 3), z(4, 6), z(3, 6)
    v16, c16 = v.bfloat16(), c.bfloat16()
    low = fc.tcc_loss(v16, v16, c16, c16, mu, v16, v16)
    assert torch.isfinite(low.total) and low.total.dtype == torch.bfloat16
    meta = torch.empty(4, 6, device="meta")
    with pytest.raises(ValueError, match="logits_a is on cpu but z_a is on meta; move them"):
        fc.tcc_loss(meta, meta, c, c, mu, meta, meta)
    v = v.double()
    out = fc.tcc_loss(v, v, c.double(), c.double(), mu, v, v)
    assert out.total.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_check_tells_overflowing_sums_from_nan_and_inf(dtype):
    """The check sums in float32 first: finite values whose float32 sum overflows are finite
    (the float64 sum decides), a NaN or an inf anywhere is not."""
    big = torch.full((64, 8), torch.finfo(dtype).max, dtype=dtype)
    validation.check_finite(("z",), (big,))
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = big.clone()
        x[5, 3] = bad
        with pytest.raises(ValueError, match="z contains NaN or inf"):
            validation.check_finite(("z",), (x,))
