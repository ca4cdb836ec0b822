"""The CUDA C++ twin (csrc/nt_xent.cu, csrc/objective.cu) in the cost model: its kernels compiled
for sm_90 with nvcc and read from their SASS as the Triton kernels are (`model.regions`), its
launchers' grids and column splits mirrored here, and the torch ops around its launches traced
on meta tensors with a stand-in for the compiled extension that records each call instead of
running it.

A kernel's loops are named below, in address order, as nvcc 13.0 compiles them: each with its
nesting depth, MMA count, global loads and stores (its signature), and its trip count at a shape.
Most of the twin's small loops run one element per thread with an unknown stride, so nvcc unrolls
them by 16, then straight-line 8- and 4-wide blocks, and leaves a 4-wide or a remainder loop: a
loop over T items then runs T // 16 bodies of the 16-wide loop, (T % 8) // 4 of a 4-wide one and
T % 4 of the remainder (`_cascade`). A compiled kernel whose loops differ from its list is a row
saying so, not a guess. Unlike Triton's SASS, the twin's hot code sits behind predicated forward
branches (the online lse's `if (tile_max > -inf)`, the in-range test of each element), so those are
not cold here; the cold code is the other side of an if / else, which nvcc lays out after the
common side and jumps over unconditionally (the positive pair's expm1, load_tile's 2-byte path):
`else_sides`. The rest of a loop's body counts in full on every trip."""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from . import model
from . import static_report as static

THREADS = 128  # kThreads in csrc/tiles.cuh: every twin kernel's block
BM, BN, BK = 64, 64, 32  # rows per block, columns per tile, features per step (tiles.cuh)
BD = 128  # gradient features per block on the tensor-core path (Tile<__half>::BD)
BLOCKS_PER_SM = 4  # fcl_nt_xent_splits: resident blocks per SM its split aims for
MIN_TILES_PER_SPLIT = 2
MAX_SPLITS = 65535  # grid.z
SUM_SPLITS_BLOCKS = 4096  # fcl_nt_xent_grad: the largest grid of sum_splits_kernel
NVCC_RELEASE = "13.0"  # the compiler whose loops are listed below
BP = 16  # index pairs per block of csrc/objective.cu (rows i and n + i of Z)


def nvcc() -> str | None:
    """nvcc from CUDA_HOME (or CUDA_PATH), else from PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


@dataclass(frozen=True)
class Loop:
    """One compiled loop: its signature, and its trips per execution of its parent at a shape
    (from a dict of the launch's counts: "tiles", "k_steps", "lane", "splits", ...)."""

    depth: int
    mma: int
    loads: int
    stores: int
    trips: Callable[[dict], int]


@dataclass(frozen=True)
class Kernel:
    """One kernel of the twin: its csrc/ file, its mangled-name pattern in that file's cubin, its
    loops in address order and its block size."""

    source: str
    pattern: str
    loops: tuple[Loop, ...]
    threads: int = THREADS


def _cascade(items: str, unroll: int, left: int | None = None) -> Callable[[dict], int]:
    """Trips of one loop of nvcc's unroll cascade over T = at[items] per thread: the widest
    loop runs T // unroll bodies; a narrower one what the wider ones and nvcc's straight-line
    blocks between them leave, (T % left) // unroll (after a 16-wide loop an 8-wide block, so
    a 4-wide loop runs (T % 8) // 4 times; a 1-wide remainder T % 4)."""
    if left is None:
        return lambda at: at[items] // unroll
    return lambda at: at[items] % left // unroll


def _of(key: str) -> Callable[[dict], int]:
    return lambda at: at[key]


def _never(at: dict) -> int:
    return 0


def _fast(count: int) -> Callable[[dict], int]:
    """load_tile's 16-byte path (d a multiple of 8): `count` bodies, 0 on the 2-byte path."""
    return lambda at: count if at["d"] % 8 == 0 else 0


def _slow(count: int) -> Callable[[dict], int]:
    return lambda at: 0 if at["d"] % 8 == 0 else count


# score_tile's k-step over the features: load_tile of the rows (2-byte path unrolled by 4, then
# the 16-byte path of 256 vectors at one per thread and `#pragma unroll 2`), the same for the
# columns, and the 16 HMMAs.
_SCORE_STEP = [
    Loop(1, 16, 8, 0, _of("k_steps")),
    Loop(2, 0, 4, 0, _slow(64 * BK // 4 // THREADS)),
    Loop(2, 0, 2, 0, _fast(1)),
    Loop(2, 0, 4, 0, _slow(64 * BK // 4 // THREADS)),
    Loop(2, 0, 2, 0, _fast(1)),
]

# sum_splits_kernel (common.cuh): the partial sums of `splits` blocks, element-wise
_SUM_SPLITS = (
    Loop(0, 0, 0, 1, _never),  # no splits: zeros
    Loop(0, 0, 0, 4, _never),
    Loop(0, 0, 11, 1, _of("per_thread")),  # grid-stride over the elements
    Loop(1, 0, 16, 0, _cascade("splits", 16)),
    Loop(1, 0, 4, 0, _cascade("splits", 4, 8)),
)

# csrc/nt_xent.cu's kernels for bf16 inputs: the rows are scaled into fp16 (`Normed<T>`), so the
# tile kernels run on __half.
NT_XENT_KERNELS = {
    "normalize": Kernel(
        "nt_xent.cu",
        r"16normalize_kernelI13__nv_bfloat166__half",
        (  # per lane, ceil(d / 32) elements: max |z|, sum of squares, the scaled rows
            Loop(0, 0, 2, 0, _cascade("lane", 1, 4)),
            Loop(0, 0, 32, 0, _cascade("lane", 16)),
            Loop(0, 0, 2, 0, _cascade("lane", 1, 4)),
            Loop(0, 0, 32, 0, _cascade("lane", 16)),
            Loop(0, 0, 2, 2, _cascade("lane", 1, 4)),
            Loop(0, 0, 8, 8, _cascade("lane", 4)),
        ),
    ),
    "lse": Kernel(
        "nt_xent.cu",
        r"10lse_kernelI6__half",
        (
            Loop(0, 0, 15, 0, _of("tiles")),  # the column tiles of the block's split
            Loop(1, 0, 16, 0, _never),  # rs of the tile's 64 columns: threads < 64, peeled
            *_SCORE_STEP,
        ),
    ),
    "merge_lse": Kernel(
        "nt_xent.cu",
        r"16merge_lse_kernel",
        (  # over the splits: their max, then their sums
            Loop(0, 0, 16, 0, _cascade("splits", 16)),
            Loop(0, 0, 4, 0, _cascade("splits", 4, 8)),
            Loop(0, 0, 1, 0, _cascade("splits", 1, 4)),
            Loop(0, 0, 16, 0, _cascade("splits", 16)),
            Loop(0, 0, 4, 0, _cascade("splits", 4, 8)),
            Loop(0, 0, 1, 0, _cascade("splits", 1, 4)),
        ),
    ),
    "grad": Kernel(
        "nt_xent.cu",
        r"11grad_kernelI6__half",
        (  # the m row losses' max (the weight scale), then the column tiles
            Loop(0, 0, 1, 0, _cascade("losses", 1, 4)),
            Loop(0, 0, 16, 0, _cascade("losses", 16)),
            Loop(0, 64, 51, 0, _of("tiles")),  # and G += P Z: 64 HMMAs a tile
            *_SCORE_STEP,
            Loop(1, 0, 4, 0, _slow(64 * BD // THREADS // 4)),  # the columns' BD features
            Loop(1, 0, 2, 0, _fast(64 * BD // 8 // THREADS // 2)),
            Loop(1, 0, 8, 0, _never),  # lse, rs, weights of 64 columns: peeled
            Loop(1, 0, 12, 0, _never),
            Loop(0, 0, 0, 1, _cascade("g_store", 1, 4)),  # G of BM x BD, fp32
            Loop(0, 0, 0, 4, _cascade("g_store", 4)),
        ),
    ),
    "sum_splits": Kernel(
        "nt_xent.cu",
        r"17sum_splits_kernelILi128E",
        _SUM_SPLITS,
    ),
    "norm_backward": Kernel(
        "nt_xent.cu",
        r"20norm_backward_kernelI6__half13__nv_bfloat16",
        (  # per lane: z . g, then dz
            Loop(0, 0, 2, 0, _cascade("lane", 1, 4)),
            Loop(0, 0, 32, 0, _cascade("lane", 16)),
            Loop(0, 0, 2, 1, _cascade("lane", 1, 4)),
            Loop(0, 0, 8, 4, _cascade("lane", 4)),
        ),
    ),
}


def _count(trips: int) -> Callable[[dict], int]:
    return lambda at: trips


# csrc/objective.cu's kernels for bf16 z, h and logits (fp32 centres). Their per-lane loops read
# h or the logits through `load_any`, whose dtype nvcc switches on outside the loop: such a loop
# is compiled once per dtype (fp32: 4-byte loads only; fp16: HADD2.F32 conversions; bf16: the
# one that runs here) and the others never run. A loop whose item count is 0 (no rows in a
# block, no blocks, K2 = 0) is compiled apart too: never. The trip keys (`objective_at`) are
# per-thread item counts: "x_lane" = ceil(x / 32) for a warp's lanes, "x_block" = ceil(x / 128)
# for a block's threads, "x_epi" = ceil(x / 256) for an epilogue's.
_UNIT_SCALE = [  # max |z|, then the sum of squares: 16-wide, the rest in the parent's body
    Loop(0, 0, 16, 0, _cascade("d_lane", 16)),
    Loop(0, 0, 16, 0, _cascade("d_lane", 16)),
]


def _deeper(loops: list[Loop], by: int) -> list[Loop]:
    return [Loop(x.depth + by, x.mma, x.loads, x.stores, x.trips) for x in loops]


_SCORE_TILE = [  # score_tile's feature steps: the rows' and columns' z p (8 a thread, 4-wide)
    Loop(0, 4, 6, 0, _of("k_steps")),
    Loop(1, 0, 4, 0, _count(2)),
    Loop(1, 0, 4, 0, _count(2)),
]
_FORWARD_ROWS = [  # nt_xent_forward_block
    Loop(0, 0, 66, 6, _count(4)),  # the block's 16 pairs, 4 a warp: scaling, 1 - cos
    *_deeper(_UNIT_SCALE, 1),  # of z_a's row
    *_deeper(_UNIT_SCALE, 1),  # of z_b's
    Loop(1, 0, 8, 0, _cascade("d_lane", 4)),  # the pair's gap and dot
    Loop(0, 0, 0, 0, _of("tiles")),  # the column tiles: online lse
    Loop(1, 0, 30, 0, _count(8)),  # the tile's 32 columns' p and rs, 8 a warp
    *_deeper(_UNIT_SCALE, 2),
    *_deeper(_SCORE_TILE, 1),
]
_BACKWARD_ROWS = [  # nt_xent_backward_block
    Loop(0, 0, 2, 0, _count(1)),  # the 32 rows' rs and p: one a thread of the first 32
    Loop(0, 0, 8, 0, _never),  # ... 4-wide
    Loop(0, 0, 1, 0, _cascade("m_block", 1, 4)),  # the 2N row losses' max (the weight scale)
    Loop(0, 0, 16, 0, _cascade("m_block", 16)),
    Loop(0, 0, 4, 0, _of("tiles")),  # the column tiles
    Loop(1, 0, 8, 0, _never),  # the tile's 32 columns' values, 2-wide: one a thread, in the body
    *_deeper(_SCORE_TILE, 1),
    Loop(1, 4, 11, 16, _of("k_steps")),  # G += (A diag(rs)) (z p) a feature step
    Loop(2, 0, 4, 0, _count(2)),  # the columns' z p
    Loop(0, 0, 37, 3, _count(8)),  # dz of the 32 rows, 8 a warp
    Loop(1, 0, 32, 0, _cascade("d_lane", 16)),  # zn . g
    Loop(1, 0, 8, 4, _cascade("d_lane", 4)),  # dz
]


def _student_t_dist2(depth: int) -> list[Loop]:
    """student_t_dist2 of one view's row: the K centres, each over the lane's F elements."""
    return _deeper(
        [
            Loop(0, 0, 12, 1, _of("k")),  # the centres (fp32 / bf16 h), the F tail in the body
            Loop(1, 0, 8, 0, _never),  # fp32 h's F loop
            Loop(1, 0, 8, 0, _cascade("f_lane", 4)),  # bf16 h's, 4-wide
            Loop(0, 0, 30, 1, _never),  # fp16 h's centres
            Loop(1, 0, 32, 0, _never),
        ],
        depth,
    )


def _student_t_dh(depth: int) -> list[Loop]:
    """student_t_dh of one view's row: the lane's F elements, each over the K centres."""
    return _deeper(
        [
            Loop(0, 0, 23, 1, _of("f_lane")),  # bf16 h
            Loop(1, 0, 32, 0, _cascade("k", 16)),  # the centres, 16-wide
            Loop(1, 0, 8, 0, _cascade("k", 4, 8)),
            Loop(0, 0, 23, 1, _never),  # fp32 h
            Loop(1, 0, 32, 0, _never),
            Loop(1, 0, 8, 0, _never),
            Loop(0, 0, 0, 16, _never),  # K = 0
            Loop(0, 0, 23, 1, _never),  # fp16 h
            Loop(1, 0, 32, 0, _never),
            Loop(1, 0, 8, 0, _never),
        ],
        depth,
    )


def _block_sums(calls: int) -> list[Loop]:
    """block_sum's loop over the warps' partials (16-wide, 4-wide, 1-wide), per call."""
    return [
        Loop(0, 0, 0, 0, _cascade("warps", 16)),
        Loop(0, 0, 0, 0, _cascade("warps", 4, 8)),
        Loop(0, 0, 0, 0, _cascade("warps", 1, 4)),
    ] * calls


def _block_column_sums(items: str) -> list[Loop]:
    """An epilogue's sums over the row blocks' partials: `items` a thread, each over the
    blocks (16-wide, 4-wide); the versions for no blocks never run."""
    return [
        Loop(0, 0, 0, 1, _never),
        Loop(0, 0, 0, 16, _never),
        Loop(0, 0, 11, 1, _of(items)),
        Loop(1, 0, 16, 0, _cascade("blocks", 16)),
        Loop(1, 0, 4, 0, _cascade("blocks", 4, 8)),
    ]


def _block_rows(items: str, loads: int, row_loads: int) -> list[Loop]:
    """A row kernel's sums over its 16 rows: `items` a thread, each over the rows (16-wide,
    4-wide; `row_loads` global loads a row); the versions for a block without rows never run."""
    return [
        Loop(0, 0, 0, 1, _never),
        Loop(0, 0, 0, 16, _never),
        Loop(0, 0, loads, 1, _of(items)),
        Loop(1, 0, 16 * row_loads, 0, _count(1)),
        Loop(1, 0, 4 * row_loads, 0, _never),
    ]


def _softmax_rows(lse_saved: bool) -> list[Loop]:
    """softmax_pair's loops for one view (depth 2): the logits' max and exp sum (not run with a
    saved lse), then q; per dtype."""
    forward = _never if lse_saved else _cascade("k_lane", 4)
    return _deeper(
        [
            Loop(0, 0, 4, 0, forward),  # max, bf16
            Loop(0, 0, 4, 0, _never),  # fp32
            Loop(0, 0, 16, 0, _never),  # fp16
            *(
                [Loop(0, 0, 4, 0, _never)] * 3  # the exp sum, per dtype
                if lse_saved
                else [Loop(0, 0, 8, 0, forward), Loop(0, 0, 4, 0, _never)]  # bf16 or fp32; fp16
            ),
            *(
                [Loop(0, 0, 4, 0, _cascade("k_lane", 4))] + [Loop(0, 0, 4, 0, _never)] * 2
                if lse_saved
                else [Loop(0, 0, 8, 0, _cascade("k_lane", 4)), Loop(0, 0, 4, 0, _never)]
            ),
        ],
        2,
    )


EPILOGUE_THREADS = 256  # kEpilogueThreads in csrc/objective.cu
OBJECTIVE_KERNELS = {
    "anchor_forward": Kernel(
        "objective.cu",
        r"21anchor_forward_kernelI13__nv_bfloat16",
        (
            *_FORWARD_ROWS,
            Loop(0, 0, 0, 1, _count(4)),  # the block's pairs, 4 a warp
            Loop(1, 0, 4, 2, _count(3)),  # the views h0, h_a, h_b
            *_student_t_dist2(2),
            Loop(2, 0, 4, 0, _cascade("k_lane", 4)),  # the logits' max
            Loop(2, 0, 2, 0, _cascade("k_lane", 2)),  # their exp sum
            Loop(2, 0, 2, 1, _of("k_lane")),  # q and the row's loss terms
            *_block_rows("k_block", 11, 1),  # q0's column sums over the block's rows
        ),
    ),
    "anchor_epilogue": Kernel(
        "objective.cu",
        r"22anchor_epilogue_kernel",
        (
            *_block_column_sums("k_epi"),  # f
            Loop(0, 0, 8, 2, _of("n_warps")),  # DEC, a row a warp
            Loop(1, 0, 8, 0, _cascade("k_lane", 4)),  # its total T
            Loop(1, 0, 4, 0, _cascade("k_lane", 2)),  # its loss terms
            Loop(0, 0, 1, 0, _cascade("m_epi", 1, 4)),  # the instance rows' sum
            Loop(0, 0, 16, 0, _cascade("m_epi", 16)),
            Loop(0, 0, 1, 0, _cascade("n_epi", 1, 4)),  # the anchor rows'
            Loop(0, 0, 16, 0, _cascade("n_epi", 16)),
            *_block_sums(3),
        ),
        EPILOGUE_THREADS,
    ),
    "anchor_backward": Kernel(
        "objective.cu",
        r"22anchor_backward_kernelI13__nv_bfloat16",
        (
            *_BACKWARD_ROWS,
            Loop(0, 0, 5, 16, _count(4)),  # the block's pairs, 4 a warp
            *_student_t_dist2(1),  # of h0
            Loop(1, 0, 2, 15, _count(2)),  # the views h_a, h_b
            *_student_t_dist2(2),
            Loop(2, 0, 2, 1, _of("k_lane")),  # the view's w
            *_student_t_dh(2),
            Loop(1, 0, 4, 2, _cascade("k_lane", 2)),  # h0's w (DEC)
            *_student_t_dh(1),
            Loop(0, 0, 97, 1, _of("kf_block")),  # the centres' partials, an element a step
            Loop(1, 0, 12, 0, _count(BP)),  # its 16 rows x 3 views, fp32 or bf16 h (fp16: cold)
        ),
    ),
    "anchor_sum_splits": Kernel(
        "objective.cu", r"17sum_splits_kernelILi256E", _SUM_SPLITS, EPILOGUE_THREADS
    ),
    "cc_forward": Kernel(
        "objective.cu",
        r"17cc_forward_kernelI13__nv_bfloat16",
        (
            *_FORWARD_ROWS,
            Loop(0, 0, 0, 2, _count(4)),  # the block's pairs, 4 a warp
            Loop(1, 0, 39, 0, _count(2)),  # the two views' softmax rows
            *_softmax_rows(lse_saved=False),
            *_block_rows("k2_block", 0, 0),  # the partial marginals
            *_block_rows("k2sq_block", 0, 0),  # the partial Gram
        ),
    ),
    "cc_epilogue": Kernel(
        "objective.cu",
        r"18cc_epilogue_kernel",
        (
            *_block_column_sums("k2sq_epi"),  # the Gram
            *_block_column_sums("k2_epi"),  # the marginals
            Loop(0, 0, 16, 2, _of("k2_epi")),  # the cluster contrast, a column a thread
            Loop(1, 0, 8, 0, _cascade("k2", 4)),  # its max over the 2K columns
            Loop(1, 0, 8, 0, _cascade("k2", 4)),  # its exp sum
            Loop(0, 0, 1, 0, _cascade("m_epi", 1, 4)),  # the instance rows' sum
            Loop(0, 0, 16, 0, _cascade("m_epi", 16)),
            *_block_sums(3),
        ),
        EPILOGUE_THREADS,
    ),
    "cc_weights": Kernel(
        "objective.cu",
        r"17cc_weights_kernel",
        (
            Loop(0, 0, 7, 1, _of("k2sq_epi")),  # W, an element a thread
            Loop(0, 0, 2, 2, _of("k2_epi")),  # its diagonal and e, a column a thread
            Loop(1, 0, 7, 0, _of("k2")),  # ... over the 2K columns
        ),
        EPILOGUE_THREADS,
    ),
    "cc_backward": Kernel(
        "objective.cu",
        r"18cc_backward_kernelI13__nv_bfloat16",
        (
            *_BACKWARD_ROWS,
            Loop(0, 0, 0, 0, _count(4)),  # the block's pairs, 4 a warp
            Loop(1, 0, 40, 0, _count(2)),  # the two views' softmax rows from the saved lse
            *_softmax_rows(lse_saved=True),
            Loop(1, 0, 30, 15, _count(2)),  # the two views' softmax backward
            Loop(2, 0, 16, 0, _never),  # dq . q with K2 = 0
            Loop(2, 0, 12, 0, _of("k_lane")),  # dq . q, a column a lane
            Loop(3, 0, 16, 0, _cascade("k2", 16)),  # dq = Q_i W^T + e: its 2K products
            Loop(3, 0, 4, 0, _cascade("k2", 4, 8)),
            Loop(2, 0, 1, 2, _never),  # dlogits with K2 = 0
            Loop(2, 0, 16, 16, _never),
            Loop(2, 0, 12, 3, _of("k_lane")),  # dlogits, a column a lane
            Loop(3, 0, 16, 0, _cascade("k2", 16)),
            Loop(3, 0, 4, 0, _cascade("k2", 4, 8)),
        ),
    ),
}
KERNELS = {**NT_XENT_KERNELS, **OBJECTIVE_KERNELS}

# Indices inside a loop that an unconditional forward branch jumps over with no MMA in between:
# the side of an if / else laid out second.
else_sides = functools.partial(static.cold_indices, predicated=False)


class NotModelled(RuntimeError):
    """The twin cannot be read here: no nvcc, a failed compile, a kernel not found."""


class LoopsChanged(NotModelled):
    """The compiled kernel's loops are not the ones listed for it."""


def _flags() -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    # as the extension's JIT build compiles them on an H100 (backends/cuda/build.py: torch's
    # flags, -O3 -lineinfo, the device's own architecture)
    return ["-gencode=arch=compute_90,code=sm_90", "-O3", "-lineinfo", *COMMON_NVCC_FLAGS]


@functools.cache
def nvcc_release() -> str | None:
    """The release nvcc reports ("13.0"), None without nvcc."""
    compiler = nvcc()
    if compiler is None:
        return None
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found[1] if found else "unknown"


@functools.cache
def _functions(source: str) -> dict[str, tuple[str, str]]:
    """mangled name -> (its SASS, its cuobjdump resource line) for every kernel of csrc/`source`."""
    compiler = nvcc()
    if compiler is None:
        raise NotModelled("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    path = importlib.resources.files("fastcluster_cl.csrc") / source
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernels.cubin")
        done = subprocess.run(
            [compiler, *_flags(), "-cubin", "-o", cubin, str(path)], capture_output=True, text=True
        )
        if done.returncode:
            tail = " ".join(done.stderr.strip().splitlines()[-2:])
            raise NotModelled(f"nvcc {nvcc_release()} failed on csrc/{source}: {tail}")
        with open(cubin, "rb") as f:
            code = f.read()
    sass = static._tool_output("nvdisasm", ["-c"], code)
    usage = static._tool_output("cuobjdump", ["-res-usage"], code)
    sections = re.split(r"\n\s*\.section\s+\.text\.", sass)[1:]
    texts = {s.split(",", 1)[0]: s for s in sections}
    resources = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", usage))
    return {name: (text, resources[name]) for name, text in texts.items()}


def _signature(instructions: list[dict], regions: list[model.Region]) -> list[tuple]:
    """(depth, MMAs, global loads, global stores) of each loop's own body, in address order."""
    spans = model._loops(instructions)
    out = []
    for (start, end), region in zip(spans, regions[1:]):
        inner = [(s, e) for s, e in spans if start < s and e <= end]
        own = [
            instructions[i]["op"]
            for i in range(start, end + 1)
            if not any(s <= i <= e for s, e in inner)
        ]
        mma = sum(model._macs(op) is not None for op in own)
        loads = sum(op.split(".")[0] == "LDG" for op in own)
        stores = sum(op.split(".")[0] == "STG" for op in own)
        out.append((region.depth, mma, loads, stores))
    return out


@functools.cache
def compiled(name: str) -> tuple[model.Compiled, tuple[Loop, ...]]:
    """The twin's kernel `name` (KERNELS) as compiled, and its listed loops; raises
    LoopsChanged when the compiled loops are not the listed ones."""
    listing = KERNELS[name]
    functions = _functions(listing.source)
    mangled = next((m for m in functions if re.search(listing.pattern, m)), None)
    if mangled is None:
        raise NotModelled(
            f"{name}: no kernel matching {listing.pattern!r} in csrc/{listing.source}'s cubin"
        )
    text, resources = functions[mangled]
    instructions = static.parse_sass(text)
    warps = listing.threads // 32
    regions = model.regions(instructions, warps, else_sides)
    found = _signature(instructions, regions)
    listed = [(loop.depth, loop.mma, loop.loads, loop.stores) for loop in listing.loops]
    if found != listed:
        raise LoopsChanged(
            f"{name}: compiled loops (depth, MMA, loads, stores) {found}, listed {listed}: "
            f"the kernel or the compiler changed (the list is nvcc {NVCC_RELEASE}'s, this is "
            f"nvcc {nvcc_release()})"
        )
    registers = int(re.search(r"REG:(\d+)", resources)[1])
    # cuobjdump counts the 1 KiB the SM reserves per CTA in a kernel's static shared memory
    # (none without any); static.ctas_per_sm adds it itself
    shared = max(0, int(re.search(r"SHARED:(\d+)", resources)[1]) - 1024)
    spill = int(re.search(r"LOCAL:(\d+)", resources)[1])
    kernel = model.Compiled(
        name,
        warps,
        registers,
        spill,
        shared,
        static.ctas_per_sm(registers, shared, listing.threads),
        regions,
    )
    return kernel, listing.loops


def _launch(name: str, programs: int, at: dict) -> model.Launch:
    kernel, loops = compiled(name)
    return model.Launch(kernel, programs, lambda region: loops[region.index - 1].trips(at))


# --- the launchers (csrc/nt_xent.cu), mirrored ---------------------------------------------------


def split_columns(m: int, requested: int) -> tuple[int, int]:
    """(columns per split, non-empty splits) for a requested split count (`split_columns`)."""
    tiles = math.ceil(m / BN)
    want = min(max(requested, 1), min(tiles, MAX_SPLITS))
    cols = math.ceil(tiles / want) * BN
    return cols, math.ceil(m / cols)


def column_splits(m: int, d: int, rows: int, backward: bool) -> int:
    """The split count `fcl_nt_xent_splits` picks on an H100 (its SMs)."""
    if m < 2 or d < 1 or rows < 1:
        return 1
    blocks = math.ceil(rows / BM) * (math.ceil(d / BD) if backward else 1)
    wanted = math.ceil(BLOCKS_PER_SM * model.SMS / blocks)
    most = math.ceil(math.ceil(m / BN) / MIN_TILES_PER_SPLIT)
    return split_columns(m, min(wanted, most))[1]


def _lane(d: int) -> int:
    return math.ceil(d / 32)


def score_tiles(call: tuple[str, dict]) -> int:
    """The 64 x 64 tiles of S one call computes (backward: once per 128 features, with its
    A Z product); 0 for the calls without tensor-core work."""
    method, s = call
    if method not in ("lse_rows", "grad_rows"):
        return 0
    d_blocks = math.ceil(s["d"] / BD) if method == "grad_rows" else 1
    return math.ceil(s["rows"] / BM) * math.ceil(s["m"] / BN) * d_blocks


def launches(call: tuple[str, dict]) -> list[model.Launch]:
    """The kernel launches of one recorded extension call (`Extension`)."""
    method, s = call
    if "objective" in method:
        return objective_launches(call)
    d, warps = s["d"], THREADS // 32
    if method in ("normalize", "norm_backward"):  # a warp per pair, a warp per row
        rows = s["n"] if method == "normalize" else s["rows"]
        return [_launch(method, math.ceil(rows / warps), {"lane": _lane(d)})]
    m, rows = s["m"], s["rows"]
    backward = method == "grad_rows"
    cols, splits = split_columns(m, column_splits(m, d, rows, backward))
    at = {"d": d, "k_steps": math.ceil(d / BK), "tiles": cols // BN}
    if not backward:
        out = [_launch("lse", math.ceil(rows / BM) * splits, at)]
        if splits > 1:
            out.append(_launch("merge_lse", math.ceil(rows / THREADS), {"splits": splits}))
        return out
    at.update(g_store=BM * BD // THREADS, losses=math.ceil(m / THREADS))
    out = [_launch("grad", math.ceil(rows / BM) * math.ceil(d / BD) * splits, at)]
    if splits > 1:
        count = rows * d
        blocks = min(count // THREADS + 1, SUM_SPLITS_BLOCKS)
        per_thread = math.ceil(count / (blocks * THREADS))
        out.append(_launch("sum_splits", blocks, {"splits": splits, "per_thread": per_thread}))
    return out


def objective_at(n: int, d: int, k: int, f: int = 0) -> dict:
    """The trip keys of csrc/objective.cu's kernels at a shape (`OBJECTIVE_KERNELS`)."""
    blocks, k2 = math.ceil(n / BP), 2 * k
    per = {"_lane": 32, "_block": THREADS, "_epi": EPILOGUE_THREADS}
    items = {"d": d, "k": k, "f": f, "k2": k2, "k2sq": k2 * k2, "kf": k * f, "m": 2 * n, "n": n}
    at = {
        f"{x}{suffix}": math.ceil(items[x] / width) for x in items for suffix, width in per.items()
    }
    return dict(
        at,
        k=k,
        k2=k2,
        blocks=blocks,
        tiles=math.ceil(2 * n / 32),  # BN = 32 columns a tile
        k_steps=math.ceil(d / 32),  # BK = 32 features a step
        n_warps=math.ceil(n / (EPILOGUE_THREADS // 32)),
        warps=EPILOGUE_THREADS // 32,  # block_sum's partials
    )


def objective_launches(call: tuple[str, dict]) -> list[model.Launch]:
    """The kernel launches of one recorded one-pass objective call (csrc/objective.cu's
    launchers): a block per 16 pairs, the one-block epilogues, the centres' split sums."""
    method, s = call
    at = objective_at(s["n"], s["d"], s["k"], s.get("f", 0))
    blocks = at["blocks"]
    if method == "anchor_objective_forward":
        return [_launch("anchor_forward", blocks, at), _launch("anchor_epilogue", 1, at)]
    if method == "anchor_objective_backward":
        count = s["k"] * s["f"]
        grid = min(count // EPILOGUE_THREADS + 1, SUM_SPLITS_BLOCKS)
        split = {"splits": blocks, "per_thread": math.ceil(count / (grid * EPILOGUE_THREADS))}
        return [_launch("anchor_backward", blocks, at), _launch("anchor_sum_splits", grid, split)]
    if method == "cc_objective_forward":
        return [_launch("cc_forward", blocks, at), _launch("cc_epilogue", 1, at)]
    return [_launch("cc_weights", 1, at), _launch("cc_backward", blocks, at)]


# --- the torch ops around the launches ----------------------------------------------------------


class Extension:
    """A stand-in for the compiled extension's NT-Xent building blocks (csrc/nt_xent_binding.cpp):
    each call is recorded with its sizes and answered with meta tensors of the real results'
    shapes and dtypes."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def _workspace(self, floats: int) -> None:
        """The fp32 scratch the binding allocates for the launch, alive during the call."""
        self._empty(floats)

    @staticmethod
    def _empty(*size, dtype=None):
        import torch

        return torch.empty(*size, dtype=dtype or torch.float32, device="meta")

    def normalize(self, z_a, z_b):
        import torch

        n, d = z_a.shape
        self.calls.append(("normalize", {"n": n, "d": d}))
        normed = torch.float32 if z_a.dtype == torch.float32 else torch.float16
        return (
            self._empty(2 * n, d, dtype=normed),
            *(self._empty(2 * n) for _ in range(2)),
            (self._empty(n)),
        )

    def lse_rows(self, zs, rs, row_start, row_end, inv_tau, splits=0):
        m, d = zs.shape
        self.calls.append(("lse_rows", {"m": m, "d": d, "rows": row_end - row_start}))
        return self._empty(row_end - row_start)

    def grad_rows(self, zs, rs, lse, row_loss, row_start, row_end, inv_tau, splits=0, weight=None):
        m, d = zs.shape
        self.calls.append(("grad_rows", {"m": m, "d": d, "rows": row_end - row_start}))
        return self._empty(row_end - row_start, d)

    def norm_backward(self, zs, rs, norm, g, row_start, row_end, grad_out, factor, out):
        rows, d = g.shape
        self.calls.append(("norm_backward", {"rows": rows, "d": d}))
        return self._empty(rows, d, dtype=out)

    def anchor_objective_forward(self, z_a, z_b, h0, h_a, h_b, centers, *scalars):
        (n, d), (k, f) = z_a.shape, centers.shape
        self.calls.append(("anchor_objective_forward", {"n": n, "d": d, "k": k, "f": f}))
        self._workspace(math.ceil(n / BP) * k + n + 2 * n * k)
        return [self._empty(4), self._empty(5, 2 * n), self._empty(7, n), self._empty(k)]

    def anchor_objective_backward(self, z_a, z_b, h0, h_a, h_b, centers, *state_and_scalars):
        (n, d), (k, f) = z_a.shape, centers.shape
        self.calls.append(("anchor_objective_backward", {"n": n, "d": d, "k": k, "f": f}))
        self._workspace(2 * n * d + 3 * n * k + math.ceil(n / BP) * k * f)
        return [self._empty(*t.shape, dtype=t.dtype) for t in (z_a, z_b, h0, h_a, h_b, centers)]

    def cc_objective_forward(self, z_a, z_b, logits_a, logits_b, *scalars):
        (n, d), k = z_a.shape, logits_a.shape[1]
        self.calls.append(("cc_objective_forward", {"n": n, "d": d, "k": k}))
        self._workspace(math.ceil(n / BP) * (4 * k * k + 2 * k))
        sizes = ((3,), (5, 2 * n), (2, n), (2 * k, 2 * k), (3, 2 * k))
        return [self._empty(*size) for size in sizes]

    def cc_objective_backward(self, z_a, z_b, logits_a, logits_b, *state_and_scalars):
        (n, d), k = z_a.shape, logits_a.shape[1]
        self.calls.append(("cc_objective_backward", {"n": n, "d": d, "k": k}))
        self._workspace(2 * n * d + 4 * k * k + 2 * k)
        return [self._empty(*t.shape, dtype=t.dtype) for t in (z_a, z_b, logits_a, logits_b)]


@contextlib.contextmanager
def stand_in(extension: Extension):
    """backend="cuda" on meta tensors: the extension is `extension`, the device checks pass."""
    from unittest import mock

    from ..backends.cuda import build

    with (
        mock.patch.object(build, "extension", lambda: extension),
        mock.patch.object(build, "require_device", lambda device: None),
    ):
        yield


def nt_xent_path(n: int, d: int, ranks: int = 1):
    """(launches, the torch ops around them, tensor-core tiles) of one forward + backward of
    NT-Xent on the twin, bf16 N x D views (per rank, gathered over `ranks`)."""
    from ..backends import cuda  # noqa: F401  (registers backend "cuda")
    from . import trace

    extension = Extension()
    with stand_in(extension):
        recorded = trace.nt_xent("cuda", n, d, ranks)
    out = [launch for call in extension.calls for launch in launches(call)]
    return out, recorded.kernels, sum(score_tiles(call) for call in extension.calls)


def objective_path(total: Callable, inputs: list):
    """(launches, the torch ops around them, MMA loop bodies) of one forward + backward of
    `total(*inputs)` on the twin (an objective on backend "cuda"), traced on meta tensors."""
    from ..backends import cuda  # noqa: F401  (registers backend "cuda")
    from . import trace

    extension = Extension()
    with stand_in(extension):
        recorded = trace.record(total, inputs, triton=True)
    out = [launch for call in extension.calls for launch in launches(call)]
    return out, recorded.kernels, sum(launch.mma_bodies() for launch in out)
