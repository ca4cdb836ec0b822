"""NT-Xent against a memory bank on the CUDA twin (csrc/nt_xent_bank.cu)."""

from __future__ import annotations

import torch

from ..autograd import nt_xent_bank as nt_xent_bank_autograd
from ..numerics import fixed_shift_safe
from . import build

# NT-Xent against a memory bank (csrc/nt_xent_bank.cu) as torch.library ops with fakes; their
# autograd is `fastcluster_cl.backends.autograd.nt_xent_bank` (the state: zs, rs, norms, dist, row
# weights and row losses, as the Triton backend's).


def _bank_operands(
    bank: torch.Tensor, zs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(bank, bank_lo or None): the extension's bank operands for Zs's dtype
    (`nt_xent_bank_autograd.bank_operands`)."""
    hi, lo, split = nt_xent_bank_autograd.bank_operands(bank, zs.dtype)
    return hi, (lo if split else None)


def _bank_forward_rows(zs, rs, dist, bank, inv_tau):
    return build.extension().bank_forward(
        zs,
        rs,
        dist,
        *_bank_operands(bank, zs),
        inv_tau,
        fixed_shift_safe(inv_tau, torch.float32),
    )


def _bank_backward_rows(zs, rs, norm, dist, bank, row_w, row_loss, w, inv_tau, out_dtype):
    dz_a, dz_b = build.extension().bank_backward(
        zs,
        rs,
        norm,
        dist,
        *_bank_operands(bank, zs),
        row_w,
        row_loss,
        w,
        inv_tau,
        fixed_shift_safe(inv_tau, torch.float32),
        out_dtype,
    )
    return dz_a, dz_b


_bank_forward, _bank_backward = nt_xent_bank_autograd.define_scaled_row_ops(
    "cuda",
    lambda z_a, z_b: tuple(build.extension().normalize(z_a, z_b)),
    _bank_forward_rows,
    _bank_backward_rows,
    lambda dtype: torch.float32 if dtype == torch.float32 else torch.float16,
)


def _check_bank(z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor) -> None:
    build.check_inputs(("z_a", "z_b"), (z_a, z_b))
    if not bank.is_floating_point():
        raise TypeError(f"bank must be a floating-point tensor, got {bank.dtype}")


def nt_xent_bank(
    z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`fastcluster_cl.nt_xent_bank` with the CUDA C++ kernels (csrc/nt_xent_bank.cu); returns
    float32. The bank (any float dtype) is cast to the kernels' operand type (fp16 hi + lo for
    a wider bank with 16-bit inputs)."""
    _check_bank(z_a, z_b, bank)
    return nt_xent_bank_autograd.nt_xent_bank(
        _bank_forward, z_a, z_b, bank, float(temperature), False
    )


def nt_xent_bank_terms(
    z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The N row terms with the CUDA C++ kernels (per-row gradients: the backward weights each
    row by its incoming gradient)."""
    _check_bank(z_a, z_b, bank)
    return nt_xent_bank_autograd.nt_xent_bank(
        _bank_forward, z_a, z_b, bank, float(temperature), True
    )
