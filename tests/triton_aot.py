"""Compile every Triton kernel ahead of time for sm_90 (H100) with the ptxas bundled in the triton
wheel: no GPU needed. Catches what the interpreter does not check (dot shapes/dtypes, layouts,
shared-memory size) and reports register spills. Run as a script (TRITON_INTERPRET unset);
tests/test_triton_compile.py does so in a subprocess. Prints one line per kernel variant."""
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import fastcluster_cl.kernels  # noqa: E402,F401

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # H100 per-block opt-in maximum
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
F32 = tl.float32


def module(name):
    return sys.modules[f"fastcluster_cl.kernels.{name}"]


def compile_kernel(fn, pointers, constexprs, num_warps=4):
    """Compile with the given pointer element types (other runtime arguments are i32)."""
    signature = {name: ("constexpr" if name in constexprs else
                        f"*{pointers[name]}" if name in pointers else "i32")
                 for name in fn.arg_names}
    kernel = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs), target=TARGET,
                            options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True,
                               text=True).stdout
    regs = next(line.strip() for line in usage.splitlines() if "REG:" in line)
    return kernel.metadata.shared, regs


def variants():
    nt, cc, st, kl = (module(m) for m in ("nt_xent", "cc_cluster", "student_t", "kl"))
    common = dict(ACC=F32, UPCAST=False)
    # bf16 and fp16 inputs both run on the fp16 copy Zs (kernels/nt_xent.py's prologue).
    for ty, prec in (("fp16", "ieee"), ("fp32", "tf32")):
        z = {"Z": ty, "RS": "fp32", "NORMS": "fp32", "DIST": "fp32", "LSE": "fp32", "ROW_LOSS": "fp32",
             "INV_TAU": "fp32", "DZ": "bf16", "GRAD_OUT": "fp32", "G": "fp32",
             "ROW_SUM": "fp32", "COL_SUM": "fp32"}
        for fixed in (True, False):
            yield (f"nt_xent fwd {ty} fixed_shift={fixed}", nt._lse_fwd_kernel, z,
                   dict(FIXED_SHIFT=fixed, PREC=prec, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128,
                        **common), 4)
        yield (f"nt_xent bwd {ty}", nt._grad_kernel, z,
               dict(EPILOGUE=True, FIXED_SHIFT=True, PREC=prec, BLOCK_M=64, BLOCK_N=64,
                    BLOCK_D=128, **common), nt._BWD_WARPS)
    yield ("nt_xent scale_rows bf16", nt._scale_rows_kernel,
           {"Z": "bf16", "ZS": "fp16", "RS": "fp32", "NORMS": "fp32", "DIST": "fp32"},
           dict(TINY=1.1754943508222875e-38, ACC=F32, BLOCK_R=32, BLOCK_D=128), 4)
    yield ("nt_xent symmetric fwd fp16", nt._symmetric_fwd_kernel, z,
           dict(PREC="ieee", BLOCK=64, BLOCK_D=128, **common), 4)
    yield ("nt_xent symmetric bwd fp16", nt._symmetric_grad_kernel, z,
           dict(PREC="ieee", BLOCK=64, BLOCK_D=128, **common), nt._BWD_WARPS)
    logits = {"LA": "bf16", "LB": "bf16", "GRAM": "fp32", "COLSUM": "fp32"}
    yield ("cc stats bf16", cc._stats_kernel, logits,
           dict(ACC=F32, PREC="tf32", BLOCK_M=32, BLOCK_K=cc.MAX_CLUSTERS), 4)
    yield ("cc grad bf16", cc._grad_kernel,
           {"LA": "bf16", "LB": "bf16", "DLA": "bf16", "DLB": "bf16", "M": "fp32", "DC": "fp32"},
           dict(ACC=F32, PREC="tf32", BLOCK_M=32, BLOCK_K=cc.MAX_CLUSTERS), 4)
    h = {"H": "bf16", "MU": "bf16", "Q": "fp32", "ALPHA": "fp32", "DQ": "fp32", "DH": "bf16",
         "G": "fp32"}
    # The launcher's blocks (st._blocks) for K centres: K is tiled, so the tile stays fixed.
    for k in (64, 300, 600, 1000):
        block_k, block_f = st._blocks(k, 128)
        for kern in (st._fwd_kernel, st._bwd_kernel):
            yield (f"student_t {kern.__name__} bf16 K={k}", kern, h,
                   dict(PREC="ieee", BLOCK_M=st._BLOCK_M, BLOCK_K=block_k, BLOCK_F=block_f,
                        **common), 4)
    q = {"Q": "fp32", "PARTIAL": "fp32", "F": "fp32", "OUT": "fp32", "GRAD": "fp32",
         "Q0": "fp32", "QA": "fp32", "QB": "fp32", "DQA": "fp32", "DQB": "fp32"}
    # The launcher's constants (kl._consts) for K clusters: K = 4096 (the limit) is tiled too,
    # and compiles in seconds (one whole row per program took over 15 minutes).
    for k in (128, kl.MAX_CLUSTERS):
        tiny = kl._consts(torch.float32, k)
        warps = tiny.pop("num_warps")
        yield (f"kl colsum K={k}", kl._colsum_kernel, q,
               dict(ACC=F32, BLOCK_M=tiny["BLOCK_M"], BLOCK_K=tiny["BLOCK_K"]), warps)
        for backward in (False, True):
            yield (f"dec backward={backward} K={k}", kl._dec_kernel, q,
                   dict(BACKWARD=backward, **tiny), warps)
            yield (f"anchor backward={backward} K={k}", kl._anchor_kernel, q,
                   dict(BACKWARD=backward, **tiny), warps)
            yield (f"dec+anchor backward={backward} K={k}", kl._dec_anchor_kernel,
                   {**q, "DQ0": "fp32"}, dict(BACKWARD=backward, **tiny), warps)


def main():
    failures = 0
    for name, fn, pointers, constexprs, warps in variants():
        shared, regs = compile_kernel(fn, pointers, constexprs, warps)
        ok = shared <= SHARED_LIMIT
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} {name}: shared {shared} B, {regs}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
