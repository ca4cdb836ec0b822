"""Shared setup of the pytest-benchmark suites (run with `pytest --benchmark-only benchmarks/`).

Everything measured here comes from `fastcluster_cl.bench` (inputs, implementations, floors,
peak memory), so the suites and the `fastcluster-cl bench` runner time the same calls. The
Triton interpreter is never enabled here: GPU-only backends skip on CPU.
"""

import pytest
import torch

from fastcluster_cl.bench import runner as bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Batch sizes 2N by tier: the tier name is in every test id, so `-k small` selects the quick set.
SIZES = {
    "cpu": {"small": 256, "medium": 1024, "large": 4096},
    "cuda": {"small": 1024, "medium": 8192, "large": 32768},
}[DEVICE.type]
DTYPES = ("float32", "bfloat16") + (("float16",) if DEVICE.type == "cuda" else ())


@pytest.fixture
def run_case(benchmark):
    """Benchmark `impl` on `case`: record peak memory and floors in extra_info, time the call
    (synchronised on CUDA) with pytest-benchmark, then add the achieved TFLOP/s and GB/s."""

    def run(case: bench.Case, impl: str) -> None:
        try:
            fn = bench.resolve_impl(impl, case.op, DEVICE)
        except bench.Skip as why:
            pytest.skip(str(why))
        inputs = [bench.make_inputs(case, DEVICE, seed) for seed in range(bench.ROTATE)]
        step = bench.make_step(fn, inputs, case.backward)
        if DEVICE.type == "cuda":
            inner, step = step, lambda: (inner(), torch.cuda.synchronize())
        with bench.value_checks(False):
            try:
                step()  # compile / warm up outside the timing
                peak = bench.peak_memory(step, DEVICE)
            except torch.OutOfMemoryError:
                pytest.skip(f"{impl} runs out of memory on {case.label}")
            floors = bench.floor(case)
            benchmark.extra_info.update(
                case=case.label,
                impl=impl,
                device=str(DEVICE),
                peak_bytes=int(peak),
                **floors,
                device_name=bench.machine(DEVICE)["device_name"],
            )
            benchmark(step)
        if benchmark.stats is not None:  # None under --benchmark-disable
            median = benchmark.stats.stats.median
            benchmark.extra_info.update(
                tflops=floors["flops"] / median / 1e12, gbps=floors["bytes"] / median / 1e9
            )

    return run
