"""The low-precision regime users train in, shared by the kernel tests: correlated views at small
temperatures, and the tiny tile weights of very large batches. Their error bounds (twice those of
the fp32-accumulating chunked path on the same rounded inputs) are in support/tolerances.py."""

import torch

F64 = torch.float64


def correlated_views(n, d, seed, scale=1.0, noise=0.3):
    """z_b = z_a + noise: the positive pair dominates at small tau, as in real training."""
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=gen, dtype=F64) * scale
    return z_a, z_a + noise * scale * torch.randn(n, d, generator=gen, dtype=F64)


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
