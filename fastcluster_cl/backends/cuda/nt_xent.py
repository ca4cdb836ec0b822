"""NT-Xent on the CUDA twin (csrc/nt_xent.cu): the fast path and the row primitives of the
distributed path, as torch.library ops with fakes."""

from __future__ import annotations

import torch

from ..autograd import nt_xent as nt_xent_autograd
from ..autograd.nt_xent import fake_grad_rows, fake_row_values, register_fast_path
from . import build


def _row_values(
    lse_neg: torch.Tensor, dist: torch.Tensor, inv_tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, loss) per row from the log-sum-exp over the negatives and dist = 1 - tau S_pos:
    loss = log(1 + exp(lse_neg - S_pos)) never subtracts two large numbers of similar size."""
    s_pos = (1.0 - dist) * inv_tau
    loss = torch.nn.functional.softplus(lse_neg - s_pos)
    return s_pos + loss, loss


# The NT-Xent fast path as torch.library ops with fake implementations; their autograd is
# `fastcluster_cl.backends.autograd.nt_xent` (the state: zs, rs, norms, lse and row losses).


@torch.library.custom_op("fastcluster_cl::nt_xent_cuda_fwd", mutates_args=())
def _fused_forward(
    z_a: torch.Tensor, z_b: torch.Tensor, inv_tau: float, per_row: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the 2N row losses, or their mean; zs, rs, norms, lse, row losses) of Z = [z_a; z_b]:
    row scaling (reading the two views) and the row lse."""
    nt_xent_autograd.check_views(z_a, z_b)
    ext = build.extension()
    zs, rs, norm, dist = ext.normalize(z_a.contiguous(), z_b.contiguous())
    rows = zs.shape[0]
    lse, row_loss = _row_values(ext.lse_rows(zs, rs, 0, rows, inv_tau), dist.repeat(2), inv_tau)
    return (row_loss.clone() if per_row else row_loss.mean()), zs, rs, norm, lse, row_loss


@_fused_forward.register_fake
def _(z_a, z_b, inv_tau, per_row):
    nt_xent_autograd.check_views(z_a, z_b)
    z, rows, f32 = z_a, 2 * z_a.shape[0], torch.float32
    vector = z.new_empty(rows, dtype=f32)
    zs = z.new_empty(rows, z.shape[1], dtype=f32 if z.dtype == f32 else torch.float16)
    return (
        z.new_empty((rows,) if per_row else (), dtype=f32),
        zs,
        vector,
        torch.empty_like(vector),
        torch.empty_like(vector),
        torch.empty_like(vector),
    )


@torch.library.custom_op("fastcluster_cl::nt_xent_cuda_bwd", mutates_args=())
def _fused_backward(
    z: torch.Tensor,
    grad: torch.Tensor,
    inv_tau: float,
    zs: torch.Tensor,
    rs: torch.Tensor,
    norm: torch.Tensor,
    lse: torch.Tensor,
    row_loss: torch.Tensor,
) -> torch.Tensor:
    """dL/dz (z's dtype) from the gradient of the mean loss (0-d) or of each row's loss (2N,):
    gradient rows (per row: weighted by c = grad / max|grad|), then the normalisation's
    backward scaled by grad / (2N tau) (per row: max|grad| / tau)."""
    ext = build.extension()
    rows = zs.shape[0]
    if grad.dim() != 0:
        scale, weight = nt_xent_autograd.per_row_weights(grad, torch.float32)
        g = ext.grad_rows(zs, rs, lse, row_loss, 0, rows, inv_tau, weight=weight)
        return ext.norm_backward(
            zs, rs, norm, g, 0, rows, scale.reshape(1).contiguous(), inv_tau, z.dtype
        )
    g = ext.grad_rows(zs, rs, lse, row_loss, 0, rows, inv_tau)
    return ext.norm_backward(
        zs, rs, norm, g, 0, rows, grad.float().reshape(1).contiguous(), inv_tau / rows, z.dtype
    )


@_fused_backward.register_fake
def _(z, grad, inv_tau, zs, rs, norm, lse, row_loss):
    return torch.empty_like(z)


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (see `fastcluster_cl.nt_xent`) with the CUDA C++ kernels; returns float32."""
    build.check_inputs(("z_a", "z_b"), (z_a, z_b))
    return nt_xent_autograd.nt_xent(z_a, z_b, float(temperature), "cuda")


def nt_xent_terms(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The 2N per-row terms with the CUDA C++ kernels (per-row gradients: the backward kernel
    weights each row's loss by its incoming gradient)."""
    build.check_inputs(("z_a", "z_b"), (z_a, z_b))
    return nt_xent_autograd.nt_xent_terms(z_a, z_b, float(temperature), "cuda")


def _normalized(z: torch.Tensor):
    """(zs, rs, norm, dist) of the full raw Z = [z_a; z_b] through the extension."""
    build.require_device(z.device)
    build.check_inputs(("z",), (z,))
    half = z.shape[0] // 2
    return build.extension().normalize(z[:half].contiguous(), z[half:].contiguous())


@torch.library.custom_op("fastcluster_cl::nt_xent_cuda_lse_rows", mutates_args=())
def lse_rows(
    z: torch.Tensor, row_start: int, row_end: int, inv_tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-range primitive of `fastcluster_cl.backends.gathered` (gather_distributed): (lse, loss)
    of rows [row_start, row_end) of the full raw Z against all its rows (float32)."""
    zs, rs, _, dist = _normalized(z)
    rows = torch.arange(row_start, row_end, device=z.device) % dist.shape[0]
    return _row_values(
        build.extension().lse_rows(zs, rs, row_start, row_end, inv_tau), dist[rows], inv_tau
    )


@lse_rows.register_fake
def _(z, row_start, row_end, inv_tau):
    return fake_row_values(z, row_start, row_end, torch.float32)


@torch.library.custom_op("fastcluster_cl::nt_xent_cuda_grad_rows", mutates_args=())
def grad_rows(
    z: torch.Tensor,
    lse: torch.Tensor,
    row_loss: torch.Tensor,
    row_start: int,
    row_end: int,
    inv_tau: float,
) -> torch.Tensor:
    """Row-range primitive of `fastcluster_cl.backends.gathered`: sum_j (P_ij + P_ji) zn_j -
    2 zn_pos(i) for rows [row_start, row_end), `lse` and `row_loss` the (2N,) vectors of all
    rows (float32; consistent, as `lse_rows` gives them: the largest row loss bounds the fp16
    tile weights)."""
    zs, rs = _normalized(z)[:2]
    return build.extension().grad_rows(
        zs, rs, lse.float().contiguous(), row_loss.float().contiguous(), row_start, row_end, inv_tau
    )


@grad_rows.register_fake
def _(z, lse, row_loss, row_start, row_end, inv_tau):
    return fake_grad_rows(z, row_start, row_end, torch.float32)


@torch.library.custom_op("fastcluster_cl::nt_xent_cuda_dz_rows", mutates_args=())
def dz_rows(
    z: torch.Tensor,
    lse: torch.Tensor,
    row_loss: torch.Tensor,
    row_start: int,
    row_end: int,
    inv_tau: float,
    grad_out: torch.Tensor,
) -> torch.Tensor:
    """Row-range primitive: dL/dz of rows [row_start, row_end) for L = grad_out (0-d) times the
    mean of all 2N row losses, in z's dtype (`grad_rows`, then the normalisation's backward
    kernel)."""
    zs, rs, norm, _ = _normalized(z)
    ext = build.extension()
    g = ext.grad_rows(
        zs, rs, lse.float().contiguous(), row_loss.float().contiguous(), row_start, row_end, inv_tau
    )
    return ext.norm_backward(
        zs,
        rs,
        norm[row_start:row_end].contiguous(),
        g,
        row_start,
        row_end,
        grad_out.float().reshape(1).contiguous(),
        inv_tau / zs.shape[0],
        z.dtype,
    )


@dz_rows.register_fake
def _(z, lse, row_loss, row_start, row_end, inv_tau, grad_out):
    return fake_grad_rows(z, row_start, row_end, z.dtype)


NT_XENT = register_fast_path(
    "cuda",
    lse_rows,
    grad_rows,
    _fused_forward,
    _fused_backward,
    dz_rows=dz_rows,
    reads_rows=lambda state, options: False,  # the backward reads the saved zs
)
