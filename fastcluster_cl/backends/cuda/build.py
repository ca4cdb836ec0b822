"""Building and loading the CUDA extension (csrc/), and the checks every CUDA op runs first."""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import os

import torch

_OPS = ("nt_xent", "nt_xent_bank", "cluster", "objective")
# each op's kernels and its torch binding beside them, and the module definition
_SOURCES = ("binding.cpp", *(f"{op}{suffix}" for op in _OPS for suffix in (".cu", "_binding.cpp")))
_SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_CAPABILITY = (8, 0)  # bfloat16 tensor cores (wmma) need Ampere or newer


def _compiler_missing() -> str | None:
    """Why the extension cannot be compiled here, or None when nvcc is found."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None:
        return (
            "no CUDA toolkit found to compile the extension (torch.utils.cpp_extension."
            "CUDA_HOME is None); install the CUDA toolkit matching torch.version.cuda="
            f"{torch.version.cuda} and set CUDA_HOME, or use backend='triton'"
        )
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return (
            f"no nvcc at {nvcc} (CUDA_HOME={home}); install the CUDA toolkit or set "
            "CUDA_HOME, or use backend='triton'"
        )
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """Why backend="cuda" cannot run on `device`, or None when it can."""
    if torch.version.cuda is None:
        return (
            "this torch build has no CUDA support (torch.version.cuda is None); install a "
            "CUDA build of torch, or use backend='chunked' or 'torch' on CPU"
        )
    if device.type != "cuda":
        return f"it needs CUDA tensors, got tensors on {device}; move them with .cuda()"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no visible GPU or driver)"
    capability = torch.cuda.get_device_capability(device)
    if capability < _MIN_CAPABILITY:
        return (
            f"it needs compute capability >= {_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]} "
            f"(Ampere or newer), {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}; use backend='triton'"
        )
    return _compiler_missing()


def require_device(device: torch.device) -> None:
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend='cuda' cannot run on {device}: {reason}")


@functools.cache
def extension():
    """The compiled extension module (JIT-built on first use, then loaded from torch's cache).

    Exposes the building blocks documented in csrc/fcl_kernels.h and csrc/*_binding.cpp:
    normalize(z_a, z_b), lse_rows(zs, rs, row_start, row_end, inv_tau),
    grad_rows(zs, rs, lse, row_loss, row_start, row_end, inv_tau),
    norm_backward(zs, rs, norm, g, row_start, row_end, grad_out, factor, out),
    student_t_forward(h, centers, alpha), student_t_backward(h, centers, q, dist2, grad_q, alpha),
    dec_forward(q), dec_backward(q, f, grad_out, factor), anchor_forward(q0, q_a, q_b),
    anchor_backward(q0, q_a, q_b, grad_out, factor), bank_forward(zs, rs, dist, bank, bank_lo,
    inv_tau, fixed_shift), bank_backward(zs, rs, norm, dist, bank, bank_lo, row_w, row_loss, w,
    inv_tau, fixed_shift, out), anchor_objective_forward(z_a, z_b, h0, h_a, h_b, centers,
    inv_tau, alpha, w_instance, w_cluster, w_anchor), anchor_objective_backward(..., rows,
    assign, f, grad, ...), cc_objective_forward(z_a, z_b, logits_a, logits_b, inv_tau,
    inv_tau_c, w_instance, w_cluster), cc_objective_backward(..., rows, row_lse, gram,
    cluster_rows, grad, ...).
    """
    from torch.utils.cpp_extension import load

    root = importlib.resources.files("fastcluster_cl.csrc")
    sources = [str(root / name) for name in _SOURCES]
    # The name carries a digest of every source and header: torch's cache keys on the sources
    # it is given only, so a changed header must not reuse a stale build.
    digest = hashlib.sha256()
    for entry in sorted(root.iterdir(), key=lambda entry: entry.name):
        if entry.name.endswith(_SOURCE_SUFFIXES):
            digest.update(entry.name.encode() + b"\0" + entry.read_bytes())
    name = f"fastcluster_cl_cuda_{digest.hexdigest()[:16]}"
    try:
        return load(
            name=name,
            sources=sources,
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            verbose=False,
        )
    except (RuntimeError, OSError) as err:
        raise RuntimeError(
            f"building the backend='cuda' extension from {sources} failed; "
            f"use backend='triton' meanwhile. Compiler report: {err}"
        ) from err


def check_inputs(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """Device usable, a kernel dtype, and one shape/dtype/device for all tensors."""
    first = tensors[0]
    require_device(first.device)
    if first.dtype not in DTYPES:
        raise TypeError(
            f"backend='cuda' takes float32, float16 or bfloat16 inputs (it "
            f"accumulates in float32), got {names[0]} of {first.dtype}; use "
            "backend='torch' or 'chunked' for float64"
        )
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first.dtype or t.shape != first.shape or t.device != first.device:
            raise ValueError(
                f"{name} must match {names[0]} in shape, dtype and device, got "
                f"{tuple(t.shape)} {t.dtype} {t.device} and {tuple(first.shape)} "
                f"{first.dtype} {first.device}"
            )
