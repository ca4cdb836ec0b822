"""Schedule, optimizers (LARS, selection rules) and checkpoint files."""

import random

import numpy as np
import pytest
import torch

from fastcluster_cl.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from fastcluster_cl.train.config import TrainConfig, check_resumable
from fastcluster_cl.train.optim import LARS, build_optimizer, optimizer_description
from fastcluster_cl.train.schedule import warmup_cosine, warmup_cosine_factor


def test_warmup_then_cosine():
    f = [warmup_cosine_factor(s, 4, 12, min_factor=0.1) for s in range(13)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    assert f[8] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_scheduler_state_round_trip():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine(opt, 2, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD([p], lr=2.0)
    sched2 = warmup_cosine(opt2, 2, 10)
    sched2.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(2.0 * warmup_cosine_factor(5, 2, 10))
    with pytest.raises(ValueError, match="total_steps >= 1"):
        warmup_cosine(opt, 0, 0)


def test_lars_step_matches_hand_computation():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(4))
    gw, gb = torch.randn(3, 4), torch.randn(4)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = LARS(
        [
            {"params": [w], "weight_decay": 0.1},
            {"params": [b], "weight_decay": 0.1, "lars_exclude": True},
        ],
        lr=0.5,
        eta=0.01,
    )
    for _ in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # step 1
    g1 = gw + 0.1 * w0
    u1 = g1 * 0.01 * w0.norm() / g1.norm()
    w1 = w0 - 0.5 * u1
    g2 = gw + 0.1 * w1
    u2 = 0.9 * u1 + g2 * 0.01 * w1.norm() / g2.norm()
    torch.testing.assert_close(w.detach(), w1 - 0.5 * u2)
    # excluded parameters: plain momentum SGD, no weight decay
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb - 0.5 * (0.9 * gb + gb))
    with pytest.raises(ValueError, match="LARS needs"):
        LARS([w], lr=-1)


def test_build_optimizer_rules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = build_optimizer("adamw", model, 1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"]
    assert "AdamW(foreach)" in optimizer_description(opt)
    decayed, plain = opt.param_groups
    assert [p.ndim for p in decayed["params"]] == [2] and decayed["weight_decay"] == 0.05
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
    assert isinstance(build_optimizer("adam", model, 1e-3), torch.optim.Adam)
    lars = build_optimizer("lars", model, 0.1)
    assert isinstance(lars, LARS) and lars.param_groups[1]["lars_exclude"]
    with pytest.raises(RuntimeError, match="needs NVIDIA apex"):
        build_optimizer("lamb", model, 1e-3)  # no apex, no CUDA here
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer("sgd", model, 1e-3)


def _state():
    return {
        "config": {"method": "cc"},
        "model": {"w": torch.arange(3.0)},
        "position": {"epoch": 1, "batch": 2, "step": 9},
    }


def test_checkpoint_round_trip_restores_rngs(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = save_checkpoint(tmp_path / "ck.pt", _state())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path)  # a directory needs checkpoint.pt
    state = load_checkpoint(path)
    assert state["position"]["step"] == 9 and torch.equal(state["model"]["w"], torch.arange(3.0))
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    path = save_checkpoint(tmp_path / "checkpoint.pt", _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(tmp_path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a fastcluster_cl training checkpoint"):
        load_checkpoint(path)
    torch.save({"format_version": 99, **_state()}, path)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(path)


def test_resume_compatibility_names_the_differences():
    saved = TrainConfig(method="cc", epochs=5).to_dict()
    check_resumable(saved, {**saved, "out": "elsewhere", "device": "cpu"}, "ck.pt")
    with pytest.raises(CheckpointError, match=r"method='anchor' \(checkpoint: 'cc'\).*lr=0.5"):
        check_resumable(saved, {**saved, "method": "anchor", "lr": 0.5}, "ck.pt")


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        TrainConfig(epochs=0).check()
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="dec").check()
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({"epoch": 3})


def test_line_progress_prints_at_most_every_30_seconds_and_at_the_end():
    """stdout not a terminal (nohup, SLURM, `> log.txt`): plain lines, not a bar."""
    import io

    from fastcluster_cl.train.progress import LineProgress

    now = [0.0]
    out = io.StringIO()
    lines = LineProgress(total_steps=100, epochs=10, start_step=0, stream=out, clock=lambda: now[0])
    for step in range(1, 101):
        now[0] += 1.0  # one second and 64 images a step
        lines.update(epoch=(step - 1) // 10, step=step, loss=1.0 / step, images=64)
    printed = out.getvalue().splitlines()
    assert [line.split("  ")[1] for line in printed] == [
        "step 1/100",
        "step 31/100",
        "step 61/100",
        "step 91/100",
        "step 100/100",
    ]
    assert printed[1] == "epoch 4/10  step 31/100  loss 0.0323  64 img/s  ETA 1m09s"
    assert printed[-1].startswith("epoch 10/10  step 100/100") and "ETA 0m00s" in printed[-1]


def test_checkpoints_of_version_0_1_0_read_the_new_setting_name(tmp_path):
    """Version 0.1.0 stored centre_warmup_epochs; it is read as center_warmup_epochs."""
    state = _state()
    state["config"] = dict(state["config"], centre_warmup_epochs=3)
    state["config"].pop("center_warmup_epochs", None)
    config = load_checkpoint(save_checkpoint(tmp_path / "old.pt", state))["config"]
    assert config["center_warmup_epochs"] == 3 and "centre_warmup_epochs" not in config
