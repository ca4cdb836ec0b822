"""dec_anchor_losses ((dec_loss(q0), anchor_loss(q0, q_a, q_b)), fused in one launch on triton,
the two ops elsewhere) on every backend against the float64 reference: values and the gradients
of 0.7 dec + 1.3 anchor (q0 receives DEC's gradient only), with the shared tolerance table
(support/tolerances.py)."""

import pytest
import torch
from assignment_cases import assignments
from backend_cases import cases, prepare
from tolerances import BF16, F32, F64, FP32_MATH, check_against_reference

import fastcluster_cl as fc
from fastcluster_cl.backends import reference
from fastcluster_cl.functional import dec_anchor_losses

WEIGHTS = torch.tensor([0.7, 1.3], dtype=F64)


def inputs(n=37, k=10):
    return tuple(assignments(n, k, seed) for seed in (44, 45, 46))


def reference_pair(q0, qa, qb):
    return torch.stack([reference.dec_loss(q0), reference.anchor_loss(q0, qa, qb)])


@pytest.mark.parametrize(
    "backend,dtype",
    cases(
        {
            "torch": [F32],
            "chunked": [F64],
            "triton": [F64, F32, BF16],
            "cuda-emulated": [F32, BF16],
            "cuda": [F32, BF16],
        }
    ),
)
def test_matches_float64_reference(request, backend, dtype):
    name, device = prepare(request, backend)
    check_against_reference(
        lambda q0, qa, qb: torch.stack(dec_anchor_losses(q0, qa, qb, backend=name)),
        reference_pair,
        inputs(),
        dtype,
        device=device,
        weights=WEIGHTS,
        kind=FP32_MATH,
    )


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
def test_fused_triton_equals_the_two_triton_ops(request, dtype):
    """The fused kernel computes what dec_loss and anchor_loss compute, to the last bits."""
    name, device = prepare(request, "triton")
    x = [t.to(device, dtype).requires_grad_() for t in inputs()]
    y = [t.detach().clone().requires_grad_() for t in x]
    got = torch.stack(dec_anchor_losses(*x, backend=name))
    want = torch.stack([fc.dec_loss(y[0], backend=name), fc.anchor_loss(*y, backend=name)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (got * WEIGHTS.to(got)).sum().backward()
    (want * WEIGHTS.to(want)).sum().backward()
    for a, b in zip(x, y):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
