"""dec_loss (DEC's KL to its sharpened target, the target held fixed) on every backend against
the float64 reference: values and gradients with the shared tolerance table (support/tolerances.py;
fp32 math, and on backend="cuda" gradients rounded once to the input dtype), odd sizes, K = 2 and
an exact zero in q (the clamped log). Edge cases (empty clusters, subnormal masses) are in
test_losses.py; the fused dec + anchor op in test_op_dec_anchor_losses.py."""

import pytest
import torch
from backend_cases import cases, prepare
from tolerances import BF16, F16, F32, F64, FP32_MATH, ROUNDED_ONCE, check_against_reference

import fastcluster_cl as fc
from fastcluster_cl.backends import reference


def assignments(n, k, seed, zero=False):
    """Rows of softmax(2 randn) (float64); zero: q[0, 1] = 0 exactly, rows renormalised."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.softmax(2.0 * torch.randn(n, k, generator=gen, dtype=F64), dim=1)
    if zero:
        q[0, 1] = 0.0
    return q / q.sum(1, keepdim=True)


# (dtype, n, k, q with an exact zero)
DEC_CASES = cases(
    {
        "torch": [(F32, 37, 10, False)],
        "chunked": [(F64, 37, 10, False)],
        "triton": [
            (dtype, n, k, False)
            for dtype in (F64, F32, BF16)
            for n, k in [(37, 10), (6, 2), (70, 13)]
        ],
        "cuda-emulated": [
            (dtype, n, k, True) for dtype in (F32, F16, BF16) for n, k in [(37, 10), (20, 45)]
        ],
        "cuda": [
            (dtype, n, k, True)
            for dtype in (F32, F16, BF16)
            for n, k in [(37, 10), (3, 2), (129, 40)]
        ],
    }
)


@pytest.mark.parametrize("backend,dtype,n,k,zero", DEC_CASES)
def test_matches_float64_reference(request, backend, dtype, n, k, zero):
    name, device = prepare(request, backend)
    check_against_reference(
        lambda q: fc.dec_loss(q, backend=name),
        reference.dec_loss,
        (assignments(n, k, 28 if not zero else 1, zero),),
        dtype,
        device=device,
        weights=torch.tensor(2.0, dtype=F64),
        kind=ROUNDED_ONCE if name == "cuda" else FP32_MATH,
    )
