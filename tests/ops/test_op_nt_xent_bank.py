"""nt_xent_bank (NT-Xent against a memory bank) on every backend against the float64 reference:
values and gradients (mean and per-row) with the shared tolerance table (support/tolerances.py),
odd sizes (ragged row blocks and bank tiles, D over the gradient's feature split), tau 0.05 and
0.5 (0.01: below fp32's fixed-shift range, the online max), correlated views, fp16/bf16 within
twice the chunked path's error. The module, lightly parity and the bank's update rules are in
test_nt_xent_bank.py."""

import pytest
import torch
from backend_cases import cases, prepare
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


def bank_case(n, m, d, seed):
    """Correlated views (float64) and an fp32 bank of unit rows (the module's dtype)."""
    z_a, z_b = correlated_views(n, d, seed, noise=0.5)
    gen = torch.Generator().manual_seed(seed + 1)
    bank = torch.nn.functional.normalize(torch.randn(m, d, generator=gen, dtype=F64), dim=1)
    return z_a, z_b, bank.float()


# (n, M, d): ragged row block and bank tile; the bank over three tiles with D over the feature
# split; a single row against a single bank row; two row blocks against exactly one tile.
SHAPES = [(37, 45, 20), (5, 130, 150), (1, 1, 3), (70, 64, 16)]
REFERENCE_CASES = cases(
    {
        "torch": [(F32, 37, 45, 20, 0.5, "none")],
        "chunked": [
            (dtype, 37, 45, 20, tau, "none") for dtype in (F64, F32, BF16) for tau in (0.5, 0.05)
        ],
        # 0.01 in fp32 only: in fp64 the reference's own 1 - P_pos (P_pos ~ 1 - 1e-9) is the error
        "triton": [
            (dtype, 37, 45, 20, tau, reduction)
            for dtype, tau in [(F64, 0.5), (F32, 0.5), (F32, 0.01)]
            for reduction in ("mean", "none")
        ],
        # every dtype at both temperatures, every shape at both (the emulation is slow)
        "cuda-emulated": [
            (dtype, *shape, (0.5, 0.05)[(i + j) % 2], "none")
            for j, dtype in enumerate((F32, F16, BF16))
            for i, shape in enumerate(SHAPES)
        ]
        + [(F32, 37, 45, 20, tau, "mean") for tau in (0.5, 0.01)],
        "cuda": [
            (dtype, *shape, tau, reduction)
            for dtype in (F32, F16, BF16)
            for shape in SHAPES + [(300, 4096, 128)]
            for tau in (0.5, 0.05, 0.01)
            for reduction in ("mean", "none")
        ],
    }
)


@pytest.mark.parametrize("backend,dtype,n,m,d,tau,reduction", REFERENCE_CASES)
def test_matches_float64_reference(request, backend, dtype, n, m, d, tau, reduction):
    name, device = prepare(request, backend)
    z_a, z_b, bank = bank_case(n, m, d, seed=n + m)
    bank = bank.to(device)
    weights = (
        torch.rand(n, dtype=F64, generator=torch.Generator().manual_seed(12)) - 0.3
        if reduction == "none"
        else torch.tensor(1.3, dtype=F64)
    )
    check_against_reference(
        lambda a, b: fc.nt_xent_bank(a, b, bank, tau, backend=name, reduction=reduction),
        lambda a, b: (
            reference.nt_xent_bank_terms(a, b, bank.double(), tau)
            if reduction == "none"
            else reference.nt_xent_bank(a, b, bank.double(), tau)
        ),
        (z_a, z_b),
        dtype,
        device=device,
        weights=weights,
        loosen=widen(tau),
    )


def lowp_case(n=48, m=200, d=32, seed=11):
    """Low precision in the regime users train in: correlated views at small temperatures, the
    bank holding earlier batches' normalised rows (fp32, lightly's dtype)."""
    z_a, z_b = correlated_views(n, d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    bank = torch.nn.functional.normalize(
        correlated_views(m, d, seed + 2)[1] + torch.randn(m, d, generator=g, dtype=F64), dim=1
    ).float()
    return z_a, z_b, bank


@pytest.mark.parametrize(
    "backend,dtype,tau",
    cases(
        {
            backend: [(dtype, tau) for dtype in LOWP for tau in (0.05, 0.1, 0.2)]
            for backend in ("triton", "cuda-emulated", "cuda")
        }
    ),
)
def test_low_precision_within_twice_chunked(request, backend, dtype, tau):
    name, device = prepare(request, backend)
    z_a, z_b, bank = (t.to(device) for t in lowp_case())
    assert_within_lowp_bounds(
        lambda a, b: fc.nt_xent_bank(a, b, bank, tau, backend=name),
        lambda a, b: fc.nt_xent_bank(a, b, bank, tau, backend="chunked"),
        lambda a, b: reference.nt_xent_bank(a, b, bank.double(), tau),
        (z_a, z_b),
        dtype,
    )


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton", "cuda-emulated"])
def test_reductions_and_no_gradient_to_the_bank(request, backend):
    name, device = prepare(request, backend)
    dtype = F32 if name == "cuda" else F64
    g = torch.Generator().manual_seed(6)
    z_a, z_b = (torch.randn(5, 4, generator=g, dtype=dtype).to(device) for _ in range(2))
    bank = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=dtype), dim=1)
    bank = bank.to(device).requires_grad_()
    terms = fc.nt_xent_bank(z_a.requires_grad_(), z_b, bank, 0.3, backend=name, reduction="none")
    assert terms.shape == (5,)
    mean = fc.nt_xent_bank(z_a, z_b, bank, 0.3, backend=name)
    total = fc.nt_xent_bank(z_a, z_b, bank, 0.3, backend=name, reduction="sum")
    rtol = 1e-12 if dtype == F64 else 1e-6
    torch.testing.assert_close(terms.mean(), mean, rtol=rtol, atol=0)
    torch.testing.assert_close(terms.sum(), total, rtol=rtol, atol=0)
    mean.backward()
    assert bank.grad is None and z_a.grad is not None
