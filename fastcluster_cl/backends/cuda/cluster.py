"""Student-t, DEC and anchor on the CUDA twin (csrc/cluster.cu): one warp per row,
deterministic, forward and backward."""

from __future__ import annotations

import torch

from ..autograd.pairs import register_pair
from . import build

# Student-t, DEC and anchor as torch.library ops with fake implementations (float32 results,
# gradients in the input dtype: csrc/cluster_binding.cpp); `backends.autograd.pairs.register_pair`
# is their autograd. The forwards return what their backward needs: q and the squared distances,
# the column sums f of DEC.


@torch.library.custom_op("fastcluster_cl::student_t_cuda_fwd", mutates_args=())
def student_t_forward(
    h: torch.Tensor, centers: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, dist2): the Student-t assignment of h to the centers and the squared distances."""
    q, dist2 = build.extension().student_t_forward(h, centers, alpha)
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
    dh, dcenters = build.extension().student_t_backward(
        h, centers, q, dist2, grad_q.float().contiguous(), alpha
    )
    return dh, dcenters


@student_t_backward.register_fake
def _(h, centers, q, dist2, grad_q, alpha):
    return torch.empty_like(h), torch.empty_like(centers)


@torch.library.custom_op("fastcluster_cl::dec_cuda_fwd", mutates_args=())
def dec_forward(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(DEC loss, f = column sums of q); the target p is recomputed from q and f backward."""
    loss_rows, f = build.extension().dec_forward(q)
    return loss_rows.sum() / q.shape[0], f


@dec_forward.register_fake
def _(q):
    return q.new_empty((), dtype=torch.float32), q.new_empty(q.shape[1], dtype=torch.float32)


@torch.library.custom_op("fastcluster_cl::dec_cuda_bwd", mutates_args=())
def dec_backward(q: torch.Tensor, f: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dq (q's dtype) from the gradient of the mean loss (0-d)."""
    return build.extension().dec_backward(
        q, f, grad.float().reshape(1).contiguous(), 1.0 / q.shape[0]
    )


@dec_backward.register_fake
def _(q, f, grad):
    return torch.empty_like(q)


@torch.library.custom_op("fastcluster_cl::anchor_cuda_fwd", mutates_args=())
def anchor_forward(q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """The anchor loss; q0 is held fixed (no gradient)."""
    return build.extension().anchor_forward(q0, q_a, q_b).sum() / q0.shape[0]


@anchor_forward.register_fake
def _(q0, q_a, q_b):
    return q0.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastcluster_cl::anchor_cuda_bwd", mutates_args=())
def anchor_backward(
    q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dqa, dL/dqb) from the gradient of the mean loss (0-d)."""
    dq_a, dq_b = build.extension().anchor_backward(
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


def student_t(h: torch.Tensor, centers: torch.Tensor, alpha: float) -> torch.Tensor:
    """Student-t soft assignment (see `fastcluster_cl.student_t`) with the CUDA C++ kernels;
    returns float32 (N, K)."""
    build.check_inputs(("h",), (h,))
    if h.dtype in (torch.bfloat16, torch.float16) and centers.dtype == torch.float32:
        h = h.float()  # autocast's fp32 centers: the kernels take one dtype
    if centers.dtype != h.dtype or centers.device != h.device or centers.shape[1:] != h.shape[1:]:
        raise ValueError(
            f"centers must match h in dtype, device and features, got "
            f"{tuple(centers.shape)} {centers.dtype} {centers.device} and "
            f"{tuple(h.shape)} {h.dtype} {h.device}"
        )
    return student_t_forward(h.contiguous(), centers.contiguous(), float(alpha))[0]


def dec_loss(q: torch.Tensor) -> torch.Tensor:
    """DEC clustering loss (see `fastcluster_cl.dec_loss`) with the CUDA C++ kernels; float32."""
    build.check_inputs(("q",), (q,))
    return dec_forward(q.contiguous())[0]


def anchor_loss(q0: torch.Tensor, q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """Anchor loss (see `fastcluster_cl.anchor_loss`) with the CUDA C++ kernels; float32."""
    build.check_inputs(("q0", "q_a", "q_b"), (q0, q_a, q_b))
    return anchor_forward(q0.detach().contiguous(), q_a.contiguous(), q_b.contiguous())
