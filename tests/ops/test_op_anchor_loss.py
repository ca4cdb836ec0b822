"""anchor_loss (KL of both augmented views to the clean view q0, q0 held fixed) on every backend
against the float64 reference: values and gradients with the shared tolerance table
(support/tolerances.py; fp32 math, and on backend="cuda" gradients rounded once to the input
dtype); q0 gets no gradient. The fused dec + anchor op is in test_op_dec_anchor_losses.py."""

import pytest
import torch
from assignment_cases import DEC_CASES, assignments
from backend_cases import prepare
from tolerances import F64, FP32_MATH, ROUNDED_ONCE, check_against_reference

import fastcluster_cl as fc
from fastcluster_cl.backends import reference


@pytest.mark.parametrize("backend,dtype,n,k,zero", DEC_CASES)
def test_matches_float64_reference(request, backend, dtype, n, k, zero):
    name, device = prepare(request, backend)
    # with a zero, at the same place in q0, q_a, q_b (the clamped log then meets q0 = 0)
    inputs = tuple(assignments(n, k, seed, zero) for seed in (29, 30, 31))
    check_against_reference(
        lambda q0, qa, qb: fc.anchor_loss(q0, qa, qb, backend=name),
        reference.anchor_loss,
        inputs,
        dtype,
        device=device,
        weights=torch.tensor(2.0, dtype=F64),
        kind=ROUNDED_ONCE if name == "cuda" else FP32_MATH,
    )


@pytest.mark.parametrize("backend", ["triton"])  # torch: test_losses.py; chunked is torch
def test_gradcheck(request, backend):
    """(DEC has none: its target p is held fixed, which finite differences see.)"""
    name, device = prepare(request, backend)
    q0, qa, qb = (assignments(5, 3, seed).to(device) for seed in (20, 21, 22))
    assert torch.autograd.gradcheck(
        lambda x, y: fc.anchor_loss(q0, x, y, backend=name),
        (qa.requires_grad_(), qb.requires_grad_()),
    )
