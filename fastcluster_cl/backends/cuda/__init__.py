"""Backend "cuda": the CUDA C++ twin of the fused losses (csrc/, docs/ops.md).

For users who cannot or do not want to JIT Triton, and as an independently written second
implementation that cross-checks the Triton kernels. The NT-Xent kernels in ``csrc/nt_xent.cu``
use tensor cores (wmma, fp32 accumulation) for float16/bfloat16 and an fp32 SIMT product for
float32; the forward is an online log-sum-exp over column tiles and the backward one more
row-parallel pass using the saved per-row lse, so the 2N x 2N similarity matrix never exists.

`nt_xent_bank` (NT-Xent against a memory bank) runs ``csrc/nt_xent_bank.cu``: the rows of z_a
against the bank's column tiles, never an N x M matrix, with the Triton kernels' numerics (fixed
shift, fp16 hi + lo bank for 16-bit inputs), per-row gradients included.

The extension (``csrc/<op>.cu`` with its torch binding ``csrc/<op>_binding.cpp`` for the ops
nt_xent, nt_xent_bank, cluster and objective, the module in ``csrc/binding.cpp``; shared tiles
in ``csrc/tiles.cuh``) is built with
``torch.utils.cpp_extension.load`` on the first call and cached in torch's default extensions
directory; importing this module builds nothing and works on CPU-only machines.

`student_t`, `dec_loss` and `anchor_loss` run the kernels of ``csrc/cluster.cu`` (one warp per
row, deterministic, forward and backward). The cluster-level contrast (`cc_cluster_loss`) runs
this NT-Xent on its 2K rows.

`anchor_objective` and `cc_objective` are the one-pass fused objectives of ``csrc/objective.cu``
(`reference.anchor_objective` / `cc_objective`): the instance NT-Xent and the method's cluster
terms in one row-parallel kernel plus a one-block epilogue, the backward in one row-parallel
kernel plus one small kernel; deterministic (fixed-order reductions, no atomics).

Raises:
    RuntimeError: from `unavailable_reason` (via the dispatcher or a direct call) when torch has
        no CUDA, the tensors are not on a CUDA device of compute capability >= 8.0, or no CUDA
        compiler is found; TypeError for float64 inputs (the kernels compute in float32).
"""

from __future__ import annotations

import functools

from .. import reference
from .build import unavailable_reason
from .cluster import anchor_loss, dec_loss, student_t
from .nt_xent import NT_XENT, grad_rows, lse_rows, nt_xent, nt_xent_terms
from .nt_xent_bank import nt_xent_bank, nt_xent_bank_terms
from .objective import anchor_objective, cc_objective, cc_objective_fits

cc_cluster_loss = functools.partial(reference.cc_cluster_loss, instance_loss=nt_xent)
cc_cluster_loss_terms = functools.partial(
    reference.cc_cluster_loss_terms, instance_terms=nt_xent_terms
)

__all__ = [
    "NT_XENT",
    "anchor_loss",
    "anchor_objective",
    "cc_cluster_loss",
    "cc_cluster_loss_terms",
    "cc_objective",
    "cc_objective_fits",
    "dec_loss",
    "grad_rows",
    "lse_rows",
    "nt_xent",
    "nt_xent_bank",
    "nt_xent_bank_terms",
    "nt_xent_terms",
    "student_t",
    "unavailable_reason",
]
