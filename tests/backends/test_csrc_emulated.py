"""The csrc kernels' plumbing on the CPU through the host emulation (support/emulation.py): row
ranges and column splits composing to the full pass, the split recommendation, tiny tile weights,
the launchers' argument checks. Values and gradients of every op on backend="cuda" (emulated and
on a GPU) against the float64 reference are in ops/test_op_*.py."""

import ctypes

import pytest
import torch
from emulation import _ptr
from lowp import SOLVED_CASES, assert_solved_case, tiny_weight_case, tiny_weight_error

from fastcluster_cl.backends import cuda as cuda_backend


def _pair(n, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d, generator=gen)
    return z_a.to(dtype), (z_a + 0.5 * torch.randn(n, d, generator=gen)).to(dtype)


def test_tiny_tile_weights_keep_fp16_precision(emulated):
    """Weights ~ 1e-8 (2N ~ 1e5 and beyond) are scaled by 2^14 (the batch's largest loss is
    large) before their fp16 rounding; as subnormals they kept a few bits (support/lowp.py
    `tiny_weight_case`)."""
    z, lse, row_loss, want = tiny_weight_case()
    got = cuda_backend.grad_rows(z, lse, row_loss, 0, z.shape[0], 2.0)
    assert tiny_weight_error(got, want) < 2e-3


@pytest.mark.parametrize("case", SOLVED_CASES)
def test_solved_batches_keep_their_gradients(emulated, case):
    """Nearly solved bf16 batches (row losses 1e-13 to 5e-11) keep their gradients within
    twice the chunked path's error: each backward block scales its tile weights by the power
    of two `weight_scale` of their bound from the row losses (a fixed 2^14 flushed them)."""
    assert_solved_case(case, "cuda", cuda_backend.cc_objective, cuda_backend.anchor_objective)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_ranges_compose(emulated, dtype):
    """lse and gradient rows of a sub-range equal those rows of the full pass (distributed)."""
    zn, rs, _, _ = emulated.normalize(*_pair(40, 20, dtype))
    lse = emulated.lse_rows(zn, rs, 0, 80, 2.0)
    g = emulated.grad_rows(zn, rs, lse, lse - 1.0, 0, 80, 2.0)
    for start, end in [(0, 1), (5, 70), (64, 80), (33, 33)]:
        torch.testing.assert_close(emulated.lse_rows(zn, rs, start, end, 2.0), lse[start:end])
        torch.testing.assert_close(
            emulated.grad_rows(zn, rs, lse, lse - 1.0, start, end, 2.0), g[start:end]
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_column_splits_match_unsplit(emulated, dtype):
    """2N = 200 is 4 column tiles: 2, 3 (-> 2 of 2 tiles) and 4 splits, on full and partial
    row ranges; partial results merge to the unsplit ones up to summation order."""
    zn, rs, _, _ = emulated.normalize(*_pair(100, 40, dtype))
    lse = emulated.lse_rows(zn, rs, 0, 200, 3.0, splits=1)
    g = emulated.grad_rows(zn, rs, lse, lse - 1.0, 0, 200, 3.0, splits=1)
    for splits in (2, 3, 4):
        for start, end in [(0, 200), (70, 75)]:
            torch.testing.assert_close(
                emulated.lse_rows(zn, rs, start, end, 3.0, splits), lse[start:end]
            )
            torch.testing.assert_close(
                emulated.grad_rows(zn, rs, lse, lse - 1.0, start, end, 3.0, splits), g[start:end]
            )


def test_split_recommendation(csrc_lib):
    lib = csrc_lib
    # dtype, m, d, rows, backward, SMs -> splits
    assert lib.fcl_nt_xent_splits(0, 200, 40, 200, 0, 132) == 2  # capped at 2 tiles each
    assert lib.fcl_nt_xent_splits(0, 8192, 128, 8192, 0, 132) == 5  # 128 row blocks
    assert lib.fcl_nt_xent_splits(2, 8192, 128, 8192, 1, 132) == 5  # one feature slice
    assert lib.fcl_nt_xent_splits(0, 8192, 128, 8192, 1, 132) == 3  # fp32: two slices
    assert lib.fcl_nt_xent_splits(2, 65536, 128, 65536, 0, 132) == 1  # enough row blocks


def test_launchers_reject_bad_arguments(csrc_lib):
    lib = csrc_lib
    zn, out = torch.zeros(200, 4), torch.zeros(200)
    one = ctypes.c_float(1.0)
    assert lib.fcl_nt_xent_lse(0, _ptr(zn), 8, 4, 3, 9, one, 1, None, _ptr(out), None) != 0
    assert lib.fcl_nt_xent_lse(7, _ptr(zn), 8, 4, 0, 8, one, 1, None, _ptr(out), None) != 0
    # a split without a workspace
    assert lib.fcl_nt_xent_lse(0, _ptr(zn), 200, 4, 0, 200, one, 2, None, _ptr(out), None) != 0


def test_bank_launchers_reject_bad_arguments(csrc_lib):
    zs, rs, out = torch.zeros(8, 4), torch.ones(8), torch.zeros(4)
    one = ctypes.c_float(1.0)
    args = (_ptr(zs), _ptr(rs), _ptr(out), _ptr(zs), None)
    for n, m, d in [(0, 4, 4), (4, 0, 4), (4, 4, 0)]:
        assert (
            csrc_lib.fcl_nt_xent_bank_lse(0, *args, n, m, d, one, 1, _ptr(out), _ptr(out), None)
            != 0
        )
    assert csrc_lib.fcl_nt_xent_bank_lse(7, *args, 4, 4, 4, one, 1, _ptr(out), _ptr(out), None) != 0
    # the gradient needs its workspace
    assert (
        csrc_lib.fcl_nt_xent_bank_grad(
            0,
            _ptr(zs),
            _ptr(rs),
            _ptr(rs),
            _ptr(out),
            _ptr(zs),
            None,
            4,
            4,
            4,
            one,
            1,
            _ptr(out),
            _ptr(out),
            _ptr(out),
            None,
            0,
            _ptr(zs),
            _ptr(zs),
            None,
        )
        != 0
    )


@pytest.mark.parametrize("fixed_shift", [True, False])
def test_bank_low_half_is_a_second_product(emulated, fixed_shift):
    """A bank exact in fp16 (bank_lo = 0) gives the unsplit results; lo carrying part of the
    bank gives the results of the bank hi + lo; the fixed shift and the online max agree."""
    zs, rs, norm, dist = emulated.normalize(*_pair(37, 20, torch.float16))
    gen = torch.Generator().manual_seed(4)
    bank = torch.nn.functional.normalize(torch.randn(45, 20, generator=gen), dim=1)
    hi = bank.half()
    lo = (bank - hi.float()).half()
    plain = emulated.bank_forward(zs, rs, dist, hi, None, 2.0, fixed_shift)
    torch.testing.assert_close(
        emulated.bank_forward(zs, rs, dist, hi, torch.zeros_like(hi), 2.0, fixed_shift), plain
    )
    half_hi = (hi.float() / 2).half()  # exact: the bank as two equal halves
    torch.testing.assert_close(
        emulated.bank_forward(zs, rs, dist, half_hi, half_hi, 2.0, fixed_shift), plain
    )
    split = emulated.bank_forward(zs, rs, dist, hi, lo, 2.0, fixed_shift)
    other = emulated.bank_forward(zs, rs, dist, hi, lo, 2.0, not fixed_shift)
    torch.testing.assert_close(split[0], other[0], rtol=1e-6, atol=1e-6)
