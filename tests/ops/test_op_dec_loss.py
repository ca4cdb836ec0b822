"""dec_loss (DEC's KL to its sharpened target, the target held fixed) on every backend against
the float64 reference: values and gradients with the shared tolerance table (support/tolerances.py;
fp32 math, and on backend="cuda" gradients rounded once to the input dtype), odd sizes, K = 2 and
an exact zero in q (the clamped log). Edge cases (empty clusters, subnormal masses) are in
test_losses.py; the fused dec + anchor op in test_op_dec_anchor_losses.py."""

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
    check_against_reference(
        lambda q: fc.dec_loss(q, backend=name),
        reference.dec_loss,
        (assignments(n, k, 28 if not zero else 1, zero),),
        dtype,
        device=device,
        weights=torch.tensor(2.0, dtype=F64),
        kind=ROUNDED_ONCE if name == "cuda" else FP32_MATH,
    )
