"""Reliability probes, round 2 (docs/reliability.md): each case as a real `fastcluster-cl`
process where it is a CLI case, checking the exit code, the one stderr line, and that nothing of
the user's (or of another run) was deleted or changed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastcluster_cl as fc
from fastcluster_cl.train.checkpoint import load_checkpoint, save_checkpoint
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


def run(*args, code: int) -> str:
    """Run the CLI; assert the exit code and, for a failure, exactly one stderr line, which is
    returned."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "fastcluster_cl.cli", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == code, proc.stderr
    if code == 0:
        return proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root` with its bytes (None for a folder), but the lock file, which
    each process that takes the lock rewrites with its PID."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.name != ".fastcluster-cl.lock"
    }


def users_folder(path: Path) -> Path:
    """A folder holding the user's own files, named as a run's files are."""
    path.mkdir()
    (path / "config.json").write_text('{"mine": true}')
    (path / "metrics.json").write_text("[1, 2, 3]")
    (path / "log.jsonl").write_text("my notes\n")
    for folder in ("plots", "tensorboard"):
        (path / folder).mkdir()
        (path / folder / "keep.png").write_bytes(b"\x89PNG mine")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probes2") / "done"
    run("train", *TINY, "--out", out, code=0)
    return out


# 1. a failed (or successful) start never deletes the user's files
def test_failed_start_in_a_users_folder_deletes_nothing(tmp_path):
    folder = users_folder(tmp_path / "mine")
    before = tree(folder)
    err = run(
        "train",
        "--dataset",
        "cifar10",
        "--data-root",
        tmp_path / "nonexistent",
        "--out",
        folder,
        "--no-progress",
        code=1,
    )
    assert "is not empty and holds no fastcluster-cl run" in err and "config.json" in err
    assert tree(folder) == before
    err = run("train", *TINY, "--out", folder, code=1)  # a start that would succeed
    assert "holds no fastcluster-cl run" in err and tree(folder) == before


def test_failed_start_in_a_new_folder_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "run"
    err = run(
        "train",
        "--dataset",
        "cifar10",
        "--data-root",
        tmp_path / "nonexistent",
        "--out",
        out,
        "--no-progress",
        code=1,
    )
    assert "cifar" in err.lower()
    assert not out.exists()


def test_users_files_beside_a_run_are_kept_and_never_replaced(tmp_path):
    from fastcluster_cl.train.rundir import RunDir

    out = tmp_path / "run"
    started = RunDir(out).open()  # a start that died before its first checkpoint
    for name in ("config.json", "log.jsonl"):
        started.claim(name).write_text("{}")
    started.release()
    (out / "notes.txt").write_text("mine")
    run("train", *TINY, "--out", out, code=0)  # the aborted start is cleared, notes.txt stays
    assert (out / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "again"
    started = RunDir(fresh).open()
    started.claim("log.jsonl").write_text("{}")
    started.release()
    (fresh / "plots").mkdir()  # the user's folder, of a name a run writes (this one did not)
    (fresh / "plots" / "mine.png").write_bytes(b"mine")
    before = tree(fresh)
    err = run("train", *TINY, "--out", fresh, code=1)
    assert "holds plots, which this run did not write" in err and tree(fresh) == before


# 2. one check for "this directory holds another run", fresh starts and resumes alike
def test_resume_into_another_finished_run_is_refused(tmp_path, finished):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(finished, a)
    run("train", *TINY, "--seed", "7", "--out", b, code=0)
    before_a, before_b = tree(a), tree(b)
    err = run("train", *TINY, "--resume", a, "--out", b, code=1)
    assert f"--out {b} already holds another run" in err
    err = run("train", *TINY, "--out", b, code=1)
    assert f"{b} already holds a run" in err
    assert tree(a) == before_a and tree(b) == before_b


def test_resume_into_a_new_folder_leaves_the_source_alone(tmp_path, finished):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(finished, a)
    before = tree(a)
    run("train", *TINY, "--resume", a, "--out", b, code=0)
    assert tree(a) == before and (b / "metrics.json").exists()


# 3. impossible settings are caught before the first step, exit 2 naming the option
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-clusters", "2000"], "argument --num-clusters: K = 2000 exceeds the 1797 labelled"),
        (["--batch-size", "5000"], "argument --batch-size: 5000 exceeds the 1797 images of digits"),
        (["--image-size", "1"], "argument --image-size: 1 px is too small for backbone digit_cnn"),
    ],
)
def test_impossible_settings_fail_before_the_first_step(tmp_path, argv, message):
    out = tmp_path / "run"
    err = run("train", *TINY, *argv, "--out", out, code=2)
    assert message in err and "drop_last" not in err
    assert not out.exists()


# 4. a torn log line
def test_resume_after_a_torn_log_line_keeps_every_record_readable(tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"event": "step", "step": 4, "lo')  # a crash mid-write
    run("train", *TINY, "--resume", out, code=0)
    with pytest.warns(UserWarning, match="log.jsonl:9: skipping a torn line"):
        records = read_log(out / "log.jsonl")
    assert [r["resumed"] for r in records if r["event"] == "start"] == [False, True]
    assert records[-1]["event"] == "end"


# 5. exact resume and the thread count
def test_resume_with_another_thread_count_is_refused(tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = tree(out)
    err = run(
        "train",
        *TINY[:-4],
        "--threads",
        "2",
        "--no-plots",
        "--no-progress",
        "--resume",
        out,
        code=2,
    )
    assert "argument --threads: checkpoint" in err and "pass --threads 1" in err
    assert tree(out) == before


# 6. SIGINT / SIGTERM during a checkpoint write leave no temporary file
SLOW_SAVE = textwrap.dedent("""
    import sys, time, torch
    from fastcluster_cl.cli import main
    real_save = torch.save
    def slow_save(obj, f, *args, **kwargs):
        f.write(b"PK partial")
        print("writing", flush=True)
        time.sleep(60)
    torch.save = slow_save
    sys.exit(main(sys.argv[1:]))
""")


def _sigint_as_in_a_terminal() -> None:
    """A shell starts background jobs with SIGINT ignored, and children inherit that: the test
    run may be such a job, a user's Ctrl-C reaches a foreground CLI."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_a_checkpoint_write_leaves_nothing(tmp_path, finished, sig, code):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, "train", *TINY, "--out", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    assert proc.stdout.readline().strip() == "writing"
    assert list(out.glob(".checkpoint.pt.*.tmp"))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "interrupted" in err and "Traceback" not in err, err
    assert not out.exists()  # no checkpoint was written: the start removed what it wrote


# 7. exit codes and one-line messages
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "1e300"], "argument --lr: must be <= 3.40282e+38, got 1e300"),
        (["--seed", "-5"], "argument --seed: must be >= 0, got -5"),
        (["--seed", str(2**70)], f"argument --seed: must be <= {2**32 - 1}, got {2**70}"),
        (["--epochs", str(2**40)], "argument --epochs: must be <= 2147483647"),
    ],
)
def test_out_of_range_numbers_exit_2_naming_the_option(argv, message):
    assert message in run("train", *TINY, *argv, code=2)


def test_symlink_out_paths_are_named(tmp_path):
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    err = run("train", *TINY, "--out", tmp_path / "loop_a", code=1)
    assert "is a symbolic link loop" in err
    err = run("train", *TINY, "--out", tmp_path / "dangling", code=1)
    assert f"is a symbolic link to {tmp_path / 'missing'}, which does not exist" in err
    assert not (tmp_path / "missing").exists()


def test_eval_out_never_replaces_a_users_file(tmp_path, finished):
    folder = users_folder(tmp_path / "mine")
    before = tree(folder)
    err = run("eval", finished, "--out", folder, code=1)
    assert "holds no fastcluster-cl output" in err and tree(folder) == before
    run("eval", finished, "--out", tmp_path / "new", code=0)
    run("eval", finished, "--out", tmp_path / "new", code=0)  # its own metrics.json: replaced
    assert json.loads((tmp_path / "new" / "metrics.json").read_text())["nmi"] >= 0


def test_library_errors_on_meta_tensors_and_bank_sizes():
    meta = torch.empty(4, 8, device="meta", requires_grad=True)
    assert fc.nt_xent(meta, meta).device.type == "meta"
    assert fc.NTXentLoss(0.1, (16, 8)).to("meta")(meta, meta).device.type == "meta"
    with pytest.raises(
        TypeError,
        match=r"memory_bank_size must be 0 or a \(size, dim\) tuple "
        r"of ints, got \(16.5, 8\)",
    ):
        fc.NTXentLoss(memory_bank_size=(16.5, 8))


# 8. values that were silently accepted
@pytest.mark.parametrize("command", ["eval", "train"])
def test_checkpoint_with_a_bad_boolean_is_refused_even_when_overridden(tmp_path, finished, command):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    state = load_checkpoint(out)
    state["config"]["plots"] = "yes"
    save_checkpoint(
        out / "checkpoint.pt",
        {k: v for k, v in state.items() if k not in ("format_version", "rng", "checksum")},
    )
    argv = (
        ["eval", out]
        if command == "eval"
        else ["train", "--resume", out, "--no-plots", "--threads", "1"]
    )
    err = run(*argv, code=1)
    assert "holds settings this version cannot use: plots must be bool, got 'yes'" in err


def test_bank_pointer_out_of_range_is_refused():
    loss = fc.NTXentLoss(memory_bank_size=(16, 8), persistent_memory_bank=True)
    state = loss.state_dict()
    state["memory_bank.bank_ptr"] = torch.tensor([999])
    with pytest.raises(
        ValueError,
        match=r"bank_ptr must be one integer in \[0, 16\), got "
        r"\[999\]",
    ):
        loss.load_state_dict(state)


# Found in review: results without a checkpoint, eval into a run, symlinked lock files, runs of
# earlier versions, temperatures below the losses' limit
def test_a_finished_run_without_its_checkpoint_is_never_cleared(tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "checkpoint.pt").unlink()  # the user freed the space; the results stay theirs
    before = tree(out)
    err = run("train", *TINY, "--out", out, code=1)
    assert "holds a run's results without its checkpoint (checkpoint.pt, metrics.json)" in err
    assert tree(out) == before


def test_eval_out_never_replaces_a_training_runs_metrics(tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = tree(out)
    err = run("eval", out, "--out", out, code=1)
    assert "holds a fastcluster-cl train run" in err and tree(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    run("eval", tmp_path / "missing", "--out", empty, code=1)  # a failed eval leaves it empty
    assert not any(empty.iterdir())
    run("eval", finished, "--out", empty, code=0)
    err = run("train", *TINY, "--out", empty, code=1)  # nor does a start clear an eval's output
    assert "holds the output of `eval`" in err


def test_a_symlinked_lock_file_is_refused_and_its_target_kept(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("mine")
    (folder / ".fastcluster-cl.lock").symlink_to(target)
    err = run("train", *TINY, "--out", folder, code=1)
    assert "is a symbolic link" in err and target.read_text() == "mine"


def test_a_run_of_an_earlier_version_resumes_elsewhere_not_in_place(tmp_path, finished):
    out = tmp_path / "old"
    shutil.copytree(finished, out)
    (out / ".fastcluster-cl-run.json").unlink()  # what an earlier version left
    before = tree(out)
    err = run("train", *TINY, "--resume", out, code=1)
    assert f"resume it into a new directory with --resume {out} --out NEW" in err
    assert tree(out) == before
    run("train", *TINY, "--resume", out, "--out", tmp_path / "new", code=0)
    assert tree(out) == before


def test_temperature_below_the_losses_limit_exits_2():
    err = run("train", *TINY, "--instance-temperature", "1e-9", code=2)
    assert "argument --instance-temperature: instance_temperature must be >= 1e-8" in err
    err = run("train", *TINY, "--method", "cc", "--center-warmup-epochs", "1", code=2)
    assert "argument --center-warmup-epochs" in err
