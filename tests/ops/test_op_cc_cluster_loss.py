"""cc_cluster_loss (Contrastive Clustering's cluster-level loss) on every backend against the
float64 reference: values and gradients with the shared tolerance table (support/tolerances.py),
odd sizes, K = 2, peaked logits. The independent implementation is in test_losses.py."""

import pytest
import torch
from backend_cases import cases, gradcheck, prepare
from tolerances import BF16, F32, F64, check_against_reference

import fastcluster_cl as fc
from fastcluster_cl.backends import reference


def logits(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(n, k, generator=gen, dtype=F64)


SHAPES = [(37, 10, 1.0), (6, 2, 0.5), (70, 13, 0.3)]


@pytest.mark.parametrize(
    "backend,dtype,n,k,tau",
    cases(
        {
            "torch": [(F32, 37, 10, 1.0)],
            # K = 600: one op each way past the old 1024-row tile; K = 2100: 2K above
            # chunked.CLUSTER_GRAM_ROWS, the chunked NT-Xent on the cluster rows
            "chunked": [(dtype, 37, 10, 1.0) for dtype in (F64, F32, BF16)]
            + [(F32, 37, 600, 0.5), (BF16, 37, 600, 0.5), (F32, 9, 2100, 0.5)],
            # K = 100: the Gram op pair and the row-tiled epilogue (tests/backends/
            # test_cc_cluster_tiled.py holds the regimes)
            # N = 600: 19 statistics programs, merged 16 partials a step; K = 20: 3 row programs;
            # K = 16 and 64: the tile's width, 2 and 8 row programs
            "triton": [
                (dtype, *shape) for dtype in (F64, F32, BF16) for shape in SHAPES + [(37, 100, 0.5)]
            ]
            + [(F32, 600, 20, 0.5), (F32, 40, 16, 0.5), (F32, 40, 64, 0.5)],
            "cuda-emulated": [(dtype, 37, 10, 1.0) for dtype in (F32, BF16)],
            "cuda": [(dtype, *shape) for dtype in (F32, BF16) for shape in SHAPES],
        }
    ),
)
def test_matches_float64_reference(request, backend, dtype, n, k, tau):
    name, device = prepare(request, backend)
    check_against_reference(
        lambda a, b: fc.cc_cluster_loss(a, b, tau, backend=name),
        lambda a, b: reference.cc_cluster_loss(a, b, tau),
        (logits(n, k, 14), logits(n, k, 15)),
        dtype,
        device=device,
    )


@pytest.mark.parametrize("backend", ["chunked", "triton", "cuda-emulated"])
def test_one_hot_assignments_stay_finite(request, backend):
    """Logits so peaked that the softmax is one-hot in float32 (every cluster used: an empty
    one has 0 log 0 in the entropy term, whose gradient is NaN in the reference too)."""
    name, device = prepare(request, backend)
    labels = torch.arange(40) % 10
    peaked = torch.nn.functional.one_hot(labels, 10).to(F64) * 200.0
    check_against_reference(
        lambda a, b: fc.cc_cluster_loss(a, b, 1.0, backend=name),
        lambda a, b: reference.cc_cluster_loss(a, b, 1.0),
        (peaked, peaked.roll(1, 0)),
        F32,
        device=device,
    )


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
def test_gradcheck(request, backend):
    gradcheck(
        request,
        backend,
        lambda a, b, backend: fc.cc_cluster_loss(a, b, 0.7, backend=backend),
        [(5, 3), (5, 3)],
        seed=22,
    )
