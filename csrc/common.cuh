// Device helpers shared by the csrc kernels: element conversions (explicit, since torch builds
// with implicit half/bfloat16 conversions disabled), warp reductions and dtype dispatch.
#ifndef FASTCLUSTER_CL_COMMON_CUH_
#define FASTCLUSTER_CL_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fcl_kernels.h"

namespace fcl {

constexpr unsigned kFullMask = 0xffffffffu;

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
