"""A restricted unpickler for data files (CIFAR-10/100 batches): it rebuilds dicts, lists,
tuples, str/bytes, numbers, numpy arrays and scalars of plain dtypes, and refuses every other
global, so a crafted file cannot run code (`pickle.load` calls whatever callable a file names).

Every pickle the project reads goes through `load`; anything else in a file raises
`UnsafePickleError` naming the file and the refused global.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

# Kinds of numpy dtype a data file may hold: bool, signed / unsigned int, float, complex, bytes,
# str. Object arrays (kind "O") and structured dtypes are refused.
PLAIN_KINDS = frozenset("biufcSU")


class UnsafePickleError(ValueError):
    """A pickle that names a global outside the allow-list, or holds a non-plain value."""


def _allowed_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> object for what numpy's array pickles need, under the module names of
    numpy 1 (numpy.core) and numpy 2 (numpy._core), whichever wrote the file."""
    import codecs

    sample = np.zeros(1, dtype=np.uint8)
    reconstruct = sample.__reduce__()[0]  # multiarray._reconstruct (protocols <= 4)
    frombuffer = sample.__reduce_ex__(5)[0]  # numeric._frombuffer (protocol 5)
    real_scalar = np.int64(0).__reduce__()[0]  # multiarray.scalar: numpy scalars

    def scalar(dtype, *args):
        if not isinstance(dtype, np.dtype) or dtype.kind not in PLAIN_KINDS:
            raise UnsafePickleError(f"refusing a numpy scalar of dtype {dtype}")
        return real_scalar(dtype, *args)

    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


_ALLOWED = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class resolves only the allow-list above."""

    def __init__(self, file, *, source: str, **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refusing to load {module}.{name} from this pickle; a data "
                "file may hold only dicts, lists, strings, numbers and numpy arrays"
            ) from None


def _check_plain(value, source: str, depth: int = 0) -> None:
    """Refuse anything but plain containers, scalars and plain-dtype arrays."""
    if depth > 64:
        raise UnsafePickleError(f"{source}: nested deeper than 64 levels")
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.kind not in PLAIN_KINDS or value.dtype.fields is not None:
            raise UnsafePickleError(
                f"{source}: holds a numpy value of dtype {value.dtype}; "
                "only plain numeric, bytes and str arrays are read"
            )
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_plain(k, source, depth + 1)
            _check_plain(v, source, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_plain(v, source, depth + 1)
    elif value is not None and not isinstance(
        value, (str, bytes, bytearray, bool, int, float, complex)
    ):
        raise UnsafePickleError(
            f"{source}: holds a {type(value).__name__}; a data file may "
            "hold only dicts, lists, strings, numbers and numpy arrays"
        )


def loads(data: bytes, source: str = "<bytes>", encoding: str = "bytes"):
    """Unpickle `data` with the restricted unpickler; errors name `source`."""
    try:
        value = RestrictedUnpickler(io.BytesIO(data), source=source, encoding=encoding).load()
    except UnsafePickleError as err:
        if str(err).startswith(source):
            raise
        raise UnsafePickleError(f"{source}: {err}") from None
    except Exception as err:  # EOFError, UnpicklingError, ValueError, ... from a broken file
        detail = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"{source}: cannot unpickle it, the file is truncated or corrupted "
            f"({type(err).__name__}{': ' + detail if detail else ''})"
        ) from err
    _check_plain(value, source)
    return value


def load(path: str | Path, encoding: str = "bytes"):
    """Read the pickle file `path` with the restricted unpickler (`encoding` as in
    pickle.load: "bytes" keeps Python 2 str as bytes, as CIFAR's files need)."""
    path = Path(path)
    return loads(path.read_bytes(), source=str(path), encoding=encoding)
