"""Run the csrc kernels on the CPU: their source, with each `<<<grid, threads, 0, stream>>>`
launch rewritten into a call of the host emulation in tests/csrc_emulation/host_shim.h (one
std::thread per CUDA thread, real barriers and shuffles, wmma fragments emulated whole), is built
with g++ into a shared library whose extern "C" launchers are called through ctypes. The results
feed the backend's autograd.Functions and are compared with the float64 reference.

This checks indexing, tiling, masking, barrier placement and the launcher contract without a
GPU; tensor-core rounding and speed still need one (tests/test_cuda_backend.py, marked gpu)."""
import ctypes

import pytest
import torch

from emulation import _ptr
from fastcluster_cl import cuda_backend
from fastcluster_cl.losses import reference
from lowp import correlated_views, nt_xent_bounds, nt_xent_errors, tiny_weight_case
from test_cuda_backend import check_student_t


def _pair(n, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=gen)
    return z_a.to(dtype), (z_a + 0.5 * torch.randn(n, d, generator=gen)).to(dtype)


# loss atol, gradient tolerance relative to the largest reference entry (see test_cuda_backend)
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (4e-3, 1e-2),
             torch.bfloat16: (3e-2, 4e-2)}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("n,d,temperature",
                         [(37, 48, 0.5), (33, 150, 0.1), (2, 3, 0.5), (100, 40, 0.2)])
def test_nt_xent_matches_reference(emulated, n, d, temperature, dtype):
    """Two row blocks and column tiles with ragged edges (2N = 74, 66), D over two k-steps and
    over the gradient's feature split (150 > BD), a tiny problem (2N = 4, D = 3), and 2N = 200
    where the automatic column split (132 SMs) divides the columns in two."""
    z_a, z_b = (t.requires_grad_() for t in _pair(n, d, dtype))
    loss = cuda_backend.nt_xent(z_a, z_b, temperature)
    loss.backward(torch.tensor(1.3))
    r_a, r_b = (t.detach().double().requires_grad_() for t in (z_a, z_b))
    expected = reference.nt_xent(r_a, r_b, temperature)
    expected.backward(torch.tensor(1.3, dtype=torch.float64))
    loss_atol, grad_rel = (tol * max(1.0, 0.5 / temperature) for tol in TOLERANCE[dtype])
    assert loss.dtype == torch.float32 and z_a.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=0, atol=loss_atol)
    for got, want in ((z_a.grad, r_a.grad), (z_b.grad, r_b.grad)):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=grad_rel, atol=grad_rel * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d,tau", [(50, 40, 0.05), (37, 48, 0.1), (37, 48, 0.2)])
def test_nt_xent_low_precision_correlated_views(emulated, dtype, n, d, tau):
    """Correlated views at tau 0.05-0.2 (tests/lowp.py): no more than twice the error of the
    fp32-accumulating chunked path on the same inputs."""
    z_a, z_b = correlated_views(n, d, seed=20)
    grad_err, loss_err = nt_xent_errors(cuda_backend.nt_xent, z_a, z_b, tau, dtype)
    grad_bound, loss_bound = nt_xent_bounds(z_a, z_b, tau, dtype)
    assert grad_err <= grad_bound and loss_err <= loss_bound, (grad_err, loss_err, grad_bound,
                                                               loss_bound)


def test_tiny_tile_weights_keep_fp16_precision(emulated):
    """Weights ~ 1e-8 (2N ~ 1e5 and beyond) are scaled by 2^14 before their fp16 rounding; as
    subnormals they kept a few bits (tests/lowp.py `tiny_weight_case`)."""
    z, lse, row_loss, want = tiny_weight_case()
    got = cuda_backend.grad_rows(z, lse, row_loss, 0, z.shape[0], 2.0).double()
    assert ((got - want).norm() / want.norm()).item() < 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_row_gradients(emulated, dtype):
    """reduction="none": grad_kernel's per-row loss weights (c = g / max|g|, both signs, one
    zero) against the float64 reference on the same rounded inputs; bf16 within its mean-path
    gradient tolerance (TOLERANCE) relative to the largest gradient entry."""
    z_a, z_b = (t.to(dtype) for t in correlated_views(20, 24, seed=23))
    weights = torch.randn(40, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    weights[3] = 0.0
    got_in = [t.clone().requires_grad_() for t in (z_a, z_b)]
    ref_in = [t.double().requires_grad_() for t in (z_a, z_b)]
    got = cuda_backend.nt_xent_terms(*got_in, 0.2)
    want = reference.nt_xent_terms(*ref_in, 0.2)
    got_grads = torch.autograd.grad((got * weights.float()).sum(), got_in)
    want_grads = torch.autograd.grad((want * weights).sum(), ref_in)
    rel = 1e-4 if dtype == torch.float32 else 4e-2
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=rel, atol=rel * w.abs().max().item())


@pytest.mark.parametrize("scale", [1e19, 1e-30])
def test_nt_xent_extreme_magnitudes(emulated, scale):
    """Rows whose squared norm overflows or underflows float32 are normalised exactly."""
    z_a, z_b = (t.float().requires_grad_() for t in correlated_views(9, 24, 22, scale=scale))
    loss = cuda_backend.nt_xent(z_a, z_b, 0.2)
    loss.backward()
    r_a, r_b = (t.detach().double().requires_grad_() for t in (z_a, z_b))
    want = reference.nt_xent(r_a, r_b, 0.2)
    want.backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    for got, ref in ((z_a.grad, r_a.grad), (z_b.grad, r_b.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4,
                                   atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_ranges_compose(emulated, dtype):
    """lse and gradient rows of a sub-range equal those rows of the full pass (distributed)."""
    zn, rs, _, _ = emulated.normalize(*_pair(40, 20, dtype))
    lse = emulated.lse_rows(zn, rs, 0, 80, 2.0)
    g = emulated.grad_rows(zn, rs, lse, lse - 1.0, 0, 80, 2.0)
    for start, end in [(0, 1), (5, 70), (64, 80), (33, 33)]:
        torch.testing.assert_close(emulated.lse_rows(zn, rs, start, end, 2.0), lse[start:end])
        torch.testing.assert_close(emulated.grad_rows(zn, rs, lse, lse - 1.0, start, end, 2.0),
                                   g[start:end])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_column_splits_match_unsplit(emulated, dtype):
    """2N = 200 is 4 column tiles: 2, 3 (-> 2 of 2 tiles) and 4 splits, on full and partial
    row ranges; partial results merge to the unsplit ones up to summation order."""
    zn, rs, _, _ = emulated.normalize(*_pair(100, 40, dtype))
    lse = emulated.lse_rows(zn, rs, 0, 200, 3.0, splits=1)
    g = emulated.grad_rows(zn, rs, lse, lse - 1.0, 0, 200, 3.0, splits=1)
    for splits in (2, 3, 4):
        for start, end in [(0, 200), (70, 75)]:
            torch.testing.assert_close(emulated.lse_rows(zn, rs, start, end, 3.0, splits),
                                       lse[start:end])
            torch.testing.assert_close(
                emulated.grad_rows(zn, rs, lse, lse - 1.0, start, end, 3.0, splits), g[start:end])


def test_split_recommendation(csrc_lib):
    lib = csrc_lib
    # dtype, m, d, rows, backward, SMs -> splits
    assert lib.fcl_nt_xent_splits(0, 200, 40, 200, 0, 132) == 2        # capped at 2 tiles each
    assert lib.fcl_nt_xent_splits(0, 8192, 128, 8192, 0, 132) == 5     # 128 row blocks
    assert lib.fcl_nt_xent_splits(2, 8192, 128, 8192, 1, 132) == 5    # one feature slice
    assert lib.fcl_nt_xent_splits(0, 8192, 128, 8192, 1, 132) == 3    # fp32: two slices
    assert lib.fcl_nt_xent_splits(2, 65536, 128, 65536, 0, 132) == 1   # enough row blocks


def test_launchers_reject_bad_arguments(csrc_lib):
    lib = csrc_lib
    zn, out = torch.zeros(200, 4), torch.zeros(200)
    one = ctypes.c_float(1.0)
    assert lib.fcl_nt_xent_lse(0, _ptr(zn), 8, 4, 3, 9, one, 1, None, _ptr(out), None) != 0
    assert lib.fcl_nt_xent_lse(7, _ptr(zn), 8, 4, 0, 8, one, 1, None, _ptr(out), None) != 0
    # a split without a workspace
    assert lib.fcl_nt_xent_lse(0, _ptr(zn), 200, 4, 0, 200, one, 2, None, _ptr(out), None) != 0


def _assignments(n, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.softmax(2.0 * torch.randn(n, k, generator=gen, dtype=torch.float64), dim=1)
    q[0, 1] = 0.0  # an exact zero exercises the clamped log
    return (q / q.sum(1, keepdim=True)).to(dtype)


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("n,k", [(37, 10), (20, 45)])
def test_dec_and_anchor_match_reference(emulated, n, k, dtype):
    q0, q_a, q_b = (_assignments(n, k, dtype, seed) for seed in range(3))
    cases = [(cuda_backend.dec_loss, reference.dec_loss, (q_a,), (0,)),
             (cuda_backend.anchor_loss, reference.anchor_loss, (q0, q_a, q_b), (1, 2))]
    for ours, ref, inputs, wrt in cases:
        got_in = [t.clone().requires_grad_() for t in inputs]
        ref_in = [t.double().requires_grad_() for t in inputs]
        got, want = ours(*got_in), ref(*ref_in)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        got_grads = torch.autograd.grad(2.0 * got, [got_in[i] for i in wrt])
        want_grads = torch.autograd.grad(2.0 * want, [ref_in[i] for i in wrt])
        for g, w in zip(got_grads, want_grads):
            assert g.dtype == dtype
            atol = max(1e-6 * w.abs().max().item(), torch.finfo(dtype).tiny)
            torch.testing.assert_close(g.double(), w, rtol=4 * torch.finfo(dtype).eps, atol=atol)


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("n,k,f,alpha", [(37, 10, 48, 1.0), (9, 45, 200, 0.7)])
def test_student_t_matches_reference(emulated, n, k, f, alpha, dtype):
    """K = 45 gives lanes two columns each; F = 200 spans two feature slices of the centre
    gradient. The gradient flows from a weighted sum of q (a generic upstream gradient)."""
    check_student_t(cuda_backend.student_t, n, k, f, alpha, dtype)
