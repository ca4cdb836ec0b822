"""Checkpoints: written atomically, loaded with clear errors.

A checkpoint is a dict saved with torch.save: format version, the run's config, model /
optimizer / scheduler / grad-scaler state dicts, every RNG state (python, numpy, torch CPU and
CUDA), and the position (epoch, batch within the epoch, global step). It is written to a
temporary file in the same directory, flushed to disk and renamed over the target, so a crash
mid-write leaves the previous checkpoint intact. Loading uses ``weights_only=True`` (no
arbitrary code from the file). Format 2 stores a SHA-256 of the payload (every tensor's dtype,
shape and bytes, and every other value) under "checksum", verified on load, so a flipped bit in
the tensor data is refused instead of loading silently; format 1 files (no checksum) still load.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: before checksums


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not match the run."""


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer touches, as tensors and plain Python values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointWriteError(CheckpointError):
    """The checkpoint could not be written (disk full, read-only, ...); the previous one, if
    any, is intact."""


class _RecordingWriter:
    """The file object torch.save writes to, remembering the first OSError of a write: torch's
    zip writer turns it into "[enforce fail at inline_container.cc] unexpected pos ..." and
    drops the errno, which this keeps."""

    def __init__(self, f):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self._f.flush()


_ZIP_WRITER_FAILURES = (
    "inline_container",
    "PytorchStreamWriter",
    "unexpected pos",
    "file write failed",
)


def _free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def payload_digest(state: dict[str, Any]) -> str:
    """SHA-256 over a checkpoint's contents, "checksum" excluded: each tensor's key path, dtype,
    shape and raw bytes, and the repr of every other value, in the dict's order (kept by
    torch.save / torch.load)."""
    h = hashlib.sha256()

    def walk(key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
            if t.numel():
                t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
                h.update(t.view(torch.uint8).numpy().data)
        elif isinstance(value, dict):
            for k, v in value.items():
                if key or k != "checksum":
                    walk(f"{key}/{k!r}", v)
        elif isinstance(value, (list, tuple)):
            h.update(f"{key}:seq{len(value)};".encode())
            for i, v in enumerate(value):
                walk(f"{key}[{i}]", v)
        else:
            h.update(f"{key}={value!r};".encode())

    walk("", state)
    return h.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write `state` (plus format version and RNG states) to `path`.

    Raises CheckpointWriteError with one line ("no space left on device while writing <path>"
    on a full disk) when the write fails; the temporary file is removed and the previous
    checkpoint at `path` is left as it was."""
    from .rundir import describe_os_error

    path = Path(path)
    payload = {"format_version": FORMAT_VERSION, "rng": rng_state(), **state}
    payload["checksum"] = {"sha256": payload_digest(payload)}
    writer = tmp = None
    try:
        # created inside the guarded block: an interrupt (SIGINT, SIGTERM as raised by the CLI)
        # at any point below removes it
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(payload, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise CheckpointWriteError(describe_os_error(err, path)) from err
    except RuntimeError as err:
        recorded = writer.error if writer is not None else None
        zip_failure = any(k in str(err) for k in _ZIP_WRITER_FAILURES)
        free = _free_bytes(path.parent) if zip_failure and recorded is None else None
        Path(tmp).unlink(missing_ok=True)
        if recorded is not None:
            raise CheckpointWriteError(describe_os_error(recorded, path)) from err
        if zip_failure:
            if free is not None and free < (1 << 20):
                raise CheckpointWriteError(f"no space left on device while writing {path}") from err
            raise CheckpointWriteError(
                f"cannot write {path}: torch's writer failed ({str(err).splitlines()[0]})"
            ) from err
        raise
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory holding checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        if (path.parent / "log.jsonl").is_file():
            raise CheckpointError(
                f"no checkpoint at {path}: the run in {path.parent} stopped "
                "before its first checkpoint; start it again with --out "
                f"{path.parent}"
            )
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; raise CheckpointError if it is missing, corrupted or of another
    format."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupted or not a "
            f"fastcluster_cl checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not a fastcluster_cl training checkpoint")
    if state["format_version"] not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path} has checkpoint format {state['format_version']}, this "
            f"version reads formats {READABLE_FORMATS}"
        )
    if state["format_version"] >= 2:
        stored = state.get("checksum")
        if not isinstance(stored, dict) or not isinstance(stored.get("sha256"), str):
            raise CheckpointError(
                f"{path} has no checksum; it is corrupted or not a fastcluster_cl checkpoint"
            )
        if payload_digest(state) != stored["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} fails its checksum: its contents changed "
                "after it was written (a flipped bit, a partial copy); "
                "restore it or start the run again"
            )
    missing = [k for k in ("config", "model", "position") if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it is not a complete training checkpoint")
    config = state["config"]
    if isinstance(config, dict) and "centre_warmup_epochs" in config:  # version 0.1.0's name
        config["center_warmup_epochs"] = config.pop("centre_warmup_epochs")
    return state
