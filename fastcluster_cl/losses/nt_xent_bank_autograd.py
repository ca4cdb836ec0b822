"""NT-Xent against a memory bank: the autograd shared by the fused backends.

Each fast backend (chunked, triton, cuda) registers two torch.library custom ops:

- ``nt_xent_bank_<backend>_fwd(z_a, z_b, bank, inv_tau, per_row, *options) -> (loss, *state)``,
  loss the N row losses if per_row, else their mean; the state is opaque here (chunked and
  CUDA keep the row losses, Triton its prologue's scaled rows as well);
- ``nt_xent_bank_<backend>_bwd(z_a, z_b, bank, grad, inv_tau, *state, *options) -> (dz_a, dz_b)``
  with `grad` 0-d (the mean's) or (N,) (one per row).

`register_bank_autograd` gives the forward op the backward op as its autograd formula (so the op
is differentiable on its own, and `nt_xent_bank` below is just a call of it) and makes the
backward op refuse a second differentiation. The bank never receives a gradient.

The gradient (derived in docs/ops.md): with t_i = log sum_k exp(S_ik - S_pos_i),
loss_i = softplus(t_i), lse_i = S_pos_i + loss_i, P_ik = exp(S_ik - lse_i) and
P_pos_i = exp(-loss_i), the mean's

    dL/dzn_a_i = 1/(N tau) [ sum_k P_ik bank_k + (P_pos_i - 1) zn_b_i ],
    dL/dzn_b_i = 1/(N tau) (P_pos_i - 1) zn_a_i,

P_pos_i - 1 = expm1(-loss_i) without cancellation, then each through the normalisation's
backward (per row: 1/N replaced by that row's incoming gradient).
"""
from __future__ import annotations

import torch

from .nt_xent_autograd import _guard, refuse_double_backward
from .reference import outside_autocast


def register_bank_autograd(forward_op, backward_op, name: str) -> None:
    """Make `forward_op` differentiable in (z_a, z_b) through `backward_op`."""
    def setup_context(ctx, inputs, output):
        z_a, z_b, bank, inv_tau, _per_row, *options = inputs
        ctx.save_for_backward(z_a, z_b, bank, *output[1:])
        ctx.inv_tau, ctx.options = inv_tau, options

    @outside_autocast
    def backward_fn(ctx, grad, *_state_grads):
        z_a, z_b, bank, *state = ctx.saved_tensors
        with torch.no_grad():
            dz_a, dz_b = backward_op(z_a, z_b, bank, grad, ctx.inv_tau, *state, *ctx.options)
        return ((_guard(dz_a, name, z_a, z_b), _guard(dz_b, name, z_a, z_b), None, None, None)
                + (None,) * len(ctx.options))

    forward_op.register_autograd(backward_fn, setup_context=setup_context)
    refuse_double_backward(backward_op, name)


def nt_xent_bank(forward_op, z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor,
                 temperature: float, per_row: bool, *options) -> torch.Tensor:
    """The loss (the N row losses if per_row) through a backend's registered forward op; the
    bank is detached (no gradient flows to it)."""
    return forward_op(z_a.contiguous(), z_b.contiguous(), bank.detach().contiguous(),
                      1.0 / temperature, per_row, *options)[0]


def bank_operands(bank: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor,
                                                                     bool]:
    """(hi, lo, split): the bank for kernels whose scaled rows Zs have `dtype`, contiguous. A
    bank wider than fp16 (lightly's and the module's are fp32) with fp16 Zs (fp16/bf16 inputs)
    is split into hi = fp16(bank) and lo = fp16(bank - hi), equal to the bank to ~2^-22
    relative: the score tiles take both products (rounding unit rows to fp16 alone gave 1.6e-4
    relative loss errors at tau = 0.05, where the fp32 path has 1e-7); the backward's weighted
    sum uses hi (its weights are rounded to fp16 anyway). Without a split lo is hi. Shared by
    the triton and cuda backends."""
    hi = bank.to(dtype).contiguous()
    split = dtype == torch.float16 and bank.dtype in (torch.float32, torch.float64)
    return hi, ((bank - hi.to(bank.dtype)).to(dtype).contiguous() if split else hi), split


def row_gradients(grad: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The N incoming row gradients w (contiguous, `dtype`) the fused backwards weight each row
    with: the mean's 0-d gradient over N, or the per-row gradients as given."""
    w = grad.to(dtype)
    return (w.expand(n) / n if w.dim() == 0 else w).contiguous()


def fake_forward(z_a: torch.Tensor, per_row: bool, *state_like: torch.Tensor):
    """The fake result of a forward op: the loss (N,) or 0-d in the accumulation dtype, then
    tensors shaped like `state_like`."""
    from .reference import accumulation_dtype
    acc = accumulation_dtype(z_a.dtype)
    loss = z_a.new_empty((z_a.shape[0],) if per_row else (), dtype=acc)
    return (loss, *(torch.empty_like(t) for t in state_like))
