"""Every Triton kernel compiles for sm_90 without a GPU (tests/triton_aot.py, with the ptxas of
the triton wheel) and fits the H100's shared memory. About 25 s of compilation on one core
(less with a warm ~/.triton cache)."""
import os
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_aot.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 33 and all(line.startswith("ok ") for line in lines), done.stdout
