"""Our NT-Xent equals the formulations users already run: lightly's NTXentLoss and
pytorch-metric-learning's NTXentLoss (one batch of 2N embeddings, equal labels for the two views
of an image), in float64, values and gradients. Skipped when a peer is not installed
(pip install 'fastcluster_cl[bench]')."""

import pytest
import torch

import fastcluster_cl as fc


def _lightly(temperature):
    loss = pytest.importorskip("lightly.loss").NTXentLoss(temperature=temperature)
    return lambda z_a, z_b: loss(z_a, z_b)


def _pml(temperature):
    loss = pytest.importorskip("pytorch_metric_learning.losses").NTXentLoss(temperature=temperature)
    return lambda z_a, z_b: loss(torch.cat([z_a, z_b]), torch.arange(z_a.shape[0]).repeat(2))


@pytest.mark.parametrize("peer", [_lightly, _pml], ids=["lightly", "pytorch-metric-learning"])
@pytest.mark.parametrize("backend", ["torch", "chunked"])
@pytest.mark.parametrize(("n", "d", "temperature"), [(37, 19, 0.5), (5, 3, 0.1), (64, 128, 1.0)])
def test_nt_xent_equals_peer(peer, backend, n, d, temperature):
    gen = torch.Generator().manual_seed(n + d)
    z_a, z_b = (torch.randn(n, d, generator=gen, dtype=torch.float64) * 3 for _ in range(2))
    z_a[0] *= 1e-3  # a short row: the L2 normalisation must be part of both
    ours_in = [z_a.clone().requires_grad_(), z_b.clone().requires_grad_()]
    peer_in = [z_a.clone().requires_grad_(), z_b.clone().requires_grad_()]
    ours = fc.nt_xent(*ours_in, temperature, backend=backend)
    theirs = peer(temperature)(*peer_in)
    assert theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours.backward()
    theirs.backward()
    for mine, other in zip(ours_in, peer_in):
        torch.testing.assert_close(mine.grad, other.grad, rtol=1e-10, atol=1e-12)
