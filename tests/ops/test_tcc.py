"""TCC (fastcluster_cl.functional.tcc_loss, TCCHead) against an independent float64 NumPy
implementation (support/independent.py): values, gradients (central differences of the NumPy
loss), the backends' agreement, the sampling and the head's initialisation."""

import independent
import numpy as np
import pytest
import torch

import fastcluster_cl as fc
from fastcluster_cl.models.heads import TCCHead, max_separated

F64 = torch.float64
ARGS = dict(
    instance_temperature=0.4, cluster_temperature=0.8, gumbel_temperature=0.3, residual_weight=0.1
)


def problem(n=7, k=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_a, z_b, r_a, r_b = (torch.randn(n, d, generator=g, dtype=F64) for _ in range(4))
    centers = torch.randn(k, d, generator=g, dtype=F64)
    c = torch.nn.functional.normalize(centers, dim=1)
    logits_a = torch.nn.functional.normalize(z_a, dim=1) @ c.T
    logits_b = torch.nn.functional.normalize(z_b, dim=1) @ c.T
    pi_a = torch.softmax(torch.randn(n, k, generator=g, dtype=F64) * 2, 1)
    pi_b = torch.softmax(torch.randn(n, k, generator=g, dtype=F64) * 2, 1)
    return [z_a, z_b, logits_a, logits_b, centers, r_a, r_b], (pi_a, pi_b)


def want(x, samples, prior):
    arrays = [t.detach().numpy() for t in x] + [s.numpy() for s in samples]
    return independent.tcc_loss(
        *arrays,
        ARGS["instance_temperature"],
        ARGS["cluster_temperature"],
        ARGS["gumbel_temperature"],
        ARGS["residual_weight"],
        prior,
    )


@pytest.mark.parametrize("backend", ["torch", "chunked"])
@pytest.mark.parametrize("prior", ["kl", "marginal"])
def test_tcc_loss_matches_independent(backend, prior):
    x, samples = problem()
    got = fc.tcc_loss(*x, samples=samples, prior=prior, backend=backend, **ARGS)
    expected = want(x, samples, prior)
    assert set(got.parts) == set(expected)
    for name, value in expected.items():
        assert float(got.parts[name]) == pytest.approx(value, rel=1e-12), name
    assert float(got.total) == pytest.approx(sum(expected.values()), rel=1e-12)


@pytest.mark.parametrize("prior", ["kl", "marginal"])
def test_tcc_loss_gradients_match_independent(prior):
    """Autograd of every part w.r.t. every input against central differences of the NumPy
    implementation (samples fixed)."""
    x, samples = problem(n=5, k=3, d=4, seed=1)
    leaves = [t.clone().requires_grad_() for t in x]
    weights = {"instance": 1.0, "cluster": 0.7, "prior": 1.3}
    total = fc.tcc_loss(
        *leaves, samples=samples, prior=prior, weights=weights, backend="torch", **ARGS
    ).total
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    eps = 1e-6
    for i, (leaf, grad) in enumerate(zip(x, grads)):
        numeric = np.zeros(leaf.shape)
        for idx in np.ndindex(*leaf.shape):
            values = []
            for sign in (1, -1):
                moved = [t.clone() for t in x]
                moved[i][idx] += sign * eps
                parts_np = want(moved, samples, prior)
                values.append(sum(weights[k] * v for k, v in parts_np.items()))
            numeric[idx] = (values[0] - values[1]) / (2 * eps)
        got = np.zeros(leaf.shape) if grad is None else grad.numpy()
        np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-8, err_msg=f"input {i}")


def _backends():
    out = ["torch", "chunked"]
    try:
        from fastcluster_cl import kernels  # noqa: F401

        out.append("triton")
    except Exception:  # no triton on this platform
        pass
    return out


@pytest.mark.parametrize("prior", ["kl", "marginal"])
def test_tcc_backends_agree_in_float64(prior):
    x, samples = problem(n=37, k=10, d=24, seed=2)
    results = {}
    for backend in _backends():
        leaves = [t.clone().requires_grad_() for t in x]
        total, parts = fc.tcc_loss(*leaves, samples=samples, prior=prior, backend=backend, **ARGS)
        total.backward()
        results[backend] = ({k: v.detach() for k, v in parts.items()}, [t.grad for t in leaves])
    ref_parts, ref_grads = results["torch"]
    for _backend, (parts, grads) in results.items():
        for name in ref_parts:
            torch.testing.assert_close(parts[name], ref_parts[name], rtol=1e-10, atol=1e-12)
        for a, b in zip(grads, ref_grads):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_tcc_draws_gumbel_softmax_samples_with_lambda():
    """samples=None draws pi = softmax((logits / lambda + g) / lambda) per view (the relaxed
    sample of q = softmax(logits / lambda)) from torch's RNG: the
    result equals passing those samples, drawn with the same seed."""
    x, _ = problem()
    torch.manual_seed(3)
    got = fc.tcc_loss(*x, backend="torch", **ARGS)
    torch.manual_seed(3)
    lam = ARGS["gumbel_temperature"]
    samples = (
        torch.nn.functional.gumbel_softmax(x[2] / lam, tau=lam, dim=1),
        torch.nn.functional.gumbel_softmax(x[3] / lam, tau=lam, dim=1),
    )
    again = fc.tcc_loss(*x, samples=samples, backend="torch", **ARGS)
    for name in got.parts:
        torch.testing.assert_close(got.parts[name], again.parts[name])


def test_tcc_reductions_and_errors():
    x, samples = problem()
    mean = fc.tcc_loss(*x, samples=samples, backend="torch", **ARGS).parts
    none = fc.tcc_loss(*x, samples=samples, backend="torch", reduction="none", **ARGS).parts
    assert none["instance"].shape == (14,) and none["cluster"].shape == (6,)
    assert none["prior"].shape == (14,)
    for name in mean:
        torch.testing.assert_close(none[name].mean(), mean[name])
    with pytest.raises(ValueError, match="prior must be one of"):
        fc.tcc_loss(*x, prior="entropy")
    with pytest.raises(ValueError, match="centers"):
        fc.tcc_loss(*x[:4], x[4][:, :3], *x[5:])


@pytest.mark.parametrize("k,d", [(10, 128), (10, 9), (4, 16)])
def test_cluster_embeddings_start_maximally_separated(k, d):
    c = max_separated(k, d)
    assert c.shape == (k, d)
    cos = c @ c.T
    torch.testing.assert_close(cos.diagonal(), torch.ones(k))
    off = cos[~torch.eye(k, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1.0 / (k - 1)), atol=1e-5, rtol=0)


def test_tcc_head_cosine_logits_and_probabilities():
    head = TCCHead(8, 4, temperature=0.5)
    z = torch.randn(6, 8)
    out = head(z)
    assert out["logits"].abs().max() <= 1 + 1e-6 and out["r"].shape == (6, 8)
    torch.testing.assert_close(head.probabilities(out), torch.softmax(out["logits"] / 0.5, 1))
