"""The losses trace under torch.compile (value checks are skipped while tracing) and give the
eager values and gradients."""
import pytest
import torch

import fastcluster_cl as fc


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_compiled_nt_xent_matches_eager(backend):
    torch._dynamo.reset()
    z_a = torch.randn(37, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    z_b = torch.randn(37, 16, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(lambda a, b: fc.nt_xent(a, b, 0.5, backend=backend))
    got = compiled(z_a, z_b)
    (g_got,) = torch.autograd.grad(got, z_a)
    want = fc.nt_xent(z_a, z_b, 0.5, backend=backend)
    (g_want,) = torch.autograd.grad(want, z_a)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
