"""A dense model of the CUDA extension (csrc/fcl_kernels.h) in plain torch, for checking the
CUDA backend's glue and autograd on machines without a GPU."""

import torch

from fastcluster_cl.backends import reference
from fastcluster_cl.backends.numerics import NORM_EPS


class DenseLaunchers:
    """What each extension function returns per csrc/fcl_kernels.h, written densely in torch
    (materialises S). Lets the NT-Xent autograd glue be checked on machines without a GPU."""

    @staticmethod
    def normalize(z_a, z_b):
        """zs = z (a valid power-of-two scaling: p = 1), rs = 1 / norm."""
        z = torch.cat([z_a, z_b])
        norm = z.norm(dim=1).clamp_min(NORM_EPS)
        zn = z / norm[:, None]
        n = z_a.shape[0]
        return z, 1.0 / norm, norm, 1.0 - (zn[:n] * zn[n:]).sum(1)

    @staticmethod
    def _scores(zs, rs, row_start, row_end, inv_tau):
        """S of the rows, and the (row, column) index of their diagonal and positive."""
        zn = zs * rs[:, None]
        s = zn[row_start:row_end] @ zn.T * inv_tau
        rows = torch.arange(row_end - row_start)
        own = torch.arange(row_start, row_end)
        return s, rows, own, (own + zn.shape[0] // 2) % zn.shape[0]

    @classmethod
    def lse_rows(cls, zs, rs, row_start, row_end, inv_tau):
        s, rows, own, pos = cls._scores(zs, rs, row_start, row_end, inv_tau)
        s[rows, own] = s[rows, pos] = float("-inf")
        return torch.logsumexp(s, dim=1)

    @classmethod
    def grad_rows(cls, zs, rs, lse, row_loss, row_start, row_end, inv_tau, weight=None):
        """With `weight` (per-row loss weights c) A_ij = c_i P_ij + c_j P_ji."""
        s, rows, own, pos = cls._scores(zs, rs, row_start, row_end, inv_tau)
        c = torch.ones_like(lse) if weight is None else weight
        c_i = c[row_start:row_end]
        a = c_i[:, None] * torch.exp(s - lse[row_start:row_end, None]) + c[None, :] * torch.exp(
            s - lse[None, :]
        )
        a[rows, own] = 0.0
        a[rows, pos] = c_i * torch.expm1(-row_loss[row_start:row_end]) + c[pos] * torch.expm1(
            -row_loss[pos]
        )
        return a @ (zs * rs[:, None])

    @staticmethod
    def norm_backward(zs, rs, norm, g, row_start, row_end, grad_out, factor, out):
        u = grad_out * factor * g
        rows = (zs * rs[:, None])[row_start:row_end]
        radial = torch.where(norm[:, None] > NORM_EPS, (rows * u).sum(1, keepdim=True), 0.0)
        return ((u - rows * radial) / norm[:, None]).to(out)

    @staticmethod
    def dec_forward(q):
        f = q.sum(0)
        return reference.kl_rows(reference.dec_target(q), q), f

    @staticmethod
    def dec_backward(q, f, grad_out, factor):
        weight = q.pow(2) / f
        p = weight / weight.sum(1, keepdim=True)
        return -grad_out * factor * torch.where(q >= torch.finfo(q.dtype).tiny, p / q, 0.0)

    @staticmethod
    def anchor_forward(q0, q_a, q_b):
        return reference.kl_rows(q0, q_a) + reference.kl_rows(q0, q_b)

    @staticmethod
    def anchor_backward(q0, q_a, q_b, grad_out, factor):
        tiny = torch.finfo(q0.dtype).tiny
        return tuple(-grad_out * factor * torch.where(q >= tiny, q0 / q, 0.0) for q in (q_a, q_b))

    @staticmethod
    def student_t_forward(h, centers, alpha):
        """(q, dist2), both float32 as the kernels'."""
        dist2 = (h[:, None, :] - centers[None, :, :]).pow(2).sum(-1)
        return reference.student_t(h, centers, alpha).float(), dist2.float()

    @staticmethod
    def student_t_backward(h, centers, q, dist2, grad_q, alpha):
        """g = dL/d dist2 through the softmax of -(alpha+1)/2 log(1 + d/alpha), then
        dh = 2 (rowsum(g) h - g mu), dcenters = -2 (g^T h - colsum(g) mu)."""
        dlogit = q * (grad_q - (q * grad_q).sum(1, keepdim=True))
        g = (dlogit * (-(alpha + 1.0) / 2.0) / (alpha + dist2)).to(h.dtype)
        dh = 2.0 * (g.sum(1)[:, None] * h - g @ centers)
        return dh, -2.0 * (g.T @ h - g.sum(0)[:, None] * centers)
