"""Numerics every backend shares: the accumulation dtype, the exact row normalisation and its
backward, the fixed-shift range, the clamped log, and the autocast guard."""

from __future__ import annotations

import functools

import torch

NORM_EPS = 1e-12  # as F.normalize: z / max(||z||, eps)
# Largest 2/tau for which exp(S - 1/tau) >= exp(-2/tau) stays a normal number, by accumulation
# dtype: below that temperature the NT-Xent backends shift each row by its own max instead.
_FIXED_SHIFT_RANGE = {torch.float32: 80.0, torch.float64: 700.0}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fixed_shift_safe(inv_tau: float, dtype: torch.dtype) -> bool:
    """Whether the fixed shift 1/|tau| (an exact bound of |S|) keeps every exp(S_ik - 1/|tau|)
    a normal number in the accumulation dtype `dtype`."""
    return 2.0 * abs(inv_tau) <= _FIXED_SHIFT_RANGE[accumulation_dtype(dtype)]


def row_norms(z: torch.Tensor) -> torch.Tensor:
    """max(||z_i||, eps) per row, shape (rows, 1), in the accumulation dtype. Summed in float64
    for float32/bfloat16 inputs, so that rows with |z| up to ~1e150 (whose squares overflow
    float32) get their true norm: every backend normalises such extreme but finite rows exactly
    (F.normalize would return zeros)."""
    wide = torch.float32 if z.dtype == torch.float16 else torch.float64
    norm = torch.linalg.vector_norm(z, dim=1, keepdim=True, dtype=wide)
    return norm.clamp_min(NORM_EPS).to(accumulation_dtype(z.dtype))


def l2_normalize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z / max(||z||, eps), the clamped norm (rows, 1)) in the accumulation dtype; the norm is
    kept for the normalisation's backward."""
    norm = row_norms(z)
    return z.to(norm.dtype) / norm, norm


def l2_normalize_backward(
    zn: torch.Tensor, norm: torch.Tensor, g: torch.Tensor, scale: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """dL/dz from dL/dzn = scale * g, written into g: project out the radial part where
    ||z|| > eps, then multiply by scale / norm (the caller's constant factor folded into the
    normalisation's, one pass over g fewer)."""
    radial = (zn * g).sum(1, keepdim=True).masked_fill_(norm <= NORM_EPS, 0.0)
    return g.addcmul_(zn, radial, value=-1.0).mul_(scale / norm)


def outside_autocast(fn):
    """Run `fn` with autocast off for the device of its first tensor argument: inside an
    autocast region (a forward, or a `.backward()` called there) its matmuls would otherwise run
    in bf16/fp16, breaking the fp32 (fp64) accumulation every backend promises. Inputs keep
    their dtype; low-precision inputs are still accepted."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if (
            first is None
            or not torch.amp.is_autocast_available(first.device.type)
            or not torch.is_autocast_enabled(first.device.type)
        ):  # nothing to turn off (entering an autocast context costs ~10 us a call)
            return fn(*args, **kwargs)
        with torch.autocast(first.device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def safe_log(q: torch.Tensor) -> torch.Tensor:
    """log(q) with q clamped at the dtype's smallest normal: zero probabilities give a finite log
    whose product with a zero weight is 0, and a zero gradient instead of 0/0."""
    return torch.log(q.clamp_min(torch.finfo(q.dtype).tiny))
