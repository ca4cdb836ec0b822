"""The backends the op tests (ops/test_op_*.py) are parametrised over.

- "torch", "chunked": on CPU;
- "triton": the kernels, under TRITON_INTERPRET=1 without a GPU (tests/conftest.py);
- "cuda-emulated": backend="cuda" with the csrc kernels run on the CPU by the host emulation
  (support/emulation.py, fixture `emulated`);
- "cuda": backend="cuda" on a GPU (marked gpu: skipped without one).

`cases({backend: [case, ...]})` turns per-backend case lists into pytest parameters
(backend, *case): the slow paths (interpreter, emulation) keep their own, smaller lists.
`prepare(request, backend)` readies one and returns (the backend= name, the device);
`gradcheck(request, backend, loss, shapes, seed)` runs torch.autograd.gradcheck on it."""

import pytest
import torch

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)


def cases(table: dict) -> list:
    params = []
    for backend, rows in table.items():
        marks = [pytest.mark.gpu] if backend == "cuda" else []
        for row in rows:
            row = row if isinstance(row, tuple) else (row,)
            params.append(
                pytest.param(backend, *row, marks=marks, id="-".join([backend, *map(_id, row)]))
            )
    return params


def prepare(request, backend: str) -> tuple[str, str]:
    """(backend name for the functional API, device) for a parametrised backend."""
    if backend == "triton":
        pytest.importorskip("triton")
        return "triton", TRITON_DEVICE
    if backend == "cuda-emulated":
        request.getfixturevalue("emulated")
        return "cuda", "cpu"
    if backend == "cuda":
        return "cuda", "cuda"
    return backend, "cpu"


def gradcheck(request, backend: str, loss, shapes, seed: int) -> None:
    """torch.autograd.gradcheck of loss(*inputs, backend=name) on `backend`, the inputs float64
    standard normal of the given shapes drawn from `seed`."""
    name, device = prepare(request, backend)
    gen = torch.Generator().manual_seed(seed)
    inputs = [
        torch.randn(*shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()
        for shape in shapes
    ]
    assert torch.autograd.gradcheck(lambda *x: loss(*x, backend=name), inputs)
