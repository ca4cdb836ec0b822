// Fused NT-Xent forward and backward (the CUDA C++ twin of the Triton kernel).
//
// Zs (m x d) is [z_a; z_b] with each row scaled by the exact power of two that puts its largest
// |element| in [1, 2), with rs = 1 / max(||zs_i||, eps p_i), so that zn = zs rs exactly: rows of
// any finite magnitude are safe. It is stored as fp16 for fp16 and bf16 inputs (the same values
// but for elements below 2^-14 of the row's largest, fp16 subnormals, and 2^-24, flushed; fp16's
// 11-bit mantissa for the tensor-core tile weights) and as fp32 for fp32 inputs. A block owns
// BM = 64 rows and sweeps all m columns in tiles of BN = 64: each tile Zs_rows Zs_cols^T is
// accumulated in fp32 (wmma tensor cores for float16/bfloat16, an 8x4-per-thread SIMT product
// for float32) into shared memory, then consumed at once, so no m x m buffer ever exists.
//   forward  (lse_kernel):  online log-sum-exp of each row over its negatives k != i, pos(i), in
//            base 2; the host finishes each row from the positive's 1 - cos (normalize_kernel)
//            without cancellation: loss_i = softplus(lse_neg_i - S_i,pos(i)).
//   backward (grad_kernel): A_ij = P_ij + P_ji = exp(S_ij - lse_i) + exp(S_ij - lse_j) from the
//            saved lse (S is symmetric) -- with per-row loss weights c (reduction="none",
//            |c| <= 1: the incoming gradients over their largest magnitude, so that the
//            weight bound below holds) A_ij = c_i P_ij + c_j P_ji and the positive's
//            c_i (P_i,pos - 1) + c_pos (P_pos,i - 1) --
//            saved lse (S is symmetric), and for the positive pair A - 2 = expm1(-loss_i) +
//            expm1(-loss_pos(i)) (A is ~2 there for correlated views at small tau: subtracting
//            2 zn_pos after the rounded product cancelled catastrophically). The weights are
//            scaled before their rounding by the power of two `weight_scale` of their bound
//            2 min(max loss, 1) (each block reduces the m losses): no fp16 overflow, the ~1/m
//            weights of large batches clear of the subnormals, and those of nearly solved
//            batches too (a fixed 2^14 flushed them), then
//            G += (A diag(rs_cols)) Zs_cols[:, d0:d0+BD]; grid.y splits the features so that
//            the G accumulator stays in registers. One writer per output row: no atomics.
// Column splits (grid.z): when the row blocks alone cannot fill the GPU, each block sweeps only
// its share of the column tiles and writes a partial result to a workspace (per-row max and sum,
// or a partial G); merge_lse_kernel / sum_splits_kernel combine the splits in a fixed order.
// The small kernels normalize_kernel and norm_backward_kernel handle the row scaling, the
// positive pair's 1 - cos, the final scaling and the normalisation's backward. See fcl_kernels.h
// for the launcher contract.
#include <mma.h>
#include <stdint.h>

#include <type_traits>

#include "common.cuh"
#include "tiles.cuh"

namespace {

using namespace nvcuda;
using fcl::block_max;
using fcl::blocks_for;
using fcl::dispatch;
using fcl::from_float;
using fcl::kFullMask;
using fcl::kLn2;
using fcl::kLog2e;
using fcl::kNormEps;
using fcl::lse2_add;
using fcl::lse2_merge;
using fcl::row_scale;
using fcl::sum_splits_kernel;
using fcl::to_float;
using fcl::warp_max;
using fcl::warp_sum;
using fcl::weight_scale;
using namespace fcl::tiles;

__device__ __forceinline__ int positive_of(int i, int m) {
  return i < m / 2 ? i + m / 2 : i - m / 2;
}

// Epilogue thread mapping shared by both kernels: thread t reads row t / 2 of the tile and the
// interleaved columns 2c + t % 2 (c < BN / 2); the two threads of a row are adjacent lanes.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lse_kernel(const T* __restrict__ zs, const float* __restrict__ rs, int m, int d,
               int row_start, int row_end, float scale2, int cols_per_split,
               float* __restrict__ lse, float2* __restrict__ partial) {
  using Tr = Tile<T>;
  __shared__ __align__(128) unsigned char smem[Tr::kBytes];
  const float* Ss = reinterpret_cast<const float*>(smem + Tr::kSOffset);
  float* rs_col = reinterpret_cast<float*>(smem + Tr::kRsOffset);
  const int r0 = row_start + blockIdx.x * BM;
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int i = r0 + r;
  const int pos = positive_of(i, m);
  const float q_i = i < row_end ? rs[i] * scale2 : 0.f;
  const int c_begin = blockIdx.z * cols_per_split;
  const int c_end = m < c_begin + cols_per_split ? m : c_begin + cols_per_split;
  // Running max and sum of 2^x over this thread's columns, x = S * log2(e) (base-2 lse).
  float run_max = -INFINITY, run_sum = 0.f;
  for (int c0 = c_begin; c0 < c_end; c0 += BN) {
    for (int e = threadIdx.x; e < BN; e += kThreads) rs_col[e] = c0 + e < m ? rs[c0 + e] : 0.f;
    // score_tile's closing barrier publishes rs_col
    score_tile<T>(zs, row_end, r0, zs, nullptr, m, c0, d, smem);
    float x[BN / 2];
#pragma unroll
    for (int c = 0; c < BN / 2; ++c) {
      const int col = 2 * c + half, j = c0 + col;
      x[c] = (j < m && j != i && j != pos) ? Ss[r * Tr::LDS + col] * q_i * rs_col[col]
                                           : -INFINITY;
    }
    lse2_add(x, run_max, run_sum);
    __syncthreads();  // the next tile overwrites Ss
  }
  // Merge the two halves of the row. Over all columns (one split) max is finite since m >= 2;
  // a split may hold no column of a row (only its diagonal): max -inf, sum 0.
  const float other_max = __shfl_xor_sync(kFullMask, run_max, 1);
  const float other_sum = __shfl_xor_sync(kFullMask, run_sum, 1);
  if (half == 0 && i < row_end) {
    float mx = run_max, total = run_sum;
    lse2_merge(mx, total, other_max, other_sum);
    if (gridDim.z == 1) {
      lse[i - row_start] = (mx + log2f(total)) * kLn2;
    } else {
      const int64_t at = (int64_t)blockIdx.z * (row_end - row_start) + (i - row_start);
      partial[at] = make_float2(mx, total);
    }
  }
}

// lse of each row from the (max, sum) of its column splits, in base 2, combined in split order.
__global__ void __launch_bounds__(kThreads)
    merge_lse_kernel(const float2* __restrict__ partial, int rows, int splits,
                     float* __restrict__ lse) {
  const int r = blockIdx.x * kThreads + threadIdx.x;
  if (r >= rows) return;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, partial[(int64_t)s * rows + r].x);
  float total = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float2 p = partial[(int64_t)s * rows + r];
    total += p.y * exp2f(p.x - mx);  // p.x = -inf comes with p.y = 0
  }
  lse[r] = (mx + log2f(total)) * kLn2;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const T* __restrict__ zs, const float* __restrict__ rs, int m, int d,
                int row_start, int row_end, float scale2, const float* __restrict__ lse_full,
                const float* __restrict__ loss_full, const float* __restrict__ weight_full,
                int cols_per_split, float* __restrict__ g_splits) {
  using Tr = Tile<T>;
  constexpr int BD = Tr::BD;
  __shared__ __align__(128) unsigned char smem[Tr::kBytes];
  float* Ss = reinterpret_cast<float*>(smem + Tr::kSOffset);
  T* Ps = Tr::kTensorCores ? reinterpret_cast<T*>(smem) : reinterpret_cast<T*>(Ss);
  T* Zd = reinterpret_cast<T*>(smem + Tr::kZOffset);
  float* lse_col = reinterpret_cast<float*>(smem + Tr::kLseOffset);
  float* rs_col = reinterpret_cast<float*>(smem + Tr::kRsOffset);
  __shared__ float c_col[BN];
  const int r0 = row_start + blockIdx.x * BM;
  const int d0 = blockIdx.y * BD;
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int i = r0 + r;
  const float lse_i = i < row_end ? lse_full[i] * kLog2e : 0.f;
  const float q_i = i < row_end ? rs[i] * scale2 : 0.f;
  const int pos = positive_of(i, m);
  // Row i's loss weight c_i (per-row gradients, |c| <= 1; 1 for the mean's).
  const float c_i = weight_full != nullptr && i < row_end ? weight_full[i] : 1.f;
  const float pos_i = i < row_end ? c_i * expm1f(-loss_full[i]) : 0.f;  // c_i (P_i,pos(i) - 1)
  // |A_ij| <= m_i + m_j, m = 1 - e^-loss <= min(loss, 1) (|c| <= 1): the tile weights' scale
  __shared__ float red[kWarps];
  const float scale = weight_scale(2.f * fminf(block_max<kWarps>(loss_full, m, red), 1.f));

  GradAccumulator<T> acc;  // G (BM x BD), registers

  const int c_begin = blockIdx.z * cols_per_split;
  const int c_end = m < c_begin + cols_per_split ? m : c_begin + cols_per_split;
  // This split's (row_end - row_start) x d slice of the output (the output itself when unsplit).
  float* g = g_splits + (int64_t)blockIdx.z * (row_end - row_start) * d;
  for (int c0 = c_begin; c0 < c_end; c0 += BN) {
    score_tile<T>(zs, row_end, r0, zs, nullptr, m, c0, d, smem);
    load_tile<T, BD, Tr::LDZ>(Zd, zs, d, c0, m, d0);
    for (int e = threadIdx.x; e < BN; e += kThreads) {
      lse_col[e] = c0 + e < m ? lse_full[c0 + e] * kLog2e : 0.f;
      rs_col[e] = c0 + e < m ? rs[c0 + e] : 0.f;
      c_col[e] = weight_full != nullptr && c0 + e < m ? weight_full[c0 + e] : 1.f;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < BN / 2; ++c) {
      const int col = 2 * c + half, j = c0 + col;
      float a = 0.f;
      if (i < row_end && j < m && j != i) {
        if (j == pos) {
          a = pos_i + c_col[col] * expm1f(-loss_full[j]);
        } else {
          const float x = Ss[r * Tr::LDS + col] * q_i * rs_col[col];
          a = c_i * exp2f(x - lse_i) + c_col[col] * exp2f(x - lse_col[col]);
        }
      }
      // A zn_J = (A diag(rs_J)) zs_J; fp32: the same element it just read.
      Ps[r * Tr::LDP + col] = from_float<T>(a * rs_col[col] * scale);
    }
    __syncthreads();
    acc.add(Ps, Zd);
    __syncthreads();  // the next tile overwrites Ps, Zd, Ss
  }

  acc.store(g, smem, r0, row_start, row_end, d0, d, 1.f / scale);
}

// One warp per pair i: rows z_a[i], z_b[i] scaled by their exact powers of two into zs (type
// TO; zs_i rs_i = z_i / max(||z_i||, eps)), rs, the clamped norms, and dist[i] = 1 - zn[i] .
// zn[n + i], computed as ||zn_a - zn_b||^2 / 2 (no cancellation for correlated views) when both
// rows are unit, i.e. not clamped by eps.
template <typename T, typename TO>
__global__ void __launch_bounds__(kThreads)
    normalize_kernel(const T* __restrict__ z_a, const T* __restrict__ z_b, int n, int d,
                     TO* __restrict__ zs, float* __restrict__ rs, float* __restrict__ norm,
                     float* __restrict__ dist) {
  const int i = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (i >= n) return;  // whole warp
  const T* a = z_a + (int64_t)i * d;
  const T* b = z_b + (int64_t)i * d;
  float ma = 0.f, mb = 0.f;
  for (int k = lane; k < d; k += 32) {
    ma = fmaxf(ma, fabsf(to_float(a[k])));
    mb = fmaxf(mb, fabsf(to_float(b[k])));
  }
  const float pa = row_scale(warp_max(ma)), pb = row_scale(warp_max(mb));
  float sa = 0.f, sb = 0.f;
  for (int k = lane; k < d; k += 32) {
    const float fa = to_float(a[k]) * pa, fb = to_float(b[k]) * pb;
    sa = fmaf(fa, fa, sa);
    sb = fmaf(fb, fb, sb);
  }
  sa = sqrtf(warp_sum(sa));
  sb = sqrtf(warp_sum(sb));
  const float na = fmaxf(sa / pa, kNormEps), nb = fmaxf(sb / pb, kNormEps);
  const float ra = 1.f / fmaxf(sa, kNormEps * pa), rb = 1.f / fmaxf(sb, kNormEps * pb);
  TO* out_a = zs + (int64_t)i * d;
  TO* out_b = zs + (int64_t)(n + i) * d;
  float gap = 0.f, dot = 0.f;
  for (int k = lane; k < d; k += 32) {
    const float sa_k = to_float(a[k]) * pa, sb_k = to_float(b[k]) * pb;
    out_a[k] = from_float<TO>(sa_k);
    out_b[k] = from_float<TO>(sb_k);
    const float ya = sa_k * ra, yb = sb_k * rb;
    gap = fmaf(ya - yb, ya - yb, gap);
    dot = fmaf(ya, yb, dot);
  }
  gap = warp_sum(gap);
  dot = warp_sum(dot);
  if (lane == 0) {
    rs[i] = ra;
    rs[n + i] = rb;
    norm[i] = na;
    norm[n + i] = nb;
    dist[i] = (na > kNormEps && nb > kNormEps) ? 0.5f * gap : 1.f - dot;
  }
}

// One warp per row: u = scale g, dz = (u - zn (zn . u)) / norm with zn = zs rs (radial part
// only where the norm was not clamped); dz in the input's type TD.
template <typename T, typename TD>
__global__ void __launch_bounds__(kThreads)
    norm_backward_kernel(const T* __restrict__ zs, const float* __restrict__ rs,
                         const float* __restrict__ norm, const float* __restrict__ g, int d,
                         int row_start, int row_end, const float* __restrict__ grad_out,
                         float factor, TD* __restrict__ dz) {
  const int row = row_start + blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= row_end) return;  // whole warp
  const float scale = grad_out[0] * factor;
  const float r = rs[row];
  const T* zi = zs + (int64_t)row * d;
  const float* gi = g + (int64_t)(row - row_start) * d;
  float dot = 0.f;
  for (int k = lane; k < d; k += 32) dot = fmaf(to_float(zi[k]) * r, scale * gi[k], dot);
  dot = warp_sum(dot);
  const float nrm = norm[row - row_start];
  const float radial = nrm > kNormEps ? dot : 0.f;
  TD* out = dz + (int64_t)(row - row_start) * d;
  for (int k = lane; k < d; k += 32) {
    out[k] = from_float<TD>((scale * gi[k] - to_float(zi[k]) * r * radial) / nrm);
  }
}

bool valid_rows(int m, int d, int row_start, int row_end) {
  return m >= 2 && d >= 1 && 0 <= row_start && row_start <= row_end && row_end <= m;
}

// Columns per split (a whole number of tiles) and the number of non-empty splits for a request.
struct Split {
  int cols, count;
};

Split split_columns(int m, int requested) {
  constexpr int kMaxSplits = 65535;  // grid.z limit
  const int tiles = blocks_for(m, BN);
  const int most = tiles < kMaxSplits ? tiles : kMaxSplits;
  const int want = requested < 1 ? 1 : (requested > most ? most : requested);
  const int cols = blocks_for(tiles, want) * BN;
  return {cols, blocks_for(m, cols)};
}

}  // namespace

extern "C" int fcl_nt_xent_normalize(int dtype, const void* z_a, const void* z_b, int n, int d,
                                     void* zs, float* rs, float* norm, float* dist,
                                     cudaStream_t stream) {
  if (n < 1 || d < 1) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using TO = Normed<T>;
    normalize_kernel<T, TO><<<blocks_for(n, kWarps), kThreads, 0, stream>>>(
        static_cast<const T*>(z_a), static_cast<const T*>(z_b), n, d, static_cast<TO*>(zs), rs,
        norm, dist);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_nt_xent_splits(int dtype, int m, int d, int rows, int backward,
                                  int multiprocessors) {
  constexpr int kBlocksPerSm = 4;  // resident blocks per SM the split aims for
  constexpr int kMinTilesPerSplit = 2;
  if (m < 2 || d < 1 || rows < 1 || multiprocessors < 1) return 1;
  const int features = dtype == FCL_FLOAT32 ? Tile<float>::BD : Tile<__half>::BD;
  const int blocks = blocks_for(rows, BM) * (backward ? blocks_for(d, features) : 1);
  const int wanted = blocks_for(kBlocksPerSm * multiprocessors, blocks);
  const int most = blocks_for(blocks_for(m, BN), kMinTilesPerSplit);
  return split_columns(m, wanted < most ? wanted : most).count;
}

extern "C" int fcl_nt_xent_lse(int dtype, const void* zs, const float* rs, int m, int d,
                               int row_start, int row_end, float inv_tau, int splits,
                               float* workspace, float* lse, cudaStream_t stream) {
  if (!valid_rows(m, d, row_start, row_end) || m % 2 != 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (row_end == row_start) return static_cast<int>(cudaSuccess);
  const Split split = split_columns(m, splits);
  if (split.count > 1 && workspace == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const int rows = row_end - row_start;
  float2* partial = reinterpret_cast<float2*>(workspace);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(blocks_for(rows, BM), 1, split.count);
    lse_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(zs), rs, m, d,
                                                  row_start, row_end, inv_tau * kLog2e,
                                                  split.cols, lse, partial);
    const int launched = static_cast<int>(cudaGetLastError());
    if (launched != 0 || split.count == 1) return launched;
    merge_lse_kernel<<<blocks_for(rows, kThreads), kThreads, 0, stream>>>(partial, rows,
                                                                          split.count, lse);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_nt_xent_grad(int dtype, const void* zs, const float* rs, int m, int d,
                                int row_start, int row_end, float inv_tau,
                                const float* lse_full, const float* loss_full,
                                const float* weight_full, int splits, float* workspace, float* g,
                                cudaStream_t stream) {
  if (!valid_rows(m, d, row_start, row_end) || m % 2 != 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (row_end == row_start) return static_cast<int>(cudaSuccess);
  const Split split = split_columns(m, splits);
  if (split.count > 1 && workspace == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const int rows = row_end - row_start;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(blocks_for(rows, BM), blocks_for(d, Tile<T>::BD), split.count);
    grad_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(zs), rs, m, d, row_start, row_end, inv_tau * kLog2e, lse_full,
        loss_full, weight_full, split.cols, split.count == 1 ? g : workspace);
    const int launched = static_cast<int>(cudaGetLastError());
    if (launched != 0 || split.count == 1) return launched;
    const int64_t count = (int64_t)rows * d;
    const int blocks = static_cast<int>(count / kThreads < 4096 ? count / kThreads + 1 : 4096);
    sum_splits_kernel<kThreads><<<blocks, kThreads, 0, stream>>>(workspace, count, split.count, g);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_nt_xent_norm_backward(int dtype, const void* zs, const float* rs,
                                         const float* norm, const float* g, int m, int d,
                                         int row_start, int row_end, const float* grad_out,
                                         float factor, int dz_dtype, void* dz,
                                         cudaStream_t stream) {
  if (!valid_rows(m, d, row_start, row_end)) return static_cast<int>(cudaErrorInvalidValue);
  if (row_end == row_start) return static_cast<int>(cudaSuccess);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch(dz_dtype, [&](auto out_tag) {
      using TD = decltype(out_tag);
      const int blocks = blocks_for(row_end - row_start, kWarps);
      norm_backward_kernel<T, TD><<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(zs), rs, norm, g, d, row_start, row_end, grad_out, factor,
          static_cast<TD*>(dz));
      return static_cast<int>(cudaGetLastError());
    });
  });
}
