"""reduction="mean" | "sum" | "none" on every loss and module, cc_cluster_loss(from_probs=True),
and gather_distributed validated at construction, against lightly where it applies."""

import pytest
import torch

import fastcluster_cl as fc

F64 = torch.float64
BACKENDS = ("torch", "chunked")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _losses(backend):
    """name -> (function of reduction, number of terms)."""
    z_a, z_b, c_a, c_b = (
        randn(7, 5, seed=1),
        randn(7, 5, seed=2),
        randn(7, 3, seed=3),
        randn(7, 3, seed=4),
    )
    q0, qa = torch.softmax(c_a, 1), torch.softmax(c_b, 1)

    return {
        "nt_xent": (lambda r: fc.nt_xent(z_a, z_b, backend=backend, reduction=r), 14),
        "cc_cluster_loss": (
            lambda r: fc.cc_cluster_loss(c_a, c_b, backend=backend, reduction=r),
            6,
        ),
        "dec_loss": (lambda r: fc.dec_loss(q0, backend=backend, reduction=r), 7),
        "anchor_loss": (lambda r: fc.anchor_loss(q0, qa, qa, backend=backend, reduction=r), 7),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["nt_xent", "cc_cluster_loss", "dec_loss", "anchor_loss"])
def test_reductions_agree(backend, name):
    fn, count = _losses(backend)[name]
    mean, total, terms = fn("mean"), fn("sum"), fn("none")
    assert mean.dim() == 0 and total.dim() == 0 and terms.shape == (count,)
    torch.testing.assert_close(terms.mean(), mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.sum(), total, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, mean * count, rtol=1e-12, atol=1e-12)


def test_chunked_per_row_terms_and_their_gradients_equal_the_reference():
    z_a, z_b = randn(9, 4, seed=6).requires_grad_(), randn(9, 4, seed=7)
    weights = randn(18, seed=8)  # an arbitrary upstream gradient for each row's term
    got = fc.nt_xent(z_a, z_b, 0.3, backend="chunked", reduction="none")
    want = fc.nt_xent(z_a, z_b, 0.3, backend="torch", reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, z_a, weights)
    (g_want,) = torch.autograd.grad(want, z_a, weights)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nt_xent_reductions_against_lightly(backend):
    from lightly.loss import NTXentLoss

    z_a, z_b = randn(8, 6, seed=9), randn(8, 6, seed=10)
    want = NTXentLoss(temperature=0.5)(z_a, z_b)
    torch.testing.assert_close(fc.NTXentLoss(0.5, backend=backend)(z_a, z_b), want)
    torch.testing.assert_close(
        fc.NTXentLoss(0.5, backend=backend, reduction="sum")(z_a, z_b), want * 16
    )
    torch.testing.assert_close(
        fc.NTXentLoss(0.5, backend=backend, reduction="none")(z_a, z_b).mean(), want
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cc_from_probs_equals_from_logits(backend, reduction):
    c_a, c_b = randn(7, 4, seed=11).requires_grad_(), randn(7, 4, seed=12)
    crit = fc.CCClusterLoss(0.7, backend=backend, reduction=reduction, from_probs=True)
    got = crit(torch.softmax(c_a, 1), torch.softmax(c_b, 1))
    want = fc.cc_cluster_loss(c_a, c_b, 0.7, backend=backend, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), c_a)
    (g_want,) = torch.autograd.grad(want.sum(), c_a)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_from_probs_checks_the_simplex():
    c = randn(5, 3, seed=13)
    with pytest.raises(ValueError, match="must hold probabilities"):
        fc.cc_cluster_loss(c, c, from_probs=True)


@pytest.mark.parametrize("method", ["anchor", "cc", "tcc"])
def test_cluster_contrastive_loss_reductions(method):
    z_a, z_b, c_a, c_b, h = (randn(6, 4, seed=s) for s in range(20, 25))
    q = torch.softmax(c_a, 1)
    inputs = {
        "anchor": dict(q0=q, q_a=torch.softmax(c_b, 1), q_b=q),
        "cc": dict(logits_a=c_a, logits_b=c_b),
        "tcc": dict(logits_a=c_a, logits_b=c_b, centers=z_a[:4], r_a=h, r_b=z_b),
    }[method]
    out = {}
    for reduction in ("mean", "sum", "none"):
        torch.manual_seed(0)
        out[reduction] = fc.ClusterContrastiveLoss(method, reduction=reduction)(z_a, z_b, **inputs)
    assert out["none"].parts["instance"].shape == (12,)
    torch.testing.assert_close(out["none"].total, out["mean"].total, rtol=1e-12, atol=1e-12)
    for name, part in out["none"].parts.items():
        torch.testing.assert_close(part.sum(), out["sum"].parts[name], rtol=1e-12, atol=1e-12)


def test_bad_reduction_is_refused():
    z = randn(4, 3)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fc.nt_xent(z, z, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        fc.DECLoss(reduction="batchmean")


def test_none_on_a_backend_without_per_term_ops_raises(monkeypatch):
    from fastcluster_cl.backends import dispatch, reference

    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    monkeypatch.setitem(dispatch._LOADED, "cuda", type("Fused", (), {"nt_xent": reference.nt_xent}))
    z = randn(4, 3)
    assert torch.isfinite(fc.nt_xent(z, z, backend="cuda", reduction="sum"))
    with pytest.raises(NotImplementedError, match="has no nt_xent_terms"):
        fc.nt_xent(z, z, backend="cuda", reduction="none")


def test_gather_distributed_needs_torch_distributed(monkeypatch):
    from lightly.loss import NTXentLoss

    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch.distributed is not available"):
        NTXentLoss(gather_distributed=True)  # lightly's behaviour, matched below
    for make in (
        lambda: fc.NTXentLoss(gather_distributed=True),
        lambda: fc.CCClusterLoss(gather_distributed=True),
        lambda: fc.DECLoss(gather_distributed=True),
        lambda: fc.ClusterContrastiveLoss("cc", gather_distributed=True),
    ):
        with pytest.raises(ValueError, match="torch.distributed is not available"):
            make()
    z = randn(4, 3)
    with pytest.raises(ValueError, match="torch.distributed is not available"):
        fc.nt_xent(z, z, gather_distributed=True)
    assert fc.NTXentLoss(gather_distributed=False) is not None


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
def test_the_returned_loss_may_be_changed_in_place_before_backward(backend):
    """As with torch's own losses, `loss += extra` before `.backward()` works: the fused
    backends do not save the loss they return for their backward."""
    z_a, z_b = randn(6, 4, seed=1).float(), randn(6, 4, seed=2).float()
    bank = torch.nn.functional.normalize(randn(9, 4, seed=3).float(), dim=1)
    for fn in (
        lambda a, b: fc.nt_xent(a, b, backend=backend),
        lambda a, b: fc.nt_xent_bank(a, b, bank, backend=backend),
    ):
        a, b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
        loss = fn(a, b)
        loss += 1.0
        loss.backward()
        a2, b2 = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
        fn(a2, b2).backward()
        torch.testing.assert_close(a.grad, a2.grad)
