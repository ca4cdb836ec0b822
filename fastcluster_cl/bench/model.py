"""Predicted H100 SXM time of whole kernels and whole paths, read from the compiled code without a
GPU (`python -m fastcluster_cl.bench model --json PATH`).

A kernel is compiled for sm_90a (`static_report.compile_variant`) and its SASS cut into regions:
the code outside every loop and the body of each loop (a backward branch's span, inner loops
excluded). Predicated forward branches over code with no MMA inside a loop (edge-tile masks,
the diagonal) are cold: counted once per program, not per iteration. Per region and per CTA,
one execution costs, in SM clocks, on each unit:

    tensor core   MMA multiply-adds / MACS_PER_CLOCK (HGMMA x warpgroups, HMMA x warps)
    MUFU          MUFU instructions (EX2, RCP, SQRT, LG2, ...) x threads / 16
    FP32 pipe     FFMA, FADD, FMUL, FMNMX x threads / 128
    shared memory LDS / STS / LDSM / LDGSTS bytes / 128
    issue         instructions x warps / 4

A region's time is the largest of these when everything overlaps (the low end of the range) and
the tensor core's plus the largest of the others where the SASS waits for the MMA results before
using them (`WARPGROUP.DEPBAR ... 0x0`, or synchronous HMMA: the high end). A region runs its
loop's trip count times per execution of its parent (`KernelModel.trips` says, by whether the loop
holds an MMA, its nesting depth or its place, what it iterates over at a shape). A program's time is
the sum over regions; an SM runs ceil(programs / 132) programs, `ctas_per_sm` at a time
sharing its units (low: their unit time adds up; high: at least one program's serialised chain
per group, plus the group's global bytes outside loops at the SM's share of L2 bandwidth); a
launch costs LAUNCH_S more. Global bytes cross L2 as issued, but a Triton loop's LDG bytes count
at most the distinct elements its TTGIR loads (`Region.l2_bytes`: a CTA's warps repeating an
address, as a vector broadcast into an MMA layout does, are served by L1). What is left out:
global-memory latency and L2 misses (HBM enters only the floor and the eager model), TMA and
wgmma operand reads from shared memory, warp scheduling stalls, clock throttling. The constants
are stated once below with sources.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from . import static_report as static

# H100 SXM5 (NVIDIA H100 Tensor Core GPU datasheet and Hopper whitepaper): 132 SMs; 989.4 dense
# fp16/bf16 tensor TFLOP/s = 132 SMs x 4096 FLOP/clock at 1830 MHz; HBM3 3.35 TB/s.
SMS = 132
CLOCK_HZ = 1.83e9
HBM_BYTES_PER_S = 3.35e12
PEAK_TENSOR_FLOPS = 2 * static.MACS_PER_CLOCK["fp16"] * SMS * CLOCK_HZ
# Per-SM throughputs of compute capability 9.0 (CUDA C++ Programming Guide, "Arithmetic
# Instructions" table: 128 fp32 FMA/add/mul, 16 exp2/rcp/rsqrt/lg2 per clock per SM; four
# schedulers issuing one warp instruction each per clock; 32 banks x 4 bytes of shared memory).
FP32_PER_CLOCK = 128
MUFU_PER_CLOCK = static.EX2_PER_CLOCK
ISSUE_PER_CLOCK = static.ISSUE_PER_CLOCK
SHARED_BYTES_PER_CLOCK = 128
PEAK_EXPS = MUFU_PER_CLOCK * SMS * CLOCK_HZ
# Hiding a dependent arithmetic instruction's ~4-clock latency takes 4 warps per scheduler when a
# warp has no instruction-level parallelism (CUDA C++ Programming Guide, "Multiprocessor
# Level"): with fewer, the high end issues at warps / 4 of the peak rate.
WARPS_TO_HIDE_LATENCY = 4
# L2 to SM bandwidth: about 5.5 TB/s measured on an H100 PCIe (114 SMs; chipsandcheese.com,
# "Nvidia's H100: Funny L2, and Tons of Bandwidth", 2023); global loads and stores of a launch
# take at least their bytes at this rate.
L2_BYTES_PER_S = 5.5e12
# At the high end a program's global loads and stores outside its loops (the pipeline's first
# tiles before the loop, the epilogue's stores after it) move at its SM's share of that
# bandwidth, serialised with the loops rather than overlapped with them.
L2_BYTES_PER_SM_CLOCK = L2_BYTES_PER_S / SMS / CLOCK_HZ
# A global load's latency: 400-800 clocks (CUDA C++ Best Practices Guide, "Device Memory
# Spaces"). At the high end each group of co-resident programs waits once for its first tiles
# (the pipeline fill) with no other program on its SM to switch to.
MEMORY_LATENCY_CLOCKS = 800
# A kernel launch's fixed cost seen by a training step: a few microseconds (NVIDIA, "Getting
# Started with CUDA Graphs", 2019, measures launch-bound kernels at 3-4 us each).
LAUNCH_S = 4e-6
# A cuBLAS-class GEMM: 721.6 TFLOP/s, 73% of the peak, for 2048 x 8192 x 8192 fp16 on an H100
# (triton-lang/triton issue 2339, 2023); smaller products lose whole waves of 128 x 128 tiles.
CUBLAS_FRACTION = 721.6e12 / PEAK_TENSOR_FLOPS
CUBLAS_TILE = 128
# Matrix products of 4-byte or wider operands (torch's default fp32 matmul is IEEE, no TF32) run
# on the FP32 pipe at FP32_PER_CLOCK multiply-adds per clock per SM (FP64 on the tensor cores at
# the same rate: 67 TFLOP/s in the datasheet), taken at the same CUBLAS_FRACTION.
WIDE_GEMM_MACS_PER_CLOCK = FP32_PER_CLOCK

UNITS = ("tensor", "mufu", "fp32", "shared", "issue")
_GLOBAL = ("LDG", "STG", "LDGSTS", "RED", "ATOMG")
_FP32 = re.compile(r"^(FFMA|FADD|FMUL|FMNMX)(\.|$)")
_WIDTH_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


@dataclass
class Region:
    """The instructions of one loop body (inner loops excluded) or of the code outside loops."""

    depth: int  # -1: outside every loop
    index: int  # 0 outside loops, then the loops in address order from 1
    has_mma: bool  # the loop (inner loops included) issues MMA
    waits: bool  # the body waits for all its MMA results before using them
    parent: int | None
    clocks: dict = field(default_factory=dict)  # unit -> SM clocks per execution, per CTA
    global_bytes: int = 0  # per execution, per CTA, as issued (every warp's LDG counted)
    load_bytes: int = 0  # the LDG part of global_bytes
    unique_loads: int | None = None  # bytes of the loop's distinct loaded elements (TTGIR)

    @property
    def l2_bytes(self) -> int:
        """The bytes this region moves through L2: its LDG bytes no more than the distinct
        elements it loads, where known. A CTA's warps loading the same addresses (a vector
        broadcast into an MMA layout, replicated over lanes and warps) are served by L1 after
        the first request; LDGSTS (cp.async, L1 bypassed) and stores count as issued."""
        if self.unique_loads is None:
            return self.global_bytes
        return self.global_bytes - self.load_bytes + min(self.load_bytes, self.unique_loads)

    def low(self) -> float:
        """Every unit overlapped, instructions issued at the peak rate."""
        return max(self.clocks.values())

    def high(self, issue_rate: float) -> float:
        """Instructions issued at `issue_rate` of the peak (latency not hidden); where the
        body waits for its MMA, the tensor core's time plus the rest's."""
        clocks = dict(self.clocks, issue=self.clocks["issue"] / issue_rate)
        if not self.waits:
            return max(clocks.values())
        return clocks["tensor"] + max(v for unit, v in clocks.items() if unit != "tensor")


def _macs(op: str) -> tuple[int, str] | None:
    """(multiply-adds of one MMA instruction, its `MACS_PER_CLOCK` kind), None for others
    (`static_report.mma_shape`: HGMMA per warpgroup, mma.sync HMMA per warp)."""
    shape = static.mma_shape(op)
    if shape is None:
        return None
    parts = op.split(".")
    kind = "fp64" if parts[0] == "DMMA" else "tf32" if "TF32" in parts else "fp16"
    return math.prod(shape), kind


def _shared_bytes(op: str) -> int:
    """Bytes one warp instruction moves through shared memory: LDS / STS / LDGSTS by their width
    suffix (4 bytes a thread without one), LDSM / STSM 128 bytes per 8 x 8 b16 matrix."""
    parts = op.split(".")
    if parts[0] in ("LDSM", "STSM"):
        return 128 * int(parts[-1]) if parts[-1].isdigit() and len(parts) > 3 else 128
    if parts[0] in ("LDS", "STS", "LDGSTS"):
        width = next((_WIDTH_BYTES[p] for p in reversed(parts) if p in _WIDTH_BYTES), 4)
        return 32 * width
    return 0


def _global_bytes(op: str) -> int:
    """Bytes one warp instruction moves to or from global memory (4 a thread without a width)."""
    parts = op.split(".")
    if parts[0] not in _GLOBAL:
        return 0
    return 32 * next((_WIDTH_BYTES[p] for p in reversed(parts) if p in _WIDTH_BYTES), 4)


def _unit_clocks(instructions: list[dict], num_warps: int) -> dict:
    threads = 32 * num_warps
    tensor = 0.0
    mufu = fp32 = shared = 0
    for ins in instructions:
        op = ins["op"]
        mma = _macs(op)
        if mma:
            macs, kind = mma
            issuers = num_warps // 4 if op.startswith("HGMMA") else num_warps
            tensor += macs * issuers / static.MACS_PER_CLOCK[kind]
        elif op.startswith("MUFU"):
            mufu += 1
        elif _FP32.match(op):
            fp32 += 1
        shared += _shared_bytes(op)
    return {
        "tensor": tensor,
        "mufu": mufu * threads / MUFU_PER_CLOCK,
        "fp32": fp32 * threads / FP32_PER_CLOCK,
        "shared": shared * num_warps / SHARED_BYTES_PER_CLOCK,
        "issue": len(instructions) * num_warps / ISSUE_PER_CLOCK,
    }


def _loops(instructions: list[dict]) -> list[tuple[int, int]]:
    """(header, last) index spans of the loops: every backward branch, one span per header,
    except a branch from the out-of-line code after the last EXIT back into the body (nvcc's
    slow path of a warp shuffle in possibly diverged code returns so: not a loop). A predicated
    EXIT can end a loop's body, so only an unconditional one starts that code."""
    exits = [
        i for i, ins in enumerate(instructions) if ins["op"].startswith("EXIT") and not ins["pred"]
    ]
    last_exit = exits[-1] if exits else len(instructions)
    spans: dict[int, int] = {}
    for i, ins in enumerate(instructions):
        t = ins["target_index"]
        returns = t is not None and t < last_exit < i
        if ins["op"].startswith("BRA") and t is not None and t < i and not returns:
            spans[t] = max(spans.get(t, i), i)
    return sorted(spans.items())


def regions(
    instructions: list[dict], num_warps: int, cold_code=static.cold_indices
) -> list[Region]:
    """Region 0 is the code outside loops (and every loop's cold code, as `cold_code(
    instructions, start, end, is_mma)` finds it), then one per loop."""
    loops = _loops(instructions)
    owner = [0] * len(instructions)  # region index per instruction
    parents: list[int | None] = []
    depths = []
    for index, (start, end) in enumerate(loops, start=1):
        enclosing = [
            j for j, (s, e) in enumerate(loops, start=1) if j != index and s <= start and end <= e
        ]
        parent = max(enclosing, key=lambda j: loops[j - 1][0]) if enclosing else None
        parents.append(parent)
        depths.append(len(enclosing))
    for index, (start, end) in sorted(
        enumerate(loops, start=1), key=lambda item: item[1][1] - item[1][0], reverse=True
    ):
        cold = cold_code(instructions, start, end, lambda op: _macs(op) is not None)
        for i in range(start, end + 1):
            owner[i] = 0 if i in cold else index
    out = [Region(-1, 0, False, False, None)]
    for index, (start, end) in enumerate(loops, start=1):
        body = instructions[start : end + 1]
        out.append(
            Region(
                depths[index - 1],
                index,
                any(_macs(ins["op"]) for ins in body),
                False,
                parents[index - 1],
            )
        )
    members: list[list[dict]] = [[] for _ in out]
    for ins, region in zip(instructions, owner):
        if ins["pred"] != "@!PT":  # predicated off for good: never executes
            members[region].append(ins)
    for region, body in zip(out, members):
        region.clocks = _unit_clocks(body, num_warps)
        region.global_bytes = sum(_global_bytes(ins["op"]) for ins in body) * num_warps
        region.load_bytes = (
            sum(_global_bytes(ins["op"]) for ins in body if ins["op"].split(".")[0] == "LDG")
            * num_warps
        )
        has_own_mma = any(_macs(ins["op"]) for ins in body)
        region.waits = has_own_mma and any(
            ins["op"].startswith("HMMA")  # synchronous: the warp waits for it
            or (ins["op"].startswith("WARPGROUP.DEPBAR") and ins["args"].endswith("0x0"))
            for ins in body
        )
    return out


# A tt.load's pointer type: a tensor of pointers (or one pointer) to a scalar or to a pointer;
# a block pointer (`!tt.ptr<tensor<...>>`) does not match.
_TTGIR_POINTER = re.compile(r"^(?:tensor<([0-9x]+)x)?!tt\.ptr<(!tt\.ptr|[a-z]+(\d+))")
_TTGIR_LOC = re.compile(r"\s+loc\((?:[^()]|\([^()]*\))*\)\s*$")
# A product on the tensor cores: wgmma, or a tt.dot into an MMA layout (mma.sync; a dot into
# a blocked layout runs on the FMA units).
_TTGIR_MMA = re.compile(r"\bttng\.warp_group_dot\b|\btt\.dot\b.*->\s*tensor<[^>]*#mma")


@dataclass
class TtgirLoop:
    """One `scf.for` / `scf.while` of a Triton kernel's TTGIR."""

    depth: int
    load_bytes: int | None = 0  # its body's tt.load tensors, each element once; None: unread
    has_mma: bool = False  # the loop (inner loops included) holds a tensor-core product


def ttgir_loops(ttgir: str) -> list[TtgirLoop]:
    """The loops of a kernel's TTGIR in text order, each with what one iteration of its body
    loads (a load inside an inner loop counts for the inner loop only)."""
    loops: list[TtgirLoop] = []
    stack: list[int | None] = []  # per open region: its loop, or None
    for raw in ttgir.splitlines():
        line = _TTGIR_LOC.sub("", raw)
        inside = [loops[i] for i in stack if i is not None]
        if "= tt.load " in line and inside:
            loop = inside[-1]
            pointer = _TTGIR_POINTER.match(line.rsplit(" : ", 1)[-1].strip())
            if pointer is None or loop.load_bytes is None:
                loop.load_bytes = None
            else:
                shape, pointee, bits = pointer.groups()
                elements = math.prod(int(x) for x in shape.split("x")) if shape else 1
                width = 8 if pointee == "!tt.ptr" else max(8, int(bits)) // 8
                loop.load_bytes += elements * width
        if _TTGIR_MMA.search(line):
            for loop in inside:
                loop.has_mma = True
        opened = line.count("{") - line.count("}")
        if opened > 0 and re.search(r"\bscf\.(for|while)\b", line):
            loops.append(TtgirLoop(len(inside)))
            stack += [len(loops) - 1] + [None] * (opened - 1)
        elif opened > 0:
            stack += [None] * opened
        elif opened < 0:
            del stack[opened:]
    return loops


def cap_repeated_loads(cut: list[Region], ttgir: str) -> None:
    """Give each SASS loop its TTGIR loop's distinct load bytes (`Region.unique_loads`) where
    the two kernels' loops agree one to one, by nesting and by which hold tensor-core products
    (ptxas may split a loop into a main and a remainder loop, or unroll one away: then every
    load counts as issued). The repeated bytes a cap removes from L2 are L1 hits: charged to
    the shared-memory unit, which L1 shares."""
    loops = ttgir_loops(ttgir)
    if [(loop.depth, loop.has_mma) for loop in loops] != [(r.depth, r.has_mma) for r in cut[1:]]:
        return
    for region, loop in zip(cut[1:], loops):
        if loop.load_bytes is not None:
            region.unique_loads = loop.load_bytes
            hits = region.load_bytes - min(region.load_bytes, loop.load_bytes)
            region.clocks["shared"] += hits / SHARED_BYTES_PER_CLOCK


@dataclass
class Compiled:
    """What the model reads off one compiled kernel."""

    name: str
    num_warps: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    ctas_per_sm: int
    regions: list[Region]


def compile_kernel(variant: static.Variant) -> Compiled:
    """`variant` compiled for sm_90a and cut into regions; a ValueError where no CTA of it fits
    on an SM (the launch would fail with out-of-resources, not run slowly)."""
    kernel = static.compile_variant(variant)
    cubin = kernel.asm["cubin"]
    registers, stack = static.resource_usage(cubin)
    shared = kernel.metadata.shared
    resident = static.ctas_per_sm(registers, shared, 32 * variant.num_warps)
    if resident < 1:
        raise ValueError(
            f"{variant.kernel}: {shared} B of shared memory and {registers} registers a thread: "
            "no CTA fits on an SM"
        )
    instructions = static.parse_sass(static._tool_output("nvdisasm", ["-c"], cubin))
    cut = regions(instructions, variant.num_warps)
    cap_repeated_loads(cut, kernel.asm["ttgir"])
    return Compiled(variant.kernel, variant.num_warps, registers, stack, shared, resident, cut)


# trips(loop) -> iterations of that loop (a Region: its has_mma, depth, index) per execution of
# its parent, at a shape
Trips = Callable[[Region], int]


def executions(compiled: Compiled, trips: Trips) -> list[int]:
    """How many times one program runs each region: the product of the trip counts of its loop
    and of the loops around it."""
    counts = []
    for region in compiled.regions:
        count, r = 1, region
        while r.depth >= 0:
            count *= trips(r)
            r = compiled.regions[r.parent] if r.parent is not None else None
            if r is None:
                break
        counts.append(count)
    return counts


def program_clocks(compiled: Compiled, trips: Trips) -> tuple[float, float, dict, float]:
    """(low, high) SM clocks of one program, each unit's clocks (overlapped), and its global
    bytes. The high end issues at the rate the resident warps sustain without hiding latency
    (`WARPS_TO_HIDE_LATENCY`)."""
    counts = executions(compiled, trips)
    per_scheduler = max(1, compiled.ctas_per_sm) * compiled.num_warps / 4
    issue_rate = min(1.0, per_scheduler / WARPS_TO_HIDE_LATENCY)
    low = sum(n * r.low() for n, r in zip(counts, compiled.regions))
    high = sum(n * r.high(issue_rate) for n, r in zip(counts, compiled.regions))
    units = {u: sum(n * r.clocks[u] for n, r in zip(counts, compiled.regions)) for u in UNITS}
    nbytes = sum(n * r.l2_bytes for n, r in zip(counts, compiled.regions))
    return low, high, units, nbytes


@dataclass
class Launch:
    """One kernel launch at a shape: its compiled code, its grid and its loops' trip counts."""

    compiled: Compiled
    programs: int
    trips: Trips

    def mma_bodies(self) -> int:
        """The region executions that issue MMA, over the whole grid: the launch's work in
        tensor-core tiles."""
        counts = executions(self.compiled, self.trips)
        return self.programs * sum(
            n for n, r in zip(counts, self.compiled.regions) if r.clocks["tensor"]
        )

    def predict(self) -> dict:
        low, high, units, nbytes = program_clocks(self.compiled, self.trips)
        per_sm = math.ceil(self.programs / SMS)
        resident = max(1, self.compiled.ctas_per_sm)
        groups, last = divmod(per_sm, resident)
        sizes = [resident] * groups + ([last] if last else [])
        sm_low = per_sm * low / CLOCK_HZ
        edge_bytes = self.compiled.regions[0].l2_bytes
        fill = MEMORY_LATENCY_CLOCKS if edge_bytes else 0
        edge = edge_bytes / L2_BYTES_PER_SM_CLOCK
        sm_high = sum(max(g * low, high) + fill + g * edge for g in sizes) / CLOCK_HZ
        l2 = self.programs * nbytes / L2_BYTES_PER_S
        units = {**units, "l2": l2 * CLOCK_HZ / per_sm}  # comparable: clocks per SM
        return {
            "kernel": self.compiled.name,
            "programs": self.programs,
            "low_s": LAUNCH_S + max(sm_low, l2),
            "high_s": LAUNCH_S + max(sm_high, l2),
            "limit": max(units, key=units.get),
            "sm_fill": min(1.0, self.programs / (SMS * resident)),
            "waves": math.ceil(self.programs / (SMS * resident)),
        }


def gemm_seconds(m: int, n: int, k: int, operand_bytes: int = 2) -> float:
    """A cuBLAS-class GEMM at CUBLAS_FRACTION of the tensor peak (16-bit operands) or of the FP32
    pipe's (`WIDE_GEMM_MACS_PER_CLOCK`: fp32, fp64), plus a launch: output tiles of up to 128 x
    128 (a smaller product, its own size rounded up to 16), in whole waves; fewer tiles than SMs
    split their k across SMs (split-K, in slices of at least 128)."""
    rows, cols = (max(16, min(CUBLAS_TILE, 16 * math.ceil(x / 16))) for x in (m, n))
    tiles = math.ceil(m / rows) * math.ceil(n / cols)
    slices = max(1, min(SMS // tiles, k // CUBLAS_TILE))
    waves = math.ceil(tiles * slices / SMS)
    rate = static.MACS_PER_CLOCK["fp16"] if operand_bytes <= 2 else WIDE_GEMM_MACS_PER_CLOCK
    per_tile = rows * cols * math.ceil(k / slices) / (rate * CUBLAS_FRACTION)
    return LAUNCH_S + waves * per_tile / CLOCK_HZ


def memory_seconds(nbytes: float) -> float:
    """An elementwise or reduction kernel: its bytes at HBM bandwidth, plus a launch."""
    return LAUNCH_S + nbytes / HBM_BYTES_PER_S


def floor_seconds(flops: float, exps: float, nbytes: float) -> float:
    """The whole GPU's floor: the largest of the tensor FLOPs, the exps and the HBM bytes."""
    return max(flops / PEAK_TENSOR_FLOPS, exps / PEAK_EXPS, nbytes / HBM_BYTES_PER_S)
