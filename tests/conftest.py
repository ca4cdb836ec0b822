"""Test setup: without CUDA, Triton kernels run under the interpreter (docs/design.md). The variable
must be set before any kernel module is imported, hence here at collection time."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def csrc_lib(tmp_path_factory):
    """The csrc kernels built for the host emulation (support/emulation.py), once per session."""
    from emulation import build_library

    lib = build_library(tmp_path_factory.mktemp("csrc_emulation"))
    if lib is None:
        pytest.skip("needs g++ and the CUDA toolkit headers")
    return lib


@pytest.fixture
def emulated(csrc_lib, monkeypatch):
    """backend="cuda" on CPU tensors: the emulated kernels in place of the compiled extension."""
    from emulation import EmulatedExtension

    from fastcluster_cl.backends import cuda as cuda_backend
    from fastcluster_cl.backends import dispatch

    ext = EmulatedExtension(csrc_lib)
    monkeypatch.setattr(cuda_backend.build, "extension", lambda: ext)
    monkeypatch.setattr(cuda_backend.build, "require_device", lambda device: None)
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(dispatch, "_RESOLVED", {})  # the functional API then finds it too
    return ext
