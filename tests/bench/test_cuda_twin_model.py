"""The CUDA twin in the cost model (fastcluster_cl.bench.cuda_twin): its launchers' mirror
against the launchers themselves (host emulation), its stand-in extension against the emulated
one, and its kernels' tensor-core work against a hand count. Compiling needs nvcc."""

import dataclasses
import math

import pytest
import torch

from fastcluster_cl.bench import cuda_twin, model, paths, trace


def _need_nvcc():
    if cuda_twin.nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")


@pytest.mark.parametrize("backward", [False, True])
def test_split_mirror_matches_the_launcher(csrc_lib, backward):
    """`column_splits` picks what fcl_nt_xent_splits picks on 132 SMs, gathered row ranges and
    odd sizes included."""
    for m in (2, 130, 512, 2048, 8192, 65536, 16384):
        for rows in (1, m // 8 or 1, m // 2 or 1, m):
            for d in (16, 128, 200, 2048):
                want = csrc_lib.fcl_nt_xent_splits(1, m, d, rows, int(backward), model.SMS)
                assert cuda_twin.column_splits(m, d, rows, backward) == want, (m, rows, d)


class _Logged:
    """The emulated extension, each NT-Xent call logged as (method, result shapes and dtypes)."""

    def __init__(self, ext):
        self.ext, self.log = ext, []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            out = getattr(self.ext, name)(*args, **kwargs)
            results = out if isinstance(out, (tuple, list)) else (out,)
            self.log.append((name, [(tuple(t.shape), t.dtype) for t in results]))
            return out

        return call


def _stand_in_log(record):
    """The stand-in's calls, while `record()` traces a path, with its results' shapes and
    dtypes."""

    class Logged(cuda_twin.Extension):
        def __init__(self):
            super().__init__()
            self.log = []

        def __getattribute__(self, name):
            attr = super().__getattribute__(name)
            if name.startswith("_") or name in ("calls", "log") or not callable(attr):
                return attr

            def call(*args, **kwargs):
                out = attr(*args, **kwargs)
                results = out if isinstance(out, (tuple, list)) else (out,)
                self.log.append((name, [(tuple(t.shape), t.dtype) for t in results]))
                return out

            return call

    ext = Logged()
    with cuda_twin.stand_in(ext):
        record()
    return ext.log


@pytest.mark.parametrize("ranks", [1, 3])
def test_stand_in_answers_as_the_extension(emulated, monkeypatch, ranks):
    """Run for real on CPU (the emulated kernels), backend="cuda" makes the same extension calls,
    with results of the same shapes and dtypes, as the stand-in the model traces with."""
    from fastcluster_cl.backends.autograd import nt_xent as autograd
    from fastcluster_cl.backends.cuda import build

    n, d = 5, 24
    logged = _Logged(emulated)
    monkeypatch.setattr(build, "extension", lambda: logged)
    z_a, z_b = (torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    with trace.rank_zero_of(ranks):
        autograd.nt_xent(z_a, z_b, 0.5, "cuda", gather=ranks > 1).backward()
    methods = [name for name, _ in logged.log]
    assert methods == (
        ["normalize", "lse_rows", "grad_rows", "norm_backward"]
        if ranks == 1
        else ["normalize", "lse_rows"] * 2 + ["normalize", "grad_rows", "norm_backward"] * 2
    )
    assert logged.log == _stand_in_log(lambda: trace.nt_xent("cuda", n, d, ranks))


@pytest.mark.parametrize(
    "op, shape",
    [
        ("anchor_objective", dict(n=5, d=24, f=12, k=3)),
        ("cc_objective", dict(n=5, d=24, k=3)),
        ("cc_objective", dict(n=5, d=24, k=65)),  # beyond the one-pass kernels: separate ops
    ],
)
def test_objective_stand_in_answers_as_the_extension(emulated, monkeypatch, op, shape):
    """The objectives on backend="cuda" (`paths._cuda_total`), run for real on CPU, make the
    same extension calls with results of the same shapes and dtypes as the stand-in."""
    from fastcluster_cl.backends.cuda import build

    logged = _Logged(emulated)
    monkeypatch.setattr(build, "extension", lambda: logged)
    total = paths._cuda_total(op)
    inputs = [
        torch.randn(t.shape, dtype=t.dtype).requires_grad_()
        for t in paths._objective_inputs(op, shape)
    ]
    total(*inputs).backward()
    one_pass = [f"{op}_forward", f"{op}_backward"]
    separate = ["normalize", "lse_rows"] * 2 + ["grad_rows", "norm_backward"] * 2
    methods = [name for name, _ in logged.log]
    assert methods == (separate if shape["k"] > 64 else one_pass)
    record = lambda: trace.record(total, paths._objective_inputs(op, shape), triton=True)  # noqa: E731
    assert logged.log == _stand_in_log(record)


def test_launches_cover_every_tile_once():
    """The forward's and backward's tensor-core work over the whole grid is the hand count:
    2N x 2N x D multiply-adds forward (S), twice that backward (S, then A Z), at a shape whose
    blocks and splits divide evenly."""
    _need_nvcc()
    n, d = 1024, 128
    launches, _, tiles = cuda_twin.nt_xent_path(n, d)
    assert tiles == 2 * (2 * n // 64) ** 2
    by_kernel = {launch.compiled.name: launch for launch in launches}
    for name, products in (("lse", 1), ("grad", 2)):
        launch = by_kernel[name]
        _, _, units, _ = model.program_clocks(launch.compiled, launch.trips)
        macs = units["tensor"] * launch.programs * model.static.MACS_PER_CLOCK["fp16"]
        assert macs == products * (2 * n) ** 2 * d, name
    assert [launch.compiled.name for launch in launches] == [
        "normalize",
        "lse",
        "merge_lse",
        "grad",
        "sum_splits",
        "norm_backward",
    ]
    assert by_kernel["lse"].programs == math.ceil(2 * n / 64) * cuda_twin.column_splits(
        2 * n, d, 2 * n, False
    )


@pytest.mark.parametrize("op", ["anchor_objective", "cc_objective"])
def test_objective_launches_cover_every_tile_once(op):
    """The one-pass objectives' tensor-core work over the whole grid is NT-Xent's hand count:
    2N x 2N x D multiply-adds forward (S), twice that backward (S, then A Z); the row kernels
    run a block per 16 pairs, each epilogue one block."""
    _need_nvcc()
    n, d = 1024, 128
    shape = dict(n=n, d=d, k=10, f=512) if op == "anchor_objective" else dict(n=n, d=d, k=10)
    launches, _, _ = cuda_twin.objective_path(
        paths._cuda_total(op), paths._objective_inputs(op, shape)
    )
    programs = {launch.compiled.name: launch.programs for launch in launches}
    prefix = op.split("_")[0]
    assert programs[f"{prefix}_forward"] == programs[f"{prefix}_backward"] == n // 16
    for launch in launches:
        _, _, units, _ = model.program_clocks(launch.compiled, launch.trips)
        macs = units["tensor"] * launch.programs * model.static.MACS_PER_CLOCK["fp16"]
        products = {f"{prefix}_forward": 1, f"{prefix}_backward": 2}.get(launch.compiled.name, 0)
        assert macs == products * (2 * n) ** 2 * d, launch.compiled.name
    epilogues = ("anchor_epilogue",) if prefix == "anchor" else ("cc_epilogue", "cc_weights")
    assert all(programs[name] == 1 for name in epilogues)


def test_changed_loops_and_missing_nvcc_are_rows(monkeypatch):
    """A kernel whose compiled loops are not its listed ones, or no nvcc, gives a row saying so
    rather than a number."""
    _need_nvcc()
    common = {"op": "nt_xent", "shape": {"n": 256, "d": 128}, "floor_us": 1.0, "eager_us": 2.0}
    listed = cuda_twin.KERNELS["lse"]
    monkeypatch.setitem(
        cuda_twin.KERNELS, "lse", dataclasses.replace(listed, loops=listed.loops[1:])
    )
    cuda_twin.compiled.cache_clear()
    try:
        row = paths.cuda_nt_xent_row(common, 256, 128, 1)
    finally:
        cuda_twin.compiled.cache_clear()
    assert row["runs"] and row["predicted_us_low"] is None
    assert "lse: compiled loops" in row["reason"]
    monkeypatch.setattr(cuda_twin, "nvcc", lambda: None)
    cuda_twin._functions.cache_clear()
    try:
        row = paths.cuda_nt_xent_row(common, 256, 128, 1)
    finally:
        cuda_twin._functions.cache_clear()
    assert "nvcc not found" in row["reason"]
    monkeypatch.setattr(cuda_twin, "nvcc", lambda: "false")  # a compiler that fails
    try:
        row = paths.cuda_nt_xent_row(common, 256, 128, 1)
    finally:
        cuda_twin._functions.cache_clear()
    assert "failed on csrc/nt_xent.cu" in row["reason"]


def test_the_positive_pair_is_the_cold_side():
    """In the gradient's tile loop the element's two exps (P_ij, P_ji) count on every trip and
    the positive pair's expm1, the else side nvcc jumps over, once per program: 2 MUFU a
    thread per column of its half row (32), in the forward 1 (and the rescale)."""
    _need_nvcc()
    per_thread = {}
    for name in ("lse", "grad"):
        kernel, _ = cuda_twin.compiled(name)
        column_loop = next(r for r in kernel.regions[1:] if r.depth == 0 and r.has_mma)
        per_thread[name] = column_loop.clocks["mufu"] * model.MUFU_PER_CLOCK / cuda_twin.THREADS
    assert per_thread == {"lse": 33, "grad": 64}


def test_gathered_paths_are_traced_as_rank_zero():
    """Gathered over 8 ranks, each of the rank's two row ranges runs the prologue over every
    rank's rows, the forward and its merge; the backward the same with dz_rows' epilogue (the
    launches `paths.nt_xent_gathered` compiles); the eager reference is its differentiable
    all-gather and the dense rows."""
    from fastcluster_cl import kernels  # noqa: F401  (registers backend "triton")

    recorded = trace.nt_xent("triton", 256, 128, 8)
    names = [call.kernel.fn.__name__ for call in recorded.launches]
    assert names.count("_scale_rows_kernel") == 4
    assert names.count("_lse_fwd_kernel") == names.count("_grad_kernel") == 2
    backward = ("_grad_kernel", "_grad_merge_kernel")  # the epilogue in one of them per range
    epilogues = [c.args["EPILOGUE"] for c in recorded.launches if c.kernel.fn.__name__ in backward]
    assert epilogues.count(True) == 2
    assert 0 < len(recorded.kernels) < 20
    assert paths._eager_nt_xent(256, 128, 8) > paths._eager_nt_xent(256, 128)
