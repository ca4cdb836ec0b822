"""The run directory: marked as ours, one writer at a time, no dead ends, nothing of the user's
ever touched.

- A marker file, ``.fastcluster-cl-run.json``, is written before anything else. It names the run
  (`run_id`) and lists every entry the tool has written there (`written`); an entry is added to
  the list before it is created (`RunDir.claim`). The tool deletes or replaces only entries the
  marker lists.
- A directory that holds anything without a marker is refused with one line naming what is
  there; nothing in it is deleted. A marked directory may hold the user's own files beside the
  run's; they are never touched, and one that takes a name the run writes is refused up front.
- `RunDir.open` is the one check for "this directory holds another run", for fresh starts and
  resumes alike.
- An exclusive ``fcntl.flock`` on ``.fastcluster-cl.lock`` (the holder's PID inside) keeps one
  writer per directory; the kernel drops it when the holder exits, SIGKILL included.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

MARKER_NAME = ".fastcluster-cl-run.json"
LOCK_NAME = ".fastcluster-cl.lock"
CHECKPOINT_NAME = "checkpoint.pt"
# Every entry a run writes (checkpoint.pt's temporary files, ".checkpoint.pt.*.tmp", go with it).
RUN_ENTRIES = ("config.json", "log.jsonl", "metrics.json", CHECKPOINT_NAME, "tensorboard", "plots")
# What a start writes before its first checkpoint: a marked directory listing nothing else is a
# start that died early, cleared by the next start; anything more (a checkpoint, metrics, plots)
# is a run's result, never cleared.
EARLY_ENTRIES = {"config.json", "log.jsonl", "tensorboard"}


class RunDirError(RuntimeError):
    """The run directory cannot be used (busy, not ours, not a directory, not writable)."""


class RunDirBusyError(RunDirError):
    """Another process holds the run directory's lock."""


def describe_os_error(err: OSError, path) -> str:
    """One line for an OSError met while writing `path`."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device while writing {path}"
    if err.errno == errno.EROFS:
        return f"read-only file system: cannot write {path}"
    return f"cannot write {path}: {err.strerror or err}"


def make_directory(path: Path, option: str = "--out") -> bool:
    """Create `path` (and its parents) if needed; True if this call created it. One-line
    RunDirError for a path that cannot be a directory (a file, a dangling symlink, a loop)."""
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise RunDirError(
                    f"{option} {path} is a symbolic link loop; choose another {option}"
                ) from None
        raise RunDirError(
            f"{option} {path} is a symbolic link to {os.readlink(path)}, which "
            f"does not exist; create the target or choose another {option}"
        )
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{option} {path} exists and is not a directory; choose another {option}")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunDirError(
            f"cannot create {option} {path}: a part of the path is a file; choose another {option}"
        ) from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RunDirError(
                f"cannot create {option} {path}: a part of the path is a "
                f"symbolic link loop; choose another {option}"
            ) from None
        raise RunDirError(describe_os_error(err, path)) from err
    return created


def _listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _is_checkpoint_temp(name: str) -> bool:
    return name.startswith(f".{CHECKPOINT_NAME}.") and name.endswith(".tmp")


class RunDir:
    """One run directory, opened by `open` (fresh start or resume) or `open_output` (a
    command's output folder) and released by `release` (or `discard` after a failed start)."""

    def __init__(self, path: str | Path, option: str = "--out"):
        self.path = Path(path)
        self.option = option
        self.created = False
        self.run_id: str | None = None
        self.written: list[str] = []
        self.kind = "train"
        self.marked_here = False  # open_output marked a new or empty directory
        self._lock_fd: int | None = None
        self._lock_created = False

    # ------------------------------------------------------------------------------- opening
    def open(self, resume_from: Path | None = None) -> RunDir:
        """Take the directory for a run: fresh (`resume_from` None) or resuming the checkpoint
        `resume_from`. Refuses (RunDirError, one line, nothing written or deleted) a directory
        that holds files without a marker, one whose run has a checkpoint (unless that is the
        checkpoint being resumed), one holding a run's results without its checkpoint, and one
        where the user's files take the run's names. A marked directory that lists only what a
        start writes before its first checkpoint (a start that died early) is cleared of those
        entries and reused."""
        self.lock()
        try:
            self._take(resume_from)
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, resume_from: Path | None) -> None:
        entries = self._entries()
        marker = self._read_marker() if MARKER_NAME in entries else None
        checkpoint = self.path / CHECKPOINT_NAME
        resuming_here = (
            resume_from is not None
            and checkpoint.exists()
            and Path(resume_from).resolve() == checkpoint.resolve()
        )
        if marker is None:
            others = entries - {MARKER_NAME}
            if resuming_here:
                # a run of an earlier version: nothing proves which files beside the
                # checkpoint are the tool's, so it is continued elsewhere, not in place
                raise RunDirError(
                    f"{self.path} has no run marker (written by an earlier version); nothing "
                    f"was changed there: resume it into a new directory with --resume "
                    f"{self.path} --out NEW"
                )
            if others:
                raise RunDirError(
                    f"{self.option} {self.path} is not empty and holds no "
                    f"fastcluster-cl run ({_listing(others)}); nothing was "
                    f"changed there: choose a new or empty {self.option}"
                )
            self.run_id = uuid.uuid4().hex
            self.written = []
            self._write_marker()
            return
        self.run_id, self.written, kind = marker
        if kind != "train":
            raise RunDirError(
                f"{self.option} {self.path} holds the output of `{kind}`; nothing was changed "
                f"there: choose a new or empty {self.option}"
            )
        foreign = {
            e
            for e in entries - {MARKER_NAME} - set(self.written)
            if not (_is_checkpoint_temp(e) and CHECKPOINT_NAME in self.written)
        }
        clash = sorted(foreign & set(RUN_ENTRIES))
        if clash:
            raise RunDirError(
                f"{self.option} {self.path} holds {_listing(clash)}, which this "
                "run did not write and would replace; move them or choose "
                f"another {self.option}"
            )
        if CHECKPOINT_NAME in self.written and checkpoint.exists():
            if resuming_here:
                return
            if resume_from is None:
                raise RunDirError(
                    f"{self.path} already holds a run; resume it with --resume "
                    f"{self.path} or choose another {self.option}"
                )
            raise RunDirError(
                f"{self.option} {self.path} already holds another run (its own "
                f"{CHECKPOINT_NAME}); resume that one with --resume {self.path}, "
                f"or choose a new or empty {self.option}"
            )
        results = sorted(set(self.written) - EARLY_ENTRIES)
        if results:
            raise RunDirError(
                f"{self.option} {self.path} holds a run's results without its checkpoint "
                f"({_listing(results)}); nothing was changed there: choose a new or empty "
                f"{self.option}"
            )
        # A start that died before its first checkpoint: nothing to resume, clear it.
        self.remove_written()
        self.run_id = uuid.uuid4().hex
        self._write_marker()

    def open_output(self, names: tuple[str, ...], kind: str) -> RunDir:
        """Take the directory to write `names` into for command `kind` (e.g. eval's
        metrics.json): a new or empty directory (then marked), or one that an earlier `kind`
        marked; never a training run's (its metrics.json is that run's result)."""
        self.kind = kind
        self.lock()
        try:
            entries = self._entries()
            if MARKER_NAME in entries:
                self.run_id, self.written, marked = self._read_marker()
                if marked != kind:
                    raise RunDirError(
                        f"{self.option} {self.path} holds a fastcluster-cl {marked} run, whose "
                        f"files stay its own; nothing was changed there: choose a new or "
                        f"empty {self.option}"
                    )
            elif entries:
                raise RunDirError(
                    f"{self.option} {self.path} is not empty and holds no "
                    f"fastcluster-cl output ({_listing(entries)}); nothing was "
                    f"changed there: choose a new or empty {self.option}"
                )
            else:
                self.run_id = uuid.uuid4().hex
                self._write_marker()
                self.marked_here = True
            for name in names:
                self.claim(name)
        except BaseException:
            self.release()
            raise
        return self

    # -------------------------------------------------------------------------------- marker
    def claim(self, name: str) -> Path:
        """Record `name` in the marker before the tool writes it; refuse an existing entry of
        that name that the marker does not list (the user's)."""
        path = self.path / name
        if name in self.written:
            return path
        if os.path.lexists(path):
            raise RunDirError(
                f"{path} exists and was not written by this run; move it or "
                f"choose another {self.option}"
            )
        self.written.append(name)
        self._write_marker()
        return path

    def owns(self, name: str) -> bool:
        return name in self.written

    def _entries(self) -> set[str]:
        try:
            return set(os.listdir(self.path)) - {LOCK_NAME, MARKER_NAME + ".tmp"}
        except OSError as err:
            raise RunDirError(
                f"cannot read {self.option} {self.path}: {err.strerror or err}"
            ) from err

    def _read_marker(self) -> tuple[str, list[str], str]:
        """(run id, the entries written, the command that marked it: "train", "eval")."""
        path = self.path / MARKER_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            run_id, written, kind = data["run_id"], data["written"], data.get("kind", "train")
            if not (
                isinstance(run_id, str)
                and isinstance(kind, str)
                and isinstance(written, list)
                and all(
                    isinstance(w, str) and "/" not in w and w not in ("", ".", "..")
                    for w in written
                )
            ):
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError):
            raise RunDirError(
                f"{path} is damaged (not a fastcluster-cl run marker); nothing "
                f"was changed there: choose another {self.option}"
            ) from None
        return run_id, list(written), kind

    def _write_marker(self) -> None:
        path = self.path / MARKER_NAME
        tmp = self.path / (MARKER_NAME + ".tmp")
        text = json.dumps(
            {
                "tool": "fastcluster-cl",
                "kind": self.kind,
                "run_id": self.run_id,
                "written": self.written,
            },
            indent=1,
        )
        try:
            # never through a symbolic link someone left under that name
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError as err:
            if not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
            raise RunDirError(describe_os_error(err, path)) from err

    # ----------------------------------------------------------------------------- removing
    def remove_temporary_checkpoints(self) -> list[Path]:
        """Delete the ``.checkpoint.pt.*.tmp`` files a killed write left (ours only: the marker
        lists checkpoint.pt; the lock keeps other writers out)."""
        if CHECKPOINT_NAME not in self.written:
            return []
        removed = [p for p in self.path.glob(f".{CHECKPOINT_NAME}.*.tmp")]
        for tmp in removed:
            tmp.unlink(missing_ok=True)
        return removed

    def remove_written(self) -> None:
        """Delete every entry the marker lists (and checkpoint temporaries)."""
        self.remove_temporary_checkpoints()
        for name in self.written:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        self.written = []

    def discard(self) -> None:
        """After a start that failed before its first checkpoint: remove what it wrote, the
        marker and the lock file, and the directory if this run created it and it is empty,
        so the same --out can simply be used again. The user's files stay."""
        if self._lock_fd is None:
            return
        self.remove_written()
        (self.path / MARKER_NAME).unlink(missing_ok=True)
        self.release(remove_lock=True)
        if self.created:
            try:
                self.path.rmdir()  # only if empty
            except OSError:
                pass

    # --------------------------------------------------------------------------------- lock
    def lock(self) -> RunDir:
        """Create the directory if needed and take its lock (RunDirBusyError if held)."""
        import fcntl

        self.created = make_directory(self.path, self.option)
        lock = self.path / LOCK_NAME
        while True:
            existed = lock.exists()
            try:  # never through a symbolic link someone left under that name
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise RunDirError(
                        f"{lock} is a symbolic link; nothing was changed there: choose "
                        f"another {self.option}"
                    ) from None
                raise RunDirError(describe_os_error(err, lock)) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 256, 0).decode(errors="replace").split()
                os.close(fd)
                who = (
                    f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "")
                    if holder
                    else "another process"
                )
                raise RunDirBusyError(
                    f"run directory {self.path} is in use by {who} (lock "
                    f"{lock}); wait for it to finish or choose another "
                    f"{self.option}"
                ) from None
            # The file may have been removed (a failed start cleaning up) between open and
            # flock: then this lock guards nothing, try again on the new file.
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError as err:
            os.close(fd)
            raise RunDirError(describe_os_error(err, lock)) from err
        self._lock_fd, self._lock_created = fd, not existed
        return self

    @property
    def held(self) -> bool:
        return self._lock_fd is not None

    def release(self, remove_lock: bool = False) -> None:
        """Drop the lock; `remove_lock` also deletes the lock file (before unlocking, so a
        waiting opener retries on a fresh file)."""
        if self._lock_fd is None:
            return
        if remove_lock or (self._lock_created and not (self.path / MARKER_NAME).exists()):
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None
        if self.created and not (self.path / MARKER_NAME).exists():
            try:
                self.path.rmdir()  # a refused start leaves no empty folder it made
            except OSError:
                pass

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass
