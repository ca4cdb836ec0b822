// NT-Xent against a memory bank (the CUDA C++ twin of kernels/nt_xent_bank.py): rows i < n of
// z_a are the anchors, zn_b_i their positives and the M bank rows (used as given: unit rows) their
// negatives, S_ik = zn_a_i . bank_k / tau, S_pos_i = zn_a_i . zn_b_i / tau. The n x M similarity
// matrix never exists.
//
// Inputs are the outputs of fcl_nt_xent_normalize on (z_a, z_b): Zs (2n x d, fp16 for 16-bit
// inputs, fp32 for fp32), rs, the clamped norms and dist_i = 1 - tau S_pos_i (no cancellation
// for correlated views). The bank is in Zs's element type; a bank wider than fp16 with fp16 Zs
// comes as hi + lo (two fp16 halves, `bank_lo`), and every score tile takes both products (the
// Triton kernel's numerics: rounding unit rows to fp16 alone costs 1.6e-4 relative loss error at
// tau = 0.05).
//   forward  (bank_lse_kernel): a block owns BM rows of z_a and sweeps the bank's column tiles
//            (tiles.cuh: score_tile), x = S log2(e) = (Zs_I bank_J^T) q_I, q = rs log2(e) / tau,
//            summing 2^(x - shift) with the fixed shift log2(e) / tau (|S| <= 1/tau) where
//            exp(-2/tau) is a normal float, else with the online row max. Then per row
//            t = log sum_k exp(S_ik - S_pos) (= ln(total) + dist / tau under the fixed shift: no
//            large terms cancel), loss = softplus(t), and the backward's row weight
//            u = exp(dist / tau - loss) = exp(1/tau - lse) (fixed shift) or lse log2(e).
//   backward (bank_grad_kernel): G = sum_k P_ik bank_k over the column tiles, P_ik =
//            2^(x - shift) u_i (one exp per element), the tile weights scaled before their
//            rounding to the bank's type by the power of two `weight_scale` of the block's
//            largest P <= min(loss, 1) (no fp16 overflow, small weights clear of the
//            subnormals however small the losses) and multiplied on the tensor cores with the
//            bank's hi part (tiles.cuh: GradAccumulator); grid.y splits the features. G is
//            written to an fp32 workspace; bank_finish_kernel (one warp per row) then applies
//            the row's incoming gradient w_i (1/n for the mean) and the positive's weight
//            P_pos - 1 = expm1(-loss_i):
//                g_a = w_i/tau (G_i + (P_pos - 1) zn_b_i),   g_b = w_i/tau (P_pos - 1) zn_a_i,
//            each through the normalisation's backward, written to dz_a and dz_b. No atomics,
//            no gradient to the bank. See fcl_kernels.h for the launcher contract.
#include <stdint.h>

#include "common.cuh"
#include "tiles.cuh"

namespace {

using fcl::block_max;
using fcl::blocks_for;
using fcl::dispatch;
using fcl::from_float;
using fcl::kFullMask;
using fcl::kLn2;
using fcl::kLog2e;
using fcl::kNormEps;
using fcl::softplus;
using fcl::to_float;
using fcl::warp_sum;
using fcl::weight_scale;
using namespace fcl::tiles;

// Thread t owns row t / 2 of the block and the interleaved tile columns 2c + t % 2, as in
// nt_xent.cu's lse_kernel; the two threads of a row are adjacent lanes.
template <typename T, bool kSplit>
__global__ void __launch_bounds__(kThreads)
    bank_lse_kernel(const T* __restrict__ zs, const float* __restrict__ rs,
                    const float* __restrict__ dist, const T* __restrict__ bank,
                    const T* __restrict__ bank_lo, int n, int m_bank, int d, float inv_tau,
                    int fixed_shift, float* __restrict__ row_loss, float* __restrict__ row_w) {
  using Tr = Tile<T>;
  __shared__ __align__(128) unsigned char smem[Tr::kBytes];
  const float* Ss = reinterpret_cast<const float*>(smem + Tr::kSOffset);
  const int r0 = blockIdx.x * BM;
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int i = r0 + r;
  const float shift = inv_tau * kLog2e;
  const float q_i = i < n ? rs[i] * shift : 0.f;
  // Running max and sum of 2^(x - max) (online), or the sum of 2^(x - shift) with max = shift.
  float run_max = fixed_shift ? shift : -INFINITY, run_sum = 0.f;
  for (int c0 = 0; c0 < m_bank; c0 += BN) {
    score_tile<T, kSplit>(zs, n, r0, bank, bank_lo, m_bank, c0, d, smem);
    float x[BN / 2];
    float tile_max = -INFINITY;
#pragma unroll
    for (int c = 0; c < BN / 2; ++c) {
      const int col = 2 * c + half;
      x[c] = c0 + col < m_bank ? Ss[r * Tr::LDS + col] * q_i : -INFINITY;
      tile_max = fmaxf(tile_max, x[c]);
    }
    const float new_max = fixed_shift ? shift : fmaxf(run_max, tile_max);
    if (new_max > -INFINITY) {
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < BN / 2; ++c) sum += exp2f(x[c] - new_max);  // exp2f(-inf) = 0
      run_sum = run_sum * exp2f(run_max - new_max) + sum;  // factor 1 under the fixed shift
      run_max = new_max;
    }
    __syncthreads();  // the next tile overwrites Ss
  }
  const float other_max = __shfl_xor_sync(kFullMask, run_max, 1);
  const float other_sum = __shfl_xor_sync(kFullMask, run_sum, 1);
  if (half == 0 && i < n) {
    const float mx = fmaxf(run_max, other_max);  // finite: m_bank >= 1
    const float total = run_sum * exp2f(run_max - mx) + other_sum * exp2f(other_max - mx);
    const float t = fixed_shift ? log2f(total) * kLn2 + dist[i] * inv_tau
                                : (log2f(total) + mx) * kLn2 - (1.f - dist[i]) * inv_tau;
    const float loss = softplus(t);
    row_loss[i] = loss;
    // u = exp(1/tau - lse), lse = S_pos + loss = (1 - dist) / tau + loss; else lse log2(e).
    row_w[i] = fixed_shift ? expf(dist[i] * inv_tau - loss)
                           : ((1.f - dist[i]) * inv_tau + loss) * kLog2e;
  }
}

template <typename T, bool kSplit>
__global__ void __launch_bounds__(kThreads)
    bank_grad_kernel(const T* __restrict__ zs, const float* __restrict__ rs,
                     const T* __restrict__ bank, const T* __restrict__ bank_lo, int n,
                     int m_bank, int d, float inv_tau, int fixed_shift,
                     const float* __restrict__ row_w, const float* __restrict__ row_loss,
                     float* __restrict__ g) {
  using Tr = Tile<T>;
  __shared__ __align__(128) unsigned char smem[Tr::kBytes];
  float* Ss = reinterpret_cast<float*>(smem + Tr::kSOffset);
  T* Ps = Tr::kTensorCores ? reinterpret_cast<T*>(smem) : reinterpret_cast<T*>(Ss);
  T* Zd = reinterpret_cast<T*>(smem + Tr::kZOffset);
  const int r0 = blockIdx.x * BM;
  const int d0 = blockIdx.y * Tr::BD;
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int i = r0 + r;
  const float shift = inv_tau * kLog2e;
  const float q_i = i < n ? rs[i] * shift : 0.f;
  const float u_i = i < n ? row_w[i] : 0.f;
  // P_ik <= 1 - P_pos <= min(loss_i, 1): the tile weights' scale from the block's rows
  __shared__ float red[kWarps];
  const int rows = n - r0 < BM ? n - r0 : BM;
  const float scale = weight_scale(fminf(block_max<kWarps>(row_loss + r0, rows, red), 1.f));
  GradAccumulator<T> acc;
  for (int c0 = 0; c0 < m_bank; c0 += BN) {
    score_tile<T, kSplit>(zs, n, r0, bank, bank_lo, m_bank, c0, d, smem);
    load_tile<T, Tr::BD, Tr::LDZ>(Zd, bank, d, c0, m_bank, d0);
#pragma unroll
    for (int c = 0; c < BN / 2; ++c) {
      const int col = 2 * c + half;
      float p = 0.f;
      if (i < n && c0 + col < m_bank) {
        const float x = Ss[r * Tr::LDS + col] * q_i;
        p = fixed_shift ? exp2f(x - shift) * u_i : exp2f(x - u_i);
      }
      // fp32: in place, the same element it just read.
      Ps[r * Tr::LDP + col] = from_float<T>(p * scale);
    }
    __syncthreads();
    acc.add(Ps, Zd);
    __syncthreads();  // the next tile overwrites Ps, Zd, Ss
  }
  acc.store(g, smem, r0, 0, n, d0, d, 1.f / scale);
}

// One warp per row i < n: the epilogue above (see the header comment); w holds the n incoming
// row gradients (1/n each for the mean's).
template <typename T, typename TD>
__global__ void __launch_bounds__(kThreads)
    bank_finish_kernel(const T* __restrict__ zs, const float* __restrict__ rs,
                       const float* __restrict__ norm, const float* __restrict__ dist,
                       const float* __restrict__ row_loss, const float* __restrict__ w,
                       const float* __restrict__ g, int n, int d, float inv_tau,
                       TD* __restrict__ dz_a, TD* __restrict__ dz_b) {
  const int i = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (i >= n) return;  // whole warp
  const T* za = zs + (int64_t)i * d;
  const T* zb = zs + (int64_t)(n + i) * d;
  const float* gi = g + (int64_t)i * d;
  const float ra = rs[i], rb = rs[n + i], norm_a = norm[i], norm_b = norm[n + i];
  const float wt = w[i] * inv_tau;
  const float c = wt * expm1f(-row_loss[i]);  // w/tau (P_pos - 1), never rounded
  const float cosine = 1.f - dist[i];
  float dot = 0.f;  // zn_a . G
  for (int k = lane; k < d; k += 32) dot = fmaf(to_float(za[k]) * ra, gi[k], dot);
  dot = warp_sum(dot);
  // zn_a . g_a = wt (zn_a . G) + c cosine and zn_b . g_b = c cosine, where the norm was not clamped.
  const float radial_a = norm_a > kNormEps ? wt * dot + c * cosine : 0.f;
  const float radial_b = norm_b > kNormEps ? c * cosine : 0.f;
  TD* out_a = dz_a + (int64_t)i * d;
  TD* out_b = dz_b + (int64_t)i * d;
  for (int k = lane; k < d; k += 32) {
    const float zn_a = to_float(za[k]) * ra, zn_b = to_float(zb[k]) * rb;
    out_a[k] = from_float<TD>((wt * gi[k] + c * zn_b - zn_a * radial_a) / norm_a);
    out_b[k] = from_float<TD>((c * zn_a - zn_b * radial_b) / norm_b);
  }
}

bool valid_sizes(int n, int m_bank, int d) { return n >= 1 && m_bank >= 1 && d >= 1; }

// Calls fn(T, kSplit) for Zs's element type and whether the bank comes as hi + lo.
template <typename Fn>
int dispatch_bank(int dtype, const void* bank_lo, Fn&& fn) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return bank_lo != nullptr ? fn(T{}, std::true_type{}) : fn(T{}, std::false_type{});
  });
}

}  // namespace

extern "C" int fcl_nt_xent_bank_lse(int dtype, const void* zs, const float* rs,
                                    const float* dist, const void* bank, const void* bank_lo,
                                    int n, int m_bank, int d, float inv_tau, int fixed_shift,
                                    float* row_loss, float* row_w, cudaStream_t stream) {
  if (!valid_sizes(n, m_bank, d)) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_bank(dtype, bank_lo, [&](auto tag, auto split) {
    using T = decltype(tag);
    bank_lse_kernel<T, decltype(split)::value><<<blocks_for(n, BM), kThreads, 0, stream>>>(
        static_cast<const T*>(zs), rs, dist, static_cast<const T*>(bank),
        static_cast<const T*>(bank_lo), n, m_bank, d, inv_tau, fixed_shift, row_loss, row_w);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_nt_xent_bank_grad(int dtype, const void* zs, const float* rs,
                                     const float* norm, const float* dist, const void* bank,
                                     const void* bank_lo, int n, int m_bank, int d,
                                     float inv_tau, int fixed_shift, const float* row_w,
                                     const float* row_loss, const float* w, float* workspace,
                                     int dz_dtype, void* dz_a, void* dz_b, cudaStream_t stream) {
  if (!valid_sizes(n, m_bank, d) || workspace == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return dispatch_bank(dtype, bank_lo, [&](auto tag, auto split) {
    using T = decltype(tag);
    const dim3 grid(blocks_for(n, BM), blocks_for(d, Tile<T>::BD), 1);
    bank_grad_kernel<T, decltype(split)::value><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(zs), rs, static_cast<const T*>(bank),
        static_cast<const T*>(bank_lo), n, m_bank, d, inv_tau, fixed_shift, row_w, row_loss,
        workspace);
    const int launched = static_cast<int>(cudaGetLastError());
    if (launched != 0) return launched;
    return dispatch(dz_dtype, [&](auto out_tag) {
      using TD = decltype(out_tag);
      bank_finish_kernel<T, TD><<<blocks_for(n, kWarps), kThreads, 0, stream>>>(
          static_cast<const T*>(zs), rs, norm, dist, row_loss, w, workspace, n, d, inv_tau,
          static_cast<TD*>(dz_a), static_cast<TD*>(dz_b));
      return static_cast<int>(cudaGetLastError());
    });
  });
}
