"""A path's kernels, recorded by running it on meta tensors (no data, no device) under a dispatch
mode: the torch ops that launch a kernel, each predicted by `model` (matrix products at a
cuBLAS-class rate, every other op at HBM bandwidth over the bytes it reads and writes, each
with a launch), and, where asked, the Triton launches of the project's kernels with their grid
and arguments. The project's torch.library ops then run their own host code (their fake
implementations would hide the torch ops around each launch), and each Triton launch is
recorded instead of run."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from . import model

# An H100 SXM5 80GB's memory as nvidia-smi reports it (81559 MiB): a path whose live tensors
# exceed it at some point cannot run the shape.
HBM_BYTES = 81559 * 2**20
# The project's torch.library namespace: its ops' host code is traced, not their fakes.
OPS_NAMESPACE = "fastcluster_cl"


@dataclass
class TritonLaunch:
    """One recorded launch: the JIT function, its grid and its keyword arguments (tensors as
    their dtype, the rest as given)."""

    kernel: object
    grid: tuple[int, ...]
    args: dict


@dataclass
class Trace:
    kernels: list[tuple[str, float]] = field(default_factory=list)  # (op, predicted seconds)
    launches: list[TritonLaunch] = field(default_factory=list)


def _is_kernel_free(func) -> bool:
    """Ops that launch no kernel: views, allocations without a fill, metadata."""
    import torch

    name = func.__name__ if hasattr(func, "__name__") else str(func)
    return (
        bool(getattr(func, "is_view", False))
        or name.split(".")[0]
        in (
            "empty",
            "empty_strided",
            "empty_like",
            "new_empty",
            "new_empty_strided",
            "detach",
            "alias",
            "lift_fresh",
            "_unsafe_view",
            "sym_size",
            "sym_stride",
        )
        or func in (torch.ops.aten.set_.source_Storage_storage_offset,)
    )


def _tensor_bytes(values) -> int:
    import torch

    total = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (list, tuple)):
            total += _tensor_bytes(v)
    return total


def _flat(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _free(live: list, nbytes: int) -> None:
    live[0] -= nbytes


def _recording_triton(launches: list[TritonLaunch]):
    """A context in which every Triton launch (compiled, or under TRITON_INTERPRET=1
    interpreted) is appended to `launches` instead of run."""
    import contextlib

    import torch
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def record(self, *args, grid, warmup, **kwargs):
        if args:
            raise ValueError(f"{self.fn.__name__}: positional launch arguments not traced")
        described = {k: v.dtype if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        launches.append(TritonLaunch(self, tuple(grid), described))

    @contextlib.contextmanager
    def recording():
        runs = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}
        for cls in runs:
            cls.run = record
        try:
            yield
        finally:
            for cls, run in runs.items():
                cls.run = run

    return recording()


def record(fn: Callable, inputs: list, triton: bool = False) -> Trace:
    """The kernels of fn(*inputs) and of its backward. Raises MemoryError when the tensors alive
    at once (every op's fresh outputs until they are freed, autograd's saved ones included)
    exceed the GPU's memory. With `triton`, the project's ops run their host code and its
    Triton launches are recorded (`Trace.launches`), not run."""
    import contextlib

    import torch
    from torch._library import custom_ops
    from torch.utils._python_dispatch import TorchDispatchMode

    trace = Trace()
    live = [0]

    def allocate(out, func) -> None:
        """Count the op's fresh output tensors (not views or in-place results) while alive."""
        if getattr(func, "is_view", False) or str(func).split(".")[1].endswith("_"):
            return
        for t in _flat(out):
            if isinstance(t, torch.Tensor):
                nbytes = t.numel() * t.element_size()
                live[0] += nbytes
                weakref.finalize(t, _free, live, nbytes)
        if live[0] > HBM_BYTES:
            raise MemoryError(
                f"{func} brings the live tensors to {live[0] / 2**30:.0f} GiB: "
                f"more than the GPU's {HBM_BYTES / 2**30:.1f} GiB"
            )

    aten = torch.ops.aten
    # the .dtype overloads: bf16 x bf16 accumulated into fp32 (`numerics.parts_product`)
    added = {aten.addmm.default, aten.addmm.dtype, aten.baddbmm.default}  # c + a b
    gemms = {aten.mm.default, aten.mm.dtype, aten.bmm.default, *added}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if triton and func.namespace == OPS_NAMESPACE:
                opdef = custom_ops._maybe_get_opdef(func._schema.name)
                if opdef is None:
                    raise ValueError(f"{func}: not a torch.library.custom_op, its body is unknown")
                with self:  # the op's own host code, its torch ops recorded too
                    return opdef._init_fn(*args, **kwargs)
            with self:  # a composite op (matmul, reshape, to, ...) as the kernels it runs
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
            out = func(*args, **kwargs)
            if not any(isinstance(t, torch.Tensor) for t in _flat(out)):
                return out  # a dtype, a shape: no kernel
            allocate(out, func)
            if func in gemms:
                a, b = (args[1], args[2]) if func in added else args[:2]
                batch = a.shape[0] if a.dim() == 3 else 1
                m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
                seconds = model.gemm_seconds(m, n, k, max(a.element_size(), b.element_size()))
                trace.kernels.append((str(func), batch * seconds - (batch - 1) * model.LAUNCH_S))
            elif not _is_kernel_free(func):
                moved = _tensor_bytes(args) + _tensor_bytes(kwargs.values()) + _tensor_bytes([out])
                trace.kernels.append((str(func), model.memory_seconds(moved)))
            return out

    leaves = [t.to("meta").requires_grad_() for t in inputs]
    live[0] = _tensor_bytes(leaves)
    launches = _recording_triton(trace.launches) if triton else contextlib.nullcontext()
    with launches, Record():
        loss = fn(*leaves)
        loss.backward()
    return trace


def meta_bf16(*size: int):
    """A bf16 tensor of `size` on the meta device: shapes and dtypes, no data."""
    import torch

    return torch.empty(*size, dtype=torch.bfloat16, device="meta")


def nt_xent(backend: str, n: int, d: int, ranks: int = 1) -> Trace:
    """One forward + backward of NT-Xent through its autograd function on `backend`, bf16
    N x D views, recorded with the backend's launches (`record(triton=True)`); gathered over
    `ranks` as rank 0 (`rank_zero_of`)."""
    from ..backends.autograd import nt_xent as autograd

    with rank_zero_of(ranks):
        return record(
            lambda a, b: autograd.nt_xent(a, b, 0.5, backend, gather=ranks > 1),
            [meta_bf16(n, d), meta_bf16(n, d)],
            triton=True,
        )


def rank_zero_of(ranks: int):
    """The distributed helpers as rank 0 of `ranks` ranks, so that a gathered path traces in one
    process: an all-gather becomes a copy of the rows `ranks` times (its local traffic; the
    interconnect is not modelled)."""
    from unittest import mock

    from .. import distributed

    def gather(t):
        return t.repeat(ranks, *[1] * (t.dim() - 1))

    return mock.patch.multiple(
        distributed,
        gather_views=gather,
        gather_rows_with_grad=gather,
        check_equal_rows=lambda *args: None,
        rank=lambda: 0,
        world_size=lambda: ranks,
    )


def eager_kernels(fn: Callable, inputs: list) -> list[tuple[str, float]]:
    """(op, predicted seconds) of every kernel the torch reference launches for fn(*inputs)
    and its backward (`record`)."""
    return record(fn, inputs).kernels
