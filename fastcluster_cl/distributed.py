"""Collectives for training across ranks with torch.distributed (launched by torchrun).

Without an initialised process group every helper behaves as a world of one rank (identity
gathers and reductions), so the same code runs in a single process.

Row order of gathered two-view tensors: a rank holds its rows of view a then of view b,
x = [x_a; x_b] (2n rows); `gather_views` returns [x_a of rank 0..W-1; x_b of rank 0..W-1], so the
positive of global row i stays i +- N with N = W*n, exactly as for one process fed the
concatenated batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0: the one that logs and writes checkpoints."""
    return rank() == 0


def check_equal_rows(name: str, rows: int, device: torch.device) -> None:
    """Raise unless every rank passes the same number of rows (one tiny all-gather).

    The distributed losses need equal local batches: the mean over ranks of per-rank means is the
    global mean only then (use DistributedSampler(drop_last=True) or drop the last batch)."""
    if world_size() == 1:
        return
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    counts = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(counts, mine)
    counts = [int(c) for c in counts]
    if len(set(counts)) != 1:
        raise ValueError(f"{name} must have the same number of rows on every rank for "
                         f"gather_distributed=True, got {counts} (rank order); drop the last "
                         "incomplete batch (DistributedSampler(drop_last=True))")


def gather_views(x: torch.Tensor) -> torch.Tensor:
    """All-gather a local [x_a; x_b] (2n, ...) into the global [x_a of all ranks; x_b of all
    ranks] (2Wn, ...). Not differentiable: callers compute their backward analytically."""
    w = world_size()
    if w == 1:
        return x
    if x.shape[0] % 2:
        raise ValueError(f"gather_views takes [x_a; x_b] with an even row count, got {x.shape[0]}")
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(w)]
    dist.all_gather(parts, x)
    half = x.shape[0] // 2
    return torch.cat([p[:half] for p in parts] + [p[half:] for p in parts])


def gather_rows_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather (n, ...) into (Wn, ...) in rank order, differentiably: the backward sums each
    rank's gradient for the gathered rows and hands every rank the part for its own rows."""
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x.contiguous()))


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks. Differentiable when x requires grad (the backward all-reduces the
    incoming gradient), so a loss computed identically on every rank from global statistics
    gives each rank world_size times its share of the single-process gradient."""
    if world_size() == 1:
        return x
    if x.requires_grad:
        from torch.distributed.nn.functional import all_reduce
        return all_reduce(x)
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x)
    return x
