"""The Triton backend's internals: the row-range primitives, the symmetric forward, tiny tile
weights, the center and cluster tiling (blocks monkeypatched small) and documented limits, the
fused anchor objective, device guards, availability. Values and gradients of every op against
the float64 reference, on every backend, are in ops/test_op_*.py. Without CUDA the kernels run
under TRITON_INTERPRET=1 (tests/conftest.py)."""

import importlib
import sys

import pytest
import torch
from lowp import (
    SOLVED_CASES,
    assert_solved_case,
    correlated_views,
    tiny_weight_case,
    tiny_weight_error,
)
from tolerances import ACCUMULATION, check_against_reference, lowp_bounds, relative_errors, widen

import fastcluster_cl as fc
from fastcluster_cl import kernels
from fastcluster_cl.backends import dispatch, reference
from fastcluster_cl.kernels.nt_xent import (
    grad_rows,
    lse_rows,
    symmetric_grad,
    symmetric_masked_lse,
    weight_scale,
)
from fastcluster_cl.modules import ClusterContrastiveLoss

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def leaves(*tensors, dtype):
    return [t.to(DEVICE, dtype).detach().clone().requires_grad_() for t in tensors]


def compare(
    fn_triton, fn_ref, inputs, dtype, weights=None, loosen=1.0, grad_scale=None, out_dtype=None
):
    """`tolerances.check_against_reference` on the Triton device: the shared tolerance table,
    `loosen` where the problem amplifies rounding (1/tau multiplies the error of S)."""
    check_against_reference(
        fn_triton,
        fn_ref,
        inputs,
        dtype,
        device=DEVICE,
        weights=weights,
        loosen=loosen,
        grad_scale=grad_scale,
        out_dtype=out_dtype,
    )


# --- NT-Xent ---------------------------------------------------------------------------------


def triton_nt_xent(a, b, tau):
    return fc.nt_xent(a, b, tau, backend="triton")


def launch_grids(monkeypatch, module, name: str) -> list:
    """The grids of every launch of `module`.`name` from now on (the kernel still runs)."""
    grids, kernel = [], getattr(module, name)

    class Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, name, Recorded())
    return grids


def test_weight_scale_is_the_power_of_two_under_2_to_the_15():
    """`nt_xent.weight_scale`: sigma = 2^(15 - ceil(log2 b)), so sigma b is in (2^14, 2^15]
    (exact powers of two land on 2^15), b clamped to [2^-100, 2] (0, subnormal, above 2, inf)."""
    import triton
    import triton.language as tl

    @triton.jit
    def scale(B, OUT):
        i = tl.program_id(0)
        tl.store(OUT + i, weight_scale(tl.load(B + i)))

    bounds = [2.0, 1.9, 1.0, 0.75, 0.5, 1e-12, 2.0**-100, 0.0, 1e-40, 5.0, float("inf")]
    b = torch.tensor(bounds, device=DEVICE)
    got = torch.empty_like(b)
    scale[(b.numel(),)](b, got)
    want = [2**14, 2**14, 2**15, 2**15, 2**16, 2**54, 2**115, 2**115, 2**115, 2**14, 2**14]
    assert got.tolist() == [float(w) for w in want]


def test_tiny_tile_weights_keep_fp16_precision():
    """Weights ~ 1e-8 in a batch whose largest loss is large (2N ~ 1e5 and beyond: unscaled,
    72% of them were flushed at 2N = 65536) are scaled by 2^14 before their fp16 rounding
    (support/lowp.py `tiny_weight_case`)."""
    z, lse, row_loss, want = tiny_weight_case()
    got = grad_rows(z, lse, row_loss, 0, z.shape[0], 2.0)
    assert tiny_weight_error(got, want) < 2e-3


@pytest.mark.parametrize("case", SOLVED_CASES)
def test_solved_batches_keep_their_gradients(case):
    """Nearly solved bf16 batches (row losses 1e-13 to 5e-11, one with a hard pair) keep
    their gradients within twice the chunked path's error: the backward scales its tile weights
    by a power of two from the largest row loss (`nt_xent.weight_scale`; a fixed 2^14 flushed
    them in fp16: 78% gradient error, 190 of 194 rows zero, on close views at tau 0.016)."""
    assert_solved_case(case, "triton", kernels.cc_objective, kernels.anchor_objective)


@pytest.mark.parametrize("case", ["fixed shift", "one hard pair", "per row"])
def test_solved_batches_without_column_splits(monkeypatch, case):
    """As above with one program per row block (the interpreter splits every sweep): the
    forward kernel itself writes the largest losses, and the backward runs its epilogue."""
    monkeypatch.setattr(sys.modules["fastcluster_cl.kernels.nt_xent"], "SPLIT_PROGRAMS", 1)
    assert_solved_case(case, "triton", kernels.cc_objective, kernels.anchor_objective)


def test_nt_xent_extreme_inputs_stay_finite():
    """Near-identical embeddings at a small temperature, plus an all-zero row."""
    base = randn(1, 16, seed=7)
    z_a = base + 1e-6 * randn(33, 16, seed=8)
    z_b = base + 1e-6 * randn(33, 16, seed=9)
    z_b[3] = 0.0
    for tau in (0.05, 0.01):  # gradients at fp32's rounding level: absolute tolerances
        compare(
            lambda a, b: fc.nt_xent(a, b, tau, backend="triton"),
            lambda a, b: reference.nt_xent(a, b, tau),
            (z_a, z_b),
            torch.float32,
            loosen=0.1 / tau,
            grad_scale=1.0,
        )


@pytest.mark.parametrize("d", [20, 1030])  # 1030: feature chunks, weight slabs (`nt_xent.wide`)
def test_row_range_primitives(monkeypatch, d):
    # wide rows: the gradient's rows [40, 74) in slabs of 16 (the last 2 rows)
    monkeypatch.setattr(sys.modules["fastcluster_cl.kernels.nt_xent"], "slab_rows", lambda d: 16)
    n2, inv_tau = 74, 2.0
    z = randn(n2, d, seed=10)
    zn = z / z.norm(dim=1, keepdim=True)
    s = zn @ zn.T * inv_tau
    s_masked = s.masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
    lse = torch.logsumexp(s_masked, dim=1)
    pos = torch.arange(n2).roll(n2 // 2)
    row_loss = lse - s[torch.arange(n2), pos]
    got_lse, got_loss = lse_rows(z, 5, 50, inv_tau)
    torch.testing.assert_close(got_lse, lse[5:50], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_loss, row_loss[5:50], rtol=1e-12, atol=1e-12)
    p = torch.exp(s_masked - lse[:, None])
    want = (p + p.T) @ zn - 2 * zn[pos]
    torch.testing.assert_close(
        grad_rows(z, lse, row_loss, 40, n2, inv_tau), want[40:], rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="row_end"):
        lse_rows(z, 10, 80, inv_tau)


@pytest.mark.parametrize("tau", [0.5, 0.005])  # 0.005: the online max, merged by its maxima
def test_column_splits_match_one_program_per_row_block(monkeypatch, tau):
    """The row-parallel launches cut their columns into splits (`column_splits`: 3 here, a row
    range not starting at 0) and merge them in a fixed order: the same values and gradients as
    one program sweeping every column, to rounding, and bitwise the same run to run."""
    nt = sys.modules["fastcluster_cl.kernels.nt_xent"]
    z = randn(74, 20, seed=16).float()
    assert nt.column_splits(45, 74, nt.forward_config(20, torch.float32))[0] == 3
    lse, loss = lse_rows(z, 5, 50, 1 / tau)
    grad = grad_rows(z, *lse_rows(z, 0, 74, 1 / tau), 40, 74, 1 / tau)
    again = lse_rows(z, 5, 50, 1 / tau)
    assert torch.equal(lse, again[0]) and torch.equal(loss, again[1])
    monkeypatch.setattr(nt, "SPLIT_PROGRAMS", 1)
    assert nt.column_splits(45, 74, nt.forward_config(20, torch.float32))[0] == 1
    whole = lse_rows(z, 5, 50, 1 / tau)
    torch.testing.assert_close(lse, whole[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, whole[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        grad, grad_rows(z, *lse_rows(z, 0, 74, 1 / tau), 40, 74, 1 / tau), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("tau", [0.5, 0.005])
def test_bank_column_splits_match_one_program_per_row_block(monkeypatch, tau):
    """The memory bank's launches split the bank's columns (3 splits of 32 columns here) and
    merge them in order: values and gradients as one program per row block, to rounding, and
    bitwise the same run to run."""
    nt = sys.modules["fastcluster_cl.kernels.nt_xent"]
    bank_module = sys.modules["fastcluster_cl.kernels.nt_xent_bank"]
    z_a, z_b = (randn(40, 16, seed=s).float() for s in (17, 18))
    bank = torch.nn.functional.normalize(randn(70, 16, seed=19), dim=1).float()
    assert nt.column_splits(40, 70, nt.forward_config(16, torch.float32))[0] == 3

    def run():
        a, b = leaves(z_a, z_b, dtype=torch.float32)
        loss = bank_module.nt_xent_bank(a, b, bank, tau)
        loss.backward()
        return loss, a.grad, b.grad

    split = run()
    assert all(torch.equal(x, y) for x, y in zip(split, run()))
    monkeypatch.setattr(nt, "SPLIT_PROGRAMS", 1)
    for x, y in zip(split, run()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_column_splits_on_a_gpu(monkeypatch):
    """Compiled (not interpreted), a launch splits a sweep of at least MIN_SWEEP_TILES column
    tiles into runs of at least MIN_SPLIT_TILES, toward SPLIT_PROGRAMS programs: none at
    2N = 512 (4 and 8 column tiles), 8 forward and backward splits at 2N = 2048, 2 at 8192,
    none at 65536."""
    nt = sys.modules["fastcluster_cl.kernels.nt_xent"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fwd, bwd = nt.forward_config(128, torch.float16), nt.backward_config(128, torch.float16)
    got = {rows: [nt.column_splits(rows, rows, c) for c in (fwd, bwd)] for rows in (512, 2048)}
    assert got[512] == [(1, 512), (1, 512)]
    assert got[2048] == [(8, 256), (8, 256)]
    assert nt.column_splits(8192, 8192, bwd) == (2, 4096)
    assert nt.column_splits(65536, 65536, bwd)[0] == 1


def test_tall_batches_take_128_row_forward_tiles_on_a_gpu(monkeypatch):
    """Compiled, the forward of 2-byte rows up to 128 features takes 128 x 64 tiles on 8 warps
    from TALL_ROWS rows (halving its L2 traffic), 64 x 128 below; wider or 4-byte rows keep
    theirs."""
    nt = sys.modules["fastcluster_cl.kernels.nt_xent"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    half = torch.float16
    assert nt.forward_config(128, half, nt.TALL_ROWS - 2).block == (64, 128, 128)
    tall = nt.forward_config(128, half, nt.TALL_ROWS)
    assert (tall.block, tall.num_warps, tall.num_stages) == ((128, 64, 128), 8, 3)
    assert nt.forward_config(256, half, 65536).block == (128, 32, 256)
    assert nt.forward_config(128, torch.float32, 65536).block == (64, 64, 128)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("tau", [0.02, 0.05, 0.5])
@pytest.mark.parametrize("d", [40, 200])
def test_tall_forward_tiles_match_the_reference(monkeypatch, split, tau, d):
    """The 128-row forward tiles (128 x 64 at D = 40, 128 x 32 at 200), with and without
    column splits, on correlated views of 97 pairs, sizes no block divides, against the float64
    reference (interpreted here, compiled on a GPU): loss and gradients within twice the
    fp32-accumulating chunked path's error on the same rounded inputs in bf16; at tau = 0.02
    (the online max) in fp32 to 10x its tolerance on less correlated views, as the 32 x 32
    tiles are tested there (closer views' float64 reference loss rounds to 0 at that tau;
    whatever the tiles, the fp32 loss's error there is 2-5x the chunked path's)."""
    nt = sys.modules["fastcluster_cl.kernels.nt_xent"]
    with monkeypatch.context() as compiled:
        compiled.setenv("TRITON_INTERPRET", "0")
        tall = nt.forward_config(d, torch.float16, nt.TALL_ROWS)
    monkeypatch.setattr(nt, "forward_config", lambda d, dtype, rows=0: tall)
    if split:
        monkeypatch.setattr(nt, "MIN_SWEEP_TILES", 1)
        monkeypatch.setattr(nt, "MIN_SPLIT_TILES", 1)
    else:
        monkeypatch.setattr(nt, "SPLIT_PROGRAMS", 1)
    assert tall.block[0] == 128 and (nt.column_splits(194, 194, tall)[0] > 1) == split
    online_max = tau < 0.025  # there closer views' float64 reference loss rounds to 0
    noise = 1.0 if online_max else 0.05
    views = tuple(v.to(DEVICE) for v in correlated_views(97, d, seed=71, noise=noise))
    run = (lambda a, b: triton_nt_xent(a, b, tau), lambda a, b: reference.nt_xent(a, b, tau))
    if online_max:
        compare(*run, views, torch.float32, loosen=10.0)
        return
    grad_err, loss_err = relative_errors(*run, views, torch.bfloat16)
    grad_bound, loss_bound = lowp_bounds(
        lambda a, b: fc.nt_xent(a, b, tau, backend="chunked"), run[1], views, torch.bfloat16
    )
    assert grad_err <= grad_bound and loss_err <= loss_bound, (grad_err, loss_err)


def test_wide_rows_take_tensor_core_tiles_on_a_gpu(monkeypatch):
    """Compiled, 2-byte rows of 129-512 features take tensor-core tiles of 64 rows or more
    (the 32 x 32 mma.sync tiles were shared-memory bound): forward 128 x 32 on 8 warps at 256,
    64 x 64 in one stage at 512; backward 64 x 32 at 256 and 32 x 32 at 512; 4-byte rows and
    the bank kernels keep 32 x 32 there, and so do the one-pass objectives' instance launches.
    Only rows of at most 128 features run the epilogue in the backward launch."""
    nt = sys.modules["fastcluster_cl.kernels.nt_xent"]
    bank = sys.modules["fastcluster_cl.kernels.nt_xent_bank"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    half, single = torch.float16, torch.float32

    def tiles(config):
        return config.block, config.num_stages

    assert tiles(nt.forward_config(200, half)) == ((128, 32, 256), 2)
    assert tiles(nt.forward_config(512, half)) == ((64, 64, 512), 1)
    assert tiles(nt.backward_config(256, half)) == ((64, 32, 256), 2)
    assert tiles(nt.backward_config(512, half, epilogue=False)) == ((32, 32, 512), 1)
    assert nt.forward_config(256, single).block == nt.backward_config(256, single).block
    assert nt.forward_config(256, single).block == (32, 32, 256)
    assert bank.bank_forward_config(256, half).block == (32, 32, 256)
    assert tiles(bank.bank_backward_config(256, half, epilogue=False)) == ((32, 32, 256), 1)
    assert [nt.epilogue_in_backward(d) for d in (128, 129, 512)] == [True, False, False]
    instance = sys.modules["fastcluster_cl.kernels.objective.instance"]
    assert [c.block for c in instance.instance_config(256, half)] == [(32, 32, 256)] * 2
    assert instance.instance_config(128, half)[1].block == (64, 64, 128)


def test_rows_wider_than_the_registers_stream_feature_chunks(monkeypatch):
    """Beyond MAX_FEATURES a program holds no rows: its scores sum feature chunks. The backward
    writes the scaled weights of a slab of rows against every column, then multiplies them with
    Zs (split-K), slab after slab, its epilogue in the merge over whole rows: here slabs of 32
    rows (of 80) and the product's 80 columns in 2 splits. On a GPU 2-byte rows take 128 x 128
    tiles of 64-feature chunks forward and for the weights (64 x 64 below 1024 rows, 128 x 256
    of 32 from TALL_ROWS), 128 x 256 x 64 product tiles; up to 2048 features, slabs of 2048
    rows."""
    nt = sys.modules["fastcluster_cl.kernels.nt_xent"]
    weights = launch_grids(monkeypatch, nt, "_weight_slab_kernel")
    products = launch_grids(monkeypatch, nt, "_slab_product_kernel")
    monkeypatch.setattr(nt, "slab_rows", lambda d: 32)
    z_a, z_b = correlated_views(40, 1030, seed=71, noise=0.05)
    compare(
        lambda a, b: triton_nt_xent(a, b, 0.1),
        lambda a, b: reference.nt_xent(a, b, 0.1),
        (z_a, z_b),
        torch.float32,
    )
    # rows [0, 32), [32, 64), [64, 80): 32 x 32 weight tiles, product tiles of 32 x 32 features
    assert weights == [(1, 3)] * 3 and products == [(1, 33, 2)] * 3
    monkeypatch.undo()
    for scale in (1e19, 1e-30):  # rows whose squared norm overflows / underflows fp32
        compare(
            lambda a, b: triton_nt_xent(a, b, 0.2),
            lambda a, b: reference.nt_xent(a, b, 0.2),
            correlated_views(9, 1030, seed=72, scale=scale),
            torch.float32,
            loosen=2.0,
        )
    compare(  # tau 0.02: exp(-2 / tau) underflows fp32, the online row max
        lambda a, b: triton_nt_xent(a, b, 0.02),
        lambda a, b: reference.nt_xent(a, b, 0.02),
        correlated_views(9, 1030, seed=73, noise=3.0),
        torch.float32,
        loosen=widen(0.02),
    )
    monkeypatch.setattr(nt, "_is_interpreted", lambda: False)
    half, single = torch.bfloat16, torch.float32
    forward, backward = nt.forward_config(2048, half, 1024), nt.backward_config(2048, half)
    assert (forward.block, forward.chunk, backward.block) == ((128, 128, 64), 64, (128, 256, 64))
    assert nt.forward_config(2048, half, 1023).block == (64, 64, 64)
    tall = nt.forward_config(2048, half, nt.TALL_ROWS)
    assert (tall.block, tall.chunk, tall.num_stages) == ((128, 256, 32), 32, 3)
    assert (backward.num_warps, backward.num_stages, tall.num_warps) == (8, 3, 8)
    assert [nt.backward_config(2048, t).block for t in (single, F64)] == [(64, 64, 32), (32,) * 3]
    assert [nt.slab_rows(d) for d in (1030, 2048)] == [1024, 2048]
    assert nt.forward_config(1030, single).block == (64, 64, 32)
    assert not nt.forward_config(512, half).wide and nt.prologue_rows(2048) == 2
    with pytest.raises(ValueError, match="at most 2048"):
        nt.forward_config(2049, half)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_wide_rows_run_the_epilogue_in_the_merge(monkeypatch, dtype, tau):
    """Rows wider than 128 features: an unsplit backward (one column tile here) leaves its
    epilogue to `_grad_merge_kernel` over one split. Correlated views of 13 pairs x 200
    features against the float64 reference: fp32 to its tolerance, bf16 within twice the
    fp32-accumulating chunked path's error."""
    nt = sys.modules["fastcluster_cl.kernels.nt_xent"]
    merges = launch_grids(monkeypatch, nt, "_grad_merge_kernel")
    z_a, z_b = correlated_views(13, 200, seed=70, noise=0.05)
    assert nt.column_splits(26, 26, nt.backward_config(200, dtype))[0] == 1
    if dtype == torch.float32:
        compare(
            lambda a, b: triton_nt_xent(a, b, tau),
            lambda a, b: reference.nt_xent(a, b, tau),
            (z_a, z_b),
            dtype,
            loosen=10.0 if tau < 0.1 else 1.0,
        )
    else:
        views = (z_a.to(DEVICE), z_b.to(DEVICE))
        grad_err, loss_err = relative_errors(
            lambda a, b: triton_nt_xent(a, b, tau),
            lambda a, b: reference.nt_xent(a, b, tau),
            views,
            dtype,
        )
        grad_bound, loss_bound = lowp_bounds(
            lambda a, b: fc.nt_xent(a, b, tau, backend="chunked"),
            lambda a, b: reference.nt_xent(a, b, tau),
            views,
            dtype,
        )
        assert grad_err <= grad_bound and loss_err <= loss_bound, (grad_err, loss_err)
    assert merges, "the backward ran its epilogue in the launch"


def test_symmetric_variant_matches_row_parallel(monkeypatch):
    z = randn(70, 24, seed=11)
    lse, row_loss = lse_rows(z, 0, 70, 2.0)
    torch.testing.assert_close(symmetric_masked_lse(z, 2.0), lse, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="fixed shift"):
        symmetric_masked_lse(z, 1000.0)
    torch.testing.assert_close(
        symmetric_grad(z, lse, row_loss, 2.0),
        grad_rows(z, lse, row_loss, 0, 70, 2.0),
        rtol=1e-12,
        atol=1e-12,
    )
    monkeypatch.setattr(sys.modules["fastcluster_cl.kernels.nt_xent"], "SYMMETRIC", True)
    compare(
        lambda a, b: fc.nt_xent(a, b, 0.5, backend="triton"),
        lambda a, b: reference.nt_xent(a, b, 0.5),
        (randn(35, 24, seed=12), randn(35, 24, seed=13)),
        F64,
    )
    # tau = 0.01: the forward needs the online max (row-parallel), and so does its backward.
    compare(
        lambda a, b: fc.nt_xent(a, b, 0.01, backend="triton"),
        lambda a, b: reference.nt_xent(a, b, 0.01),
        (randn(35, 24, seed=14), randn(35, 24, seed=15)),
        torch.float32,
        loosen=10.0,
    )


def test_symmetric_variant_keeps_the_cancellation_free_losses(monkeypatch):
    """The upper-triangle forward sums the negatives only and takes each row's loss from the
    prologue's 1 - cos, as the row-parallel one: nearly identical views at tau 0.05 in fp32
    (its loss came out 1.7e-2 off when it subtracted S_pos from a full lse)."""
    monkeypatch.setattr(sys.modules["fastcluster_cl.kernels.nt_xent"], "SYMMETRIC", True)
    z_a, z_b = correlated_views(50, 40, seed=20, noise=0.02)
    grad_err, loss_err = relative_errors(
        lambda a, b: triton_nt_xent(a, b, 0.05),
        lambda a, b: reference.nt_xent(a, b, 0.05),
        (z_a.to(DEVICE), z_b.to(DEVICE)),
        torch.float32,
    )
    assert grad_err < 1e-5 and loss_err < 1e-5, (grad_err, loss_err)


def test_online_max_row_without_negatives_in_its_first_tile():
    """tau < 0.025 (online max) with 2 rows: every column of the first tile is masked for each
    row (its diagonal and its positive); the loss is 0, not NaN (2^(-inf + inf))."""
    lse, row_loss = lse_rows(randn(2, 8, seed=62).float(), 0, 2, 100.0)
    assert torch.isfinite(lse).all() and (row_loss == 0).all()


@pytest.mark.parametrize("layout", ["column slices", "transposed storage"])
def test_fast_path_ops_take_any_views(layout):
    """Called directly, the Triton NT-Xent and memory-bank forward ops read z_a, z_b as given:
    views with a row stride other than D (the prologue's two pointers) or with columns not
    adjacent (copied first) give the loss of their values; views of two shapes are refused."""
    z_a, z_b = correlated_views(20, 12, seed=73, noise=0.3)
    if layout == "column slices":
        views = torch.cat([z_a, z_b], 1).chunk(2, 1)
        assert views[0].stride(0) == 24
    else:
        views = tuple(z.T.contiguous().T for z in (z_a, z_b))
        assert views[0].stride(1) != 1
    ops = torch.ops.fastcluster_cl
    bank = torch.nn.functional.normalize(randn(7, 12, seed=74), dim=1)
    for call in (
        lambda a, b: ops.nt_xent_triton_fwd(a, b, 2.0, False, False)[0],
        lambda a, b: ops.nt_xent_bank_triton_fwd(a, b, bank, 2.0, False)[0],
    ):
        torch.testing.assert_close(call(*views), call(z_a, z_b))
    with pytest.raises(RuntimeError, match="same shape"):
        ops.nt_xent_triton_fwd(z_a, z_b[:-1], 2.0, False, False)


def test_float64_row_losses_match_to_rounding():
    """fp64's log1p and expm1 are exact to rounding (Kahan's forms): the fp32 series left 1e-9
    relative error where the loss is in (0.05, 0.1), which these rows cover."""
    z_a, z_b = correlated_views(60, 12, seed=63, noise=0.3)
    z = torch.cat([z_a, z_b])
    zn = z / z.norm(dim=1, keepdim=True)
    s = zn @ zn.T * 12.0
    lse = torch.logsumexp(s.masked_fill(torch.eye(120, dtype=torch.bool), float("-inf")), 1)
    want = lse - s[torch.arange(120), torch.arange(120).roll(60)]
    assert ((want > 0.05) & (want < 0.1)).sum() >= 5
    torch.testing.assert_close(lse_rows(z, 0, 120, 12.0)[1], want, rtol=1e-13, atol=1e-15)


def test_cc_loss_forms_on_long_columns_take_feature_chunks():
    """`cc_cluster_loss`'s from_probs and reduction="none" forms run NT-Xent on the N-long
    columns: N = 600 takes the wide kernels, the float64 reference's values and gradients."""
    logits = [randn(600, 3, seed=s).requires_grad_() for s in (60, 61)]
    probs = [t.detach().softmax(1).requires_grad_() for t in logits]
    for inputs, kwargs in ((logits, dict(reduction="none")), (probs, dict(from_probs=True))):
        got, want = (
            fc.cc_cluster_loss(*inputs, 0.5, backend=backend, **kwargs)
            for backend in ("triton", "torch")
        )
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        g_got, g_want = (torch.autograd.grad(x.sum(), inputs) for x in (got, want))
        for a, b in zip(g_got, g_want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_nt_xent_rejects_wide_rows_and_integer_inputs():
    with pytest.raises(ValueError, match="at most 2048 features.*chunked"):
        kernels.nt_xent(torch.randn(4, 2049), torch.randn(4, 2049), 0.5)
    with pytest.raises(TypeError, match="float"):
        kernels.nt_xent(
            torch.ones(4, 3, dtype=torch.int32), torch.ones(4, 3, dtype=torch.int32), 0.5
        )


# --- cluster side ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,f", [(37, 70, 100), (33, 96, 20), (5, 33, 7)])
def test_student_t_tiles_over_centers(monkeypatch, dtype, n, k, f):
    """K not a multiple of the center tile (32 here): several tiles, the online softmax across
    them, a last tile that is mostly padding (K = 33) and an exact multiple (K = 96)."""
    st = kernel_module("student_t")
    monkeypatch.setattr(st, "_BLOCK_K", 32)
    assert st._blocks(k, f)[0] == 32
    compare(
        lambda h, mu: fc.student_t(h, mu, 1.5, backend="triton"),
        lambda h, mu: reference.student_t(h, mu, 1.5),
        (randn(n, f, seed=52), randn(k, f, seed=53, scale=0.3)),
        dtype,
        weights=randn(n, k, seed=54),
        out_dtype=ACCUMULATION,
    )


def test_student_t_up_to_the_documented_limit():
    """K = MAX_CENTERS runs (in 16 tiles of 64 centers); one more is refused."""
    st = kernel_module("student_t")
    k = st.MAX_CENTERS
    compare(
        lambda h, mu: fc.student_t(h, mu, 1.0, backend="triton"),
        lambda h, mu: reference.student_t(h, mu, 1.0),
        (randn(3, 8, seed=55), randn(k, 8, seed=56)),
        torch.float32,
        grad_scale=1.0,
        out_dtype=ACCUMULATION,
    )  # d sum(q) = 0: rounding level
    with pytest.raises(ValueError, match="at most 1024 centers"):
        kernels.student_t(torch.randn(3, 8), torch.randn(k + 1, 8), 1.0)


def test_student_t_mixed_dtypes():
    """bf16 features with fp32 centers (autocast) give the fp32 computation on bf16 features."""
    h = randn(20, 16, seed=26).bfloat16()
    mu = randn(5, 16, seed=27).float().requires_grad_()
    got = kernels.student_t(h, mu, 1.0)
    torch.testing.assert_close(
        got, reference.student_t(h.float(), mu.detach(), 1.0), rtol=1e-5, atol=1e-6
    )
    got.sum().backward()
    assert mu.grad.dtype == torch.float32 and torch.isfinite(mu.grad).all()


def test_student_t_center_splits_fill_the_gpu(monkeypatch):
    """On a GPU the center tiles are split toward SPLIT_PROGRAMS programs when the row blocks
    alone are fewer: 64 row blocks x 16 tiles (N = 4096, K = 1000) in 4 splits of 4 tiles, 16
    row blocks (N = 1024) in 16 of one; a single tile, or rows enough, stay one split (one
    launch each way)."""
    st = kernel_module("student_t")
    monkeypatch.setattr(kernel_module("_common"), "is_interpreted", lambda: False)
    assert st._BLOCK_M == 64
    assert st.center_splits(4096, 1000, 64) == (4, 4)
    assert st.center_splits(1024, 1000, 64) == (16, 1)
    assert st.center_splits(1024, 64, 64) == (1, 1)
    assert st.center_splits(32768, 1000, 64) == (1, 16)


def test_kl_cluster_splits_fill_the_gpu(monkeypatch):
    """On a GPU the KL row launches (32-row blocks) split their cluster tiles where the row
    blocks are few: N = 256, K = 1000 (8 blocks) in 16 splits of one 64-column tile, N = 4096 in
    2 of 8, N = 32768 one sweep; sweeps of fewer than 8 tiles (K = 100) stay one split."""
    kl = kernel_module("kl")
    monkeypatch.setattr(kernel_module("_common"), "is_interpreted", lambda: False)
    assert kl._splits(256, 1000, 64) == (8, 16, 1)
    assert kl._splits(4096, 1000, 64) == (128, 2, 8)
    assert kl._splits(32768, 1000, 64) == (1024, 1, 16)
    assert kl._splits(256, 10, 16) == (8, 1, 1)
    assert kl._splits(256, 100, 64) == (8, 1, 2)


def test_student_t_gradient_products_split_k_where_tiles_are_few(monkeypatch):
    """On a GPU the centre gradient at K = 10 (one row of 64 x 64 output tiles, 8 of them at
    F = 512) splits its N = 32768 rows into 32 runs of 1024; dh (512 tiles) stays one launch."""
    common = kernel_module("_common")
    monkeypatch.setattr(common, "is_interpreted", lambda: False)
    assert common.product_splits(8, 32768, 32) == (32, 1024)
    assert common.product_splits(512, 1000, 32) == (1, 1024)
    assert common.product_splits(8, 100, 32) == (1, 128)  # 4 k-steps: too short to split
    st = kernel_module("student_t")  # 64 x 128 tiles where they fill the GPU: dh at N = 4096
    widths = [st.product_blocks(*shape)["BLOCK_N"] for shape in ((4096, 512), (256, 512))]
    assert widths == [128, 64]


def _expanded_fp32(h, mu, alpha):
    """Student-t from the expanded distances |h|^2 - 2 h.mu + |mu|^2 in fp32 IEEE products (the
    kernels' arithmetic before the split centers): the fp32-accumulating baseline of the AMP
    path's error."""
    h, mu = h.float(), mu.float()
    d = ((h * h).sum(1, keepdim=True) + (mu * mu).sum(1) - 2.0 * h @ mu.T).clamp_min(0.0)
    return torch.softmax(-(alpha + 1) / 2 * torch.log1p(d / alpha), dim=1)


def _amp_cases():
    """(name, h, centers) in the regimes users train in: points near one of their centers
    (near one-hot q) with large and tiny norms, and centers close together (near-uniform q)."""
    n, k, f = 45, 150, 100  # K: three center tiles (two splits), F: not a multiple of 32
    centers = randn(k, f, seed=61)
    owner = torch.arange(n) % k
    near = centers[owner] + 0.05 * randn(n, f, seed=62)
    base = randn(1, f, seed=63)
    uniform = (base + 1e-3 * randn(k, f, seed=64), base + 1e-3 * randn(n, f, seed=65))
    return [
        ("one-hot", near, centers),
        ("one-hot |h| 1e3", 1e3 * near, 1e3 * centers),
        ("one-hot |h| 1e-3", 1e-3 * near, 1e-3 * centers),
        ("near-uniform", uniform[1], uniform[0]),
    ]


@pytest.mark.parametrize(
    "case,wide",
    [(case, False) for case in range(4)] + [(0, True), (3, True)],
    ids=[c[0] for c in _amp_cases()] + ["one-hot 64x128", "near-uniform 64x128"],
)
def test_student_t_amp_centers_split_for_the_tensor_cores(monkeypatch, case, wide):
    """bf16 features against fp32 centers (the split centers on the tensor cores, several
    center splits; the gradient products on the tensor cores, dh's split over K, on 64 x 64
    tiles or, as where they fill a GPU, 64 x 128): q and both gradients within twice the error
    of the fp32 expanded-distance computation on the same inputs, against the float64
    reference; dh, a bf16 leaf's gradient, within twice the reference's own rounding to bf16
    where that is larger."""
    st = kernel_module("student_t")
    if wide:
        monkeypatch.setattr(st, "product_blocks", lambda rows, cols: st._LARGE_PRODUCT_BLOCKS)
    _, h, mu = _amp_cases()[case]
    h = h.bfloat16().double()  # the features as AMP hands them over: bf16 values
    weights = randn(h.shape[0], mu.shape[0], seed=66)
    alpha = 1.0

    def run(fn, h, mu, device="cpu"):
        h, mu = (t.to(device).detach().requires_grad_() for t in (h, mu))
        q = fn(h, mu)
        (q.double() * weights.to(device)).sum().backward()
        return [t.double().cpu() for t in (q, h.grad, mu.grad)]

    want = run(lambda h, mu: reference.student_t(h, mu, alpha), h, mu)
    base = run(lambda h, mu: _expanded_fp32(h, mu, alpha), h.float(), mu.float())
    got = run(lambda h, mu: kernels.student_t(h, mu, alpha), h.bfloat16(), mu.float(), DEVICE)
    for name, g, b, w in zip(("q", "dh", "dmu"), got, base, want):
        scale = w.abs().max().item()
        error = (b - w).abs().max().item()
        if name == "dh":
            error = max(error, (w.bfloat16().double() - w).abs().max().item())
        bound = 2 * error + 1e-7 * scale
        assert (g - w).abs().max().item() <= bound, (name, (g - w).abs().max().item(), bound)


def kernel_module(name):
    """The module kernels/<name>.py (the package exports functions under the same names)."""
    return importlib.import_module(f"fastcluster_cl.kernels.{name}")


def probabilities(n, k, seed):
    return torch.softmax(randn(n, k, seed=seed, scale=2.0), dim=1)


def test_anchor_objective_uses_the_fused_kernel(monkeypatch):
    calls = []
    fused = kernels.dec_anchor_losses
    monkeypatch.setattr(kernels, "dec_anchor_losses", lambda *q: calls.append(1) or fused(*q))
    monkeypatch.setattr(dispatch, "_RESOLVED", {})  # resolve to the patched function
    q = [probabilities(9, 4, seed) for seed in (47, 48, 49)]
    ClusterContrastiveLoss("anchor", backend="triton")(
        randn(9, 8, seed=50), randn(9, 8, seed=51), q0=q[0], q_a=q[1], q_b=q[2]
    )
    assert calls == [1]


def test_dec_and_anchor_one_hot_stay_finite():
    q = torch.eye(10, dtype=F64)[torch.arange(37) % 10]
    compare(lambda x: fc.dec_loss(x, backend="triton"), reference.dec_loss, (q,), torch.float32)
    compare(
        lambda q0, qa, qb: fc.anchor_loss(q0, qa, qb, backend="triton"),
        reference.anchor_loss,
        (q, q, probabilities(37, 10, 32)),
        torch.float32,
    )


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(37, 70), (40, 64), (5, 33)])
def test_kl_losses_tile_over_clusters(monkeypatch, dtype, n, k):
    """K not a multiple of the column tile (32 here): DEC's row sums (its target's mass, then the
    target) and the column sums across several tiles, on all three kernels."""
    kl = kernel_module("kl")
    monkeypatch.setattr(kl, "_BLOCK_K", 32)
    assert kl._block_k(k) == 32
    from fastcluster_cl.functional import dec_anchor_losses

    compare(
        lambda q: fc.dec_loss(q, backend="triton"),
        reference.dec_loss,
        (probabilities(n, k, 28),),
        dtype,
    )
    compare(
        lambda q0, qa, qb: fc.anchor_loss(q0, qa, qb, backend="triton"),
        reference.anchor_loss,
        (probabilities(n, k, 29), probabilities(n, k, 30), probabilities(n, k, 31)),
        dtype,
    )
    inputs = (probabilities(n, k, 57), probabilities(n, k, 58), probabilities(n, k, 59))
    compare(
        lambda *q: torch.stack(dec_anchor_losses(*q, backend="triton")),
        lambda *q: torch.stack([reference.dec_loss(q[0]), reference.anchor_loss(*q)]),
        inputs,
        dtype,
        torch.tensor([0.7, 1.3], dtype=F64),
    )


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["one-hot", "near-uniform"])
def test_kl_split_rows_at_one_hot_and_near_uniform(monkeypatch, dtype, shape):
    """The row launch split over cluster tiles (3 tiles of 32, 2 splits, then the merge over two
    programs of rows) on the regime's extremes, each of the three ops: one-hot q0 with clusters
    that hold no mass (f = 0) against peaked qa, qb, and near-uniform assignments (KL near 0)."""
    from fastcluster_cl.functional import dec_anchor_losses

    kl = kernel_module("kl")
    monkeypatch.setattr(kl, "_BLOCK_K", 32)
    n, k = 150, 70
    assert kl._MERGE_ROWS < n
    assert kl._splits(n, k, kl._block_k(k))[1] == 2
    if shape == "one-hot":
        q0 = torch.eye(k, dtype=F64)[(torch.arange(n) * 7) % 50]  # clusters 50-69 empty
        qa, qb = probabilities(n, k, 65), probabilities(n, k, 66)
    else:
        q0, qa, qb = (torch.softmax(randn(n, k, seed=s, scale=1e-3), 1) for s in (67, 68, 69))
    compare(lambda q: fc.dec_loss(q, backend="triton"), reference.dec_loss, (q0,), dtype)
    compare(
        lambda q0, qa, qb: fc.anchor_loss(q0, qa, qb, backend="triton"),
        reference.anchor_loss,
        (q0, qa, qb),
        dtype,
    )
    compare(
        lambda *q: torch.stack(dec_anchor_losses(*q, backend="triton")),
        lambda *q: torch.stack([reference.dec_loss(q[0]), reference.anchor_loss(*q)]),
        (q0, qa, qb),
        dtype,
        torch.tensor([0.7, 1.3], dtype=F64),
    )


def test_dec_near_uniform_keeps_its_digits():
    """Near-uniform assignments (DEC's start) have a KL near 0 (~5e-7 here); the one-pass form
    sums w log(n q / f), numbers near 0, so that its fp32 error stays at the old two-pass
    kernel's (1.7e-8 at N = 64, K = 1000), not the 1.3e-7 of sum w log(q / f) / T - log T."""
    q = torch.softmax(randn(64, 1000, seed=70, scale=1e-3), 1)
    want = reference.dec_loss(q).item()
    got = fc.dec_loss(q.float(), backend="triton").item()
    assert 0 < want < 1e-5
    assert abs(got - want) < 3e-8, (got, want)


def test_dec_rows_below_the_float_range():
    """The kernels on inputs the public API refuses (rows that are not probabilities): rows
    whose every q^2 / f underflows (T = 0 in fp32) get gradient 0, as their target is 0 there;
    a negative entry takes safe_log's clamp as the reference does, not a NaN."""
    q = torch.softmax(randn(8, 40, seed=71), 1).float()
    q[2] = 1e-24
    x = q.clone().requires_grad_()
    kernels.dec_loss(x).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[2] == 0).all()
    q = torch.softmax(randn(8, 40, seed=72), 1)
    q[2, 3] = -1e-6
    got = kernels.dec_loss(q.float())
    torch.testing.assert_close(got.double(), reference.dec_loss(q), rtol=1e-5, atol=1e-7)


def test_kl_losses_at_the_documented_limit():
    """K = MAX_CLUSTERS = 4096 runs (64 tiles of 64 columns); one more is refused."""
    from fastcluster_cl.functional import dec_anchor_losses

    kl = kernel_module("kl")
    k = kl.MAX_CLUSTERS
    inputs = (probabilities(3, k, 60), probabilities(3, k, 61), probabilities(3, k, 62))
    compare(
        lambda *q: torch.stack(dec_anchor_losses(*q, backend="triton")),
        lambda *q: torch.stack([reference.dec_loss(q[0]), reference.anchor_loss(*q)]),
        inputs,
        torch.float32,
    )
    with pytest.raises(ValueError, match="at most 4096 clusters"):
        kernels.dec_loss(torch.rand(3, k + 1))


def test_dec_empty_cluster_gives_a_finite_target():
    """A cluster with no mass in the batch (f_k = 0): target 0 there, finite loss and gradients
    equal to backend='torch' (the target divides by max(f, tiny), not by f)."""
    from fastcluster_cl.functional import dec_anchor_losses

    q = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]], dtype=F64)
    others = (probabilities(2, 3, 63), probabilities(2, 3, 64))
    for dtype in (F64, torch.float32):
        for fn in (
            lambda q0, qa, qb, backend: fc.dec_loss(q0, backend=backend),
            lambda q0, qa, qb, backend: torch.stack(dec_anchor_losses(q0, qa, qb, backend=backend)),
        ):
            x = leaves(q, *others, dtype=dtype)
            y = leaves(q, *others, dtype=dtype)
            got, want = fn(*x, backend="triton"), fn(*y, backend="torch")
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want)
            got.sum().backward()
            want.sum().backward()
            for a, b in zip(x, y):
                assert (a.grad is None) == (b.grad is None)
                if a.grad is not None:
                    assert torch.isfinite(a.grad).all()
                    torch.testing.assert_close(a.grad, b.grad)


def test_cc_underflowing_column_gives_finite_gradients():
    """A softmax column that underflows to 0 (logit 120 below the rest): finite loss and
    gradients equal to backend='torch' (p log max(p, tiny), not xlogy, in the entropy term)."""
    la, lb = randn(8, 4, seed=65), randn(8, 4, seed=66)
    la[:, 3] -= 120
    for dtype in (F64, torch.float32):
        if dtype == F64:
            la64 = la.clone()
            la64[:, 3] -= 700  # exp underflows in float64 too
            inputs = (la64, lb)
        else:
            inputs = (la, lb)
        x, y = leaves(*inputs, dtype=dtype), leaves(*inputs, dtype=dtype)
        got = fc.cc_cluster_loss(*x, 0.5, backend="triton")
        want = fc.cc_cluster_loss(*y, 0.5, backend="torch")
        assert torch.isfinite(got)
        torch.testing.assert_close(got, want)
        got.backward()
        want.backward()
        for a, b in zip(x, y):
            assert torch.isfinite(a.grad).all()
            torch.testing.assert_close(a.grad, b.grad)


def test_gathered_entropy_term_has_a_finite_gradient_at_zero_mass():
    """The distributed backend's entropy term (gathered._entropy_term) at P_k = 0."""
    from fastcluster_cl.backends import gathered

    sums = torch.tensor([3.0, 5.0, 0.0], dtype=F64, requires_grad=True)
    value = gathered._entropy_term(sums, torch.tensor(8.0, dtype=F64))
    value.backward()
    p = sums.detach() / 8
    assert torch.isfinite(value) and torch.isfinite(sums.grad).all()
    torch.testing.assert_close(value, reference.marginal_entropy_term(p[None, :]))


def test_gathered_cc_loss_with_an_underflowing_column_is_finite():
    """The whole distributed CC loss (world size 1): the entropy term and the column contrast
    from the Gram matrix (its norms clamped before the square root) have finite gradients,
    equal to backend="torch"'s."""
    from fastcluster_cl.backends import gathered

    la, lb = randn(8, 4, seed=60), randn(8, 4, seed=61)
    la[:, 3] -= 820
    lb[:, 3] -= 820
    x = [t.clone().requires_grad_() for t in (la, lb)]
    y = [t.clone().requires_grad_() for t in (la, lb)]
    got, want = gathered.cc_cluster_loss(*x, 1.0), reference.cc_cluster_loss(*y, 1.0)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(x, y):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, b.grad)


def test_every_launch_runs_under_its_device_guard(monkeypatch):
    """student_t, kl and cc_cluster launch each kernel inside device_guard(input) (on a
    multi-GPU machine the kernel then runs on the inputs' device, not the current one)."""
    import contextlib

    active, launches = [], []

    @contextlib.contextmanager
    def guard(t):
        active.append(t.device)
        yield
        active.pop()

    class Checked:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert active, f"{self.name} launched outside device_guard"
                launches.append(self.name)
                return self.fn[grid](*args, **kwargs)

            return launch

    for name in ("student_t", "kl", "cc_cluster"):
        module = kernel_module(name)
        monkeypatch.setattr(module, "device_guard", guard)
        for attr, value in vars(module).copy().items():
            if attr.endswith("_kernel") and hasattr(value, "__getitem__"):  # jit or interpreted
                monkeypatch.setattr(module, attr, Checked(f"{name}.{attr}", value))
    q = [probabilities(6, 5, seed).requires_grad_() for seed in (67, 68, 69)]
    h, mu = randn(6, 4, seed=70).requires_grad_(), randn(3, 4, seed=71).requires_grad_()
    la, lb = randn(6, 5, seed=72).requires_grad_(), randn(6, 5, seed=73).requires_grad_()
    total = (
        kernels.student_t(h, mu, 1.0).sum()
        + kernels.dec_loss(q[0])
        + kernels.anchor_loss(*q)
        + sum(kernels.dec_anchor_losses(*q))
        + kernels.cc_cluster_loss(la, lb, 0.5)
    )
    total.backward()
    assert not active and len(launches) == 16, launches  # 9 forward, 7 backward


# --- backend wiring --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["anchor", "cc"])
def test_whole_objective_matches_torch_backend(method):
    z_a, z_b = randn(21, 32, seed=37), randn(21, 32, seed=38)
    inputs = (
        {
            "q0": probabilities(21, 6, 39),
            "q_a": probabilities(21, 6, 40),
            "q_b": probabilities(21, 6, 41),
        }
        if method == "anchor"
        else {"logits_a": randn(21, 6, seed=42), "logits_b": randn(21, 6, seed=43)}
    )
    got = ClusterContrastiveLoss(method, backend="triton")(z_a, z_b, **inputs)
    want = ClusterContrastiveLoss(method, backend="torch")(z_a, z_b, **inputs)
    torch.testing.assert_close(got.total, want.total, rtol=1e-10, atol=1e-12)
    for name in want.parts:
        torch.testing.assert_close(got.parts[name], want.parts[name], rtol=1e-10, atol=1e-12)


def test_unavailable_reason_and_auto(monkeypatch):
    monkeypatch.setattr(dispatch, "_RESOLVED", {})  # availability changes with the variable below
    assert kernels.unavailable_reason(torch.device("cuda")) is None
    assert dispatch.resolve("auto", torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = kernels.unavailable_reason(torch.device("cpu"))
    assert "CUDA" in reason and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        fc.nt_xent(torch.randn(4, 3), torch.randn(4, 3), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.unavailable_reason(torch.device("cpu")) is None


def test_auto_runs_inputs_beyond_the_kernels_on_chunked(monkeypatch):
    """backend="auto" where it means triton (a CUDA device, faked here) takes the chunked
    backend for inputs the kernels cannot hold, and computes the same loss; within the limits
    it keeps triton, and an explicit backend="triton" still refuses, saying why."""
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: True)
    cpu = torch.device("cpu")
    wide, narrow = randn(6, 513, seed=50), randn(6, 512, seed=51)
    widest = randn(6, 2049, seed=57)
    many, few = randn(6, 65, seed=52), randn(6, 64, seed=53)
    assert dispatch.backend_for("nt_xent", "auto", cpu, widest, widest) == "chunked"
    assert dispatch.backend_for("nt_xent", "auto", cpu, wide, wide) == "auto"  # feature chunks
    assert dispatch.backend_for("nt_xent_bank", "auto", cpu, wide, wide, wide) == "chunked"
    assert dispatch.backend_for("nt_xent", "auto", cpu, narrow, narrow) == "auto"
    assert dispatch.backend_for("cc_cluster_loss", "auto", cpu, many, many) == "auto"  # any K
    assert dispatch.backend_for("student_t", "auto", cpu, wide, randn(1025, 513)) == "chunked"
    assert dispatch.backend_for("nt_xent", "triton", cpu, widest, widest) == "triton"
    tall = randn(2049, 10, seed=56)  # reduction="none" contrasts the N-long columns
    assert dispatch.backend_for("cc_cluster_loss_terms", "auto", cpu, tall, tall) == "chunked"
    assert dispatch.backend_for("dec_loss_terms", "auto", cpu, few.softmax(1)) == "chunked"
    torch.testing.assert_close(
        fc.cc_cluster_loss(many, randn(6, 65, seed=54)),
        fc.cc_cluster_loss(many, randn(6, 65, seed=54), backend="torch"),
        rtol=1e-10,
        atol=1e-12,
    )
    torch.testing.assert_close(
        fc.nt_xent(widest, randn(6, 2049, seed=55)),
        fc.nt_xent(widest, randn(6, 2049, seed=55), backend="torch"),
        rtol=1e-10,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="at most 2048 features"):
        fc.nt_xent(widest, widest, backend="triton")


def test_auto_runs_the_anchor_objective_on_the_separate_ops(monkeypatch):
    """backend="auto" where it means triton (faked here) takes the separate ops for the anchor
    objective (kernels.AUTO_SEPARATE: predicted faster), the same loss; an explicit
    backend="triton" keeps the one-pass kernels; cc keeps its one-pass kernels under auto up
    to CC_ONE_PASS_PAIRS pairs."""
    calls = []
    for op in ("anchor_objective", "cc_objective"):
        one_pass = getattr(kernels, op)
        spy = lambda *a, _f=one_pass, _op=op: calls.append(_op) or _f(*a)  # noqa: E731
        monkeypatch.setattr(kernels, op, spy)
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: True)
    z_a, z_b = correlated_views(12, 8, seed=60)
    h0, h_a, h_b = (randn(12, 6, seed=s) for s in (61, 62, 63))
    mu = randn(5, 6, seed=64)
    auto = fc.anchor_objective(z_a, z_b, h0, h_a, h_b, mu).total
    assert calls == []
    explicit = fc.anchor_objective(z_a, z_b, h0, h_a, h_b, mu, backend="triton").total
    assert calls == ["anchor_objective"]
    torch.testing.assert_close(auto, explicit, rtol=1e-10, atol=1e-12)
    logits = randn(12, 5, seed=65), randn(12, 5, seed=66)
    fc.cc_objective(z_a, z_b, *logits)
    assert calls == ["anchor_objective", "cc_objective"]
    # beyond CC_ONE_PASS_PAIRS pairs auto takes cc's separate ops too (the same loss)
    monkeypatch.setattr(kernels, "CC_ONE_PASS_PAIRS", 8)
    separate = fc.cc_objective(z_a, z_b, *logits).total
    assert calls == ["anchor_objective", "cc_objective"]
    torch.testing.assert_close(
        separate, fc.cc_objective(z_a, z_b, *logits, backend="triton").total, rtol=1e-6, atol=1e-7
    )


def test_auto_on_the_cpu_keeps_the_chunked_anchor_objective(monkeypatch):
    """AUTO_SEPARATE is the Triton backend's: on the CPU auto still runs chunked's one pass."""
    from fastcluster_cl.backends import chunked

    calls = []
    one_pass = chunked.anchor_objective
    monkeypatch.setattr(chunked, "anchor_objective", lambda *a: calls.append(1) or one_pass(*a))
    monkeypatch.setattr(dispatch, "_RESOLVED", {})
    z_a, z_b = correlated_views(12, 8, seed=67)
    h, mu = randn(12, 6, seed=68), randn(5, 6, seed=69)
    fc.anchor_objective(z_a, z_b, h, h, h, mu)
    assert calls == [1]


def test_limits_and_tf32_follow_torch():
    from fastcluster_cl.kernels._common import dot_precision

    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
        assert dot_precision(torch.bfloat16) == dot_precision(torch.float64) == "ieee"
    finally:
        matmul.fp32_precision = saved
