"""`cc_objective` (Contrastive Clustering's whole loss in one pass) on backends "triton" and
"chunked" against `reference.cc_objective` in float64: values and every gradient, at small
temperatures on correlated views, one-hot and uniform softmax rows, extreme norms, a zero-mass
column, bf16 and fp16 inputs. The CUDA twin's: backends/test_cuda_objectives.py; launches and
ops: backends/test_triton_objectives.py."""

import pytest
import torch
from objectives import (
    F64,
    cc_call,
    cc_inputs,
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
    "fused", [kernels.cc_objective, chunked.cc_objective], ids=["triton", "chunked"]
)


@FUSED
@pytest.mark.parametrize("k", [10, 7, 33])  # 33: 64-wide cluster tiles
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5])
def test_cc_float64(k, tau, fused):
    compare(
        cc_call,
        fused,
        reference.cc_objective,
        cc_inputs(k=k),
        [F64] * 4,
        1e-10,
        [1e-10] * 4,
        tau=tau,
    )


@FUSED
def test_cc_float32(fused):
    compare(
        cc_call,
        fused,
        reference.cc_objective,
        cc_inputs(k=7),
        [torch.float32] * 4,
        1e-5,
        [1e-5] * 4,
        tau=0.1,
    )


@pytest.mark.parametrize("k", [600, 2100])
def test_cc_chunked_many_clusters(k):
    """Chunked with 2K past the old 1024-row tile (one autograd node, the cluster side one op
    each way) and past `chunked.CLUSTER_GRAM_ROWS` (the chunked NT-Xent on the cluster rows)."""
    compare(
        cc_call,
        chunked.cc_objective,
        reference.cc_objective,
        cc_inputs(n=9, k=k),
        [torch.float32] * 4,
        1e-5,
        [1e-5] * 4,
        tau=0.1,
    )


@FUSED
@pytest.mark.parametrize("scale", [50.0, 0.01])
def test_cc_assignment_extremes(scale, fused):
    """Logits x50 (nearly one-hot softmax) and x0.01 (nearly uniform)."""
    compare(
        cc_call,
        fused,
        reference.cc_objective,
        cc_inputs(k=10, scale=scale),
        [F64] * 4,
        1e-10,
        [1e-9] * 4,
        tau=0.5,
    )


@FUSED
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cc_low_precision(dtype, fused):
    inputs = cc_inputs(k=10)
    dtypes = [dtype] * 4
    value_tol, grad_tols = low_precision_bounds(
        cc_call, reference.cc_objective, inputs, dtypes, tau=0.1
    )
    compare(
        cc_call,
        fused,
        reference.cc_objective,
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
    cc = cc_inputs(n=20, d=24, k=7)
    for z in cc[:2]:
        z[3] *= 1e19
        z[11] *= 1e-30
    compare(
        cc_call,
        fused,
        reference.cc_objective,
        cc,
        [torch.float32] * 4,
        1e-5,
        [1e-5] * 4,
        tau=0.1,
    )


@FUSED
def test_zero_mass_cluster(fused):
    """A CC column whose softmax underflows (P_k = 0, the column norm clamped): finite, and
    equal to the reference computed in float32 (which underflows alike)."""
    cc = cc_inputs(n=20, d=24, k=7)
    for logits in cc[2:]:
        logits[:, 4] -= 200.0
    value, grads = run(cc_call, fused, cc, [torch.float32] * 4, tau=0.5)
    want, want_grads = run(cc_call, reference.cc_objective, cc, [torch.float32] * 4, tau=0.5)
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want_grads):
        assert torch.isfinite(g).all() and rel(g, w) < 1e-4
