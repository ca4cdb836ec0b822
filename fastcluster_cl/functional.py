"""Functional losses: validate arguments, pick the backend, call it.

Every function accepts float16/bfloat16/float32/float64 inputs, accumulates in float32 (float64
for float64 inputs) and returns the loss in the inputs' dtype, or in float32 inside an autocast
region as torch's own losses (`student_t`'s probabilities stay in the accumulation dtype).
`backend` is one of "auto" (triton for CUDA tensors, else chunked), "torch" (plain reference
that materialises the similarity matrix), "chunked" (row blocks, never holds the 2N x 2N
matrix), "triton", "cuda"; all compute the same function to rounding.

`gather_distributed=True` (nt_xent, cc_cluster_loss, dec_loss, tcc_loss) computes the loss over
the batch of all ranks of an initialised torch.distributed process group, with lightly's
convention: the mean over ranks of the returned values is the single-process loss on the
concatenated batch, and each rank's gradient for its inputs is world_size times the
single-process one, so that DDP's gradient averaging is exact (`fastcluster_cl.backends.gathered`).
With one rank (or no process group) it is the plain loss; over several ranks only
reduction="mean" is supported. gather_distributed=True raises at once where torch.distributed
is unavailable.

`reduction` (every loss): "mean" (default), "sum", or "none" for the per-term values whose mean
is the loss: per row for nt_xent (2N: the rows of [z_a; z_b]), dec_loss and anchor_loss (N), per
cluster row for cc_cluster_loss (2K: view a's clusters, then view b's; row j
carries its NT-Xent term plus 2K times its column's share P_k log P_k + log(K)/K of the
anti-collapse term). "none" runs on the torch and chunked backends.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import distributed
from .backends import dispatch, gathered, reference
from .backends.dispatch import implementation
from .backends.numerics import accumulation_dtype, outside_autocast, safe_log
from .validation import (
    check_finite,
    check_finite_through,
    check_gather_distributed,
    check_matrix,
    check_nt_xent_temperature,
    check_positive,
    check_probabilities,
    check_reduction,
    check_same,
    check_unit_rows,
)

_under_autocast = False  # set while a loss called inside an autocast region runs


def loss_in_input_dtype(fn):
    """Return `fn`'s losses (a tensor, a tuple of them, or a LossOutput) in the dtype of its
    first tensor argument, as lightly's and torch's losses do; the backends accumulate in
    float32 (float64), and the cast only rounds the result (its gradient passes through).
    Inside an autocast region the losses stay float32, as torch's autocast keeps its losses
    (cross_entropy, log_softmax) and so lightly's: a GradScaler's 2^16 scale would overflow an
    fp16 loss's gradient, and a bf16 total would keep three digits."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _under_autocast
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if (
            not _under_autocast
            and first is not None
            and torch.amp.is_autocast_available(first.device.type)
            and torch.is_autocast_enabled(first.device.type)
        ):
            # the losses this one calls run with autocast off: tell them it was on
            _under_autocast = True
            try:
                return fn(*args, **kwargs)
            finally:
                _under_autocast = False
        out = fn(*args, **kwargs)
        dtype = first.dtype if first is not None and first.is_floating_point() else None
        if _under_autocast or dtype is None or dtype in (torch.float32, torch.float64):
            return out
        if isinstance(out, LossOutput):
            return LossOutput(out.total.to(dtype), {k: v.to(dtype) for k, v in out.parts.items()})
        if isinstance(out, tuple):
            return tuple(v.to(dtype) for v in out)
        return out.to(dtype)

    return wrapper


def _reduced(op: str, backend: str, device: torch.device, reduction: str, count: int, *args):
    """`op` under `reduction`: the backend's mean, times the number of terms `count` for "sum",
    or the backend's per-term op (`op`_terms) for "none"; "auto" as `dispatch.backend_for`
    chooses for these inputs."""
    name = f"{op}_terms" if reduction == "none" else op
    backend = dispatch.backend_for(
        name, backend, device, *(a for a in args if isinstance(a, torch.Tensor))
    )
    if reduction == "none":
        return implementation(name, backend, device)(*args)
    loss = implementation(op, backend, device)(*args)
    return loss if reduction == "mean" else loss * count


def _gathering(gather_distributed: bool, reduction: str) -> bool:
    """Validate the two options; True when the loss must run over several ranks."""
    check_reduction(reduction)
    if not (check_gather_distributed(gather_distributed) and distributed.world_size() > 1):
        return False
    if reduction != "mean":
        raise NotImplementedError(
            f"reduction={reduction!r} with gather_distributed over several "
            "ranks is not supported; use reduction='mean'"
        )
    return True


def _check_views(z_a: torch.Tensor, z_b: torch.Tensor, min_rows: int = 2) -> None:
    """Two (N, D) projections of one shape, dtype and device."""
    check_matrix("z_a", z_a, min_rows=min_rows)
    check_matrix("z_b", z_b, min_rows=min_rows)
    check_same(("z_a", "z_b"), (z_a, z_b))


@loss_in_input_dtype
@outside_autocast
def nt_xent(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float = 0.5,
    *,
    backend: str = "auto",
    gather_distributed: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy (SimCLR; CC's instance loss).

    Z = [z_a; z_b] (2N x D) is L2-normalised row-wise, S = Z Z^T / tau and pos(i) = i +- N:

        L = 1/(2N) sum_i [ logsumexp_{k != i} S_ik - S_{i,pos(i)} ]

    Equal to lightly's NTXentLoss and CC's InstanceLoss.

    Args:
        z_a, z_b: (N, D) projections of the two views. N = 1 (no negatives) gives 0, as
            lightly and pytorch-metric-learning do.
        temperature: tau, |tau| >= 1e-8 (0.5 in CC and arXiv 2109.12714; a negative tau, which
            lightly accepts, runs on the torch and chunked backends).
        gather_distributed: contrast against the rows of every rank (equal N on all ranks);
            see the module docstring.
    """
    _check_views(z_a, z_b, min_rows=1)
    temperature = _signed_temperature(temperature, backend, z_a.device)
    gather = _gathering(gather_distributed, reduction)
    if gather or z_a.shape[0] == 1:  # gathered: the loss holds every rank's z; N = 1: no z
        check_finite(("z_a", "z_b"), (z_a, z_b))
    if gather:
        backend = dispatch.backend_for("nt_xent", backend, z_a.device, z_a, z_b)
        return gathered.nt_xent(z_a, z_b, temperature, backend)
    if z_a.shape[0] == 1:
        return _no_negatives(z_a, z_b, reduction)
    loss = _reduced(
        "nt_xent", backend, z_a.device, reduction, 2 * z_a.shape[0], z_a, z_b, temperature
    )
    check_finite_through(loss, ("z_a", "z_b"), (z_a, z_b))
    return loss


def _signed_temperature(temperature: float, backend: str, device: torch.device) -> float:
    """NT-Xent's temperature (`check_nt_xent_temperature`); a negative one runs on the torch
    and chunked backends only (the fused kernels shift by the bound 1/tau > 0)."""
    temperature = check_nt_xent_temperature(temperature)
    if temperature < 0:
        resolved = dispatch.resolve(backend, device)
        if resolved not in ("torch", "chunked"):
            raise ValueError(
                f"a negative temperature ({temperature}) runs on backend='torch' or "
                f"'chunked', not {resolved!r}"
            )
    return temperature


def _no_negatives(z_a: torch.Tensor, z_b: torch.Tensor, reduction: str) -> torch.Tensor:
    """One pair and nothing to contrast it with: each row's cross-entropy is over its positive
    alone, log 1 = 0 (lightly's and pytorch-metric-learning's value, so a drop_last=False tail
    of one image does not stop training). Zero, with zero gradients, connected to the graph."""
    rows = (torch.cat([z_a, z_b]).to(accumulation_dtype(z_a.dtype)) * 0).sum(1)
    return rows if reduction == "none" else rows.sum()


@loss_in_input_dtype
@outside_autocast
def nt_xent_bank(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    bank: torch.Tensor,
    temperature: float = 0.5,
    *,
    backend: str = "auto",
    reduction: str = "mean",
) -> torch.Tensor:
    """NT-Xent against a memory bank of negatives (lightly's NTXentLoss with a memory bank;
    MoCo-style). zn = the L2-normalised rows; row i of z_a is the anchor, zn_b_i its positive
    and the M bank rows its negatives:

        L = 1/N sum_i [ logsumexp_k([S_pos_i, S_i1 .. S_iM]) - S_pos_i ],
        S_pos_i = zn_a_i . zn_b_i / tau,   S_ik = zn_a_i . bank_k / tau

    (cross-entropy over [sim_pos, sim_neg] / tau with label 0). The fused backends stream the
    bank in column blocks (no N x M matrix). `NTXentLoss(memory_bank_size=(M, D))` keeps and
    updates the bank; this op only reads it.

    Args:
        z_a, z_b: (N, D) projections of the two views, N >= 1.
        bank: (M, D) negatives, M >= 1, on z_a's device, any float dtype (cast to the
            accumulation dtype; fp16 in the kernels for fp16/bf16 inputs), used as given:
            rows must have norm <= 1 (unit rows, as the module stores them; checked with the
            value checks). It receives no gradient.
        reduction: "mean", "sum" or "none" (the N row terms; gradients on every backend).
    """
    _check_views(z_a, z_b, min_rows=1)
    check_matrix("bank", bank)
    if bank.device != z_a.device:
        raise ValueError(
            f"bank is on {bank.device} but z_a is on {z_a.device}; move them to one device"
        )
    if bank.shape[1] != z_a.shape[1]:
        raise ValueError(
            f"bank has {bank.shape[1]} features but z_a has {z_a.shape[1]}; "
            "memory_bank_size must be (size, the projection's dimension)"
        )
    temperature = _signed_temperature(temperature, backend, z_a.device)
    check_reduction(reduction)
    check_finite(("z_a", "z_b", "bank"), (z_a, z_b, bank))
    check_unit_rows("bank", bank)
    return _reduced(
        "nt_xent_bank", backend, z_a.device, reduction, z_a.shape[0], z_a, z_b, bank, temperature
    )


def _check_logit_pair(logits_a: torch.Tensor, logits_b: torch.Tensor) -> None:
    check_matrix("logits_a", logits_a, min_rows=2, min_cols=2)
    check_matrix("logits_b", logits_b, min_rows=2, min_cols=2)
    check_same(("logits_a", "logits_b"), (logits_a, logits_b))


@loss_in_input_dtype
@outside_autocast
def cc_cluster_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
    gather_distributed: bool = False,
    reduction: str = "mean",
    from_probs: bool = False,
) -> torch.Tensor:
    """Contrastive Clustering's cluster-level loss (Li et al., AAAI 2021).

    q = softmax(logits) over K clusters. The 2K columns of [q_a, q_b] (vectors of length N) are
    L2-normalised and contrasted with NT-Xent (mean over 2K); then, for each view, the
    anti-collapse term log K + sum_k P_k log P_k, P_k the column mean of q, is added.

    Args:
        logits_a, logits_b: (N, K) cluster logits of the two views, N >= 2, K >= 2.
        temperature: tau_c > 0 (1.0 in CC).
        gather_distributed: use the column statistics of every rank's batch (all-reduced
            2K x 2K assignment Gram and column sums; the backend is then not used).
        from_probs: the inputs are the probabilities q themselves (rows on the simplex, as CC's
            ClusterLoss takes them), not logits; the backend's NT-Xent contrasts their columns.
    """
    _check_logit_pair(logits_a, logits_b)
    temperature = check_positive("temperature", temperature)
    names, device, count = ("logits_a", "logits_b"), logits_a.device, 2 * logits_a.shape[1]
    if not from_probs:
        check_finite(names, (logits_a, logits_b))
        if _gathering(gather_distributed, reduction):
            return gathered.cc_cluster_loss(logits_a, logits_b, temperature)
        return _reduced(
            "cc_cluster_loss", backend, device, reduction, count, logits_a, logits_b, temperature
        )
    check_probabilities(names, (logits_a, logits_b))
    if _gathering(gather_distributed, reduction):
        raise NotImplementedError(
            "from_probs=True with gather_distributed over several ranks "
            "is not supported; pass logits (from_probs=False)"
        )
    acc = accumulation_dtype(logits_a.dtype)
    q_a, q_b = logits_a.to(acc), logits_b.to(acc)
    backend = dispatch.backend_for("nt_xent", backend, device, q_a.T, q_b.T)  # N features
    if reduction == "none":
        return reference.cluster_contrast_terms(
            q_a, q_b, temperature, implementation("nt_xent_terms", backend, device)
        )
    loss = reference.cluster_contrast(
        q_a, q_b, temperature, implementation("nt_xent", backend, device)
    )
    return loss if reduction == "mean" else loss * count


@outside_autocast
def student_t(
    h: torch.Tensor, centers: torch.Tensor, alpha: float = 1.0, *, backend: str = "auto"
) -> torch.Tensor:
    """Student-t soft assignment of DEC / arXiv 2109.12714's cluster center predictor.

        q_ik = (1 + ||h_i - mu_k||^2 / alpha)^(-(alpha+1)/2) / sum_j (same for j)

    Args:
        h: (N, F) features. centers: (K, F) centers, K >= 2, h's dtype or float32 under
            bfloat16 / float16 features (autocast's fp32 parameter; computed in float32 at
            its accuracy: on Triton, bf16 features take the products on the tensor cores
            exactly, whatever torch's TF32 setting). alpha: degrees of freedom > 0.
    Returns:
        (N, K) probabilities in the accumulation dtype (float32, or float64 for float64 input).
    """
    check_matrix("h", h)
    check_matrix("centers", centers, min_rows=2)
    amp = h.dtype in (torch.bfloat16, torch.float16) and centers.dtype == torch.float32
    check_same(("h", "centers"), (h, centers), shape=False, dtype=not amp)
    if h.shape[1] != centers.shape[1]:
        raise ValueError(f"h has {h.shape[1]} features but centers have {centers.shape[1]}")
    alpha = check_positive("alpha", alpha)
    check_finite(("h", "centers"), (h, centers))
    backend = dispatch.backend_for("student_t", backend, h.device, h, centers)
    return implementation("student_t", backend, h.device)(h, centers, alpha)


@loss_in_input_dtype
@outside_autocast
def dec_loss(
    q: torch.Tensor,
    *,
    backend: str = "auto",
    gather_distributed: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """DEC's clustering loss on a batch of soft assignments (arXiv 2109.12714, Xie et al. 2016).

    Target p_ik = (q_ik^2 / f_k) / sum_j (q_ij^2 / f_j) with f_k = sum_i q_ik, computed on the
    batch with no gradient; L = (1/N) sum_i KL(p_i || q_i).

    Args:
        q: (N, K) probabilities (rows sum to 1), K >= 2: the clean view's assignment.
        gather_distributed: f_k summed over every rank's batch (all-reduced).
    """
    check_matrix("q", q, min_cols=2)
    check_probabilities(("q",), (q,))
    if _gathering(gather_distributed, reduction):
        return gathered.dec_loss(q)
    return _reduced("dec_loss", backend, q.device, reduction, q.shape[0], q)


@loss_in_input_dtype
@outside_autocast
def anchor_loss(
    q0: torch.Tensor,
    q_a: torch.Tensor,
    q_b: torch.Tensor,
    *,
    backend: str = "auto",
    reduction: str = "mean",
) -> torch.Tensor:
    """Anchor loss of arXiv 2109.12714: the clean view anchors both augmented views.

        L = (1/N) sum_i [ KL(q0_i || qa_i) + KL(q0_i || qb_i) ],   q0 detached

    Args:
        q0, q_a, q_b: (N, K) probabilities of the clean and the two augmented views, K >= 2.
    """
    _check_anchor_inputs(q0, q_a, q_b)
    check_reduction(reduction)
    return _reduced("anchor_loss", backend, q0.device, reduction, q0.shape[0], q0, q_a, q_b)


def _check_anchor_inputs(q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> None:
    names = ("q0", "q_a", "q_b")
    for name, q in zip(names, (q0, q_a, q_b)):
        check_matrix(name, q, min_cols=2)
    check_same(names, (q0, q_a, q_b))
    check_probabilities(names, (q0, q_a, q_b))


@loss_in_input_dtype
@outside_autocast
def dec_anchor_losses(
    q0: torch.Tensor,
    q_a: torch.Tensor,
    q_b: torch.Tensor,
    *,
    backend: str = "auto",
    gather_distributed: bool = False,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dec_loss(q0), anchor_loss(q0, q_a, q_b)): the anchor method's clustering terms, in fused
    launches on backends that have them (triton: q0 read once for both), else the two ops.
    With gather_distributed over several ranks, DEC needs the global f_k, so the two ops run
    separately (the anchor loss is row-wise and needs no collective)."""
    _check_anchor_inputs(q0, q_a, q_b)
    device, rows = q0.device, q0.shape[0]
    backend = dispatch.backend_for("dec_anchor_losses", backend, device, q0)
    if _gathering(gather_distributed, reduction):
        return gathered.dec_loss(q0), implementation("anchor_loss", backend, device)(q0, q_a, q_b)
    fused = implementation("dec_anchor_losses", backend, device, required=False)
    if fused is not None and reduction != "none":
        dec, anchor = fused(q0, q_a, q_b)
        return (dec, anchor) if reduction == "mean" else (dec * rows, anchor * rows)
    return (
        _reduced("dec_loss", backend, device, reduction, rows, q0),
        _reduced("anchor_loss", backend, device, reduction, rows, q0, q_a, q_b),
    )


class LossOutput(NamedTuple):
    """A whole objective: the weighted total and each unweighted part, keyed by name."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


def weighted_total(
    parts: dict[str, torch.Tensor], weights: dict[str, float], reduction: str
) -> LossOutput:
    """LossOutput of `parts` with total = sum of weights[name] * part (each part's mean for
    reduction="none", so that the total is the "mean" total). A weight of 1 adds its part as
    it is: the default weights cost no multiplications (a launch each way on a GPU)."""
    terms = []
    for name, value in parts.items():
        value = value.mean() if reduction == "none" else value
        terms.append(value if weights[name] == 1.0 else weights[name] * value)
    return LossOutput(functools.reduce(torch.add, terms), parts)


def _part_weights(names: tuple[str, ...], weights: dict[str, float] | None) -> dict[str, float]:
    """Each part's weight: 1 unless `weights` names it; finite and >= 0."""
    weights = {name: 1.0 for name in names} | dict(weights or {})
    for name in names:
        if not 0 <= weights[name] < math.inf:
            raise ValueError(f"weights[{name!r}] must be finite and >= 0, got {weights[name]}")
    return weights


def _objective(
    op: str,
    names: tuple[str, ...],
    args: tuple,
    weights: dict[str, float] | None,
    separate_parts,
    device: torch.device,
    backend: str,
    gather: bool,
    reduction: str,
    fused: bool,
) -> LossOutput:
    """`op` on inputs `args` = (z_a, z_b, ...), the other inputs checked finite by the caller:
    the backend's one-pass `op` (a vector [total, *parts]) where it has one, `fused` asks for
    it, the call is a single-process mean, the backend's `op`_fits (if any) accepts the
    inputs (the kernels' size limits) and, for "auto", the backend does not run it slower than
    its separate ops (`dispatch.auto_takes_one_pass`); else `separate_parts()` (the parts from
    the separate ops, whose `nt_xent` checks z) weighted here. Both compute the same
    function."""
    weights = _part_weights(names, weights)
    one_pass = (
        implementation(op, backend, device, required=False)
        if fused
        and not gather
        and reduction == "mean"
        and dispatch.auto_takes_one_pass(
            op, backend, device, *(x for x in args if isinstance(x, torch.Tensor))
        )
        else None
    )
    fits = one_pass and implementation(f"{op}_fits", backend, device, required=False)
    if fits and not fits(*(x for x in args if isinstance(x, torch.Tensor))):
        one_pass = None
    if one_pass is None:
        return weighted_total(separate_parts(), weights, reduction)
    out = one_pass(*args, tuple(float(weights[name]) for name in names))
    result = LossOutput(out[0], {name: out[i + 1] for i, name in enumerate(names)})
    check_finite_through(result.parts["instance"], ("z_a", "z_b"), args[:2])
    return result


ANCHOR_PARTS = ("instance", "cluster", "anchor")
CC_PARTS = ("instance", "cluster")

# The anchor objective's separate ops take the three views' Student-t assignments in one call on
# their stacked rows while the copies that costs stay below this: the features' concatenation
# (kept for the backward: 3 N F more bytes resident until then) and, backward, the assignments'
# gradients gathered into one (3N, K) block. On a GPU it is one launch chain instead of three
# (up to 10 launches fewer). The cost model (H100, bf16, auto's path) puts the break-even at
# 200-250 MiB of copies: N = 4096, F = 2048, K = 1000 (190 MiB) 2487 -> 2433 us, N = 1024, F =
# 512, K = 100 274 -> 175; N = 32768, F = 512, K = 100 (267 MiB) 7488 -> 7507
# (benchmarks/static_notes.md section 19). Not on backend "torch": its reference builds an
# (N, K, F) difference tensor a call, which stacking would hold three at a time.
STACKED_ASSIGNMENT_BYTES = 192 * 2**20


def three_assignments(assign, h0, h_a, h_b, k: int, backend: str) -> tuple[torch.Tensor, ...]:
    """(assign(h0), assign(h_a), assign(h_b)) for a row-wise `assign` giving K columns on the
    resolved `backend`: one call on the stacked rows while the copies fit
    `STACKED_ASSIGNMENT_BYTES`, else one a view."""
    n, f = h0.shape
    copies = 6 * n * (f * h0.element_size() + k * accumulation_dtype(h0.dtype).itemsize)
    if backend != "torch" and copies <= STACKED_ASSIGNMENT_BYTES:
        return assign(torch.cat([h0, h_a, h_b])).split(n)
    return tuple(assign(h) for h in (h0, h_a, h_b))


@loss_in_input_dtype
@outside_autocast
def anchor_objective(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    h0: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    centers: torch.Tensor,
    *,
    instance_temperature: float = 0.5,
    alpha: float = 1.0,
    weights: dict[str, float] | None = None,
    backend: str = "auto",
    gather_distributed: bool = False,
    reduction: str = "mean",
    fused: bool = True,
) -> LossOutput:
    """The whole objective of arXiv 2109.12714 from the center head's inputs, in one pass each
    way on the triton and cuda backends:

        q0, q_a, q_b = student_t(h0 | h_a | h_b, centers, alpha)
        total = w_instance nt_xent(z_a, z_b) + w_cluster dec_loss(q0)
                + w_anchor anchor_loss(q0, q_a, q_b)

    The one-pass kernels compute the NT-Xent rows, the three Student-t assignments and DEC's
    column sums in one row-parallel launch plus a small epilogue, and the gradients of z, h and
    the centers in one row-parallel launch plus a small reduction; no (N, K) assignment is kept
    for the backward. Other backends, gather_distributed over several ranks, reduction !=
    "mean", inputs beyond the one-pass kernels' limits (e.g. triton: D, F <= 512,
    K <= 1024) and backend="auto" on a GPU (the Triton one-pass kernels are predicted slower
    there) run the separate ops (same values).

    Args:
        z_a, z_b: (N, D) projections of the two augmented views, N >= 2.
        h0, h_a, h_b: (N, F) backbone features of the clean and the two augmented views.
        centers: (K, F) cluster centers, K >= 2, any float dtype (float32 centers with bf16
            features under autocast); the assignment is computed in float32 (float64 for
            float64 features).
        instance_temperature: NT-Xent's tau > 0. alpha: Student-t degrees of freedom > 0.
        weights: {"instance", "cluster", "anchor"} -> weight >= 0 (missing: 1).
        fused: False runs the separate ops on every backend (benchmarks, debugging).
    Returns:
        LossOutput(total, {"instance", "cluster", "anchor"}): gradients flow to z, h and
        centers (none into q0 through the anchor term, whose target is detached, as DEC's).
    """
    _check_views(z_a, z_b)
    feats = ("h0", "h_a", "h_b")
    for name, h in zip(feats, (h0, h_a, h_b)):
        check_matrix(name, h, min_rows=2)
    check_same(feats, (h0, h_a, h_b))
    check_matrix("centers", centers, min_rows=2)
    if (
        h0.shape[0] != z_a.shape[0]
        or centers.shape[1] != h0.shape[1]
        or not h0.device == centers.device == z_a.device
    ):
        raise ValueError(
            f"anchor_objective needs z (N, D), h (N, F) and centers (K, F) on one "
            f"device; got z {tuple(z_a.shape)} on {z_a.device}, h "
            f"{tuple(h0.shape)} on {h0.device}, centers {tuple(centers.shape)} on "
            f"{centers.device}"
        )
    instance_temperature = check_positive("instance_temperature", instance_temperature)
    alpha = check_positive("alpha", alpha)
    check_finite((*feats, "centers"), (h0, h_a, h_b, centers))
    gather = _gathering(gather_distributed, reduction)

    def separate_parts():
        centers_acc = centers.to(accumulation_dtype(h0.dtype))  # bf16 h stays: fp32 centers
        resolved = dispatch.resolve(
            dispatch.backend_for("student_t", backend, h0.device, h0, centers_acc), h0.device
        )
        q0, q_a, q_b = three_assignments(
            lambda h: student_t(h, centers_acc, alpha, backend=backend),
            h0,
            h_a,
            h_b,
            centers.shape[0],
            resolved,
        )
        common = dict(backend=backend, gather_distributed=gather_distributed, reduction=reduction)
        cluster, anchor = dec_anchor_losses(q0, q_a, q_b, **common)
        return {
            "instance": nt_xent(z_a, z_b, instance_temperature, **common),
            "cluster": cluster,
            "anchor": anchor,
        }

    return _objective(
        "anchor_objective",
        ANCHOR_PARTS,
        (z_a, z_b, h0, h_a, h_b, centers, instance_temperature, alpha),
        weights,
        separate_parts,
        z_a.device,
        backend,
        gather,
        reduction,
        fused,
    )


@loss_in_input_dtype
@outside_autocast
def cc_objective(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    *,
    instance_temperature: float = 0.5,
    cluster_temperature: float = 1.0,
    weights: dict[str, float] | None = None,
    backend: str = "auto",
    gather_distributed: bool = False,
    reduction: str = "mean",
    fused: bool = True,
) -> LossOutput:
    """Contrastive Clustering's whole objective, in one pass each way on the triton and cuda
    backends:

        total = w_instance nt_xent(z_a, z_b, instance_temperature)
                + w_cluster cc_cluster_loss(logits_a, logits_b, cluster_temperature)

    The one-pass kernels compute the NT-Xent rows, both views' softmax rows, their column sums
    and the 2K x 2K assignment Gram in one row-parallel launch plus a K-sized epilogue, and
    dz / dlogits in one row-parallel launch after a K-sized one. Other backends,
    gather_distributed over several ranks, reduction != "mean", inputs beyond the one-pass
    kernels' limits (triton: D <= 512, K <= 64) and backend="auto" on a GPU above 768 pairs
    (the separate ops are predicted faster there, `kernels.CC_ONE_PASS_PAIRS`) run the separate
    ops (same values).

    Args:
        z_a, z_b: (N, D) projections, N >= 2. logits_a, logits_b: (N, K) cluster logits, K >= 2.
        weights: {"instance", "cluster"} -> weight >= 0 (missing: 1).
        fused: False runs the separate ops on every backend (benchmarks, debugging).
    Returns:
        LossOutput(total, {"instance", "cluster"}).
    """
    _check_views(z_a, z_b)
    _check_logit_pair(logits_a, logits_b)
    if logits_a.shape[0] != z_a.shape[0] or logits_a.device != z_a.device:
        raise ValueError(
            f"cc_objective needs z (N, D) and logits (N, K) on one device; got z "
            f"{tuple(z_a.shape)} on {z_a.device}, logits {tuple(logits_a.shape)} "
            f"on {logits_a.device}"
        )
    instance_temperature = check_positive("instance_temperature", instance_temperature)
    cluster_temperature = check_positive("cluster_temperature", cluster_temperature)
    check_finite(("logits_a", "logits_b"), (logits_a, logits_b))
    gather = _gathering(gather_distributed, reduction)

    def separate_parts():
        common = dict(backend=backend, gather_distributed=gather_distributed, reduction=reduction)
        return {
            "instance": nt_xent(z_a, z_b, instance_temperature, **common),
            "cluster": cc_cluster_loss(logits_a, logits_b, cluster_temperature, **common),
        }

    return _objective(
        "cc_objective",
        CC_PARTS,
        (z_a, z_b, logits_a, logits_b, instance_temperature, cluster_temperature),
        weights,
        separate_parts,
        z_a.device,
        backend,
        gather,
        reduction,
        fused,
    )


TCC_PRIORS = ("kl", "marginal")
TCC_PARTS = ("instance", "cluster", "prior")


def _kl_to_uniform_rows(q: torch.Tensor) -> torch.Tensor:
    """KL(q_i || U(K)) = log K + sum_k q_ik log q_ik per row (p log max(p, tiny): finite
    gradients where a probability underflows to 0)."""
    return math.log(q.shape[1]) + (q * safe_log(q)).sum(1)


@loss_in_input_dtype
@outside_autocast
def tcc_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    centers: torch.Tensor,
    r_a: torch.Tensor,
    r_b: torch.Tensor,
    *,
    instance_temperature: float = 0.5,
    cluster_temperature: float = 1.0,
    gumbel_temperature: float = 0.3,
    residual_weight: float = 0.1,
    prior: str = "kl",
    samples: tuple[torch.Tensor, torch.Tensor] | None = None,
    weights: dict[str, float] | None = None,
    backend: str = "auto",
    gather_distributed: bool = False,
    reduction: str = "mean",
) -> LossOutput:
    """The objective of TCC ("You Never Cluster Alone", Shen et al., NeurIPS 2021,
    arXiv 2106.01908), as specified in docs/methods.md (each choice tagged there: paper,
    the first author's prototype, or inferred). Returns LossOutput(total, parts): the total
    weights its three parts (`weights`, each 1 unless given):

    - "cluster" [paper: cluster representations aggregated with the assignments as weights,
      contrasted between augmented views]: s_k = sum_i pi_ik v_i per view (K x D), v =
      normalise(z), pi a soft Gumbel-softmax sample; NT-Xent (the backend's `nt_xent`) over
      the 2K rows (positive: cluster k of the other view), temperature `cluster_temperature`.
    - "instance" [paper: the instance contrast lower-bounded with the assignments (ELBO);
      form from the prototype]: NT-Xent over the cluster-conditioned embeddings
      e_i = normalise(normalise(pi_i C) + residual_weight * normalise(r_i)), temperature
      `instance_temperature`; C the normalised cluster embeddings.
    - "prior" [the ELBO's KL to a uniform prior; inferred]: prior="kl":
      mean_i KL(q_i || U(K)) averaged over both views, q = softmax(logits / gumbel_temperature);
      prior="marginal": CC's marginal-entropy term log K - H(mean_i q_i), summed over the views.

    Args:
        z_a, z_b: (N, D) instance projections (normalised here).
        logits_a, logits_b: (N, K) cosine similarities normalise(z) . normalise(C)^T.
        centers: (K, D) cluster embeddings C (normalised here). r_a, r_b: (N, D) the instance
            residual W v of each view.
        gumbel_temperature: lambda > 0 of q = softmax(logits / lambda) and of its relaxed
            sample pi = softmax((logits / lambda + g) / lambda), g ~ Gumbel(0, 1) (torch's
            global RNG; seed it).
        samples: (pi_a, pi_b) to use instead of drawing them (tests, deterministic callers).
        weights: "instance", "cluster", "prior" -> weight >= 0 of the part in the total.
        gather_distributed: the instance contrast over every rank's rows, the cluster sums
            and the marginal all-reduced.
        reduction: "mean"; "sum" (each part times its term count); "none": instance per row
            (2N), cluster per row (2K), prior per row (2N, views a then b) for "kl" or per view
            (2 values, each twice the view's term) for "marginal"; the total is then the weighted
            sum of the parts' means.
    """
    _check_logit_pair(logits_a, logits_b)
    for name, x in (("z_a", z_a), ("z_b", z_b), ("r_a", r_a), ("r_b", r_b)):
        check_matrix(name, x, min_rows=2)
    check_same(("z_a", "z_b", "r_a", "r_b"), (z_a, z_b, r_a, r_b))
    check_same(("z_a", "logits_a", "centers"), (z_a, logits_a, centers), shape=False, dtype=False)
    check_matrix("centers", centers, min_rows=2)
    n, k, d = z_a.shape[0], logits_a.shape[1], z_a.shape[1]
    if logits_a.shape[0] != n or centers.shape != (k, d):
        raise ValueError(
            f"tcc_loss needs logits (N={n}, K) and centers (K, D={d}); got logits "
            f"{tuple(logits_a.shape)}, centers {tuple(centers.shape)}"
        )
    instance_temperature = check_positive("instance_temperature", instance_temperature)
    cluster_temperature = check_positive("cluster_temperature", cluster_temperature)
    lam = check_positive("gumbel_temperature", gumbel_temperature)
    if not residual_weight >= 0:
        raise ValueError(f"residual_weight must be >= 0, got {residual_weight}")
    if prior not in TCC_PRIORS:
        raise ValueError(f"prior must be one of {TCC_PRIORS}, got {prior!r}")
    check_finite(
        ("z_a", "z_b", "logits_a", "logits_b", "centers", "r_a", "r_b"),
        (z_a, z_b, logits_a, logits_b, centers, r_a, r_b),
    )
    gather = _gathering(gather_distributed, reduction)
    acc = accumulation_dtype(z_a.dtype)
    la, lb = logits_a.to(acc), logits_b.to(acc)
    if samples is None:
        # the Gumbel-softmax relaxation of q itself: softmax((log q + g) / lambda), log q =
        # l / lambda + const. (Noise added to the raw cosine, as in TCC's prototype, samples
        # softmax(l) instead: with |l| <= 1 that is near-uniform, and the noise decides.)
        pi_a = F.gumbel_softmax(la / lam, tau=lam, dim=1)
        pi_b = F.gumbel_softmax(lb / lam, tau=lam, dim=1)
    else:
        pi_a, pi_b = (s.to(acc) for s in samples)
    q_a, q_b = torch.softmax(la / lam, dim=1), torch.softmax(lb / lam, dim=1)
    v_a, v_b = F.normalize(z_a.to(acc), dim=1), F.normalize(z_b.to(acc), dim=1)
    c = F.normalize(centers.to(acc), dim=1)

    def embed(pi, r):
        return F.normalize(
            F.normalize(pi @ c, dim=1) + residual_weight * F.normalize(r.to(acc), dim=1), dim=1
        )

    common = dict(backend=backend, reduction=reduction)
    parts = {
        "instance": nt_xent(
            embed(pi_a, r_a),
            embed(pi_b, r_b),
            instance_temperature,
            gather_distributed=gather_distributed,
            **common,
        )
    }
    sums = torch.stack([pi_a.T @ v_a, pi_b.T @ v_b])  # (2, K, D)
    marginals = torch.stack([q_a.sum(0), q_b.sum(0)])  # (2, K)
    rows = torch.tensor(float(n), dtype=acc, device=z_a.device)
    if gather:
        stats, rows = gathered.global_sums(torch.cat([sums.reshape(-1), marginals.reshape(-1)]), n)
        sums = stats[: 2 * k * d].view_as(sums)
        marginals = stats[2 * k * d :].view_as(marginals)
    parts["cluster"] = nt_xent(sums[0], sums[1], cluster_temperature, **common)
    if prior == "kl":
        kl = torch.cat([_kl_to_uniform_rows(q_a), _kl_to_uniform_rows(q_b)])
        parts["prior"] = {"mean": kl.mean(), "sum": kl.sum(), "none": kl}[reduction]
    else:
        p = marginals / rows
        terms = math.log(k) + (p * safe_log(p)).sum(1)
        parts["prior"] = {"mean": terms.sum(), "sum": terms.sum(), "none": 2 * terms}[reduction]
    return weighted_total(parts, _part_weights(TCC_PARTS, weights), reduction)
