"""Predicted H100 SXM time of one forward plus backward of every path at the shapes users train
at, and the calibration against published measurements (`python -m fastcluster_cl.bench model
--json PATH`). The per-kernel model is `model.py`; here are the launches each path makes.

Paths: "triton" (NT-Xent's fused fast path: prologue, row-parallel forward, row-parallel
backward); "triton-onepass" (the one-pass objectives); "triton-separate" (an objective as the
separate ops as backend="auto" runs them, traced on meta tensors with their host code: the
Triton kernels, and the chunked backend's op where the inputs exceed a kernel's limits (the
row's `chunked_ops`); each recorded launch is compiled and its loops counted by
`SEPARATE_LOOPS`, the torch ops around the launches costed as the eager ones); and "eager":
the torch reference as its own kernels, recorded on meta tensors (`trace.record`): matrix
products at a cuBLAS-class rate (`model.gemm_seconds`), every other op that makes a kernel at
HBM bandwidth over the bytes it reads and writes (`model.memory_seconds`), each with a launch;
"cuda" (NT-Xent and the objectives on the CUDA C++ twin: its kernels compiled by nvcc and read
from their SASS, its launchers mirrored, the torch ops around them traced: `cuda_twin`). Shapes
a path cannot run are rows saying why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from . import cuda_twin, model, trace
from . import static_report as static
from .trace import eager_kernels

# The calibration: published H100 figures of kernels whose code we compile (`calibration.py`).
ATTENTION_SOURCE = (
    "pytorch/benchmark pull request 2296 (2024): triton_tutorial_flash_v2 on an H100, fp16, "
    "d = 128, non-causal forward, batch 128 x 8 heads (as the issue quoting it states)"
)
ATTENTION_PUBLISHED = {1024: 353.0, 2048: 385.0, 4096: 405.0, 8192: 413.0, 16384: 420.0}
ATTENTION_HEADS = 128 * 8
_PERSISTENT_MATMUL = (
    "triton-lang/triton pull request 5726 (2025): 09-persistent-matmul.py's matmul_kernel on an "
    "H100, fp16, M = N = 8192, K = 512: 217.5 TFLOP/s (cuBLAS 285.4 in the same run)"
)
_TMA_STORE_MATMUL = (
    "triton-lang/triton issue 2339 (2023): 10-experimental-tma-store-matrix-multiplication.py "
    "on an H100 with ENABLE_TMA=1 ENABLE_MMA_V3=1 (Triton main of September 2023), fp16, "
    "M = 2048 (cuBLAS 721.6 TFLOP/s at 2048 x 8192 x 8192 in the same run)"
)
_TUTORIAL_MATMUL = (
    "triton-lang/triton issue 3672 (2024): 03-matrix-multiplication.py's matmul_kernel on an "
    "H100, fp16, M = N = K = 3072: 524.7 TFLOP/s (cuBLAS 584.7 in the same run; the "
    "autotuner's choice among the tutorial's configurations is not reported)"
)
# (M, N, K) -> (published TFLOP/s, source). No published H100 figure of a plain Triton tl.dot
# kernel at a square 4096^3 or 8192^3 was found; these are the large fp16 GEMMs that were.
MATMUL_PUBLISHED = {
    (3072, 3072, 3072): (524.7435, _TUTORIAL_MATMUL),
    (8192, 8192, 512): (217.548, _PERSISTENT_MATMUL),
    (2048, 512, 512): (77.85, _TMA_STORE_MATMUL),
    (2048, 1024, 1024): (206.81, _TMA_STORE_MATMUL),
    (2048, 2048, 2048): (295.15, _TMA_STORE_MATMUL),
    (2048, 4096, 4096): (346.28, _TMA_STORE_MATMUL),
    (2048, 8192, 8192): (369.84, _TMA_STORE_MATMUL),
}


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


def chunked_mma_loops(columns: int, chunks: int, macs: dict[int, int]) -> model.Trips:
    """Trips of a row kernel whose rows are too wide to hold (`nt_xent.wide`): its column loop
    (depth 0, with its own product of macs[0] multiply-adds a body, 0 forward) around the
    scores' loop over feature chunks (depth 1, macs[1] a body). Any other loop is an error."""

    def trips(loop: model.Region) -> int:
        per_body = loop.clocks["tensor"] * static.MACS_PER_CLOCK["fp16"]
        if loop.depth not in macs or not loop.has_mma or per_body != macs[loop.depth]:
            raise ValueError(
                f"loop {loop.index} (depth {loop.depth}, {per_body:.0f} MACs a body) is not "
                f"the column loop or the chunk loop ({macs})"
            )
        return chunks if loop.depth else columns

    return trips


def after_loss_scan(trips: model.Trips, loss_blocks: int) -> model.Trips:
    """`trips` of a backward that first scans the forward's per-program largest losses
    (`nt_xent.largest`, LOSS_SCAN_STEP a step: its only loop at depth 0 without MMAs; bf16
    kernels hold their column loops' products on the tensor cores, a 4-byte kernel's FFMA
    column loop would be taken for the scan)."""

    def scan_first(loop: model.Region) -> int:
        if loop.depth == 0 and not loop.has_mma:
            return math.ceil(loss_blocks / static.kernel_module("nt_xent").LOSS_SCAN_STEP)
        return trips(loop)

    return scan_first


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
    for (m, n, k), (published, source) in MATMUL_PUBLISHED.items():
        launch = model.Launch(matmul, (m // 128) * (n // 256), mma_loop(k // 64, 128 * 256 * 64))
        shape = {"m": m, "n": n, "k": k, "dtype": "fp16"}
        rows.append(
            _calibration_row(matmul.name, shape, 2.0 * m * n * k, launch, published, source)
        )
    return rows


# --- Triton -----------------------------------------------------------------------------------

_COMPILED: dict[tuple, model.Compiled] = {}


def _compiled(key: tuple, make: Callable[[], static.Variant]) -> model.Compiled:
    if key not in _COMPILED:
        _COMPILED[key] = model.compile_kernel(make())
    return _COMPILED[key]


def nt_xent_launches(n: int, d: int) -> list[model.Launch]:
    """NT-Xent's Triton fast path on bf16 Z (2N x D): the prologue (scaled fp16 rows), the
    row-parallel forward and backward, each with its merge where it splits its columns
    (`nt_xent.column_splits`); rows too wide to hold (`nt_xent.wide`) take the backward's
    weight slabs and their products (`wide_backward_launches`), merged."""
    import torch
    import triton.language as tl

    nt = static.kernel_module("nt_xent")
    rows = columns = 2 * n
    fwd, fwd_splits, fwd_columns, writers = nt.forward_plan(rows, columns, d, torch.float16)
    common = dict(ACC=tl.float32, UPCAST=False, PREC="ieee")
    pointers = dict(static.NT_XENT_POINTERS, Z="fp16")
    block_r = nt.prologue_rows(d)

    def prologue():
        return static.Variant(
            f"nt_xent prologue D={d}",
            "bf16",
            nt._scale_rows_kernel,
            dict(static.NT_XENT_POINTERS, ZA="bf16", ZB="bf16", ZS="fp16"),
            dict(TINY=1.1754943508222875e-38, ACC=tl.float32, BLOCK_R=block_r, BLOCK_D=width),
            4,
            (block_r, width),
        )

    width = nt.row_width(d)

    def forward():
        return static.Variant(
            f"nt_xent fwd {'x'.join(map(str, fwd.block))}",
            "bf16",
            nt._lse_fwd_kernel,
            pointers,
            dict(SPLIT=fwd_splits > 1, FIXED_SHIFT=True, **common, **fwd.constexprs),
            fwd.num_warps,
            fwd.block,
            fwd.num_stages,
        )

    fwd_tiles = math.ceil(fwd_columns / fwd.block[1])
    if fwd.wide:  # the scores over feature chunks
        fwd_trips = chunked_mma_loops(
            fwd_tiles, math.ceil(d / fwd.chunk), {0: 0, 1: math.prod(fwd.block[:2]) * fwd.chunk}
        )
    else:
        fwd_trips = mma_loop(fwd_tiles, math.prod(fwd.block))
    launches = [
        model.Launch(_compiled(("prologue", d), prologue), math.ceil(n / block_r), no_loops),
        model.Launch(
            _compiled(("fwd", fwd, fwd_splits > 1), forward),
            math.ceil(rows / fwd.block[0]) * fwd_splits,
            fwd_trips,
        ),
    ]
    if fwd_splits > 1:
        merge = _compiled(("fwd merge",), lambda: static.nt_xent_merge_variants(d)[0])
        launches.append(
            model.Launch(merge, math.ceil(rows / nt.LSE_MERGE_ROWS), lambda _: fwd_splits)
        )
    if nt.wide(d):
        return launches + wide_backward_launches(rows, d, writers)
    backward, bwd_splits, in_kernel = _row_backward_launch(rows, d, writers)
    launches += backward
    if not in_kernel:
        launches.append(_backward_merge(d, rows, bwd_splits))
    return launches


def _backward_merge(d: int, rows: int, splits: int) -> model.Launch:
    """`nt_xent._grad_merge_kernel` over `rows` rows of D features from `splits` partial sums."""
    nt = static.kernel_module("nt_xent")
    merge = _compiled(("bwd merge", d), lambda: static.nt_xent_merge_variants(d)[1])
    return model.Launch(merge, math.ceil(rows / nt.prologue_rows(d)), lambda _: splits)


def _row_backward_launch(rows: int, d: int, writers: int) -> tuple[list, int, bool]:
    """NT-Xent's row-parallel backward over 2N = `rows` rows of D features, `writers` forward
    programs' largest losses to scan: ([its launch], column splits, whether the epilogue runs
    in it rather than in the merge)."""
    import torch
    import triton.language as tl

    nt = static.kernel_module("nt_xent")
    bwd, splits, split_columns, in_kernel = nt.backward_plan(rows, rows, d, torch.float16)

    def backward():
        return static.Variant(
            f"nt_xent bwd {'x'.join(map(str, bwd.block))}",
            "bf16",
            nt._grad_kernel,
            dict(static.NT_XENT_POINTERS, Z="fp16", DZ="bf16" if in_kernel else "fp32"),
            dict(
                SPLIT=splits > 1,
                EPILOGUE=in_kernel,
                PER_ROW=False,
                FIXED_SHIFT=True,
                ACC=tl.float32,
                UPCAST=False,
                PREC="ieee",
                **bwd.constexprs,
            ),
            bwd.num_warps,
            bwd.block,
            bwd.num_stages,
        )

    trips = mma_loop(math.ceil(split_columns / bwd.block[1]), 2 * math.prod(bwd.block))
    launch = model.Launch(
        _compiled(("bwd", bwd, splits > 1, in_kernel), backward),
        math.ceil(rows / bwd.block[0]) * splits,
        after_loss_scan(trips, writers),
    )
    return [launch], splits, in_kernel


def wide_backward_launches(rows: int, d: int, writers: int) -> list[model.Launch]:
    """NT-Xent's backward for rows too wide to hold (`nt_xent._wide_grad`) over 2N = `rows`
    rows: per slab of `nt_xent.slab_rows` rows the weights (one tile a program, its scores over
    feature chunks), their product with Zs (k-steps of its column split) and the merge of the
    slab's rows."""
    import torch
    import triton.language as tl

    nt = static.kernel_module("nt_xent")
    weights, product, height, splits, split_columns = nt.wide_backward_plan(
        rows, rows, d, torch.float16
    )
    pointers = dict(static.NT_XENT_POINTERS, Z="fp16", SLAB="fp16")
    dots = dict(ACC=tl.float32, UPCAST=False, PREC="ieee")
    block_m, block_n, block_k = product.block

    def weight_slab():
        return static.Variant(
            f"nt_xent bwd weights {weights.block[0]}x{weights.block[1]}x{weights.chunk}",
            "bf16",
            nt._weight_slab_kernel,
            pointers,
            dict(
                PER_ROW=False,
                FIXED_SHIFT=True,
                BLOCK_M=weights.block[0],
                BLOCK_N=weights.block[1],
                BLOCK_K=weights.chunk,
                **dots,
            ),
            weights.num_warps,
            weights.block,
            weights.num_stages,
        )

    def slab_product():
        return static.Variant(
            f"nt_xent bwd product {'x'.join(map(str, product.block))}",
            "bf16",
            nt._slab_product_kernel,
            pointers,
            dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **dots),
            product.num_warps,
            product.block,
            product.num_stages,
        )

    chunk_macs = weights.block[0] * weights.block[1] * weights.chunk
    weight_trips = after_loss_scan(mma_loop(math.ceil(d / weights.chunk), chunk_macs), writers)
    product_trips = after_loss_scan(
        mma_loop(math.ceil(split_columns / block_k), math.prod(product.block)), writers
    )
    launches = []
    for lo in range(0, rows, height):
        slab = min(height, rows - lo)
        launches += [
            model.Launch(
                _compiled(("bwd weights", weights), weight_slab),
                math.ceil(slab / weights.block[0]) * math.ceil(rows / weights.block[1]),
                weight_trips,
            ),
            model.Launch(
                _compiled(("bwd product", product), slab_product),
                math.ceil(slab / block_m) * math.ceil(d / block_n) * splits,
                product_trips,
            ),
            _backward_merge(d, slab, splits),
        ]
    return launches


# --- rows ---------------------------------------------------------------------------------------

# The shapes users train at (bf16): N pairs x D, 8 ranks x N_local under gather_distributed.
NT_XENT_SHAPES = [dict(n=n, d=d) for n in (256, 1024, 4096, 32768) for d in (128, 256, 2048)] + [
    dict(n=n, d=128, ranks=8) for n in (256, 1024)
]  # D = 2048: TCC contrasting ResNet-50's features (rows wider than the kernels hold)


def _floor(op: str, n: int, d: int) -> float:
    from .runner import Case, floor

    work = floor(Case(op, 2 * n, d, 10, "bfloat16", True))
    return model.floor_seconds(work["flops"], work["exps"], work["bytes"])


def _sum_launches(launches: list[model.Launch]) -> dict:
    predictions = [launch.predict() for launch in launches]
    slowest = max(predictions, key=lambda p: p["high_s"])  # its grid is the step's fill
    return {
        "low": sum(p["low_s"] for p in predictions),
        "high": sum(p["high_s"] for p in predictions),
        "limit": f"{slowest['kernel']}: {slowest['limit']}",
        "sm_fill": {
            "programs": slowest["programs"],
            "fill": round(slowest["sm_fill"], 3),
            "waves": slowest["waves"],
        },
        "spill_bytes": max(launch.compiled.spill_bytes for launch in launches),
    }


def _eager_nt_xent(n: int, d: int, ranks: int = 1) -> float:
    """The torch reference's kernels; gathered, rank 0 of `ranks` (`trace.rank_zero_of`): the
    differentiable all-gather, then the reference on its rows against all of them."""
    from ..backends import gathered, reference

    z = [trace.meta_bf16(n, d) for _ in range(2)]
    if ranks == 1:
        return sum(s for _, s in eager_kernels(lambda a, b: reference.nt_xent(a, b, 0.5), z))
    with trace.rank_zero_of(ranks):
        kernels = eager_kernels(lambda a, b: gathered._nt_xent_autograd(a, b, 0.5), z)
    return sum(s for _, s in kernels)


def nt_xent_rows(shapes: list[dict]) -> list[dict]:
    rows = []
    for shape in shapes:
        n, d, ranks = shape["n"], shape["d"], shape.get("ranks", 1)
        floor = _floor("nt_xent", n, d) * 1  # per rank: its rows against all columns
        if ranks > 1:
            floor = _floor("nt_xent", n * ranks, d) / ranks
        try:
            eager, eager_refusal = _eager_nt_xent(n, d, ranks), None
        except MemoryError as err:
            eager, eager_refusal = None, f"out of memory: {err}"
        common = {"op": "nt_xent", "shape": dict(shape, dtype="bf16"), "floor_us": floor * 1e6}
        launches, host = (
            (nt_xent_launches(n, d), _host_ops("nt_xent", shape))
            if ranks == 1
            else nt_xent_gathered(n, d, ranks)
        )
        tiles = sum(launch.mma_bodies() for launch in launches)
        timed = dict(common, eager_us=None if eager is None else eager * 1e6)
        rows.append(_predicted(timed, "triton", launches, tiles, True, host))
        rows.append(
            dict(
                common,
                path="eager",
                runs=eager is not None,
                **({} if eager is not None else {"reason": eager_refusal}),
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
        rows.append(cuda_nt_xent_row(timed, n, d, ranks))
    return rows


def cuda_nt_xent_row(common: dict, n: int, d: int, ranks: int) -> dict:
    """The CUDA twin's NT-Xent (`cuda_twin`): its kernels read from nvcc's SASS, the torch ops
    around them traced; a row saying why where nvcc is missing or compiled other loops."""
    try:
        launches, host, tiles = cuda_twin.nt_xent_path(n, d, ranks)
    except cuda_twin.NotModelled as err:
        return _not_modelled(common, "cuda", None, str(err), False)
    return _predicted(common, "cuda", launches, tiles, False, host)


# --- the whole objectives ------------------------------------------------------------------------

# The objectives' shapes (bf16, D = 128): anchor with F (ResNet-18/34's 512, ResNet-50's 2048)
# and K centres; cc with K clusters.
OBJECTIVE_N = (256, 1024, 4096, 32768)
ANCHOR_SHAPES = [
    dict(n=n, d=128, f=f, k=k) for n in OBJECTIVE_N for f in (512, 2048) for k in (10, 100, 1000)
]
CC_SHAPES = [dict(n=n, d=128, k=k) for n in OBJECTIVE_N for k in (10, 20, 100, 200, 1000)]

# The parts of each objective, as (op, width of its rows), for the runner's floors.
_OBJECTIVE_PARTS = {
    "anchor_objective": lambda s: (
        [("nt_xent", s["d"])]
        + [("student_t", s["f"])] * 3
        + [("dec_loss", s["f"]), ("anchor_loss", s["f"])]
    ),
    "cc_objective": lambda s: [("nt_xent", s["d"]), ("cc_cluster_loss", s["d"])],
}


def objective_floor(op: str, shape: dict) -> float:
    """The whole GPU's floor of one forward + backward: the sum of its parts' FLOP, exp and
    byte floors (`runner.floor`), in bf16."""
    from .runner import Case, floor

    work = [
        floor(Case(part, 2 * shape["n"], width, shape["k"], "bfloat16", True))
        for part, width in _OBJECTIVE_PARTS[op](shape)
    ]
    total = {key: sum(w[key] for w in work) for key in work[0]}
    return model.floor_seconds(total["flops"], total["exps"], total["bytes"])


def _objective_inputs(op: str, shape: dict) -> list:
    import torch

    n, d, k = shape["n"], shape["d"], shape["k"]
    if op == "anchor_objective":  # under AMP the centres are an fp32 parameter, as the kernels
        f = shape["f"]
        centers = torch.empty(k, f, dtype=torch.float32, device="meta")
        return [
            *(trace.meta_bf16(n, d) for _ in range(2)),
            *(trace.meta_bf16(n, f) for _ in range(3)),
            centers,
        ]
    return [*(trace.meta_bf16(n, d) for _ in range(2)), *(trace.meta_bf16(n, k) for _ in range(2))]


def _objective_total(ops, op: str) -> Callable:
    """The total of `op` as `ops` computes it in one call (the torch reference, or the Triton
    kernels' one-pass objective): temperatures 0.5 and 1, every part's weight 1."""
    weights = (1.0, 1.0, 1.0) if op == "anchor_objective" else (1.0, 1.0)
    objective = getattr(ops, op)

    def total(*xs):
        return objective(*xs, 0.5, 1.0, weights)[0]

    return total


def eager_objective_seconds(op: str, shape: dict) -> float:
    """The torch reference of the whole objective (forward + backward of its total) as its
    own kernels (`eager_kernels`)."""
    from ..backends import reference

    total = _objective_total(reference, op)
    return sum(s for _, s in eager_kernels(total, _objective_inputs(op, shape)))


def triton_onepass_refusal(op: str, shape: dict) -> str | None:
    """Why the one-pass Triton kernels cannot take the shape (their `_fits`), or None."""
    _common = static.kernel_module("_common")
    cc_clusters = static.kernel_module("cc_cluster").MAX_CLUSTERS  # the one-pass cc kernels' too
    widest = max(shape["d"], shape.get("f", 0))
    if widest > _common.MAX_FEATURES:
        return (
            f"rows of {widest} features: the one-pass kernels hold at most "
            f"{_common.MAX_FEATURES} (auto takes the separate ops)"
        )
    if op == "cc_objective" and shape["k"] > cc_clusters:
        return f"K = {shape['k']}: the one-pass cc kernels take at most {cc_clusters} clusters"
    return None


def _not_modelled(common: dict, path: str, refusal: str | None, why: str, auto: bool) -> dict:
    """A row for a path the model does not read yet: whether it runs, and why no number."""
    return dict(
        common,
        path=path,
        runs=refusal is None,
        reason=refusal or why,
        modelled=False,
        predicted_us_low=None,
        predicted_us_high=None,
        eager_us=common["eager_us"],
        tiles=None,
        sm_fill=None,
        limit=None,
        spill_bytes=None,
        auto=auto,
    )


def partial_loops(compiled: model.Compiled, parts: int) -> model.Trips:
    """Trips of a one-program epilogue's loops over the `parts` row programs' partials. The
    compiler unrolls such a loop by u, the partials one body loads (its global bytes over the
    smallest body's), and leaves a remainder loop of at most u - 1 iterations; a loop with an
    MMA or inside another is an error."""
    loops = compiled.regions[1:]
    unit = min((r.global_bytes for r in loops if r.global_bytes), default=1)
    widest = max((r.global_bytes // unit for r in loops), default=1)

    def trips(loop: model.Region) -> int:
        if loop.has_mma or loop.depth:
            raise ValueError(f"loop {loop.index} is not a loop over the partials")
        unrolled = max(1, loop.global_bytes // unit)
        if unrolled > 1:
            return parts // unrolled
        return min(parts, widest - 1) if widest > 1 else parts

    return trips


def cc_onepass_launches(n: int, d: int, k: int) -> tuple[list[model.Launch], int]:
    """(launches, tensor-core tiles) of the cc one-pass objective on bf16 inputs: the row
    launch (each program's column loop over pairs of column tiles, then its loop over slices
    of rows for the softmax and the Gram) and its one-program epilogue forward; the
    cluster-gradient program and the row-parallel gradient launch (two column loops, one per
    view's rows, over all 2N columns, then the logit rows' slices) backward."""
    variants = static.cc_objective_variants(k, d)
    compiled = {name: _compiled(("cc", name, k, d), lambda v=v: v) for name, v in variants.items()}
    fwd, bwd = variants["rows"].block, variants["grad"].block
    rows, grads = math.ceil(n / fwd[0]), math.ceil(n / bwd[0])
    fwd_trips, bwd_trips = math.ceil(n / fwd[1]), math.ceil(2 * n / bwd[1])
    sub_m = static.kernel_module("objective.cc")._SUB_M.value
    launches = [
        model.Launch(
            compiled["rows"],
            rows,
            _nested_loops(fwd_trips, 4 * math.prod(fwd), {0: fwd[0] // sub_m}),
        ),
        model.Launch(compiled["epilogue"], 1, partial_loops(compiled["epilogue"], rows)),
        model.Launch(compiled["cluster grad"], 1, partial_loops(compiled["cluster grad"], rows)),
        model.Launch(
            compiled["grad"],
            grads,
            _nested_loops(bwd_trips, 2 * math.prod(bwd), {0: bwd[0] // sub_m}),
        ),
    ]
    return launches, rows * fwd_trips + grads * 2 * bwd_trips


def _nested_loops(mma_trips: int, tile_macs: int, by_depth: dict[int, int]) -> model.Trips:
    """Trips of a row kernel with its MMA (column) loop at depth 0 and loops without MMA
    whose trip count depends on their depth alone (`by_depth`: e.g. K tiles at 0, F chunks at
    1); any other loop is an error."""
    column = mma_loop(mma_trips, tile_macs)

    def trips(loop: model.Region) -> int:
        if loop.has_mma:
            return column(loop)
        if loop.depth not in by_depth:
            raise ValueError(f"loop {loop.index} at depth {loop.depth} is not expected")
        return by_depth[loop.depth]

    return trips


def anchor_grad_loops(
    compiled: model.Compiled, column_trips: int, tile_macs: int, slices: int, k: int, f: int, g
) -> model.Trips:
    """Trips of the anchor backward's row launch (`_anchor_grad_kernel`, its constexprs `g`):
    the MMA column loops; the loop over SUB_M-row slices; in it per view, the loop over centre
    tiles (its w: the body holds the exps) over F chunks of the distances, then the loop over
    F chunks of dh and dmu over centre tiles."""
    column = mma_loop(column_trips, tile_macs)
    tiles, chunks = math.ceil(k / g["BLOCK_K"]), math.ceil(f / g["BLOCK_F"])
    wide = math.ceil(f / g["BLOCK_FH"])

    def trips(loop: model.Region) -> int:
        if loop.has_mma:
            return column(loop)
        if loop.depth == 0:
            return slices
        if loop.depth == 1:
            return tiles if loop.clocks["mufu"] else wide
        if loop.depth == 2:
            return chunks if compiled.regions[loop.parent].clocks["mufu"] else tiles
        raise ValueError(f"loop {loop.index} at depth {loop.depth} is not expected")

    return trips


def anchor_epilogue_loops(
    compiled: model.Compiled, n: int, k: int, block_k: int, slices: int, parts: int
) -> model.Trips:
    """Trips of the anchor forward's one-program epilogue (`_anchor_epilogue_kernel`): the
    loop over centre tiles around its loop over the slices' partials (unrolled, as
    `partial_loops`), the loop over 32-row blocks around its two centre-tile loops (their
    bodies hold the MUFU logs), and the instance and anchor partial sums (128 a step)."""
    regions = compiled.regions
    children = {r.index: [c for c in regions[1:] if c.parent == r.index] for r in regions}
    inner = [c for r in regions[1:] if not r.depth for c in children[r.index]]
    slice_loops = [c for c in inner if not c.clocks["mufu"]]
    unit = min((c.global_bytes for c in slice_loops), default=1)
    widest = max((c.global_bytes // unit for c in slice_loops), default=1)

    def trips(loop: model.Region) -> int:
        if loop.has_mma or loop.depth > 1:
            raise ValueError(f"loop {loop.index}: not in the epilogue's structure")
        if loop.depth == 0:
            kids = children[loop.index]
            if any(c.clocks["mufu"] for c in kids):
                return math.ceil(n / 32)  # the row blocks
            return math.ceil(k / block_k) if kids else math.ceil(parts / 128)
        if loop.clocks["mufu"]:
            return math.ceil(k / block_k)  # centre tiles of a row block
        unrolled = max(1, loop.global_bytes // unit)
        return slices // unrolled if unrolled > 1 else min(slices, max(widest - 1, 1))

    return trips


def anchor_onepass_launches(n: int, d: int, f: int, k: int) -> tuple[list[model.Launch], int]:
    """(launches, tensor-core tiles) of the anchor one-pass objective on bf16 inputs. Forward:
    the row launch (the column loop over pairs of column tiles; per 16-row slice, unrolled, two
    loops over centre tiles, each over F chunks per view) and its one-program epilogue.
    Backward: the row-parallel gradient launch (two column loops over all 2N columns; a loop
    over its slices, `anchor_grad_loops`) and the centre gradient's partial sums."""
    variants = static.anchor_objective_variants(k, d, f)
    compiled = {
        name: _compiled(("anchor", name, k, d, f), lambda v=v: v) for name, v in variants.items()
    }
    rows_v, grad_v = variants["rows"], variants["grad"]
    fwd, bwd = rows_v.block, grad_v.block
    rows, grads = math.ceil(n / fwd[0]), math.ceil(n / bwd[0])
    fwd_trips, bwd_trips = math.ceil(n / fwd[1]), math.ceil(2 * n / bwd[1])
    c = rows_v.constexprs
    g = grad_v.constexprs
    slices = rows * (fwd[0] // c["SUB_M"])
    launches = [
        model.Launch(
            compiled["rows"],
            rows,
            _nested_loops(
                fwd_trips,
                4 * math.prod(fwd),
                {0: math.ceil(k / c["BLOCK_K"]), 1: math.ceil(f / c["BLOCK_F"])},
            ),
        ),
        model.Launch(
            compiled["epilogue"],
            1,
            anchor_epilogue_loops(
                compiled["epilogue"],
                n,
                k,
                variants["epilogue"].constexprs["BLOCK_K"],
                slices,
                rows,
            ),
        ),
        model.Launch(
            compiled["grad"],
            grads,
            anchor_grad_loops(
                compiled["grad"], bwd_trips, 2 * math.prod(bwd), bwd[0] // g["SUB_M"], k, f, g
            ),
        ),
        model.Launch(
            compiled["sum partials"],
            math.ceil(k * f / variants["sum partials"].constexprs["BLOCK"]),
            partial_loops(compiled["sum partials"], grads),
        ),
    ]
    return launches, rows * fwd_trips + grads * 2 * bwd_trips


# --- the separate Triton ops --------------------------------------------------------------------


def _row_steps(args: dict, grid: tuple) -> int:
    """A persistent row loop: BLOCK_M rows a step, stepping by the grid's programs."""
    return math.ceil(args["n"] / (grid[0] * args["BLOCK_M"]))


def _cluster_tiles(args: dict, grid: tuple) -> int:
    return math.ceil(args["K"] / args["BLOCK_K"])


def _feature_chunks(args: dict, grid: tuple) -> int:
    return math.ceil(args["F"] / args["BLOCK_F"])


def _column_tiles(args: dict, grid: tuple) -> int:
    """A split's column tiles (`nt_xent.column_splits`; the last split may have fewer)."""
    return math.ceil(min(args["split_columns"], args["rows_total"]) / args["BLOCK_N"])


def _gram_column_tiles(args: dict, grid: tuple) -> int:
    """The cc epilogue's column tiles of the 2K x 2K Gram."""
    return math.ceil(2 * args["k"] / args["BLOCK_C"])


def _assignment_chunks(args: dict, grid: tuple) -> int:
    """The cc assignments' column chunks (both passes: the online max and sum, the writes)."""
    return math.ceil(args["K"] / args["BLOCK_K"])


def _merged_programs(args: dict, grid: tuple) -> int:
    """The cc statistics merge's loop over the statistics programs' partials, BLOCK_P a step."""
    return math.ceil(args["programs"] / args["BLOCK_P"])


def _splits(args: dict, grid: tuple) -> int:
    return args["splits"]


def _inner_steps(args: dict, grid: tuple) -> int:
    """A split's k-steps of the Student-t gradient product (`_common.product_splits`)."""
    return math.ceil(args["inner_per_split"] / args["BLOCK_K"])


def _split_tiles(args: dict, grid: tuple) -> int:
    """A split's center or cluster tiles (`_common.tile_splits`; the last split may have
    fewer)."""
    return args["tiles_per_split"]


# The loops of the kernels the separate ops launch, by kernel ("module.function") and loop depth:
# each depth's trip count from a launch's arguments and grid. A kernel or a depth missing here is
# an error: its loops must be read before the model counts them.
SEPARATE_LOOPS = {
    "nt_xent._scale_rows_kernel": {},
    "nt_xent._lse_fwd_kernel": {0: _column_tiles},
    "nt_xent._grad_kernel": {0: _column_tiles},
    "nt_xent._lse_merge_kernel": {0: _splits},
    "nt_xent._grad_merge_kernel": {0: _splits},
    "cc_cluster._stats_kernel": {0: _row_steps},
    "cc_cluster._assignments_kernel": {0: _assignment_chunks},
    "cc_cluster._grad_kernel": {},
    "cc_cluster._stats_merge_kernel": {0: _merged_programs},
    "cc_cluster._grad_operands_kernel": {},
    "cc_cluster._epilogue_fwd_kernel": {0: _gram_column_tiles},
    "cc_cluster._epilogue_bwd_kernel": {0: _gram_column_tiles},
    "student_t._fwd_kernel": {0: _split_tiles, 1: _feature_chunks},
    "student_t._normalize_kernel": {0: _splits},
    "student_t._row_dot_kernel": {0: _cluster_tiles},
    "student_t._bwd_kernel": {0: _split_tiles, 1: _feature_chunks},
    "student_t._gradient_product_kernel": {0: _inner_steps},
    "student_t._gradient_merge_kernel": {0: _splits},
    "kl._colsum_kernel": {0: _row_steps},
    "kl._rows_kernel": {0: _split_tiles},
    "kl._merge_rows_kernel": {0: _splits},
    "kl._grads_kernel": {0: _split_tiles},
}
# Kernels that first scan the forward's per-program largest losses (`nt_xent.largest`, its
# LOSS_SCAN_STEP a step): their one depth-0 loop without MMAs.
SEPARATE_SCANS = {
    "nt_xent._grad_kernel": lambda args, grid: math.ceil(
        args["loss_blocks"] / static.kernel_module("nt_xent").LOSS_SCAN_STEP
    ),
}
# The multiply-adds one body of a kernel's MMA loop does, from the launch's arguments: one
# tile's products (NT-Xent's forward S; its backward S and A Z). A body that does other than
# this (the compiler unrolled the loop, or the kernel changed) is an error, as in `mma_loop`;
# an MMA loop in a kernel missing here is one too.
SEPARATE_TILE_MACS = {
    "nt_xent._lse_fwd_kernel": lambda a: a["BLOCK_M"] * a["BLOCK_N"] * a["BLOCK_D"],
    "nt_xent._grad_kernel": lambda a: 2 * a["BLOCK_M"] * a["BLOCK_N"] * a["BLOCK_D"],
    "student_t._fwd_kernel": lambda a: (
        _center_parts(a) * a["BLOCK_M"] * a["BLOCK_K"] * a["BLOCK_F"]
    ),
    "student_t._bwd_kernel": lambda a: (
        _center_parts(a) * a["BLOCK_M"] * a["BLOCK_K"] * a["BLOCK_F"]
    ),
    "student_t._gradient_product_kernel": lambda a: (
        _product_parts(a) * a["BLOCK_M"] * a["BLOCK_N"] * a["BLOCK_K"]
    ),
}


def _product_parts(args: dict) -> int:
    """Tensor-core products per k-step of the Student-t gradient product: G's three bf16 parts
    against bf16 features, or the six products of parts against fp32 centers."""
    import torch

    return 3 if args["B"] == torch.bfloat16 else 6


def _center_parts(args: dict) -> int:
    """Tensor-core products per feature chunk of the Student-t distances: three for bf16
    features against fp32 centers (the centers' three bf16 parts), else one."""
    import torch

    return 3 if (args["H"], args["MU"]) == (torch.bfloat16, torch.float32) else 1


def _pointer_dtype(dtype) -> str:
    import torch

    return {
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float32: "fp32",
        torch.float64: "fp64",
        torch.int32: "i32",
        torch.int64: "i64",
    }[dtype]


def traced_launch(call: trace.TritonLaunch) -> model.Launch:
    """A recorded Triton launch as the model's: the kernel compiled with the launch's
    constexprs, pointer dtypes, warps and stages (Triton's defaults, 4 and 3, where the launch
    names none), its loops counted by `SEPARATE_LOOPS` and its MMA bodies checked against
    `SEPARATE_TILE_MACS`."""
    import torch

    jit = call.kernel
    name = f"{jit.fn.__module__.rsplit('.', 1)[-1]}.{jit.fn.__name__}"
    if name not in SEPARATE_LOOPS:
        raise ValueError(f"{name}: its loops are not in SEPARATE_LOOPS")
    loops = SEPARATE_LOOPS[name]
    constexprs = {
        jit.arg_names[i]: call.args[jit.arg_names[i]]
        for i in jit.constexprs
        if jit.arg_names[i] in call.args
    }
    pointers = {k: _pointer_dtype(v) for k, v in call.args.items() if isinstance(v, torch.dtype)}
    floats = tuple(k for k, v in call.args.items() if isinstance(v, float) and k not in constexprs)
    warps, stages = call.args.get("num_warps", 4), call.args.get("num_stages", 3)
    key = (name, tuple(sorted((k, str(v)) for k, v in {**constexprs, **pointers}.items())))
    variant = static.Variant(
        name, "bf16", jit, pointers, constexprs, warps, (), stages, floats=floats
    )
    compiled = _compiled((*key, warps, stages), lambda: variant)

    def trips(loop: model.Region) -> int:
        if name in SEPARATE_SCANS and loop.depth == 0 and not loop.has_mma:
            return SEPARATE_SCANS[name](call.args, call.grid)
        if loop.depth not in loops:
            raise ValueError(f"{name}: loop {loop.index} at depth {loop.depth} is not expected")
        if loop.clocks["tensor"]:  # its own MMA (not an inner loop's): one tile a body
            per_body = loop.clocks["tensor"] * static.MACS_PER_CLOCK["fp16"]
            tile = SEPARATE_TILE_MACS.get(name, lambda _args: None)(call.args)
            if per_body != tile:
                raise ValueError(
                    f"{name}: loop {loop.index} does {per_body:.0f} MACs a body, not one "
                    f"tile's {tile} (SEPARATE_TILE_MACS)"
                )
        return loops[loop.depth](call.args, call.grid)

    return model.Launch(compiled, math.prod(call.grid), trips)


def _triton_takes(name: str, *inputs) -> bool:
    """Whether the Triton kernel of the separate op `name` holds these inputs (its `_fits`)."""
    from fastcluster_cl import kernels

    fits = getattr(kernels, f"{name}_fits", None)
    return fits is None or fits(*inputs)


def _auto_op(name: str, *inputs):
    """The separate op `name` as backend="auto" runs it on a GPU (`dispatch.backend_for`): the
    Triton kernel where it holds the inputs, else the chunked backend's."""
    from fastcluster_cl import kernels  # the ops under their public names
    from fastcluster_cl.backends import chunked

    return getattr(kernels if _triton_takes(name, *inputs) else chunked, name)


def chunked_ops(op: str, shape: dict) -> list[str]:
    """The separate ops of `op` that auto runs on the chunked backend at `shape` (inputs beyond
    the Triton kernels' limits, `_auto_op`)."""
    n, z = shape["n"], trace.meta_bf16(shape["n"], shape["d"])
    checks = [("nt_xent", (z, z))]
    if op == "anchor_objective":
        q, centers = trace.meta_bf16(n, shape["k"]), trace.meta_bf16(shape["k"], shape["f"])
        checks.append(("student_t", (trace.meta_bf16(n, shape["f"]), centers)))
        checks.append(("dec_anchor_losses", (q, q, q)))
    else:
        checks.append(("cc_cluster_loss", (trace.meta_bf16(n, shape["k"]),) * 2))
    return [name for name, xs in checks if not _triton_takes(name, *xs)]


def _unit_total(parts: dict):
    """The objective's total from its parts as functional's `weighted_total` forms it, every
    weight 1."""
    from fastcluster_cl.functional import weighted_total

    return weighted_total(parts, dict.fromkeys(parts, 1.0), "mean").total


def _separate_total(op: str) -> Callable:
    """The objective as backend="auto" computes it from the separate ops (functional's
    `separate_parts` and `weighted_total`, each op on Triton or, beyond its kernel's limits, on
    the chunked backend: `_auto_op`): NT-Xent, the three views' Student-t assignments
    (`three_assignments`) against fp32 centres and the fused DEC + anchor losses; NT-Xent and
    the cluster contrast. All weights 1."""
    import torch

    from fastcluster_cl.functional import three_assignments

    if op == "anchor_objective":

        def total(z_a, z_b, h0, h_a, h_b, centers):
            centers = centers.to(torch.float32)  # bf16 h against fp32 centers
            q0, q_a, q_b = three_assignments(
                lambda h: _auto_op("student_t", h, centers)(h, centers, 1.0),
                h0,
                h_a,
                h_b,
                centers.shape[0],
                "triton",
            )
            cluster, anchor = _auto_op("dec_anchor_losses", q0, q_a, q_b)(q0, q_a, q_b)
            instance = _auto_op("nt_xent", z_a, z_b)(z_a, z_b, 0.5)
            return _unit_total({"instance": instance, "cluster": cluster, "anchor": anchor})

        return total

    def total(z_a, z_b, logits_a, logits_b):
        instance = _auto_op("nt_xent", z_a, z_b)(z_a, z_b, 0.5)
        cluster = _auto_op("cc_cluster_loss", logits_a, logits_b)(logits_a, logits_b, 1.0)
        return _unit_total({"instance": instance, "cluster": cluster})

    return total


def _host_ops(op: str, shape: dict) -> list[tuple[str, float]]:
    """The torch ops around the Triton launches of `op`'s fused path (NT-Xent's fast path, a
    one-pass objective's total), traced on meta tensors: their eager kernels."""
    from fastcluster_cl import kernels  # the ops under their public names

    if op == "nt_xent":
        inputs = [trace.meta_bf16(shape["n"], shape["d"]) for _ in range(2)]
        return trace.record(lambda a, b: kernels.nt_xent(a, b, 0.5), inputs, triton=True).kernels
    total = _objective_total(kernels, op)
    return trace.record(total, _objective_inputs(op, shape), triton=True).kernels


def nt_xent_gathered(n: int, d: int, ranks: int) -> tuple[list[model.Launch], list]:
    """(the Triton launches, the torch ops around them) of NT-Xent under gather_distributed on
    rank 0 of `ranks`, traced (`trace.nt_xent`): per local row range (its view a rows, its
    view b rows) the row primitives scale every rank's rows and sweep all of them, forward and
    backward (`dz_rows`: the normalisation's backward in the kernels' epilogue)."""
    from fastcluster_cl import kernels  # noqa: F401  (registers backend "triton")

    recorded = trace.nt_xent("triton", n, d, ranks)
    return [traced_launch(call) for call in recorded.launches], recorded.kernels


def separate_launches(op: str, shape: dict) -> tuple[list[model.Launch], list[tuple[str, float]]]:
    """(the Triton launches, the torch ops around them) of one forward + backward of `op` on the
    separate Triton ops, traced on meta tensors (`trace.record`)."""
    recorded = trace.record(_separate_total(op), _objective_inputs(op, shape), triton=True)
    return [traced_launch(call) for call in recorded.launches], recorded.kernels


def _predicted(
    common: dict,
    path: str,
    launches: list[model.Launch],
    tiles: int,
    auto: bool,
    host: list[tuple[str, float]] = (),
):
    """A modelled row: the launches' times plus the torch ops around them (`host`)."""
    t = _sum_launches(launches)
    host_s = sum(s for _, s in host)
    return dict(
        common,
        path=path,
        runs=True,
        modelled=True,
        predicted_us_low=(t["low"] + host_s) * 1e6,
        predicted_us_high=(t["high"] + host_s) * 1e6,
        tiles=tiles,
        sm_fill=t["sm_fill"],
        limit=t["limit"] if host_s < t["low"] else f"the {len(host)} torch ops around the kernels",
        spill_bytes=t["spill_bytes"],
        auto=auto,
    )


def _cuda_total(op: str) -> Callable:
    """The objective as backend="cuda" computes it (functional's `_objective`): the one-pass
    kernels where they take the inputs (cc: K <= 64), else NT-Xent and the cluster contrast on
    the twin's NT-Xent, weighted. Temperatures 0.5 and 1, every weight 1."""
    from fastcluster_cl.backends import cuda

    one_pass = _objective_total(cuda, op)
    if op == "anchor_objective":
        return one_pass

    def total(z_a, z_b, logits_a, logits_b):
        if cuda.cc_objective_fits(z_a, z_b, logits_a, logits_b):
            return one_pass(z_a, z_b, logits_a, logits_b)
        return _unit_total(
            {
                "instance": cuda.nt_xent(z_a, z_b, 0.5),
                "cluster": cuda.cc_cluster_loss(logits_a, logits_b, 1.0),
            }
        )

    return total


def cuda_objective_row(common: dict, op: str, shape: dict) -> dict:
    """The CUDA twin's objective (`cuda_twin.objective_path`): its kernels read from nvcc's
    SASS, the torch ops around them traced."""
    try:
        launches, host, tiles = cuda_twin.objective_path(
            _cuda_total(op), _objective_inputs(op, shape)
        )
    except cuda_twin.NotModelled as err:
        return _not_modelled(common, "cuda", None, str(err), False)
    except MemoryError as err:
        return dict(common, path="cuda", runs=False, reason=f"out of memory: {err}", auto=False)
    return _predicted(common, "cuda", launches, tiles, False, host)


def objective_rows(op: str, shapes: list[dict]) -> list[dict]:
    """The eager reference, the one-pass Triton kernels and the separate ops modelled (with
    the torch ops around their kernels); `auto` marks the path backend="auto" takes: the
    one-pass kernels where they take the shape and `kernels.AUTO_SEPARATE` does not send the
    op's inputs of that shape to the separate ops, else the separate ops; and the CUDA twin
    (`cuda_objective_row`)."""
    from fastcluster_cl import kernels

    rows = []
    for shape in shapes:
        try:
            eager, eager_refusal = eager_objective_seconds(op, shape) * 1e6, None
        except MemoryError as err:
            eager, eager_refusal = None, f"out of memory: {err}"
        common = {
            "op": op,
            "shape": dict(shape, dtype="bf16"),
            "floor_us": objective_floor(op, shape) * 1e6,
            "eager_us": eager,
        }
        onepass = triton_onepass_refusal(op, shape)
        separate_first = kernels.AUTO_SEPARATE.get(op, lambda *_: False)
        onepass_auto = onepass is None and not separate_first(*_objective_inputs(op, shape))
        if onepass is None:
            n, d, k = shape["n"], shape["d"], shape["k"]
            launches, tiles = (
                cc_onepass_launches(n, d, k)
                if op == "cc_objective"
                else anchor_onepass_launches(n, d, shape["f"], k)
            )
            host = _host_ops(op, shape)
            rows.append(_predicted(common, "triton-onepass", launches, tiles, onepass_auto, host))
        else:
            rows.append(_not_modelled(common, "triton-onepass", onepass, "", auto=False))
        launches, host = separate_launches(op, shape)
        tiles = sum(launch.mma_bodies() for launch in launches)
        separate = _predicted(common, "triton-separate", launches, tiles, not onepass_auto, host)
        rows.append(dict(separate, chunked_ops=chunked_ops(op, shape)))
        rows.append(cuda_objective_row(common, op, shape))
        if eager_refusal:
            rows.append(dict(common, path="eager", runs=False, reason=eager_refusal, auto=False))
            continue
        rows.append(
            dict(
                common,
                path="eager",
                runs=True,
                modelled=True,
                predicted_us_low=eager,
                predicted_us_high=eager,
                tiles=None,
                sm_fill=None,
                limit="launches and HBM",
                spill_bytes=0,
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
        if r.get("predicted_us_low") is None:
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
    backends = Path(__file__).parents[1] / "backends"  # what the eager and separate rows trace
    traced = [backends / name for name in ("reference.py", "numerics.py", "chunked.py")]
    traced.append(backends / "objective_sides.py")  # chunked's sides, auto beyond the kernels
    traced.append(backends.parent / "functional.py")  # the separate rows' weighted total
    files = (
        sorted(kernels.rglob("*.py"))
        + traced
        + sorted((backends / "autograd").glob("*.py"))
        + sorted((backends / "cuda").glob("*.py"))  # the twin's host code
        + sorted(Path(__file__).parent.glob("*.py"))
    )
    csrc = Path(importlib.util.find_spec("fastcluster_cl.csrc").origin).parent  # the twin's rows
    files += sorted(p for p in csrc.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
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
    if os.environ.get("FASTCLUSTER_CL_SYMMETRIC"):
        parser.error(
            "the model reads the row-parallel NT-Xent kernels: unset FASTCLUSTER_CL_SYMMETRIC"
        )
    shapes = json.loads(args.shapes.read_text()) if args.shapes else NT_XENT_SHAPES
    rows = calibration_rows() + nt_xent_rows(shapes)
    if not args.shapes:
        rows += objective_rows("anchor_objective", ANCHOR_SHAPES)
        rows += objective_rows("cc_objective", CC_SHAPES)
    rows = [_round(r) for r in rows]
    print(table(rows))
    meta = {
        "source_hash": source_hash(),
        "device": "H100 SXM5 (predicted)",
        "nvcc": cuda_twin.nvcc_release(),  # the CUDA twin's rows were read from its SASS
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([meta, *rows], indent=1))
    if args.static_json:
        static_rows = [static.analyse(v) for v in static.variants()]
        args.static_json.parent.mkdir(parents=True, exist_ok=True)
        args.static_json.write_text(json.dumps([meta, *static_rows], indent=1))
    return 0
