"""Static sm_90a report of every Triton kernel variant: what an H100/H200 will run, read from the
compiled code without a GPU (`python -m fastcluster_cl.bench static --json PATH`).

Each variant is compiled with `triton.compile(..., target=GPUTarget("cuda", 90, 32))`, which
uses the ptxas bundled in the triton wheel; cuobjdump gives registers and the local-memory stack
(spills), nvdisasm the SASS. The column loop is the backward branch whose body holds the most
tensor-core instructions (HGMMA, or HMMA/DMMA/FFMA for the paths without wgmma); its
steady-state path is that body without the forward-branch regions that hold no MMA (the
diagonal, padding and positive-pair masks that only edge tiles take).

Per variant (one JSON object each): kernel, dtype, block ("MxNxD"), num_warps, registers,
spill_bytes (STACK per thread), shared_bytes, ctas_per_sm (bounded by registers, shared memory,
threads and 32 CTAs), mma_per_tile (MMA instructions the CTA issues per column tile: SASS count
x warpgroups for HGMMA, x warps for HMMA), mma_floor_per_tile (what the tile's GEMMs need in
instructions of the shape the compiler chose), ex2_per_tile (MUFU.EX2 per tile, all threads),
tile_elements (BLOCK_M x BLOCK_N), instructions_per_tile (per warp, steady path) and

    issue_ceiling = min(1, T_mma / T_issue),
    T_mma   = tile_macs / MACS_PER_CLOCK          (tensor-core clocks of the tile's GEMMs)
    T_issue = instructions_per_tile * num_warps / 4   (each SM issues 4 warp-instructions/clock)

the fraction of the tensor-core peak that instruction issue alone allows (1 = MMA-bound).
MACS_PER_CLOCK is the dense rate of one H100/H200 SM: 2048 for fp16/bf16, 1024 for tf32. Beside
it, ex2_ceiling = min(1, T_mma / (ex2_per_tile / EX2_PER_CLOCK)), the same bound from the MUFU
units (16 exp2 per clock per SM): a kernel is at best min(issue_ceiling, ex2_ceiling) of peak.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

SM_REGISTERS = 65536
SM_SHARED = 228 * 1024  # per SM; 1 KiB of it is reserved per CTA
BLOCK_SHARED_LIMIT = 227 * 1024
SM_THREADS = 2048
SM_CTAS = 32
ISSUE_PER_CLOCK = 4
EX2_PER_CLOCK = 16
# dense tensor-core multiply-adds per SM per clock (H100 SXM: 989 fp16, 495 tf32, 67 fp64
# TFLOP/s on 132 SMs at 1.83-1.98 GHz)
MACS_PER_CLOCK = {"fp16": 2048, "bf16": 2048, "tf32": 1024, "fp64": 128}
_MMA = re.compile(r"^(HGMMA|HMMA|DMMA|IMMA)\.(\d+)x(\d+)x(\d+)")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)(.*?);")
_LABEL = re.compile(r"^(\.L\w+):")
_BRANCH_TARGET = re.compile(r"`\((\.L\w+)\)")


@dataclass
class Variant:
    """One compiled configuration: `gemms` are the (M, N, K) products of one column tile."""

    kernel: str
    dtype: str
    fn: object
    pointers: dict
    constexprs: dict
    num_warps: int
    block: tuple[int, ...]
    num_stages: int = 2
    gemms: tuple[tuple[int, int, int], ...] = ()
    precision: str = "fp16"
    targets: dict = field(default_factory=dict)
    elements: int = 0  # S elements per column step when not BLOCK_M x BLOCK_N (column pairs)
    floats: tuple[str, ...] = ()  # fp32 scalar arguments (the rest are i32)


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


# The (hi, lo) fp32 halves of a host float (`kernels._common.split_floats`), by their names.
_SPLIT_FLOAT = ("_hi", "_lo")


def compile_variant(v: Variant):
    """The compiled kernel (cubin and metadata) for sm_90a. Every constexpr of the kernel must be
    given, or have a default (as a launch leaving it out takes): one left out would compile as
    an i32 argument, both sides of its branches kept."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget

    defaults = {
        name: p.default
        for name, p in inspect.signature(v.fn.fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    v = replace(v, constexprs={**defaults, **v.constexprs})
    missing = [
        name
        for i, name in enumerate(v.fn.arg_names)
        if i in v.fn.constexprs and name not in v.constexprs
    ]
    if missing:
        raise ValueError(f"{v.kernel}: constexprs not given: {', '.join(missing)}")

    signature = {
        name: (
            "constexpr"
            if name in v.constexprs
            else f"*{v.pointers[name]}"
            if name in v.pointers
            else "fp32"
            if name in v.floats or name.endswith(_SPLIT_FLOAT)
            else "i32"
        )
        for name in v.fn.arg_names
    }
    # As the JIT specialises a launch at D = 128 and a batch that is a multiple of 16: every
    # pointer 16-byte aligned and every integer argument divisible by 16.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(v.fn.arg_names)
        if signature[name] not in ("constexpr", "fp32")
    }
    return triton.compile(
        triton.compiler.ASTSource(v.fn, signature, v.constexprs, attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": v.num_warps, "num_stages": v.num_stages},
    )


def _tool_output(tool: str, args: list[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [_bin(tool), *args, f.name], capture_output=True, text=True, check=True
        ).stdout


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes per thread) from cuobjdump."""
    usage = _tool_output("cuobjdump", ["-res-usage"], cubin)
    line = next(line for line in usage.splitlines() if "REG:" in line)
    return int(re.search(r"REG:(\d+)", line)[1]), int(re.search(r"STACK:(\d+)", line)[1])


def parse_sass(text: str) -> list[dict]:
    """Instructions in order: {"addr", "pred", "op", "target", "args", "target_index"} (target:
    the label a branch jumps to)."""
    out, labels = [], {}
    pending = []
    for line in text.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            pending.append(label[1])
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        for name in pending:
            labels[name] = len(out)
        pending = []
        target = _BRANCH_TARGET.search(m[4])
        out.append(
            {
                "addr": int(m[1], 16),
                "pred": (m[2] or "").strip(),
                "op": m[3],
                "target": target[1] if target else None,
                "args": m[4].strip(),
            }
        )
    for ins in out:
        ins["target_index"] = labels.get(ins["target"]) if ins["target"] else None
    return out


# mma.sync shapes as the SASS names them (HMMA.16816, HMMA.1688.F32.TF32, DMMA.884): m, n, k
_SYNC_MMA = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}


def mma_shape(op: str) -> tuple[int, int, int] | None:
    """(m, n, k) of one MMA instruction: HGMMA.MxNxK (issued per warpgroup) or an mma.sync
    HMMA / DMMA (per warp); None for any other instruction."""
    m = _MMA.match(op)
    if m:
        return int(m[2]), int(m[3]), int(m[4])
    parts = op.split(".")
    if parts[0] in ("HMMA", "DMMA") and len(parts) > 1:
        return _SYNC_MMA.get(parts[1])
    return None


def _is_mma(op: str) -> bool:
    return mma_shape(op) is not None


def steady_loop(instructions: list[dict]) -> list[dict]:
    """The steady-state path of the column loop (see the module docstring); [] if none."""
    loops = [
        (ins["target_index"], i)
        for i, ins in enumerate(instructions)
        if ins["op"].startswith("BRA")
        and ins["target_index"] is not None
        and ins["target_index"] < i
    ]  # not the trap at the end (a branch to itself)
    if not loops:
        return []

    def mma_count(start, end):
        return sum(_is_mma(ins["op"]) for ins in instructions[start : end + 1])

    def has_ex2(start, end):
        return any(ins["op"].startswith("MUFU.EX2") for ins in instructions[start : end + 1])

    def key(span):
        # The most MMAs; without any, a loop with exponentials (a 4-byte kernel's FFMA column
        # loop, not the backward's scan of the forward's largest losses); among equals the
        # shortest span (a cold block branching back into the loop would otherwise drag the
        # epilogue in).
        mma = mma_count(*span)
        return mma, not mma and has_ex2(*span), span[0] - span[1]

    start, end = max(loops, key=key)
    skipped = cold_indices(instructions, start, end)
    return [ins for i, ins in enumerate(instructions[start : end + 1], start) if i not in skipped]


def cold_indices(
    instructions: list[dict], start: int, end: int, is_mma=_is_mma, predicated: bool = True
) -> set[int]:
    """Indices inside loop [start, end] jumped over by a predicated forward branch (with
    `predicated` False: an unconditional one) with no MMA in between: in Triton's SASS the
    edge-tile code (masks, the diagonal) that steady iterations skip."""
    cold = set()
    for i in range(start, end):
        ins = instructions[i]
        t = ins["target_index"]
        if (
            ins["op"].startswith("BRA")
            and bool(ins["pred"]) == predicated
            and t is not None
            and i < t <= end
            and not any(is_mma(x["op"]) for x in instructions[i + 1 : t])
        ):
            cold.update(range(i + 1, t))
    return cold


def ctas_per_sm(registers: int, shared: int, threads: int) -> int:
    """Resident CTAs per SM: registers (allocated per warp in units of 256), shared memory
    (1 KiB reserved per CTA), threads and the 32-CTA limit."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = SM_REGISTERS // (per_warp * (threads // 32))
    by_shared = SM_SHARED // (shared + 1024) if shared else SM_CTAS
    return max(0, min(by_regs, by_shared, SM_THREADS // threads, SM_CTAS))


def analyse(v: Variant) -> dict:
    """Compile one variant and measure it (module docstring)."""
    kernel = compile_variant(v)
    cubin = kernel.asm["cubin"]
    registers, stack = resource_usage(cubin)
    shared = kernel.metadata.shared
    loop = steady_loop(parse_sass(_tool_output("nvdisasm", ["-c"], cubin)))
    threads = 32 * v.num_warps
    mma = [mma_shape(ins["op"]) + (ins["op"],) for ins in loop if _is_mma(ins["op"])]
    per_issue = [
        (v.num_warps // 4 if op.startswith("HGMMA") else v.num_warps, m * n * k)
        for m, n, k, op in mma
    ]
    issued = sum(count for count, _ in per_issue)
    tile_macs = sum(m * n * k for m, n, k in v.gemms)
    floor = None
    if issued and tile_macs:  # tile_macs / (issued MACs per instruction), rounded up
        floor = -(-tile_macs * issued // sum(c * macs for c, macs in per_issue))
    ex2 = sum(ins["op"].startswith("MUFU.EX2") for ins in loop) * threads
    ceiling = ex2_ceiling = None
    if loop and tile_macs and v.precision in MACS_PER_CLOCK:
        t_mma = tile_macs / MACS_PER_CLOCK[v.precision]
        ceiling = round(min(1.0, t_mma / (len(loop) * v.num_warps / ISSUE_PER_CLOCK)), 3)
        ex2_ceiling = round(min(1.0, t_mma * EX2_PER_CLOCK / ex2), 3) if ex2 else 1.0
    tile_elements = v.elements or (v.block[0] * v.block[1] if len(v.block) == 3 else None)
    return {
        "kernel": v.kernel,
        "dtype": v.dtype,
        "block": "x".join(map(str, v.block)),
        "num_warps": v.num_warps,
        "registers": registers,
        "spill_bytes": stack,
        "shared_bytes": shared,
        "ctas_per_sm": ctas_per_sm(registers, shared, threads),
        "mma_per_tile": issued if loop else None,
        "mma_floor_per_tile": floor,
        "ex2_per_tile": ex2 if loop else None,
        "tile_elements": tile_elements,
        "instructions_per_tile": len(loop) or None,
        "issue_ceiling": ceiling,
        "ex2_ceiling": ex2_ceiling,
        "targets": v.targets,
    }


def check_targets(row: dict) -> list[str]:
    """The targets a variant carries (see `variants`) that its row misses."""
    t, missed = row["targets"], []
    if t.get("no_spills") and row["spill_bytes"]:
        missed.append(f"spills {row['spill_bytes']} B")
    if t.get("mma_at_floor") and row["mma_per_tile"] != row["mma_floor_per_tile"]:
        missed.append(f"mma {row['mma_per_tile']} vs floor {row['mma_floor_per_tile']}")
    if "ex2_per_element" in t and (row["ex2_per_tile"] or 0) > t["ex2_per_element"] * (
        row["tile_elements"] or 0
    ):
        missed.append(f"ex2 {row['ex2_per_tile']} for {row['tile_elements']} elements")
    if "ctas_per_sm" in t and row["ctas_per_sm"] < t["ctas_per_sm"]:
        missed.append(f"{row['ctas_per_sm']} CTAs/SM")
    if "issue_ceiling" in t and (row["issue_ceiling"] or 0) < t["issue_ceiling"]:
        missed.append(f"issue ceiling {row['issue_ceiling']}")
    if row["shared_bytes"] > BLOCK_SHARED_LIMIT:
        missed.append(f"shared {row['shared_bytes']} B > {BLOCK_SHARED_LIMIT}")
    return missed


# Targets of the NT-Xent kernels in the tensor-core dtypes (kernel-core issue): no spills, no
# duplicated MMA work, at most one exp per S element, two CTAs per SM, and instruction issue
# leaving room for the tensor cores.
_NT_XENT_FWD = dict(
    no_spills=True, mma_at_floor=True, ex2_per_element=1.0, ctas_per_sm=2, issue_ceiling=0.6
)
_NT_XENT_BWD = dict(_NT_XENT_FWD, issue_ceiling=0.5)


# Pointer dtypes of the NT-Xent kernels' arguments other than Z (bf16 gradients, fp32 rest).
NT_XENT_POINTERS = {
    "PART": "fp32",
    "RS": "fp32",
    "NORMS": "fp32",
    "DIST": "fp32",
    "LSE": "fp32",
    "ROW_W": "fp32",
    "ROW_G": "fp32",
    "ROW_LOSS": "fp32",
    "LOSS_MAX": "fp32",
    "DZ": "bf16",
    "GRAD_OUT": "fp32",
    "G": "fp32",
    "ROW_SUM": "fp32",
    "COL_SUM": "fp32",
}


def nt_xent_merge_variants(d: int) -> list[Variant]:
    """The column-split launches' merges (`nt_xent.column_splits`), bf16 Z of D features:
    the forward's (row sums to lse) and the backward's (partial rows to dL/dz in bf16 through
    the epilogue)."""
    import triton.language as tl

    nt = kernel_module("nt_xent")
    acc = dict(ACC=tl.float32)
    return [
        Variant(
            "nt_xent fwd merge",
            "bf16/fp16",
            nt._lse_merge_kernel,
            NT_XENT_POINTERS,
            dict(FIXED_SHIFT=True, BLOCK=nt.LSE_MERGE_ROWS, **acc),
            4,
            (nt.LSE_MERGE_ROWS,),
            targets=dict(no_spills=True),
        ),
        Variant(
            f"nt_xent bwd merge D={d}",
            "bf16",
            nt._grad_merge_kernel,
            dict(NT_XENT_POINTERS, Z="fp16", DZ="bf16"),
            dict(
                EPILOGUE=True,
                PER_ROW=False,
                BLOCK_M=nt.prologue_rows(d),
                BLOCK_D=nt.row_width(d, "Z"),
                **acc,
            ),
            4,
            (nt.prologue_rows(d), d),
            targets=dict(no_spills=True),
        ),
    ]


def kernel_module(name: str):
    """A module of the kernels package by name: the package re-exports functions of the same
    names (its `nt_xent` attribute is the function), so the module comes from sys.modules."""
    import fastcluster_cl.kernels  # noqa: F401

    return sys.modules[f"fastcluster_cl.kernels.{name}"]


def _nt_xent_variants() -> list[Variant]:
    import torch
    import triton.language as tl

    nt = kernel_module("nt_xent")

    out = []
    d = 128
    pointers = NT_XENT_POINTERS
    # bf16 and fp16 inputs both run on the fp16 copy Zs (the prologue); fp32 on TF32 tensor
    # cores where torch allows TF32 matmuls, else ("ieee", torch's default) on FMA units.
    for dtype, zs, precision in (
        ("bf16/fp16", torch.float16, "fp16"),
        ("fp32 tf32", torch.float32, "tf32"),
        ("fp32 ieee", torch.float32, "ieee"),
    ):
        common = dict(ACC=tl.float32, UPCAST=False, PREC="tf32" if precision == "tf32" else "ieee")
        ptrs = dict(pointers, Z="fp16" if precision == "fp16" else "fp32")
        fwd = nt.forward_config(d, zs)
        bwd = nt.backward_config(d, zs, common["PREC"])
        # Unsplit (every column a program, as at 2N = 65536), and, for bf16, the column-split
        # launches of smaller batches (`nt_xent.column_splits`; their merges below); for bf16
        # also the 128-row ("tall") tiles from `nt_xent.TALL_ROWS` rows.
        splits = (False, True) if precision == "fp16" else (False,)
        talls = ("", " tall") if precision == "fp16" else ("",)
        for tall in talls:
            config = nt.forward_config(d, zs, nt.TALL_ROWS) if tall else fwd
            for fixed, split in [(True, s) for s in splits] + [(False, False)]:
                out.append(
                    Variant(
                        f"nt_xent fwd{tall}{'' if fixed else ' online-max'}"
                        f"{' split' if split else ''}",
                        dtype,
                        nt._lse_fwd_kernel,
                        ptrs,
                        dict(SPLIT=split, FIXED_SHIFT=fixed, **common, **config.constexprs),
                        config.num_warps,
                        config.block,
                        config.num_stages,
                        gemms=((config.block[0], config.block[1], d),),
                        precision=precision,
                        targets=_NT_XENT_FWD
                        if fixed and not split and precision == "fp16"
                        else dict(no_spills=True)
                        if split
                        else {},
                    )
                )
        # The mean's backward carries the targets; the per-row one (reduction="none") and the
        # split one (its epilogue in the merge) only no spills.
        for per_row, split in [(False, s) for s in splits] + [(True, False)]:
            out.append(
                Variant(
                    f"nt_xent bwd{' per-row' if per_row else ''}{' split' if split else ''}",
                    dtype,
                    nt._grad_kernel,
                    dict(ptrs, DZ="fp32") if split else ptrs,  # split: fp32 partial rows
                    dict(
                        SPLIT=split,
                        EPILOGUE=not split,
                        PER_ROW=per_row,
                        FIXED_SHIFT=True,
                        **common,
                        **bwd.constexprs,
                    ),
                    bwd.num_warps,
                    bwd.block,
                    bwd.num_stages,
                    gemms=((bwd.block[0], bwd.block[1], d), (bwd.block[0], d, bwd.block[1])),
                    precision=precision,
                    targets=(_NT_XENT_BWD if not (per_row or split) else dict(no_spills=True))
                    if precision == "fp16"
                    else {},
                )
            )
    # bf16 rows wider than 128 features (fp16 Zs, fp32 accumulation):
    common = dict(ACC=tl.float32, UPCAST=False, PREC="ieee")
    # 129-256 features: the forward's 128 x 32 tiles on two warpgroups, unsplit and split.
    mid = 256
    config = nt.forward_config(mid, torch.float16)
    for split in (False, True):
        out.append(
            Variant(
                f"nt_xent fwd D={mid}{' split' if split else ''}",
                "bf16/fp16",
                nt._lse_fwd_kernel,
                dict(pointers, Z="fp16"),
                dict(SPLIT=split, FIXED_SHIFT=True, **common, **config.constexprs),
                config.num_warps,
                config.block,
                config.num_stages,
                gemms=((config.block[0], config.block[1], mid),),
                targets=dict(no_spills=True) if split else _NT_XENT_FWD,
            )
        )
    # Rows wider than the registers hold (ResNet-50's 2048 features): feature chunks forward
    # and for the backward's weight slab (their tiles by the batch's rows: below FEW_WIDE_ROWS,
    # below TALL_ROWS, from it), then the slab's product with Zs (a GEMM over the columns),
    # the epilogue in the merge.
    wide = 2048
    bwd = nt.backward_config(wide, torch.float16)
    slab = dict(pointers, Z="fp16", SLAB="fp16")
    for rows in (0, nt.FEW_WIDE_ROWS, nt.TALL_ROWS):
        fwd = nt.forward_config(wide, torch.float16, rows)
        chunked = dict(BLOCK_M=fwd.block[0], BLOCK_N=fwd.block[1], BLOCK_K=fwd.chunk)
        tiles = f"{fwd.block[0]}x{fwd.block[1]}x{fwd.chunk}"
        for name, kernel, constexprs in (
            ("fwd", nt._lse_fwd_kernel, dict(SPLIT=False, **fwd.constexprs)),
            ("bwd weights", nt._weight_slab_kernel, dict(PER_ROW=False, **chunked)),
        ):
            out.append(
                Variant(
                    f"nt_xent {name} D={wide} {tiles}",
                    "bf16/fp16",
                    kernel,
                    slab,
                    dict(constexprs, FIXED_SHIFT=True, **common),
                    fwd.num_warps,
                    fwd.block,
                    fwd.num_stages,
                    gemms=((*fwd.block[:2], fwd.chunk),),  # the steady loop: a chunk's scores
                    precision="fp16",
                    targets=dict(no_spills=True),
                )
            )
    out.append(
        Variant(
            f"nt_xent bwd product D={wide}",
            "bf16/fp16",
            nt._slab_product_kernel,
            slab,
            dict(BLOCK_M=bwd.block[0], BLOCK_N=bwd.block[1], BLOCK_K=bwd.block[2], **common),
            bwd.num_warps,
            bwd.block,
            bwd.num_stages,
            gemms=(bwd.block,),  # a k-step
            precision="fp16",
            targets=dict(no_spills=True),
        )
    )
    for width in (d, 512, wide):
        merges = nt_xent_merge_variants(width)
        out.extend(merges if width == d else merges[1:])  # the forward's merge has no D
        rows = nt.prologue_rows(width)
        out.append(
            Variant(
                f"nt_xent prologue D={width}",
                "bf16",
                nt._scale_rows_kernel,
                dict(pointers, ZA="bf16", ZB="bf16", ZS="fp16"),
                dict(TINY=1.1754943508222875e-38, ACC=tl.float32, BLOCK_R=rows, BLOCK_D=width),
                4,
                (rows, width),
                targets=dict(no_spills=True),
            )
        )
    sym = dict(ACC=tl.float32, UPCAST=False, PREC="ieee", BLOCK=64, BLOCK_D=d)
    out.append(
        Variant(
            "nt_xent symmetric fwd",
            "bf16/fp16",
            nt._symmetric_fwd_kernel,
            dict(pointers, Z="fp16"),
            sym,
            4,
            (64, 64, d),
            gemms=((64, 64, d),),
        )
    )
    out.append(
        Variant(
            "nt_xent symmetric bwd",
            "bf16/fp16",
            nt._symmetric_grad_kernel,
            dict(pointers, Z="fp16"),
            dict(sym, FIXED_SHIFT=True),
            4,
            (64, 64, d),
            gemms=((64, 64, d), (64, d, 64), (64, d, 64)),
        )
    )
    return out


def _nt_xent_bank_variants() -> list[Variant]:
    """NT-Xent against a memory bank (kernels/nt_xent_bank.py) at D = 128: the row-parallel
    forward (fixed shift and online max) and backward, bf16/fp16 inputs with the fp32 bank split
    into fp16 hi + lo (the module's bank, two score products) or an fp16 bank (one), and fp32
    inputs; for the fp32 bank also the column-split forward and backward and the backward's
    merge. Target: no spills."""
    import torch
    import triton.language as tl

    bank, nt = kernel_module("nt_xent_bank"), kernel_module("nt_xent")
    d, out = 128, []
    pointers = {
        "RS": "fp32",
        "NORMS": "fp32",
        "DIST": "fp32",
        "ROW_W": "fp32",
        "ROW_LOSS": "fp32",
        "W": "fp32",
        "DZA": "bf16",
        "DZB": "bf16",
        "PART": "fp32",
    }
    for dtype, zs, precision, hi_lo in (
        ("bf16/fp16, fp32 bank", torch.float16, "fp16", True),
        ("bf16/fp16, fp16 bank", torch.float16, "fp16", False),
        ("fp32 tf32", torch.float32, "tf32", False),
    ):
        common = dict(
            ACC=tl.float32,
            UPCAST=False,
            PREC="ieee" if precision == "fp16" else precision,
            HI_LO=hi_lo,
        )
        operand = "fp16" if precision == "fp16" else "fp32"
        ptrs = dict(pointers, ZS=operand, BANK=operand, BANK_LO=operand)
        fwd = nt.forward_config(d, zs)
        scores = 2 if hi_lo else 1
        # Unsplit, and, for the fp32 bank, the column-split launches (`nt_xent.column_splits`)
        splits = (False, True) if hi_lo else (False,)
        for fixed, split in [(True, s) for s in splits] + [(False, False)]:
            out.append(
                Variant(
                    f"nt_xent_bank fwd{'' if fixed else ' online-max'}{' split' if split else ''}",
                    dtype,
                    bank._bank_fwd_kernel,
                    ptrs,
                    dict(SPLIT=split, FIXED_SHIFT=fixed, **common, **fwd.constexprs),
                    fwd.num_warps,
                    fwd.block,
                    fwd.num_stages,
                    gemms=((fwd.block[0], fwd.block[1], d),) * scores,
                    precision=precision,
                    targets=dict(no_spills=True),
                )
            )
        for split in splits:
            bwd = bank.bank_backward_config(d, zs, common["PREC"], epilogue=not split)
            out.append(
                Variant(
                    f"nt_xent_bank bwd{' split' if split else ''}",
                    dtype,
                    bank._bank_grad_kernel,
                    ptrs,
                    dict(SPLIT=split, FIXED_SHIFT=True, **common, **bwd.constexprs),
                    bwd.num_warps,
                    bwd.block,
                    bwd.num_stages,
                    gemms=((bwd.block[0], bwd.block[1], d),) * scores
                    + ((bwd.block[0], d, bwd.block[1]),),
                    precision=precision,
                    targets=dict(no_spills=True),
                )
            )
    rows = nt.prologue_rows(d)
    out.append(
        Variant(
            "nt_xent_bank bwd merge",
            "bf16",
            bank._bank_grad_merge_kernel,
            dict(pointers, ZS="fp16"),
            dict(ACC=tl.float32, BLOCK_M=rows, BLOCK_D=nt.feature_block(d, "Z")),
            4,
            (rows, d),
            targets=dict(no_spills=True),
        )
    )
    return out


# The KL row kernels' flags: (name, DEC, ANCHOR) of dec_loss, anchor_loss, dec_anchor_losses.
_KL_OPS = (("dec", True, False), ("anchor", False, True), ("dec+anchor", True, True))


def _cluster_variants() -> list[Variant]:
    """The K-sized kernels (no tile GEMM targets): they must compile within the shared-memory
    limit without spills at every K up to their documented limits."""
    import torch
    import triton.language as tl

    cc, st, kl = (kernel_module(m) for m in ("cc_cluster", "student_t", "kl"))
    clean = dict(no_spills=True)
    out = [
        Variant(
            "cc stats",
            "bf16",
            cc._stats_kernel,
            {"LA": "bf16", "LB": "bf16", "GRAM": "fp32", "COLSUM": "fp32"},
            dict(ACC=tl.float32, PREC="tf32", BLOCK_M=32, BLOCK_K=cc.MAX_CLUSTERS),
            4,
            (32, cc.MAX_CLUSTERS),
            targets=clean,
        ),
        Variant(
            "cc stats merge",
            "fp32",
            cc._stats_merge_kernel,
            dict.fromkeys(("GRAM", "COLSUM", "G", "C"), "fp32"),
            dict(
                ACC=tl.float32,
                BLOCK_P=cc._MERGE_PARTIALS,
                BLOCK_R=cc._MERGE_ROWS,
                BLOCK_K=cc.MAX_CLUSTERS,
            ),
            4,
            (cc._MERGE_ROWS, cc.MAX_CLUSTERS),
            targets=clean,
        ),
        Variant(
            "cc grad operands",
            "fp32",
            cc._grad_operands_kernel,
            dict.fromkeys(("DG", "DCS", "M", "DC"), "fp32"),
            dict(BLOCK_K=cc.MAX_CLUSTERS),
            4,
            (cc.MAX_CLUSTERS, cc.MAX_CLUSTERS),
            targets=clean,
        ),
        Variant(
            "cc grad",
            "bf16",
            cc._grad_kernel,
            {"LA": "bf16", "LB": "bf16", "DLA": "bf16", "DLB": "bf16", "M": "fp32", "DC": "fp32"},
            dict(ACC=tl.float32, PREC="tf32", BLOCK_M=32, BLOCK_K=cc.MAX_CLUSTERS),
            4,
            (32, cc.MAX_CLUSTERS),
            targets=clean,
        ),
    ]
    # the K-sized epilogue: one program each way at 2K = 20; row blocks sweeping column tiles
    # at K = 64 and 1000
    for k in (10, cc.MAX_CLUSTERS, 1000):
        _, consts = cc._epilogue_launch(torch.empty(2 * k, 2 * k, device="meta"))
        warps = consts.pop("num_warps")
        for name, kern, pointers in (
            (
                "fwd",
                cc._epilogue_fwd_kernel,
                dict.fromkeys(("GRAM", "COLSUM", "OUT", "LSE"), "fp32"),
            ),
            (
                "bwd",
                cc._epilogue_bwd_kernel,
                dict.fromkeys(("GRAM", "COLSUM", "GRAD", "LSE", "DGRAM", "DCOLSUM"), "fp32"),
            ),
        ):
            out.append(
                Variant(
                    f"cc epilogue {name} K={k}",
                    "fp32",
                    kern,
                    pointers,
                    consts,
                    warps,
                    (consts["BLOCK_R"], consts["BLOCK_C"]),
                    targets=clean,
                )
            )
    # above 64 clusters: Q and its bf16 parts from the bf16 logits, in one pass
    out.append(
        Variant(
            "cc assignments parts",
            "bf16",
            cc._assignments_kernel,
            {"LA": "bf16", "LB": "bf16", "Q": "fp32", "HI": "bf16", "MID": "bf16", "LO": "bf16"},
            dict(PARTS=True, ACC=tl.float32, BLOCK_M=cc._ASSIGN_ROWS, BLOCK_K=cc._ASSIGN_COLUMNS),
            4,
            (cc._ASSIGN_ROWS, cc._ASSIGN_COLUMNS),
            targets=clean,
        )
    )
    h = {
        "H": "bf16",
        "MU": "bf16",
        "Q": "fp32",
        "DQ": "fp32",
        "DH": "bf16",
        "G": "fp32",
    }
    # K is tiled: the tile (and the code) is the same for every K from 64; one split (K <= 64,
    # narrower tiles below 64) or several; bf16 centers, or AMP's fp32 ones (three bf16 parts)
    for k, centers in ((64, "bf16"), (1000, "bf16"), (10, "fp32"), (20, "fp32"), (1000, "fp32")):
        block_k, block_f = st._blocks(k, 128)
        for name, kern in (("fwd", st._fwd_kernel), ("bwd", st._bwd_kernel)):
            out.append(
                Variant(
                    f"student_t {name} K={k}" + (" fp32 centers" if centers == "fp32" else ""),
                    "bf16",
                    kern,
                    dict(h, MU=centers, PART="fp32", QDQ="fp32"),
                    dict(
                        PREC="ieee",
                        ACC=tl.float32,
                        UPCAST=False,
                        BLOCK_M=st._BLOCK_M,
                        BLOCK_K=block_k,
                        BLOCK_F=block_f,
                        SPLIT=k > block_k,
                    ),
                    4,
                    (st._BLOCK_M, block_k, block_f),
                    targets=clean,
                )
            )
    products = [
        (b, x, o, blocks)
        for b, x, o in (("bf16", "fp32", "fp32"), ("fp32", "bf16", "bf16"))  # dmu, dh
        for blocks in (st._PRODUCT_BLOCKS, st._LARGE_PRODUCT_BLOCKS)
    ]
    for b, x, out_dtype, blocks in products:
        out.append(
            Variant(
                f"student_t gradient product B {b} {blocks['BLOCK_M']}x{blocks['BLOCK_N']}",
                "bf16",
                st._gradient_product_kernel,
                {"A": "fp32", "B": b, "X": x, "SCALE": "fp32", "OUT": out_dtype, "PART": "fp32"},
                dict(UPCAST=False, SPLIT=False, **blocks),
                4,
                (blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]),
                targets=clean,
            )
        )
    q = dict.fromkeys(
        ("Q PARTIAL F Q0 QA QB ROWS TOTAL PART GRAD_DEC GRAD_ANCHOR DQ0 DQA DQB".split()),
        "fp32",
    )
    for k in (128, kl.MAX_CLUSTERS):  # tiled over K: 4096 compiles in seconds
        consts = kl._consts(torch.float32, k)
        warps = consts.pop("num_warps")
        block = (consts["BLOCK_M"], consts["BLOCK_K"])
        out.append(
            Variant(
                f"kl colsum K={k}",
                "fp32",
                kl._colsum_kernel,
                q,
                dict(ACC=tl.float32, BLOCK_M=block[0], BLOCK_K=block[1]),
                warps,
                block,
                targets=clean,
            )
        )
        for name, dec, anchor in _KL_OPS:
            flags = dict(DEC=dec, ANCHOR=anchor, **consts)
            for split in (False, True):
                for direction, kern in (("fwd", kl._rows_kernel), ("bwd", kl._grads_kernel)):
                    out.append(
                        Variant(
                            f"kl {name} {direction}{' split' if split else ''} K={k}",
                            "fp32",
                            kern,
                            q,
                            dict(SPLIT=split, **flags),
                            warps,
                            block,
                            targets=clean,
                        )
                    )
    for name, dec, anchor in _KL_OPS:
        out.append(
            Variant(
                f"kl {name} merge",
                "fp32",
                kl._merge_rows_kernel,
                q,
                dict(DEC=dec, ANCHOR=anchor, ACC=tl.float32, BLOCK_M=kl._MERGE_ROWS),
                4,
                (kl._MERGE_ROWS,),
                targets=clean,
            )
        )
    return out


# Pointer dtypes of the one-pass objectives' arguments: bf16 z, h, logits and their gradients,
# fp16 scaled rows, fp32 the rest.
_OBJECTIVE_POINTERS = dict(
    {
        name: "fp32"
        for name in (
            "RS",
            "NORMS",
            "ROW_W",
            "ROW_LOSS",
            "PARAMS",
            "INST_PART",
            "MU",
            "Q0",
            "F_PART",
            "ANCHOR_PART",
            "LSE",
            "CAB",
            "GRAD",
            "FSUM",
            "TOTALS",
            "CDEC",
            "DMU_PART",
            "WEIGHTS",
            "GRAM_PART",
            "COL_PART",
            "GRAM",
            "COLSUM",
            "M",
            "DC",
            "OUT",
            "PART",
        )
    },
    ZA="bf16",
    ZB="bf16",
    ZS="fp16",
    H0="bf16",
    HA="bf16",
    HB="bf16",
    DZA="bf16",
    DZB="bf16",
    DH0="bf16",
    DHA="bf16",
    DHB="bf16",
    LA="bf16",
    LB="bf16",
    DLA="bf16",
    DLB="bf16",
)
_TINY_FP32 = 1.1754943508222875e-38
# The forward normalises each column tile it loads (no prologue launch): 8 warps on 128 rows
# per half, one CTA per SM (the fast path's 2 x 4 warps), and an issue ceiling of 0.5 where the
# fast path reaches 0.98 (benchmarks/static_notes.md section 8).
_OBJECTIVE_FWD = dict(_NT_XENT_FWD, ctas_per_sm=1, issue_ceiling=0.48)
_CLEAN = dict(no_spills=True)


def _objective_variant(name, dtype, fn, constexprs, *args, **kwargs) -> Variant:
    """A one-pass objective kernel with the constexprs it takes and its split fp64 scalars."""
    return Variant(
        name,
        dtype,
        fn,
        _OBJECTIVE_POINTERS,
        {c: v for c, v in constexprs.items() if c in fn.arg_names},
        *args,
        **kwargs,
    )


def _instance_parts(d: int) -> tuple[dict, object, object]:
    """(the constexprs every row launch shares, the forward's and the backward's configs) of
    the objectives' NT-Xent part at D features (bf16 z, fp32 accumulation)."""
    import torch
    import triton.language as tl

    from fastcluster_cl.kernels.objective import instance as instance_k

    fwd, bwd = instance_k.instance_config(d, torch.float16)
    common = dict(ACC=tl.float32, PREC="ieee", UPCAST=False, TINY=_TINY_FP32, FIXED_SHIFT=True)
    return common, fwd, bwd


def _row_gemms(fwd, bwd, d: int) -> tuple[dict, dict]:
    """The column-loop targets of the forward (a step is a pair of column tiles: 4 BLOCK_M x
    BLOCK_N products) and of the backward (each row block's columns as the fast path)."""
    bm, bn, _ = fwd.block
    forward = dict(gemms=((bm, bn, d),) * 4, elements=4 * bm * bn, targets=_OBJECTIVE_FWD)
    backward = dict(
        gemms=((bwd.block[0], bwd.block[1], d), (bwd.block[0], d, bwd.block[1])),
        targets=_NT_XENT_BWD,
    )
    return forward, backward


def anchor_objective_variants(k: int, d: int = 128, f: int = 128) -> dict[str, Variant]:
    """The anchor one-pass kernels at K centres, D and F features: "rows" and "epilogue"
    forward, "grad" and "sum partials" backward."""
    import triton.language as tl

    from fastcluster_cl.kernels.objective import anchor as anchor_k

    common, fwd, bwd = _instance_parts(d)
    forward, backward = _row_gemms(fwd, bwd, d)
    block_k, block_f, block_fh = anchor_k._anchor_blocks(k, f)
    center = dict(
        HPREC="ieee", HUPCAST=False, SUB_M=anchor_k._SUB_M, BLOCK_K=block_k, BLOCK_F=block_f
    )
    return {
        "rows": _objective_variant(
            f"objective anchor rows K={k}",
            "bf16",
            anchor_k._anchor_rows_kernel,
            dict(common, **center, **fwd.constexprs),
            fwd.num_warps,
            fwd.block,
            fwd.num_stages,
            **forward,
        ),
        "grad": _objective_variant(
            f"objective anchor grad K={k}",
            "bf16",
            anchor_k._anchor_grad_kernel,
            dict(common, **center, BLOCK_FH=block_fh, **bwd.constexprs)
            | dict(BLOCK_K=anchor_k._anchor_blocks(k, f, backward=True)[0]),
            bwd.num_warps,
            bwd.block,
            bwd.num_stages,
            **backward,
        ),
        "epilogue": _objective_variant(
            f"objective anchor epilogue K={k}",
            "fp32",
            anchor_k._anchor_epilogue_kernel,
            dict(ACC=tl.float32, TINY=_TINY_FP32, BLOCK_M=anchor_k._ROWS, BLOCK_K=block_k),
            4,
            (anchor_k._ROWS, block_k),
            targets=_CLEAN,
        ),
        "sum partials": _objective_variant(
            "objective sum partials",
            "fp32",
            anchor_k._sum_partials_kernel,
            dict(ACC=tl.float32, BLOCK=anchor_k._REDUCE),
            4,
            (anchor_k._REDUCE,),
            targets=_CLEAN,
        ),
    }


def cc_objective_variants(k: int, d: int = 128) -> dict[str, Variant]:
    """The cc one-pass kernels at K clusters and D features: "rows" and "epilogue" forward,
    "cluster grad" and "grad" backward."""
    import triton.language as tl

    from fastcluster_cl.kernels.objective import cc as cc_k

    common, fwd, bwd = _instance_parts(d)
    forward, backward = _row_gemms(fwd, bwd, d)
    cc = dict(CPREC="ieee", BLOCK_K=cc_k._cc_block_k(k))
    small = dict(ACC=tl.float32, TINY=_TINY_FP32, BLOCK_K=cc["BLOCK_K"])
    out = {
        "rows": _objective_variant(
            f"objective cc rows K={k}",
            "bf16",
            cc_k._cc_rows_kernel,
            dict(common, **cc, **fwd.constexprs),
            fwd.num_warps,
            fwd.block,
            fwd.num_stages,
            **forward,
        ),
        "grad": _objective_variant(
            f"objective cc grad K={k}",
            "bf16",
            cc_k._cc_grad_kernel,
            dict(common, **cc, **bwd.constexprs),
            bwd.num_warps,
            bwd.block,
            bwd.num_stages,
            **backward,
        ),
    }
    for name, fn in (
        ("epilogue", cc_k._cc_epilogue_kernel),
        ("cluster grad", cc_k._cc_cluster_grad_kernel),
    ):
        out[name] = _objective_variant(
            f"objective cc {name} K={k}",
            "fp32",
            fn,
            small,
            cc_k._SMALL_WARPS,
            (small["BLOCK_K"],),
            targets=_CLEAN,
        )
    return out


def _objective_variants() -> list[Variant]:
    """The one-pass objectives (kernels/objective/), bf16 z and h with fp32 centers (AMP),
    D = F = 128: the row launches carry the NT-Xent targets on their column loop, the small
    launches no spills."""
    from fastcluster_cl.kernels.objective import cc as cc_k

    out = []
    for k in (10, 100):
        anchor = anchor_objective_variants(k)
        out += [anchor["rows"], anchor["grad"], anchor["epilogue"]]
    for k in (10, 20, cc_k._CC_MAX_CLUSTERS):  # 16-, 32- and 64-wide cluster tiles
        cc = cc_objective_variants(k)
        out += [cc["rows"], cc["grad"]] + ([cc["epilogue"], cc["cluster grad"]] if k != 20 else [])
    return out + [anchor["sum partials"]]


def variants(names: str = "") -> list[Variant]:
    """Every kernel variant the backends launch, at the sizes users train with (D = 128)."""
    return [
        v
        for v in (
            _nt_xent_variants()
            + _nt_xent_bank_variants()
            + _cluster_variants()
            + _objective_variants()
        )
        if names in v.kernel
    ]


COLUMNS = (
    "kernel",
    "dtype",
    "block",
    "num_warps",
    "registers",
    "spill_bytes",
    "shared_bytes",
    "ctas_per_sm",
    "mma_per_tile",
    "mma_floor_per_tile",
    "ex2_per_tile",
    "tile_elements",
    "instructions_per_tile",
    "issue_ceiling",
    "ex2_ceiling",
)


def table(rows: list[dict]) -> str:
    head = [
        "kernel",
        "dtype",
        "block",
        "warps",
        "regs",
        "spill",
        "smem",
        "CTAs",
        "mma",
        "floor",
        "ex2",
        "elems",
        "instr",
        "ceiling",
        "ex2 ceil",
        "misses",
    ]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        cells = [r[c] for c in COLUMNS] + ["; ".join(check_targets(r)) or "-"]
        lines.append(" | ".join("-" if c is None else str(c) for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="fastcluster-cl bench static", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--kernels", default="", help="only kernels whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("the kernels must be compiled, not interpreted: unset TRITON_INTERPRET")
    rows = [analyse(v) for v in variants(args.kernels)]
    print(table(rows))
    if args.json:  # the first element names the sources the rows were compiled from
        from .paths import source_hash

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([{"source_hash": source_hash()}, *rows], indent=1))
    return 1 if any(check_targets(r) for r in rows) else 0
