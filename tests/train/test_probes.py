"""The reliability probe list (docs/reliability.md), each run as a real `fastcluster-cl`
process: exit code, one line on stderr, no traceback, and the state of the files after.
Slow (a dozen processes): ``python -m pytest train/test_probes.py -m slow``."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--dataset",
    "digits",
    "--batch-size",
    "512",
    "--epochs",
    "1",
    "--threads",
    "1",
    "--no-plots",
    "--no-progress",
]
pytestmark = pytest.mark.slow


def start(*args, env=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    return subprocess.Popen(
        [sys.executable, "-m", "fastcluster_cl.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli(*args, code=1, env=None) -> str:
    """Run the CLI; check its exit code and, for a failure, one line on stderr."""
    out, err = start(*args, env=env).communicate(timeout=300)
    proc_err = err.strip()
    if code == 0:
        return out
    lines = [line for line in proc_err.splitlines() if line.strip()]
    assert "Traceback" not in proc_err, proc_err
    if code == 1:
        assert len(lines) == 1, proc_err
    return proc_err if code == 2 else lines[0]


def expect(code, *args, env=None):
    proc = start(*args, env=env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1] if err.strip() else ""


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def cifar10(root: Path, replace: dict | None = None) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"labels": [int(x) for x in rng.integers(0, 10, 4)],
        }
        content = (replace or {}).get(name, batch)
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    return root


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probes") / "done"
    expect(0, "train", *TINY, "--out", str(out))
    return out


def test_probe_malicious_cifar_batch(tmp_path):
    marker = tmp_path / "pwned"
    root = cifar10(
        tmp_path / "data",
        {
            "data_batch_1": {
                b"data": np.zeros((1, 3072), np.uint8),
                b"labels": [0],
                b"x": RunsCode(marker),
            }
        },
    )
    err = expect(
        1,
        "train",
        "--dataset",
        "cifar10",
        "--data-root",
        str(root),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--no-progress",
    )
    assert "data_batch_1: refusing to load posix.system" in err and not marker.exists()


def test_probe_two_runs_on_one_directory(tmp_path):
    out = tmp_path / "run"
    a = start("train", *TINY, "--out", str(out))
    b = start("train", *TINY, "--out", str(out), "--seed", "1")
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (a, b)]
    codes = sorted(code for code, _ in results)
    loser = next((err for code, err in results if code == 1), "")
    # the second either finds the lock (exit 1, names the PID) or, if the first finished
    # already, the finished run ("already holds a run")
    assert codes == [0, 1], results
    assert "is in use by process" in loser or "already holds a run" in loser
    import json

    config = json.loads((out / "config.json").read_text())
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert config["seed"] == saved["seed"]
    starts = [
        json.loads(line)
        for line in (out / "log.jsonl").read_text().splitlines()
        if '"start"' in line
    ]
    assert len(starts) == 1


def test_probe_failed_start_is_no_dead_end(tmp_path):
    out = tmp_path / "run"
    err = expect(
        1,
        "train",
        *TINY,
        "--loss-backend",
        "triton",
        "--device",
        "cpu",
        "--out",
        str(out),
        env={"TRITON_INTERPRET": None},
    )
    assert "triton" in err
    assert not out.exists() or not any(out.iterdir())
    expect(0, "train", *TINY, "--out", str(out))


def test_probe_kill_during_checkpoint_write_then_resume(tmp_path, finished):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04 half")  # SIGKILL mid-write
    expect(0, "train", *TINY, "--resume", str(out))
    assert not list(out.glob(".checkpoint.pt.*.tmp"))


def test_probe_lock_dies_with_its_holder(tmp_path):
    from fastcluster_cl.train.rundir import RunDir

    out = tmp_path / "run"
    long = [*TINY, "--epochs", "500"]
    victim = start("train", *long, "--out", str(out))
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.05)
    err = expect(1, "train", *long, "--resume", str(out))
    assert f"in use by process {victim.pid}" in err
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    RunDir(out).lock().release()  # SIGKILL released it: a resume can go ahead


@pytest.mark.parametrize(
    "argv",
    [
        ["--lr", "inf"],
        ["--weight-decay", "inf"],
        ["--warmup-epochs", "inf"],
        ["--grad-clip", "nan"],
    ],
)
def test_probe_non_finite_arguments_exit_2(argv):
    err = cli("train", *TINY, *argv, code=2)
    assert "must be a finite number" in err or "must be" in err


def test_probe_bad_out_paths(tmp_path, finished):
    f = tmp_path / "file"
    f.write_text("x")
    assert "is not a directory" in expect(1, "train", *TINY, "--out", str(f))
    assert "is not a directory" in expect(1, "eval", str(finished), "--out", str(f))
    assert "a part of the path is a file" in expect(1, "train", *TINY, "--out", str(f / "d"))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("test_batch", b"", "cannot unpickle it"),
        ("test_batch", b"\x80\x02}q\x00(U\x04data", "cannot unpickle it"),
        ("data_batch_2", {b"data": np.zeros((1, 3072), np.uint8)}, "lacks the key(s) ['labels']"),
        ("data_batch_3", [1, 2], "holds a list, not a CIFAR batch dict"),
        (
            "data_batch_4",
            {b"data": np.zeros((1, 3072), np.uint8), b"labels": [-1]},
            "holds label -1",
        ),
    ],
)
def test_probe_broken_cifar_batches(tmp_path, name, content, message):
    root = cifar10(tmp_path / "data", {name: content})
    err = expect(
        1,
        "train",
        "--dataset",
        "cifar10",
        "--data-root",
        str(root),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    )
    assert name in err and message in err


def test_probe_stl10_label_byte_zero(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for part, labels in (("train", [1, 2]), ("test", [0, 3])):
        np.zeros((2, 3, 96, 96), np.uint8).tofile(folder / f"{part}_X.bin")
        np.asarray(labels, np.uint8).tofile(folder / f"{part}_y.bin")
    err = expect(
        1,
        "train",
        "--dataset",
        "stl10",
        "--data-root",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    )
    assert "test_y.bin holds label 0" in err


def test_probe_corrupt_jpeg(tmp_path):
    from PIL import Image

    from fastcluster_cl.data import IMAGENET10_WNIDS

    for wnid in IMAGENET10_WNIDS:
        (tmp_path / wnid).mkdir()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / wnid / "a.JPEG")
    bad = tmp_path / IMAGENET10_WNIDS[5] / "a.JPEG"
    bad.write_bytes(bad.read_bytes()[:30])
    err = expect(
        1,
        "train",
        "--dataset",
        "imagenet10",
        "--data-root",
        str(tmp_path),
        "--image-size",
        "16",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    )
    assert f"cannot decode image {bad}" in err


def test_probe_checkpoint_problems(tmp_path, finished):
    import shutil

    from fastcluster_cl.train.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    state = load_checkpoint(out)
    state["config"]["epochs"] = "many"
    save_checkpoint(
        out / "checkpoint.pt",
        {k: v for k, v in state.items() if k not in ("format_version", "rng", "checksum")},
    )
    assert "epochs must be int or None, got 'many'" in expect(1, "eval", str(out))
    assert "epochs must be int or None, got 'many'" in expect(1, "train", "--resume", str(out))
    shutil.copy(finished / "checkpoint.pt", out / "checkpoint.pt")
    data = bytearray((out / "checkpoint.pt").read_bytes())
    weight = load_checkpoint(out)["model"]["projector.net.0.weight"]
    at = data.find(weight.numpy().tobytes()[:64])
    data[at + 9] ^= 0x01
    (out / "checkpoint.pt").write_bytes(bytes(data))
    assert "fails its checksum" in expect(1, "eval", str(out))


def test_probe_nan_gradient_with_finite_loss(tmp_path):
    """In-process: a hook makes the gradient NaN while the loss stays finite."""
    from fastcluster_cl.train.config import TrainConfig
    from fastcluster_cl.train.loop import NonFiniteLossError, Trainer

    torch.set_num_threads(1)
    trainer = Trainer(
        TrainConfig(
            epochs=1, batch_size=512, out=str(tmp_path / "run"), progress=False, plots=False
        )
    )
    trainer.model.projector.net[0].weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteLossError, match="gradient norm is nan"):
        trainer.fit()


def test_probe_tcc_mixed_dtype_and_device():
    import fastcluster_cl as fc

    c, v, mu = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 6), torch.randn(3, 6)
    with pytest.raises(TypeError, match="cast them to one dtype"):
        fc.tcc_loss(v, v, c, c.float(), mu, v, v)
    m = torch.empty(4, 6, device="meta")
    with pytest.raises(ValueError, match="move them to one device"):
        fc.tcc_loss(m, m, c.float(), c.float(), mu, m, m)
