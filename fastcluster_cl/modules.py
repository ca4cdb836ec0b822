"""nn.Module wrappers of the functional losses: they hold hyper-parameters, validate them at
construction, and call `fastcluster_cl.functional`."""

from __future__ import annotations

import torch
from torch import nn

from . import distributed
from . import functional as FL
from .backends.dispatch import BACKENDS
from .backends.numerics import l2_normalize
from .functional import LossOutput, weighted_total
from .validation import (
    check_gather_distributed,
    check_nt_xent_temperature,
    check_positive,
    check_reduction,
)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _memory_bank_size(size) -> tuple[int, ...]:
    """lightly's MemoryBankModule rules: 0 (no bank) or a (size, dim) tuple of non-negative
    ints; a bare int > 0 is refused (the feature dimension cannot be guessed)."""
    if (
        isinstance(size, bool)
        or not isinstance(size, (int, tuple, list, torch.Size))
        or any(
            isinstance(x, bool) or not isinstance(x, int)
            for x in ((size,) if isinstance(size, int) else size)
        )
    ):
        raise TypeError(f"memory_bank_size must be 0 or a (size, dim) tuple of ints, got {size!r}")
    size_tuple = (size,) if isinstance(size, int) else tuple(size)
    if any(x < 0 for x in size_tuple):
        raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
    if isinstance(size, int) and size > 0:
        raise ValueError(
            f"Memory bank size 'size={size}' does not specify the feature "
            f"dimension. Set it with 'size=({size}, dim)', or pass 'size=0' to "
            "disable the memory bank."
        )
    if size_tuple != (0,) and len(size_tuple) != 2:
        raise ValueError(
            f"Illegal memory bank size {size}, expected a (num_features, dim) "
            "tuple, or 'size=0' to disable the memory bank."
        )
    return size_tuple


class MemoryBank(nn.Module):
    """A FIFO bank of negatives, as lightly's MemoryBankModule (the `memory_bank` of
    `NTXentLoss`): the same size rules, the same initial draw, the same pointer rule, the same
    buffers `bank` (M, D) and `bank_ptr` (1,).

    The bank starts as `F.normalize(torch.randn(M, D))`, drawn at construction from torch's
    global RNG exactly as lightly draws it. `enqueue(batch)` writes the batch at `bank_ptr`:
    if ptr + B >= M the rows [ptr, M) take the first M - ptr rows (the rest is dropped) and
    the pointer returns to 0, else ptr += B. The update is written with tensor operations only
    (no Python branch on the pointer's value), so it traces under
    `torch.compile(fullgraph=True)` and costs one pass over the bank.

    `persistent=False` (lightly's choice, the default) keeps both buffers out of the state dict,
    so checkpoints load strictly into and from lightly's modules; `persistent=True` puts them
    in it (keys `memory_bank.bank` and `memory_bank.bank_ptr` of the loss) for an exact resume
    of the bank. Loading checks the pointer and the bank's shape.
    """

    def __init__(
        self,
        size=0,
        gather_distributed: bool = False,
        feature_dim_first: bool = True,
        persistent: bool = False,
    ):
        super().__init__()
        self.size = _memory_bank_size(size)
        self.gather_distributed = bool(gather_distributed)
        self.feature_dim_first = bool(feature_dim_first)
        bank = torch.empty(self.size, dtype=torch.float)
        if len(self.size) == 2:
            # lightly's draw: one randn of the bank's shape in float32, rows normalised.
            bank = torch.nn.functional.normalize(torch.randn(self.size), dim=-1)
        self.register_buffer("bank", bank, persistent=persistent)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=persistent)

    @property
    def enabled(self) -> bool:
        return self.size[0] > 0

    def forward(self, output: torch.Tensor, labels=None, update: bool = False):
        """lightly's query: (output, a detached copy of the bank as it was before this call,
        (D, M) with feature_dim_first, else (M, D); None without a bank); `update` then
        enqueues `output`."""
        if not self.enabled:
            return output, None
        bank = self.bank.clone().detach()
        if update:
            self.enqueue(output)
        return output, bank.transpose(0, -1) if self.feature_dim_first else bank

    @torch.no_grad()
    def enqueue(self, batch: torch.Tensor) -> None:
        """Write `batch` (B, D), all ranks' with gather_distributed, at the pointer."""
        batch = batch.detach()
        if self.gather_distributed:
            batch = distributed.gather_rows(batch)
        size, n = self.size[0], batch.shape[0]
        if n == 0:  # nothing to write (lightly's rule leaves the bank as it is)
            return
        offset = torch.arange(size, device=self.bank.device) - self.bank_ptr
        written = (offset >= 0) & (offset < n)
        rows = batch.to(self.bank)[offset.clamp(0, n - 1)]
        self.bank.copy_(torch.where(written[:, None], rows, self.bank))
        end = self.bank_ptr + n
        self.bank_ptr.copy_(torch.where(end >= size, torch.zeros_like(end), end))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        bank, ptr = state_dict.get(prefix + "bank"), state_dict.get(prefix + "bank_ptr")
        if bank is not None and tuple(bank.shape) != tuple(self.bank.shape):
            raise ValueError(
                f"{prefix}bank has shape {tuple(bank.shape)}, this memory bank "
                f"is {tuple(self.bank.shape)}"
            )
        if ptr is not None:
            size = max(self.size[0], 1)
            if ptr.numel() != 1 or ptr.is_floating_point() or not 0 <= int(ptr) < size:
                raise ValueError(
                    f"{prefix}bank_ptr must be one integer in [0, {size}), got {ptr.tolist()}"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class NTXentLoss(nn.Module):
    """NT-Xent instance loss (SimCLR; CC's instance loss) with lightly's interface: the same
    arguments in the same order, `forward(out0, out1)`, a `memory_bank` attribute and the same
    state dict keys. See `fastcluster_cl.nt_xent`.

    With `memory_bank_size=(M, D)` it is lightly's NTXentLoss with a memory bank (MoCo-style;
    `fastcluster_cl.functional.nt_xent_bank`): each call contrasts the N rows of the normalised
    out0 against their positives (normalised out1) and the M bank rows as they were before the
    call (mean over the N rows of the cross-entropy over [sim_pos, sim_neg] / tau with label 0),
    then, when out0 requires grad, `memory_bank` (a `MemoryBank`) enqueues the normalised,
    detached out1. The backends stream the bank in column blocks (no N x M matrix); the bank
    gets no gradient. (0, D) or 0 disables the bank, as in lightly.

    A batch of one pair without a bank has no negatives: the loss is 0 (connected to the graph,
    zero gradients), as in lightly and pytorch-metric-learning. The loss comes back in the
    inputs' dtype; fp16/bf16 inputs are accumulated in float32.

    Attributes:
        temperature: tau, |tau| >= 1e-8 (lightly's rule; a negative tau, which lightly also
        accepts, runs on the torch and chunked backends). memory_bank_size: 0 or (M, D).
        gather_distributed: contrast against every rank's rows (with a bank: lightly's
        behaviour, the loss uses this rank's rows and the update all-gathers every rank's batch
        first, so all ranks keep one bank).
        backend, reduction ("none": the 2N per-row terms, N with a bank): keyword-only, see
        `fastcluster_cl.functional`. persistent_memory_bank: put the bank and its pointer in
        the state dict (False, lightly's choice: strict loads to and from lightly's module).
    Raises:
        ValueError: |temperature| < 1e-8, unknown backend or reduction, gather_distributed without
        torch.distributed, a memory_bank_size lightly refuses (a bare int > 0, a negative entry,
        not a pair); TypeError: a memory_bank_size that is not ints (here); bad shapes, a feature
        dimension other than the bank's, or NaN (in forward).

    Example:
        >>> loss = NTXentLoss(temperature=0.5)(torch.randn(8, 16), torch.randn(8, 16))
        >>> moco = NTXentLoss(0.1, (4096, 16))     # lightly's positional order
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_bank_size=0,
        gather_distributed: bool = False,
        *,
        backend: str = "auto",
        reduction: str = "mean",
        persistent_memory_bank: bool = False,
    ):
        super().__init__()
        self.temperature = check_nt_xent_temperature(temperature)
        self.gather_distributed = check_gather_distributed(gather_distributed)
        self.backend = _check_backend(backend)
        self.reduction = check_reduction(reduction)
        self.memory_bank = MemoryBank(
            memory_bank_size,
            gather_distributed=gather_distributed,
            persistent=persistent_memory_bank,
        )

    @property
    def memory_bank_size(self) -> tuple[int, ...]:
        return self.memory_bank.size

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        """out0, out1: (N, D) projections of the two views. Returns the loss (see reduction);
        with a bank, then updates it (when out0 requires grad)."""
        if not self.memory_bank.enabled:
            return FL.nt_xent(
                out0,
                out1,
                self.temperature,
                backend=self.backend,
                gather_distributed=self.gather_distributed,
                reduction=self.reduction,
            )
        # The bank as it was before this batch: a copy, since the update below writes in place
        # and the backward reads the negatives again.
        negatives = self.memory_bank.bank.detach().to(out0.device, copy=True)
        loss = FL.nt_xent_bank(
            out0, out1, negatives, self.temperature, backend=self.backend, reduction=self.reduction
        )
        if out0.requires_grad:
            self.memory_bank.enqueue(l2_normalize(out1.detach())[0])
        return loss


class CCClusterLoss(nn.Module):
    """Contrastive Clustering's cluster-level loss. See `fastcluster_cl.cc_cluster_loss`
    (reduction "none": the 2K per-column terms; from_probs: the inputs are probabilities).

    Example:
        >>> loss = CCClusterLoss()(torch.randn(8, 10), torch.randn(8, 10))
    """

    def __init__(
        self,
        temperature: float = 1.0,
        backend: str = "auto",
        gather_distributed: bool = False,
        reduction: str = "mean",
        from_probs: bool = False,
    ):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.backend = _check_backend(backend)
        self.gather_distributed = check_gather_distributed(gather_distributed)
        self.reduction = check_reduction(reduction)
        self.from_probs = bool(from_probs)

    def forward(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        """logits_a, logits_b: (N, K) cluster logits (probabilities with from_probs)."""
        return FL.cc_cluster_loss(
            logits_a,
            logits_b,
            self.temperature,
            backend=self.backend,
            gather_distributed=self.gather_distributed,
            reduction=self.reduction,
            from_probs=self.from_probs,
        )


class DECLoss(nn.Module):
    """DEC KL loss against the batch's sharpened target. See `fastcluster_cl.dec_loss`
    (reduction "none": the N per-row terms)."""

    def __init__(
        self, backend: str = "auto", gather_distributed: bool = False, reduction: str = "mean"
    ):
        super().__init__()
        self.backend = _check_backend(backend)
        self.gather_distributed = check_gather_distributed(gather_distributed)
        self.reduction = check_reduction(reduction)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q: (N, K) probabilities. Returns the loss (see reduction)."""
        return FL.dec_loss(
            q,
            backend=self.backend,
            gather_distributed=self.gather_distributed,
            reduction=self.reduction,
        )


class AnchorLoss(nn.Module):
    """Anchor loss of arXiv 2109.12714. See `fastcluster_cl.anchor_loss` (reduction "none":
    the N per-row terms)."""

    def __init__(self, backend: str = "auto", reduction: str = "mean"):
        super().__init__()
        self.backend = _check_backend(backend)
        self.reduction = check_reduction(reduction)

    def forward(self, q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
        """q0, q_a, q_b: (N, K) probabilities of the clean and augmented views."""
        return FL.anchor_loss(q0, q_a, q_b, backend=self.backend, reduction=self.reduction)


# The keyword inputs each method takes: one tuple per accepted form.
_METHOD_INPUTS = {
    "anchor": (("h0", "h_a", "h_b", "centers"), ("q0", "q_a", "q_b")),
    "cc": (("logits_a", "logits_b"),),
    "tcc": (("logits_a", "logits_b", "centers", "r_a", "r_b"),),
}


_WEIGHTS = ("instance", "cluster", "anchor", "prior", "feature")


class ClusterContrastiveLoss(nn.Module):
    """The whole objective of one method: instance NT-Xent plus its clustering terms.

    Methods (docs/design.md, docs/methods.md):
        "anchor": arXiv 2109.12714, L_ins + w_clu * DEC KL(q0) + w_anc * anchor(q0, qa, qb);
                  takes the center head's inputs h0, h_a, h_b (N, F) and centers (K, F)
                  (`fastcluster_cl.functional.anchor_objective`: one pass each way on the
                  triton and cuda backends), or the assignments q0, q_a, q_b themselves.
        "cc":     Contrastive Clustering, L_ins + w_clu * cc_cluster_loss; needs logits_a/b
                  (`fastcluster_cl.functional.cc_objective`, one pass on triton and cuda;
                  auto on a GPU runs the separate ops above 768 pairs).
        "tcc":    You Never Cluster Alone (`fastcluster_cl.functional.tcc_loss`): w_ins * the
                  instance NT-Xent over the cluster-conditioned embeddings + w_clu * the
                  NT-Xent over the 2K pooled cluster rows + w_prior * the prior term, plus
                  w_feature * plain NT-Xent on z (default weight 0); needs logits_a/b (cosine),
                  centers (K, D), r_a/b (N, D).

    Attributes:
        method, instance_temperature (0.5), cluster_temperature (1.0), weights (dict of part
        weights: "instance", "cluster", "anchor", and for tcc "prior" (1) and "feature" (0)),
        alpha (the anchor method's Student-t degrees of freedom, 1.0),
        gumbel_temperature (tcc's lambda, 0.3), tcc_prior ("kl" | "marginal"), backend,
        gather_distributed (every term over the batch of all ranks; the anchor loss is per row
        and needs no communication), reduction: applied to every part ("none": each part holds
        its per-term values, see `fastcluster_cl.functional`, and total is the weighted sum of
        their means, the "mean" total).
    Raises:
        ValueError: unknown method, backend or reduction, temperature <= 0, negative weight,
        gather_distributed without torch.distributed (here);
        a missing input for the method, bad shapes, NaN (in forward).

    Example:
        >>> crit = ClusterContrastiveLoss("cc")
        >>> out = crit(z_a, z_b, logits_a=c_a, logits_b=c_b)
        >>> out.total.backward(); out.parts["instance"], out.parts["cluster"]
        >>> out = ClusterContrastiveLoss("anchor")(z_a, z_b, h0=h0, h_a=h_a, h_b=h_b,
        ...                                        centers=mu)
    """

    def __init__(
        self,
        method: str = "anchor",
        instance_temperature: float = 0.5,
        cluster_temperature: float = 1.0,
        weights: dict[str, float] | None = None,
        gumbel_temperature: float = 0.3,
        backend: str = "auto",
        gather_distributed: bool = False,
        reduction: str = "mean",
        tcc_prior: str = "kl",
        alpha: float = 1.0,
    ):
        super().__init__()
        if method not in _METHOD_INPUTS:
            raise ValueError(f"method must be one of {tuple(_METHOD_INPUTS)}, got {method!r}")
        self.method = method
        self.instance_temperature = check_positive("instance_temperature", instance_temperature)
        self.cluster_temperature = check_positive("cluster_temperature", cluster_temperature)
        self.gumbel_temperature = check_positive("gumbel_temperature", gumbel_temperature)
        self.alpha = check_positive("alpha", alpha)
        self.weights = {
            "instance": 1.0,
            "cluster": 1.0,
            "anchor": 1.0,
            "prior": 1.0,
            "feature": 0.0,
            **(weights or {}),
        }
        for name, w in self.weights.items():
            if name not in _WEIGHTS or not w >= 0:
                raise ValueError(f"weights takes {_WEIGHTS} >= 0, got {name}={w}")
        if tcc_prior not in FL.TCC_PRIORS:
            raise ValueError(f"tcc_prior must be one of {FL.TCC_PRIORS}, got {tcc_prior!r}")
        self.tcc_prior = tcc_prior
        self.backend = _check_backend(backend)
        self.gather_distributed = check_gather_distributed(gather_distributed)
        self.reduction = check_reduction(reduction)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, **inputs: torch.Tensor) -> LossOutput:
        """z_a, z_b: (N, D) projections. Keyword inputs by method: anchor: h0, h_a, h_b (N, F)
        features and centers (K, F), or q0, q_a, q_b (N, K) probabilities; cc: logits_a,
        logits_b (N, K); tcc: logits_a, logits_b (N, K) cosine logits, centers (K, D), r_a, r_b
        (N, D) (`fastcluster_cl.models.TCCHead`)."""
        given = tuple(sorted(name for name, x in inputs.items() if x is not None))
        forms = _METHOD_INPUTS[self.method]
        if given not in [tuple(sorted(form)) for form in forms]:
            raise TypeError(
                f"method {self.method!r} takes "
                + " or ".join(map(str, forms))
                + f" as keyword inputs; got {given}"
            )
        common = dict(
            backend=self.backend,
            gather_distributed=self.gather_distributed,
            reduction=self.reduction,
        )
        if self.method == "cc":
            return FL.cc_objective(
                z_a,
                z_b,
                inputs["logits_a"],
                inputs["logits_b"],
                instance_temperature=self.instance_temperature,
                cluster_temperature=self.cluster_temperature,
                weights=self.weights,
                **common,
            )
        if self.method == "anchor" and "h0" in given:
            return FL.anchor_objective(
                z_a,
                z_b,
                inputs["h0"],
                inputs["h_a"],
                inputs["h_b"],
                inputs["centers"],
                instance_temperature=self.instance_temperature,
                alpha=self.alpha,
                weights=self.weights,
                **common,
            )
        if self.method == "anchor":
            parts = {"instance": FL.nt_xent(z_a, z_b, self.instance_temperature, **common)}
            parts["cluster"], parts["anchor"] = FL.dec_anchor_losses(
                inputs["q0"], inputs["q_a"], inputs["q_b"], **common
            )
            return weighted_total(parts, self.weights, self.reduction)
        out = FL.tcc_loss(
            z_a,
            z_b,
            inputs["logits_a"],
            inputs["logits_b"],
            inputs["centers"],
            inputs["r_a"],
            inputs["r_b"],
            instance_temperature=self.instance_temperature,
            cluster_temperature=self.cluster_temperature,
            gumbel_temperature=self.gumbel_temperature,
            prior=self.tcc_prior,
            weights={name: self.weights[name] for name in FL.TCC_PARTS},
            **common,
        )
        if self.weights["feature"] == 0:
            return out
        feature = FL.nt_xent(z_a, z_b, self.instance_temperature, **common)
        return weighted_total(out.parts | {"feature": feature}, self.weights, self.reduction)
