"""Backend selection. A backend is a module exposing some of the loss ops under their public
names (nt_xent, cc_cluster_loss, student_t, dec_loss, anchor_loss, tcc_cluster_loss) with the
signatures of `fastcluster_cl.losses.reference`. A backend may define
``unavailable_reason(device) -> str | None`` to refuse devices it cannot run on. Asking a backend
for an op it lacks, or for a device it refuses, raises: no silent fallback.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

BACKENDS = ("auto", "torch", "chunked", "triton", "cuda")
_MODULES = {
    "torch": "fastcluster_cl.losses.reference",
    "chunked": "fastcluster_cl.losses.chunked",
    "triton": "fastcluster_cl.kernels",
    "cuda": "fastcluster_cl.cuda_backend",
}


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
    return importlib.import_module(_MODULES[name])


def implementation(op: str, backend: str, device: torch.device,
                   required: bool = True) -> Callable | None:
    """The function computing `op` on `backend` ("auto" resolved) for tensors on `device`; None
    for an optional op (required=False, e.g. a fused variant) that the backend lacks."""
    name = resolve(backend, device)
    try:
        module = _backend_module(name)
    except ImportError as err:
        raise RuntimeError(f"backend={name!r} cannot be loaded here ({err}); use backend='auto', "
                           "'chunked' or 'torch'") from err
    reason = getattr(module, "unavailable_reason", lambda _device: None)(device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run on {device}: {reason}")
    fn = getattr(module, op, None)
    if fn is None and not required:
        return None
    if fn is None:
        raise NotImplementedError(f"backend={name!r} has no {op}; use backend='torch' or "
                                  "'chunked' for it")
    return fn
