"""The low-precision regime users train in, shared by the kernel tests: correlated views at small
temperatures, and tolerances taken from a full-precision-accumulating path on the same rounded
inputs rather than from a fixed number (a loose absolute tolerance once hid 1000% errors)."""
import torch

import fastcluster_cl as fc
from fastcluster_cl.losses import reference

F64 = torch.float64


def correlated_views(n, d, seed, scale=1.0, noise=0.3):
    """z_b = z_a + noise: the positive pair dominates at small tau, as in real training."""
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=gen, dtype=F64) * scale
    return z_a, z_a + noise * scale * torch.randn(n, d, generator=gen, dtype=F64)


def nt_xent_errors(loss_fn, z_a, z_b, tau, dtype):
    """(relative Frobenius error of the gradient, relative error of the loss) of
    loss_fn(a, b, tau) against the float64 reference on the same dtype-rounded inputs."""
    a, b = (t.to(dtype).requires_grad_() for t in (z_a, z_b))
    a64, b64 = (t.detach().to(F64).requires_grad_() for t in (a, b))
    loss = loss_fn(a, b, tau)
    loss.backward()
    want = reference.nt_xent(a64, b64, tau)
    want.backward()
    got, ref = torch.cat([a.grad, b.grad]).to(F64), torch.cat([a64.grad, b64.grad])
    assert torch.isfinite(got).all()
    return ((got - ref).norm() / ref.norm()).item(), abs(loss.item() / want.item() - 1)


def nt_xent_bounds(z_a, z_b, tau, dtype):
    """Error bounds for a backend in `dtype`: twice those of backend="chunked" (fp32
    accumulation, output rounded to dtype) on the same inputs, the gradient's floored at twice
    the rounding of the float64 reference gradient to dtype, the loss's at 1e-6."""
    grad, loss = nt_xent_errors(lambda a, b, t: fc.nt_xent(a, b, t, backend="chunked"),
                                z_a, z_b, tau, dtype)
    a, b = (t.to(dtype).to(F64).requires_grad_() for t in (z_a, z_b))
    reference.nt_xent(a, b, tau).backward()
    ref = torch.cat([a.grad, b.grad])
    rounding = ((ref.to(dtype).to(F64) - ref).norm() / ref.norm()).item()
    return 2 * max(grad, rounding), max(2 * loss, 1e-6)


def tiny_weight_case(n=40, d=24, tau=0.5, lse_value=20.0, seed=23):
    """Inputs of a backend's `grad_rows` in the regime of very large batches: every row's lse
    far above its similarities, so the weights P_ij = exp(S_ij - lse_i) ~ 1e-8 (fp16 subnormals
    unless scaled before rounding), and row losses of 0 (the positive's weight is 0). Returns
    (z in fp16, lse, row_loss, the float64 result)."""
    z_a, z_b = correlated_views(n, d, seed)
    z = torch.cat([z_a, z_b]).to(torch.float16)
    zn = z.to(F64) / z.to(F64).norm(dim=1, keepdim=True)
    lse = torch.full((2 * n,), lse_value, dtype=F64)
    p = torch.exp(zn @ zn.T / tau - lse[:, None])
    p.fill_diagonal_(0.0)
    pos = torch.arange(2 * n).roll(n)
    p[torch.arange(2 * n), pos] = 0.0
    return z, lse.float(), torch.zeros(2 * n), (p + p.T) @ zn
