"""The csrc kernels on the CPU (the host emulation of support/csrc_emulation/host_shim.h): their
source, with each `<<<grid, threads, 0, stream>>>` launch rewritten into a call of the emulation
(one std::thread per CUDA thread, real barriers and shuffles, wmma fragments emulated whole), is
built with g++ into a shared library whose extern "C" launchers are called through ctypes.
`EmulatedExtension` offers the binding's functions (csrc/*_binding.cpp) over them on CPU tensors;
the fixtures `csrc_lib` and `emulated` (tests/conftest.py) build it once per session and put it
in place of `cuda_backend.build.extension()`, so that backend="cuda" runs on CPU tensors.

This checks indexing, tiling, masking, barrier placement and the launcher contract without a
GPU; tensor-core rounding and speed still need one (tests marked gpu)."""

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
EMULATION = Path(__file__).resolve().parent / "csrc_emulation"
CUDA_INCLUDE = Path("/usr/local/cuda/include")
LAUNCH = re.compile(r"(\w+(?:<[^<>;]*>)?)<<<(.+?),\s*(\w+),\s*0,\s*stream>>>\((.*?)\);", re.DOTALL)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cuda_include() -> Path | None:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc")
    for home in filter(
        None, [CUDA_HOME, nvcc and Path(nvcc).resolve().parents[1], "/usr/local/cuda"]
    ):
        if Path(home, "include", "cuda_runtime.h").exists():
            return Path(home, "include")
    return None


def rewrite_launches(source: str) -> str:
    """`kernel<T><<<grid, threads, 0, stream>>>(args);` -> an emu::launch of the same call."""
    rewritten, count = LAUNCH.subn(
        lambda m: f"emu::launch(emu::to_dim({m[2]}), {m[3]}, [&] {{ {m[1]}({m[4]}); }});", source
    )
    assert count == source.count("<<<"), "a kernel launch was not rewritten"
    return rewritten


def build_library(out: Path):
    """Compile every csrc/*.cu for the emulation into `out`; the loaded library, or None without
    g++ or the CUDA toolkit headers."""
    gxx, include = shutil.which("g++"), _cuda_include()
    if gxx is None or include is None:
        return None
    objects = []
    for source in sorted(CSRC.glob("*.cu")):
        rewritten = out / f"{source.stem}_host.cu"
        rewritten.write_text(rewrite_launches(source.read_text()))
        obj = out / f"{source.stem}.o"
        cmd = [
            gxx,
            "-std=c++20",
            "-O2",
            "-fPIC",
            "-pthread",
            "-w",
            "-x",
            "c++",
            f'-DFCL_KERNEL_SOURCE="{rewritten}"',
            f"-I{EMULATION}",
            f"-I{CSRC}",
            f"-I{include}",
            "-c",
            str(EMULATION / "harness.cpp"),
            "-o",
            str(obj),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        objects.append(str(obj))
    library = out / "libfcl_emulated.so"
    subprocess.run([gxx, "-shared", "-pthread", "-o", str(library), *objects], check=True)
    return ctypes.CDLL(str(library))


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _nan(*shape):
    return torch.full(shape, float("nan"))


class EmulatedExtension:
    """The binding's functions (csrc/*_binding.cpp) over the emulated launchers, on CPU tensors."""

    multiprocessors = 132  # an H100's SM count drives the automatic column split

    def __init__(self, lib):
        self.lib = lib
        lib.fcl_objective_workspace.restype = ctypes.c_longlong

    def _splits(self, zn, rows, backward, splits):
        if splits >= 1:
            return splits
        m, d = zn.shape
        return self.lib.fcl_nt_xent_splits(
            DTYPE_CODES[zn.dtype], m, d, rows, backward, self.multiprocessors
        )

    def _check(self, err, name):
        assert err == 0, f"{name} returned {err}"

    def normalize(self, z_a, z_b):
        n, d = z_a.shape
        normed = torch.float32 if z_a.dtype == torch.float32 else torch.float16
        zs = torch.empty(2 * n, d, dtype=normed)
        rs, norm, dist = torch.empty(2 * n), torch.empty(2 * n), torch.empty(n)
        self._check(
            self.lib.fcl_nt_xent_normalize(
                DTYPE_CODES[z_a.dtype],
                _ptr(z_a),
                _ptr(z_b),
                n,
                d,
                _ptr(zs),
                _ptr(rs),
                _ptr(norm),
                _ptr(dist),
                None,
            ),
            "normalize",
        )
        return zs, rs, norm, dist

    def lse_rows(self, zn, rs, row_start, row_end, inv_tau, splits=0):
        m, d = zn.shape
        rows = row_end - row_start
        splits = self._splits(zn, rows, 0, splits)
        lse = torch.full((rows,), float("nan"))
        workspace = torch.full((2 * splits * rows,), float("nan"))
        self._check(
            self.lib.fcl_nt_xent_lse(
                DTYPE_CODES[zn.dtype],
                _ptr(zn),
                _ptr(rs),
                m,
                d,
                row_start,
                row_end,
                ctypes.c_float(inv_tau),
                splits,
                _ptr(workspace),
                _ptr(lse),
                None,
            ),
            "lse",
        )
        return lse

    def grad_rows(self, zn, rs, lse, row_loss, row_start, row_end, inv_tau, splits=0, weight=None):
        m, d = zn.shape
        rows = row_end - row_start
        splits = self._splits(zn, rows, 1, splits)
        g = torch.full((rows, d), float("nan"))
        workspace = torch.full((splits * rows * d,), float("nan"))
        self._check(
            self.lib.fcl_nt_xent_grad(
                DTYPE_CODES[zn.dtype],
                _ptr(zn),
                _ptr(rs),
                m,
                d,
                row_start,
                row_end,
                ctypes.c_float(inv_tau),
                _ptr(lse),
                _ptr(row_loss),
                None if weight is None else _ptr(weight),
                splits,
                _ptr(workspace),
                _ptr(g),
                None,
            ),
            "grad",
        )
        return g

    def norm_backward(self, zn, rs, norm, g, row_start, row_end, grad_out, factor, out):
        m, d = zn.shape
        dz = torch.full((row_end - row_start, d), float("nan"), dtype=out)
        self._check(
            self.lib.fcl_nt_xent_norm_backward(
                DTYPE_CODES[zn.dtype],
                _ptr(zn),
                _ptr(rs),
                _ptr(norm),
                _ptr(g),
                m,
                d,
                row_start,
                row_end,
                _ptr(grad_out),
                ctypes.c_float(factor),
                DTYPE_CODES[out],
                _ptr(dz),
                None,
            ),
            "norm_backward",
        )
        return dz

    def bank_forward(self, zs, rs, dist, bank, bank_lo, inv_tau, fixed_shift):
        n, d = zs.shape[0] // 2, zs.shape[1]
        row_loss, row_w = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
        self._check(
            self.lib.fcl_nt_xent_bank_lse(
                DTYPE_CODES[zs.dtype],
                _ptr(zs),
                _ptr(rs),
                _ptr(dist),
                _ptr(bank),
                None if bank_lo is None else _ptr(bank_lo),
                n,
                bank.shape[0],
                d,
                ctypes.c_float(inv_tau),
                int(fixed_shift),
                _ptr(row_loss),
                _ptr(row_w),
                None,
            ),
            "bank_lse",
        )
        return row_loss, row_w

    def bank_backward(
        self, zs, rs, norm, dist, bank, bank_lo, row_w, row_loss, w, inv_tau, fixed_shift, out
    ):
        n, d = zs.shape[0] // 2, zs.shape[1]
        workspace = torch.full((n, d), float("nan"))
        dz_a, dz_b = (torch.full((n, d), float("nan"), dtype=out) for _ in range(2))
        self._check(
            self.lib.fcl_nt_xent_bank_grad(
                DTYPE_CODES[zs.dtype],
                _ptr(zs),
                _ptr(rs),
                _ptr(norm),
                _ptr(dist),
                _ptr(bank),
                None if bank_lo is None else _ptr(bank_lo),
                n,
                bank.shape[0],
                d,
                ctypes.c_float(inv_tau),
                int(fixed_shift),
                _ptr(row_w),
                _ptr(row_loss),
                _ptr(w),
                _ptr(workspace),
                DTYPE_CODES[out],
                _ptr(dz_a),
                _ptr(dz_b),
                None,
            ),
            "bank_grad",
        )
        return dz_a, dz_b

    def student_t_forward(self, h, centers, alpha):
        (n, f), k = h.shape, centers.shape[0]
        q, dist2 = torch.full((n, k), float("nan")), torch.full((n, k), float("nan"))
        self._check(
            self.lib.fcl_student_t(
                DTYPE_CODES[h.dtype],
                _ptr(h),
                _ptr(centers),
                n,
                k,
                f,
                ctypes.c_float(alpha),
                _ptr(q),
                _ptr(dist2),
                None,
            ),
            "student_t",
        )
        return q, dist2

    def student_t_backward(self, h, centers, q, dist2, grad_q, alpha):
        (n, f), k = h.shape, centers.shape[0]
        w = torch.full((n, k), float("nan"))
        dh, dcenters = torch.full_like(h, float("nan")), torch.full_like(centers, float("nan"))
        self._check(
            self.lib.fcl_student_t_backward(
                DTYPE_CODES[h.dtype],
                _ptr(h),
                _ptr(centers),
                _ptr(q),
                _ptr(dist2),
                _ptr(grad_q),
                n,
                k,
                f,
                ctypes.c_float(alpha),
                _ptr(w),
                _ptr(dh),
                _ptr(dcenters),
                None,
            ),
            "student_t_backward",
        )
        return dh, dcenters

    def dec_forward(self, q):
        n, k = q.shape
        f, loss_rows = torch.full((k,), float("nan")), torch.full((n,), float("nan"))
        code = DTYPE_CODES[q.dtype]
        self._check(self.lib.fcl_column_sums(code, _ptr(q), n, k, _ptr(f), None), "column_sums")
        self._check(
            self.lib.fcl_dec_rows(code, _ptr(q), _ptr(f), n, k, _ptr(loss_rows), None), "dec_rows"
        )
        return loss_rows, f

    def dec_backward(self, q, f, grad_out, factor):
        n, k = q.shape
        dq = torch.full_like(q, float("nan"))
        self._check(
            self.lib.fcl_dec_backward(
                DTYPE_CODES[q.dtype],
                _ptr(q),
                _ptr(f),
                n,
                k,
                _ptr(grad_out),
                ctypes.c_float(factor),
                _ptr(dq),
                None,
            ),
            "dec_backward",
        )
        return dq

    def anchor_forward(self, q0, q_a, q_b):
        n, k = q0.shape
        loss_rows = torch.full((n,), float("nan"))
        self._check(
            self.lib.fcl_anchor_rows(
                DTYPE_CODES[q0.dtype], _ptr(q0), _ptr(q_a), _ptr(q_b), n, k, _ptr(loss_rows), None
            ),
            "anchor_rows",
        )
        return loss_rows

    def anchor_backward(self, q0, q_a, q_b, grad_out, factor):
        n, k = q0.shape
        dq_a, dq_b = torch.full_like(q_a, float("nan")), torch.full_like(q_b, float("nan"))
        self._check(
            self.lib.fcl_anchor_backward(
                DTYPE_CODES[q0.dtype],
                _ptr(q0),
                _ptr(q_a),
                _ptr(q_b),
                n,
                k,
                _ptr(grad_out),
                ctypes.c_float(factor),
                _ptr(dq_a),
                _ptr(dq_b),
                None,
            ),
            "anchor_backward",
        )
        return dq_a, dq_b

    # one-pass objectives (csrc/objective.cu)
    def _workspace(self, objective, backward, n, d, k, f=0):
        """A NaN-filled workspace, kept alive until the next call (a temporary passed through
        _ptr would be freed before the launcher runs)."""
        self.workspace = _nan(self.lib.fcl_objective_workspace(objective, backward, n, d, k, f))
        return self.workspace

    def anchor_objective_forward(self, z_a, z_b, h0, h_a, h_b, centers, inv_tau, alpha, *w):
        (n, d), (k, f) = z_a.shape, centers.shape
        rows, assign, col_sums, out = _nan(5, 2 * n), _nan(7, n), _nan(k), _nan(4)
        self._check(
            self.lib.fcl_anchor_objective_forward(
                DTYPE_CODES[z_a.dtype],
                _ptr(z_a),
                _ptr(z_b),
                n,
                d,
                DTYPE_CODES[h0.dtype],
                _ptr(h0),
                _ptr(h_a),
                _ptr(h_b),
                _ptr(centers),
                k,
                f,
                ctypes.c_float(inv_tau),
                ctypes.c_float(alpha),
                *(ctypes.c_float(x) for x in w),
                _ptr(rows),
                _ptr(assign),
                _ptr(col_sums),
                _ptr(self._workspace(0, 0, n, d, k, f)),
                _ptr(out),
                None,
            ),
            "anchor_objective_forward",
        )
        return out, rows, assign, col_sums

    def anchor_objective_backward(
        self, z_a, z_b, h0, h_a, h_b, centers, rows, assign, col_sums, grad, inv_tau, alpha, *w
    ):
        (n, d), (k, f) = z_a.shape, centers.shape
        grads = [torch.full_like(t, float("nan")) for t in (z_a, z_b, h0, h_a, h_b, centers)]
        self._check(
            self.lib.fcl_anchor_objective_backward(
                DTYPE_CODES[z_a.dtype],
                _ptr(z_a),
                _ptr(z_b),
                n,
                d,
                DTYPE_CODES[h0.dtype],
                _ptr(h0),
                _ptr(h_a),
                _ptr(h_b),
                _ptr(centers),
                k,
                f,
                ctypes.c_float(inv_tau),
                ctypes.c_float(alpha),
                *(ctypes.c_float(x) for x in w),
                _ptr(rows),
                _ptr(assign),
                _ptr(col_sums),
                _ptr(grad),
                _ptr(self._workspace(0, 1, n, d, k, f)),
                *(_ptr(g) for g in grads),
                None,
            ),
            "anchor_objective_backward",
        )
        return grads

    def cc_objective_forward(self, z_a, z_b, logits_a, logits_b, inv_tau, inv_tau_c, *w):
        (n, d), k = z_a.shape, logits_a.shape[1]
        rows, row_lse, gram, cluster_rows, out = (
            _nan(5, 2 * n),
            _nan(2, n),
            _nan(2 * k, 2 * k),
            _nan(3, 2 * k),
            _nan(3),
        )
        self._check(
            self.lib.fcl_cc_objective_forward(
                DTYPE_CODES[z_a.dtype],
                _ptr(z_a),
                _ptr(z_b),
                n,
                d,
                DTYPE_CODES[logits_a.dtype],
                _ptr(logits_a),
                _ptr(logits_b),
                k,
                ctypes.c_float(inv_tau),
                ctypes.c_float(inv_tau_c),
                *(ctypes.c_float(x) for x in w),
                _ptr(rows),
                _ptr(row_lse),
                _ptr(gram),
                _ptr(cluster_rows),
                _ptr(self._workspace(1, 0, n, d, k)),
                _ptr(out),
                None,
            ),
            "cc_objective_forward",
        )
        return out, rows, row_lse, gram, cluster_rows

    def cc_objective_backward(
        self,
        z_a,
        z_b,
        logits_a,
        logits_b,
        rows,
        row_lse,
        gram,
        cluster_rows,
        grad,
        inv_tau,
        inv_tau_c,
        *w,
    ):
        (n, d), k = z_a.shape, logits_a.shape[1]
        grads = [torch.full_like(t, float("nan")) for t in (z_a, z_b, logits_a, logits_b)]
        self._check(
            self.lib.fcl_cc_objective_backward(
                DTYPE_CODES[z_a.dtype],
                _ptr(z_a),
                _ptr(z_b),
                n,
                d,
                DTYPE_CODES[logits_a.dtype],
                _ptr(logits_a),
                _ptr(logits_b),
                k,
                ctypes.c_float(inv_tau),
                ctypes.c_float(inv_tau_c),
                *(ctypes.c_float(x) for x in w),
                _ptr(rows),
                _ptr(row_lse),
                _ptr(gram),
                _ptr(cluster_rows),
                _ptr(grad),
                _ptr(self._workspace(1, 1, n, d, k)),
                *(_ptr(g) for g in grads),
                None,
            ),
            "cc_objective_backward",
        )
        return grads
