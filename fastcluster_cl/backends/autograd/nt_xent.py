"""NT-Xent's one autograd path, shared by every backend and by the distributed loss.

A backend describes itself with an `NTXentBackend`:

- the row-range primitives (required): ``lse_rows(z, row_start, row_end, inv_tau, *options) ->
  (lse, row_loss)`` and ``grad_rows(z, lse, row_loss, row_start, row_end, inv_tau, *options) ->
  sum_j (P_ij + P_ji) zn_j - 2 zn_pos(i)`` (unscaled dL/dzn rows of the mean loss, times
  2N tau) over the raw Z = [z_a; z_b] (normalised inside);
- optionally ``dz_rows(z, lse, row_loss, row_start, row_end, inv_tau, grad_out, *options) ->
  dL/dz`` of those rows for L = grad_out * (the mean of all 2N row losses), in z's dtype, the
  normalisation's backward included (in the backend's kernels, where `grad_rows` leaves it to
  about 19 torch ops);
- optionally a whole-matrix fast path: ``forward(z_a, z_b, inv_tau, per_row, *options) ->
  (loss, *state)`` (loss the 2N row losses if per_row, else their mean; the two views, not
  their concatenation, which the Triton and CUDA prologues never build) and ``backward(z, grad,
  inv_tau, *state, *options) -> dL/dz`` (in z's dtype, the normalisation's backward included;
  `grad` 0-d for the mean, (2N,) per row where `per_row_backward`; z = [z_a; z_b] where the
  backward reads it, `NTXentBackend.reads_rows`, else a stand-in of its shape). The state is
  opaque to this module: chunked keeps its lse, Triton its scaled rows, the per-row weights of
  its one-exp backward and the forward programs' largest losses (its fp16 weight scale), CUDA
  its scaled rows.

`NTXent` (the autograd.Function) runs the fast path on one process when the backend has one,
else the row primitives over [0, 2N); with `gather` it all-gathers Z, runs the primitives on this
rank's rows against the gathered Z and all-gathers their lse and row losses for the backward
(gathered.py's convention: the gradient of the local rows is world_size times the global one).
The backward of the primitives path scales the rows by grad * inv_tau / (2N_local) and applies
`numerics.l2_normalize_backward`, or has `dz_rows` do both. Double backward is refused with a
clear error on every backend (the saved statistics are not differentiable functions of the
inputs); backend='torch' is the differentiable reference.

`register_fast_path` gives a backend's fast-path forward op (a torch.library custom op) its
backward op as autograd formula (`pairs.register_pair`), so that the op is differentiable on its
own (opcheck, direct calls), and makes the backward op refuse a second differentiation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ... import distributed as D
from ..numerics import accumulation_dtype, l2_normalize, l2_normalize_backward, outside_autocast
from .pairs import guard, register_pair

RowLSE = Callable[..., tuple[torch.Tensor, torch.Tensor]]
RowGrad = Callable[..., torch.Tensor]
RowDz = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class NTXentBackend:
    """A backend's NT-Xent primitives (see the module docstring)."""

    name: str
    lse_rows: RowLSE
    grad_rows: RowGrad
    forward: Callable | None = None
    backward: Callable | None = None
    per_row_backward: bool = False
    # The fast path's plain Python functions, called instead of the ops outside torch.compile
    # (the op dispatch costs ~45 us a call on the CPU, 7% of a 2N = 256 step on two threads).
    eager: tuple[Callable, Callable] | None = None
    dz_rows: RowDz | None = None
    # (forward state, options) -> whether the fast path's backward reads Z's values; where it
    # reads only its shape and dtype, `backward_rows` spares the copy. None: always reads.
    reads_rows: Callable[[tuple, tuple], bool] | None = None

    def fast_path(self) -> tuple[Callable, Callable]:
        """(forward, backward): the ops while torch.compile traces, else `eager` if given."""
        if self.eager is None or torch.compiler.is_compiling():
            return self.forward, self.backward
        return self.eager

    def backward_rows(
        self, z_a: torch.Tensor, z_b: torch.Tensor, state: tuple, options: tuple
    ) -> torch.Tensor:
        """Z = [z_a; z_b] for the fast path's backward; where that reads only Z's shape and
        dtype (`reads_rows`), a view of one element stands in for the copy (2N x D written and
        read again at every step)."""
        if self.reads_rows is None or self.reads_rows(state, options):
            return torch.cat([z_a, z_b])
        return z_a.new_empty(()).expand(2 * z_a.shape[0], z_a.shape[1])


_BACKENDS: dict[str, NTXentBackend] = {}


def register_backend(spec: NTXentBackend) -> NTXentBackend:
    """Make `spec` known under its name (the name is what `NTXent` receives on the
    single-process path, a constant for torch.compile)."""
    _BACKENDS[spec.name] = spec
    return spec


def backend_spec(backend: str | NTXentBackend) -> NTXentBackend:
    return backend if isinstance(backend, NTXentBackend) else _BACKENDS[backend]


def check_views(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    """The fast path's two views pair up row by row: the same shape (real and fake calls)."""
    torch._check(
        z_a.shape == z_b.shape,
        lambda: (
            f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        ),
    )


def fake_row_values(
    z: torch.Tensor, row_start: int, row_end: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake (meta) result of a registered `lse_rows` op: two vectors of the range's length
    in the accumulation dtype (or `dtype`)."""
    dtype = dtype or accumulation_dtype(z.dtype)
    return (
        z.new_empty(row_end - row_start, dtype=dtype),
        z.new_empty(row_end - row_start, dtype=dtype),
    )


def fake_grad_rows(
    z: torch.Tensor, row_start: int, row_end: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The fake result of a registered `grad_rows` op: the range's rows of z's width."""
    return z.new_empty(row_end - row_start, z.shape[1], dtype=dtype or accumulation_dtype(z.dtype))


def per_row_weights(grad: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, c): per-row incoming gradients as scale * c, scale = max |grad| (0-d), |c| <= 1,
    for the fused backward kernels: their tile weights then keep the mean's bound (the fp16
    weight scale stays valid). On the device, no host sync; all-zero gradients give c = 0."""
    grad = grad.to(dtype)
    scale = grad.abs().amax()
    return scale, (grad / torch.where(scale > 0, scale, 1.0)).contiguous()


def local_row_ranges(n: int, rank: int, world: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """This rank's rows of the global Z = [z_a of all ranks; z_b of all ranks] (n per view)."""
    total = n * world
    return (rank * n, (rank + 1) * n), (total + rank * n, total + (rank + 1) * n)


def _ranges(n: int, gather: bool) -> tuple[tuple[int, int], ...]:
    """The rows of the (gathered) Z whose loss this process computes."""
    return local_row_ranges(n, D.rank(), D.world_size()) if gather else ((0, 2 * n),)


class NTXent(torch.autograd.Function):
    """The NT-Xent terms of [z_a; z_b]: the 2N (local) row losses if per_row, else their mean.
    `backend` is a registered backend name or an `NTXentBackend`; `options` are passed to its
    primitives after their own arguments (chunked: the block size)."""

    @staticmethod
    @outside_autocast  # the primitives' matmuls accumulate in fp32/fp64
    def forward(ctx, z_a, z_b, inv_tau, backend, per_row, gather, options):
        spec, n = backend_spec(backend), z_a.shape[0]
        ctx.spec, ctx.inv_tau, ctx.options, ctx.per_row = spec, inv_tau, options, per_row
        ctx.fused = spec.forward is not None and not gather
        if ctx.fused:
            # The fast path takes the two views (its prologue reads both: no concatenation) and
            # they are saved, not a copy (`backward_rows` builds Z again where it is read).
            loss, *state = spec.fast_path()[0](z_a, z_b, inv_tau, per_row, *options)
            ctx.save_for_backward(z_a, z_b, *state)
            return loss
        z = torch.cat([z_a, z_b])
        # Gathered in the input dtype (half the traffic for bf16); the primitives normalise on
        # the fly and accumulate in fp32.
        z_all = D.gather_views(z) if gather else z
        ctx.ranges = _ranges(n, gather)
        local = [spec.lse_rows(z_all, start, end, inv_tau, *options) for start, end in ctx.ranges]
        lse, row_loss = (
            torch.cat([lse for lse, _ in local]),
            torch.cat([loss for _, loss in local]),
        )
        if gather:
            both = D.gather_views(torch.stack([lse, row_loss], 1))
            ctx.save_for_backward(z_a, z_b, z_all, both[:, 0].contiguous(), both[:, 1].contiguous())
        else:
            ctx.save_for_backward(z_a, z_b, z_all, lse, row_loss)
        return row_loss if per_row else row_loss.mean()

    @staticmethod
    @outside_autocast  # .backward() may be called inside an autocast region
    def backward(ctx, grad):
        spec = ctx.spec
        z_a, z_b, *saved = ctx.saved_tensors
        with torch.no_grad():
            if ctx.fused:
                backward = spec.fast_path()[1]
                z = spec.backward_rows(z_a, z_b, saved, ctx.options)
                dz = backward(z, grad, ctx.inv_tau, *saved, *ctx.options)
            else:
                dz = _rows_backward(ctx, grad, *saved)
        dz = guard(dz, spec.name, z_a, z_b)
        n = dz.shape[0] // 2
        return dz[:n], dz[n:], None, None, None, None, None


def _rows_backward(
    ctx, grad: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, row_loss: torch.Tensor
) -> torch.Tensor:
    """dL/dz of the rows in ctx.ranges of the (gathered) z from the backend's `dz_rows`, or
    from its `grad_rows` and torch's normalisation backward."""
    local = sum(end - start for start, end in ctx.ranges)
    if ctx.spec.dz_rows is not None and grad.dim() == 0:
        # the local rows' gradient is 2N / 2N_local (world_size) times the global one: dz_rows
        # scales by 1 / (2N tau), so grad_out carries the factor
        grad_out = (grad * (z.shape[0] / local)).contiguous()
        return torch.cat(
            [
                ctx.spec.dz_rows(z, lse, row_loss, start, end, ctx.inv_tau, grad_out, *ctx.options)
                for start, end in ctx.ranges
            ]
        )
    g = torch.cat(
        [
            ctx.spec.grad_rows(z, lse, row_loss, start, end, ctx.inv_tau, *ctx.options)
            for start, end in ctx.ranges
        ]
    )
    # dL/dzn of the mean over these rows is 1/(tau * rows); gathered, it is world_size times
    # the global gradient 1/(tau * 2N_global), the same number.
    scale = grad * ctx.inv_tau / local
    rows = torch.cat([torch.arange(start, end, device=z.device) for start, end in ctx.ranges])
    zn, norm = l2_normalize(z[rows])
    return l2_normalize_backward(zn, norm, g, scale).to(z.dtype)


def nt_xent_terms(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, backend: str | NTXentBackend, *options
) -> torch.Tensor:
    """The 2N row losses through `NTXent` (reduction="none"). Backends whose backward takes only
    the mean's gradient refuse to build a graph here."""
    spec = backend_spec(backend)
    if (
        not spec.per_row_backward
        and torch.is_grad_enabled()
        and (z_a.requires_grad or z_b.requires_grad)
    ):
        raise NotImplementedError(
            f"reduction='none' with gradients is not supported by backend={spec.name!r} (its "
            "backward kernels take the mean's gradient only); use backend='chunked' or 'torch', "
            "or compute the per-row terms under torch.no_grad()"
        )
    return NTXent.apply(
        z_a.contiguous(),
        z_b.contiguous(),
        1.0 / temperature,
        spec.name if isinstance(backend, str) else spec,
        True,
        False,
        options,
    )


def nt_xent(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    backend: str | NTXentBackend,
    *options,
    gather: bool = False,
) -> torch.Tensor:
    """The mean NT-Xent through `NTXent` (over every rank's rows with `gather`)."""
    return NTXent.apply(
        z_a.contiguous(), z_b.contiguous(), 1.0 / temperature, backend, False, gather, options
    )


def register_fast_path(
    name: str,
    lse_rows: RowLSE,
    grad_rows: RowGrad,
    forward_op,
    backward_op,
    eager: tuple[Callable, Callable] | None = None,
    dz_rows: RowDz | None = None,
    reads_rows: Callable[[tuple, tuple], bool] | None = None,
) -> NTXentBackend:
    """Register backend `name`: its row primitives (`dz_rows` optional) and its fast-path op
    pair, the custom ops
    ``fastcluster_cl::nt_xent_<name>_fwd`` / ``_bwd`` (per-row gradients supported), and
    optionally the ops' plain functions for eager calls and when the backward op reads Z's
    values (`NTXentBackend.reads_rows`). The backward op becomes the forward op's autograd and
    refuses double backward."""
    ops = torch.ops.fastcluster_cl
    spec = register_backend(
        NTXentBackend(
            name,
            lse_rows,
            grad_rows,
            getattr(ops, f"nt_xent_{name}_fwd").default,
            getattr(ops, f"nt_xent_{name}_bwd").default,
            per_row_backward=True,
            eager=eager,
            dz_rows=dz_rows,
            reads_rows=reads_rows,
        )
    )
    register_pair(
        forward_op,
        backward_op,
        name,
        # (z_a, z_b, inv_tau, per_row, *options) -> (loss, *state); backward (z, grad, inv_tau,
        # *state, *options) -> dz, whose halves are z_a's and z_b's gradients
        lambda inputs, outputs, grads: (
            spec.backward_rows(inputs[0], inputs[1], outputs[1:], tuple(inputs[4:])),
            grads[0],
            inputs[2],
            *outputs[1:],
            *inputs[4:],
        ),
        wrt=(0, 1),
        save_result=False,
        split_result=lambda dz: dz.chunk(2),
    )
    return spec
