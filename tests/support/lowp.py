"""The low-precision regime users train in, shared by the kernel tests: correlated views at small
temperatures, the tiny tile weights of very large batches and nearly solved batches. Their error
bounds (twice those of the fp32-accumulating chunked path on the same rounded inputs) are in
support/tolerances.py."""

import torch
from tolerances import assert_within_lowp_bounds

import fastcluster_cl as fc
from fastcluster_cl.backends import reference
from fastcluster_cl.backends.numerics import fixed_shift_safe

F64 = torch.float64


def correlated_views(n, d, seed, scale=1.0, noise=0.3):
    """z_b = z_a + noise: the positive pair dominates at small tau, as in real training."""
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=gen, dtype=F64) * scale
    return z_a, z_a + noise * scale * torch.randn(n, d, generator=gen, dtype=F64)


def tiny_weight_case(n=40, d=24, tau=0.5, lse_value=20.0, seed=23):
    """Inputs of a backend's `grad_rows` in the regime of very large batches: every row's lse
    far above its similarities, so the weights P_ij = exp(S_ij - lse_i) ~ 1e-8 (fp16 subnormals
    unless scaled before rounding). Row losses 0 (the positives' weights 0) but row 0's, 20: a
    large batch's largest loss, which bounds the weights (the backward's scale, 2^14 as for
    any batch whose largest loss is at least 1). Returns (z in fp16, lse, row_loss, the float64
    result); compare with `tiny_weight_error`."""
    z_a, z_b = correlated_views(n, d, seed)
    z = torch.cat([z_a, z_b]).to(torch.float16)
    zn = z.to(F64) / z.to(F64).norm(dim=1, keepdim=True)
    lse = torch.full((2 * n,), lse_value, dtype=F64)
    row_loss = torch.zeros(2 * n, dtype=F64)
    row_loss[0] = 20.0
    p = torch.exp(zn @ zn.T / tau - lse[:, None])
    p.fill_diagonal_(0.0)
    pos = torch.arange(2 * n).roll(n)
    p[torch.arange(2 * n), pos] = 0.0
    a = p + p.T
    a[torch.arange(2 * n), pos] = torch.expm1(-row_loss) + torch.expm1(-row_loss[pos])
    return z, lse.float(), row_loss.float(), a @ zn


def tiny_weight_error(got, want):
    """The relative error of `tiny_weight_case`'s rows but row 0's pair (the positive's weight
    there, about -1, would hide the tiny weights' error)."""
    n = want.shape[0] // 2
    rows = [i for i in range(2 * n) if i not in (0, n)]
    return ((got.double()[rows] - want[rows]).norm() / want[rows].norm()).item()


def solved_views(n=20, d=48, seed=31, noise=0.01, cos=0.0, hard=False):
    """A nearly solved batch: n unit rows at cosine `cos` from each other (orthonormal rows
    plus a shared direction) and positives `noise` away, so that every row loss is ~1e-13 at
    tau = 0.03 (cos 0) or ~5e-11 at 0.022 (cos 0.4); the n orthonormal rows left over come
    back as bank rows, orthogonal to z_a (and, but for the noise, to z_b). `hard`: the last
    positive halfway between its anchor and the anchor before it, so that the last row of Z
    alone has a loss near log 2 (the rest ~1e-10 and below): a backward that misses the
    largest loss overflows its fp16 weights."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))[0][: 2 * n + 1]
    z_a = cos**0.5 * q[2 * n] + (1 - cos) ** 0.5 * q[:n]
    z_b = z_a + noise * torch.randn(n, d, generator=gen, dtype=F64) / d**0.5
    if hard:
        z_b[-1] = (z_a[-1] + z_a[-2]) / (z_a[-1] + z_a[-2]).norm()
    return z_a, z_b, q[n : 2 * n]


# The paths whose backward scales its tile weights, each on a nearly solved batch: the mean
# under the online max (tau 0.022) and the fixed shift (0.03), the fixed shift with one hard
# pair (the largest loss must be found: its row sits in the last row block and warp),
# per-row gradients, the memory bank, the one-pass cc and anchor objectives (their instance
# term alone).
SOLVED_CASES = [
    "online max",
    "fixed shift",
    "one hard pair",
    "per row",
    "bank",
    "cc one pass",
    "anchor one pass",
]


def assert_solved_case(case, backend, cc_objective, anchor_objective):
    """`case` of SOLVED_CASES in bf16 on `backend` (its one-pass objectives given): gradient
    and loss within twice the chunked path's error against the float64 reference."""
    online_max = case == "online max"  # at a tau whose float64 reference loss is not 0
    z_a, z_b, bank = solved_views(cos=0.4 if online_max else 0.0, hard=case == "one hard pair")
    tau = 0.022 if online_max else 0.03
    assert fixed_shift_safe(1 / tau, torch.float32) != online_max
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(2 * z_a.shape[0], dtype=F64, generator=gen)
    logits = torch.randn(z_a.shape[0], 7, dtype=F64, generator=gen).to(torch.bfloat16)
    h = torch.randn(z_a.shape[0], 12, dtype=F64, generator=gen).to(torch.bfloat16)
    centers = torch.randn(5, 12, dtype=F64, generator=gen).to(torch.bfloat16)

    def mean(name):
        return lambda a, b: fc.nt_xent(a, b, tau, backend=name)

    def terms(name):
        return lambda a, b: (fc.nt_xent(a, b, tau, backend=name, reduction="none") * w).sum()

    def banked(name):
        return lambda a, b: fc.nt_xent_bank(a, b, bank.float(), tau, backend=name)

    nt_ref = lambda a, b: reference.nt_xent(a, b, tau)  # noqa: E731
    cases = {  # (the loss on `backend`, its chunked twin, the float64 reference)
        "online max": (mean(backend), mean("chunked"), nt_ref),
        "fixed shift": (mean(backend), mean("chunked"), nt_ref),
        "one hard pair": (mean(backend), mean("chunked"), nt_ref),
        "per row": (
            terms(backend),
            terms("chunked"),
            lambda a, b: (reference.nt_xent_terms(a, b, tau) * w).sum(),
        ),
        "bank": (
            banked(backend),
            banked("chunked"),
            lambda a, b: reference.nt_xent_bank(a, b, bank, tau),
        ),
        "cc one pass": (
            lambda a, b: cc_objective(a, b, logits, logits, tau, 1.0, (1.0, 0.0))[0],
            mean("chunked"),
            nt_ref,
        ),
        "anchor one pass": (
            lambda a, b: anchor_objective(a, b, h, h, h, centers, tau, 1.0, (1.0, 0.0, 0.0))[0],
            mean("chunked"),
            nt_ref,
        ),
    }
    assert_within_lowp_bounds(*cases[case], (z_a, z_b), torch.bfloat16)
