"""Triton kernels (installed as fastcluster_cl.kernels): the backend "triton".

One module per fused op, each holding its forward and backward kernels, the host launchers and
its autograd: `nt_xent` (instance NT-Xent: the fast path as the torch.library ops
`fastcluster_cl::nt_xent_triton_fwd` / `_bwd` whose autograd is
`fastcluster_cl.backends.autograd.nt_xent`, plus the row-range primitives of the distributed
backend), `nt_xent_bank` (NT-Xent against a memory bank: ops `nt_xent_bank_triton_fwd` /
`_bwd`), `cc_cluster` (softmax assignment + column statistics + Gram of the CC
cluster contrast), `student_t` (center-head assignment), `kl` (DEC and anchor KL losses, and
both fused as `dec_anchor_losses`, which `ClusterContrastiveLoss("anchor")` uses here),
`objective` (the anchor and CC objectives in one pass: `anchor_objective`, `cc_objective`;
ops `anchor_objective_triton_fwd` / `_bwd`, `cc_objective_triton_fwd` / `_bwd`).
This module exposes the ops under their public names with the signatures of
`fastcluster_cl.backends.reference`, as `backends/dispatch.py` expects.

On CUDA tensors the kernels are compiled by Triton; on the CPU they run only under the Triton
interpreter (TRITON_INTERPRET=1, set before triton is first imported), slowly: it is how the tests
check them without a GPU.
"""

from __future__ import annotations

import os
from functools import partial

import torch

from fastcluster_cl.backends import reference

try:
    from . import _common, kl
    from .cc_cluster import cc_cluster_loss
    from .kl import anchor_loss, dec_anchor_losses, dec_loss
    from .nt_xent import MAX_ROW_FEATURES as _MAX_ROW_FEATURES
    from .nt_xent import NT_XENT, grad_rows, lse_rows, nt_xent, nt_xent_terms
    from .nt_xent_bank import nt_xent_bank, nt_xent_bank_terms
    from .objective import anchor_objective, anchor_objective_fits, cc_objective, cc_objective_fits
    from .student_t import MAX_CENTERS as _MAX_CENTERS
    from .student_t import student_t

    _IMPORT_ERROR = None
except ImportError as err:  # triton missing or broken: the backend reports why when asked
    _IMPORT_ERROR = err

__all__ = [
    "nt_xent",
    "nt_xent_terms",
    "NT_XENT",
    "nt_xent_bank",
    "nt_xent_bank_terms",
    "cc_cluster_loss",
    "cc_cluster_loss_terms",
    "student_t",
    "dec_loss",
    "anchor_loss",
    "dec_anchor_losses",
    "lse_rows",
    "grad_rows",
    "anchor_objective",
    "cc_objective",
    "anchor_objective_fits",
    "cc_objective_fits",
    "nt_xent_fits",
    "nt_xent_terms_fits",
    "nt_xent_bank_fits",
    "nt_xent_bank_terms_fits",
    "cc_cluster_loss_terms_fits",
    "student_t_fits",
    "dec_loss_fits",
    "anchor_loss_fits",
    "dec_anchor_losses_fits",
    "unavailable_reason",
    "AUTO_SEPARATE",
]

# One-pass objectives that backend="auto" does not take here (`dispatch.auto_takes_one_pass`),
# by the inputs (z_a first): it runs the separate ops instead, the same function. The cost
# model (`python -m fastcluster_cl.bench model`, benchmarks/results/model-h100.json, H100, bf16)
# predicts the one-pass anchor kernels slower than the separate ops at every shape of its table
# where they run (N / 128 programs fill few SMs and each computes its Student-t distances on the
# FP32 pipe, twice): at N = 1024, F = 512, one pass against separate ops (midpoints) 520
# against 148 us at K = 10, 2511 against 175 at K = 100, 19841 against 346 at K = 1000. The
# one-pass cc kernels win at small batches and lose beyond CC_ONE_PASS_PAIRS pairs (their row
# launch fills few SMs; the separate ops split NT-Xent's columns). K = 10, one pass against
# separate ops: 67 against 103 us at N = 256, 92 / 108 at 512, 105 / 111 at 640, 117 / 113 at
# 768, 142 / 116 at 1024 (K = 20: 150 / 121), 438 / 215 at 4096; at 32768 (7604 / 6641) the
# ranges overlap. The crossover lies between 640 and 768 pairs; at 768 the two are within 4 us.
# backend="triton" still runs them; benchmarks/gpu_check.sh measures both.
CC_ONE_PASS_PAIRS = 768
AUTO_SEPARATE = {
    "anchor_objective": lambda z_a, *_: True,
    "cc_objective": lambda z_a, *_: z_a.shape[0] > CC_ONE_PASS_PAIRS,
}


def unavailable_reason(device: torch.device) -> str | None:
    """None when the kernels can run on `device`, else why not."""
    if _IMPORT_ERROR is not None:
        return f"triton cannot be imported ({_IMPORT_ERROR})"
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (
        "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 (set before triton is "
        "imported) to run its kernels on the CPU slowly"
    )


if _IMPORT_ERROR is None:
    # The inputs each kernel holds, for backend="auto" (`dispatch.backend_for`): beyond them
    # auto runs the chunked backend; backend="triton" raises, saying why.

    def nt_xent_fits(z_a: torch.Tensor, *_) -> bool:
        return z_a.shape[1] <= _MAX_ROW_FEATURES

    def nt_xent_bank_fits(z_a: torch.Tensor, *_) -> bool:
        return z_a.shape[1] <= _common.MAX_FEATURES

    nt_xent_terms_fits = nt_xent_fits
    nt_xent_bank_terms_fits = nt_xent_bank_fits

    def cc_cluster_loss_terms_fits(logits_a: torch.Tensor, *_) -> bool:
        """The per-row terms run `nt_xent_terms` on the N-long cluster columns."""
        return logits_a.shape[0] <= _MAX_ROW_FEATURES

    def student_t_fits(h: torch.Tensor, centers: torch.Tensor) -> bool:
        return centers.shape[0] <= _MAX_CENTERS

    def dec_loss_fits(q: torch.Tensor, *_) -> bool:
        return q.shape[1] <= kl.MAX_CLUSTERS

    anchor_loss_fits = dec_anchor_losses_fits = dec_loss_fits

    # reduction="none": the per-row NT-Xent kernels on the cluster rows (forward only, see
    # `nt_xent_terms`).
    cc_cluster_loss_terms = partial(reference.cc_cluster_loss_terms, instance_terms=nt_xent_terms)
