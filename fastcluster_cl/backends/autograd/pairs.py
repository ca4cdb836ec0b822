"""The autograd of a fused forward / backward pair of torch.library custom ops (the cluster ops:
cc_cluster statistics, student_t, DEC, anchor, DEC + anchor, on the triton and cuda backends).

Each fused op is two registered ops with fake implementations: a forward op returning its
result and whatever state its backward needs, and a backward op taking the saved tensors and the
incoming gradients. `register_pair` gives the forward op, through
`torch.library.register_autograd`, the backward op as its formula (so the op is differentiable
on its own and the loss functions are plain calls of it) and makes the backward op refuse a
second differentiation with NT-Xent's error ("double backward is not supported by backend=X;
use backend='torch'", `double_backward_error`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..numerics import outside_autocast


def double_backward_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"double backward is not supported by backend={name!r}; use backend='torch'"
    )


class _RefuseDoubleBackward(torch.autograd.Function):
    """dz (a first-order gradient computed with create_graph=True) as a function of the loss's
    inputs whose derivative raises `double_backward_error`, instead of a second derivative that
    is silently wrong or an error about tensors that do not require grad."""

    @staticmethod
    def forward(ctx, dz, name, *inputs):
        ctx.name = name
        return dz.clone()

    @staticmethod
    def backward(ctx, grad):
        raise double_backward_error(ctx.name)


def guard(dz: torch.Tensor, name: str, *inputs: torch.Tensor) -> torch.Tensor:
    """dz, refusing a second differentiation when the backward runs with create_graph."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _RefuseDoubleBackward.apply(dz, name, *inputs)
    return dz


def refuse_double_backward(backward_op, name: str) -> None:
    """Register on a backend's backward op an autograd formula that raises
    `double_backward_error` when differentiated (create_graph=True, then a second backward)."""

    def setup_context(ctx, inputs, output):
        pass

    def backward_fn(ctx, *grads):
        raise double_backward_error(name)

    backward_op.register_autograd(backward_fn, setup_context=setup_context)


# backward_args(inputs, outputs, grads) -> the backward op's arguments: `inputs` the forward
# op's arguments, `outputs` its results (a tuple), `grads` the incoming gradient of each result.
BackwardArgs = Callable[[Sequence, Sequence, Sequence], Sequence]


@dataclass(frozen=True)
class Pair:
    """A registered pair: the backward op, how its arguments are built, which inputs it
    differentiates."""

    backward_op: object
    backward_args: BackwardArgs
    wrt: tuple[int, ...]


# Every registered pair by the forward op's qualified name ("fastcluster_cl::dec_triton_fwd"),
# for the tests (opcheck of each backward op with the arguments its autograd passes).
PAIRS: dict[str, Pair] = {}


def register_pair(
    forward_op,
    backward_op,
    name: str,
    backward_args: BackwardArgs,
    wrt: Sequence[int],
    materialize_grads: bool = True,
    save_result: bool = True,
    split_result: Callable | None = None,
) -> None:
    """Make `forward_op` differentiable through `backward_op`, whose result (a tensor, or a
    tuple of them) is the gradient of the forward's inputs at the indices `wrt`, in order; the
    other inputs get none. `name` is the backend named by the double-backward error.
    `materialize_grads=False`: results that received no gradient pass None to `backward_args`
    instead of a zero tensor (no zero fills for outputs that are only backward state).
    `save_result=False`: the first output (the loss the caller gets) is not saved and reaches
    `backward_args` as None, so that the caller may modify it in place before backward.
    `split_result`: the backward op's one result -> the gradients of the `wrt` inputs (NT-Xent's
    dz of Z = [z_a; z_b] -> its halves)."""
    wrt = tuple(wrt)
    PAIRS[forward_op._qualname] = Pair(backward_op, backward_args, wrt)

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(materialize_grads)
        outputs = output if isinstance(output, tuple) else (output,)
        if not save_result:
            outputs = (None, *outputs[1:])
        values = (*inputs, *outputs)
        ctx.tensor_at = [i for i, x in enumerate(values) if isinstance(x, torch.Tensor)]
        ctx.constants = [None if isinstance(x, torch.Tensor) else x for x in values]
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(*(values[i] for i in ctx.tensor_at))

    @outside_autocast
    def backward_fn(ctx, *grads):
        values = list(ctx.constants)
        for i, t in zip(ctx.tensor_at, ctx.saved_tensors):
            values[i] = t
        inputs, outputs = values[: ctx.n_inputs], values[ctx.n_inputs :]
        with torch.no_grad():
            result = backward_op(*backward_args(inputs, outputs, grads))
        if split_result is not None:
            result = split_result(result)
        result = result if isinstance(result, (tuple, list)) else (result,)
        differentiated = [inputs[i] for i in wrt]
        out = [None] * len(inputs)
        for i, g in zip(wrt, result):
            out[i] = guard(g, name, *differentiated)
        return tuple(out)

    forward_op.register_autograd(backward_fn, setup_context=setup_context)
    refuse_double_backward(backward_op, name)
