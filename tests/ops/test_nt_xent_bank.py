"""NT-Xent against a memory bank: `NTXentLoss(memory_bank_size=(M, D))` equals lightly's
NTXentLoss with a memory bank over a sequence of batches (bank drawn from the same seed, the
negatives and the pointer/wrap rule of its update, values and gradients) on every backend
(triton under the interpreter; cuda through the host emulation, support/emulation.py), the chunked
path's small column blocks, the gradient formula against autograd, lightly's memory_bank_size
argument rules, and the gathered update. The op's values and gradients on every backend against
the float64 reference are in test_op_nt_xent_bank.py."""

import pytest
import torch

import fastcluster_cl as fc
from fastcluster_cl.backends import reference

F64 = torch.float64
lightly_loss = pytest.importorskip("lightly.loss")

# N = 4 rows a batch, a bank of M = 10: pointer 0 -> 4 -> 8 -> wraps (rows 8, 9 take the first
# two of the third batch, the other two are dropped) -> 0 -> 4; one no-grad batch in between.
N, D, M = 4, 8, 10
SEQUENCE = [True, True, False, True, True]  # whether z_a requires grad (bank update) per step


def _batches(seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in SEQUENCE:
        z_a = torch.randn(N, D, generator=g, dtype=F64) * 2
        out.append(
            (z_a.to(dtype), (z_a + 0.7 * torch.randn(N, D, generator=g, dtype=F64)).to(dtype))
        )
    return out


def _pair_of_modules(backend, temperature, seed=5, gather=False):
    torch.manual_seed(seed)
    theirs = lightly_loss.NTXentLoss(
        temperature, memory_bank_size=(M, D), gather_distributed=gather
    )
    torch.manual_seed(seed)
    ours = fc.NTXentLoss(
        temperature, backend=backend, memory_bank_size=(M, D), gather_distributed=gather
    )
    return ours, theirs


def test_bank_drawn_as_lightly_draws_it():
    ours, theirs = _pair_of_modules("torch", 0.5)
    assert ours.memory_bank.bank.dtype == torch.float32 and torch.equal(
        ours.memory_bank.bank, theirs.memory_bank.bank
    )
    assert int(ours.memory_bank.bank_ptr) == 0
    # and the draw consumes the global RNG as lightly's does
    torch.manual_seed(1)
    lightly_loss.NTXentLoss(memory_bank_size=(M, D))
    after_theirs = torch.rand(3)
    torch.manual_seed(1)
    fc.NTXentLoss(memory_bank_size=(M, D))
    assert torch.equal(torch.rand(3), after_theirs)


def run_sequence_against_lightly(backend, temperature=0.2, dtype=F64, rtol=1e-10, atol=1e-12):
    """Feed SEQUENCE to both modules; compare loss, gradients, bank and pointer each step."""
    ours, theirs = _pair_of_modules(backend, temperature)
    pointers = []
    if dtype == F64:
        ours.double(), theirs.double()
    for step, ((z_a, z_b), grad) in enumerate(zip(_batches(dtype=dtype), SEQUENCE)):
        mine = [z_a.clone().requires_grad_(grad), z_b.clone().requires_grad_(grad)]
        other = [z_a.clone().requires_grad_(grad), z_b.clone().requires_grad_(grad)]
        got, want = ours(*mine), theirs(*other)
        torch.testing.assert_close(
            got, want.to(got.dtype), rtol=rtol, atol=atol, msg=lambda m: f"step {step}: {m}"
        )
        if grad:
            got.backward()
            want.backward()
            for a, b in zip(mine, other):
                torch.testing.assert_close(
                    a.grad,
                    b.grad,
                    rtol=rtol * 10,
                    atol=atol,
                    msg=lambda m: f"step {step} grad: {m}",
                )
        torch.testing.assert_close(
            ours.memory_bank.bank, theirs.memory_bank.bank, rtol=1e-6, atol=1e-7
        )
        assert int(ours.memory_bank.bank_ptr) == int(theirs.memory_bank.bank_ptr), step
        pointers.append(int(ours.memory_bank.bank_ptr))
    assert pointers == [4, 8, 8, 0, 4]  # the no-grad step keeps it; the fourth wraps


@pytest.mark.parametrize("backend", ["torch", "chunked"])
@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_module_equals_lightly_over_a_sequence(backend, temperature):
    run_sequence_against_lightly(backend, temperature)


def test_module_equals_lightly_fp32_chunked():
    """lightly's own dtype: fp32 inputs and bank."""
    run_sequence_against_lightly("chunked", 0.2, torch.float32, rtol=2e-5, atol=1e-6)


def test_module_equals_lightly_triton_interpreted():
    pytest.importorskip("triton")
    run_sequence_against_lightly("triton", 0.2)


def test_small_chunks_equal_the_reference():
    from fastcluster_cl.backends import chunked

    g = torch.Generator().manual_seed(3)
    z_a = torch.randn(7, 5, generator=g, dtype=F64, requires_grad=True)
    z_b = torch.randn(7, 5, generator=g, dtype=F64, requires_grad=True)
    bank = torch.nn.functional.normalize(torch.randn(23, 5, generator=g, dtype=F64), dim=1)
    w = torch.randn(7, generator=g, dtype=F64)
    for tau in (0.5, 0.05, 0.004):  # 0.004: below the fixed shift's range (row-max blocks)
        got = chunked.nt_xent_bank_terms(z_a, z_b, bank, tau, block_size=4)
        want = reference.nt_xent_bank_terms(z_a, z_b, bank, tau)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(
            torch.autograd.grad(got, (z_a, z_b), w), torch.autograd.grad(want, (z_a, z_b), w)
        ):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gradient_formula():
    """The docstring's dL/dzn (nt_xent_bank_autograd) against autograd of the reference."""
    g = torch.Generator().manual_seed(4)
    n, tau = 6, 0.3
    zn_a = torch.nn.functional.normalize(torch.randn(n, 5, generator=g, dtype=F64), dim=1)
    zn_b = torch.nn.functional.normalize(torch.randn(n, 5, generator=g, dtype=F64), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(9, 5, generator=g, dtype=F64), dim=1)
    a, b = zn_a.clone().requires_grad_(), zn_b.clone().requires_grad_()
    logits = torch.cat([(a * b).sum(1, keepdim=True), a @ bank.T], 1) / tau
    loss_rows = torch.logsumexp(logits, 1) - logits[:, 0]
    want = torch.autograd.grad(loss_rows.mean(), (a, b))
    s, s_pos = zn_a @ bank.T / tau, (zn_a * zn_b).sum(1) / tau
    t = torch.logsumexp(s - s_pos[:, None], 1)
    loss = torch.nn.functional.softplus(t)
    torch.testing.assert_close(loss, loss_rows.detach())
    p = torch.exp(s - (s_pos + loss)[:, None])
    p_pos = torch.exp(-loss)[:, None]
    got_a = (p @ bank + (p_pos - 1) * zn_b) / (n * tau)
    got_b = (p_pos - 1) * zn_a / (n * tau)
    torch.testing.assert_close(got_a, want[0])
    torch.testing.assert_close(got_b, want[1])


def test_memory_bank_size_rules_follow_lightly():
    for size in (5, -1, (5,), (3, 4, 5), (-2, 4)):
        with pytest.raises(ValueError) as theirs:
            lightly_loss.NTXentLoss(memory_bank_size=size)
        with pytest.raises(ValueError) as ours:
            fc.NTXentLoss(memory_bank_size=size)
        assert str(ours.value) == str(theirs.value)
    # 0 and (0, D) disable the bank: plain NT-Xent over 2N rows
    z_a, z_b = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    for size in (0, (0, 3)):
        torch.testing.assert_close(
            fc.NTXentLoss(memory_bank_size=size)(z_a, z_b), fc.nt_xent(z_a, z_b)
        )


def test_bad_bank_inputs_are_refused():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="features"):
        fc.NTXentLoss(memory_bank_size=(8, 5))(z, z)
    with pytest.raises(ValueError, match="unit"):
        fc.nt_xent_bank(z, z, 3 * torch.ones(6, 3))
    with pytest.raises(ValueError, match="NaN"):
        fc.nt_xent_bank(z, z, torch.full((6, 3), float("nan")))


def test_state_dict_keys_are_lightlys_and_the_bank_can_persist():
    """lightly's state dict has no bank keys: strict loads work both ways. An exact resume of
    the bank is opt-in (persistent_memory_bank=True), and a bad pointer or shape is refused."""
    ours = fc.NTXentLoss(memory_bank_size=(M, D), backend="chunked")
    theirs = lightly_loss.NTXentLoss(memory_bank_size=(M, D))
    assert list(ours.state_dict()) == list(theirs.state_dict()) == []
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    kept = fc.NTXentLoss(memory_bank_size=(M, D), backend="chunked", persistent_memory_bank=True)
    kept(torch.randn(N, D, requires_grad=True), torch.randn(N, D))
    assert list(kept.state_dict()) == ["memory_bank.bank", "memory_bank.bank_ptr"]
    again = fc.NTXentLoss(memory_bank_size=(M, D), persistent_memory_bank=True)
    again.load_state_dict(kept.state_dict())
    assert torch.equal(again.memory_bank.bank, kept.memory_bank.bank)
    assert int(again.memory_bank.bank_ptr) == N
    for key, value, message in (
        ("memory_bank.bank_ptr", torch.tensor([999]), r"\[0, 10\)"),
        ("memory_bank.bank_ptr", torch.tensor([-1]), r"\[0, 10\)"),
        ("memory_bank.bank", torch.zeros(M + 1, D), "shape"),
    ):
        with pytest.raises(ValueError, match=message):
            again.load_state_dict({**kept.state_dict(), key: value})
    assert int(again.memory_bank.bank_ptr) == N  # unchanged by the refused loads


def _gathered_bank_worker(rank, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(5)
        crit = fc.NTXentLoss(
            0.2, backend="chunked", memory_bank_size=(M, D), gather_distributed=True
        ).double()
        g = torch.Generator().manual_seed(0)
        results = []
        for _ in range(3):  # 4 gathered rows a step: pointer 0 -> 4 -> 8 -> wraps to 0
            z = torch.randn(2, 4, D, generator=g, dtype=F64)  # both ranks draw the same
            z_a, z_b = z[0][rank::2].clone(), z[1][rank::2].clone()
            before = crit.memory_bank.bank.clone()
            loss = crit(z_a.requires_grad_(), z_b)
            results.append(
                (
                    loss.detach(),
                    before,
                    crit.memory_bank.bank.clone(),
                    int(crit.memory_bank.bank_ptr),
                )
            )
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_distributed_updates_the_bank_with_every_ranks_batch(tmp_path):
    """lightly's behaviour: the loss uses the local rows, the bank update all-gathers the batch
    (rank order), so both ranks keep the bank of one process fed the concatenated z_b."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gathered_bank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(5)
    single = fc.NTXentLoss(0.2, backend="chunked", memory_bank_size=(M, D)).double()
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        z = torch.randn(2, 4, D, generator=g, dtype=F64)
        order = torch.tensor([0, 2, 1, 3])  # rank 0's rows, then rank 1's
        single(z[0][order].requires_grad_(), z[1][order])
        for rank, results in enumerate(ranks):
            loss, before, after, ptr = results[step]
            want = reference.nt_xent_bank(z[0][rank::2], z[1][rank::2], before, 0.2)
            torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(after, single.memory_bank.bank, rtol=0, atol=1e-15)
            assert ptr == int(single.memory_bank.bank_ptr)
    assert [r[3] for r in ranks[0]] == [4, 8, 0]


def test_module_equals_lightly_cuda_emulated(emulated):
    """backend="cuda" (fp32: its kernels compute in fp32) through the host emulation."""
    run_sequence_against_lightly("cuda", 0.2, torch.float32, rtol=2e-5, atol=1e-6)
