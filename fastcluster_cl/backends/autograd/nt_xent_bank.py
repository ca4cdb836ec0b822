"""NT-Xent against a memory bank: the autograd shared by the fused backends.

Each fast backend (chunked, triton, cuda) registers two torch.library custom ops (triton and
cuda, whose state is the same, through `define_scaled_row_ops`):

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

from ..numerics import accumulation_dtype
from .pairs import register_pair


def register_bank_autograd(forward_op, backward_op, name: str) -> None:
    """Make `forward_op` differentiable in (z_a, z_b) through `backward_op`."""
    register_pair(
        forward_op,
        backward_op,
        name,
        # (z_a, z_b, bank, inv_tau, per_row, *options) -> (loss, *state); backward (z_a, z_b,
        # bank, grad, inv_tau, *state, *options) -> (dz_a, dz_b)
        lambda inputs, outputs, grads: (
            *inputs[:3],
            grads[0],
            inputs[3],
            *outputs[1:],
            *inputs[5:],
        ),
        wrt=(0, 1),
        save_result=False,
    )


def nt_xent_bank(
    forward_op,
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    bank: torch.Tensor,
    temperature: float,
    per_row: bool,
    *options,
) -> torch.Tensor:
    """The loss (the N row losses if per_row) through a backend's registered forward op; the
    bank is detached (no gradient flows to it)."""
    return forward_op(
        z_a.contiguous(),
        z_b.contiguous(),
        bank.detach().contiguous(),
        1.0 / temperature,
        per_row,
        *options,
    )[0]


def define_scaled_row_ops(backend: str, prologue, forward, backward, scaled_dtype):
    """The op pair nt_xent_bank_<backend>_fwd / _bwd of a fused backend whose state is its
    prologue's scaled rows (triton, cuda), registered with the autograd above. Returns them.

    prologue(z_a, z_b) -> (zs, rs, norms, dist) with zs = [z_a; z_b] row-scaled (dtype
    `scaled_dtype(z_a.dtype)`), rs, norms (2N) and dist (N) in the accumulation dtype;
    forward(zs, rs, dist, bank, inv_tau) -> (row_loss, row_w); backward(zs, rs, norms, dist,
    bank, row_w, row_loss, w, inv_tau, out_dtype) -> (dz_a, dz_b), w the N incoming row
    gradients (`row_gradients`)."""

    @torch.library.custom_op(f"fastcluster_cl::nt_xent_bank_{backend}_fwd", mutates_args=())
    def forward_op(
        z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor, inv_tau: float, per_row: bool
    ) -> tuple[
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
        torch.Tensor,
    ]:
        """(the N row losses, or their mean; Zs, rs, norms, dist, row weights, row losses)."""
        zs, rs, norms, dist = prologue(z_a, z_b)
        row_loss, row_w = forward(zs, rs, dist, bank, inv_tau)
        return (
            (row_loss.clone() if per_row else row_loss.mean()),
            zs,
            rs,
            norms,
            dist,
            row_w,
            row_loss,
        )

    @forward_op.register_fake
    def _(z_a, z_b, bank, inv_tau, per_row):

        n, acc = z_a.shape[0], accumulation_dtype(z_a.dtype)
        zs = z_a.new_empty(2 * n, z_a.shape[1], dtype=scaled_dtype(z_a.dtype))
        vector, row = z_a.new_empty(2 * n, dtype=acc), z_a.new_empty(n, dtype=acc)
        return fake_forward(z_a, per_row, zs, vector, vector, row, row, row)

    @torch.library.custom_op(f"fastcluster_cl::nt_xent_bank_{backend}_bwd", mutates_args=())
    def backward_op(
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        bank: torch.Tensor,
        grad: torch.Tensor,
        inv_tau: float,
        zs: torch.Tensor,
        rs: torch.Tensor,
        norms: torch.Tensor,
        dist: torch.Tensor,
        row_w: torch.Tensor,
        row_loss: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dL/dz_a, dL/dz_b) in the inputs' dtype from the mean's gradient (0-d) or one per
        row."""
        w = row_gradients(grad, z_a.shape[0], rs.dtype)
        return backward(zs, rs, norms, dist, bank, row_w, row_loss, w, inv_tau, z_a.dtype)

    @backward_op.register_fake
    def _(z_a, z_b, bank, grad, inv_tau, zs, rs, norms, dist, row_w, row_loss):
        return torch.empty_like(z_a), torch.empty_like(z_b)

    register_bank_autograd(forward_op, backward_op, backend)
    return forward_op, backward_op


def bank_operands(
    bank: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, bool]:
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

    acc = accumulation_dtype(z_a.dtype)
    loss = z_a.new_empty((z_a.shape[0],) if per_row else (), dtype=acc)
    return (loss, *(torch.empty_like(t) for t in state_like))
