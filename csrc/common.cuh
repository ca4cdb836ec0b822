// Device helpers shared by the csrc kernels: element conversions (explicit, since torch builds
// with implicit half/bfloat16 conversions disabled), warp reductions and dtype dispatch.
#ifndef FASTCLUSTER_CL_COMMON_CUH_
#define FASTCLUSTER_CL_COMMON_CUH_

#include <float.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "fcl_kernels.h"

namespace fcl {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNormEps = 1e-12f;  // as F.normalize

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  }
  return x;
}

// max(x[0..count), 0) over a block of kBlockWarps warps, returned to every thread (a barrier
// inside: every thread of the block calls it; scratch holds kBlockWarps floats of shared memory).
template <int kBlockWarps>
__device__ float block_max(const float* __restrict__ x, int count, float* scratch) {
  float top = 0.f;
  for (int e = threadIdx.x; e < count; e += 32 * kBlockWarps) top = fmaxf(top, x[e]);
  top = warp_max(top);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = top;
  __syncthreads();
  top = scratch[0];
  for (int w = 1; w < kBlockWarps; ++w) top = fmaxf(top, scratch[w]);
  return top;
}

// The backward's tile weight scale (kernels/nt_xent.py `weight_scale`): the power of two
// 2^(15 - ceil(log2 bound)), bound (>= every weight) clamped to [2^-100, 2], so that the scaled
// weights stay at most 2^15 in fp16 and the largest keeps fp16's 11-bit precision however small.
__device__ __forceinline__ float weight_scale(float bound) {
  int e;  // bound = f 2^e, f in [0.5, 1): ceil(log2 bound) = e, or e - 1 for f = 0.5
  const float f = frexpf(fminf(fmaxf(bound, 7.888609052210118e-31f), 2.f), &e);
  return ldexpf(1.f, 15 - (f == 0.5f ? e - 1 : e));
}

// Online base-2 log-sum-exp: folds the values x (-inf: masked out) into the running
// (run_max, run_sum), sum of 2^(x - run_max); an empty state is (-inf, 0).
template <int N>
__device__ __forceinline__ void lse2_add(const float (&x)[N], float& run_max, float& run_sum) {
  float tile_max = -INFINITY;
#pragma unroll
  for (int c = 0; c < N; ++c) tile_max = fmaxf(tile_max, x[c]);
  if (tile_max > -INFINITY) {
    const float new_max = fmaxf(run_max, tile_max);
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < N; ++c) sum += exp2f(x[c] - new_max);  // exp2f(-inf) = 0
    run_sum = run_sum * exp2f(run_max - new_max) + sum;
    run_max = new_max;
  }
}

// Merges the state (other_max, other_sum) into (run_max, run_sum); either may be empty.
__device__ __forceinline__ void lse2_merge(float& run_max, float& run_sum, float other_max,
                                           float other_sum) {
  const float new_max = fmaxf(run_max, other_max);
  run_sum = new_max == -INFINITY
                ? 0.f
                : run_sum * exp2f(run_max - new_max) + other_sum * exp2f(other_max - new_max);
  run_max = new_max;
}

// out[e] = sum over s < splits of partial[s * count + e], in split order (deterministic): the
// fixed-order reduction of per-split (per-block) partial results.
template <int kBlock>
__global__ void __launch_bounds__(kBlock)
    sum_splits_kernel(const float* __restrict__ partial, int64_t count, int splits,
                      float* __restrict__ out) {
  for (int64_t e = blockIdx.x * (int64_t)kBlock + threadIdx.x; e < count;
       e += (int64_t)gridDim.x * kBlock) {
    float total = 0.f;
    for (int s = 0; s < splits; ++s) total += partial[s * count + e];
    out[e] = total;
  }
}

// Element i of a float32/float16/bfloat16 buffer whose type is only known at run time (an
// FclDtype): the cluster inputs of the fused objectives, read O(N K F) times, not in a hot tile.
__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case FCL_FLOAT16: return __half2float(static_cast<const __half*>(p)[i]);
    case FCL_BFLOAT16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_any(void* p, int dtype, int64_t i, float x) {
  switch (dtype) {
    case FCL_FLOAT16: static_cast<__half*>(p)[i] = __float2half_rn(x); break;
    case FCL_BFLOAT16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x); break;
    default: static_cast<float*>(p)[i] = x;
  }
}

// The power of two that brings a row's largest |element| m into [1, 2): exact scaling, so that
// the sum of squares cannot overflow (|z| ~ 1e19 in fp32) or lose tiny rows to underflow.
__device__ __forceinline__ float row_scale(float m) {
  return ldexpf(1.f, -ilogbf(fmaxf(m, 1.17549435e-38f)));
}

// log(1 + e^x) without overflow; softplus(-inf) = 0.
__device__ __forceinline__ float softplus(float x) {
  return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x)));
}

// KL helpers: 0 log 0 = 0; log q clamped at FLT_MIN as numerics.safe_log, whose gradient is
// w / q where the clamp passes it, else 0.
__device__ __forceinline__ float xlogx(float x) { return x > 0.f ? x * logf(x) : 0.f; }
__device__ __forceinline__ float safe_log(float x) { return logf(fmaxf(x, FLT_MIN)); }
__device__ __forceinline__ float safe_log_grad(float w, float q) {
  return q >= FLT_MIN ? w / q : 0.f;
}

// One warp computes a Student-t row: d_c = ||h - mu_c||^2 (squared differences in fp32, like
// the reference) and q_c = softmax_c(-(alpha+1)/2 log1p(d_c / alpha)) for c < k, written to
// dist2[c] and q[c] by lane c % 32 (the lane that reads them back: no __syncwarp needed).
// h(e) and mu(c, e) return element e of the row and of center c as float.
template <typename LoadH, typename LoadMu>
__device__ void student_t_row(LoadH h, LoadMu mu, int k, int f, float alpha, float* q,
                              float* dist2) {
  const int lane = threadIdx.x % 32;
  const float power = -0.5f * (alpha + 1.f);
  float row_max = -INFINITY;
  for (int c = 0; c < k; ++c) {
    float partial = 0.f;
    for (int e = lane; e < f; e += 32) {
      const float diff = h(e) - mu(c, e);
      partial = fmaf(diff, diff, partial);
    }
    const float d = warp_sum(partial);
    if (lane == c % 32) {
      const float logit = power * log1pf(d / alpha);
      dist2[c] = d;
      q[c] = logit;
      row_max = fmaxf(row_max, logit);
    }
  }
  row_max = warp_max(row_max);
  float sum = 0.f;
  for (int c = lane; c < k; c += 32) {
    const float e = expf(q[c] - row_max);
    q[c] = e;
    sum += e;
  }
  sum = warp_sum(sum);
  for (int c = lane; c < k; c += 32) q[c] /= sum;
}

// Calls fn with a value of the element type named by dtype (an FclDtype); returns its result,
// or cudaErrorInvalidValue for an unknown dtype.
template <typename Fn>
int dispatch(int dtype, Fn&& fn) {
  switch (dtype) {
    case FCL_FLOAT32: return fn(float{});
    case FCL_FLOAT16: return fn(__half{});
    case FCL_BFLOAT16: return fn(__nv_bfloat16{});
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

inline int blocks_for(int items, int per_block) { return (items + per_block - 1) / per_block; }

}  // namespace fcl

#endif  // FASTCLUSTER_CL_COMMON_CUH_
