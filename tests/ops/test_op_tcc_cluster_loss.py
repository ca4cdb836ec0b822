"""tcc_cluster_loss (TCC's cluster-level contrast, the op behind the functional's Gumbel-softmax
draw) on every backend against the float64 reference: values and gradients for the samples y,
the features h and the assignment probabilities q, with the shared tolerance table
(support/tolerances.py). The whole TCC loss (sampling, priors) is tested in test_tcc.py."""

import pytest
import torch
from backend_cases import cases, prepare
from tolerances import F32, F64, check_against_reference

from fastcluster_cl.backends import dispatch, reference


def tcc_inputs(n=37, k=10, f=24, seed=33):
    gen = torch.Generator().manual_seed(seed)
    y = [torch.softmax(torch.randn(n, k, generator=gen, dtype=F64), 1) for _ in range(2)]
    h = [torch.randn(n, f, generator=gen, dtype=F64) for _ in range(2)]
    q = [torch.softmax(torch.randn(n, k, generator=gen, dtype=F64), 1) for _ in range(2)]
    return (*y, *h, *q)


@pytest.mark.parametrize(
    "backend,dtype,tau",
    cases(
        {
            "torch": [(F32, 0.8)],
            "chunked": [(F64, 0.8), (F32, 0.5)],
            "triton": [(F64, 0.5), (F32, 0.8)],
            "cuda-emulated": [(F32, 0.8)],
            "cuda": [(F32, 0.8)],
        }
    ),
)
def test_matches_float64_reference(request, backend, dtype, tau):
    name, device = prepare(request, backend)
    op = dispatch.implementation("tcc_cluster_loss", name, torch.device(device))
    check_against_reference(
        lambda *x: op(*x, tau),
        lambda *x: reference.tcc_cluster_loss(*x, tau),
        tcc_inputs(),
        dtype,
        device=device,
    )
