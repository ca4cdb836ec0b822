"""Argument checks shared by every loss. Each error says what was wrong and what to pass instead.

Shape, dtype and device checks read metadata only and always run. The value checks (non-finite
inputs, probabilities off the simplex) read the data, which on a GPU costs a device-to-host sync
and a few launches per loss; that stalls pipelining and prevents CUDA-graph capture. So by
default ("cpu") they run only on CPU tensors, where reading the data syncs nothing, and a GPU
loss path adds no host sync. ``set_value_checks(True)`` runs them on every device (one sync per
check; worth it while debugging), ``set_value_checks(False)`` nowhere. They are skipped while
torch.compile traces.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_value_checks: bool | str = "cpu"


def set_value_checks(enabled: bool | str) -> None:
    """Data-dependent checks (finite inputs, valid probabilities): True on every device (one
    host sync per check on a GPU), False nowhere, "cpu" (the default) on CPU tensors only."""
    global _value_checks
    if not (isinstance(enabled, str) and enabled == "cpu") and not isinstance(enabled, (bool, int)):
        raise ValueError(f"value checks are True, False or 'cpu', got {enabled!r}")
    _value_checks = enabled if isinstance(enabled, str) else bool(enabled)


@contextmanager
def value_checks(enabled: bool | str):
    """Context manager form of `set_value_checks`."""
    previous = _value_checks
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


def syncs_host(device: torch.device) -> bool:
    """Whether reading a tensor's values on `device` waits for the device (all but the CPU)."""
    return device.type != "cpu"


def value_checks_active(devices) -> bool:
    """Whether the value checks run for data on these devices (see the module docstring)."""
    if _value_checks is False or torch.compiler.is_compiling():
        return False
    return _value_checks is True or not any(syncs_host(d) for d in devices)


def _value_checks_active(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Value checks read data: never on meta tensors (shapes only, no data to read)."""
    if any(t.device.type == "meta" for t in tensors):
        return False
    return value_checks_active([t.device for t in tensors])


MIN_TEMPERATURE = 1e-8  # lightly's guard against dividing by ~0 (the messages say "1e-8")


def check_positive(name: str, value: float) -> float:
    """A finite number >= MIN_TEMPERATURE (temperatures, alpha; a subnormal temperature made
    1 / tau overflow and the loss NaN): any real number type (numpy's and fractions' too, as
    the NT-Xent temperature takes)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    number = float(value)
    if not MIN_TEMPERATURE <= number < math.inf:  # comparisons trace as guards, isfinite not
        raise ValueError(f"{name} must be a finite number >= 1e-8, got {value}")
    return number


def check_nt_xent_temperature(value: float) -> float:
    """NT-Xent's temperature: finite with |tau| >= MIN_TEMPERATURE. A negative one is accepted
    as lightly's NTXentLoss accepts it (it maximises the distance to the positives, which is
    rarely what a run wants), and computed exactly on the torch and chunked backends."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"temperature must be a float, got {type(value).__name__}")
    value = float(value)
    if not MIN_TEMPERATURE <= abs(value) < math.inf:
        raise ValueError(
            f"temperature must be a finite number with |temperature| >= 1e-8, got {value}"
        )
    return value


def check_matrix(name: str, x: torch.Tensor, min_rows: int = 1, min_cols: int = 1) -> None:
    """A 2-D floating tensor with at least `min_rows` rows and `min_cols` columns."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[0] < min_rows:
        what = "an empty batch" if x.shape[0] == 0 else f"{x.shape[0]} rows"
        raise ValueError(f"{name} needs at least {min_rows} rows, got {what}")
    if x.shape[1] < min_cols:
        raise ValueError(f"{name} needs at least {min_cols} columns, got {x.shape[1]}")


def check_same(
    names: tuple[str, ...],
    tensors: tuple[torch.Tensor, ...],
    shape: bool = True,
    dtype: bool = True,
) -> None:
    """Same device for every tensor, and the same dtype (when `dtype`) and shape (`shape`)."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "move them to one device"
            )
        if dtype and t.dtype != first.dtype:
            raise TypeError(
                f"{name} is {t.dtype} but {first_name} is {first.dtype}; cast them to one dtype"
            )
        if shape and t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has "
                f"{tuple(first.shape)}; the views must match"
            )


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite. On the CPU, below float64, a sum decides it (a NaN or
    an inf makes the sum non-finite), read as a Python float: a float32 sum first (one
    vectorised pass, a fifth of isfinite().all()'s time); only where it is not finite, which
    finite values can also give by overflowing, a float64 sum, which no sum of finite float32
    values overflows. Other devices, some without float64, keep isfinite (no host read)."""
    if t.dtype == torch.float64 or not t.is_floating_point() or t.device.type != "cpu":
        return bool(torch.isfinite(t).all())
    if t.numel() == 1:
        return math.isfinite(float(t))
    return math.isfinite(float(t.sum(dtype=torch.float32))) or math.isfinite(
        float(t.sum(dtype=torch.float64))
    )


def check_finite(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """Raise on NaN/inf inputs instead of returning a NaN loss."""
    if not _value_checks_active(tensors):
        return
    with torch.no_grad():  # value reads, not graph nodes
        finite = [_all_finite(t) for t in tensors]
    for name, ok in zip(names, finite):
        if not ok:
            raise ValueError(
                f"{name} contains NaN or inf; check the model outputs (a diverged "
                "step or an fp16 overflow) before the loss"
            )


def check_finite_through(
    result: torch.Tensor, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]
) -> None:
    """`check_finite(names, tensors)` for inputs that reach every value of `result`, as NT-Xent's
    z do (each row is normalised, and each row's loss sums over every row): a NaN or inf in
    them makes `result` non-finite, so one read of `result` replaces a pass over each input;
    the inputs are read only then, to name the culprit."""
    if not _value_checks_active(tensors):
        return
    with torch.no_grad():
        if _all_finite(result):
            return
    check_finite(names, tensors)


def check_probabilities(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """Finite, non-negative rows that sum to 1 (to a tolerance fitting the dtype)."""
    if not _value_checks_active(tensors):
        return
    check_finite(names, tensors)
    for name, q in zip(names, tensors):
        tol = 1e-2 if q.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if bool((q < 0).any()) or not bool(((q.float().sum(1) - 1).abs() <= tol).all()):
            raise ValueError(
                f"{name} must hold probabilities (rows >= 0 summing to 1); pass "
                "softmax(logits) or fastcluster_cl.student_t(h, centers)"
            )


def check_unit_rows(name: str, x: torch.Tensor) -> None:
    """Rows of norm <= 1 (to the dtype's rounding): a memory bank of unit vectors, which the
    fused NT-Xent kernels may shift by the bound 1/tau of its similarities."""
    if not _value_checks_active((x,)):
        return
    tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not bool((torch.linalg.vector_norm(x.double(), dim=1) <= 1 + tol).all()):
        raise ValueError(
            f"{name} must hold unit (or shorter) rows; L2-normalise them "
            "(NTXentLoss(memory_bank_size=...) stores normalised rows)"
        )


REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    """One of REDUCTIONS."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_gather_distributed(gather_distributed: bool) -> bool:
    """gather_distributed=True needs a torch built with torch.distributed (checked up front, as
    lightly's NTXentLoss does, rather than at the first multi-rank call)."""
    if gather_distributed and not torch.distributed.is_available():
        raise ValueError(
            "gather_distributed=True but torch.distributed is not available in this "
            "torch build; pass gather_distributed=False or install a torch with "
            "distributed support"
        )
    return bool(gather_distributed)
