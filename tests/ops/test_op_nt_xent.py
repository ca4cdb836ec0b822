"""nt_xent (and nt_xent_terms) on every backend against the float64 reference: values and
gradients with the shared tolerance table (support/tolerances.py), odd sizes, small temperatures,
fp16/bf16, correlated views in low precision, per-row gradients, extreme magnitudes and
gradcheck. Backend internals (row primitives, launch configurations, column splits, the
emulation's plumbing) are tested in test_triton_kernels.py, test_csrc_emulated.py and
test_cuda_backend.py."""

import pytest
import torch
from backend_cases import cases, gradcheck, prepare
from lowp import correlated_views
from tolerances import (
    BF16,
    F16,
    F32,
    F64,
    LOWP,
    assert_within_lowp_bounds,
    check_against_reference,
    widen,
)

import fastcluster_cl as fc
from fastcluster_cl.backends import reference


def pair(n, d, seed=0):
    """z_b = z_a + noise (float64; each test rounds them to its dtype)."""
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=gen, dtype=F64)
    return z_a, z_a + 0.5 * torch.randn(n, d, generator=gen, dtype=F64)


CUDA_SHAPES = [(37, 48), (2, 3), (130, 200), (300, 33)]  # odd sizes, D > BD = 128, many tiles

REFERENCE_CASES = cases(
    {
        "torch": [(dtype, 37, 48, 0.5) for dtype in (F32, BF16)],
        "chunked": [
            (dtype, n, d, tau)
            for dtype in (F64, F32, BF16)
            for n, d, tau in [(37, 48, 0.5), (5, 3, 0.05)]
        ],
        # sizes that are not multiples of the blocks, small temperatures (0.01: online max);
        # rows wider than the registers hold (1030 features: chunks of 128, a ragged last one,
        # the backward's weight slab and its product; 40 pairs: several row blocks, column
        # splits, split-K)
        "triton": [
            (dtype, n, d, tau)
            for dtype in (F64, F32)
            for n, d, tau in [(37, 48, 0.5), (37, 48, 0.05), (5, 3, 0.01), (40, 100, 0.2)]
        ]
        + [(dtype, 37, 48, tau) for dtype in (BF16, F16) for tau in (0.5, 0.05)]
        + [(F64, 40, 1030, 0.2), (F64, 3, 2048, 0.5), (F32, 21, 1030, 0.5)],
        # two row blocks and ragged column tiles (2N = 74, 66), D over two k-steps and over the
        # gradient's feature split (150 > BD), 2N = 4 with D = 3, and 2N = 200 where the automatic
        # column split (132 SMs) divides the columns in two
        "cuda-emulated": [
            (dtype, n, d, tau)
            for dtype in (F32, F16, BF16)
            for n, d, tau in [(37, 48, 0.5), (33, 150, 0.1), (2, 3, 0.5), (100, 40, 0.2)]
        ],
        "cuda": [
            (dtype, n, d, tau)
            for dtype in (F32, F16, BF16)
            for n, d in CUDA_SHAPES
            for tau in (0.5, 0.07)
        ],
    }
)


@pytest.mark.parametrize("backend,dtype,n,d,tau", REFERENCE_CASES)
def test_matches_float64_reference(request, backend, dtype, n, d, tau):
    name, device = prepare(request, backend)
    check_against_reference(
        lambda a, b: fc.nt_xent(a, b, tau, backend=name),
        lambda a, b: reference.nt_xent(a, b, tau),
        pair(n, d, seed=n + d),
        dtype,
        device=device,
        weights=torch.tensor(1.3, dtype=F64),
        loosen=widen(tau),
    )


@pytest.mark.parametrize(
    "backend,dtype,tau,n,d",
    cases(
        {
            "chunked": [(F64, 0.3, 7, 5)],
            # the kernel's per-row weights: fixed shift at tau 0.3, online max at tau 0.002 in fp64
            # (20, 24): 40 rows, two row blocks and two column splits under the interpreter
            # (7, 700): rows wider than the kernels hold, in feature chunks
            "triton": [
                (F64, 0.3, 7, 5),
                (F64, 0.002, 7, 5),
                (F32, 0.2, 20, 24),
                (F64, 0.1, 7, 700),
            ],
            # grad_kernel's per-row loss weights c = g / max|g|, on correlated views
            "cuda-emulated": [(F32, 0.2, 20, 24), (BF16, 0.2, 20, 24)],
            "cuda": [(F32, 0.2, 20, 24), (BF16, 0.2, 20, 24)],
        }
    ),
)
def test_per_row_gradients(request, backend, dtype, tau, n, d):
    """reduction="none": each row's backward weighted by its own incoming gradient (both signs,
    one zero)."""
    name, device = prepare(request, backend)
    weights = torch.randn(2 * n, dtype=F64, generator=torch.Generator().manual_seed(6))
    weights[3] = 0.0
    views = pair(n, d) if dtype == F64 else correlated_views(n, d, seed=23)
    check_against_reference(
        lambda a, b: fc.nt_xent(a, b, tau, backend=name, reduction="none"),
        lambda a, b: reference.nt_xent_terms(a, b, tau),
        views,
        dtype,
        device=device,
        weights=weights,
        loosen=widen(tau),
    )


@pytest.mark.parametrize(
    "backend,dtype,n,d,tau",
    cases(
        {
            backend: [(dtype, *case) for dtype in LOWP for case in shapes]
            for backend, shapes in [
                (
                    "triton",
                    [(50, 40, 0.05), (37, 48, 0.1), (64, 128, 0.1), (37, 48, 0.2)]
                    + [(20, 1030, 0.05)],  # feature chunks
                ),
                ("cuda-emulated", [(50, 40, 0.05), (37, 48, 0.1), (37, 48, 0.2)]),
                ("cuda", [(50, 40, 0.05), (37, 48, 0.1), (64, 128, 0.1), (37, 48, 0.2)]),
            ]
        }
    ),
)
def test_low_precision_correlated_views(request, backend, dtype, n, d, tau):
    """Correlated views at tau 0.05-0.2: the kernels' rounded tile weights must not cost more
    than twice the fp32-accumulating chunked path's error (the bf16 weights of earlier kernels
    gave 600-1900% gradient errors here)."""
    name, device = prepare(request, backend)
    z_a, z_b = (t.to(device) for t in correlated_views(n, d, seed=20))
    assert_within_lowp_bounds(
        lambda a, b: fc.nt_xent(a, b, tau, backend=name),
        lambda a, b: fc.nt_xent(a, b, tau, backend="chunked"),
        lambda a, b: reference.nt_xent(a, b, tau),
        (z_a, z_b),
        dtype,
    )


@pytest.mark.parametrize(
    "backend,scale",
    cases(
        {
            backend: [1e19, 1e-30]
            for backend in ("torch", "chunked", "triton", "cuda-emulated", "cuda")
        }
    ),
)
def test_extreme_magnitudes(request, backend, scale):
    """Rows whose squared norm overflows (or underflows) float32 are normalised exactly by
    every backend: loss and gradient equal the float64 reference on the same values."""
    name, device = prepare(request, backend)
    check_against_reference(
        lambda a, b: fc.nt_xent(a, b, 0.2, backend=name),
        lambda a, b: reference.nt_xent(a, b, 0.2),
        correlated_views(9, 24, seed=22, scale=scale),
        F32,
        device=device,
        loosen=2.0,
    )


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
def test_gradcheck(request, backend):
    gradcheck(
        request,
        backend,
        lambda a, b, backend: fc.nt_xent(a, b, 0.3, backend=backend),
        [(4, 3), (4, 3)],
        seed=20,
    )


@pytest.mark.parametrize("seed", [23760, 0, 1, 2])
def test_chunked_fp32_is_accurate_near_a_zero_loss(seed):
    """Correlated views at tau = 0.05 give a loss of ~1e-7: lse - S_pos would cancel two
    numbers near 1/tau = 20 (a 0.35 absolute error on this path before the negatives were
    summed apart from the positive). chunked fp32 stays within 2x of torch's own fp32 error
    against float64, and of lightly's."""
    torch.manual_seed(seed)
    a = torch.randn(3, 32)
    b = a + 0.5 * torch.randn(3, 32)
    want = reference.nt_xent(a.double(), b.double(), 0.05)
    torch_error = (fc.nt_xent(a, b, 0.05, backend="torch").double() - want).abs()
    chunked_error = (fc.nt_xent(a, b, 0.05, backend="chunked").double() - want).abs()
    assert chunked_error <= 2 * torch_error + 1e-12 * want, (chunked_error, torch_error, want)
    assert chunked_error <= 1e-5 * want


@pytest.mark.parametrize("scale", [65536.0, None])
def test_large_incoming_gradients_at_the_fixed_shift_limit(scale):
    """Collapsed rows at |tau| = 0.025 (the fixed shift's fp32 limit, where exp(shift - lse)
    reaches ~1e32) under a GradScaler-sized gradient, and a large per-row gradient: the
    chunked backward stays finite and equals the reference (zero gradient for identical rows)."""
    z = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    for tau in (0.025, -0.025):
        grads = []
        for backend in ("torch", "chunked"):
            a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
            if scale is None:
                terms = fc.nt_xent(a, b, tau, backend=backend, reduction="none")
                (terms * torch.tensor([1e4] + [0.0] * 7)).sum().backward()
            else:
                (fc.nt_xent(a, b, tau, backend=backend) * scale).backward()
            grads.append(torch.cat([a.grad, b.grad]))
        assert torch.isfinite(grads[1]).all(), (tau, grads[1])
        torch.testing.assert_close(grads[1], grads[0], atol=1e-3, rtol=0)
