"""student_t (DEC's soft assignment) on every backend against the float64 reference: q and the
gradients of a weighted sum of q (a generic upstream gradient) for h and the centers, with the
shared tolerance table (support/tolerances.py; fp32 math: fp32's value tolerance for every input
dtype). Center tiling and limits of the Triton kernel are in test_triton_kernels.py, the
independent implementation in test_losses.py."""

import pytest
import torch
from backend_cases import cases, gradcheck, prepare
from tolerances import ACCUMULATION, BF16, F16, F32, F64, FP32_MATH, check_against_reference

import fastcluster_cl as fc
from fastcluster_cl.backends import reference


def randn(*shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


TRITON_SHAPES = [(37, 10, 48, 1.0), (6, 2, 3, 2.0), (70, 13, 100, 1.0)]
# K = 45 gives the CUDA kernel's lanes two columns each; F = 200 spans two feature slices of
# the center gradient.
CUDA_SHAPES = [(37, 10, 48, 1.0), (9, 45, 200, 0.7)]


@pytest.mark.parametrize(
    "backend,dtype,n,k,f,alpha",
    cases(
        {
            "torch": [(F32, 37, 10, 48, 1.0)],
            "chunked": [(dtype, 37, 10, 48, 1.0) for dtype in (F64, BF16)],
            "triton": [(dtype, *shape) for dtype in (F64, F32, BF16) for shape in TRITON_SHAPES],
            "cuda-emulated": [
                (dtype, *shape) for dtype in (F32, F16, BF16) for shape in CUDA_SHAPES
            ],
            "cuda": [
                (dtype, *shape)
                for dtype in (F32, F16, BF16)
                for shape in [(37, 10, 48, 1.0), (300, 45, 200, 0.7)]
            ],
        }
    ),
)
def test_matches_float64_reference(request, backend, dtype, n, k, f, alpha):
    name, device = prepare(request, backend)
    check_against_reference(
        lambda h, mu: fc.student_t(h, mu, alpha, backend=name),
        lambda h, mu: reference.student_t(h, mu, alpha),
        (randn(n, f, seed=23), randn(k, f, seed=24, scale=0.5)),
        dtype,
        device=device,
        weights=randn(n, k, seed=25),
        kind=FP32_MATH,
        out_dtype=ACCUMULATION,
    )


@pytest.mark.parametrize("backend", ["triton"])  # torch: test_losses.py; chunked is torch
def test_gradcheck(request, backend):
    gradcheck(
        request,
        backend,
        lambda h, mu, backend: fc.student_t(h, mu, 0.7, backend=backend),
        [(5, 4), (3, 4)],
        seed=18,
    )
