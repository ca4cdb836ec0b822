"""Run logs: one JSON object per line in ``log.jsonl`` (the record resume and plots read back)
and the same scalars in TensorBoard. Only the main process writes; on other ranks every call is
a no-op, so callers never branch on the rank."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any


class RunLogger:
    """Append events to ``out/log.jsonl`` and scalars to ``out/tensorboard``.

    Each record gets "event" and "time" (unix seconds). `scalars` records go to TensorBoard too,
    under "<event>/<key>" at the record's "step".
    """

    def __init__(self, out: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out) / "log.jsonl"
        self._file = None
        self._writer = None
        if not enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            end_torn_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as err:
            raise_for_write(err, self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(out) / "tensorboard"))

    def log(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        try:
            self._file.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
            self._file.flush()
        except OSError as err:
            raise_for_write(err, self.path)

    def scalars(self, event: str, step: int, **values: float) -> None:
        """A record of numbers at `step`, also written to TensorBoard."""
        self.log(event, step=step, **values)
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{event}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def raise_for_write(err: OSError, path) -> None:
    """Re-raise an OSError met while writing `path` as one that names the path (`str(err)` of
    a failed write or flush often does not) and says plainly what happened."""
    from .rundir import describe_os_error

    raise OSError(err.errno, describe_os_error(err, path), str(path)) from err


def write_text(path: str | Path, text: str) -> None:
    """Write a small output file (config.json, metrics.json) in full or raise an OSError that
    names it."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        raise_for_write(err, path)


def end_torn_line(path: Path) -> None:
    """A log whose last line was cut mid-write (a crash) gets the newline it lacks, so that the
    next record starts a line of its own; the fragment stays, and readers skip it."""
    try:
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def read_log(path: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    """Records of ``log.jsonl`` (all, or one event); a torn line (a crash mid-write) is skipped
    with a warning naming it."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(
                    f"{path}:{number}: skipping a torn line (a write cut short)", stacklevel=2
                )
                continue
            if not isinstance(record, dict):
                warnings.warn(
                    f"{path}:{number}: skipping a line that is not a record", stacklevel=2
                )
                continue
            if event is None or record.get("event") == event:
                records.append(record)
    return records


def last_per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the latest: steps redone after a resume replace the lost ones."""
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]
