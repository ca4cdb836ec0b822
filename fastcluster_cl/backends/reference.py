"""Plain PyTorch reference of every loss (backend "torch").

Readable, materialises the full similarity matrices, and is the ground truth every other backend
is tested against. Inputs are cast to the accumulation dtype (float64 stays float64, everything
else computes in float32), so the returned loss is float32 or float64.
"""

from __future__ import annotations

import math

import torch

from .numerics import NORM_EPS, accumulation_dtype, l2_normalize, safe_log


def nt_xent_terms(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent's 2N per-row terms over Z = [z_a; z_b]: logsumexp_{k != i} S_ik - S_{i,pos(i)}.

    S = Z Z^T / tau after row L2 normalisation; pos(i) = i + N for i < N, else i - N.
    """
    n = z_a.shape[0]
    z = l2_normalize(torch.cat([z_a, z_b]))[0]
    s = z @ z.T / temperature  # (2N, 2N)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    lse = torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=1)
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return lse - s[torch.arange(2 * n, device=z.device), pos]


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: the mean of `nt_xent_terms` over the 2N rows."""
    return nt_xent_terms(z_a, z_b, temperature).mean()


def positive_gap(
    zn_a: torch.Tensor, norm_a: torch.Tensor, zn_b: torch.Tensor, norm_b: torch.Tensor
) -> torch.Tensor:
    """1 - zn_a_i . zn_b_i per row, as ||zn_a_i - zn_b_i||^2 / 2 where both rows are unit (not
    clamped by eps): no cancellation for correlated views, whose cosine is close to 1."""
    unit = (norm_a > NORM_EPS) & (norm_b > NORM_EPS)
    gap = 0.5 * (zn_a - zn_b).pow(2).sum(1, keepdim=True)
    return torch.where(unit, gap, 1.0 - (zn_a * zn_b).sum(1, keepdim=True)).squeeze(1)


def nt_xent_bank_terms(
    z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor, temperature: float
) -> torch.Tensor:
    """NT-Xent against a memory bank (lightly's NTXentLoss with memory_bank_size, MoCo-style),
    the N per-row terms: row i of z_a contrasts its positive zn_b_i against the M bank rows,

        term_i = logsumexp([S_pos_i, S_i1, ..., S_iM]) - S_pos_i,
        S_pos_i = zn_a_i . zn_b_i / tau,   S_ik = zn_a_i . bank_k / tau,

    zn the L2-normalised rows; the bank is used as given (rows of norm <= 1: the module keeps
    unit rows) and gets no gradient. Only the rows of z_a are anchors (lightly's convention)."""
    zn_a, zn_b = l2_normalize(z_a)[0], l2_normalize(z_b)[0]
    bank = bank.detach().to(zn_a.dtype)
    positive = (zn_a * zn_b).sum(1, keepdim=True)
    logits = torch.cat([positive, zn_a @ bank.T], 1) / temperature
    return torch.logsumexp(logits, 1) - logits[:, 0]


def nt_xent_bank(
    z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The mean of `nt_xent_bank_terms` over the N rows of z_a."""
    return nt_xent_bank_terms(z_a, z_b, bank, temperature).mean()


def marginal_entropy_shares(q: torch.Tensor) -> torch.Tensor:
    """Column k's share P_k log P_k + (log K) / K of CC's anti-collapse term (K values summing
    to `marginal_entropy_term`), P_k the column mean of q.

    `safe_log` rather than xlogy: a column that underflows to P_k = 0 has the derivative
    log P_k + 1 = -inf, and -inf times softmax's zero Jacobian is a NaN gradient."""
    p = q.sum(0) / q.shape[0]
    return p * safe_log(p) + math.log(q.shape[1]) / q.shape[1]


def marginal_entropy_term(q: torch.Tensor) -> torch.Tensor:
    """log K + sum_k P_k log P_k with P_k the column mean of q (CC's anti-collapse term, >= 0)."""
    return marginal_entropy_shares(q).sum()


def cluster_contrast(
    q_a: torch.Tensor, q_b: torch.Tensor, temperature: float, instance_loss=nt_xent
) -> torch.Tensor:
    """CC's cluster loss from the assignment probabilities q (N x K) of each view: NT-Xent over
    the 2K cluster rows [q_a^T; q_b^T] plus `marginal_entropy_term` of each view."""
    return (
        instance_loss(q_a.T, q_b.T, temperature)
        + marginal_entropy_term(q_a)
        + marginal_entropy_term(q_b)
    )


def cluster_contrast_terms(
    q_a: torch.Tensor, q_b: torch.Tensor, temperature: float, instance_terms=nt_xent_terms
) -> torch.Tensor:
    """`cluster_contrast` per cluster row (2K values whose mean is the loss): row j's NT-Xent
    term plus 2K times its column's `marginal_entropy_shares`."""
    shares = torch.cat([marginal_entropy_shares(q_a), marginal_entropy_shares(q_b)])
    return instance_terms(q_a.T, q_b.T, temperature) + shares.shape[0] * shares


def _softmax_pair(logits_a: torch.Tensor, logits_b: torch.Tensor):
    acc = accumulation_dtype(logits_a.dtype)
    return torch.softmax(logits_a.to(acc), dim=1), torch.softmax(logits_b.to(acc), dim=1)


def cc_cluster_loss(
    logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float, instance_loss=nt_xent
) -> torch.Tensor:
    """Contrastive Clustering's cluster-level loss.

    q = softmax over K; NT-Xent over the 2K L2-normalised columns of [q_a, q_b] (mean over 2K),
    plus `marginal_entropy_term` of each view. `instance_loss` is the NT-Xent implementation
    used on the columns (other backends pass their own).
    """
    q_a, q_b = _softmax_pair(logits_a, logits_b)
    return cluster_contrast(q_a, q_b, temperature, instance_loss)


def cc_cluster_loss_terms(
    logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float, instance_terms=nt_xent_terms
) -> torch.Tensor:
    """`cc_cluster_loss` per column of [q_a, q_b] (see `cluster_contrast_terms`)."""
    q_a, q_b = _softmax_pair(logits_a, logits_b)
    return cluster_contrast_terms(q_a, q_b, temperature, instance_terms)


def student_t(h: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    """q_ik proportional to (1 + ||h_i - mu_k||^2 / alpha)^(-(alpha+1)/2), rows summing to 1.

    Computed as a softmax of the log-kernel so that far points do not underflow to 0/0.
    """
    acc = accumulation_dtype(h.dtype)
    diff = h.to(acc)[:, None, :] - centers.to(acc)[None, :, :]  # (N, K, F)
    dist2 = diff.pow(2).sum(-1)
    return torch.softmax(-(alpha + 1) / 2 * torch.log1p(dist2 / alpha), dim=1)


def dec_target(q: torch.Tensor, column_sums: torch.Tensor | None = None) -> torch.Tensor:
    """DEC's sharpened target p_ik = (q_ik^2 / f_k) / sum_j (q_ij^2 / f_j), f_k = sum_i q_ik.

    Computed with no gradient; f is the batch's column sums unless `column_sums` gives them
    (the all-reduced sums of every rank's batch under gather_distributed). f is clamped at the
    smallest normal so that a cluster with no mass in the batch gets p = 0, not 0/0."""
    q = q.detach()
    f = q.sum(0) if column_sums is None else column_sums.detach()
    weight = q.pow(2) / f.clamp_min(torch.finfo(f.dtype).tiny)
    return weight / weight.sum(1, keepdim=True)


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p_i || q_i) = sum_k p_ik (log p_ik - log q_ik), with 0 log 0 = 0."""
    return (torch.special.xlogy(p, p) - p * safe_log(q)).sum(1)


def dec_loss_terms(q: torch.Tensor) -> torch.Tensor:
    """DEC's per-row terms KL(p_i || q_i) with p = dec_target(q) held fixed."""
    q = q.to(accumulation_dtype(q.dtype))
    return kl_rows(dec_target(q), q)


def dec_loss(q: torch.Tensor) -> torch.Tensor:
    """DEC clustering loss: the mean of `dec_loss_terms` over the N rows."""
    return dec_loss_terms(q).mean()


def anchor_loss_terms(q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """Per-row anchor terms KL(q0_i || qa_i) + KL(q0_i || qb_i); q0 (clean view) detached."""
    acc = accumulation_dtype(q0.dtype)
    q0 = q0.detach().to(acc)
    return kl_rows(q0, q_a.to(acc)) + kl_rows(q0, q_b.to(acc))


def anchor_loss(q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """Anchor loss: the mean of `anchor_loss_terms` over the N rows."""
    return anchor_loss_terms(q0, q_a, q_b).mean()


def with_total(parts: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """[weights . parts, *parts]: a whole objective's output from its parts."""
    return torch.cat([(parts.new_tensor(weights) * parts).sum().reshape(1), parts])


def anchor_objective(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    h0: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    centers: torch.Tensor,
    temperature: float,
    alpha: float,
    weights: tuple[float, float, float],
) -> torch.Tensor:
    """The anchor method's whole objective (arXiv 2109.12714) from the center head's inputs:
    (4,) = [total, instance, cluster, anchor] with q = student_t(h, centers, alpha) per view,
    instance = nt_xent(z_a, z_b), cluster = dec_loss(q0), anchor = anchor_loss(q0, q_a, q_b)
    and total = weights . (instance, cluster, anchor). In float64 for float64 z, else float32."""
    q0, q_a, q_b = (student_t(h, centers, alpha) for h in (h0, h_a, h_b))
    acc = accumulation_dtype(z_a.dtype)
    parts = torch.stack(
        [
            nt_xent(z_a, z_b, temperature).to(acc),
            dec_loss(q0).to(acc),
            anchor_loss(q0, q_a, q_b).to(acc),
        ]
    )
    return with_total(parts, weights)


def cc_objective(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    instance_temperature: float,
    cluster_temperature: float,
    weights: tuple[float, float],
) -> torch.Tensor:
    """Contrastive Clustering's whole objective: (3,) = [total, instance, cluster] with
    instance = nt_xent(z_a, z_b, instance_temperature), cluster = cc_cluster_loss(logits_a,
    logits_b, cluster_temperature), total = weights . (instance, cluster)."""
    acc = accumulation_dtype(z_a.dtype)
    parts = torch.stack(
        [
            nt_xent(z_a, z_b, instance_temperature).to(acc),
            cc_cluster_loss(logits_a, logits_b, cluster_temperature).to(acc),
        ]
    )
    return with_total(parts, weights)
