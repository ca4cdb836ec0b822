"""The loss path adds no host sync by default on a GPU: the value checks (NaN inputs,
probabilities off the simplex) read data, so by default they run only on CPU tensors. Counted
here on the CPU with `validation.syncs_host` answering as for a GPU: every read of a tensor's
value into Python (`.item()`, `bool()`, `float()`) goes through aten._local_scalar_dense, and
a TorchDispatchMode counts those calls. On a GPU, test_no_sync_on_cuda checks the same with
torch.cuda.set_sync_debug_mode."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcluster_cl as fc
from fastcluster_cl import validation
from fastcluster_cl.modules import ClusterContrastiveLoss


class CountScalarReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


def inputs(device="cpu", n=9, d=8, k=4):
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    probs = [
        torch.softmax(torch.randn(n, k, generator=gen), 1).to(device).requires_grad_()
        for _ in range(3)
    ]
    return dict(
        z_a=leaf(n, d),
        z_b=leaf(n, d),
        c_a=leaf(n, k),
        c_b=leaf(n, k),
        h=leaf(n, d),
        mu=leaf(k, d),
        q=probs,
    )


def every_loss(x, backend):
    q0, qa, qb = x["q"]
    yield fc.nt_xent(x["z_a"], x["z_b"], 0.2, backend=backend)
    yield fc.cc_cluster_loss(x["c_a"], x["c_b"], backend=backend)
    yield fc.student_t(x["h"], x["mu"], backend=backend).sum()
    yield fc.dec_loss(q0, backend=backend)
    yield fc.anchor_loss(q0, qa, qb, backend=backend)
    yield ClusterContrastiveLoss("anchor", backend=backend)(
        x["z_a"], x["z_b"], q0=q0, q_a=qa, q_b=qb
    ).total
    yield ClusterContrastiveLoss("cc", backend=backend)(
        x["z_a"], x["z_b"], logits_a=x["c_a"], logits_b=x["c_b"]
    ).total
    yield ClusterContrastiveLoss("tcc", backend=backend)(
        x["z_a"],
        x["z_b"],
        logits_a=x["c_a"],
        logits_b=x["c_b"],
        centers=x["z_a"][: x["c_a"].shape[1]],
        r_a=x["z_b"],
        r_b=x["z_a"],
    ).total


@pytest.mark.parametrize("backend", ["torch", "chunked", "triton"])
def test_default_loss_path_reads_no_value_on_a_gpu(monkeypatch, backend):
    monkeypatch.setattr(validation, "syncs_host", lambda device: True)
    x = inputs()
    with CountScalarReads() as counter:
        for loss in every_loss(x, backend):
            loss.backward()
    assert counter.reads == []


def test_value_checks_run_on_the_cpu_by_default_and_everywhere_when_asked(monkeypatch):
    bad = torch.full((4, 3), float("nan"))
    with pytest.raises(ValueError, match="contains NaN"):
        fc.nt_xent(bad, bad, backend="torch")
    monkeypatch.setattr(validation, "syncs_host", lambda device: True)
    fc.nt_xent(bad, bad, backend="torch")  # "a GPU": not checked, no sync
    with validation.value_checks(True), pytest.raises(ValueError, match="contains NaN"):
        fc.nt_xent(bad, bad, backend="torch")
    with validation.value_checks(0):  # falsy numbers turn them off, truthy ones on
        fc.nt_xent(bad, bad, backend="torch")
    with validation.value_checks(1), pytest.raises(ValueError, match="contains NaN"):
        fc.nt_xent(bad, bad, backend="torch")
    with pytest.raises(ValueError, match="True, False or 'cpu'"):
        validation.set_value_checks("always")


def test_gathered_equal_rows_check_reads_nothing_on_a_gpu(monkeypatch):
    """gather_distributed's equal-batch check all-gathers the row counts and reads them: on a
    GPU only with set_value_checks(True)."""
    from fastcluster_cl import distributed

    monkeypatch.setattr(validation, "syncs_host", lambda device: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "all_gather", lambda *a: pytest.fail("gathered"))
    with CountScalarReads() as counter:
        distributed.check_equal_rows("z_a", 4, torch.device("cpu"))
    assert counter.reads == []


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_sync_on_cuda(backend):
    x = inputs("cuda")
    for loss in every_loss(x, backend):  # compile and warm up first
        loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for loss in every_loss(x, backend):
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
