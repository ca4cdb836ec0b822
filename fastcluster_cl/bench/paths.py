"""Predicted H100 SXM time of one forward plus backward of every path at the shapes users train
at, and the calibration against published measurements (`python -m fastcluster_cl.bench model
--json PATH`). The per-kernel model is `model.py`; here are the launches each path makes.

Paths: "triton" (NT-Xent's fused fast path: prologue, row-parallel forward, row-parallel
backward), and "eager": the torch reference as its own kernels, recorded by running it on meta
tensors under a dispatch mode: matrix products at a cuBLAS-class rate (`model.gemm_seconds`),
every other op that makes a kernel at HBM bandwidth over the bytes it reads and writes
(`model.memory_seconds`), each with a launch. Shapes a path cannot run are rows saying why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from . import model
from . import static_report as static

# The calibration: published H100 figures of kernels whose code we compile (`calibration.py`).
ATTENTION_SOURCE = (
    "pytorch/benchmark pull request 2296 (2024): triton_tutorial_flash_v2 on an H100, fp16, "
    "d = 128, non-causal forward, batch 128 x 8 heads (as the issue quoting it states)"
)
ATTENTION_PUBLISHED = {1024: 353.0, 2048: 385.0, 4096: 405.0, 8192: 413.0, 16384: 420.0}
ATTENTION_HEADS = 128 * 8
MATMUL_SOURCE = (
    "triton-lang/triton pull request 5726 (2025): 09-persistent-matmul.py's matmul_kernel on an "
    "H100, fp16, M = N = 8192, K = 512: 217.5 TFLOP/s (cuBLAS 285.4 in the same run)"
)
MATMUL_PUBLISHED = {(8192, 8192, 512): 217.548}


def mma_loop(count: int, tile_macs: int) -> model.Trips:
    """Trips of a kernel whose only loop is its MMA loop, one tile of `tile_macs` multiply-adds
    per iteration: `count` iterations. Another loop, or a body the compiler unrolled to more
    than one tile, is an error (the kernel changed: its trip counts need saying)."""

    def trips(loop: model.Region) -> int:
        if not loop.has_mma or loop.depth:
            raise ValueError(f"loop {loop.index} (depth {loop.depth}) is not the MMA loop")
        per_body = loop.clocks["tensor"] * static.MACS_PER_CLOCK["fp16"]
        if per_body != tile_macs:
            raise ValueError(
                f"the MMA loop does {per_body} MACs a body, not one tile's {tile_macs}"
            )
        return count

    return trips


def no_loops(loop: model.Region) -> int:
    raise ValueError(f"loop {loop.index}: this kernel was compiled without loops")


def _attention_variant() -> static.Variant:
    from . import calibration

    return static.Variant(
        "attention_fwd (tutorial 06 configuration)",
        "fp16",
        calibration.attention_fwd,
        {"Q": "fp16", "K": "fp16", "V": "fp16", "OUT": "fp16"},
        dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=64),
        8,
        (128, 64, 128),
        num_stages=3,
        floats=("scale_log2e",),
    )


def _matmul_variant() -> static.Variant:
    from . import calibration

    return static.Variant(
        "matmul (tl.dot, tutorial 03/09 configuration)",
        "fp16",
        calibration.matmul,
        {"A": "fp16", "B": "fp16", "C": "fp16"},
        dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        8,
        (128, 256, 64),
        num_stages=3,
    )


def _calibration_row(
    kernel: str, shape: dict, flops: float, launch: model.Launch, published, source
):
    p = launch.predict()
    low_tflops = flops / p["high_s"] / 1e12
    high_tflops = flops / p["low_s"] / 1e12
    mid = (low_tflops + high_tflops) / 2
    return {
        "calibration": True,
        "kernel": kernel,
        "shape": shape,
        "published_tflops": published,
        "source": source,
        "predicted_tflops_low": round(low_tflops, 1),
        "predicted_tflops_high": round(high_tflops, 1),
        "holds": bool(low_tflops <= published <= high_tflops or abs(mid / published - 1) <= 0.25),
        "limit": p["limit"],
    }


def calibration_rows() -> list[dict]:
    """The model on the two published kernels; `holds`: the published figure inside the
    predicted range, or the range's midpoint within 25% of it."""
    rows = []
    attention = model.compile_kernel(_attention_variant())
    for seq, published in ATTENTION_PUBLISHED.items():
        launch = model.Launch(
            attention, (seq // 128) * ATTENTION_HEADS, mma_loop(seq // 64, 2 * 128 * 64 * 128)
        )
        flops = 4.0 * ATTENTION_HEADS * seq * seq * 128
        shape = {"seq": seq, "heads": ATTENTION_HEADS, "d": 128, "dtype": "fp16"}
        rows.append(
            _calibration_row(attention.name, shape, flops, launch, published, ATTENTION_SOURCE)
        )
    matmul = model.compile_kernel(_matmul_variant())
    for (m, n, k), published in MATMUL_PUBLISHED.items():
        launch = model.Launch(matmul, (m // 128) * (n // 256), mma_loop(k // 64, 128 * 256 * 64))
        shape = {"m": m, "n": n, "k": k, "dtype": "fp16"}
        rows.append(
            _calibration_row(matmul.name, shape, 2.0 * m * n * k, launch, published, MATMUL_SOURCE)
        )
    return rows


# --- eager: the reference's own kernels -------------------------------------------------------


def _is_kernel_free(func) -> bool:
    """Ops that launch no kernel: views, allocations without a fill, metadata."""
    import torch

    name = func.__name__ if hasattr(func, "__name__") else str(func)
    return (
        bool(getattr(func, "is_view", False))
        or name.split(".")[0]
        in (
            "empty",
            "empty_strided",
            "empty_like",
            "new_empty",
            "new_empty_strided",
            "detach",
            "alias",
            "lift_fresh",
            "_unsafe_view",
            "sym_size",
            "sym_stride",
        )
        or func in (torch.ops.aten.set_.source_Storage_storage_offset,)
    )


def _tensor_bytes(values) -> int:
    import torch

    total = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, (list, tuple)):
            total += _tensor_bytes(v)
    return total


def eager_kernels(fn: Callable, inputs: list) -> list[tuple[str, float]]:
    """(op, predicted seconds) of every kernel the torch reference launches for fn(*inputs)
    and its backward, recorded on meta tensors (no data, no device)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    gemms = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
    kernels = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in gemms:
                a, b = (
                    (args[1], args[2])
                    if func in (aten.addmm.default, aten.baddbmm.default)
                    else args[:2]
                )
                batch = a.shape[0] if a.dim() == 3 else 1
                m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
                kernels.append(
                    (str(func), batch * model.gemm_seconds(m, n, k) - (batch - 1) * model.LAUNCH_S)
                )
            elif not _is_kernel_free(func):
                moved = (
                    _tensor_bytes(args)
                    + _tensor_bytes(kwargs.values() if kwargs else ())
                    + _tensor_bytes([out])
                )
                kernels.append((str(func), model.memory_seconds(moved)))
            return out

    leaves = [t.to("meta").requires_grad_() for t in inputs]
    with Record():
        loss = fn(*leaves)
        loss.backward()
    return kernels


# --- Triton -----------------------------------------------------------------------------------

_COMPILED: dict[tuple, model.Compiled] = {}


def _compiled(key: tuple, make: Callable[[], static.Variant]) -> model.Compiled:
    if key not in _COMPILED:
        _COMPILED[key] = model.compile_kernel(make())
    return _COMPILED[key]


def nt_xent_tiles(n: int, d: int, ranks: int = 1) -> int:
    """Tensor-core tiles of one forward + backward on a rank: row blocks x column blocks."""
    import torch

    import fastcluster_cl.kernels  # noqa: F401

    nt = sys.modules["fastcluster_cl.kernels.nt_xent"]
    return sum(
        math.ceil(2 * n / c.block[0]) * math.ceil(2 * n * ranks / c.block[1])
        for c in (nt.forward_config(d, torch.float16), nt.backward_config(d, torch.float16))
    )


def nt_xent_launches(n: int, d: int, ranks: int = 1) -> list[model.Launch]:
    """NT-Xent's Triton fast path on bf16 Z (2N x D per rank): the prologue (scaled fp16 rows),
    the row-parallel forward and backward. Under gather_distributed the rank's row blocks sweep
    every rank's 2N columns (the all-gather itself is not modelled)."""
    import torch
    import triton.language as tl

    import fastcluster_cl.kernels  # noqa: F401

    nt = sys.modules["fastcluster_cl.kernels.nt_xent"]
    rows, columns = 2 * n, 2 * n * ranks
    fwd = nt.forward_config(d, torch.float16)
    bwd = nt.backward_config(d, torch.float16)
    common = dict(ACC=tl.float32, UPCAST=False, PREC="ieee")
    pointers = dict(static.NT_XENT_POINTERS, Z="fp16")
    block_r = nt.prologue_rows(d)

    def prologue():
        return static.Variant(
            f"nt_xent prologue D={d}",
            "bf16",
            nt._scale_rows_kernel,
            dict(static.NT_XENT_POINTERS, Z="bf16", ZS="fp16"),
            dict(
                TINY=1.1754943508222875e-38, ACC=tl.float32, BLOCK_R=block_r, BLOCK_D=fwd.block[2]
            ),
            4,
            (block_r, fwd.block[2]),
        )

    def forward():
        return static.Variant(
            f"nt_xent fwd {'x'.join(map(str, fwd.block))}",
            "bf16",
            nt._lse_fwd_kernel,
            pointers,
            dict(FIXED_SHIFT=True, **common, **fwd.constexprs),
            fwd.num_warps,
            fwd.block,
            fwd.num_stages,
        )

    def backward():
        return static.Variant(
            f"nt_xent bwd {'x'.join(map(str, bwd.block))}",
            "bf16",
            nt._grad_kernel,
            pointers,
            dict(EPILOGUE=True, PER_ROW=False, FIXED_SHIFT=True, **common, **bwd.constexprs),
            bwd.num_warps,
            bwd.block,
            bwd.num_stages,
        )

    return [
        model.Launch(_compiled(("prologue", d), prologue), math.ceil(rows / 2 / block_r), no_loops),
        model.Launch(
            _compiled(("fwd", fwd), forward),
            math.ceil(rows / fwd.block[0]),
            mma_loop(math.ceil(columns / fwd.block[1]), math.prod(fwd.block)),
        ),
        model.Launch(
            _compiled(("bwd", bwd), backward),
            math.ceil(rows / bwd.block[0]),
            mma_loop(math.ceil(columns / bwd.block[1]), 2 * math.prod(bwd.block)),
        ),
    ]


# --- rows ---------------------------------------------------------------------------------------

# The shapes users train at (bf16): N pairs x D, 8 ranks x N_local under gather_distributed.
NT_XENT_SHAPES = [dict(n=n, d=d) for n in (256, 1024, 4096, 32768) for d in (128, 256)] + [
    dict(n=n, d=128, ranks=8) for n in (256, 1024)
]


def _floor(op: str, n: int, d: int) -> float:
    from .runner import Case, floor

    work = floor(Case(op, 2 * n, d, 10, "bfloat16", True))
    return model.floor_seconds(work["flops"], work["exps"], work["bytes"])


def _sum_launches(launches: list[model.Launch]) -> dict:
    predictions = [launch.predict() for launch in launches]
    slowest = max(predictions, key=lambda p: p["high_s"])
    main = max(predictions, key=lambda p: p["programs"])
    return {
        "low": sum(p["low_s"] for p in predictions),
        "high": sum(p["high_s"] for p in predictions),
        "limit": f"{slowest['kernel']}: {slowest['limit']}",
        "sm_fill": {
            "programs": main["programs"],
            "fill": round(main["sm_fill"], 3),
            "waves": main["waves"],
        },
        "spill_bytes": max(launch.compiled.spill_bytes for launch in launches),
    }


def _eager_nt_xent(n: int, d: int) -> float:
    import torch

    from ..backends import reference

    z = [torch.empty(n, d, dtype=torch.bfloat16, device="meta") for _ in range(2)]
    return sum(s for _, s in eager_kernels(lambda a, b: reference.nt_xent(a, b, 0.5), z))


def nt_xent_rows(shapes: list[dict]) -> list[dict]:
    rows = []
    for shape in shapes:
        n, d, ranks = shape["n"], shape["d"], shape.get("ranks", 1)
        floor = _floor("nt_xent", n, d) * 1  # per rank: its rows against all columns
        if ranks > 1:
            floor = _floor("nt_xent", n * ranks, d) / ranks
        eager = _eager_nt_xent(n, d) if ranks == 1 else None
        common = {"op": "nt_xent", "shape": dict(shape, dtype="bf16"), "floor_us": floor * 1e6}
        launches = nt_xent_launches(n, d, ranks)
        t = _sum_launches(launches)
        tiles = nt_xent_tiles(n, d, ranks)
        rows.append(
            dict(
                common,
                path="triton",
                runs=True,
                predicted_us_low=t["low"] * 1e6,
                predicted_us_high=t["high"] * 1e6,
                eager_us=None if eager is None else eager * 1e6,
                tiles=tiles,
                sm_fill=t["sm_fill"],
                limit=t["limit"],
                spill_bytes=t["spill_bytes"],
                auto=True,
            )
        )
        rows.append(
            dict(
                common,
                path="eager",
                runs=ranks == 1,
                **({} if ranks == 1 else {"reason": "the gathered reference is not modelled yet"}),
                predicted_us_low=None if eager is None else eager * 1e6,
                predicted_us_high=None if eager is None else eager * 1e6,
                eager_us=None if eager is None else eager * 1e6,
                tiles=None,
                sm_fill=None,
                limit="launches and HBM" if eager is not None else None,
                spill_bytes=0,
                auto=False,
            )
        )
        rows.append(
            dict(
                common,
                path="cuda",
                runs=False,
                reason="the CUDA twin's SASS is not read by the model yet",
                auto=False,
            )
        )
    return rows


def _round(row: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


def table(rows: list[dict]) -> str:
    head = "| path | op | shape | predicted us (low - high) | x eager | x floor | SM fill | limit |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if r.get("calibration"):
            continue
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items() if k != "dtype")
        if not r["runs"] and r.get("predicted_us_low") is None:
            lines.append(f"| {r['path']} | {r['op']} | {shape} | - ({r.get('reason')}) | | | | |")
            continue
        low, high = r["predicted_us_low"], r["predicted_us_high"]
        mid = (low + high) / 2
        eager = f"{mid / r['eager_us']:.2f}" if r.get("eager_us") else "-"
        fill = r["sm_fill"]
        fill = f"{fill['programs']} programs, {fill['waves']} waves" if fill else "-"
        lines.append(
            f"| {r['path']} | {r['op']} | {shape} | {low:.1f} - {high:.1f} | {eager} | "
            f"{mid / r['floor_us']:.1f} | {fill} | {r['limit']} |"
        )
    cal = [
        "",
        "| calibration | shape | published TFLOP/s | predicted TFLOP/s | holds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("calibration"):
            shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
            cal.append(
                f"| {r['kernel']} | {shape} | {r['published_tflops']} | "
                f"{r['predicted_tflops_low']} - {r['predicted_tflops_high']} | {r['holds']} |"
            )
    return "\n".join(lines + cal)


def source_hash() -> str:
    """The hash of the kernel sources and of the model itself (found as installed, from a
    checkout or a wheel): the stored JSONs name it, and a test fails when they no longer
    match."""
    import importlib.util

    kernels = Path(importlib.util.find_spec("fastcluster_cl.kernels").origin).parent  # not imported
    files = sorted(kernels.rglob("*.py")) + sorted(Path(__file__).parent.glob("*.py"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastcluster-cl bench model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    parser.add_argument(
        "--static-json",
        type=Path,
        help="also write the static sm_90a report of every kernel variant here",
    )
    parser.add_argument("--shapes", type=Path, help="a JSON list of NT-Xent shapes {n, d[, ranks]}")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("the kernels must be compiled, not interpreted: unset TRITON_INTERPRET")
    shapes = json.loads(args.shapes.read_text()) if args.shapes else NT_XENT_SHAPES
    rows = calibration_rows() + nt_xent_rows(shapes)
    rows = [_round(r) for r in rows]
    print(table(rows))
    meta = {"source_hash": source_hash(), "device": "H100 SXM5 (predicted)"}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([meta, *rows], indent=1))
    if args.static_json:
        static_rows = [static.analyse(v) for v in static.variants()]
        args.static_json.parent.mkdir(parents=True, exist_ok=True)
        args.static_json.write_text(json.dumps([meta, *static_rows], indent=1))
    return 0
