"""NT-Xent's registered ops and its one autograd path (fastcluster_cl/backends/autograd/nt_xent.py):
torch.library.opcheck of every fused forward and backward op that runs on the CPU (chunked;
Triton under the interpreter; the CUDA twin's glue over the dense model of its launchers),
graph-break counts under torch.compile, per-row gradients (reduction="none"), and double
backward: equal to backend="torch" or a clear error, on every backend."""

import pytest
import torch
from dense_launchers import DenseLaunchers
from loss_cases import loss_cases

import fastcluster_cl as fc
from fastcluster_cl import functional, kernels
from fastcluster_cl.backends import chunked, reference
from fastcluster_cl.backends import cuda as cuda_backend
from fastcluster_cl.backends.autograd import nt_xent as nt_xent_autograd

OPS = torch.ops.fastcluster_cl
F64 = torch.float64


def _pair(n=6, d=5, dtype=F64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=g, dtype=dtype)
    z_b = z_a + 0.5 * torch.randn(n, d, generator=g, dtype=dtype)
    return z_a.requires_grad_(grad), z_b.requires_grad_(grad)


@pytest.fixture
def dense_cuda(monkeypatch):
    """backend='cuda' on CPU tensors, its launchers replaced by the dense model."""
    monkeypatch.setattr(cuda_backend.build, "extension", lambda: DenseLaunchers)
    monkeypatch.setattr(cuda_backend.build, "require_device", lambda device: None)


# (forward op, its options after (z_a, z_b, inv_tau, per_row), backward op)
FUSED = {
    "chunked": (OPS.nt_xent_chunked_fwd.default, (4,), OPS.nt_xent_chunked_bwd.default),
    "triton": (OPS.nt_xent_triton_fwd.default, (False,), OPS.nt_xent_triton_bwd.default),
    "cuda": (OPS.nt_xent_cuda_fwd.default, (), OPS.nt_xent_cuda_bwd.default),
}
DTYPES = {"chunked": F64, "triton": F64, "cuda": torch.float32}  # the dense CUDA model: fp32


def _opcheck_backend(backend, per_row):
    forward, options, backward = FUSED[backend]
    z_a, z_b = (z.requires_grad_() for z in _pair(5, 4, DTYPES[backend], grad=False))
    torch.library.opcheck(forward, (z_a, z_b, 2.0, per_row, *options))
    out = forward(z_a.detach(), z_b.detach(), 2.0, per_row, *options)
    grad = torch.ones_like(out[0])
    # The backward op's own autograd raises (double backward), so it is checked without
    # inputs that require grad.
    z = torch.cat([z_a, z_b]).detach()
    torch.library.opcheck(
        backward,
        (z, grad, 2.0, *out[1:], *options),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_chunked(per_row):
    _opcheck_backend("chunked", per_row)


@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_triton_interpreted(per_row):
    _opcheck_backend("triton", per_row)


def test_opcheck_cuda_glue(dense_cuda):
    _opcheck_backend("cuda", False)


def test_fused_ops_are_differentiable_on_their_own():
    """The forward op's registered autograd is NTXent's backward: the same gradient, split
    between the two views, with and without the kept tile (the backward's Z a stand-in or the
    concatenation)."""
    for block in (4, 64):
        z_a, z_b = _pair()
        loss = OPS.nt_xent_chunked_fwd(z_a, z_b, 1 / 0.3, False, block)[0]
        got = torch.autograd.grad(loss, (z_a, z_b))
        want = torch.autograd.grad(reference.nt_xent(z_a, z_b, 0.3), (z_a, z_b))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


class _RowCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the concatenations that produce a tensor of `shape`."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.cat.default and tuple(out.shape) == self.shape:
            self.count += 1
        return out


@pytest.mark.parametrize(
    "backend, options, forward_copies, copies",
    [
        ("triton", (False,), 0, 0),  # the prologue reads the views; the backward the saved Zs
        ("triton", (True,), 0, 1),  # the symmetric backward normalises Z again
        ("chunked", (64,), 1, 0),  # the op concatenates; one tile: E and zn are kept
        ("chunked", (4,), 1, 1),  # tiled: the backward recomputes from Z
        ("cuda", (), None, 0),  # (the dense model of its launchers concatenates)
    ],
)
def test_z_is_copied_only_where_it_is_read(backend, options, forward_copies, copies, dense_cuda):
    """The fast path's forward takes the two views and `NTXentBackend.backward_rows` builds
    Z = [z_a; z_b] for the backward only where the backward op reads its values; the gradient is
    the reference's either way."""
    z_a, z_b = _pair(dtype=DTYPES[backend])
    shape = (2 * z_a.shape[0], z_a.shape[1])
    with _RowCopies(shape) as forward_seen:
        loss = nt_xent_autograd.nt_xent(z_a, z_b, 0.5, backend, *options)
    with _RowCopies(shape) as copies_seen:
        got = torch.autograd.grad(loss, (z_a, z_b))
    assert forward_copies is None or forward_seen.count == forward_copies
    assert copies_seen.count == copies
    x, y = (t.detach().double().requires_grad_() for t in (z_a, z_b))
    want = torch.autograd.grad(reference.nt_xent(x, y, 0.5), (x, y))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


def _explain(fn, *inputs):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*inputs)


@pytest.mark.parametrize(
    "backend, reduction",
    [("chunked", "mean"), ("chunked", "none"), ("triton", "mean"), ("triton", "none")],
)
def test_no_graph_breaks_through_the_ops(backend, reduction):
    z_a, z_b = _pair(grad=False)
    loss = lambda a, b: fc.nt_xent(a, b, 0.5, backend=backend, reduction=reduction)  # noqa: E731
    loss(z_a, z_b)  # triton is imported on its first, resolving call (not traceable)
    explained = _explain(loss, z_a, z_b)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    names = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    assert f"fastcluster_cl.nt_xent_{backend}_fwd.default" in names


def test_compiled_fullgraph_forward_and_backward_chunked():
    torch._dynamo.reset()
    z_a, z_b = _pair()
    compiled = torch.compile(
        lambda a, b: fc.nt_xent(a, b, 0.5, backend="chunked"), fullgraph=True, backend="aot_eager"
    )
    got = torch.autograd.grad(compiled(z_a, z_b), (z_a, z_b))
    want = torch.autograd.grad(reference.nt_xent(z_a, z_b, 0.5), (z_a, z_b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_per_row_gradients_on_triton_edge_weights():
    """All-zero incoming gradients give zero (not NaN) gradients; one nonzero row alone is its
    loss's gradient; a mean taken through the per-row path equals the mean path's."""
    z_a, z_b = _pair(5, 4)
    terms = lambda a, b: kernels.nt_xent_terms(a, b, 0.4)  # noqa: E731
    zero = torch.autograd.grad(terms(z_a, z_b), (z_a, z_b), torch.zeros(10, dtype=F64))
    assert all((g == 0).all() for g in zero)
    one = torch.zeros(10, dtype=F64)
    one[7] = -2.5
    got = torch.autograd.grad(terms(z_a, z_b), (z_a, z_b), one)
    want = torch.autograd.grad(reference.nt_xent_terms(z_a, z_b, 0.4), (z_a, z_b), one)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    got = torch.autograd.grad(terms(z_a, z_b).mean(), (z_a, z_b))
    want = torch.autograd.grad(kernels.nt_xent(z_a, z_b, 0.4), (z_a, z_b))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_row_gradients_on_triton_low_precision(dtype):
    """16-bit inputs: per-row weights spanning three orders of magnitude and both signs are
    scaled by their largest into the fp16 tile weights; the error against the float64
    reference on the same rounded inputs stays within that of the mean path."""
    z_a, z_b = (t.to(dtype) for t in _pair(24, 32, F64, grad=False))
    weights = torch.logspace(-3, 0, 48, dtype=F64) * torch.tensor([1.0, -1.0]).repeat(24)
    weights = weights[torch.randperm(48, generator=torch.Generator().manual_seed(5))]

    def error(loss_fn, ref_fn):
        a, b = (t.clone().requires_grad_() for t in (z_a, z_b))
        ra, rb = (t.double().requires_grad_() for t in (z_a, z_b))
        got = torch.autograd.grad(loss_fn(a, b), (a, b))
        want = torch.autograd.grad(ref_fn(ra, rb), (ra, rb))
        return max(((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))

    per_row = error(
        lambda a, b: (kernels.nt_xent_terms(a, b, 0.1) * weights.float()).sum(),
        lambda a, b: (reference.nt_xent_terms(a, b, 0.1) * weights).sum(),
    )
    mean = error(lambda a, b: kernels.nt_xent(a, b, 0.1), lambda a, b: reference.nt_xent(a, b, 0.1))
    assert per_row <= 2 * mean, (per_row, mean)


def test_per_row_gradients_on_cuda_glue(dense_cuda):
    """reduction="none" on cuda: the per-row values, and per-row gradients through the glue's
    weights c = g / max|g| (the dense model of the launchers, float32)."""
    z_a, z_b = (t.float().requires_grad_() for t in _pair(6, 4, grad=False))
    r_a, r_b = (t.detach().double().requires_grad_() for t in (z_a, z_b))
    weights = torch.randn(12, dtype=F64, generator=torch.Generator().manual_seed(4))
    weights[5] = 0.0
    got = nt_xent_autograd.nt_xent_terms(z_a, z_b, 0.4, "cuda")
    want = reference.nt_xent_terms(r_a, r_b, 0.4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    for g, w in zip(
        torch.autograd.grad((got * weights.float()).sum(), (z_a, z_b)),
        torch.autograd.grad((want * weights).sum(), (r_a, r_b)),
    ):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5 * w.abs().max().item())
    logits = _pair(6, 3, grad=False)
    with torch.no_grad():
        torch.testing.assert_close(
            fc.cc_cluster_loss(*logits, 0.7, backend="triton", reduction="none"),
            reference.cc_cluster_loss_terms(*logits, 0.7),
        )


def _double_backward(loss_fn, z_a, z_b):
    """|d/da sum(dL/da^2)| after a first gradient with create_graph=True."""
    (g_a,) = torch.autograd.grad(loss_fn(z_a, z_b), z_a, create_graph=True)
    (gg,) = torch.autograd.grad(g_a.pow(2).sum(), z_a)
    return gg


@pytest.mark.parametrize("backend", ["chunked", "triton", "cuda"])
def test_double_backward_is_refused_clearly(backend, dense_cuda):
    z_a, z_b = _pair()
    loss_fn = {
        "chunked": lambda a, b: chunked.nt_xent(a, b, 0.5, 4),
        "triton": lambda a, b: kernels.nt_xent(a, b, 0.5),
        "cuda": lambda a, b: nt_xent_autograd.nt_xent(a, b, 0.5, "cuda"),
    }[backend]
    with pytest.raises(
        RuntimeError,
        match=f"double backward is not supported by backend='{backend}'; use backend='torch'",
    ):
        _double_backward(loss_fn, z_a, z_b)
    # The same through the registered forward op called directly.
    forward, options, _ = FUSED[backend]
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        _double_backward(lambda a, b: forward(a, b, 2.0, False, *options)[0], z_a, z_b)


def test_double_backward_on_torch_works_and_first_order_is_unchanged():
    z_a, z_b = _pair()
    assert torch.isfinite(
        _double_backward(lambda a, b: fc.nt_xent(a, b, 0.5, backend="torch"), z_a, z_b)
    ).all()
    # create_graph=True on a fused backend still gives the right first-order gradient.
    (got,) = torch.autograd.grad(
        fc.nt_xent(z_a, z_b, 0.5, backend="chunked"), z_a, create_graph=True
    )
    (want,) = torch.autograd.grad(fc.nt_xent(z_a, z_b, 0.5, backend="torch"), z_a)
    torch.testing.assert_close(got, want)


def test_double_backward_of_the_gathered_path_is_refused():
    """The distributed path is the same Function (one process: world size 1)."""
    from fastcluster_cl.backends import gathered

    z_a, z_b = _pair()
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        _double_backward(
            lambda a, b: gathered.nt_xent_rows(a, b, 0.5, chunked.lse_rows, chunked.grad_rows),
            z_a,
            z_b,
        )


# The row-range primitives (the distributed path's forward and backward): registered ops whose
# autograd is NTXent's (they are not differentiable one by one: grad_rows needs every row's lse).
PRIMITIVES = {
    "chunked": (OPS.nt_xent_chunked_lse_rows.default, OPS.nt_xent_chunked_grad_rows.default, (3,)),
    "triton": (OPS.nt_xent_triton_lse_rows.default, OPS.nt_xent_triton_grad_rows.default, ()),
    "cuda": (OPS.nt_xent_cuda_lse_rows.default, OPS.nt_xent_cuda_grad_rows.default, ()),
}


@pytest.mark.parametrize("backend", ["chunked", "triton", "cuda"])
def test_opcheck_row_primitives(backend, dense_cuda):
    lse_rows, grad_rows, options = PRIMITIVES[backend]
    z = torch.cat(_pair(5, 4, DTYPES[backend], grad=False))
    lse, row_loss = lse_rows(z, 0, 10, 2.0, *options)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(lse_rows, (z, 3, 8, 2.0, *options), test_utils=checks)
    torch.library.opcheck(grad_rows, (z, lse, row_loss, 3, 8, 2.0, *options), test_utils=checks)
    if backend != "chunked":  # the optional dz_rows
        grad_out = torch.tensor(0.7, dtype=z.dtype, device=z.device)
        torch.library.opcheck(
            getattr(OPS, f"nt_xent_{backend}_dz_rows").default,
            (z, lse, row_loss, 3, 8, 2.0, grad_out),
            test_utils=checks,
        )


def test_dz_rows_is_grad_rows_through_the_normalisation_backward():
    """Triton's dz_rows (the scaling and the normalisation's backward in the kernel epilogue)
    against grad_rows followed by torch's, on a row range, unsplit and with column splits
    (the interpreter splits every multi-tile sweep), tiny and huge rows included."""
    from fastcluster_cl import kernels
    from fastcluster_cl.backends.numerics import l2_normalize, l2_normalize_backward

    torch.manual_seed(0)
    for rows in (10, 150):
        z = torch.randn(rows, 24, dtype=torch.float64)
        z[1] *= 1e-30
        z[-1] *= 1e19
        lse, row_loss = kernels.lse_rows(z, 0, rows, 3.0)
        start, end = 2, rows - 1
        grad_out = torch.tensor(0.7, dtype=torch.float64)
        got = OPS.nt_xent_triton_dz_rows(z, lse, row_loss, start, end, 3.0, grad_out)
        g = kernels.grad_rows(z, lse, row_loss, start, end, 3.0)
        zn, norm = l2_normalize(z[start:end])
        want = l2_normalize_backward(zn, norm, g, grad_out * 3.0 / rows)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-300)


# NT-Xent against a memory bank: (forward op, options after (z_a, z_b, bank, inv_tau, per_row),
# backward op) per backend; the ops' autograd is nt_xent_bank_autograd's.
BANK_OPS = {
    "chunked": (
        lambda: (OPS.nt_xent_bank_chunked_fwd.default, (3,), OPS.nt_xent_bank_chunked_bwd.default)
    ),
    "triton": (
        lambda: (OPS.nt_xent_bank_triton_fwd.default, (), OPS.nt_xent_bank_triton_bwd.default)
    ),
    "cuda": (lambda: (OPS.nt_xent_bank_cuda_fwd.default, (), OPS.nt_xent_bank_cuda_bwd.default)),
}
BANK_DTYPES = {"chunked": F64, "triton": F64, "cuda": torch.float32}  # cuda: emulated, fp32


def _bank_backend(request, backend):
    if backend == "cuda":
        request.getfixturevalue("emulated")  # the kernels through the host emulation
    return BANK_OPS[backend]()


def _bank_inputs(dtype, n=5, d=4, m=7):
    z_a, z_b = _pair(n, d, dtype, grad=True)
    g = torch.Generator().manual_seed(9)
    bank = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=dtype), dim=1)
    return z_a, z_b, bank


@pytest.mark.parametrize("backend", ["chunked", "triton", "cuda"])
@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck_bank_ops(request, backend, per_row):
    forward, options, backward = _bank_backend(request, backend)
    z_a, z_b, bank = _bank_inputs(BANK_DTYPES[backend])
    torch.library.opcheck(forward, (z_a, z_b, bank, 1 / 0.3, per_row, *options))
    out = forward(z_a.detach(), z_b.detach(), bank, 1 / 0.3, per_row, *options)
    grad = torch.randn_like(out[0])
    torch.library.opcheck(
        backward,
        (z_a.detach(), z_b.detach(), bank, grad, 1 / 0.3, *out[1:], *options),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )
    got = torch.autograd.grad(
        forward(z_a, z_b, bank, 1 / 0.3, per_row, *options)[0], (z_a, z_b), grad
    )
    want = torch.autograd.grad(
        reference.nt_xent_bank_terms(z_a, z_b, bank, 0.3)
        if per_row
        else reference.nt_xent_bank(z_a, z_b, bank, 0.3),
        (z_a, z_b),
        grad,
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["chunked", "triton", "cuda"])
def test_bank_double_backward_is_refused(request, backend):
    _bank_backend(request, backend)
    z_a, z_b, bank = _bank_inputs(BANK_DTYPES[backend])
    loss = fc.nt_xent_bank(z_a, z_b, bank, 0.3, backend=backend)
    (g,) = torch.autograd.grad(loss, z_a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# The cluster ops (backends/autograd/pairs.py): each fused forward and backward of cc_cluster,
# student_t, DEC, anchor and DEC + anchor is a registered op pair; (backend, op name) below,
# the ops being fastcluster_cl::<name>_<backend>_fwd / _bwd.
CLUSTER_OPS = [
    ("triton", "cc_cluster"),
    ("triton", "cc_cluster_gram"),
    ("triton", "cc_cluster_epilogue"),
    ("triton", "student_t"),
    ("triton", "dec"),
    ("triton", "anchor"),
    ("triton", "dec_anchor"),
    ("cuda", "student_t"),
    ("cuda", "dec"),
    ("cuda", "anchor"),
]


def _cluster_inputs(name, dtype, seed=0):
    """The forward op's arguments (small shapes: Triton runs interpreted)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    probs = lambda: torch.softmax(2 * randn(6, 4), 1)  # noqa: E731
    return {
        "cc_cluster": lambda: (randn(6, 3), randn(6, 3)),
        "cc_cluster_gram": lambda: (randn(6, 3), randn(6, 3)),
        # a Gram of 2K = 6 columns over 6 rows, their sums, N, the temperature
        "cc_cluster_epilogue": lambda: (lambda q: (q.T @ q, q.sum(0), 6, 0.7))(
            torch.softmax(randn(6, 6), 1)
        ),
        "student_t": lambda: (randn(6, 4), randn(3, 4), 1.5),
        "dec": lambda: (probs(),),
        "anchor": lambda: (probs(), probs(), probs()),
        "dec_anchor": lambda: (probs(), probs(), probs()),
    }[name]()


def _cluster_pair(backend, name):
    from fastcluster_cl.backends.autograd import pairs

    forward = getattr(OPS, f"{name}_{backend}_fwd").default
    return forward, pairs.PAIRS[f"fastcluster_cl::{name}_{backend}_fwd"]


@pytest.mark.parametrize("backend, name", CLUSTER_OPS)
def test_opcheck_cluster_ops(backend, name, dense_cuda):
    forward, pair = _cluster_pair(backend, name)
    inputs = list(_cluster_inputs(name, DTYPES[backend]))
    for i in pair.wrt:
        inputs[i].requires_grad_()
    torch.library.opcheck(forward, tuple(inputs))
    assert pair.backward_op._qualname == f"fastcluster_cl::{name}_{backend}_bwd"
    detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in inputs]
    outputs = forward(*detached)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = [torch.randn_like(out) for out in outputs]
    torch.library.opcheck(
        getattr(OPS, f"{name}_{backend}_bwd").default,
        tuple(pair.backward_args(detached, outputs, grads)),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def _cluster_losses(backend):
    """(name, scalar function of the inputs, index of a differentiated input) per op."""
    module = kernels if backend == "triton" else cuda_backend
    cases = [
        ("student_t", lambda h, mu, alpha: module.student_t(h, mu, alpha)[:, 0].sum(), 0),
        ("dec", module.dec_loss, 0),
        ("anchor", module.anchor_loss, 1),
    ]
    if backend == "triton":
        cases += [
            ("cc_cluster", lambda a, b: kernels.cc_cluster_loss(a, b, 0.7), 0),
            ("dec_anchor", lambda *q: sum(kernels.dec_anchor_losses(*q)), 0),
        ]
    return cases


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cluster_double_backward_is_refused_clearly(backend, dense_cuda):
    for name, loss_fn, wrt in _cluster_losses(backend):
        inputs = list(_cluster_inputs(name, DTYPES[backend]))
        inputs[wrt].requires_grad_()
        (g,) = torch.autograd.grad(loss_fn(*inputs), inputs[wrt], create_graph=True)
        with pytest.raises(
            RuntimeError,
            match=f"double backward is not supported by backend='{backend}'; use backend='torch'",
        ):
            torch.autograd.grad(g.pow(2).sum(), inputs[wrt])


# Which registered forward op each case of test_compile._cases traces on triton.
_TRITON_OP_OF_CASE = {
    "nt_xent": "nt_xent",
    "cc_cluster_loss": "cc_cluster",
    "student_t": "student_t",
    "dec_loss": "dec",
    "anchor_loss": "anchor",
    "ClusterContrastiveLoss(anchor)": "dec_anchor",
    "ClusterContrastiveLoss(cc)": "cc_objective",
    "ClusterContrastiveLoss(anchor(h))": "anchor_objective",
    "ClusterContrastiveLoss(tcc)": "nt_xent",
    "anchor_objective": "anchor_objective",
    "cc_objective": "cc_objective",
}


def test_no_graph_breaks_for_every_loss_on_triton():
    """Every loss and objective on triton (interpreted) traces in one graph holding its op,
    after one eager call (which imports triton: not traceable)."""
    for name, fn, inputs in loss_cases("triton"):
        fn(*inputs)
        explained = _explain(fn, *inputs)
        assert explained.graph_break_count == 0, (name, explained.break_reasons)
        assert explained.graph_count == 1, name
        names = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
        assert f"fastcluster_cl.{_TRITON_OP_OF_CASE[name]}_triton_fwd.default" in names, name


def test_compiled_fullgraph_cluster_objectives_on_triton():
    """torch.compile(fullgraph=True) through the cluster ops' registered autograd: the eager
    values and gradients."""
    q0, q_a, q_b = _cluster_inputs("anchor", F64)
    logits = [t.requires_grad_() for t in _cluster_inputs("cc_cluster", F64)]
    q_a.requires_grad_()

    def objective(q_a, la, lb):
        dec, anchor = functional.dec_anchor_losses(q0, q_a, q_b, backend="triton")
        return dec + anchor + fc.cc_cluster_loss(la, lb, 0.7, backend="triton")

    want = objective(q_a, *logits)
    torch._dynamo.reset()
    got = torch.compile(objective, fullgraph=True, backend="aot_eager")(q_a, *logits)
    torch.testing.assert_close(got, want)
    for g, w in zip(
        torch.autograd.grad(got, (q_a, *logits)), torch.autograd.grad(want, (q_a, *logits))
    ):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_compiled_fullgraph_one_pass_objectives(backend):
    """torch.compile(fullgraph=True) through the one-pass objectives' autograd (triton: the
    registered ops'; chunked: its one node over the side ops): the eager values and gradients
    of the total and of a part."""
    g = torch.Generator().manual_seed(3)
    z_a, z_b, h0, h_a, h_b = (
        torch.randn(9, 6, generator=g, dtype=F64).requires_grad_() for _ in range(5)
    )
    mu = torch.randn(4, 6, generator=g, dtype=F64).requires_grad_()
    la, lb = (torch.randn(9, 4, generator=g, dtype=F64).requires_grad_() for _ in range(2))
    leaves = (z_a, z_b, h0, h_a, h_b, mu, la, lb)

    def objective(z_a, z_b, h0, h_a, h_b, mu, la, lb):
        anchor = fc.anchor_objective(z_a, z_b, h0, h_a, h_b, mu, backend=backend)
        cc = fc.cc_objective(z_a, z_b, la, lb, backend=backend)
        return anchor.total + 0.5 * anchor.parts["cluster"] + cc.total

    want = objective(*leaves)
    torch._dynamo.reset()
    got = torch.compile(objective, fullgraph=True, backend="aot_eager")(*leaves)
    torch.testing.assert_close(got, want)
    for g_got, g_want in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(g_got, g_want)


def _side_inputs():
    g = torch.Generator().manual_seed(4)
    h = [torch.randn(7, 5, generator=g, dtype=F64) for _ in range(3)]
    logits = [torch.randn(7, 3, generator=g, dtype=F64) for _ in range(2)]
    return (*h, torch.randn(3, 5, generator=g, dtype=F64), 1.5), (*logits, 0.7)


def test_opcheck_chunked_objective_sides():
    """The chunked objectives' side ops (what torch.compile traces) pass opcheck; their
    backward ops refuse a second differentiation."""
    for side, args in zip(("anchor", "cc"), _side_inputs()):
        forward, backward = (getattr(OPS, f"{side}_side_{d}").default for d in ("fwd", "bwd"))
        torch.library.opcheck(forward, args)
        value, *state = forward(*args)
        torch.library.opcheck(
            backward,
            (*args, torch.ones_like(value), *state),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


def test_chunked_objective_double_backward_is_refused_clearly():
    anchor, cc = _side_inputs()
    z_a, z_b = _pair(7, 4)
    for objective, inputs in ((fc.anchor_objective, anchor[:4]), (fc.cc_objective, cc[:2])):
        leaves = [t.clone().requires_grad_() for t in inputs]
        total = objective(z_a, z_b, *leaves, backend="chunked").total
        grads = torch.autograd.grad(total, [z_a, *leaves], create_graph=True)
        for g, wrt in zip(grads, [z_a, *leaves]):
            with pytest.raises(RuntimeError, match="double backward is not supported by "):
                torch.autograd.grad(g.pow(2).sum(), wrt, retain_graph=True)
