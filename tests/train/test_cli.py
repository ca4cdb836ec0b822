"""The fastcluster-cl command line: end-to-end train/eval, exit codes and one-line errors, and
resuming a run killed with SIGKILL mid-epoch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastcluster_cl.cli import main
from fastcluster_cl.train.logging import last_per_step, read_log

REPO = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "digits", "--batch-size", "256", "--no-plots", "--no-progress"]


def run_cli(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "fastcluster_cl.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_arguments_exit_2(capsys):
    for argv in (
        [],
        ["train", "--method", "dec"],
        ["train", "--epochs", "0"],
        ["train", "--lr", "-1"],
        ["train", "--batch-size", "x"],
        ["frobnicate"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
    err = capsys.readouterr().err
    assert "invalid choice: 'dec'" in err and "must be > 0, got 0" in err


def test_missing_dataset_and_checkpoints_give_one_line(capsys, tmp_path):
    err = one_line_error(
        capsys, ["train", "--dataset", "no-such-dataset", "--out", str(tmp_path / "run")]
    )
    assert err.startswith("fastcluster-cl train: error:") and "no-such-dataset" in err
    err = one_line_error(capsys, ["train", "--resume", str(tmp_path / "nothing.pt")])
    assert "no checkpoint at" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    assert "corrupted" in one_line_error(capsys, ["eval", str(bad)])


def test_info_reports_environment(capsys):
    assert main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__
    assert report["devices"][0] == "cpu"
    assert report["loss_backends_on_cpu"]["torch"] == "available"
    assert "apex_fused_optimizers" in report and "dali" in report


def test_train_then_eval_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TINY,
                "--epochs",
                "1",
                "--batch-size",
                "512",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )  # plots are covered by train/test_trainer.py
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"nmi", "acc", "ari", "kmeans", "timing"} <= set(metrics)
    assert 0 <= metrics["nmi"] <= 1 and metrics["kmeans"]["nmi"] > 0.3  # learns something
    assert metrics["timing"]["train_seconds"] > 0 and metrics["steps"] == 3
    assert list((out / "tensorboard").iterdir())
    steps = read_log(out / "log.jsonl", "step")
    assert len(steps) == 3 and all(r["images_per_s"] > 0 for r in steps)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["nmi"] == pytest.approx(metrics["nmi"])
    # resuming a finished run with another method is refused with the difference named
    capsys.readouterr()
    err = one_line_error(capsys, ["train", "--resume", str(out), "--method", "cc"])
    assert "incompatible" in err and "method='cc' (checkpoint: 'anchor')" in err


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    args = [
        *TINY,
        "--batch-size",
        "512",
        "--epochs",
        "2",
        "--checkpoint-every",
        "2",
        "--method",
        "tcc",
        "--threads",
        "1",
    ]
    full = run_cli("train", *args, "--out", str(tmp_path / "full"))
    killed_dir = tmp_path / "killed"
    victim = run_cli("train", *args, "--out", str(killed_dir))
    log = killed_dir / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:
        if log.exists() and any(r["batch"] > 0 for r in read_log(log, "checkpoint")):
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before a mid-epoch checkpoint was seen"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    saved = read_log(log, "checkpoint")[-1]
    assert 0 < saved["batch"] < 3
    code, _, err = finish(run_cli("train", "--resume", str(killed_dir)))
    assert code == 0, err
    code, _, err = finish(full)
    assert code == 0, err

    def losses(run):
        return [(r["step"], r["loss"]) for r in last_per_step(read_log(run / "log.jsonl", "step"))]

    assert losses(killed_dir) == losses(tmp_path / "full")
    assert len(losses(killed_dir)) == 6
    final = torch.load(killed_dir / "checkpoint.pt", weights_only=True)["model"]
    reference = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final)
    resumed_start = [r for r in read_log(killed_dir / "log.jsonl", "start") if r["resumed"]]
    assert resumed_start[0]["step"] == saved["step"]


def test_bench_without_module_is_a_clear_error(capsys, monkeypatch):
    import fastcluster_cl

    monkeypatch.setitem(sys.modules, "fastcluster_cl.bench", None)  # import now fails
    monkeypatch.delattr(fastcluster_cl, "bench", raising=False)
    assert "fastcluster_cl.bench is not available" in one_line_error(capsys, ["bench"])


def test_bench_delegates_its_options(capsys):
    pytest.importorskip("fastcluster_cl.bench")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: fastcluster-cl bench")
