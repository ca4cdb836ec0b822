"""The losses trace under torch.compile (value checks are skipped while tracing) in one graph,
without breaks, and give the eager values and gradients."""

import pytest
import torch
from loss_cases import loss_cases

import fastcluster_cl as fc
from fastcluster_cl.backends import dispatch


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_compiled_nt_xent_matches_eager(backend):
    torch._dynamo.reset()
    z_a = torch.randn(37, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    z_b = torch.randn(37, 16, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(lambda a, b: fc.nt_xent(a, b, 0.5, backend=backend))
    got = compiled(z_a, z_b)
    (g_got,) = torch.autograd.grad(got, z_a)
    want = fc.nt_xent(z_a, z_b, 0.5, backend=backend)
    (g_want,) = torch.autograd.grad(want, z_a)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_no_graph_breaks(backend, monkeypatch):
    monkeypatch.setattr(dispatch, "_RESOLVED", {})  # the first, resolving call traces too
    for name, fn, inputs in loss_cases(backend):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*inputs)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
        assert explained.graph_count == 1, name


def test_dynamic_compile_traces_the_losses_in_one_graph(monkeypatch):
    """Under dynamic=True Dynamo traces the float hyperparameters as symbols: the argument
    checks still hold them in one graph (comparisons trace as guards), with the eager values.
    One loss per kind of check: NT-Xent's temperature, alpha, the objectives' and TCC's."""
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    kinds = ("nt_xent", "student_t", "cc_objective", "ClusterContrastiveLoss(tcc)")
    for name, fn, inputs in [case for case in loss_cases("chunked") if case[0] in kinds]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        with torch._inductor.config.patch(fallback_random=True):  # TCC's Gumbel draw as eager's
            got = torch.compile(fn, dynamic=True, fullgraph=True)(*inputs)
        torch.manual_seed(0)
        torch.testing.assert_close(got, fn(*inputs), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_first_triton_call_loads_its_backend_inside_the_graph(monkeypatch, dynamic):
    """The triton backend loads on first use: under torch.compile(fullgraph=True) that import
    is traced too (the kernels run under the interpreter without CUDA, tests/conftest.py)."""
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    monkeypatch.delitem(dispatch._LOADED, "triton", raising=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    z_a, z_b = (torch.randn(6, 4, device=device) for _ in range(2))
    logits = torch.randn(6, 3, device=device)

    def loss(a, b):
        return fc.cc_objective(a, b, logits, logits.flip(0), backend="triton").total

    torch._dynamo.reset()
    got = torch.compile(loss, dynamic=dynamic, fullgraph=True)(z_a, z_b)
    torch.testing.assert_close(got, loss(z_a, z_b))


def test_backend_is_resolved_once(monkeypatch):
    calls = []
    lookup = dispatch._lookup
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    monkeypatch.setattr(dispatch, "_lookup", lambda *key: calls.append(key) or lookup(*key))
    z = torch.randn(4, 3)
    for _ in range(3):
        fc.nt_xent(z, z + 1, backend="chunked")
    assert calls == [("nt_xent", "chunked", torch.device("cpu"))]


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_memory_bank_compiles_in_one_graph_and_matches_eager(backend):
    """The bank's pointer update has no Python branch on a tensor value: fullgraph=True traces
    a training step with a wrapping bank (pointer 0 -> 4 -> 8 -> 0), with the eager numbers."""
    torch._dynamo.reset()
    torch.manual_seed(3)
    eager = fc.NTXentLoss(0.2, (10, 8), backend=backend)
    torch.manual_seed(3)
    module = fc.NTXentLoss(0.2, (10, 8), backend=backend)
    compiled = torch.compile(module, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        z_a = torch.randn(4, 8, generator=g, requires_grad=True)
        z_b = torch.randn(4, 8, generator=g)
        want, got = eager(z_a, z_b), compiled(z_a, z_b)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(module.memory_bank.bank, eager.memory_bank.bank)
        assert torch.equal(module.memory_bank.bank_ptr, eager.memory_bank.bank_ptr)
    explained = torch._dynamo.explain(module)(z_a, z_b)
    assert explained.graph_break_count == 0, explained.break_reasons
