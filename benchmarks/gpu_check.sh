#!/usr/bin/env bash
# Everything that still needs a GPU, in one call on a lent H100/H200 (the device tool runs this
# from the repository root; results land under $OUT). Stages, each under the tool's 10 minutes:
#   tests     the gpu-marked tests and the Triton kernels compiled for the card (no interpreter)
#   sanitize  compute-sanitizer memcheck + racecheck over the CUDA backend's gpu tests (small shapes)
#   bench     the runner: nt_xent bf16, 2N 4096..65536, D 128/256, torch / torch-compile /
#             triton / cuda, with the matmul ceiling; JSON + PNG for benchmarks/results/, and
#             the static sm_90a report beside it (compare measured TFLOP/s with issue_ceiling)
#   objective the one-pass objectives against the separate ops (triton-separate) and the torch
#             reference: bf16, 2N 512/4096/65536, D 128, K 10/100 (cc: 10/64), fwd and fwd+bwd
#   model     the cost model's table measured beside its predictions (model-h100.json): NT-Xent
#             bf16, N 256..32768 pairs (2N 512..65536), D 128/256, torch, triton and the CUDA
#             twin (its rows need nvcc; the 8-rank gathered rows need 8 GPUs), D 2048 up to
#             N 4096 (torch, triton: the wide rows' slab backward); the cc
#             objective at D 128, K 10/20/100/200/1000, auto (one pass where K <= 64 and N <=
#             768 pairs, else the separate Triton ops: above K = 64 Q from one Triton pass, its
#             Gram from cuBLAS and the row-tiled epilogue), the separate Triton ops and torch
#   anchor    the model's anchor rows measured: D 128, F 512/2048, K 10/100/1000, fp32 centres
#             (--features), auto, torch and the one-pass Triton kernels
#   tiles     NT-Xent's forward at 64 x 128 (4 warps) against 128 x 64 (8 warps, 3 stages: from
#             2N = 4096), 2N 8192 and 65536 (benchmarks/forward_tiles.py; static_notes.md
#             sections 20 and 23: whether the 128-row tiles' repeated scale loads hit L1)
#   dali      the DALI pipeline tests on the GPU (device_id=0)
#   train     a short `fastcluster-cl train` on CUDA with bf16 AMP and --compile; images/s
# Usage: bash benchmarks/gpu_check.sh [tests|sanitize|bench|objective|model|anchor|tiles|dali|train ...]   (default: tests; one stage a call fits the 10 minutes)
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
          tests/ops/test_op_*.py tests/backends/test_cuda_backend.py tests/backends/test_triton_kernels.py \
          tests/ops/test_losses.py tests/ops/test_nt_xent_bank.py \
          tests/ops/test_modules.py tests/ops/test_compile.py tests/backends/test_triton_objectives.py \
          tests/backends/test_cuda_objectives.py tests/backends/test_parts_product.py \
          tests/backends/test_cc_cluster_tiled.py tests/bench/test_forward_tiles.py \
          --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1 || status=1
      tail -25 "$OUT/tests.log" ;;
    sanitize)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -m pytest -q -x \
            -p no:cacheprovider -m gpu tests/backends/test_cuda_backend.py \
            >"$OUT/sanitize-$tool.log" 2>&1 || status=1
        tail -5 "$OUT/sanitize-$tool.log"
      done ;;
    bench)
      python3 -m fastcluster_cl.bench --device cuda --dtype bfloat16 --dims 128,256 \
          --sizes 4096,16384,65536 --backends torch,torch-compile,triton,cuda \
          --out "$OUT/results" >"$OUT/bench.log" 2>&1 || status=1
      tail -45 "$OUT/bench.log"
      env -u TRITON_INTERPRET python3 -m fastcluster_cl.bench static \
          --json "$OUT/results/static-sm90a.json" >"$OUT/static.log" 2>&1 || status=1
      tail -30 "$OUT/static.log" ;;
    objective)
      # cc's Triton kernels take K <= 64: its second K is 64
      for op_ks in anchor_objective:10,100 cc_objective:10,64; do
        python3 -m fastcluster_cl.bench --device cuda --dtype bfloat16 --dims 128 \
            --ops "${op_ks%%:*}" --ks "${op_ks#*:}" --sizes 512,4096,65536 \
            --backends torch,triton,triton-separate,cuda,cuda-separate \
            --out "$OUT/results" >>"$OUT/objective.log" 2>&1 || status=1
      done
      tail -60 "$OUT/objective.log" ;;
    model)
      python3 -m fastcluster_cl.bench --device cuda --dtype bfloat16 --dims 128,256 \
          --sizes 512,2048,8192,65536 --modes fwd+bwd --backends torch,triton,cuda \
          --out "$OUT/results" >"$OUT/model.log" 2>&1 || status=1
      python3 -m fastcluster_cl.bench --device cuda --dtype bfloat16 --dims 2048 \
          --sizes 512,2048,8192 --modes fwd+bwd --backends torch,triton \
          --out "$OUT/results" >>"$OUT/model.log" 2>&1 || status=1
      python3 -m fastcluster_cl.bench --device cuda --dtype bfloat16 --ops cc_objective \
          --dims 128 --ks 10,20,100,200,1000 --sizes 512,8192,65536 --modes fwd+bwd \
          --backends auto,torch,triton-separate --out "$OUT/results" >>"$OUT/model.log" 2>&1 \
          || status=1
      env -u TRITON_INTERPRET python3 -m fastcluster_cl.bench model \
          --json "$OUT/results/model-h100.json" >>"$OUT/model.log" 2>&1 || status=1
      tail -40 "$OUT/model.log" ;;
    anchor)
      # the model table's anchor rows: D = 128, F = 512 / 2048, K = 10 / 100 / 1000, fp32 centres
      python3 -m fastcluster_cl.bench --device cuda --dtype bfloat16 --ops anchor_objective \
          --dims 128 --features 512,2048 --ks 10,100,1000 --sizes 512,2048,8192,65536 \
          --modes fwd+bwd --backends auto,torch,triton \
          --out "$OUT/results" >"$OUT/anchor.log" 2>&1 || status=1
      tail -40 "$OUT/anchor.log" ;;
    tiles)
      python3 benchmarks/forward_tiles.py --rows 8192,65536 --dim 128 >"$OUT/tiles.log" 2>&1 \
          || status=1
      tail -8 "$OUT/tiles.log" ;;
    dali)
      python3 -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/data/test_data_dali.py \
          >"$OUT/dali.log" 2>&1 || status=1
      tail -15 "$OUT/dali.log" ;;
    train)
      # The embedded digits at the CIFAR-sized ResNet-18 would be too small to time: CIFAR-like
      # random images are not available offline, so the digits at 32 px with a ResNet-18.
      fastcluster-cl train --out "$OUT/train-run" --device cuda --amp bf16 --compile \
          --method cc --epochs 3 --batch-size 256 --image-size 32 --backbone resnet18 \
          --no-plots >"$OUT/train.log" 2>&1 || status=1
      tail -15 "$OUT/train.log"
      python3 - "$OUT/train-run/log.jsonl" <<'PY' | tee "$OUT/train-throughput.txt"
import json, statistics, sys
steps = [r for r in map(json.loads, open(sys.argv[1])) if "images_per_s" in r]
rates = [r["images_per_s"] for r in steps[len(steps) // 3:]]  # after compile and warm-up
print(f"images/s median {statistics.median(rates):.0f} over {len(rates)} steps" if rates
      else "no step records")
PY
      ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
exit $status
