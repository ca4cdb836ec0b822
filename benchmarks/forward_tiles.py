"""Time NT-Xent's forward rows launch (with its merge where it splits) at its two tile shapes: 64 x
128 on 4 warps (below `TALL_ROWS` rows) against 128 x 64 on 8 warps, 3 stages (from there), whose
repeated loads of the columns' scales the cost model takes to hit L1 (benchmarks/static_notes.md
sections 20 and 23: the 128-row tiles then halve the forward's L2 traffic; this checks that on a
GPU). Medians of triton.testing.do_bench on a GPU; under the Triton interpreter one run each, to
check the script.

    python benchmarks/forward_tiles.py [--rows 8192,65536] [--dim 128]
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

import torch

if not torch.cuda.is_available():  # run the kernels interpreted (set before triton's import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

TILES = {
    "64x128, 4 warps, 2 stages": ((64, 128), 4, 2),
    "128x64, 8 warps, 3 stages": ((128, 64), 8, 3),
}


def time_forward(rows: int, dim: int, device: str) -> dict[str, float]:
    """Milliseconds of the forward rows launch on bf16 Z (rows x dim) at each of `TILES`, after
    checking that each gives the first's row lse (fp32 sums in another order)."""
    import triton.testing

    nt = importlib.import_module("fastcluster_cl.kernels.nt_xent")
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(rows, dim, generator=gen, device=device).to(torch.bfloat16)
    zs, rs, _, dist = nt._scale_rows(*z.chunk(2))
    real = nt.forward_config
    out, first = {}, None
    try:
        for name, (block, warps, stages) in TILES.items():
            config = nt.LaunchConfig((*block, nt.feature_block(dim, "Z")), warps, stages)
            nt.forward_config = lambda d, dtype, rows=0, config=config: config
            run = lambda: nt._lse(zs, rs, dist, 0, rows, 2.0)  # noqa: E731 (tau = 0.5)
            lse = run()[0]
            first = lse if first is None else first
            torch.testing.assert_close(lse, first, rtol=1e-5, atol=1e-5)
            if device == "cuda":
                out[name] = triton.testing.do_bench(run, return_mode="median")
            else:
                start = time.perf_counter()
                run()
                out[name] = (time.perf_counter() - start) * 1e3
    finally:
        nt.forward_config = real
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="8192,65536", help="comma-separated 2N")
    parser.add_argument("--dim", type=int, default=128, help="at most 128 (today's 64 x 128)")
    args = parser.parse_args(argv)
    if not 0 < args.dim <= 128:
        parser.error("--dim must be 1-128: wider rows take other tiles")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for rows in (int(r) for r in args.rows.split(",")):
        times = time_forward(rows, args.dim, device)
        base = next(iter(times.values()))
        for name, ms in times.items():
            print(f"2N = {rows}, D = {args.dim}, {name}: {ms:.3f} ms ({ms / base:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
