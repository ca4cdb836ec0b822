"""backend="cuda": clear errors where it cannot run (CPU), the Python glue against a dense model
of the launcher contract (CPU), and the compiled kernels' own checks on a GPU (row ranges, the
Triton backend, a zero row, float64 refused; marked gpu). Every op's values and gradients against
the float64 reference (emulated and on a GPU) are in ops/test_op_*.py."""

import pytest
import torch
from dense_launchers import DenseLaunchers
from tolerances import FP32_MATH, TOLERANCE, check_against_reference, widen

import fastcluster_cl
from fastcluster_cl.backends import cuda as cuda_backend
from fastcluster_cl.backends import reference
from fastcluster_cl.backends.autograd import nt_xent as nt_xent_autograd


def _pair(n, d, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=gen)
    z_b = z_a + 0.5 * torch.randn(n, d, generator=gen)  # correlated views, as in training
    return z_a.to(device, dtype), z_b.to(device, dtype)


# --- CPU: error messages -------------------------------------------------------------------


def test_cpu_tensors_raise_a_clear_error():
    z_a, z_b = _pair(6, 5)
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run on cpu: .*CUDA") as err:
        fastcluster_cl.nt_xent(z_a, z_b, backend="cuda")
    message = str(err.value)
    if torch.version.cuda is None:
        assert "torch.version.cuda is None" in message and "backend='chunked'" in message
    else:
        assert "needs CUDA tensors" in message


def test_cluster_losses_raise_the_same_error():
    logits_a, logits_b = _pair(6, 4)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu"):
        fastcluster_cl.cc_cluster_loss(logits_a, logits_b, backend="cuda")


def test_direct_call_raises_without_building():
    z_a, z_b = _pair(6, 5)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cpu"):
        cuda_backend.nt_xent(z_a, z_b, 0.5)
    assert cuda_backend.build.extension.cache_info().currsize == 0  # nothing was compiled or loaded


def test_reason_for_cpu_device_with_cuda_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    reason = cuda_backend.unavailable_reason(torch.device("cpu"))
    assert "needs CUDA tensors" in reason and ".cuda()" in reason


def test_reason_without_compiler(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "no CUDA toolkit found" in cuda_backend.build._compiler_missing()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert f"no nvcc at {tmp_path}" in cuda_backend.build._compiler_missing()


# --- CPU: the autograd glue against a dense model of csrc/fcl_kernels.h ----------------------


@pytest.fixture
def dense_launchers(monkeypatch):
    monkeypatch.setattr(cuda_backend.build, "extension", lambda: DenseLaunchers)
    monkeypatch.setattr(cuda_backend.build, "require_device", lambda device: None)


def _assignments(n, k, seed, zeros=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.softmax(2.0 * torch.randn(n, k, generator=gen, dtype=torch.float64), dim=1)
    if zeros:  # exact zeros exercise the clamped log (0 * log 0 terms, zero gradients)
        q[0, 1] = 0.0
        q[0] /= q[0].sum()
    return q


def test_autograd_glue_matches_reference(dense_launchers):
    z_a, z_b = (t.double().requires_grad_() for t in _pair(9, 7))
    loss = nt_xent_autograd.nt_xent(z_a, z_b, 0.3, "cuda")  # float64 passes the dense model
    (3.0 * loss).backward()
    r_a, r_b = (t.detach().clone().requires_grad_() for t in (z_a, z_b))
    expected = reference.nt_xent(r_a, r_b, 0.3)
    (3.0 * expected).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z_a.grad, r_a.grad)
    torch.testing.assert_close(z_b.grad, r_b.grad)


def test_cluster_glue_matches_reference(dense_launchers):
    q0, q_a, q_b = (_assignments(11, 5, seed).requires_grad_() for seed in range(3))
    for ours, ref, inputs in [
        (lambda q: cuda_backend.cluster.dec_forward(q)[0], reference.dec_loss, (q_a,)),
        (cuda_backend.cluster.anchor_forward, reference.anchor_loss, (q0.detach(), q_a, q_b)),
    ]:
        loss = ours(*inputs)
        grads = torch.autograd.grad(2.5 * loss, (q_a,) + ((q_b,) if len(inputs) == 3 else ()))
        expected = ref(*inputs)
        want = torch.autograd.grad(2.5 * expected, (q_a,) + ((q_b,) if len(inputs) == 3 else ()))
        torch.testing.assert_close(loss, expected)
        for got, ref_grad in zip(grads, want):
            torch.testing.assert_close(got, ref_grad)


def test_student_t_glue_matches_reference(dense_launchers):
    gen = torch.Generator().manual_seed(3)
    h, centers, weights = (
        torch.randn(*shape, generator=gen, dtype=torch.float64)
        for shape in [(9, 6), (4, 6), (9, 4)]
    )
    check_against_reference(
        lambda x, mu: cuda_backend.student_t(x, mu, 1.5),
        lambda x, mu: reference.student_t(x, mu, 1.5),
        (h, 0.5 * centers),
        torch.float32,
        weights=weights,
        kind=FP32_MATH,
    )


# --- GPU: the compiled kernels (their values against the reference: ops/test_op_*.py) -------


def _loss_and_grads(fn, z_a, z_b, *args):
    z_a, z_b = (t.detach().clone().requires_grad_() for t in (z_a, z_b))
    loss = fn(z_a, z_b, *args)
    loss.backward(torch.tensor(1.7, device=loss.device, dtype=loss.dtype))
    return loss.detach(), z_a.grad, z_b.grad


def _assert_close_to(expected, actual, dtype, what, temperature=0.5, tolerance=None):
    """Loss within an absolute tolerance, gradients relative to their largest entry: the shared
    table's (support/tolerances.py) unless `tolerance` maps dtype -> (loss atol, gradient)."""
    tol = (
        (TOLERANCE[dtype].value_atol, TOLERANCE[dtype].grad_atol)
        if tolerance is None
        else tolerance[dtype]
    )
    loss_atol, grad_rel = (t * widen(temperature) for t in tol)
    torch.testing.assert_close(
        actual[0].double(),
        expected[0].double(),
        rtol=0,
        atol=loss_atol,
        msg=lambda m: f"{what} loss: {m}",
    )
    for e, a in zip(expected[1:], actual[1:]):
        scale = e.abs().max().item()
        torch.testing.assert_close(
            a.double(),
            e.double(),
            rtol=grad_rel,
            atol=grad_rel * scale,
            msg=lambda m: f"{what} grad: {m}",
        )


@pytest.mark.gpu
def test_nt_xent_with_backend_keyword():
    z_a, z_b = _pair(37, 48, torch.float32, "cuda")
    torch.testing.assert_close(
        fastcluster_cl.nt_xent(z_a, z_b, backend="cuda"),
        reference.nt_xent(z_a.double(), z_b.double(), 0.5).float(),
        rtol=0,
        atol=2e-5,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nt_xent_matches_triton(dtype):
    z_a, z_b = _pair(37, 48, dtype, "cuda")
    try:
        triton_nt_xent = fastcluster_cl.backends.dispatch.implementation(
            "nt_xent", "triton", z_a.device
        )
    except NotImplementedError as err:
        pytest.skip(f"triton backend has no nt_xent: {err}")
    expected = _loss_and_grads(triton_nt_xent, z_a, z_b, 0.5)
    actual = _loss_and_grads(cuda_backend.nt_xent, z_a, z_b, 0.5)
    # Both carry rounding: twice the bf16 budget; for float32 a tf32-level budget, since
    # tl.dot may round fp32 operands to tf32 on the GPU (ours is exact fp32).
    both = {torch.float32: (1e-3, 5e-3), torch.bfloat16: (6e-2, 8e-2)}
    _assert_close_to(expected, actual, dtype, f"cuda vs triton {dtype}", tolerance=both)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_ranges_compose(dtype):
    """The distributed building blocks: row ranges reproduce the full lse and gradient rows."""
    ext = cuda_backend.build.extension()
    z_a, z_b = _pair(70, 40, dtype, "cuda")
    zs, rs, norm, _ = ext.normalize(z_a, z_b)
    m = zs.shape[0]
    lse = ext.lse_rows(zs, rs, 0, m, 2.0)
    g = ext.grad_rows(zs, rs, lse, lse - 1.0, 0, m, 2.0)
    for start, end in [(0, 1), (5, 70), (70, 140), (33, 33), (101, 140)]:
        torch.testing.assert_close(ext.lse_rows(zs, rs, start, end, 2.0), lse[start:end])
        torch.testing.assert_close(
            ext.grad_rows(zs, rs, lse, lse - 1.0, start, end, 2.0), g[start:end]
        )
    for splits in (1, 2, 3):  # explicit column splits agree with the automatic choice
        torch.testing.assert_close(ext.lse_rows(zs, rs, 0, m, 2.0, splits), lse)
        torch.testing.assert_close(ext.grad_rows(zs, rs, lse, lse - 1.0, 0, m, 2.0, splits), g)
    with pytest.raises(RuntimeError, match=r"row range \[3, 141\) is not inside"):
        ext.lse_rows(zs, rs, 3, 141, 2.0)


@pytest.mark.gpu
def test_zero_row_uses_clamped_norm():
    """A zero row normalises to 0 and its gradient is g / 1e-12, as F.normalize's."""
    z_a, z_b = _pair(10, 16, torch.float32, "cuda")
    z_a[3] = 0.0
    actual = _loss_and_grads(cuda_backend.nt_xent, z_a, z_b, 0.5)
    expected = _loss_and_grads(reference.nt_xent, z_a.double(), z_b.double(), 0.5)
    keep = torch.arange(10, device="cuda") != 3
    _assert_close_to(
        (expected[0], expected[1][keep], expected[2]),
        (actual[0], actual[1][keep], actual[2]),
        torch.float32,
        "zero row",
    )
    torch.testing.assert_close(actual[1][3].double(), expected[1][3], rtol=1e-4, atol=0)


@pytest.mark.gpu
def test_float64_is_refused():
    z_a, z_b = _pair(4, 3, torch.float64, "cuda")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        cuda_backend.nt_xent(z_a, z_b, 0.5)
