#!/usr/bin/env bash
# Everything that still needs a GPU, in one call on a lent H100/H200 (the device tool runs this
# from the repository root; results land under $OUT). Stages, each under the tool's 10 minutes:
#   tests     the gpu-marked tests and the Triton kernels compiled for the card (no interpreter)
#   sanitize  compute-sanitizer memcheck + racecheck over the CUDA backend's gpu tests (small shapes)
#   bench     the runner: nt_xent bf16, 2N 4096..65536, D 128/256, torch / torch-compile /
#             triton / cuda, with the matmul ceiling; JSON + PNG for benchmarks/results/
# Usage: bash benchmarks/gpu_check.sh [tests|sanitize|bench ...]   (default: tests; one stage a call fits the 10 minutes)
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/device.txt"
# The image has torch, triton and the test tools but no registry: install this tree alone.
python3 -m pip install --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { tail -20 "$OUT/install.log"; exit 1; }
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

status=0
for stage in "${stages[@]}"; do
  echo "== $stage"
  case $stage in
    tests)
      python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" \
          tests/test_cuda_backend.py tests/test_triton_kernels.py tests/test_losses.py \
          tests/test_modules.py tests/test_compile.py \
          --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1 || status=1
      tail -25 "$OUT/tests.log" ;;
    sanitize)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -m pytest -q -x \
            -p no:cacheprovider -m gpu tests/test_cuda_backend.py \
            >"$OUT/sanitize-$tool.log" 2>&1 || status=1
        tail -5 "$OUT/sanitize-$tool.log"
      done ;;
    bench)
      python3 -m fastcluster_cl.bench --device cuda --dtype bfloat16 --dims 128,256 \
          --sizes 4096,16384,65536 --backends torch,torch-compile,triton,cuda \
          --out "$OUT/results" >"$OUT/bench.log" 2>&1 || status=1
      tail -45 "$OUT/bench.log" ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
exit $status
