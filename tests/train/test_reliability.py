"""Reliability of runs and their files: one writer per run directory, no dead end after a
failed start, one-line errors with the documented exit codes for bad paths, full disks and
broken checkpoints (docs/reliability.md)."""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastcluster_cl.cli import main
from fastcluster_cl.train import checkpoint as ckpt
from fastcluster_cl.train.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from fastcluster_cl.train.logging import read_log

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


def one_line_error(capsys, argv, code=1) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 1-epoch run on digits (3 steps); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def copy_run(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# ---------------------------------------------------------------------------- the lock
HOLD = textwrap.dedent("""
    import sys, time
    from fastcluster_cl.train.rundir import RunDir
    lock = RunDir(sys.argv[1]).lock()
    print("locked", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def holder():
    """Start a process that locks a directory; yields (start(dir) -> pid)."""
    procs = []

    def start(directory):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(directory)], env=env, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc.pid

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_locked_run_directory_refuses_train_and_resume(tmp_path, capsys, finished_run, holder):
    out = copy_run(finished_run, tmp_path)
    before = (out / "log.jsonl").read_bytes(), (out / "checkpoint.pt").read_bytes()
    pid = holder(out)
    err = one_line_error(capsys, ["train", *TINY, "--resume", str(out)])
    assert f"run directory {out} is in use by process {pid}" in err
    fresh = tmp_path / "fresh"
    pid2 = holder(fresh)
    err = one_line_error(capsys, ["train", *TINY, "--out", str(fresh), "--seed", "1"])
    assert f"in use by process {pid2}" in err
    # the refused runs wrote nothing
    assert ((out / "log.jsonl").read_bytes(), (out / "checkpoint.pt").read_bytes()) == before
    assert sorted(p.name for p in fresh.iterdir()) == [".fastcluster-cl.lock"]


def test_lock_is_released_when_the_run_ends(tmp_path, finished_run):
    from fastcluster_cl.train.rundir import RunDir

    out = copy_run(finished_run, tmp_path)
    assert main(["train", *TINY, "--resume", str(out)]) == 0
    RunDir(out).lock().release()  # free again


# ------------------------------------------------------------- failed starts, leftovers
def test_failed_start_leaves_no_dead_end(tmp_path, capsys, monkeypatch):
    # e.g. --loss-backend triton on a CPU without TRITON_INTERPRET fails at the first step,
    # after config.json and log.jsonl were written (here the interpreter is on: inject it)
    from fastcluster_cl.train.loop import Trainer

    def fails(self, batch):
        raise RuntimeError("backend='triton' cannot run on cpu")

    monkeypatch.setattr(Trainer, "train_step", fails)
    out = tmp_path / "run"
    err = one_line_error(capsys, ["train", *TINY, "--out", str(out)])
    assert "backend='triton' cannot run on cpu" in err
    assert not out.exists()  # the start created it and removed it again
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    one_line_error(capsys, ["train", *TINY, "--out", str(kept)])
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    monkeypatch.undo()
    assert main(["train", *TINY, "--out", str(out)]) == 0  # the same --out now works


def test_start_killed_before_its_first_checkpoint_can_be_restarted(tmp_path, capsys):
    from fastcluster_cl.train.rundir import RunDir

    out = tmp_path / "run"
    run = RunDir(out).open()  # what SIGKILL before the first checkpoint leaves: the marker
    for name, text in (("config.json", "{}"), ("log.jsonl", '{"event": "start", "time": 0}\n')):
        run.claim(name).write_text(text)
    run.release()
    err = one_line_error(capsys, ["train", *TINY, "--resume", str(out)])
    assert "stopped before its first checkpoint; start it again with --out" in err
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert len(read_log(out / "log.jsonl", "start")) == 1
    assert load_checkpoint(out)["position"]["step"] == 3


def test_resume_removes_temporary_checkpoint_files(tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path)
    (out / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    assert main(["train", *TINY, "--resume", str(out)]) == 0
    assert not list(out.glob(".checkpoint.pt.*"))


# --------------------------------------------------------------------- bad --out paths
@pytest.mark.parametrize("command", ["train", "eval"])
def test_out_pointing_at_a_file_is_one_line(tmp_path, capsys, finished_run, command):
    target = tmp_path / "afile"
    target.write_text("x")
    argv = ["train", *TINY] if command == "train" else ["eval", str(finished_run)]
    err = one_line_error(capsys, [*argv, "--out", str(target)])
    assert f"{target} exists and is not a directory" in err
    err = one_line_error(capsys, [*argv, "--out", str(target / "sub")])
    assert "a part of the path is a file" in err and str(target / "sub") in err
    assert target.read_text() == "x"


def test_read_only_file_system_is_one_line(tmp_path, capsys, monkeypatch, finished_run):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    err = one_line_error(capsys, ["train", *TINY, "--out", str(tmp_path / "ro" / "run")])
    assert f"read-only file system: cannot write {tmp_path / 'ro' / 'run'}" in err
    err = one_line_error(capsys, ["eval", str(finished_run), "--out", str(tmp_path / "ro")])
    assert "read-only file system" in err


# ------------------------------------------------------------------- argument ranges
@pytest.mark.parametrize(
    "option", ["--lr", "--weight-decay", "--warmup-epochs", "--grad-clip", "--instance-temperature"]
)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_numbers_exit_2(capsys, option, value):
    with pytest.raises(SystemExit) as exc:
        main(["train", f"{option}={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert option in err and ("finite" in err or "must be" in err)


# ------------------------------------------------------------------------- disk full
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(4.0)}})
    before = path.read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:  # the disk fills after 100 bytes: torch's zip writer then fails
        def __init__(self, f):
            self.f, self.n = f, 0

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.n += len(data)
            if self.n > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(
        CheckpointWriteError, match=f"^no space left on device while writing {path}$"
    ):
        save_checkpoint(path, {"model": {"w": torch.zeros(1000)}})
    monkeypatch.setattr(ckpt.os, "fdopen", real_fdopen)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]

    def raises(error):
        def save(*args, **kwargs):
            raise error

        return save

    monkeypatch.setattr(ckpt.torch, "save", raises(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(CheckpointWriteError, match="no space left on device while writing"):
        save_checkpoint(path, {"model": {}})
    # the zip writer's error alone (no errno): told apart by the free space left
    monkeypatch.setattr(
        ckpt.torch,
        "save",
        raises(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")),
    )
    monkeypatch.setattr(ckpt, "_free_bytes", lambda d: 4096)
    with pytest.raises(CheckpointWriteError, match="no space left on device while writing"):
        save_checkpoint(path, {"model": {}})
    monkeypatch.setattr(ckpt, "_free_bytes", lambda d: 1 << 40)
    with pytest.raises(CheckpointWriteError, match="cannot write .*torch's writer failed"):
        save_checkpoint(path, {"model": {}})
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def test_disk_full_during_training_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        ckpt.torch,
        "save",
        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),
    )
    out = tmp_path / "run"
    err = one_line_error(capsys, ["train", *TINY, "--out", str(out)])
    assert err.endswith(f"no space left on device while writing {out / 'checkpoint.pt'}")


# ------------------------------------------------------------------ broken checkpoints
def test_checkpoint_config_of_the_wrong_type_is_one_line(tmp_path, capsys, finished_run):
    out = copy_run(finished_run, tmp_path)
    state = load_checkpoint(out)
    state["config"]["lr"] = "fast"
    save_checkpoint(
        out / "checkpoint.pt",
        {k: v for k, v in state.items() if k not in ("format_version", "rng", "checksum")},
    )
    for argv in (["eval", str(out)], ["train", "--resume", str(out)]):
        err = one_line_error(capsys, argv)
        assert f"checkpoint {out / 'checkpoint.pt'} holds settings" in err
        assert "lr must be float or None, got 'fast' (str)" in err  # None: the preset's


@pytest.mark.parametrize("where", ["tensor", "optimizer", "position"])
def test_flipped_bit_in_a_checkpoint_is_refused(tmp_path, capsys, where):
    weight = torch.linspace(-1, 1, 4096)
    state = {
        "config": {"lr": 0.001},
        "model": {"w": weight},
        "optimizer": {"state": {0: {"exp_avg": torch.full((512,), 0.25)}}},
        "position": {"epoch": 3, "batch": 0, "step": 7777777},
    }
    path = save_checkpoint(tmp_path / "checkpoint.pt", state)
    assert torch.equal(load_checkpoint(path)["model"]["w"], weight)
    data = bytearray(path.read_bytes())
    needle = {
        "tensor": weight.numpy().tobytes()[4000:4016],
        "optimizer": torch.full((4,), 0.25).numpy().tobytes(),
        "position": (7777777).to_bytes(4, "little"),
    }[where]
    at = data.find(needle)
    assert at > 0
    data[at + 2] ^= 0x10  # one bit
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="fails its checksum"):
        load_checkpoint(path)
    err = one_line_error(capsys, ["eval", str(path)])
    assert f"checkpoint {path} fails its checksum" in err


def test_checkpoint_without_checksum_is_refused_old_format_still_loads(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"config": {}, "model": {}, "position": {}})
    state = torch.load(path, weights_only=True)
    del state["checksum"]
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError, match="has no checksum"):
        load_checkpoint(path)
    state["format_version"] = 1  # written before checksums existed
    torch.save(state, path)
    assert load_checkpoint(path)["format_version"] == 1
