"""Losses over the global batch of all ranks (`gather_distributed=True`).

Convention (lightly's, the one that makes DDP exact): each rank returns a value such that the
mean over ranks equals the single-process loss on the concatenated batch, and its gradient for
its local inputs is world_size times the single-process gradient for those rows. DDP averages
parameter gradients over ranks, which then gives exactly the single-process gradient.

- NT-Xent (backends chunked / triton / cuda): a rank all-gathers Z in its input dtype (not
  differentiably), computes the masked lse and the loss of its own rows against all of Z with
  the backend's `lse_rows`, all-gathers those per-row values and returns the mean loss over its
  rows. The backward is analytic (docs/design.md): the backend's `grad_rows` over the local rows
  needs only the gathered Z and per-row values, so no B x D gradient is ever reduced across
  ranks. Forward and backward are `nt_xent_autograd.NTXent`, the single-process path's.
- NT-Xent (backend torch): the independent cross-check, lightly's formulation: a differentiable
  all-gather (its backward sums every rank's gradient for the gathered rows) and the plain
  reference on the local rows.
- Cluster losses: the column statistics (CC assignment Gram and column sums, DEC f_k; TCC's
  cluster sums in `tcc_loss`) are all-reduced; the loss from global statistics is identical on
  every rank and the all-reduce's backward gives each rank world_size times its share of the
  gradient.
"""

from __future__ import annotations

import math

import torch

from .. import distributed as D
from .autograd import nt_xent as nt_xent_autograd
from .autograd.nt_xent import NTXentBackend, RowGrad, RowLSE, local_row_ranges
from .dispatch import implementation, resolve
from .numerics import NORM_EPS, accumulation_dtype, l2_normalize
from .reference import dec_target, kl_rows


def nt_xent_rows(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, lse_rows: RowLSE, grad_rows: RowGrad
) -> torch.Tensor:
    """Gathered NT-Xent with explicit row-range primitives (the backends' `lse_rows` and
    `grad_rows`, possibly with a block size bound), through `nt_xent_autograd.NTXent`."""
    return _gathered(z_a, z_b, temperature, NTXentBackend("rows", lse_rows, grad_rows))


def _gathered(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, spec: NTXentBackend
) -> torch.Tensor:
    D.check_equal_rows("z_a", z_a.shape[0], z_a.device)
    return nt_xent_autograd.nt_xent(z_a, z_b, temperature, spec, gather=True)


def _nt_xent_autograd(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Backend torch: differentiable all-gather, then the reference formula on the local rows."""
    D.check_equal_rows("z_a", z_a.shape[0], z_a.device)
    acc = accumulation_dtype(z_a.dtype)
    n, total = z_a.shape[0], z_a.shape[0] * D.world_size()
    z = torch.cat([D.gather_rows_with_grad(z_a.to(acc)), D.gather_rows_with_grad(z_b.to(acc))])
    z = l2_normalize(z)[0]
    rows = torch.cat(
        [torch.arange(start, end) for start, end in local_row_ranges(n, D.rank(), D.world_size())]
    ).to(z.device)
    s = z[rows] @ z.T / temperature  # (2n, 2N_global)
    local = torch.arange(2 * n, device=z.device)
    positive = s[local, (rows + total) % (2 * total)]
    lse = torch.logsumexp(s.index_put((local, rows), s.new_tensor(float("-inf"))), dim=1)
    return (lse - positive).mean()


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    """NT-Xent over the batch of all ranks (see the module docstring for the convention)."""
    backend = resolve(backend, z_a.device)
    if backend == "torch":
        return _nt_xent_autograd(z_a, z_b, temperature)
    return _gathered(z_a, z_b, temperature, implementation("NT_XENT", backend, z_a.device))


def global_sums(local: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All-reduce local sums together with the local row count in one collective:
    (global sums shaped like `local`, global row count as a 0-d tensor)."""
    flat = torch.cat([local.reshape(-1), local.new_tensor([rows])])
    total = D.all_reduce_sum(flat)
    return total[:-1].view_as(local), total[-1].detach()


def _entropy_term(column_sums: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """log K + sum_k P_k log P_k, P_k = column sum / rows (`reference.marginal_entropy_term`)."""
    p = column_sums / rows
    # p log max(p, tiny) (`numerics.safe_log`), not xlogy: xlogy's derivative at P_k = 0 is
    # -inf, a NaN gradient through the softmax of a column that underflows.
    return (
        math.log(column_sums.shape[0])
        + (p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum()
    )


def _nt_xent_from_gram(gram: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over 2M rows given only their Gram matrix G (2M x 2M): cos_ij =
    G_ij / (||x_i|| ||x_j||), pos(i) = i +- M, mean over the 2M rows."""
    norm = gram.diagonal().clamp_min(NORM_EPS**2).sqrt()  # clamped first: finite gradient at 0
    s = gram / (norm[:, None] * norm[None, :]) / temperature
    m = s.shape[0] // 2
    eye = torch.eye(2 * m, dtype=torch.bool, device=s.device)
    lse = torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=1)
    return (lse - s.diagonal(m).repeat(2)).mean()


def cc_cluster_loss(
    logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float
) -> torch.Tensor:
    """CC's cluster-level loss over all ranks: the column contrast from the all-reduced
    2K x 2K assignment Gram, the entropy from the all-reduced column sums (any backend: the
    statistics are K-sized, the N-sized work is one local GEMM)."""
    acc = accumulation_dtype(logits_a.dtype)
    q = torch.cat(
        [torch.softmax(logits_a.to(acc), dim=1), torch.softmax(logits_b.to(acc), dim=1)], dim=1
    )  # (n, 2K)
    stats, rows = global_sums(torch.cat([q.T @ q, q.sum(0)[None]]), q.shape[0])
    gram, column_sums = stats[:-1], stats[-1]
    k = logits_a.shape[1]
    return (
        _nt_xent_from_gram(gram, temperature)
        + _entropy_term(column_sums[:k], rows)
        + _entropy_term(column_sums[k:], rows)
    )


def dec_loss(q: torch.Tensor) -> torch.Tensor:
    """DEC loss over all ranks: the target uses the all-reduced f_k; the local KL sum is scaled
    by world_size / N_global so that ranks may hold different row counts."""
    q = q.to(accumulation_dtype(q.dtype))
    f, rows = global_sums(q.detach().sum(0), q.shape[0])
    return kl_rows(dec_target(q, f), q).sum() * (D.world_size() / rows)
