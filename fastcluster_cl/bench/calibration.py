"""Kernels whose H100 times are published, for calibrating the cost model (`model.py`) against
measurements no one here made. Written here in the configuration the published runs used (we do
not vendor Triton's tutorials); each docstring says how it differs.

- `attention_fwd`: the fused-attention forward of Triton's tutorial 06 (online softmax in base
  2 with the scale folded into the exponent, fp16, head dim 128, non-causal), 128 x 64 tiles,
  8 warps, 3 stages: the tutorial's Hopper configuration for D = 128. The tutorial loads
  through tensor descriptors in recent versions; this one loads through pointers.
- `matmul`: a plain `tl.dot` GEMM as tutorials 03 and 09 (`matmul_kernel`): 128 x 256 x 64
  tiles, 8 warps, 3 stages, fp16 in, fp32 accumulation, fp16 out (the tutorials' fp16 Hopper
  configuration), with their grouped tile order.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attention_fwd(
    Q,
    K,
    V,
    OUT,
    seq,
    scale_log2e,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """softmax(Q K^T * scale) V for BLOCK_M query rows of one (batch, head)."""
    base = tl.program_id(1).to(tl.int64) * seq * HEAD_DIM
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + rows[:, None] * HEAD_DIM + dims[None, :])
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, seq, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k = tl.load(K + base + keys[None, :] * HEAD_DIM + dims[:, None])
        s = tl.dot(q, k) * scale_log2e
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        rescale = tl.math.exp2(m - m_new)
        total = total * rescale + tl.sum(p, 1)
        v = tl.load(V + base + keys[:, None] * HEAD_DIM + dims[None, :])
        acc = acc * rescale[:, None] + tl.dot(p.to(tl.float16), v)
        m = m_new
    out = acc / total[:, None]
    tl.store(OUT + base + rows[:, None] * HEAD_DIM + dims[None, :], out.to(tl.float16))


@triton.jit
def matmul(
    A,
    B,
    C,
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C = A B (row-major, sizes multiples of the blocks), tiles in groups of GROUP_M rows."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    size_m = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
    pid_n = (pid % (GROUP_M * tiles_n)) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptr = A + rows[:, None] * K + ks[None, :]
    b_ptr = B + ks[:, None] * N + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(a_ptr), tl.load(b_ptr), acc)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K * N
    tl.store(C + rows[:, None] * N + cols[None, :], acc.to(tl.float16))
