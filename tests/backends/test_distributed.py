"""gather_distributed: two gloo processes on CPU against one process on the concatenated batch
(backends torch, chunked and triton -- the latter under the interpreter without CUDA).

Convention checked (lightly's, DDP-exact): the mean over ranks of the returned losses equals the
single-process loss, and each rank's gradient for its rows equals world_size times the
single-process gradient for those rows. All in float64.
"""

from __future__ import annotations

import os
import socket
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp

import fastcluster_cl.functional as FL
from fastcluster_cl import ClusterContrastiveLoss, NTXentLoss, distributed
from fastcluster_cl.backends import chunked, gathered, reference

WORLD = 2
N, D, K, F = 5, 7, 4, 6  # rows per rank, projection dim, clusters, features (not block multiples)


def _inputs(spec: dict[str, tuple[int, int]], rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        for name, (cols, _) in spec.items()
    }


def _blocked(block: int):
    return (partial(chunked.lse_rows, block=block), partial(chunked.grad_rows, block=block))


def _single_cc_module(method):
    return ClusterContrastiveLoss(method, backend="torch")


def _anchor_inputs(x):
    return dict(
        q0=torch.softmax(x["l0"], 1), q_a=torch.softmax(x["la"], 1), q_b=torch.softmax(x["lb"], 1)
    )


# name -> (input columns, rank-local loss, single-process loss on the concatenated batch)
CASES = {
    "nt_xent_torch": (
        {"za": (D, 0), "zb": (D, 0)},
        lambda x: FL.nt_xent(x["za"], x["zb"], 0.5, backend="torch", gather_distributed=True),
        lambda x: reference.nt_xent(x["za"], x["zb"], 0.5),
    ),
    "nt_xent_chunked": (
        {"za": (D, 0), "zb": (D, 0)},
        lambda x: NTXentLoss(0.5, backend="chunked", gather_distributed=True)(x["za"], x["zb"]),
        lambda x: reference.nt_xent(x["za"], x["zb"], 0.5),
    ),
    "nt_xent_chunked_block3": (
        {"za": (D, 0), "zb": (D, 0)},
        lambda x: gathered.nt_xent_rows(x["za"], x["zb"], 0.3, *_blocked(3)),
        lambda x: reference.nt_xent(x["za"], x["zb"], 0.3),
    ),
    "nt_xent_chunked_low_tau": (  # 2/tau > 700: the online logsumexp path
        {"za": (D, 0), "zb": (D, 0)},
        lambda x: gathered.nt_xent_rows(x["za"], x["zb"], 0.002, *_blocked(4)),
        lambda x: reference.nt_xent(x["za"], x["zb"], 0.002),
    ),
    "nt_xent_triton": (  # the Triton kernels' row-range primitives (interpreter without CUDA)
        {"za": (D, 0), "zb": (D, 0)},
        lambda x: FL.nt_xent(x["za"], x["zb"], 0.5, backend="triton", gather_distributed=True),
        lambda x: reference.nt_xent(x["za"], x["zb"], 0.5),
    ),
    "nt_xent_triton_low_tau": (
        {"za": (D, 0), "zb": (D, 0)},
        lambda x: FL.nt_xent(x["za"], x["zb"], 0.002, backend="triton", gather_distributed=True),
        lambda x: reference.nt_xent(x["za"], x["zb"], 0.002),
    ),
    "cc_cluster": (
        {"la": (K, 0), "lb": (K, 0)},
        lambda x: FL.cc_cluster_loss(
            x["la"], x["lb"], 0.7, backend="chunked", gather_distributed=True
        ),
        lambda x: reference.cc_cluster_loss(x["la"], x["lb"], 0.7),
    ),
    "dec": (
        {"l": (K, 0)},
        lambda x: FL.dec_loss(torch.softmax(x["l"], 1), gather_distributed=True),
        lambda x: reference.dec_loss(torch.softmax(x["l"], 1)),
    ),
    "module_cc": (
        {"za": (D, 0), "zb": (D, 0), "la": (K, 0), "lb": (K, 0)},
        lambda x: (
            ClusterContrastiveLoss("cc", backend="chunked", gather_distributed=True)(
                x["za"], x["zb"], logits_a=x["la"], logits_b=x["lb"]
            ).total
        ),
        lambda x: (
            _single_cc_module("cc")(x["za"], x["zb"], logits_a=x["la"], logits_b=x["lb"]).total
        ),
    ),
    "module_anchor": (
        {"za": (D, 0), "zb": (D, 0), "l0": (K, 0), "la": (K, 0), "lb": (K, 0)},
        lambda x: (
            ClusterContrastiveLoss("anchor", backend="chunked", gather_distributed=True)(
                x["za"], x["zb"], **_anchor_inputs(x)
            ).total
        ),
        lambda x: _single_cc_module("anchor")(x["za"], x["zb"], **_anchor_inputs(x)).total,
    ),
}
# Cluster statistics are all-reduced with the row count, so ranks may hold different batches.
UNEQUAL_ROWS = {"dec": (3, 7), "cc_cluster": (6, 4)}


def _rows(case: str) -> tuple[int, ...]:
    return UNEQUAL_ROWS.get(case, (N,) * WORLD)


# DDP end to end: a few SGD steps of a tiny two-head model, parameters vs one process.

STEPS, GLOBAL_BATCH = 3, 8


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(3)

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh())
            self.proj, self.cluster = torch.nn.Linear(6, 4), torch.nn.Linear(6, 3)

        def forward(self, x):
            h = self.body(x)
            return self.proj(h), self.cluster(h)

    return TwoHeads().double()


def _train(rank: int, world: int) -> dict[str, torch.Tensor]:
    """SGD on a fixed stream of global batches; this rank takes its contiguous share."""
    model = distributed.wrap_model(_tiny_model(), torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    crit = ClusterContrastiveLoss("cc", backend="chunked", gather_distributed=True)
    gen = torch.Generator().manual_seed(5)
    n = distributed.local_batch_size(GLOBAL_BATCH)
    for _ in range(STEPS):
        x_a, x_b = (
            torch.randn(GLOBAL_BATCH, 5, generator=gen, dtype=torch.float64) for _ in range(2)
        )
        (z_a, c_a), (z_b, c_b) = (
            model(x_a[rank * n : (rank + 1) * n]),
            model(x_b[rank * n : (rank + 1) * n]),
        )
        opt.zero_grad()
        crit(z_a, z_b, logits_a=c_a, logits_b=c_b).total.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in distributed.unwrap_model(model).state_dict().items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank, set up as torchrun would (env://); runs every case once, saves the results."""
    os.environ.update(
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    device = distributed.setup("cpu")
    try:
        results = {"setup": (distributed.launched_by_torchrun(), str(device))}
        for name, (spec, local_loss, _) in CASES.items():
            rows = _rows(name)
            start = sum(rows[:rank])
            x = {
                k: v[start : start + rows[rank]].clone().requires_grad_()
                for k, v in _inputs(spec, sum(rows)).items()
            }
            loss = local_loss(x)
            grads = torch.autograd.grad(loss, list(x.values()))
            results[name] = (loss.detach(), dict(zip(x, grads)))
        # Unequal batches cannot be gathered row-wise: both ranks must raise, not hang.
        z = torch.randn(4 + rank, D, dtype=torch.float64)
        try:
            FL.nt_xent(z, z, backend="chunked", gather_distributed=True)
            results["unequal_error"] = None
        except ValueError as err:
            results["unequal_error"] = str(err)
        results["world"] = (
            distributed.world_size(),
            distributed.rank(),
            distributed.is_main_process(),
        )
        results["params"] = _train(rank, WORLD)
        try:
            distributed.wrap_model(torch.nn.BatchNorm1d(3), device, sync_batchnorm=True)
            results["sync_bn_error"] = None
        except ValueError as err:
            results["sync_bn_error"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_single_process(rank_results, case):
    spec, _, single_loss = CASES[case]
    x = {k: v.requires_grad_() for k, v in _inputs(spec, sum(_rows(case))).items()}
    expected = single_loss(x)
    expected_grads = torch.autograd.grad(expected, list(x.values()))
    losses = torch.stack([r[case][0] for r in rank_results])
    torch.testing.assert_close(losses.mean(), expected.detach(), rtol=1e-10, atol=1e-12)
    for name, grad in zip(x, expected_grads):
        got = torch.cat([r[case][1][name] for r in rank_results])
        torch.testing.assert_close(
            got, WORLD * grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"d/d{name}: {m}"
        )


def test_per_rank_values_differ_for_nt_xent(rank_results):
    # Each rank returns the mean over its own rows, not the global value.
    a, b = (r["nt_xent_chunked"][0] for r in rank_results)
    assert abs(float(a - b)) > 1e-6


def test_unequal_rows_raise_on_every_rank(rank_results):
    for r in rank_results:
        assert r["unequal_error"] is not None and "same number of rows" in r["unequal_error"]
        assert "[4, 5]" in r["unequal_error"]


def test_sync_batchnorm_on_cpu_is_refused_clearly(rank_results):
    assert all("needs CUDA devices" in r["sync_bn_error"] for r in rank_results)


def test_rank_helpers(rank_results):
    assert [r["world"] for r in rank_results] == [(2, 0, True), (2, 1, False)]
    assert [r["setup"] for r in rank_results] == [(True, "cpu")] * WORLD


# ---- one process: the helpers act as world size 1 ----


def test_without_process_group_world_is_one():
    assert not distributed.is_initialized()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main_process()) == (
        1,
        0,
        True,
    )


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_gather_flag_without_group_is_plain_loss(backend):
    x = _inputs({"za": (D, 0), "zb": (D, 0), "la": (K, 0), "lb": (K, 0)}, 9, seed=1)
    plain, gather = (
        ClusterContrastiveLoss("cc", backend=backend, gather_distributed=flag)(
            x["za"], x["zb"], logits_a=x["la"], logits_b=x["lb"]
        ).total
        for flag in (False, True)
    )
    torch.testing.assert_close(gather, plain, rtol=0, atol=0)


@pytest.mark.parametrize(
    "tau,block", [(0.5, 3), (0.5, 64), (0.002, 5), (0.5, "triton"), (0.002, "triton")]
)
def test_gathered_function_world_one_matches_reference(tau, block):
    x = {k: v.requires_grad_() for k, v in _inputs({"za": (D, 0), "zb": (D, 0)}, 11).items()}
    if block == "triton":
        got = gathered.nt_xent(x["za"], x["zb"], tau, "triton")
    else:
        got = gathered.nt_xent_rows(x["za"], x["zb"], tau, *_blocked(block))
    want = reference.nt_xent(x["za"], x["zb"], tau)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(
        torch.autograd.grad(got, list(x.values())), torch.autograd.grad(want, list(x.values()))
    ):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("start,end", [(0, 22), (3, 9), (10, 17), (21, 22)])
def test_chunked_row_primitives_match_dense(start, end):
    zn = torch.nn.functional.normalize(torch.randn(22, D, dtype=torch.float64), dim=1)
    inv_tau = 1 / 0.4
    s = zn @ zn.T * inv_tau
    s_masked = s.masked_fill(torch.eye(22, dtype=torch.bool), float("-inf"))
    lse = torch.logsumexp(s_masked, 1)
    pos = (torch.arange(22) + 11) % 22
    row_loss = lse - s[torch.arange(22), pos]
    got_lse, got_loss = chunked.lse_rows(zn, start, end, inv_tau, block=4)
    torch.testing.assert_close(got_lse, lse[start:end])
    torch.testing.assert_close(got_loss, row_loss[start:end])
    p = torch.exp(s_masked - lse[:, None])
    want = (p + p.T) @ zn - 2 * zn[pos]
    torch.testing.assert_close(
        chunked.grad_rows(zn, lse, row_loss, start, end, inv_tau, block=4), want[start:end]
    )


def test_row_primitives_reject_bad_ranges():
    zn = torch.randn(6, 3)
    with pytest.raises(ValueError, match="non-empty range"):
        chunked.lse_rows(zn, 4, 7, 2.0)
    with pytest.raises(ValueError, match="one value per row"):
        chunked.grad_rows(zn, torch.zeros(5), torch.zeros(6), 0, 3, 2.0)


def test_ddp_steps_match_single_process(rank_results):
    single = _train(0, 1)
    initial = _tiny_model().state_dict()
    for rank, result in enumerate(rank_results):
        for name, value in single.items():
            assert not torch.allclose(value, initial[name])  # training moved every tensor
            torch.testing.assert_close(
                result["params"][name],
                value,
                rtol=1e-10,
                atol=1e-12,
                msg=lambda m: f"rank {rank} {name}: {m}",
            )


def test_helpers_without_torchrun(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    model = torch.nn.Linear(2, 2)
    assert distributed.setup("cpu") == torch.device("cpu") and not distributed.is_initialized()
    assert distributed.local_batch_size(6) == 6
    assert distributed.wrap_model(model, torch.device("cpu")) is model
    assert distributed.unwrap_model(model) is model


def test_rank_shards_form_the_single_process_batches():
    """Ranks' batch k, interleaved, is exactly batch k of one process with the global batch
    size: same images, same augmentations (what resuming on another world size relies on)."""
    import numpy as np

    from fastcluster_cl.data import ImageDataset, make_train_loader

    rng = np.random.default_rng(0)
    data = ImageDataset(
        rng.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 50), 3, "digits"
    )
    single = list(make_train_loader(data, 12, seed=4, augment="torchvision").epoch(2))
    shards = [
        list(
            make_train_loader(data, 4, seed=4, rank=r, world_size=3, augment="torchvision").epoch(2)
        )
        for r in range(3)
    ]
    assert len(single) == 4 and all(len(s) == 4 for s in shards)
    for k, batch in enumerate(single):
        for key in ("a", "b", "clean", "index"):
            merged = torch.stack([s[k][key] for s in shards], dim=1).flatten(0, 1)
            torch.testing.assert_close(merged, batch[key], rtol=0, atol=0)


# ---- the trainer under a torchrun-style launch: 2 gloo ranks vs one process ----


def _blobs():
    """48 8x8 grey images from 3 noisy templates (named "digits" for its augmentation preset)."""
    import numpy as np

    from fastcluster_cl.data import ImageDataset

    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, (3, 8, 8, 1))
    labels = np.repeat(np.arange(3), 16)
    images = np.clip(templates[labels] + rng.normal(0, 12, (48, 8, 8, 1)), 0, 255)
    return ImageDataset(images.astype(np.uint8), labels, 3, "digits")


def _build_model_without_bn(*args, **kwargs):
    """The trainer's model with BatchNorm replaced by identities: per-rank BatchNorm statistics
    are DDP's documented behaviour (SyncBatchNorm, CUDA only, makes them global), so exact
    agreement with one process is checked on a model without them."""
    from fastcluster_cl.models import build_model

    model = build_model(*args, **kwargs)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                setattr(module, name, torch.nn.Identity())
    return model


def _trainer_config(out, **overrides):
    """LARS, not Adam: Adam divides each gradient by its own running scale, which turns the
    reduction-order noise of two ranks on ~0 gradients into steps of up to lr; LARS scales each
    tensor by its norms (biases: SGD with momentum, which also sees the gradients' scale)."""
    from fastcluster_cl.train.config import TrainConfig

    return TrainConfig(
        **{
            **dict(
                method="anchor",
                epochs=2,
                batch_size=16,
                hidden_dim=32,
                projection_dim=16,
                optimizer="lars",
                lr=2.0,
                warmup_epochs=0.5,
                eval_every=0,
                plots=False,
                progress=False,
                device="cpu",
                augment="torchvision",
                loss_backend="chunked",
                out=str(out),
            ),
            **overrides,
        }
    )


# The center warm-up leaves the center head without gradients for an epoch (DDP must allow it).
WARMUP = dict(epochs=3, center_warmup_epochs=1)


def _trainer_worker(rank: int, port: int, tmp: str) -> None:
    import fastcluster_cl.train.loop as T

    os.environ.update(
        WORLD_SIZE=str(WORLD),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    T.build_model = _build_model_without_bn
    try:
        T.train(_trainer_config(os.path.join(tmp, "ddp")), dataset=_blobs())
        T.train(_trainer_config(os.path.join(tmp, "ddp_warmup"), **WARMUP), dataset=_blobs())
        T.train(
            _trainer_config(os.path.join(tmp, "resumed")),
            dataset=_blobs(),
            resume_from=os.path.join(tmp, "half", "checkpoint.pt"),
        )
    finally:
        distributed.cleanup()


def test_trainer_two_ranks_match_one_process_and_resume_across_world_sizes(tmp_path, monkeypatch):
    import fastcluster_cl.train.loop as T
    from fastcluster_cl.train.logging import read_log

    torch.set_num_threads(1)
    monkeypatch.setattr(T, "build_model", _build_model_without_bn)
    single = T.train(_trainer_config(tmp_path / "single"), dataset=_blobs())
    T.train(_trainer_config(tmp_path / "single_warmup", **WARMUP), dataset=_blobs())

    class Stop(Exception):
        pass

    def save_then_stop(self):  # interrupt the one-process run at its first checkpoint
        original_save(self)
        raise Stop

    original_save = T.Trainer.save
    monkeypatch.setattr(T.Trainer, "save", save_then_stop)
    with pytest.raises(Stop):
        T.train(_trainer_config(tmp_path / "half"), dataset=_blobs())
    monkeypatch.setattr(T.Trainer, "save", original_save)

    mp.spawn(_trainer_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    def model(run):
        return torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"]

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_log(tmp_path / run / "log.jsonl", "step")]

    reference, initial = model("single"), model("half")
    assert single["steps"] == 6 and [s for s, _ in losses("single")] == list(range(1, 7))
    for run, ref_run in (("ddp", "single"), ("resumed", "single"), ("ddp_warmup", "single_warmup")):
        got, reference = model(run), model(ref_run)
        assert got.keys() == reference.keys()  # unwrapped: no DDP "module." prefix
        for name, value in reference.items():
            # fp32 sums in another order on two ranks: ~1e-6 apart after six (warm-up run:
            # nine) steps, against tensors that each move by > 1e-4 in an epoch (checked below)
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=f"{run} {name}")
    reference = model("single")
    # only rank 0 logs, and it logs the global batch's loss
    for (step, loss), (ref_step, ref_loss) in zip(losses("ddp"), losses("single"), strict=True):
        assert step == ref_step and loss == pytest.approx(ref_loss, rel=1e-5)
    assert [s for s, _ in losses("resumed")] == [4, 5, 6]
    for name, value in reference.items():  # the second epoch moved every trained tensor
        if value.is_floating_point():  # well beyond the tolerance above
            assert (value - initial[name]).abs().max() > 1e-4, name


def test_gathered_nt_xent_accumulates_in_fp32_under_autocast():
    x = {
        k: v.float().requires_grad_()
        for k, v in _inputs({"za": (D, 0), "zb": (D, 0)}, 9, seed=2).items()
    }
    plain = gathered.nt_xent_rows(x["za"], x["zb"], 0.1, *_blocked(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = gathered.nt_xent_rows(x["za"], x["zb"], 0.1, *_blocked(4))
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=1e-6, atol=1e-6)
    for g, w in zip(
        torch.autograd.grad(under, list(x.values())), torch.autograd.grad(plain, list(x.values()))
    ):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_gathered_function_with_the_cuda_kernels_emulated(emulated):
    """The CUDA C++ row-range kernels, run on the CPU by the host emulation (support/emulation.py,
    fixture `emulated` in conftest.py), through the gathered autograd function (world size
    1)."""
    from fastcluster_cl.backends import cuda as cuda_backend

    x = {
        k: v.float().requires_grad_()
        for k, v in _inputs({"za": (D, 0), "zb": (D, 0)}, 37, seed=3).items()
    }
    want = reference.nt_xent(x["za"].double(), x["zb"].double(), 0.3)
    want_grads = torch.autograd.grad(want, list(x.values()))
    for got in (  # grad_rows + torch's normalisation backward; the backend's dz_rows
        gathered.nt_xent_rows(x["za"], x["zb"], 0.3, cuda_backend.lse_rows, cuda_backend.grad_rows),
        gathered.nt_xent(x["za"], x["zb"], 0.3, "cuda"),
    ):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        for g, w in zip(torch.autograd.grad(got, list(x.values())), want_grads):
            torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-6)
