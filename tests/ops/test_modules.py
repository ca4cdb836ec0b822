"""nn.Module wrappers: validated hyper-parameters, and totals equal to the functional parts."""

import pytest
import torch

import fastcluster_cl as fc
from fastcluster_cl.backends import reference

F64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_wrappers_equal_functional():
    z_a, z_b, c_a, c_b = (
        randn(6, 4, seed=1),
        randn(6, 4, seed=2),
        randn(6, 3, seed=3),
        randn(6, 3, seed=4),
    )
    q = torch.softmax(c_a, 1)
    assert fc.NTXentLoss(0.3)(z_a, z_b) == fc.nt_xent(z_a, z_b, 0.3)
    assert fc.CCClusterLoss(0.7)(c_a, c_b) == fc.cc_cluster_loss(c_a, c_b, 0.7)
    assert fc.DECLoss()(q) == fc.dec_loss(q)
    assert fc.AnchorLoss()(q, q, torch.softmax(c_b, 1)) == fc.anchor_loss(
        q, q, torch.softmax(c_b, 1)
    )


@pytest.mark.parametrize("method", ["anchor", "cc", "tcc"])
def test_cluster_contrastive_loss_parts_and_weights(method):
    n, k = 10, 4
    z_a, z_b = randn(n, 8, seed=1), randn(n, 8, seed=2)
    c_a, c_b = randn(n, k, seed=3), randn(n, k, seed=4)
    inputs = {
        "anchor": dict(
            q0=torch.softmax(randn(n, k, seed=5), 1),
            q_a=torch.softmax(c_a, 1),
            q_b=torch.softmax(c_b, 1),
        ),
        "cc": dict(logits_a=c_a, logits_b=c_b),
        "tcc": dict(
            logits_a=c_a,
            logits_b=c_b,
            centers=randn(k, 8, seed=8),
            r_a=randn(n, 8, seed=6),
            r_b=randn(n, 8, seed=7),
        ),
    }[method]
    weights = {"instance": 0.5, "cluster": 2.0, "anchor": 3.0}
    crit = fc.ClusterContrastiveLoss(method, instance_temperature=0.4, weights=weights)
    torch.manual_seed(0)
    out = crit(z_a, z_b, **inputs)
    if method != "tcc":  # tcc's instance term contrasts its cluster-conditioned embeddings
        assert out.parts["instance"] == fc.nt_xent(z_a, z_b, 0.4)
    expected_parts = {
        "anchor": {"instance", "cluster", "anchor"},
        "tcc": {"instance", "cluster", "prior"},
    }.get(method, {"instance", "cluster"})
    assert set(out.parts) == expected_parts
    total = sum(crit.weights[name] * value for name, value in out.parts.items())
    torch.testing.assert_close(out.total, total)
    if method == "cc":
        assert out.parts["cluster"] == fc.cc_cluster_loss(c_a, c_b, 1.0)
    if method == "anchor":
        assert out.parts["cluster"] == fc.dec_loss(inputs["q0"])


def test_cluster_contrastive_loss_input_errors():
    crit = fc.ClusterContrastiveLoss("cc")
    z = randn(4, 3)
    with pytest.raises(TypeError, match=r"takes \('logits_a', 'logits_b'\).*got \('logits_a',\)"):
        crit(z, z, logits_a=z)
    with pytest.raises(TypeError, match=r"got \('logits_a', 'logits_b', 'q0'\)"):
        crit(z, z, logits_a=z, logits_b=z, q0=z)
    with pytest.raises(TypeError, match=r"\('h0', 'h_a', 'h_b', 'centers'\) or \('q0'"):
        fc.ClusterContrastiveLoss("anchor")(z, z, h0=z, q0=z)


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_anchor_objective_from_features_equals_the_separate_ops(backend):
    """ClusterContrastiveLoss("anchor") on (h0, h_a, h_b, centers) is anchor_objective: the
    Student-t assignments of the three views, then the q form; gradients reach h and centers."""
    n, f, k = 11, 5, 3
    z_a, z_b = randn(n, 8, seed=1).double(), randn(n, 8, seed=2).double()
    h0, h_a, h_b = (randn(n, f, seed=s).double().requires_grad_() for s in (3, 4, 5))
    mu = randn(k, f, seed=6).double().requires_grad_()
    weights = {"instance": 0.5, "cluster": 2.0, "anchor": 3.0}
    crit = fc.ClusterContrastiveLoss("anchor", 0.3, weights=weights, alpha=2.0, backend=backend)
    out = crit(z_a, z_b, h0=h0, h_a=h_a, h_b=h_b, centers=mu)
    q0, q_a, q_b = (fc.student_t(h, mu, 2.0) for h in (h0, h_a, h_b))
    want = crit(z_a, z_b, q0=q0, q_a=q_a, q_b=q_b)
    torch.testing.assert_close(out.total, want.total, rtol=1e-12, atol=0)
    for name in want.parts:
        torch.testing.assert_close(out.parts[name], want.parts[name], rtol=1e-12, atol=0)
    grads = torch.autograd.grad(out.total, (h0, h_a, h_b, mu))
    wants = torch.autograd.grad(want.total, (h0, h_a, h_b, mu))
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
    ref = reference.anchor_objective(z_a, z_b, h0, h_a, h_b, mu, 0.3, 2.0, (0.5, 2.0, 3.0))
    torch.testing.assert_close(
        torch.stack([out.total, *out.parts.values()]), ref.detach(), rtol=1e-12, atol=0
    )


def test_objectives_reject_bad_inputs():
    z, h, mu = randn(6, 4), randn(6, 3), randn(2, 3)
    with pytest.raises(ValueError, match="centers"):
        fc.anchor_objective(z, z, h, h, h, randn(2, 5))
    with pytest.raises(ValueError, match="weights"):
        fc.anchor_objective(z, z, h, h, h, mu, weights={"anchor": -1.0})
    with pytest.raises(ValueError, match="logits"):
        fc.cc_objective(z, z, randn(5, 3), randn(5, 3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="kmeans"), "method must be one of"),
        (dict(instance_temperature=0.0), "instance_temperature"),
        (dict(weights={"instance": -1.0}), "weights takes"),
        (dict(weights={"entropy": 1.0}), "weights takes"),
        (dict(backend="gpu"), "backend must be one of"),
    ],
)
def test_cluster_contrastive_loss_rejects_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fc.ClusterContrastiveLoss(**kwargs)


def test_ntxent_module_rejects_bad_temperature():
    for tau in (0.0, 1e-9, float("nan")):  # lightly's rule: |tau| >= 1e-8
        with pytest.raises(ValueError, match="temperature"):
            fc.NTXentLoss(temperature=tau)


def test_losses_stay_float32_inside_autocast_as_torch_losses_do():
    """Outside autocast a loss comes back in its inputs' dtype (lightly's behaviour); inside,
    float32, as torch's autocast keeps cross_entropy (and so lightly's loss): a GradScaler's
    2^16 scale would overflow an fp16 loss's gradient."""
    z = torch.randn(8, 16)
    assert fc.NTXentLoss()(z.half(), z.half() + 0.1).dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        za, zb = z.bfloat16().requires_grad_(), (z + 0.1).bfloat16()
        loss = fc.NTXentLoss()(za, zb)
        out = fc.ClusterContrastiveLoss("cc")(za, zb, logits_a=za[:, :4], logits_b=zb[:, :4])
    assert loss.dtype == out.total.dtype == torch.float32
    (loss * 65536.0).backward()
    assert torch.isfinite(za.grad).all()


def test_memory_bank_takes_lightlys_edge_cases():
    import numpy as np

    bank = fc.MemoryBank((8, 4))
    before = bank.bank.clone()
    bank.enqueue(torch.randn(0, 4))  # an empty batch leaves the bank alone
    assert torch.equal(bank.bank, before) and int(bank.bank_ptr) == 0
    z = torch.randn(6, 4)
    torch.testing.assert_close(fc.NTXentLoss(np.float32(0.5))(z, z + 1), fc.nt_xent(z, z + 1))
