"""Compile every csrc/*.cu for Hopper (sm_90a) and Ampere (sm_80) and syntax-check the torch
binding, so a syntax or type error in the CUDA twin fails CI on machines without a GPU.
Nothing runs here; skipped where nvcc (or g++) is missing."""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from fastcluster_cl.bench.cuda_twin import nvcc as _nvcc  # CUDA_HOME / CUDA_PATH, then PATH

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = {"sm_90a": "arch=compute_90a,code=sm_90a", "sm_80": "arch=compute_80,code=sm_80"}


def _cuda_include(nvcc: str) -> Path | None:
    """The toolkit's include directory (nvcc may be a wrapper script outside the toolkit)."""
    candidates = [os.environ.get("CUDA_HOME"), Path(nvcc).resolve().parents[1], "/usr/local/cuda"]
    for home in filter(None, candidates):
        if Path(home, "include", "cuda_runtime_api.h").exists():
            return Path(home, "include")
    return None


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"


def test_csrc_has_cuda_sources():
    assert {"nt_xent.cu", "cluster.cu", "objective.cu"} <= {p.name for p in CU_FILES}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles(source, arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    # torch's own nvcc flags (no implicit half/bfloat16 conversions), as the JIT build uses them
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    _run(
        [
            nvcc,
            f"-gencode={ARCHS[arch]}",
            "-O3",
            "-Werror=all-warnings",
            *COMMON_NVCC_FLAGS,
            "-c",
            str(source),
            "-o",
            str(tmp_path / f"{source.stem}_{arch}.o"),
        ]
    )


def test_bindings_syntax(tmp_path):
    """g++ -fsyntax-only of the torch binding files against torch's headers, as cpp_extension
    compiles them: in one translation unit that includes each (parsing torch's headers once,
    ~23 s on 2 cores, was ~26 s a file). They share binding.h and nothing file-local collides.
    What one file uses but an earlier one declares (an include, a helper of its anonymous
    namespace: one namespace here) would pass here and fail the real per-file build.

    CPU builds of torch ship the c10/cuda headers without the generated cuda_cmake_macros.h;
    an empty stand-in (searched last) is enough for a syntax check."""
    nvcc, gxx = _nvcc(), shutil.which("g++")
    cuda_include = _cuda_include(nvcc) if nvcc else None
    if cuda_include is None or gxx is None:
        pytest.skip("needs the CUDA toolkit headers and g++")
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    bindings = sorted(CSRC.glob("*binding.cpp"))
    assert len(bindings) >= 5
    unit = tmp_path / "bindings.cpp"
    unit.write_text("".join(f'#include "{path}"\n' for path in bindings))
    includes = [*include_paths(), sysconfig.get_paths()["include"], cuda_include, tmp_path]
    _run(
        [
            gxx,
            "-std=c++20",
            "-fsyntax-only",
            "-DTORCH_EXTENSION_NAME=fcl_syntax_check",
            *(f"-I{p}" for p in includes),
            str(unit),
        ]
    )
