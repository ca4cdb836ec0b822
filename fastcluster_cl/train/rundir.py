"""The run directory: one writer at a time, no dead ends after a failed start.

`RunDirLock` holds an exclusive ``fcntl.flock`` on ``<run>/.lock`` for the whole run (the
process's PID is written into it); a second train or resume of the same directory fails at once
with `RunDirBusyError` naming that PID. The kernel drops the lock when the holder exits, however
it exits (SIGKILL included), so a stale lock file never blocks a resume.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

LOCK_NAME = ".lock"
# What a run writes; a start that fails before its first checkpoint removes these again.
RUN_FILES = ("config.json", "log.jsonl", "metrics.json")
RUN_DIRS = ("tensorboard", "plots")


class RunDirError(RuntimeError):
    """The run directory cannot be used (busy, not a directory, not writable)."""


class RunDirBusyError(RunDirError):
    """Another process holds the run directory's lock."""


def describe_os_error(err: OSError, path) -> str:
    """One line for an OSError met while writing `path`."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device while writing {path}"
    if err.errno == errno.EROFS:
        return f"read-only file system: cannot write {path}"
    return f"cannot write {path}: {err.strerror or err}"


class RunDirLock:
    """An exclusive lock on a run directory (created if needed). Not re-entrant; one instance
    per run. `created` tells whether acquire made the directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.created = False
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        import fcntl

        d = self.directory
        if d.exists() and not d.is_dir():
            raise RunDirError(f"run directory {d} exists and is not a directory; choose another "
                              "--out")
        try:
            self.created = not d.exists()
            d.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RunDirError(f"cannot create run directory {d}: a part of the path is a file; "
                              "choose another --out") from None
        except OSError as err:
            raise RunDirError(describe_os_error(err, d)) from err
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise RunDirError(describe_os_error(err, self.path)) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 256, 0).decode(errors="replace").split()
                os.close(fd)
                who = (f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "")
                       if holder else "another process")
                raise RunDirBusyError(f"run directory {d} is in use by {who} (lock {self.path}); "
                                      "wait for it to finish or choose another --out") from None
            # The file may have been removed (a failed start cleaning up) between open and
            # flock: then this lock guards nothing, try again on the new file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
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
            raise RunDirError(describe_os_error(err, self.path)) from err
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, remove: bool = False) -> None:
        """Drop the lock; `remove` also deletes the lock file (before unlocking, so a waiting
        opener retries on a fresh file)."""
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def remove_temporary_checkpoints(directory: Path, name: str = "checkpoint.pt") -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files a killed checkpoint write left (call with the lock
    held: then no other writer can own them)."""
    removed = []
    for tmp in directory.glob(f".{name}.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def remove_run_files(directory: Path) -> None:
    """Delete the files and folders a run writes besides its checkpoint (RUN_FILES, RUN_DIRS)
    and temporary checkpoint files."""
    for name in RUN_FILES:
        (directory / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(directory / name, ignore_errors=True)
    remove_temporary_checkpoints(directory)


def discard_unstarted_run(lock: RunDirLock) -> None:
    """Remove what a start wrote before its first checkpoint (config, log, TensorBoard and plot
    folders, the lock file, the directory itself if the start created it and nothing else is
    in it), so a failed start leaves no run that can neither be resumed nor restarted. Only
    fastcluster_cl's own file names are touched; the lock is released."""
    directory = lock.directory
    remove_run_files(directory)
    lock.release(remove=True)
    if lock.created:
        try:
            directory.rmdir()   # only if empty: files the user put there stay
        except OSError:
            pass
