"""Collectives for training across ranks with torch.distributed (launched by torchrun).

Without an initialised process group every helper behaves as a world of one rank (identity
gathers and reductions), so the same code runs in a single process.

Row order of gathered two-view tensors: a rank holds its rows of view a then of view b,
x = [x_a; x_b] (2n rows); `gather_views` returns [x_a of rank 0..W-1; x_b of rank 0..W-1], so the
positive of global row i stays i +- N with N = W*n, exactly as for one process fed the
concatenated batch.
"""

from __future__ import annotations

import gc
import os

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
    """Raise unless every rank passes the same number of rows (one tiny all-gather, read on the
    host: so on a GPU only with `validation.set_value_checks(True)`, like the other checks that
    read data; every rank takes the same decision).

    The distributed losses need equal local batches: the mean over ranks of per-rank means is the
    global mean only then (use DistributedSampler(drop_last=True) or drop the last batch)."""
    from .validation import value_checks_active

    if world_size() == 1 or not value_checks_active([device]):
        return
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    counts = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(counts, mine)
    counts = [int(c) for c in counts]
    if len(set(counts)) != 1:
        raise ValueError(
            f"{name} must have the same number of rows on every rank for "
            f"gather_distributed=True, got {counts} (rank order); drop the last "
            "incomplete batch (DistributedSampler(drop_last=True))"
        )


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


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All-gather (n, ...) into (Wn, ...) in rank order, not differentiable (the memory bank's
    update: lightly's concat_all_gather)."""
    w = world_size()
    if w == 1:
        return x
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(w)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the incoming gradients over ranks as well."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad)


class _GatherRows(torch.autograd.Function):
    """All-gather in rank order; the backward sums every rank's gradient for the gathered
    rows (one all-reduce, as gloo has no reduce-scatter) and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_rows_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather (n, ...) into (Wn, ...) in rank order, differentiably: a rank's input gets
    the sum over ranks of the gradients for its rows."""
    return x if world_size() == 1 else _GatherRows.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks. Differentiable: the backward all-reduces the incoming gradient, so a
    loss computed identically on every rank from global statistics gives each rank world_size
    times its share of the single-process gradient."""
    return x if world_size() == 1 else _AllReduceSum.apply(x)


# ---- training under torchrun ----


def launched_by_torchrun() -> bool:
    """torchrun (and torch.distributed.launch) export WORLD_SIZE, RANK, LOCAL_RANK."""
    return all(key in os.environ for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def setup(device: str | torch.device | None = None) -> torch.device:
    """Initialise the default process group from torchrun's environment and pick this rank's
    device; without torchrun, return `device` (default: cuda if available, else cpu).

    Under torchrun the device is cuda:LOCAL_RANK with the NCCL backend when CUDA is available,
    else the CPU with gloo; passing a device of the other kind raises. Idempotent."""
    if not launched_by_torchrun():
        return torch.device(
            device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested under torchrun but CUDA is unavailable")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                "GPUs: pass --nproc_per_node <= the GPU count to torchrun"
            )
        local = torch.device("cuda", local_rank)
        torch.cuda.set_device(local)
    else:
        local = torch.device("cpu")
    if not is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            init_method="env://",
            device_id=local if use_cuda else None,
        )
    return local


def cleanup() -> None:
    """Destroy the default process group if one exists (end of training), after collecting what
    still holds it (a DDP model left in a cycle): gloo work freed later, during interpreter
    finalisation, can abort the process."""
    if is_initialized():
        gc.collect()
        dist.destroy_process_group()


def wrap_model(
    model: torch.nn.Module,
    device: torch.device,
    sync_batchnorm: bool = False,
    find_unused_parameters: bool = False,
) -> torch.nn.Module:
    """DistributedDataParallel over the ranks (the model unchanged with one rank).

    sync_batchnorm converts BatchNorm layers to SyncBatchNorm (statistics over the global batch;
    torch supports it on CUDA devices only). find_unused_parameters is for phases where part of
    the model gets no gradient (the anchor method's center warm-up)."""
    if world_size() == 1:
        return model
    if sync_batchnorm:
        if device.type != "cuda":
            raise ValueError(
                "sync_batchnorm needs CUDA devices (torch's SyncBatchNorm has no CPU "
                "kernel); drop --sync-bn for CPU runs"
            )
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (what checkpoints store, so they load on any world size)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def local_batch_size(global_batch: int, world: int | None = None) -> int:
    """Rows per rank for a global batch split evenly over `world` ranks (default: the process
    group's size); raises when it does not divide, as the distributed losses need equal local
    batches."""
    w = world_size() if world is None else world
    if global_batch % w:
        raise ValueError(
            f"batch size {global_batch} is the global batch and must be divisible "
            f"by the world size {w}"
        )
    return global_batch // w


@torch.no_grad()
def broadcast_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers into every rank's `module` (no-op alone)."""
    if world_size() == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_initialized():
        dist.barrier()
