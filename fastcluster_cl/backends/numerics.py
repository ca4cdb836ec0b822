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


def bf16_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 x as hi + mid + lo, three bf16 tensors of 8 significant bits each: together the 24
    of fp32, so the sum is x (but where a part falls below bf16's normal range)."""
    hi = x.to(torch.bfloat16)
    rest = x - hi  # promoted to fp32: exact
    mid = rest.to(torch.bfloat16)
    return hi, mid, (rest - mid).to(torch.bfloat16)


def parts_product(a, b) -> torch.Tensor:
    """a @ b of fp32 matrices given as their `bf16_parts` (a, b: the three parts each): the six
    products whose part orders add to at most 2 (the dropped ones are at or below 2^-24
    |a||b|, fp32's own rounding), each bf16 x bf16 accumulated into the fp32 sum on the tensor
    cores (CUDA only; `_fp32_bias_taken`), smallest first."""
    (a0, a1, a2), (b0, b1, b2) = a, b
    out = torch.mm(a0, b2, out_dtype=torch.float32)
    for x, y in ((a2, b0), (a1, b1), (a0, b1), (a1, b0), (a0, b0)):
        out = torch.addmm(out, x, y, out_dtype=torch.float32)
    return out


def parts_gram(parts) -> torch.Tensor:
    """x^T x of an fp32 matrix given as its `bf16_parts`: `parts_product`'s six products in
    four, by symmetry (the cross terms P0^T P1 + P0^T P2 once, added to their transpose, then
    P1^T P1 and P0^T P0, smallest first): the cross terms' sum exactly symmetric."""
    p0, p1, p2 = parts
    cross = torch.mm(p0.T, p2, out_dtype=torch.float32)
    cross = torch.addmm(cross, p0.T, p1, out_dtype=torch.float32)
    out = torch.addmm(cross + cross.T, p1.T, p1, out_dtype=torch.float32)
    return torch.addmm(out, p0.T, p0, out_dtype=torch.float32)


# Where an fp32 product runs as `parts_product` on CUDA. Per multiply-add it saves about 2.8e-14
# s on an H100 (one on the FP32 pipe, torch's IEEE default, against six at the bf16 tensor rate,
# each at cuBLAS's 73%); splitting an operand element costs about 9e-12 s (five elementwise
# passes, ~30 bytes at HBM bandwidth) and the split about ten launches (~40 us). So it pays
# from about 1.6e9 multiply-adds, and for products of at least about 330 multiply-adds per
# operand element (mnk / (mk + kn)): a Gram of 2 x 200 cluster columns over 32768 rows does
# not. The cost model's cc rows, benchmarks/static_notes.md section 16. Where the large operand
# comes split already (the Triton cc side writes Q's parts in the pass that writes Q, nearly
# free) only the multiply-adds count: that Gram pays (section 27).
PARTS_PRODUCT_MACS = 2**31
PARTS_PRODUCT_MACS_PER_ELEMENT = 512


@functools.cache
def _fp32_bias_taken(device_type: str) -> bool:
    """Whether this torch's addmm takes an fp32 bias with bf16 factors into fp32 (out_dtype):
    the overloads are newer than the oldest torch supported here, and some releases wanted
    the bias in the factors' dtype. Without it the products stay fp32 matmuls (the same values
    to rounding, slower). Meta: the cost model's stand-in for a current torch on an H100 (no
    probe, whose ops its trace would record)."""
    if device_type == "meta":
        return True
    one = torch.ones(1, 1, device=device_type)
    try:
        torch.addmm(one, one.bfloat16(), one.bfloat16(), out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


def tf32_allowed() -> bool:
    """Whether torch may run fp32 matmuls as TF32 (torch.backends.cuda.matmul.fp32_precision,
    which also reflects the legacy allow_tf32 and set_float32_matmul_precision; "none" defers to
    torch.backends.fp32_precision)."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch before the fp32_precision settings
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def _bf16_tensor_cores(device: torch.device) -> bool:
    """An NVIDIA GPU with bf16 tensor cores (sm_80 on); meta: the H100 the cost model traces."""
    if device.type == "meta":
        return True
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 8


def products_by_parts(
    m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, split: bool = False
) -> bool:
    """Whether an (m x k) @ (k x n) product of `dtype` on `device` runs as `parts_product`:
    fp32 CUDA matrices (meta ones too: the cost model traces the CUDA path) of a large and
    dense enough product (any density where the caller has the large operand `split`
    already), where torch multiplies fp32 as IEEE (not TF32) and the GPU has bf16 tensor
    cores."""
    return (
        dtype == torch.float32
        and device.type in ("cuda", "meta")
        and m * n * k >= PARTS_PRODUCT_MACS
        and (split or m * n >= PARTS_PRODUCT_MACS_PER_ELEMENT * (m + n))
        and not tf32_allowed()  # then one TF32 product beats six bf16 ones
        and _bf16_tensor_cores(device)
        and _fp32_bias_taken(device.type)
    )


def _by_parts(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`products_by_parts` of a @ b."""
    (m, k), n = a.shape, b.shape[1]
    return a.dtype == b.dtype and products_by_parts(m, k, n, a.dtype, a.device)


def fp32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b, as `parts_product` where `_by_parts`."""
    if _by_parts(a, b):
        return parts_product(bf16_parts(a), bf16_parts(b))
    return a @ b


def fp32_gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x, as `parts_gram` where `_by_parts` (x's parts split once)."""
    if _by_parts(x.T, x):
        return parts_gram(bf16_parts(x))
    return x.T @ x
