"""Environment compatibility: the torchvision op shim for CPU torch, and optional-library probes.

The registry's torchvision 0.28.0 is a CUDA build. With a CPU-only torch its import fails with
``operator torchvision::nms does not exist`` because its compiled ops never register. Declaring
the two op schemas it looks up at import time is enough for models and transforms.v2, which do
not call them. The shim runs only when torch has no CUDA and the schemas are missing, so a
matching torch/torchvision pair is never touched.
"""

from __future__ import annotations

import importlib.util
from functools import cache

import torch

_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_shim_library = None  # keeps the Library alive: dropping it would unregister the schemas


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def ensure_torchvision_importable() -> None:
    """Define torchvision's op schemas when a CUDA torchvision meets a CPU-only torch."""
    global _shim_library
    if torch.version.cuda is not None or _shim_library is not None:
        return
    missing = [name for name in _TORCHVISION_SCHEMAS if not _has_op(name)]
    if not missing:
        return
    _shim_library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _shim_library.define(_TORCHVISION_SCHEMAS[name])


@cache
def module_available(name: str) -> bool:
    """True when `name` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def apex_available() -> bool:
    """NVIDIA apex (never the unrelated registry package `apex`): has apex.optimizers."""
    return module_available("apex") and module_available("apex.optimizers")
