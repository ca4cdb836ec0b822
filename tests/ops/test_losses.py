"""Every loss and backend against an independent float64 implementation, values and gradients."""

import independent
import numpy as np
import pytest
import torch

import fastcluster_cl as fc
from fastcluster_cl.backends import chunked, reference

BACKENDS = ("torch", "chunked")
F64 = torch.float64


def randn(*shape, seed=0, dtype=F64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def probabilities(n, k, seed=0):
    return torch.softmax(randn(n, k, seed=seed, scale=2.0), dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,tau", [(37, 48, 0.5), (5, 3, 0.05), (2, 1, 1.0), (11, 7, 0.2)])
def test_nt_xent_matches_independent(backend, n, d, tau):
    z_a, z_b = randn(n, d, seed=1), randn(n, d, seed=2)
    got = fc.nt_xent(z_a, z_b, tau, backend=backend)
    assert got.dtype == F64
    assert float(got) == pytest.approx(
        independent.nt_xent(z_a.numpy(), z_b.numpy(), tau), rel=1e-12
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,tau", [(37, 10, 1.0), (6, 2, 0.5), (20, 13, 0.3)])
def test_cc_cluster_loss_matches_independent(backend, n, k, tau):
    c_a, c_b = randn(n, k, seed=3, scale=2.0), randn(n, k, seed=4, scale=2.0)
    got = fc.cc_cluster_loss(c_a, c_b, tau, backend=backend)
    want = independent.cc_cluster_loss(c_a.numpy(), c_b.numpy(), tau)
    assert float(got) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 3.0])
def test_student_t_matches_independent(alpha):
    h, mu = randn(9, 5, seed=5), randn(4, 5, seed=6)
    got = fc.student_t(h, mu, alpha, backend="torch").numpy()
    np.testing.assert_allclose(got, independent.student_t(h.numpy(), mu.numpy(), alpha), rtol=1e-12)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-14)


def test_student_t_far_points_do_not_underflow():
    h = torch.tensor([[1e6, 0.0], [0.0, 1e6]], dtype=torch.float32)
    mu = torch.tensor([[0.0, 0.0], [2e6, 0.0]], dtype=torch.float32)
    q = fc.student_t(h, mu)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dec_loss_matches_independent(backend):
    q = probabilities(23, 7, seed=7)
    got = fc.dec_loss(q, backend=backend)
    assert float(got) == pytest.approx(independent.dec_loss(q.numpy()), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchor_loss_matches_independent(backend):
    q0, qa, qb = (probabilities(19, 6, seed=s) for s in (8, 9, 10))
    got = fc.anchor_loss(q0, qa, qb, backend=backend)
    want = independent.anchor_loss(q0.numpy(), qa.numpy(), qb.numpy())
    assert float(got) == pytest.approx(want, rel=1e-12)


# --- gradients -----------------------------------------------------------------------------


def test_student_t_and_anchor_gradcheck():
    # The DEC and anchor targets are held fixed by design, so finite differences must not move
    # them: the clean view q0 is a constant here (DEC's gradient is checked in closed form below).
    h_a = randn(6, 3, seed=24).requires_grad_()
    mu = randn(3, 3, seed=25).requires_grad_()
    q0 = fc.student_t(randn(6, 3, seed=26), mu.detach())
    assert torch.autograd.gradcheck(lambda h, m: fc.student_t(h, m, 0.7), (h_a, mu))
    assert torch.autograd.gradcheck(
        lambda h, m: fc.anchor_loss(q0, fc.student_t(h, m), fc.student_t(2 * h, m)), (h_a, mu)
    )


def test_anchor_and_dec_detach_their_targets():
    q0 = probabilities(8, 4, seed=27).requires_grad_()
    qa = probabilities(8, 4, seed=28).requires_grad_()
    fc.anchor_loss(q0, qa, qa).backward()
    assert q0.grad is None  # the clean view is the anchor: no gradient
    q = probabilities(8, 4, seed=29).requires_grad_()
    fc.dec_loss(q).backward()
    # With p fixed, dL/dq_ik = -p_ik / (N q_ik).
    p = reference.dec_target(q)
    torch.testing.assert_close(q.grad, -p / (8 * q.detach()), rtol=1e-12, atol=0)


# --- chunked backend against the reference --------------------------------------------------


@pytest.mark.parametrize("block", [1, 5, 32, 37, 100])
@pytest.mark.parametrize("tau", [0.5, 0.05, 0.01])
def test_chunked_equals_reference_in_float64(block, tau):
    z_a = randn(37, 48, seed=30).requires_grad_()
    z_b = randn(37, 48, seed=31).requires_grad_()
    want = reference.nt_xent(z_a, z_b, tau)
    got = chunked.nt_xent(z_a, z_b, tau, block_size=block)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    for g, w in zip(torch.autograd.grad(got, (z_a, z_b)), torch.autograd.grad(want, (z_a, z_b))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


def test_chunked_rejects_bad_block():
    with pytest.raises(ValueError, match="block_size"):
        chunked.nt_xent(randn(4, 3), randn(4, 3), 0.5, block_size=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nt_xent_near_identical_embeddings_are_finite(backend):
    z = torch.ones(16, 8, dtype=torch.float32) + 1e-7 * randn(16, 8, dtype=torch.float32)
    z = z.requires_grad_()
    loss = fc.nt_xent(z, z.detach().clone(), 0.05, backend=backend)
    loss.backward()
    assert loss.item() == pytest.approx(np.log(31), rel=1e-4)  # all 31 logits equal
    assert torch.isfinite(z.grad).all()


def test_zero_vector_is_normalised_to_zero_not_nan():
    z_a = randn(4, 3, dtype=torch.float32)
    z_a[0] = 0
    z_a.requires_grad_()
    for backend in BACKENDS:
        loss = fc.nt_xent(z_a, randn(4, 3, seed=1, dtype=torch.float32), backend=backend)
        (g,) = torch.autograd.grad(loss, z_a)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_one_hot_assignments_give_finite_losses_and_grads():
    q0 = torch.eye(4, dtype=F64).repeat(3, 1)
    qa = q0.clone().requires_grad_()
    loss = fc.anchor_loss(q0, qa, qa) + fc.dec_loss(qa)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(qa.grad).all()


DTYPES = (torch.float16, torch.bfloat16, torch.float32, F64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dec_loss_with_an_empty_cluster_is_the_loss_without_it(backend, dtype):
    # Cluster 2 has no mass in the batch (f_2 = 0): its target is 0, not 0/0.
    q = probabilities(6, 3, seed=30).to(dtype)
    q_empty = torch.cat([q, torch.zeros(6, 1, dtype=dtype)], 1).requires_grad_()
    loss = fc.dec_loss(q_empty, backend=backend)
    loss.backward()
    assert float(loss) == pytest.approx(float(fc.dec_loss(q, backend=backend)), rel=1e-6)
    assert torch.isfinite(q_empty.grad).all()
    assert (
        float(
            fc.dec_loss(
                torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]], dtype=dtype), backend=backend
            )
        )
        == 0.0
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_dec_loss_with_a_subnormal_cluster_mass_is_finite(backend):
    q = torch.tensor([[0.5, 0.5, 1e-41], [0.5, 0.5, 1e-42]], requires_grad=True)
    loss = fc.dec_loss(q, backend=backend)
    loss.backward()
    assert float(loss) == pytest.approx(0.0, abs=1e-7) and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cluster_losses_with_an_underflowing_softmax_column_have_finite_grads(backend, dtype):
    # softmax(-120 + ...) is 0 in float32 (exactly, or a subnormal in float64's exp range).
    logits = randn(8, 4, seed=31)
    logits[:, 3] -= 120
    c_a = logits.to(dtype).requires_grad_()
    c_b = (logits + 0.1 * randn(8, 4, seed=32)).to(dtype).requires_grad_()
    h = randn(8, 5, seed=33, dtype=dtype).requires_grad_()
    for loss in (fc.cc_cluster_loss(c_a, c_b, backend=backend),):
        grads = torch.autograd.grad(loss, (c_a, c_b, h), allow_unused=True)
        assert torch.isfinite(loss)
        assert all(torch.isfinite(g).all() for g in grads if g is not None)


# --- low precision ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(backend, dtype):
    z_a, z_b = randn(37, 48, seed=40, dtype=dtype), randn(37, 48, seed=41, dtype=dtype)
    z_a.requires_grad_()
    got = fc.nt_xent(z_a, z_b, 0.5, backend=backend)
    assert got.dtype == dtype  # returned in the inputs' dtype, as lightly's loss
    # Against float64 on the same rounded inputs: the fp32 accumulation's result, rounded once
    # to the dtype (a low-precision accumulation would be many units of the last place off).
    want = reference.nt_xent(z_a.detach().double(), z_b.double(), 0.5)
    assert abs(float(got) - float(want)) <= torch.finfo(dtype).eps * abs(float(want))
    # Against the unrounded float64 inputs: within the input format's precision.
    exact = reference.nt_xent(randn(37, 48, seed=40), randn(37, 48, seed=41), 0.5)
    assert float(got) == pytest.approx(float(exact), rel=2e-2 if dtype == torch.bfloat16 else 2e-3)
    (g,) = torch.autograd.grad(got, z_a)
    assert g.dtype == dtype and torch.isfinite(g).all()


def test_cc_cluster_loss_bf16():
    c_a, c_b = (
        randn(37, 10, seed=42, dtype=torch.bfloat16),
        randn(37, 10, seed=43, dtype=torch.bfloat16),
    )
    got = fc.cc_cluster_loss(c_a, c_b, backend="chunked")
    want = reference.cc_cluster_loss(c_a.double(), c_b.double(), 1.0)
    assert got.dtype == torch.bfloat16
    assert abs(float(got) - float(want)) <= torch.finfo(torch.bfloat16).eps * abs(float(want))


# --- autocast ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend,backward_inside",
    [
        ("torch", False),
        ("chunked", False),
        # PyTorch advises calling backward outside autocast; on CPU a backward inside it runs on the
        # calling thread under autocast. The chunked Function guards its own backward even then.
        ("chunked", True),
    ],
)
def test_losses_accumulate_in_fp32_inside_autocast(backend, backward_inside):
    """A training step calls the loss inside a bf16 autocast region: the matmuls must still run
    in fp32, so values and gradients equal those computed outside autocast (the whole
    objectives too: chunked runs each as one autograd node)."""
    z_a, z_b = (
        randn(37, 48, seed=50, dtype=torch.float32),
        randn(37, 48, seed=51, dtype=torch.float32),
    )
    c_a, c_b = (
        randn(37, 10, seed=52, dtype=torch.float32),
        randn(37, 10, seed=53, dtype=torch.float32),
    )
    h0, h_a, h_b = (randn(37, 12, seed=s, dtype=torch.float32) for s in (54, 55, 56))
    centers = randn(10, 12, seed=57, dtype=torch.float32)
    inputs = [t.requires_grad_() for t in (z_a, z_b, c_a, c_b, h0, h_a, h_b, centers)]

    def losses():
        return (
            fc.nt_xent(z_a, z_b, 0.1, backend=backend),
            fc.cc_cluster_loss(c_a, c_b, backend=backend),
            fc.cc_objective(z_a, z_b, c_a, c_b, backend=backend).total,
            fc.anchor_objective(z_a, z_b, h0, h_a, h_b, centers, backend=backend).total,
        )

    plain = losses()
    plain_grads = torch.autograd.grad(sum(plain), inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = losses()
        if backward_inside:
            under_grads = torch.autograd.grad(sum(under), inputs)
    if not backward_inside:
        under_grads = torch.autograd.grad(sum(under), inputs)
    for u, p in zip(under, plain):
        assert u.dtype == torch.float32
        torch.testing.assert_close(u, p, rtol=1e-6, atol=0)
    for u, p in zip(under_grads, plain_grads):
        torch.testing.assert_close(u, p, rtol=1e-5, atol=1e-8)
