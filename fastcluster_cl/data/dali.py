"""NVIDIA DALI two-view augmentation pipeline (the `[dali]` extra)."""
from __future__ import annotations


def dali_unavailable_reason() -> str | None:
    """None when the DALI backend can be used, else why not."""
    return "the DALI backend is not implemented yet"
