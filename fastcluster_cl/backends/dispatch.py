"""Backend selection. A backend is a module exposing some of the loss ops under their public
names (nt_xent, cc_cluster_loss, student_t, dec_loss, anchor_loss, ...) with the
signatures of `fastcluster_cl.backends.reference`. A backend may define
``unavailable_reason(device) -> str | None`` to refuse devices it cannot run on. Asking a backend
for an op it lacks, or for a device it refuses, raises: no silent fallback. "auto" is the one
choice made for the caller: triton on usable CUDA devices, chunked elsewhere and for inputs the
Triton kernels cannot hold (`backend_for`), and the separate ops where a backend declares its
one-pass objective the slower path (`auto_takes_one_pass`); all compute the same function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import chunked, reference

BACKENDS = ("auto", "torch", "chunked", "triton", "cuda")
# Backend modules by name. The pure-PyTorch ones are imported with this module; triton and cuda
# load on first use (`_import`), so that importing fastcluster_cl never imports triton or builds
# CUDA code.
_LOADED = {"torch": reference, "chunked": chunked}


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices when triton imports and the backend is present."""
    if device.type != "cuda":
        return False
    try:
        return _backend_module("triton").unavailable_reason(device) is None
    except (ImportError, AttributeError):
        return False


def resolve(backend: str, device: torch.device) -> str:
    """Map "auto" to a concrete backend: triton on usable CUDA devices, else chunked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if triton_usable(device) else "chunked"
    return backend


def _backend_module(name: str):
    if name not in _LOADED:
        _LOADED[name] = _import(name)
    return _LOADED[name]


def _import(name: str):
    """The triton or cuda backend module, by import statements: dynamo traces those (a first call
    under torch.compile loads the backend in its graph), not importlib."""
    if name == "triton":
        from .. import kernels

        return kernels
    if name == "cuda":
        from . import cuda

        return cuda
    raise ValueError(f"no module for backend {name!r}: add it to dispatch._import")


# (op, backend, device) -> the function, or None for an op the backend lacks. Filled on the first
# call for a key, so later calls (and torch.compile traces) do a dict lookup instead of an import,
# which dynamo cannot trace. Failed look-ups are not stored: they raise again on every call.
_RESOLVED: dict[tuple[str, str, torch.device], Callable | None] = {}


def _lookup(op: str, backend: str, device: torch.device) -> Callable | None:
    name = resolve(backend, device)
    try:
        module = _backend_module(name)
    except ImportError as err:
        raise RuntimeError(
            f"backend={name!r} cannot be loaded here ({err}); use backend='auto', "
            "'chunked' or 'torch'"
        ) from err
    reason = getattr(module, "unavailable_reason", lambda _device: None)(device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run on {device}: {reason}")
    return getattr(module, op, None)


def implementation(
    op: str, backend: str, device: torch.device, required: bool = True
) -> Callable | None:
    """The function computing `op` on `backend` ("auto" resolved) for tensors on `device`; None
    for an optional op (required=False, e.g. a fused variant) that the backend lacks. Resolved
    once per (op, backend, device)."""
    key = (op, backend, device)
    if key not in _RESOLVED:
        _RESOLVED[key] = _lookup(op, backend, device)
    fn = _RESOLVED[key]
    if fn is None and required:
        raise NotImplementedError(
            f"backend={resolve(backend, device)!r} has no {op}; use "
            "backend='torch' or 'chunked' for it"
        )
    return fn


def backend_for(op: str, backend: str, device: torch.device, *tensors: torch.Tensor) -> str:
    """`backend` for these inputs: "auto" where it resolves to triton takes chunked when the
    kernels lack `op` (e.g. DEC's per-row terms) or cannot hold the inputs (the triton module's
    `op`_fits: more than 2048 features an NT-Xent row, more than 1024 Student-t centres,
    ...), instead of raising. An explicit backend is kept (and raises on such inputs, saying
    why)."""
    if backend != "auto" or resolve(backend, device) != "triton":
        return backend
    if implementation(op, backend, device, required=False) is None:
        return "chunked"
    fits = implementation(f"{op}_fits", backend, device, required=False)
    return "chunked" if fits is not None and not fits(*tensors) else backend


def auto_takes_one_pass(op: str, backend: str, device: torch.device, *tensors) -> bool:
    """False where "auto" resolves to a backend whose ``AUTO_SEPARATE`` says so for `op` on
    these inputs (z_a first): a one-pass objective that backend runs slower than its separate
    ops there, so auto takes those (the same function). An explicit backend keeps its one-pass
    path."""
    if backend != "auto":
        return True
    separate = getattr(_backend_module(resolve(backend, device)), "AUTO_SEPARATE", {}).get(op)
    return separate is None or not separate(*tensors)
