"""CC's cluster loss on the Triton backend above one epilogue tile (2K > 64) and above the fused
statistics kernel (K > 64): the Gram op pair (Q from one Triton pass, its Gram from cuBLAS)
and the row-tiled epilogue against the float64 reference, in the regime users train in
(temperatures 0.05-0.5, correlated views, one-hot and near-uniform assignments, empty
clusters), low precision within twice the chunked path's error, an asymmetric Gram,
run-to-run determinism and opcheck. Without CUDA the kernels
run under TRITON_INTERPRET=1 (tests/conftest.py)."""

import math

import pytest
import torch
from tensor_cores import EmulatedTensorCores
from tolerances import BF16, F32, F64, assert_within_lowp_bounds, check_against_reference, widen

import fastcluster_cl as fc
from fastcluster_cl.backends import reference
from fastcluster_cl.backends.numerics import NORM_EPS, bf16_parts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _module():
    import importlib

    return importlib.import_module("fastcluster_cl.kernels.cc_cluster")


def logits(n, k, seed, regime):
    """Two views' logits: correlated (the second a small perturbation of the first), peaked to
    one-hot, near-uniform, or with an empty cluster (a column 800 below the rest)."""
    g = torch.Generator().manual_seed(seed)
    a = 2.0 * torch.randn(n, k, generator=g, dtype=F64)
    b = a + 0.2 * torch.randn(n, k, generator=g, dtype=F64)
    if regime == "one-hot":
        a, b = 60.0 * a, 60.0 * b
    elif regime == "uniform":
        a, b = 1e-3 * a, 1e-3 * b
    elif regime == "empty":
        a[:, 1] -= 800.0
        b[:, 1] -= 800.0
    return a, b


def triton_loss(tau):
    return lambda a, b: fc.cc_cluster_loss(a, b, tau, backend="triton")


def reference_loss(tau):
    return lambda a, b: reference.cc_cluster_loss(a, b, tau)


@pytest.mark.parametrize("k", [33, 100])  # one epilogue tile of 2K rows too few; two column tiles
@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("regime", ["correlated", "one-hot", "uniform", "empty"])
def test_tiled_path_matches_float64_reference(k, tau, regime):
    """fp64 and fp32 against the reference on the same rounded inputs (the shared tolerance
    table, widened for small tau). Near-uniform assignments put every cosine near 1 and cost
    every fp32 path ~1e-4 of the gradient (the reference's own run in fp32 too): there fp32 is
    held to twice the chunked path's error. N = 29 is no multiple of any block."""
    inputs = logits(29, k, 3, regime)
    check_against_reference(
        triton_loss(tau), reference_loss(tau), inputs, F64, device=DEVICE, loosen=widen(tau)
    )
    if regime == "uniform":
        assert_within_lowp_bounds(
            triton_loss(tau),
            lambda a, b: fc.cc_cluster_loss(a, b, tau, backend="chunked"),
            reference_loss(tau),
            [t.to(DEVICE) for t in inputs],
            F32,
        )
    else:
        check_against_reference(
            triton_loss(tau), reference_loss(tau), inputs, F32, device=DEVICE, loosen=widen(tau)
        )


@pytest.mark.parametrize("dtype", [F32, F64])
def test_assignments_and_their_parts_in_one_pass(dtype):
    """`_assignments_kernel` at K = 300 (two column chunks, the online max across them): both
    views' softmaxes against float64 within a few roundings of each exponent (the GPU's exp2
    of x - max: |x - max| eps), rows whose first chunk is -inf or whose logits are all near
    the dtype's lowest; their bf16 parts exactly `numerics.bf16_parts` of Q (fp32)."""
    a, b = (t.to(dtype) for t in logits(29, 300, 4, "correlated"))
    a[3, 290] = 40.0  # the row's largest logit in its last chunk
    a[5, :256] = float("-inf")  # the first chunk adds nothing
    b[7] = b[7] + 0.5 * torch.finfo(dtype).min  # far below any fixed starting max
    parts = dtype == F32
    q, split = _module()._assignments(a.to(DEVICE), b.to(DEVICE), parts)
    want = torch.cat([a.double().softmax(1), b.double().softmax(1)], 1)
    x = torch.cat([a, b], 1).double()
    below_max = torch.cat(
        [x[:, :300] - x[:, :300].amax(1, True), x[:, 300:] - x[:, 300:].amax(1, True)], 1
    )
    bound = (8 + 2 * below_max.abs().nan_to_num(posinf=0.0)) * torch.finfo(dtype).eps * want
    assert q.dtype == dtype and ((q.cpu().double() - want).abs() <= bound).all()
    if parts:
        assert all(torch.equal(got, p) for got, p in zip(split, bf16_parts(q)))
    else:
        assert split is None


def test_gram_path_by_bf16_parts_matches_float64_reference(monkeypatch):
    """Above 64 clusters with the Gram and the backward product as bf16 parts (where they pay
    on a GPU; here forced, products emulated): fp32 values and gradients against float64."""
    module = _module()
    monkeypatch.setattr(module, "products_by_parts", lambda m, k, n, dtype, *_, **__: dtype == F32)
    for name in ("parts_gram", "parts_product"):  # inside the op (a dispatch mode stops there)
        monkeypatch.setattr(module, name, _emulated(getattr(module, name)))
    for regime in ("correlated", "one-hot"):
        inputs = logits(29, 100, 5, regime)
        check_against_reference(triton_loss(0.5), reference_loss(0.5), inputs, F32, device=DEVICE)


def _emulated(product):
    def run(*args):
        with EmulatedTensorCores():
            return product(*args)

    return run


@pytest.mark.parametrize("tau", [0.05, 0.5])
@pytest.mark.parametrize("regime", ["correlated", "one-hot", "uniform"])
def test_tiled_path_bf16_within_twice_the_chunked_error(tau, regime):
    """bf16 logits: within twice the error of the fp32-accumulating chunked path on the same
    rounded inputs (values and gradients)."""
    inputs = [t.to(DEVICE) for t in logits(29, 100, 4, regime)]
    assert_within_lowp_bounds(
        triton_loss(tau),
        lambda a, b: fc.cc_cluster_loss(a, b, tau, backend="chunked"),
        reference_loss(tau),
        inputs,
        BF16,
    )


def epilogue_reference(gram, colsum, n, tau):
    """The epilogue's loss from a Gram (any, not only symmetric) in torch, float64."""
    k2 = gram.shape[0]
    rows = torch.arange(k2)
    d = gram.diagonal().clamp_min(NORM_EPS**2).sqrt()
    s = gram / (d[:, None] * d[None, :]) / tau
    lse = torch.logsumexp(s.masked_fill(torch.eye(k2, dtype=torch.bool), float("-inf")), 1)
    positives = s[rows, (rows + k2 // 2) % k2]
    p = colsum / n
    entropy = (p * torch.log(p.clamp_min(torch.finfo(F64).tiny))).sum()
    return (lse - positives).sum() / k2 + 2 * math.log(k2 // 2) + entropy


def epilogue_gram(k, case):
    """(Gram, column sums, temperature) of 2K columns over 40 rows: softmax columns plus an
    asymmetric perturbation; one column scaled by 1e-14 (its squared norm below eps^2, clamped,
    with other entries not zero); or signed, cosines of -2 to -3 at tau = 0.01 (not a Gram of
    any columns: the online lse must not assume S >= -1/tau)."""
    g = torch.Generator().manual_seed(7)
    q = torch.softmax(2 * torch.randn(40, 2 * k, generator=g, dtype=F64), 1)
    noise = 1e-3 * torch.rand(2 * k, 2 * k, generator=g, dtype=F64)
    if case == "clamped":
        q[:, 1] *= 1e-14  # G_11 about 1e-30, its cosines about 1e-3
        noise[1], noise[:, 1] = 0.0, 0.0
    gram = q.T @ q + noise
    if case == "signed":
        gram = -2 - torch.rand(2 * k, 2 * k, generator=g, dtype=F64)
        gram.diagonal().fill_(1.0)
        return gram, q.sum(0), 0.01
    return gram, q.sum(0), 0.3


@pytest.mark.parametrize("k", [5, 70])  # one program; row blocks over column tiles
@pytest.mark.parametrize("case", ["asymmetric", "clamped", "signed"])
def test_epilogue_on_any_gram(k, case):
    """The epilogue's gradient is with respect to each entry as given: S_ji is read from G_ji,
    not assumed equal to S_ij (a Gram's triangles may round differently); a clamped norm's
    diagonal gets no gradient; any S, however negative, keeps the lse exact."""
    gram, colsum, tau = epilogue_gram(k, case)
    x = [t.to(DEVICE).clone().requires_grad_() for t in (gram, colsum)]
    y = [t.clone().requires_grad_() for t in (gram, colsum)]
    got = _module().cluster_epilogue(*x, 40, tau)[0]
    want = epilogue_reference(*y, 40, tau)
    got.backward()
    want.backward()
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    for a, b in zip(x, y):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-10, atol=1e-13)
    if case == "clamped":
        assert x[0].grad[1, 1] == 0 and x[0].grad[1, 0] != 0


def test_tiled_path_is_deterministic():
    """Row blocks write their own rows; the shares are summed in one fixed order."""
    a, b = (t.to(DEVICE, F32) for t in logits(29, 100, 5, "correlated"))
    runs = []
    for _ in range(2):
        x = [a.clone().requires_grad_(), b.clone().requires_grad_()]
        loss = fc.cc_cluster_loss(*x, 0.5, backend="triton")
        loss.backward()
        runs.append((loss, *(t.grad for t in x)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_the_fused_statistics_keep_their_limit():
    """The stats kernel holds at most MAX_CLUSTERS clusters (its Gram in registers); the loss
    takes the Gram op pair above, the same function."""
    module = _module()
    a, b = (t.to(DEVICE, F32) for t in logits(8, module.MAX_CLUSTERS + 1, 6, "correlated"))
    with pytest.raises(ValueError, match="at most 64 clusters"):
        module.cluster_stats(a, b)
    torch.testing.assert_close(
        fc.cc_cluster_loss(a, b, 0.5, backend="triton"),
        fc.cc_cluster_loss(a, b, 0.5, backend="torch"),
    )


def test_opcheck_the_tiled_epilogue():
    """The epilogue op pair past one program (2K = 80): schema, fake tensors, AOT dispatch."""
    module = _module()
    g = torch.Generator().manual_seed(8)
    q = torch.softmax(torch.randn(12, 80, generator=g, dtype=F64), 1).to(DEVICE)
    gram, colsum = (q.T @ q).requires_grad_(), q.sum(0).requires_grad_()
    torch.library.opcheck(module.cluster_epilogue, (gram, colsum, 12, 0.4))
    _, lse = module.cluster_epilogue(gram.detach(), colsum.detach(), 12, 0.4)
    grad = torch.tensor(1.5, dtype=F64, device=DEVICE)
    torch.library.opcheck(
        module.cluster_epilogue_backward,
        (gram.detach(), colsum.detach(), 12, 0.4, lse, grad),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
