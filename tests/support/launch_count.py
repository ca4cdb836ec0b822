"""Count what a loss path launches, on the CPU under TRITON_INTERPRET=1: Triton kernel launches
and torch compute ops, the latter including those run inside the implementations of the
package's custom ops.

* Triton launches: `kernel[grid](...)` under the interpreter ends in
  `triton.runtime.interpreter.InterpretedFunction.run`; the counter wraps it (a device-function
  call inside a kernel goes through `__call__`, not `run`, so it is not a launch). The torch ops
  the interpreter itself runs to emulate device memory (storage copies to and from the host)
  are not the program's: modes are disabled for the launch.
* torch ops: a TorchDispatchMode records every aten op but views (`OpOverload.is_view`, detach)
  and pure allocations (`ALLOCATIONS`: empty, empty_like, empty_strided, new_empty, ...: no
  kernel runs on a GPU); fills (zeros, ones, full, fill_, zero_) are compute, as on a GPU they
  launch a kernel. A dispatch mode is not active inside the op it intercepted, so an op of the
  package (namespace "fastcluster_cl", a torch.library.custom_op) is recorded as such and its
  Python implementation is run with the mode re-entered: the torch ops inside count.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten
ALLOCATIONS = {
    aten.empty,
    aten.empty_like,
    aten.empty_strided,
    aten.new_empty,
    aten.new_empty_strided,
    aten.lift_fresh,
    aten.detach,
    aten.detach_,
    aten.alias,
}


class OpCounter(TorchDispatchMode):
    """`ops`: the torch compute ops run (name -> count); `custom`: the package's ops called."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.custom: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastcluster_cl":
            self.custom[func.name()] += 1
            opdef = OPDEFS[func._schema.name]
            with self:  # the implementation's own torch ops are dispatched (and counted) anew
                return opdef._init_fn(*args, **kwargs)
        if not (func.is_view or func.overloadpacket in ALLOCATIONS):
            self.ops[func.name()] += 1
        return func(*args, **kwargs)

    @property
    def compute_ops(self) -> int:
        return sum(self.ops.values())


@contextmanager
def count_launches():
    """Yields a Counter of Triton launches by kernel name (interpreter only)."""
    from triton.runtime import interpreter

    launches: Counter = Counter()
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            launches[self.fn.__name__] += 1
        with _disable_current_modes():
            return original(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run
    try:
        yield launches
    finally:
        interpreter.InterpretedFunction.run = original


@contextmanager
def counting():
    """(launches, ops): both counters over the block."""
    with count_launches() as launches, OpCounter() as ops:
        yield launches, ops
