"""Benchmark runner behind ``fastcluster-cl bench`` (also ``python -m fastcluster_cl.bench``).

For each case (loss op, 2N, D, K, dtype, forward or forward+backward) it times every
implementation on the same random inputs: the library's backends (torch, chunked, triton, cuda)
through the public API, and the peers users would otherwise run: the plain torch reference under
torch.compile, lightly's NTXentLoss and pytorch-metric-learning's NTXentLoss (NT-Xent only).
It writes a results JSON (device, versions, date, shapes, dtype, times, floors, peak memory) and a
PNG of time and memory against 2N, and prints a markdown table of the median time, the ratio to
the torch reference of the same case, the achieved TFLOP/s and GB/s at the FLOP/byte floor, the
fraction of the measured matrix-product ceiling of the same dtype (`matmul_ceiling`), and the
peak memory. The pytest-benchmark suites in ``benchmarks/`` reuse the pieces defined here
(cases, inputs, implementations, floors, peak memory) so both measure the same thing.

Timing: CUDA uses ``triton.testing.do_bench`` (CUDA events, median); CPU uses
``torch.utils.benchmark.Timer.blocked_autorange`` (median, all torch threads). Inputs rotate
over a few random sets (never zeros) so no call reuses the previous call's cache. The
data-dependent value checks of the public API (one device sync each) are off while timing, as
in a training loop that turns them off.

Peak memory (`peak_memory`): bytes allocated by one call above what was live before it. On CUDA
from ``torch.cuda.max_memory_allocated``; on CPU from the allocation/free events that
``torch.profiler`` records with ``profile_memory=True`` (every CPU tensor allocation through
c10's allocator), replayed in time order to find the running maximum. This is tensor memory,
not process RSS, so it compares backends exactly and is not blurred by the allocator's caching.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache, partial
from pathlib import Path

import torch

from .. import functional
from ..backends.dispatch import implementation
from ..validation import value_checks

BACKENDS = ("torch", "chunked", "triton", "cuda")
GPU_ONLY = ("triton", "cuda")
# The whole objectives through a GPU backend's separate ops instead of its one-pass kernels.
SEPARATE = ("triton-separate", "cuda-separate")
PEERS = ("torch-compile", "lightly", "lightly-compile", "pml")
OURS = "auto"  # the library as users call it: backend="auto"
IMPLS = (OURS,) + BACKENDS + SEPARATE + PEERS
REFERENCE = "torch"
OBJECTIVES = ("anchor_objective", "cc_objective")
OPS = (
    "nt_xent",
    "cc_cluster_loss",
    "student_t",
    "dec_loss",
    "anchor_loss",
    *OBJECTIVES,
)
MODES = ("fwd", "fwd+bwd")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
ROTATE = 3  # input sets cycled through while timing
ROUNDS = 5  # turns the implementations of a case take on the CPU (`measure_interleaved`)
TEMPERATURE = 0.5


class Skip(Exception):
    """An implementation that cannot run a case here; the message says why."""


@dataclass(frozen=True)
class Case:
    """One benchmark shape. two_n: rows of Z = [z_a; z_b] (each view has N = two_n // 2 rows);
    dim: projection/feature width D; k: clusters K; backward: forward+backward when True;
    features: the anchor objective's backbone width F (0: F = D)."""

    op: str
    two_n: int
    dim: int
    k: int
    dtype: str
    backward: bool
    features: int = 0

    @property
    def n(self) -> int:
        return self.two_n // 2

    @property
    def f(self) -> int:
        return self.features or self.dim

    @property
    def mode(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def label(self) -> str:
        """Short id with only the sizes this op depends on (e.g. nt_xent-2N1024-D128-float32)."""
        sizes = [f"2N{self.two_n}"]
        if "D" in _USES[self.op]:
            sizes.append(f"D{self.dim}")
        if self.features:
            sizes.append(f"F{self.features}")
        if "K" in _USES[self.op]:
            sizes.append(f"K{self.k}")
        return "-".join([self.op, *sizes, self.dtype, self.mode])


# Which of D and K each op's inputs depend on (the others are not varied for it).
_USES = {
    "nt_xent": "D",
    "cc_cluster_loss": "K",
    "student_t": "DK",
    "dec_loss": "K",
    "anchor_loss": "K",
    "anchor_objective": "DK",
    "cc_objective": "DK",
}


def cases(
    ops: Sequence[str],
    sizes: Sequence[int],
    dims: Sequence[int],
    ks: Sequence[int],
    dtypes: Sequence[str],
    modes: Sequence[str] = MODES,
    features: Sequence[int] = (0,),
) -> list[Case]:
    """The cross product, without repeating an op over a size it does not depend on (the
    features F only for the anchor objective)."""
    out = []
    for op in ops:
        op_dims = dims if "D" in _USES[op] else dims[:1]
        op_ks = ks if "K" in _USES[op] else ks[:1]
        op_fs = features if op == "anchor_objective" else (0,)
        grid = itertools.product(sizes, op_dims, op_ks, dtypes, modes, op_fs)
        for two_n, dim, k, dtype, mode, f in grid:
            out.append(Case(op, two_n, dim, k, dtype, mode == "fwd+bwd", f))
    return out


def make_inputs(case: Case, device: torch.device | str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random leaf inputs of `case` (requires_grad for forward+backward), never zeros.

    nt_xent: z_a, z_b (N, D). cc_cluster_loss: logits (N, K). student_t: h (N, D),
    centers (K, D). dec_loss: q (N, K). anchor_loss: q0, q_a, q_b (N, K) probabilities.
    anchor_objective: z_a, z_b (N, D), h0, h_a, h_b (N, F), centers (K, F), float32 under
    16-bit inputs (autocast's parameter). cc_objective: z_a, z_b (N, D), logits_a, logits_b
    (N, K)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    n, d, k = case.n, case.dim, case.k

    def randn(rows, cols):
        return torch.randn(rows, cols, generator=gen)

    def probs(rows, cols):
        return torch.softmax(2.0 * randn(rows, cols), dim=1)

    shapes = {
        "nt_xent": lambda: (randn(n, d), randn(n, d)),
        "cc_cluster_loss": lambda: (randn(n, k), randn(n, k)),
        "student_t": lambda: (randn(n, d), randn(k, d)),
        "dec_loss": lambda: (probs(n, k),),
        "anchor_loss": lambda: (probs(n, k), probs(n, k), probs(n, k)),
        "anchor_objective": lambda: (
            *(randn(n, d) for _ in range(2)),
            *(randn(n, case.f) for _ in range(3)),
            randn(k, case.f),
        ),
        "cc_objective": lambda: (randn(n, d), randn(n, d), randn(n, k), randn(n, k)),
    }
    if case.op not in shapes:
        raise ValueError(f"op must be one of {OPS}, got {case.op!r}")
    tensors = [t.to(device=device, dtype=dtype) for t in shapes[case.op]()]
    if case.op == "anchor_objective" and dtype.itemsize == 2:
        tensors[-1] = tensors[-1].float()  # the centers: an fp32 parameter under autocast
    # anchor_loss detaches its anchor q0: only the two views get gradients
    differentiable = tensors[1:] if case.op == "anchor_loss" else tensors
    for t in differentiable:
        t.requires_grad_(case.backward)
    return tuple(tensors)


def floor(case: Case) -> dict[str, float]:
    """FLOP, exp and byte floors of one call (docs/design.md, "Performance method").

    NT-Xent forward: 2*(2N)^2*D FLOPs (the Z Z^T GEMM) and (2N)^2 exps; the other ops count
    their GEMM-like products the same way and their elementwise work once per element. The
    backward costs about twice the forward FLOPs, so forward+backward is 3x. Bytes: reading
    every input once (plus writing an (N, K) output for student_t), and for the backward
    writing each input's gradient."""
    if case.op in _PARTS:  # a whole objective: the sum of its parts
        parts = [
            floor(
                Case(
                    op,
                    case.two_n,
                    case.f if op == "student_t" else case.dim,
                    case.k,
                    case.dtype,
                    case.backward,
                )
            )
            for op in _PARTS[case.op]
        ]
        return {key: sum(part[key] for part in parts) for key in parts[0]}
    n, d, k, two_n = case.n, case.dim, case.k, case.two_n
    size = DTYPES[case.dtype].itemsize
    flops, exps, elements = {
        "nt_xent": (2 * two_n**2 * d, two_n**2, 2 * n * d),
        # softmax of both views, then NT-Xent over the 2K columns (length N)
        "cc_cluster_loss": (2 * (2 * k) ** 2 * n + 4 * n * k, (2 * k) ** 2 + 2 * n * k, 2 * n * k),
        # ||h||^2 + ||mu||^2 - 2 h mu^T, kernel and row normalisation
        "student_t": (2 * n * k * d + 6 * n * k, 2 * n * k, n * d + k * d),
        "dec_loss": (8 * n * k, n * k, n * k),
        "anchor_loss": (8 * n * k, 2 * n * k, 3 * n * k),
    }[case.op]
    nbytes = elements * size + (n * k * 4 if case.op == "student_t" else 0)
    if case.backward:
        grad_elements = 2 * n * k if case.op == "anchor_loss" else elements
        flops, exps, nbytes = 3 * flops, 2 * exps, nbytes + grad_elements * size
    return {"flops": float(flops), "exps": float(exps), "bytes": float(nbytes)}


# The separate ops each whole objective is made of (for its floors).
_PARTS = {
    "anchor_objective": (
        "nt_xent",
        "student_t",
        "student_t",
        "student_t",
        "dec_loss",
        "anchor_loss",
    ),
    "cc_objective": ("nt_xent", "cc_cluster_loss"),
}


def _peer_nt_xent(impl: str, device: torch.device) -> Callable:
    if impl in ("lightly", "lightly-compile"):
        try:
            from lightly.loss import NTXentLoss
        except ImportError as err:
            raise Skip(
                f"lightly is not installed ({err}); pip install 'fastcluster_cl[bench]'"
            ) from None
        loss = NTXentLoss(temperature=TEMPERATURE).to(device)
        return torch.compile(loss) if impl == "lightly-compile" else loss
    try:
        from pytorch_metric_learning.losses import NTXentLoss
    except ImportError as err:
        raise Skip(
            f"pytorch-metric-learning is not installed ({err}); pip install 'fastcluster_cl[bench]'"
        ) from None
    loss = NTXentLoss(temperature=TEMPERATURE)

    def pml(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        # pml's convention: one embedding batch, equal labels mark the positive pairs.
        labels = torch.arange(z_a.shape[0], device=z_a.device).repeat(2)
        return loss(torch.cat([z_a, z_b]), labels)

    return pml


def pml_memory_bytes(two_n: int) -> int:
    """pytorch-metric-learning's NTXentLoss builds a (positive pairs) x (negative pairs) mask,
    (2N) x (2N)^2 entries: about 16 * (2N)^3 bytes at its peak (measured: 32 MiB at 2N = 128,
    256 MiB at 2N = 256), so it is only run where that fits."""
    return 16 * two_n**3


def memory_budget(device: torch.device) -> int:
    """Bytes a peer may take: 1 GiB on CPU (a shared machine), half the free memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return 2**30


def _op_args(op: str) -> dict:
    if op in OBJECTIVES:
        return {"instance_temperature": TEMPERATURE}
    return {"nt_xent": {"temperature": TEMPERATURE}}.get(op, {})


def _public(op: str) -> Callable:
    """The public function of `op`; for a whole objective, one returning its total."""
    fn = getattr(functional, op)
    if op not in OBJECTIVES:
        return fn
    return lambda *args, **kwargs: fn(*args, **kwargs).total


@cache
def _compiled_reference(op: str) -> Callable:
    """The torch reference of `op` under torch.compile, one per op so shapes share its cache."""
    return torch.compile(partial(_public(op), backend="torch", **_op_args(op)))


def resolve_impl(impl: str, op: str, device: torch.device) -> Callable:
    """A callable computing `op` with implementation `impl` on `device`; raises Skip when that
    cannot run here (GPU-only backend on CPU, backend refused by dispatch, peer not installed,
    peer without that op)."""
    device = torch.device(device)
    fn = _public(op)
    if impl in SEPARATE:
        if op not in OBJECTIVES:
            raise Skip(f"{impl} times the whole objectives only ({', '.join(OBJECTIVES)})")
        backend = impl.split("-")[0]
        return partial(resolve_impl(backend, op, device), fused=False)
    if impl == OURS:
        return partial(fn, backend="auto", **_op_args(op))
    if impl in BACKENDS:
        if impl in GPU_ONLY and device.type != "cuda":
            why = " (the Triton interpreter is a correctness tool, not a timing)"
            raise Skip(
                f"{impl} is GPU-only; not timed on {device.type}"
                + (why if impl == "triton" else "")
            )
        try:  # a whole objective runs wherever the backend loads (separate ops if need be)
            implementation("nt_xent" if op in OBJECTIVES else op, impl, device)
        except (RuntimeError, NotImplementedError) as err:
            raise Skip(str(err)) from None
        return partial(fn, backend=impl, **_op_args(op))
    if impl == "torch-compile":
        return _compiled_reference(op)
    if impl in ("lightly", "lightly-compile", "pml"):
        if op != "nt_xent":
            raise Skip(f"{impl} has no {op}")
        return _peer_nt_xent(impl, device)
    raise ValueError(f"implementation must be one of {IMPLS}, got {impl!r}")


def make_step(
    fn: Callable, input_sets: Sequence[tuple[torch.Tensor, ...]], backward: bool
) -> Callable[[], object]:
    """A no-argument call of `fn` cycling over `input_sets`; with `backward`, also the
    gradients of the inputs that require them (torch.autograd.grad, so nothing accumulates
    between calls). A non-scalar output (student_t's q) is back-propagated with a fixed random
    cotangent: its rows sum to 1, so a cotangent of ones would give zero gradients."""
    cycle = itertools.cycle(input_sets)
    cotangent: dict[tuple, torch.Tensor] = {}

    def forward():
        return fn(*next(cycle))

    def forward_backward():
        inputs = next(cycle)
        out = fn(*inputs)
        if out.dim() and out.shape not in cotangent:
            gen = torch.Generator().manual_seed(0)
            cotangent[out.shape] = torch.randn(out.shape, generator=gen).to(out)
        return torch.autograd.grad(
            out, [t for t in inputs if t.requires_grad], cotangent.get(out.shape)
        )

    return forward_backward if backward else forward


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def time_call(
    step: Callable[[], object], device: torch.device, min_run_time: float, clock: str = "wall"
) -> float:
    """Median seconds per call of `step` (`time_spread` also gives the spread)."""
    return time_spread(step, device, min_run_time, clock)[0]


def time_spread(
    step: Callable[[], object], device: torch.device, min_run_time: float, clock: str = "wall"
) -> tuple[float, float]:
    """(median, interquartile range) of seconds per call of `step` (warm-up included in both
    timers; CUDA reports no IQR: 0). On CPU, `clock`
    "process" counts this process's CPU seconds (all its threads) instead of wall time: with
    one thread on a shared, loaded machine that is the uncontended time, which wall time is
    not. CUDA always uses CUDA events."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(
            step,
            warmup=max(1, int(min_run_time * 250)),
            rep=max(1, int(min_run_time * 1000)),
            return_mode="median",
        ) / 1e3, 0.0
    from torch.utils.benchmark import Timer

    step()
    timer = Timer(
        stmt="step()",
        globals={"step": step},
        num_threads=torch.get_num_threads(),
        timer=CLOCKS[clock],
    )
    measured = timer.blocked_autorange(min_run_time=min_run_time)
    return measured.median, measured.iqr


def peak_memory(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of `step` above those live before it (see module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()  # negative for frees
        peak = max(peak, live)
    return peak


# Square matrix product used to measure the ceiling: large enough to fill an H100/H200.
CEILING_SIZE = {"cpu": 1024, "cuda": 8192}


def matmul_ceiling(
    dtype: str, device: torch.device, min_run_time: float, clock: str = "wall"
) -> float:
    """Measured TFLOP/s of an n^3 matrix product (n = CEILING_SIZE) in `dtype` on random
    inputs: the ceiling the loss kernels' dot products run against (float32 follows torch's TF32
    setting, as the losses do)."""
    device = torch.device(device)
    n = CEILING_SIZE[device.type]
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, DTYPES[dtype]) for _ in range(2))
    seconds = time_call(lambda: a @ b, device, min_run_time, clock)
    return 2 * n**3 / seconds / 1e12


def prepare(
    case: Case, impl: str, device: torch.device, input_sets: Sequence[tuple[torch.Tensor, ...]]
) -> Callable[[], object]:
    """The step of `impl` on `case`, called once (torch.compile and Triton compile there, and
    errors surface). Raises Skip."""
    fn = resolve_impl(impl, case.op, device)
    if impl == "pml" and pml_memory_bytes(case.two_n) > memory_budget(device):
        raise Skip(
            f"pytorch-metric-learning's NTXentLoss needs about "
            f"{pml_memory_bytes(case.two_n) / 2**30:.0f} GiB at 2N = {case.two_n} "
            "(cubic mask); over the memory budget"
        )
    step = make_step(fn, input_sets, case.backward)
    with value_checks(False), _out_of_memory_skips():
        step()
    return step


@contextlib.contextmanager
def _out_of_memory_skips():
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise Skip(f"out of memory: {str(err).splitlines()[0]}") from None


def _row(case: Case, impl: str, seconds: float, iqr: float, peak: int, rounds: list) -> dict:
    fl = floor(case)
    return {
        **asdict(case),
        "case": case.label,
        "mode": case.mode,
        "impl": impl,
        "median_s": seconds,
        "iqr_s": iqr,
        "round_s": rounds,
        "threads": torch.get_num_threads(),
        "peak_bytes": int(peak),
        **fl,
        "tflops": fl["flops"] / seconds / 1e12,
        "gbps": fl["bytes"] / seconds / 1e9,
    }


def measure(
    case: Case,
    impl: str,
    device: torch.device,
    min_run_time: float,
    input_sets: Sequence[tuple[torch.Tensor, ...]] | None = None,
    clock: str = "wall",
) -> dict:
    """Time and peak memory of `impl` on `case` alone, with its floors. Raises Skip."""
    if input_sets is None:
        input_sets = [make_inputs(case, device, seed) for seed in range(ROTATE)]
    rows, skipped = measure_interleaved(case, [impl], device, min_run_time, input_sets, clock)
    if not rows:
        raise Skip(skipped[0][1])
    return rows[0]


def measure_interleaved(
    case: Case,
    impls: Sequence[str],
    device: torch.device,
    min_run_time: float,
    input_sets: Sequence[tuple[torch.Tensor, ...]],
    clock: str = "wall",
) -> tuple[list[dict], list[tuple[str, str]]]:
    """(rows, skipped (impl, reason)) of the implementations of one case, timed in `ROUNDS`
    rounds that take turns (each round in a rotated order, min_run_time / ROUNDS each), so
    that a shared machine's load drift falls on all of them alike. A row's median_s is the
    median of its round medians, iqr_s their interquartile range; round_s keeps them, for
    ratios taken round by round (`peers_table`). CUDA times one round (do_bench)."""
    steps, skipped = {}, []
    for impl in impls:
        try:
            steps[impl] = prepare(case, impl, device, input_sets)
        except Skip as why:
            skipped.append((impl, str(why)))
    rounds = 1 if device.type == "cuda" else ROUNDS
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    for r in range(rounds):
        names = list(steps)
        for impl in names[r % len(names) :] + names[: r % len(names)] if names else []:
            try:
                with value_checks(False), _out_of_memory_skips():
                    seconds = time_spread(steps[impl], device, min_run_time / rounds, clock)[0]
            except Skip as why:
                skipped.append((impl, str(why)))
                del steps[impl]
                continue
            times[impl].append(seconds)
    rows = []
    for impl, step in steps.items():
        try:
            with value_checks(False), _out_of_memory_skips():
                peak = peak_memory(step, device)
        except Skip as why:
            skipped.append((impl, str(why)))
            continue
        low, _, high = (
            statistics.quantiles(times[impl], n=4, method="inclusive")
            if rounds > 1
            else (0.0, 0.0, 0.0)
        )
        rows.append(_row(case, impl, statistics.median(times[impl]), high - low, peak, times[impl]))
    return rows, skipped


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(device: torch.device) -> dict:
    """Device name, CPU model, thread count and library versions, for the results file."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return {
        "device": str(device),
        "device_name": name,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{
            dist: _version(dist)
            for dist in ("triton", "lightly", "pytorch-metric-learning", "fastcluster_cl")
        },
    }


def run_cases(
    case_list: Sequence[Case],
    impls: Sequence[str],
    device: torch.device,
    min_run_time: float,
    progress: Callable[[str], None] = lambda _msg: None,
    clock: str = "wall",
) -> dict:
    """Measure every (case, impl); add each row's ratio to the reference of the same case and
    its fraction of the measured matrix-product ceiling of its dtype."""
    ceilings = {
        dtype: matmul_ceiling(dtype, device, min_run_time, clock)
        for dtype in dict.fromkeys(case.dtype for case in case_list)
    }
    progress("matmul ceiling TFLOP/s: " + ", ".join(f"{d} {v:.3g}" for d, v in ceilings.items()))
    results, skipped = [], []
    for case in case_list:
        input_sets = [make_inputs(case, device, seed) for seed in range(ROTATE)]
        rows, refused = measure_interleaved(case, impls, device, min_run_time, input_sets, clock)
        for row in rows:
            progress(f"{case.label} {row['impl']}: {row['median_s'] * 1e3:.3f} ms")
        skipped += [{"case": case.label, "impl": impl, "reason": why} for impl, why in refused]
        ref = next((r["median_s"] for r in rows if r["impl"] == REFERENCE), None)
        for row in rows:
            row["ratio"] = row["median_s"] / ref if ref else None
            row["ceiling_fraction"] = row["tflops"] / ceilings[case.dtype]
        results.extend(rows)
        del input_sets
    return {"matmul_ceiling_tflops": ceilings, "results": results, "skipped": skipped}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def table(results: Sequence[dict]) -> str:
    """Markdown table: one row per (case, implementation)."""
    lines = [
        "| case | impl | median ms | x torch | TFLOP/s | % matmul ceiling | GB/s at floor "
        "| peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['case']} | {r['impl']} | {_fmt(r['median_s'] * 1e3, '.3f')} | "
            f"{_fmt(r['ratio'], '.2f')} | {_fmt(r['tflops'], '.3g')} | "
            f"{_fmt(100 * r['ceiling_fraction'], '.3g')} | "
            f"{_fmt(r['gbps'], '.3g')} | {_fmt(r['peak_bytes'] / 2**20, '.3g')} |"
        )
    return "\n".join(lines)


def summary_table(results: Sequence[dict]) -> str:
    """Compact markdown table for a README: one row per case, one column per implementation
    holding "median ms (x torch), peak MiB"."""
    impls = list(dict.fromkeys(r["impl"] for r in results))
    several = len({r.get("threads") for r in results}) > 1
    rows: dict[str, dict[str, dict]] = {}
    for r in results:
        label = f"{r['case']} ({r['threads']} threads)" if several else r["case"]
        rows.setdefault(label, {})[r["impl"]] = r
    lines = ["| case | " + " | ".join(impls) + " |", "|---|" + "---:|" * len(impls)]
    for case, by_impl in rows.items():
        cells = [
            f"{by_impl[i]['median_s'] * 1e3:.3g} ms ({_fmt(by_impl[i]['ratio'], '.2f')}x), "
            f"{by_impl[i]['peak_bytes'] / 2**20:.3g} MiB"
            if i in by_impl
            else "-"
            for i in impls
        ]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio_and_verdict(ours: dict, best: dict) -> tuple[float, str]:
    """ours / best and whether that is ahead, behind or within noise. With round times
    (`measure_interleaved`), the ratio is the median of the round-by-round ratios and the
    verdict says whether their interquartile range lies below 1, above 1 or spans it; else
    (older results) the ratio's distance from 1 against both rows' relative IQRs."""
    if len(ours.get("round_s") or ()) > 1 and len(ours["round_s"]) == len(
        best.get("round_s") or ()
    ):
        ratios = [a / b for a, b in zip(ours["round_s"], best["round_s"])]
        low, ratio, high = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        ratio = ours["median_s"] / best["median_s"]
        noise = ours.get("iqr_s", 0) / ours["median_s"] + best.get("iqr_s", 0) / best["median_s"]
        low, high = ratio - noise, ratio + noise
    return ratio, "ahead" if high < 1 else "behind" if low > 1 else "within noise"


def peers_table(results: Sequence[dict]) -> str:
    """Markdown table of ours (backend="auto") against the fastest peer of each case and
    thread count, with peak memory against the torch reference (`_ratio_and_verdict` says how
    noise is judged)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in results:
        groups.setdefault((r["case"], r.get("threads")), {})[r["impl"]] = r
    lines = [
        "| case | threads | ours (auto) ms | fastest peer | its ms | ours / fastest | "
        "verdict | ours MiB | torch MiB |",
        "|---|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    for (case, threads), by_impl in groups.items():
        ours = by_impl.get(OURS)
        peers = [by_impl[p] for p in ("torch",) + PEERS if p in by_impl]
        if ours is None or not peers:
            continue
        best = min(peers, key=lambda r: r["median_s"])
        ratio, verdict = _ratio_and_verdict(ours, best)
        torch_mib = by_impl["torch"]["peak_bytes"] / 2**20 if "torch" in by_impl else None
        lines.append(
            f"| {case} | {threads} | {ours['median_s'] * 1e3:.3g} | "
            f"{best['impl']} | {best['median_s'] * 1e3:.3g} | {ratio:.2f} | "
            f"{verdict} | {ours['peak_bytes'] / 2**20:.3g} | "
            f"{_fmt(torch_mib, '.3g')} |"
        )
    return "\n".join(lines)


def skipped_summary(skipped: Sequence[dict]) -> str:
    """One line per (implementation, reason) with the number of cases it covers."""
    groups: dict[tuple[str, str], list[str]] = {}
    for skip in skipped:
        groups.setdefault((skip["impl"], skip["reason"]), []).append(skip["case"])
    return "\n".join(
        f"skipped {impl} on {len(names)} case(s), e.g. {names[0]}: {reason}"
        for (impl, reason), names in groups.items()
    )


def plot(results: Sequence[dict], path: Path) -> Path | None:
    """PNG of median time and peak memory against 2N, one line per implementation, one row per
    (op, D, K, dtype, mode, F) series; None when no series has two sizes to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, dict[str, list[dict]]] = {}
    for r in results:
        key = (r["op"], r["dim"], r["k"], r["dtype"], r["mode"], r.get("features", 0))
        series.setdefault(key, {}).setdefault(r["impl"], []).append(r)
    series = {
        key: impls for key, impls in series.items() if any(len(rows) > 1 for rows in impls.values())
    }
    if not series:
        return None
    fig, axes = plt.subplots(len(series), 2, figsize=(11, 3.2 * len(series)), squeeze=False)
    for (key, impls), (ax_t, ax_m) in zip(series.items(), axes):
        op, dim, k, dtype, mode, features = key
        title = Case(op, 2, dim, k, dtype, mode == "fwd+bwd", features).label.replace("-2N2", "")
        for impl, rows in impls.items():
            rows = sorted(rows, key=lambda r: r["two_n"])
            xs = [r["two_n"] for r in rows]
            ax_t.plot(xs, [r["median_s"] * 1e3 for r in rows], marker="o", label=impl)
            ax_m.plot(xs, [max(r["peak_bytes"], 1) / 2**20 for r in rows], marker="o", label=impl)
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak memory (MiB)")):
            ax.set(xscale="log", yscale="log", xlabel="2N (rows of Z)", ylabel=ylabel, title=title)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110 if len(series) <= 4 else 72)  # many rows: keep the file small
    plt.close(fig)
    return path


def _ints_from(minimum: int) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers, got {text!r}"
            ) from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
        return values

    return parse


_ints = _ints_from(2)  # sizes, widths, cluster counts


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}; got {text!r}")
        return values

    return parse


# Defaults: the CPU run takes about a minute; the GPU run covers the sizes the kernels target.
DEFAULT_SIZES = {"cpu": [256, 512, 1024, 2048], "cuda": [1024, 4096, 16384, 65536]}
QUICK_SIZES = [64, 128]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the runner's options to `parser` (the `fastcluster-cl bench` subparser)."""
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--ops",
        type=_choices(OPS),
        default=["nt_xent"],
        help=f"comma-separated ops from {','.join(OPS)} (default nt_xent)",
    )
    parser.add_argument(
        "--sizes",
        type=_ints,
        default=None,
        help="comma-separated 2N (rows of Z = both views); default "
        f"{DEFAULT_SIZES['cpu']} on cpu, {DEFAULT_SIZES['cuda']} on cuda",
    )
    parser.add_argument("--dims", type=_ints, default=[128], help="projection widths D")
    parser.add_argument("--ks", type=_ints, default=[10], help="cluster counts K")
    parser.add_argument(
        "--features",
        type=_ints,
        default=[0],
        help="the anchor objective's backbone widths F (default: F = D)",
    )
    parser.add_argument(
        "--dtype",
        type=_choices(tuple(DTYPES)),
        default=["float32"],
        help="comma-separated dtypes (default float32)",
    )
    parser.add_argument("--modes", type=_choices(MODES), default=list(MODES))
    parser.add_argument(
        "--backends",
        type=_choices(IMPLS),
        default=None,
        help=f"implementations from {','.join(IMPLS)} (default all; with --quick, torch,chunked)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        help="folder for the results JSON and PNG (created)",
    )
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds of timing per measurement (default 0.2, --quick 0.02)",
    )
    parser.add_argument(
        "--threads",
        type=_ints_from(1),
        default=None,
        help="comma-separated CPU thread counts for torch, each a full run "
        "(default: torch's own setting)",
    )
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="CPU timer: wall time, or this process's CPU time (for a loaded "
        "shared machine, with --threads 1)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 2N in {QUICK_SIZES}, torch and chunked, short timing",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed `args`; write JSON + PNG, print the table."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device")
        return 2
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES[device.type])
    impls = args.backends or (["torch", "chunked"] if args.quick else list(IMPLS))
    min_run_time = args.min_run_time or (0.02 if args.quick else 0.2)
    case_list = cases(args.ops, sizes, args.dims, args.ks, args.dtype, args.modes, args.features)
    stamp = _dt.datetime.now(_dt.timezone.utc)
    info = machine(device)  # before the run: the load average is that of other processes
    clock = "cuda events" if device.type == "cuda" else args.clock
    measured = {"results": [], "skipped": []}
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        part = run_cases(
            case_list,
            impls,
            device,
            min_run_time,
            progress=lambda msg, t=threads: print(f"[{t} threads] {msg}", flush=True),
            clock=args.clock,
        )
        measured["matmul_ceiling_tflops"] = part["matmul_ceiling_tflops"]
        measured["results"] += part["results"]
        measured["skipped"] += part["skipped"]
    report = {
        "meta": {
            **info,
            "date": stamp.isoformat(timespec="seconds"),
            "min_run_time_s": min_run_time,
            "rotated_input_sets": ROTATE,
            "clock": clock,
            "peak_memory_method": "cuda.max_memory_allocated"
            if device.type == "cuda"
            else "torch.profiler profile_memory events",
        },
        **measured,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info["device_name"]).strip("-").lower()
    base = args.out / f"{stamp:%Y%m%dT%H%M%S}-{device.type}-{slug}"
    json_path = base.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    png = plot(measured["results"], base.with_suffix(".png"))
    print(
        f"\n{info['device_name']} ({device}, {info['torch_threads']} threads, {clock} "
        f"clock), torch {info['torch']}, {report['meta']['date']}; matmul ceiling "
        + ", ".join(f"{d} {v:.3g} TFLOP/s" for d, v in measured["matmul_ceiling_tflops"].items())
        + "\n"
    )
    print(table(measured["results"]))
    print("\n" + summary_table(measured["results"]) + "\n")
    if any(r["impl"] == OURS for r in measured["results"]):
        print(peers_table(measured["results"]) + "\n")
    print(skipped_summary(measured["skipped"]))
    print(f"\nwrote {json_path}" + (f" and {png}" if png else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`static [...]` runs the static sm_90 report (`static_report`), `model [...]` the cost
    model (`paths`); anything else the timing runner."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["static"]:
        from . import static_report

        return static_report.main(argv[1:])
    if argv[:1] == ["model"]:
        from . import paths

        return paths.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="fastcluster-cl bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return run(add_arguments(parser).parse_args(argv))
