"""nn.Module wrappers: validated hyper-parameters, and totals equal to the functional parts."""
import pytest
import torch

import fastcluster_cl as fc

F64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_wrappers_equal_functional():
    z_a, z_b, c_a, c_b = randn(6, 4, seed=1), randn(6, 4, seed=2), randn(6, 3, seed=3), randn(6, 3, seed=4)
    q = torch.softmax(c_a, 1)
    assert fc.NTXentLoss(0.3)(z_a, z_b) == fc.nt_xent(z_a, z_b, 0.3)
    assert fc.CCClusterLoss(0.7)(c_a, c_b) == fc.cc_cluster_loss(c_a, c_b, 0.7)
    assert fc.DECLoss()(q) == fc.dec_loss(q)
    assert fc.AnchorLoss()(q, q, torch.softmax(c_b, 1)) == fc.anchor_loss(q, q, torch.softmax(c_b, 1))


@pytest.mark.parametrize("method", ["anchor", "cc", "tcc"])
def test_cluster_contrastive_loss_parts_and_weights(method):
    n, k = 10, 4
    z_a, z_b = randn(n, 8, seed=1), randn(n, 8, seed=2)
    c_a, c_b = randn(n, k, seed=3), randn(n, k, seed=4)
    inputs = {
        "anchor": dict(q0=torch.softmax(randn(n, k, seed=5), 1), q_a=torch.softmax(c_a, 1),
                       q_b=torch.softmax(c_b, 1)),
        "cc": dict(logits_a=c_a, logits_b=c_b),
        "tcc": dict(logits_a=c_a, logits_b=c_b, centres=randn(k, 8, seed=8),
                    r_a=randn(n, 8, seed=6), r_b=randn(n, 8, seed=7)),
    }[method]
    weights = {"instance": 0.5, "cluster": 2.0, "anchor": 3.0}
    crit = fc.ClusterContrastiveLoss(method, instance_temperature=0.4, weights=weights)
    torch.manual_seed(0)
    out = crit(z_a, z_b, **inputs)
    if method != "tcc":   # tcc's instance term contrasts its cluster-conditioned embeddings
        assert out.parts["instance"] == fc.nt_xent(z_a, z_b, 0.4)
    expected_parts = {"anchor": {"instance", "cluster", "anchor"},
                      "tcc": {"instance", "cluster", "prior"}}.get(method, {"instance", "cluster"})
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
    with pytest.raises(TypeError, match=r"missing \['logits_b'\]"):
        crit(z, z, logits_a=z)
    with pytest.raises(TypeError, match=r"unexpected \['q0'\]"):
        crit(z, z, logits_a=z, logits_b=z, q0=z)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="kmeans"), "method must be one of"),
    (dict(instance_temperature=0.0), "instance_temperature"),
    (dict(weights={"instance": -1.0}), "weights takes"),
    (dict(weights={"entropy": 1.0}), "weights takes"),
    (dict(backend="gpu"), "backend must be one of"),
])
def test_cluster_contrastive_loss_rejects_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fc.ClusterContrastiveLoss(**kwargs)


def test_ntxent_module_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        fc.NTXentLoss(temperature=-1)
