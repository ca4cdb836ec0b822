"""The cost model (fastcluster_cl/bench/model.py, paths.py): its accounting against hand counts,
on SASS written here and on a compiled kernel with one MMA loop and nothing else; the stored
predictions against the kernels' sources."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastcluster_cl import kernels
from fastcluster_cl.bench import model, paths, static_report

ROOT = Path(__file__).resolve().parents[2]
STORED = ROOT / "benchmarks" / "results" / "model-h100.json"
STATIC = ROOT / "benchmarks" / "results" / "static-sm90a.json"

# Hand-written SASS: straight code, an outer loop (2 FFMA, a MUFU) around an inner loop (one
# HGMMA 64x64x16, an LDS.128, the wait for the MMA), a cold edge block, an instruction
# predicated off for good.
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FFMA R2, R2, R3, R4 ;
        /*0020*/                   FFMA R2, R2, R3, R4 ;
        /*0030*/                   MUFU.EX2 R5, R2 ;
.L_x_1:
        /*0040*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT ;
        /*0050*/                   LDS.128 R8, [R9] ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0070*/              @!P6 BRA `(.L_x_2) ;
        /*0080*/                   FSEL R2, R2, -INF , P0 ;
.L_x_2:
        /*0090*/              @!PT LDS R3, [R9] ;
        /*00a0*/              @!P1 BRA `(.L_x_1) ;
        /*00b0*/              @!P2 BRA `(.L_x_0) ;
        /*00c0*/                   EXIT ;
"""


def test_regions_count_by_hand():
    """4 warps (one warpgroup, 128 threads): per inner iteration 64*64*16 / 2048 = 32 tensor
    clocks, 16 * 32 * 4 / 128 = 16 shared clocks, 5 instructions (the edge FSEL is cold, the
    @!PT LDS never runs) * 4 / 4 = 5 issue clocks; per outer iteration 2 FFMA * 128 / 128 = 2
    FP32 clocks, 128 / 16 = 8 MUFU clocks, 4 instructions."""
    regions = model.regions(static_report.parse_sass(SASS), num_warps=4)
    straight, outer, inner = regions
    assert (outer.depth, inner.depth, inner.parent, inner.index) == (0, 1, 1, 2)
    assert inner.has_mma and outer.has_mma and inner.waits and not outer.waits
    assert inner.clocks == {"tensor": 32, "mufu": 0, "fp32": 0, "shared": 16, "issue": 5}
    assert outer.clocks == {"tensor": 0, "mufu": 8, "fp32": 2, "shared": 0, "issue": 4}
    assert straight.clocks["issue"] == 3  # MOV, EXIT and the cold FSEL

    compiled = model.Compiled("hand", 4, 64, 0, 0, 1, regions)
    trips = {(True, 0): 3, (True, 1): 10}  # 3 outer iterations of 10 inner ones
    low, high, units, _ = model.program_clocks(
        compiled, lambda loop: trips[(loop.has_mma, loop.depth)]
    )
    assert units["tensor"] == 3 * 10 * 32
    assert low == 3 + 3 * 8 + 30 * 32
    # one CTA of 4 warps: one warp per scheduler issues at 1/4 of the peak at the high end;
    # the inner loop waits for its MMA: 32 tensor clocks + 4 * 5 issue clocks
    assert high == 4 * 3 + 3 * 4 * 4 + 30 * (32 + 4 * 5)


# A loop ending in a predicated EXIT (a persistent loop's last test), then a shuffle's slow path
# after the unconditional EXIT that returns into the body: one loop, not two.
TRAILER_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FFMA R2, R2, R3, R4 ;
.L_x_1:
        /*0020*/                   SHFL.BFLY PT, R5, R2, 0x1, 0x1f ;
        /*0030*/              @P0 EXIT ;
        /*0040*/                   BRA `(.L_x_0) ;
        /*0050*/                   EXIT ;
.L_x_2:
        /*0060*/                   BRA `(.L_x_2) ;
        /*0070*/                   WARPSYNC.COLLECTIVE R3, `(.L_x_3) ;
.L_x_3:
        /*0080*/                   SHFL.BFLY P3, R5, R2, R4, R6 ;
        /*0090*/                   BRA `(.L_x_1) ;
"""


def test_code_after_the_last_exit_returning_into_the_body_is_not_a_loop():
    instructions = static_report.parse_sass(TRAILER_SASS)
    assert model._loops(instructions) == [(1, 4)]


def test_instruction_classes():
    assert model._macs("HGMMA.64x128x16.F32.BF16") == (64 * 128 * 16, "fp16")
    assert model._macs("HMMA.16816.F32.BF16") == (16 * 8 * 16, "fp16")
    assert model._macs("HMMA.1688.F32.TF32") == (16 * 8 * 8, "tf32")
    assert model._macs("DMMA.884") == (8 * 8 * 4, "fp64")
    assert model._macs("FFMA") is None
    assert static_report.mma_shape("HMMA.16816.F32.BF16") == (16, 8, 16)
    assert static_report.mma_shape("HGMMA.64x64x16.F32") == (64, 64, 16)
    assert model._shared_bytes("LDSM.16.M88.4") == 512
    assert model._shared_bytes("LDS.128") == 512 and model._shared_bytes("STS") == 128
    assert model._shared_bytes("LDGSTS.E.BYPASS.128") == 512
    assert model._global_bytes("LDG.E.64") == 256 and model._global_bytes("STG.E") == 128
    assert model._global_bytes("LDS.128") == 0


# Compiled in a subprocess: the test session interprets Triton (TRITON_INTERPRET=1), and an
# interpreted kernel cannot be compiled for sm_90a.
ONE_MMA_LOOP = """
import json, triton, triton.language as tl
from fastcluster_cl import kernels
from fastcluster_cl.bench import model, paths, static_report

@triton.jit
def mma_loop(A, B, C, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a_ptr = A + offs[:, None] * n + offs[None, :]
    b_ptr = B + offs[:, None] * BLOCK + offs[None, :]
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for _ in range(0, n, BLOCK):
        acc = tl.dot(tl.load(a_ptr), tl.load(b_ptr), acc)
        a_ptr += BLOCK
        b_ptr += BLOCK * BLOCK
    tl.store(C + offs[:, None] * BLOCK + offs[None, :], acc)

variant = static_report.Variant(
    "one MMA loop", "fp16", mma_loop, {"A": "fp16", "B": "fp16", "C": "fp32"}, dict(BLOCK=64),
    4, (64, 64, 64),
)
compiled = model.compile_kernel(variant)
launch = model.Launch(compiled, 264, paths.mma_loop(1000, 64 * 64 * 64))
low, high, units, _ = model.program_clocks(compiled, launch.trips)
# 128 x 128 tiles in 5 stages: 5 x 64 KB of shared memory, more than an SM holds
too_big = static_report.Variant(
    "too big", "fp16", mma_loop, variant.pointers, dict(BLOCK=128), 4, (128, 128, 128), 5
)
try:
    model.compile_kernel(too_big)
    refused = None
except ValueError as err:
    refused = str(err)
# NT-Xent's tall forward: its column scales broadcast into the MMA layout, loaded by every warp
tall = next(v for v in static_report.variants("nt_xent") if v.kernel == "nt_xent fwd tall")
column_loop = model.compile_kernel(tall).regions[1]
print(json.dumps(dict(
    tall=dict(
        issued=column_loop.global_bytes, ldg=column_loop.load_bytes,
        unique=column_loop.unique_loads, l2=column_loop.l2_bytes,
    ),
    loops=[
        dict(mma=r.has_mma, tensor=r.clocks["tensor"], unique_loads=r.unique_loads)
        for r in compiled.regions[1:]
    ],
    units=units, ctas=compiled.ctas_per_sm, predict=launch.predict(), refused=refused,
)))
"""


def _compiled_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _compiled_json(argv: list[str]) -> dict:
    """Run a Python script without the interpreter (kernels compiled for sm_90a) and read the
    JSON object its last line prints."""
    done = subprocess.run(
        [sys.executable, *argv], env=_compiled_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_compiled_mma_loop_matches_the_hand_count(tmp_path):
    """A GEMM-like kernel whose only loop loads two 64 x 64 tiles and multiplies them: 4
    HGMMA.64x64x16 per iteration, 128 tensor clocks; 1000 iterations, 264 programs on 132
    SMs. And a loop whose loads repeat across warps, capped at its distinct bytes."""
    script = tmp_path / "one_mma_loop.py"  # @triton.jit needs its source in a file
    script.write_text(ONE_MMA_LOOP)
    got = _compiled_json([str(script)])
    # both tiles come through cp.async (LDGSTS): no register loads in the loop's TTGIR
    assert got["loops"] == [{"mma": True, "tensor": 64 * 64 * 64 / 2048, "unique_loads": 0}]
    assert got["units"]["tensor"] == 1000 * 128
    p = got["predict"]
    per_sm = math.ceil(264 / 132)
    assert p["low_s"] >= model.LAUNCH_S + per_sm * 1000 * 128 / model.CLOCK_HZ
    assert p["limit"] in (*model.UNITS, "l2")
    assert p["waves"] == math.ceil(264 / (132 * got["ctas"]))
    # a kernel no SM can hold is refused, not predicted
    assert got["refused"] and "no CTA fits on an SM" in got["refused"]
    # the tall forward's 64 column scales (256 B) reach every warp's registers: 16 KiB of LDG,
    # 256 B of it through L2, beside the column tile's LDGSTS
    tall = got["tall"]
    assert (tall["ldg"], tall["unique"]) == (16384, 256)
    assert tall["l2"] == tall["issued"] - 16384 + 256


REGENERATE = (
    "python -m fastcluster_cl.bench model --json benchmarks/results/model-h100.json "
    "--static-json benchmarks/results/static-sm90a.json"
)


@pytest.mark.parametrize("stored", [STORED, STATIC])
def test_stored_predictions_match_the_sources(stored):
    """The stored model and static report are regenerated by one command whenever a kernel or
    the model changes (their source_hash)."""
    meta = json.loads(stored.read_text())[0]
    assert meta["source_hash"] == paths.source_hash(), (
        f"{stored.name} predates the kernels' or the model's sources: regenerate with "
        f"`{REGENERATE}`"
    )


def test_stored_predictions_hold_the_schema():
    rows = json.loads(STORED.read_text())[1:]
    shape_keys = {"path", "op", "shape", "runs"}
    timed = {
        "predicted_us_low",
        "predicted_us_high",
        "floor_us",
        "eager_us",
        "tiles",
        "sm_fill",
        "limit",
        "spill_bytes",
        "auto",
    }
    calibration_keys = {
        "calibration",
        "kernel",
        "published_tflops",
        "source",
        "predicted_tflops_low",
        "predicted_tflops_high",
    }
    for row in rows:
        if row.get("calibration"):
            assert calibration_keys <= row.keys()
        else:
            assert shape_keys <= row.keys() and {"n", "d", "dtype"} <= row["shape"].keys()
            assert timed <= row.keys() if row["runs"] else "reason" in row


def test_model_command_runs(tmp_path):
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([{"n": 256, "d": 128}]))
    out = tmp_path / "model.json"
    done = subprocess.run(
        [sys.executable, "-m", "fastcluster_cl.bench", "model", "--shapes", str(shapes)]
        + ["--json", str(out)],
        env=_compiled_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())[1:]
    assert {r["path"] for r in rows if not r.get("calibration")} == {"triton", "eager", "cuda"}
    published = len(paths.ATTENTION_PUBLISHED) + len(paths.MATMUL_PUBLISHED)
    assert sum(bool(r.get("calibration")) for r in rows) == published


def _loop(index: int, global_bytes: int, depth: int = 0, mma: bool = False) -> model.Region:
    return model.Region(depth, index, mma, False, None, {u: 0 for u in model.UNITS}, global_bytes)


def test_partial_loops_split_the_partials_between_unrolled_body_and_remainder():
    """An epilogue's loop over 10 partials unrolled by 4 (its body loads 4 of them) runs 2
    times, the remainder loop (one partial a body) at most 3; a loop with an MMA is refused."""
    loops = [_loop(1, 4096), _loop(2, 1024)]
    compiled = model.Compiled("epilogue", 8, 32, 0, 0, 8, [_loop(0, 0, depth=-1), *loops])
    trips = paths.partial_loops(compiled, parts=10)
    assert (trips(loops[0]), trips(loops[1])) == (2, 3)
    assert paths.partial_loops(compiled, parts=2)(loops[1]) == 2
    with pytest.raises(ValueError, match="not a loop over the partials"):
        trips(_loop(3, 1024, mma=True))


def test_objective_rows_cover_the_issue_shapes():
    """Every path and shape of the objectives' table is a row: the one-pass kernels predicted
    where they run, refused with the reason where they cannot; the separate ops as auto runs
    them everywhere, on Triton throughout (no op on chunked); exactly one path marked
    auto per shape, never the anchor one-pass kernels and cc's only up to CC_ONE_PASS_PAIRS
    pairs (`kernels.AUTO_SEPARATE`); the eager
    reference refused where one of its tensors alone exceeds the GPU's memory."""
    rows = [r for r in json.loads(STORED.read_text())[1:] if r.get("op", "").endswith("objective")]
    shapes = {
        "anchor_objective": len(paths.ANCHOR_SHAPES),
        "cc_objective": len(paths.CC_SHAPES),
    }
    for op, count in shapes.items():
        ours = [r for r in rows if r["op"] == op]
        assert {r["path"] for r in ours} == {"triton-onepass", "triton-separate", "cuda", "eager"}
        assert len(ours) == 4 * count
    onepass = [r for r in rows if r["path"] == "triton-onepass"]
    for r in onepass:
        fits = r["shape"].get("f", 0) <= 512 and (
            r["op"] != "cc_objective" or r["shape"]["k"] <= 64
        )
        assert r["runs"] == fits and (r["predicted_us_low"] is not None) == fits, r
        assert fits or "at most" in r["reason"]
    for r in (r for r in rows if r["path"] == "triton-separate"):
        assert r["runs"] and r["predicted_us_low"] is not None, r
        assert r["chunked_ops"] == [], r
    for op in shapes:
        for shape in {json.dumps(r["shape"]) for r in rows if r["op"] == op}:
            auto = [r for r in rows if r["op"] == op and json.dumps(r["shape"]) == shape]
            auto = [r["path"] for r in auto if r["auto"]]
            size = json.loads(shape)
            onepass_fits = op == "cc_objective" and size["k"] <= 64
            onepass_auto = onepass_fits and size["n"] <= kernels.CC_ONE_PASS_PAIRS
            assert auto == ["triton-onepass" if onepass_auto else "triton-separate"], shape
    huge = next(
        r
        for r in rows
        if r["path"] == "eager" and r["shape"] == dict(n=32768, d=128, f=2048, k=1000, dtype="bf16")
    )
    assert not huge["runs"] and huge["reason"].startswith("out of memory")


def test_separate_ops_are_traced_with_their_launches_and_host_ops():
    """The separate cc path on meta tensors: each Triton launch recorded with its grid (the
    statistics' persistent programs: min(ceil(N / 32), 128)) and every kernel's loops known to
    the model; the torch ops around the kernels recorded beside them."""
    import torch

    from fastcluster_cl.bench import trace

    n, d, k = 5000, 128, 10
    inputs = [torch.empty(n, c, dtype=torch.bfloat16, device="meta") for c in (d, d, k, k)]
    recorded = trace.record(paths._separate_total("cc_objective"), inputs, triton=True)
    names = [
        f"{c.kernel.fn.__module__.rsplit('.', 1)[-1]}.{c.kernel.fn.__name__}"
        for c in recorded.launches
    ]
    assert sorted(names) == sorted(
        [
            "nt_xent._scale_rows_kernel",
            "nt_xent._lse_fwd_kernel",
            "nt_xent._grad_kernel",
            "cc_cluster._stats_kernel",
            "cc_cluster._stats_merge_kernel",
            "cc_cluster._epilogue_fwd_kernel",
            "cc_cluster._epilogue_bwd_kernel",
            "cc_cluster._grad_operands_kernel",
            "cc_cluster._grad_kernel",
        ]
    )
    assert all(name in paths.SEPARATE_LOOPS for name in names)
    stats = recorded.launches[names.index("cc_cluster._stats_kernel")]
    assert stats.grid == (128,) and stats.args["n"] == n
    assert paths.SEPARATE_LOOPS["cc_cluster._stats_kernel"][0](stats.args, stats.grid) == 2
    # around the kernels only NT-Xent's mean, the total's add and autograd's seed (the partial
    # sums, the Gram's assembly and the concatenations of Z are launches of their own or gone)
    assert [name for name, _ in recorded.kernels] == [
        "aten.mean.default",
        "aten.add.Tensor",
        "aten.ones_like.default",
    ]


def test_a_kernel_whose_loops_are_unread_is_refused():
    from fastcluster_cl.bench import trace

    nt = static_report.kernel_module("nt_xent")  # its symmetric kernels: not the separate path's
    call = trace.TritonLaunch(nt._symmetric_fwd_kernel, (4,), {"rows_total": 128, "D": 10})
    with pytest.raises(ValueError, match="not in SEPARATE_LOOPS"):
        paths.traced_launch(call)


TRACED_TILE = """
import json, torch
from fastcluster_cl.bench import paths, static_report, trace

z = [torch.empty(1024, 128, dtype=torch.bfloat16, device="meta") for _ in range(2)]
nt = static_report.kernel_module("nt_xent")
recorded = trace.record(lambda a, b: nt.nt_xent(a, b, 0.5), z, triton=True)
forward = next(c for c in recorded.launches if c.kernel.fn.__name__ == "_lse_fwd_kernel")
out = dict(bodies=paths.traced_launch(forward).mma_bodies())
name = "nt_xent._lse_fwd_kernel"
doubled = lambda a: 2 * a["BLOCK_M"] * a["BLOCK_N"] * a["BLOCK_D"]
for case, tile in (("doubled", doubled), ("none", None)):
    paths.SEPARATE_TILE_MACS = {k: v for k, v in paths.SEPARATE_TILE_MACS.items() if k != name}
    if tile:
        paths.SEPARATE_TILE_MACS[name] = tile
    try:
        paths.traced_launch(forward).predict()
        out[case] = "counted"
    except ValueError as err:
        out[case] = str(err)
print(json.dumps(out))
"""


def test_a_traced_mma_loop_must_do_one_tile_a_body():
    """A traced launch's MMA loop is counted only while one body does the tile
    SEPARATE_TILE_MACS names (the forward's 64 x 128 x 128 products at D = 128: 2N / 64
    programs x 2N / 128 column tiles); a wrong tile (as after an unrolled loop) is refused,
    and so is an MMA loop of a kernel with no tile named."""
    out = _compiled_json(["-c", TRACED_TILE])
    assert out["bodies"] == 32 * 16
    assert "MACs a body, not one tile's" in out["doubled"]
    assert "not one tile's None" in out["none"]


def test_bytes_outside_loops_are_serialised_at_the_sms_share_of_l2():
    """One program per SM whose straight code loads 64 KiB around a 1000-clock loop: the high
    end adds the global latency and 64 KiB at the SM's share of L2 bandwidth; the low end
    (everything overlapped) does not."""
    edge = model.Region(-1, 0, False, False, None, {u: 0 for u in model.UNITS}, 65536)
    body = model.Region(0, 1, True, False, 0, dict({u: 0 for u in model.UNITS}, tensor=10), 0)
    compiled = model.Compiled("edges", 4, 32, 0, 0, 1, [edge, body])
    p = model.Launch(compiled, model.SMS, lambda loop: 100).predict()
    l2 = model.SMS * 65536 / model.L2_BYTES_PER_S
    assert p["low_s"] == pytest.approx(model.LAUNCH_S + max(1000 / model.CLOCK_HZ, l2))
    serial = 1000 + model.MEMORY_LATENCY_CLOCKS + 65536 / model.L2_BYTES_PER_SM_CLOCK
    assert p["high_s"] == pytest.approx(model.LAUNCH_S + serial / model.CLOCK_HZ)


# TTGIR as Triton prints it: a loop (a vector load in the MMA's slice layout, a scalar one
# under an scf.if, a reduction's region) around an inner loop loading a 2-D tile and
# multiplying on the tensor cores; then a while loop loading pointers, and a loop loading
# through a block pointer and multiplying on the FMA units.
TTGIR = """
#loc = loc("k.py":1:0)
module attributes {"ttg.num-warps" = 8 : i32} {
  tt.func public @k(%A: !tt.ptr<f32> {tt.divisibility = 16 : i32} loc("A"(#loc)), %B: !tt.ptr<f16> loc("B"(#loc))) attributes {noinline = false} {
    %r = scf.for %i = %c0 to %n step %c64 iter_args(%acc = %z) -> (f32)  : i32 {
      %v = tt.load %p, %m : tensor<64x!tt.ptr<f32>, #ttg.slice<{dim = 0, parent = #mma}>> loc(#loc1)
      %s = scf.if %c -> (f32) {
        %x = tt.load %A : !tt.ptr<f32> loc(#loc2)
        scf.yield %x : f32 loc(#loc3)
      } else {
        scf.yield %acc : f32 loc(#loc4)
      } loc(#loc5)
      %t = "tt.reduce"(%v) <{axis = 0 : i32}> ({
      ^bb0(%a: f32 loc(callsite(#loc6 at #loc7)), %b: f32 loc(callsite(#loc6 at #loc7))):
        %y = arith.addf %a, %b : f32 loc(#loc6)
        tt.reduce.return %y : f32 loc(#loc7)
      }) : (tensor<64xf32, #blocked>) -> f32 loc(#loc8)
      scf.for %j = %c0 to %n step %c64  : i32 {
        %w = tt.load %q {contiguity = 8 : i32} : tensor<64x128x!tt.ptr<f16>, #blocked1> loc(#loc9)
        %d = ttng.warp_group_dot %w, %u, %e : !ttg.memdesc<64x128xf16> -> tensor<64x64xf32, #mma> loc(#loc10)
      } loc(#loc11)
      scf.yield %t : f32 loc(#loc12)
    } {tt.num_stages = 2 : i32} loc(#loc13)
    %k = scf.while (%a = %c0) : (i32) -> i32 {
      %pp = tt.load %pq : tensor<16x!tt.ptr<!tt.ptr<f32>>, #blocked> loc(#loc14)
      scf.condition(%f) %a : i32 loc(#loc15)
    } do {
    ^bb0(%a: i32 loc("a"(#loc))):
      scf.yield %a : i32 loc(#loc16)
    } loc(#loc17)
    scf.for %j = %c0 to %n step %c64  : i32 {
      %b = tt.load %bp : !tt.ptr<tensor<64x64xf16, #blocked1>> loc(#loc18)
      %f = tt.dot %x, %y, %z : tensor<16x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<16x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<16x16xf32, #blocked> loc(#loc18)
    } loc(#loc19)
    tt.return loc(#loc20)
  } loc(#loc21)
} loc(#loc22)
"""  # noqa: E501 (as Triton prints it)


def test_ttgir_loops_read_the_loads_and_products():
    """Each loop's `tt.load` tensors, each element once, its inner loop's apart (pointers 8
    bytes each); a tensor-core product marks its loop and the loops around it (an FMA one does
    not); a load the parser cannot size (a block pointer) leaves its loop's bytes unknown."""
    assert model.ttgir_loops(TTGIR) == [
        model.TtgirLoop(0, 64 * 4 + 4, True),
        model.TtgirLoop(1, 64 * 128 * 2, True),
        model.TtgirLoop(0, 16 * 8, False),
        model.TtgirLoop(0, None, False),
    ]


def test_replicated_loads_cross_l2_once():
    """A loop whose LDGs load 16 KiB across its warps but 256 distinct bytes (a column vector
    broadcast into the MMA layout) moves its LDGSTS tile and those 256 bytes through L2; the
    rest are L1 hits, charged to the shared-memory unit. Where the TTGIR's loops are not the
    SASS's (nesting, products) every byte counts as issued."""
    ttgir = "\n".join(
        [
            "tt.func @k() {",
            "scf.for %i {",
            "%d = ttng.warp_group_dot %a, %b, %c",
            "%v = tt.load %p : tensor<64x!tt.ptr<f32>>",
            "}",
            "}",
        ]
    )

    def loop(mma: bool = True) -> model.Region:
        units = {u: 0 for u in model.UNITS}
        return model.Region(0, 1, mma, False, None, units, 16384 + 16384, 16384)

    outside = model.Region(-1, 0, False, False, None, {u: 0 for u in model.UNITS}, 4096, 4096)
    cut = [outside, loop()]
    model.cap_repeated_loads(cut, ttgir)
    assert cut[1].l2_bytes == 16384 + 256 and outside.l2_bytes == 4096
    assert cut[1].clocks["shared"] == (16384 - 256) / model.SHARED_BYTES_PER_CLOCK
    for other in ([outside, loop(mma=False)], [outside, loop(), loop()]):
        model.cap_repeated_loads(other, ttgir)
        assert all(r.unique_loads is None and r.l2_bytes == r.global_bytes for r in other)


def test_wide_gemms_run_on_the_fp32_pipe():
    """torch's fp32 matmul is IEEE (no TF32): two waves of 128 x 128 tiles (144 tiles) take the
    tensor cores' rate over the FP32 pipe's (2048 / 128) times a 16-bit product's."""
    bf16, fp32 = (model.gemm_seconds(1536, 1536, 4096, size) - model.LAUNCH_S for size in (2, 4))
    assert fp32 / bf16 == pytest.approx(2048 / model.WIDE_GEMM_MACS_PER_CLOCK)
    per_tile = 128 * 128 * 4096 / (model.WIDE_GEMM_MACS_PER_CLOCK * model.CUBLAS_FRACTION)
    assert fp32 == pytest.approx(2 * per_tile / model.CLOCK_HZ)


def test_skinny_gemms_take_their_own_rows_and_split_k():
    """10 x 512 x 1024 (the Student-t centre gradient at K = 10): 16-row tiles, 4 of them, each
    k split in 8 slices of 128 over 32 SMs: one wave of 16 x 128 x 128."""
    got = model.gemm_seconds(10, 512, 1024, 4) - model.LAUNCH_S
    per_slice = 16 * 128 * 128 / (model.WIDE_GEMM_MACS_PER_CLOCK * model.CUBLAS_FRACTION)
    assert got == pytest.approx(per_slice / model.CLOCK_HZ)
