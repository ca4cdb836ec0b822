"""Backend "cuda": the CUDA C++ twin of the fused losses (csrc/, docs/ops.md).

For users who cannot or do not want to JIT Triton, and as an independently written second
implementation that cross-checks the Triton kernels. The NT-Xent kernels in ``csrc/nt_xent.cu``
use tensor cores (wmma, fp32 accumulation) for float16/bfloat16 and an fp32 SIMT product for
float32; the forward is an online log-sum-exp over column tiles and the backward one more
row-parallel pass using the saved per-row lse, so the 2N x 2N similarity matrix never exists.

`nt_xent_bank` (NT-Xent against a memory bank) runs ``csrc/nt_xent_bank.cu``: the rows of z_a
against the bank's column tiles, never an N x M matrix, with the Triton kernels' numerics (fixed
shift, fp16 hi + lo bank for 16-bit inputs), per-row gradients included.

The extension (``csrc/binding.cpp``, ``csrc/nt_xent.cu``, ``csrc/nt_xent_bank.cu``,
``csrc/cluster.cu``, ``csrc/objective.cu``; shared tiles in ``csrc/tiles.cuh``) is built with
``torch.utils.cpp_extension.load`` on the first call and cached in torch's default extensions
directory; importing this module builds nothing and works on CPU-only machines.

`student_t`, `dec_loss` and `anchor_loss` run the kernels of ``csrc/cluster.cu`` (one warp per
row, deterministic, forward and backward). The cluster-level contrasts (`cc_cluster_loss`,
`tcc_cluster_loss`) run this NT-Xent on their 2K rows.

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
import hashlib
import importlib.resources
import os

import torch

from .losses import nt_xent_autograd, nt_xent_bank_autograd, reference
from .losses.nt_xent_autograd import fake_grad_rows, fake_row_values, register_fast_path
from .losses.op_autograd import register_pair

_SOURCES = ("binding.cpp", "nt_xent.cu", "nt_xent_bank.cu", "cluster.cu", "objective.cu")
_SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MIN_CAPABILITY = (8, 0)  # bfloat16 tensor cores (wmma) need Ampere or newer


def _compiler_missing() -> str | None:
    """Why the extension cannot be compiled here, or None when nvcc is found."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None:
        return (
            "no CUDA toolkit found to compile the extension (torch.utils.cpp_extension."
            "CUDA_HOME is None); install the CUDA toolkit matching torch.version.cuda="
            f"{torch.version.cuda} and set CUDA_HOME, or use backend='triton'"
        )
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return (
            f"no nvcc at {nvcc} (CUDA_HOME={home}); install the CUDA toolkit or set "
            "CUDA_HOME, or use backend='triton'"
        )
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """Why backend="cuda" cannot run on `device`, or None when it can."""
    if torch.version.cuda is None:
        return (
            "this torch build has no CUDA support (torch.version.cuda is None); install a "
            "CUDA build of torch, or use backend='chunked' or 'torch' on CPU"
        )
    if device.type != "cuda":
        return f"it needs CUDA tensors, got tensors on {device}; move them with .cuda()"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no visible GPU or driver)"
    capability = torch.cuda.get_device_capability(device)
    if capability < _MIN_CAPABILITY:
        return (
            f"it needs compute capability >= {_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]} "
            f"(Ampere or newer), {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}; use backend='triton'"
        )
    return _compiler_missing()


def _require(device: torch.device) -> None:
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend='cuda' cannot run on {device}: {reason}")


@functools.cache
def extension():
    """The compiled extension module (JIT-built on first use, then loaded from torch's cache).

    Exposes the building blocks documented in csrc/fcl_kernels.h and csrc/binding.cpp:
    normalize(z_a, z_b), lse_rows(zs, rs, row_start, row_end, inv_tau),
    grad_rows(zs, rs, lse, row_loss, row_start, row_end, inv_tau),
    norm_backward(zs, rs, norm, g, row_start, row_end, grad_out, factor, out),
    student_t_forward(h, centers, alpha), student_t_backward(h, centers, q, dist2, grad_q, alpha),
    dec_forward(q), dec_backward(q, f, grad_out, factor), anchor_forward(q0, q_a, q_b),
    anchor_backward(q0, q_a, q_b, grad_out, factor), bank_forward(zs, rs, dist, bank, bank_lo,
    inv_tau, fixed_shift), bank_backward(zs, rs, norm, dist, bank, bank_lo, row_w, row_loss, w,
    inv_tau, fixed_shift, out), anchor_objective_forward(z_a, z_b, h0, h_a, h_b, centers,
    inv_tau, alpha, w_instance, w_cluster, w_anchor), anchor_objective_backward(..., rows,
    assign, f, grad, ...), cc_objective_forward(z_a, z_b, logits_a, logits_b, inv_tau,
    inv_tau_c, w_instance, w_cluster), cc_objective_backward(..., rows, row_lse, gram,
    cluster_rows, grad, ...).
    """
    from torch.utils.cpp_extension import load

    root = importlib.resources.files("fastcluster_cl.csrc")
    sources = [str(root / name) for name in _SOURCES]
    # The name carries a digest of every source and header: torch's cache keys on the sources
    # it is given only, so a changed header must not reuse a stale build.
    digest = hashlib.sha256()
    for entry in sorted(root.iterdir(), key=lambda entry: entry.name):
        if entry.name.endswith(_SOURCE_SUFFIXES):
            digest.update(entry.name.encode() + b"\0" + entry.read_bytes())
    name = f"fastcluster_cl_cuda_{digest.hexdigest()[:16]}"
    try:
        return load(
            name=name,
            sources=sources,
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            verbose=False,
        )
    except (RuntimeError, OSError) as err:
        raise RuntimeError(
            f"building the backend='cuda' extension from {sources} failed; "
            f"use backend='triton' meanwhile. Compiler report: {err}"
        ) from err


def _row_values(
    lse_neg: torch.Tensor, dist: torch.Tensor, inv_tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, loss) per row from the log-sum-exp over the negatives and dist = 1 - tau S_pos:
    loss = log(1 + exp(lse_neg - S_pos)) never subtracts two large numbers of similar size."""
    s_pos = (1.0 - dist) * inv_tau
    loss = torch.nn.functional.softplus(lse_neg - s_pos)
    return s_pos + loss, loss


# The NT-Xent fast path as torch.library ops with fake implementations; their autograd is
# `fastcluster_cl.losses.nt_xent_autograd` (the state: zs, rs, norms, lse and row losses).


@torch.library.custom_op("fastcluster_cl::nt_xent_cuda_fwd", mutates_args=())
def _fused_forward(
    z: torch.Tensor, inv_tau: float, per_row: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the 2N row losses, or their mean; zs, rs, norms, lse, row losses): row scaling and the
    row lse."""
    ext = extension()
    half = z.shape[0] // 2
    zs, rs, norm, dist = ext.normalize(z[:half].contiguous(), z[half:].contiguous())
    rows = zs.shape[0]
    lse, row_loss = _row_values(ext.lse_rows(zs, rs, 0, rows, inv_tau), dist.repeat(2), inv_tau)
    return (row_loss.clone() if per_row else row_loss.mean()), zs, rs, norm, lse, row_loss


@_fused_forward.register_fake
def _(z, inv_tau, per_row):
    rows, f32 = z.shape[0], torch.float32
    vector = z.new_empty(rows, dtype=f32)
    zs = z.new_empty(z.shape, dtype=f32 if z.dtype == f32 else torch.float16)
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
    ext = extension()
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


# Student-t, DEC and anchor as torch.library ops with fake implementations (float32 results,
# gradients in the input dtype: csrc/binding.cpp); `losses.op_autograd.register_pair` is their
# autograd. The forwards return what their backward needs: q and the squared distances, the
# column sums f of DEC.


@torch.library.custom_op("fastcluster_cl::student_t_cuda_fwd", mutates_args=())
def student_t_forward(
    h: torch.Tensor, centers: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, dist2): the Student-t assignment of h to the centres and the squared distances."""
    q, dist2 = extension().student_t_forward(h, centers, alpha)
    return q, dist2


@student_t_forward.register_fake
def _(h, centers, alpha):
    q = h.new_empty(h.shape[0], centers.shape[0], dtype=torch.float32)
    return q, torch.empty_like(q)


@torch.library.custom_op("fastcluster_cl::student_t_cuda_bwd", mutates_args=())
def student_t_backward(
    h: torch.Tensor,
    centers: torch.Tensor,
    q: torch.Tensor,
    dist2: torch.Tensor,
    grad_q: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh, dcenters) from dL/dq and the forward's q and dist2."""
    dh, dcenters = extension().student_t_backward(
        h, centers, q, dist2, grad_q.float().contiguous(), alpha
    )
    return dh, dcenters


@student_t_backward.register_fake
def _(h, centers, q, dist2, grad_q, alpha):
    return torch.empty_like(h), torch.empty_like(centers)


@torch.library.custom_op("fastcluster_cl::dec_cuda_fwd", mutates_args=())
def dec_forward(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(DEC loss, f = column sums of q); the target p is recomputed from q and f backward."""
    loss_rows, f = extension().dec_forward(q)
    return loss_rows.sum() / q.shape[0], f


@dec_forward.register_fake
def _(q):
    return q.new_empty((), dtype=torch.float32), q.new_empty(q.shape[1], dtype=torch.float32)


@torch.library.custom_op("fastcluster_cl::dec_cuda_bwd", mutates_args=())
def dec_backward(q: torch.Tensor, f: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dq (q's dtype) from the gradient of the mean loss (0-d)."""
    return extension().dec_backward(q, f, grad.float().reshape(1).contiguous(), 1.0 / q.shape[0])


@dec_backward.register_fake
def _(q, f, grad):
    return torch.empty_like(q)


@torch.library.custom_op("fastcluster_cl::anchor_cuda_fwd", mutates_args=())
def anchor_forward(q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """The anchor loss; q0 is held fixed (no gradient)."""
    return extension().anchor_forward(q0, q_a, q_b).sum() / q0.shape[0]


@anchor_forward.register_fake
def _(q0, q_a, q_b):
    return q0.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastcluster_cl::anchor_cuda_bwd", mutates_args=())
def anchor_backward(
    q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dqa, dL/dqb) from the gradient of the mean loss (0-d)."""
    dq_a, dq_b = extension().anchor_backward(
        q0, q_a, q_b, grad.float().reshape(1).contiguous(), 1.0 / q0.shape[0]
    )
    return dq_a, dq_b


@anchor_backward.register_fake
def _(q0, q_a, q_b, grad):
    return torch.empty_like(q_a), torch.empty_like(q_b)


register_pair(
    student_t_forward,
    student_t_backward,
    "cuda",
    lambda inputs, outputs, grads: (inputs[0], inputs[1], *outputs, grads[0], inputs[2]),
    wrt=(0, 1),
)
register_pair(
    dec_forward,
    dec_backward,
    "cuda",
    lambda inputs, outputs, grads: (inputs[0], outputs[1], grads[0]),
    wrt=(0,),
)
register_pair(
    anchor_forward,
    anchor_backward,
    "cuda",
    lambda inputs, outputs, grads: (*inputs, grads[0]),
    wrt=(1, 2),
)


def _check_inputs(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """Device usable, a kernel dtype, and one shape/dtype/device for all tensors."""
    first = tensors[0]
    _require(first.device)
    if first.dtype not in _DTYPES:
        raise TypeError(
            f"backend='cuda' takes float32, float16 or bfloat16 inputs (it "
            f"accumulates in float32), got {names[0]} of {first.dtype}; use "
            "backend='torch' or 'chunked' for float64"
        )
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first.dtype or t.shape != first.shape or t.device != first.device:
            raise ValueError(
                f"{name} must match {names[0]} in shape, dtype and device, got "
                f"{tuple(t.shape)} {t.dtype} {t.device} and {tuple(first.shape)} "
                f"{first.dtype} {first.device}"
            )


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (see `fastcluster_cl.nt_xent`) with the CUDA C++ kernels; returns float32."""
    _check_inputs(("z_a", "z_b"), (z_a, z_b))
    return nt_xent_autograd.nt_xent(z_a, z_b, float(temperature), "cuda")


def nt_xent_terms(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """The 2N per-row terms with the CUDA C++ kernels (per-row gradients: the backward kernel
    weights each row's loss by its incoming gradient)."""
    _check_inputs(("z_a", "z_b"), (z_a, z_b))
    return nt_xent_autograd.nt_xent_terms(z_a, z_b, float(temperature), "cuda")


# NT-Xent against a memory bank (csrc/nt_xent_bank.cu) as torch.library ops with fakes; their
# autograd is `fastcluster_cl.losses.nt_xent_bank_autograd` (the state: zs, rs, norms, dist, row
# weights and row losses, as the Triton backend's).


def _bank_operands(
    bank: torch.Tensor, zs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(bank, bank_lo or None): the extension's bank operands for Zs's dtype
    (`nt_xent_bank_autograd.bank_operands`)."""
    hi, lo, split = nt_xent_bank_autograd.bank_operands(bank, zs.dtype)
    return hi, (lo if split else None)


def _bank_forward_rows(zs, rs, dist, bank, inv_tau):
    return extension().bank_forward(
        zs,
        rs,
        dist,
        *_bank_operands(bank, zs),
        inv_tau,
        reference.fixed_shift_safe(inv_tau, torch.float32),
    )


def _bank_backward_rows(zs, rs, norm, dist, bank, row_w, row_loss, w, inv_tau, out_dtype):
    dz_a, dz_b = extension().bank_backward(
        zs,
        rs,
        norm,
        dist,
        *_bank_operands(bank, zs),
        row_w,
        row_loss,
        w,
        inv_tau,
        reference.fixed_shift_safe(inv_tau, torch.float32),
        out_dtype,
    )
    return dz_a, dz_b


_bank_forward, _bank_backward = nt_xent_bank_autograd.define_scaled_row_ops(
    "cuda",
    lambda z_a, z_b: tuple(extension().normalize(z_a, z_b)),
    _bank_forward_rows,
    _bank_backward_rows,
    lambda dtype: torch.float32 if dtype == torch.float32 else torch.float16,
)


def _check_bank(z_a: torch.Tensor, z_b: torch.Tensor, bank: torch.Tensor) -> None:
    _check_inputs(("z_a", "z_b"), (z_a, z_b))
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


def _normalized(z: torch.Tensor):
    """(zs, rs, norm, dist) of the full raw Z = [z_a; z_b] through the extension."""
    _require(z.device)
    _check_inputs(("z",), (z,))
    half = z.shape[0] // 2
    return extension().normalize(z[:half].contiguous(), z[half:].contiguous())


@torch.library.custom_op("fastcluster_cl::nt_xent_cuda_lse_rows", mutates_args=())
def lse_rows(
    z: torch.Tensor, row_start: int, row_end: int, inv_tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-range primitive of `fastcluster_cl.losses.gathered` (gather_distributed): (lse, loss)
    of rows [row_start, row_end) of the full raw Z against all its rows (float32)."""
    zs, rs, _, dist = _normalized(z)
    rows = torch.arange(row_start, row_end, device=z.device) % dist.shape[0]
    return _row_values(
        extension().lse_rows(zs, rs, row_start, row_end, inv_tau), dist[rows], inv_tau
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
    """Row-range primitive of `fastcluster_cl.losses.gathered`: sum_j (P_ij + P_ji) zn_j -
    2 zn_pos(i) for rows [row_start, row_end), `lse` and `row_loss` the (2N,) vectors of all
    rows (float32)."""
    zs, rs = _normalized(z)[:2]
    return extension().grad_rows(
        zs, rs, lse.float().contiguous(), row_loss.float().contiguous(), row_start, row_end, inv_tau
    )


@grad_rows.register_fake
def _(z, lse, row_loss, row_start, row_end, inv_tau):
    return fake_grad_rows(z, row_start, row_end, torch.float32)


def student_t(h: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    """Student-t soft assignment (see `fastcluster_cl.student_t`) with the CUDA C++ kernels;
    returns float32 (N, K)."""
    _check_inputs(("h",), (h,))
    if centers.dtype != h.dtype or centers.device != h.device or centers.shape[1:] != h.shape[1:]:
        raise ValueError(
            f"centers must match h in dtype, device and features, got "
            f"{tuple(centers.shape)} {centers.dtype} {centers.device} and "
            f"{tuple(h.shape)} {h.dtype} {h.device}"
        )
    return student_t_forward(h.contiguous(), centers.contiguous(), float(alpha))[0]


def dec_loss(q: torch.Tensor) -> torch.Tensor:
    """DEC clustering loss (see `fastcluster_cl.dec_loss`) with the CUDA C++ kernels; float32."""
    _check_inputs(("q",), (q,))
    return dec_forward(q.contiguous())[0]


def anchor_loss(q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """Anchor loss (see `fastcluster_cl.anchor_loss`) with the CUDA C++ kernels; float32."""
    _check_inputs(("q0", "q_a", "q_b"), (q0, q_a, q_b))
    return anchor_forward(q0.detach().contiguous(), q_a.contiguous(), q_b.contiguous())


NT_XENT = register_fast_path("cuda", lse_rows, grad_rows, _fused_forward, _fused_backward)

cc_cluster_loss = functools.partial(reference.cc_cluster_loss, instance_loss=nt_xent)
tcc_cluster_loss = functools.partial(reference.tcc_cluster_loss, instance_loss=nt_xent)
cc_cluster_loss_terms = functools.partial(
    reference.cc_cluster_loss_terms, instance_terms=nt_xent_terms
)
tcc_cluster_loss_terms = functools.partial(
    reference.tcc_cluster_loss_terms, instance_terms=nt_xent_terms
)


# ---- One-pass fused objectives (csrc/objective.cu) --------------------------------------------
# reference.anchor_objective / cc_objective in one row-parallel kernel plus a one-block
# epilogue (forward) and one row kernel plus one small kernel (backward). The forward ops return
# the result and the fp32 state the backward reads, never an N x K matrix (the backward
# recomputes the assignments): rows (5, 2N) = per row of [z_a; z_b] its inverse scaled norm,
# norm, lse, loss and power-of-two scale; anchor: assign (7, N) = the Student-t lse of h0, h_a,
# h_b per row, DEC's row totals T = sum_k q0^2 / f and c_dec = sum_k p [q0 >= tiny], c_a and
# c_b = sum_k q0 [q_v >= tiny] (the clamped log's exact gradient), and the column sums f (K,) of
# q0; cc: row_lse (2, N) = the softmax lse of each view's row, the 2K x 2K Gram of the columns
# and (3, 2K) = each column's lse, loss and sum (K at most CC_MAX_CLUSTERS). The incoming
# gradient and the weights are folded in the backward kernels; centres enter in fp32 (the
# cast's autograd brings their gradient back to their dtype).
CC_MAX_CLUSTERS = 64  # FCL_CC_MAX_CLUSTERS of csrc/fcl_kernels.h


@torch.library.custom_op("fastcluster_cl::anchor_objective_cuda_fwd", mutates_args=())
def anchor_objective_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    h0: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    centers: torch.Tensor,
    inv_tau: float,
    alpha: float,
    w_instance: float,
    w_cluster: float,
    w_anchor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (4,) = [total, instance, DEC, anchor], rows, assign, f); centers float32."""
    out, rows, assign, f = extension().anchor_objective_forward(
        z_a, z_b, h0, h_a, h_b, centers, inv_tau, alpha, w_instance, w_cluster, w_anchor
    )
    return out, rows, assign, f


@anchor_objective_forward.register_fake
def _(z_a, z_b, h0, h_a, h_b, centers, inv_tau, alpha, w_instance, w_cluster, w_anchor):
    (n, _), k, f32 = z_a.shape, centers.shape[0], torch.float32
    return (
        z_a.new_empty(4, dtype=f32),
        z_a.new_empty(5, 2 * n, dtype=f32),
        z_a.new_empty(7, n, dtype=f32),
        z_a.new_empty(k, dtype=f32),
    )


@torch.library.custom_op("fastcluster_cl::anchor_objective_cuda_bwd", mutates_args=())
def anchor_objective_backward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    h0: torch.Tensor,
    h_a: torch.Tensor,
    h_b: torch.Tensor,
    centers: torch.Tensor,
    rows: torch.Tensor,
    assign: torch.Tensor,
    f: torch.Tensor,
    grad: torch.Tensor,
    inv_tau: float,
    alpha: float,
    w_instance: float,
    w_cluster: float,
    w_anchor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz_a, dz_b, dh0, dh_a, dh_b, dcenters) from dL/dout (4,)."""
    grads = extension().anchor_objective_backward(
        z_a,
        z_b,
        h0,
        h_a,
        h_b,
        centers,
        rows,
        assign,
        f,
        grad.float().contiguous(),
        inv_tau,
        alpha,
        w_instance,
        w_cluster,
        w_anchor,
    )
    return tuple(grads)


@anchor_objective_backward.register_fake
def _(
    z_a,
    z_b,
    h0,
    h_a,
    h_b,
    centers,
    rows,
    assign,
    f,
    grad,
    inv_tau,
    alpha,
    w_instance,
    w_cluster,
    w_anchor,
):
    return tuple(torch.empty_like(t) for t in (z_a, z_b, h0, h_a, h_b, centers))


@torch.library.custom_op("fastcluster_cl::cc_objective_cuda_fwd", mutates_args=())
def cc_objective_forward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    inv_tau: float,
    inv_tau_c: float,
    w_instance: float,
    w_cluster: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (3,) = [total, instance, cluster], rows, row_lse, gram, cluster_rows)."""
    out, rows, row_lse, gram, cluster_rows = extension().cc_objective_forward(
        z_a, z_b, logits_a, logits_b, inv_tau, inv_tau_c, w_instance, w_cluster
    )
    return out, rows, row_lse, gram, cluster_rows


@cc_objective_forward.register_fake
def _(z_a, z_b, logits_a, logits_b, inv_tau, inv_tau_c, w_instance, w_cluster):
    (n, _), k, f32 = z_a.shape, logits_a.shape[1], torch.float32
    return (
        z_a.new_empty(3, dtype=f32),
        z_a.new_empty(5, 2 * n, dtype=f32),
        z_a.new_empty(2, n, dtype=f32),
        z_a.new_empty(2 * k, 2 * k, dtype=f32),
        z_a.new_empty(3, 2 * k, dtype=f32),
    )


@torch.library.custom_op("fastcluster_cl::cc_objective_cuda_bwd", mutates_args=())
def cc_objective_backward(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    rows: torch.Tensor,
    row_lse: torch.Tensor,
    gram: torch.Tensor,
    cluster_rows: torch.Tensor,
    grad: torch.Tensor,
    inv_tau: float,
    inv_tau_c: float,
    w_instance: float,
    w_cluster: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz_a, dz_b, dlogits_a, dlogits_b) from dL/dout (3,)."""
    grads = extension().cc_objective_backward(
        z_a,
        z_b,
        logits_a,
        logits_b,
        rows,
        row_lse,
        gram,
        cluster_rows,
        grad.float().contiguous(),
        inv_tau,
        inv_tau_c,
        w_instance,
        w_cluster,
    )
    return tuple(grads)


@cc_objective_backward.register_fake
def _(
    z_a,
    z_b,
    logits_a,
    logits_b,
    rows,
    row_lse,
    gram,
    cluster_rows,
    grad,
    inv_tau,
    inv_tau_c,
    w_instance,
    w_cluster,
):
    return tuple(torch.empty_like(t) for t in (z_a, z_b, logits_a, logits_b))


register_pair(
    anchor_objective_forward,
    anchor_objective_backward,
    "cuda",
    lambda inputs, outputs, grads: (*inputs[:6], *outputs[1:], grads[0], *inputs[6:]),
    wrt=range(6),
)
register_pair(
    cc_objective_forward,
    cc_objective_backward,
    "cuda",
    lambda inputs, outputs, grads: (*inputs[:4], *outputs[1:], grads[0], *inputs[4:]),
    wrt=range(4),
)


def _weights(weights, count: int) -> tuple[float, ...]:
    weights = tuple(float(w) for w in weights)
    if len(weights) != count:
        raise ValueError(f"weights must hold {count} numbers, got {weights}")
    return weights


def _check_rows(name: str, t: torch.Tensor, z: torch.Tensor) -> None:
    if t.dim() != 2 or t.shape[0] != z.shape[0] or t.device != z.device:
        raise ValueError(
            f"{name} must be (N, *) on {z.device} with N = {z.shape[0]} (the rows "
            f"of z_a), got {tuple(t.shape)} on {t.device}"
        )


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
    """`reference.anchor_objective` in one fused forward and backward: float32 (4,) =
    [total, instance, cluster (DEC on q0), anchor]; differentiable w.r.t. z, h and centers."""
    _check_inputs(("z_a", "z_b"), (z_a, z_b))
    _check_inputs(("h0", "h_a", "h_b"), (h0, h_a, h_b))
    _check_rows("h0", h0, z_a)
    if (
        centers.dtype not in _DTYPES
        or centers.device != h0.device
        or centers.dim() != 2
        or centers.shape[1] != h0.shape[1]
    ):
        raise ValueError(
            f"centers must be (K, {h0.shape[1]}) float32/float16/bfloat16 on "
            f"{h0.device}, got {tuple(centers.shape)} {centers.dtype} "
            f"{centers.device}"
        )
    return anchor_objective_forward(
        z_a.contiguous(),
        z_b.contiguous(),
        h0.contiguous(),
        h_a.contiguous(),
        h_b.contiguous(),
        centers.float().contiguous(),
        1.0 / float(temperature),
        float(alpha),
        *_weights(weights, 3),
    )[0]


def cc_objective_fits(
    z_a: torch.Tensor, z_b: torch.Tensor, logits_a: torch.Tensor, logits_b: torch.Tensor
) -> bool:
    """Whether the one-pass kernels take these inputs (K <= CC_MAX_CLUSTERS); the public
    `cc_objective` runs the separate ops (CUDA NT-Xent on the 2K columns) for the others."""
    return logits_a.shape[1] <= CC_MAX_CLUSTERS


def cc_objective(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    instance_temperature: float,
    cluster_temperature: float,
    weights: tuple[float, float],
) -> torch.Tensor:
    """`reference.cc_objective` in one fused forward and backward: float32 (3,) =
    [total, instance, cluster]; differentiable w.r.t. z and the logits."""
    _check_inputs(("z_a", "z_b"), (z_a, z_b))
    _check_inputs(("logits_a", "logits_b"), (logits_a, logits_b))
    _check_rows("logits_a", logits_a, z_a)
    if logits_a.shape[1] > CC_MAX_CLUSTERS:
        raise ValueError(
            f"backend='cuda' fuses the cluster contrast for at most "
            f"{CC_MAX_CLUSTERS} clusters, got K = {logits_a.shape[1]}; use "
            f"backend='chunked'"
        )
    return cc_objective_forward(
        z_a.contiguous(),
        z_b.contiguous(),
        logits_a.contiguous(),
        logits_b.contiguous(),
        1.0 / float(instance_temperature),
        1.0 / float(cluster_temperature),
        *_weights(weights, 2),
    )[0]
