"""Shared helpers of the Triton kernels: dtype mapping, dot precision, block sizes, and host
floats as (hi, lo) fp32 kernel arguments."""

from __future__ import annotations

import contextlib
import os
import struct

import torch
import triton
import triton.language as tl

# The reference's norm eps (F.normalize's) and accumulation dtype, for the kernel modules.
from fastcluster_cl.backends.numerics import (
    NORM_EPS,  # noqa: F401
    tf32_allowed,
)
from fastcluster_cl.backends.numerics import accumulation_dtype as torch_acc_dtype  # noqa: F401

MAX_FEATURES = 512  # the row kernels keep a whole feature row in registers
# Programs a row-parallel launch aims for by splitting its columns (NT-Xent's `column_splits`,
# Student-t's `center_splits`): two per SM of an H100 SXM (132 SMs; NT-Xent's kernels hold 2
# CTAs per SM, benchmarks/static_notes.md).
SPLIT_PROGRAMS = 264
_ACC = {torch.float64: tl.float64}


def acc_dtype(dtype: torch.dtype):
    """Triton accumulation dtype: float64 stays float64 (interpreter/tests), all else float32."""
    return _ACC.get(dtype, tl.float32)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 for float32 inputs only where torch allows it for matmuls
    (`numerics.tf32_allowed`)."""
    return "tf32" if dtype == torch.float32 and tf32_allowed() else "ieee"


def even_splits(blocks: int, wanted: int) -> tuple[int, int]:
    """(splits, blocks per split) of `blocks` cut into at most `wanted` runs of equal length
    (the last holds what is left); one run when fewer than two are wanted. The split launches'
    common policy (NT-Xent's columns, Student-t's centre tiles and product k-steps)."""
    if wanted < 2:
        return 1, blocks
    per_split = triton.cdiv(blocks, wanted)
    return triton.cdiv(blocks, per_split), per_split


def tile_splits(row_blocks: int, tiles: int, sweep: int = 2) -> tuple[int, int]:
    """(splits, tiles per split) of a row launch over `tiles` column tiles: a sweep of at least
    `sweep` tiles is cut toward `SPLIT_PROGRAMS` programs where the row blocks alone are fewer
    (under the interpreter any sweep into runs of two, so that the tests' few-tile cases run
    the split launches). Student-t's center tiles, the KL losses' cluster tiles."""
    if is_interpreted():
        wanted = triton.cdiv(tiles, 2)
    else:
        wanted = SPLIT_PROGRAMS // row_blocks if tiles >= sweep else 1
    return even_splits(tiles, min(tiles, wanted))


# A split of a split-K product's inner dimension spans at least this many k-steps on a GPU.
MIN_PRODUCT_STEPS = 4


def product_splits(tiles: int, inner: int, block_k: int) -> tuple[int, int]:
    """(splits, inner length per split) of a product of `tiles` output tiles whose inner
    dimension runs in steps of `block_k`: cut toward `SPLIT_PROGRAMS` programs when the tiles
    alone are fewer (split-K, e.g. Student-t's dmu at a few centres: K x F outputs over N
    rows); under the interpreter into runs of two k-steps, so that the tests run the split
    launches."""
    steps = triton.cdiv(inner, block_k)
    if is_interpreted():
        wanted = triton.cdiv(steps, 2)
    else:
        wanted = min(steps // MIN_PRODUCT_STEPS, SPLIT_PROGRAMS // tiles)
    splits, per_split = even_splits(steps, wanted)
    return splits, per_split * block_k


def is_interpreted() -> bool:
    """Whether the kernels run under TRITON_INTERPRET=1 (the tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def upcast_dots(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot mis-handles bf16 (numpy has no bf16): cast such operands to fp32
    there. On a GPU bf16 dots stay on the tensor cores."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot(a, b, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in ACC (fp32 operands upcast first when UPCAST, see `upcast_dots`)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), out_dtype=ACC, input_precision=PREC)
    else:
        return tl.dot(a, b, out_dtype=ACC, input_precision=PREC)


_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """x (fp32 or wider) cast to DTYPE, rounding to nearest even as the GPU's conversion does.
    The interpreter truncates fp32 -> bf16 instead (doubling the bf16 output error the tests
    see), so there the rounding is done on the bits (finite values)."""
    if _INTERPRETED and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


def feature_block(d: int, what: str, limit: int = MAX_FEATURES, kernels: str = "") -> int:
    """Power-of-two register width for d features; refuse widths beyond `limit` (the row
    kernels hold MAX_FEATURES; `kernels` names those with another limit in the message)."""
    if d > limit:
        raise ValueError(
            f"backend='triton' supports at most {limit} features per row{kernels} "
            f"({what} has {d}); use backend='chunked' for wider inputs"
        )
    return max(16, triton.next_power_of_2(d))


def check_dtype(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(
                f"backend='triton' takes float16, bfloat16, float32 or float64 "
                f"tensors, got {t.dtype}"
            )


def device_guard(t: torch.Tensor):
    """Launch on the tensor's own GPU, not the current one (the interpreter has none to set)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def float_param(hi, lo, ACC: tl.constexpr):
    """A host float passed as two fp32 kernel arguments (`split_floats`: hi = fp32(x),
    lo = fp32(x - hi)), as a scalar of ACC: x to ~2^-48 in fp64 (Triton passes Python floats as
    fp32)."""
    return tl.sum((hi + tl.zeros([1], ACC)) + (lo + tl.zeros([1], ACC)), axis=0)


def split_floats(**values: float) -> dict[str, float]:
    """Each float as the (hi, lo) fp32 kernel arguments `<name>_hi`, `<name>_lo` (`float_param`):
    no tensor to fill or copy per call, and fp64 precision kept."""
    out = {}
    for name, v in values.items():
        hi = struct.unpack("f", struct.pack("f", v))[0]
        out[f"{name}_hi"], out[f"{name}_lo"] = hi, struct.unpack("f", struct.pack("f", v - hi))[0]
    return out
