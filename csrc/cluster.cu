// The O(N*K) cluster terms of the CUDA twin, forward and backward: the Student-t assignment of
// the center head and the DEC and anchor losses of arXiv 2109.12714 (docs/design.md, "The
// losses", items 4 to 6).
//
// Student-t: logit_ik = -(alpha+1)/2 log1p(d_ik / alpha), d_ik = ||h_i - mu_k||^2 (summed as
//   squared differences in fp32, like the reference), q = softmax_k(logit). One warp per row i.
//   Backward, with G = dL/dq: w_ik = dL/dd_ik
//   = q_ik (G_ik - sum_j G_ij q_ij) * (-(alpha+1)/2) / (alpha + d_ik) (softmax, log1p);
//   dh_i = 2 (h_i sum_k w_ik - sum_k w_ik mu_k) (one warp per row) and
//   dmu_k = -2 (sum_i w_ik h_i - mu_k sum_i w_ik) (a block per center and feature slice, looping
//   over the rows in order: deterministic).
//
// q is N x K soft assignments (rows sum to 1), K small. Each row is one warp (lanes stride the K
// columns); per-row losses are written out and summed by the caller, so the kernels are
// deterministic (no atomics). log q is log(max(q, FLT_MIN)) with the clamp's gradient, as
// numerics.safe_log: d/dq = 1/q where q >= FLT_MIN, else 0.
//   DEC:    f_k = sum_i q_ik (column_sum_kernel, its own launch so that a distributed caller can
//           all-reduce f before the rows); p_ik = (q_ik^2 / f_k) / sum_j (q_ij^2 / f_j) held fixed;
//           loss_i = sum_k p_ik log p_ik - p_ik log q_ik; dL/dq_ik = -s p_ik / q_ik.
//   anchor: loss_i = sum_k 2 q0_ik log q0_ik - q0_ik (log qa_ik + log qb_ik) (q0 held fixed);
//           dL/dqa_ik = -s q0_ik / qa_ik, likewise for qb.
// s = *grad_out * factor (factor = 1 / N for the mean over rows).
#include <float.h>
#include <stdint.h>

#include "common.cuh"

namespace {

using fcl::blocks_for;
using fcl::dispatch;
using fcl::from_float;
using fcl::safe_log;
using fcl::safe_log_grad;
using fcl::student_t_row;
using fcl::to_float;
using fcl::warp_sum;
using fcl::xlogx;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;


// f[c] = sum_i q[i][c]: block b owns columns 32b..32b+31 (one per lane); its 8 warps stride the
// rows and combine through shared memory in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    column_sum_kernel(const T* __restrict__ q, int n, int k, float* __restrict__ f) {
  __shared__ float partial[kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int col = blockIdx.x * 32 + lane;
  float sum = 0.f;
  if (col < k) {
    for (int i = warp; i < n; i += kWarps) sum += to_float(q[(int64_t)i * k + col]);
  }
  partial[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && col < k) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += partial[w][lane];
    f[col] = total;
  }
}

// One warp per row of q: the DEC target's row normaliser, then the row loss or the gradient.
template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    dec_rows_kernel(const T* __restrict__ q, const float* __restrict__ f, int n, int k,
                    float* __restrict__ loss_rows, const float* __restrict__ grad_out,
                    float factor, T* __restrict__ dq) {
  const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= n) return;  // whole warp
  const T* qi = q + (int64_t)row * k;
  float weight_sum = 0.f;
  for (int c = lane; c < k; c += 32) {
    const float x = to_float(qi[c]);
    weight_sum += x * x / f[c];
  }
  weight_sum = warp_sum(weight_sum);
  if constexpr (!kBackward) {
    float loss = 0.f;
    for (int c = lane; c < k; c += 32) {
      const float x = to_float(qi[c]);
      const float p = x * x / f[c] / weight_sum;
      loss += xlogx(p) - p * safe_log(x);
    }
    loss = warp_sum(loss);
    if (lane == 0) loss_rows[row] = loss;
  } else {
    const float scale = grad_out[0] * factor;
    T* out = dq + (int64_t)row * k;
    for (int c = lane; c < k; c += 32) {
      const float x = to_float(qi[c]);
      const float p = x * x / f[c] / weight_sum;
      out[c] = from_float<T>(-scale * safe_log_grad(p, x));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    anchor_rows_kernel(const T* __restrict__ q0, const T* __restrict__ qa,
                       const T* __restrict__ qb, int n, int k, float* __restrict__ loss_rows) {
  const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= n) return;  // whole warp
  const int64_t base = (int64_t)row * k;
  float loss = 0.f;
  for (int c = lane; c < k; c += 32) {
    const float p = to_float(q0[base + c]);
    loss += 2.f * xlogx(p) - p * (safe_log(to_float(qa[base + c])) +
                                  safe_log(to_float(qb[base + c])));
  }
  loss = warp_sum(loss);
  if (lane == 0) loss_rows[row] = loss;
}

// Elementwise: dqa = -s q0 / qa, dqb = -s q0 / qb (clamped log's gradient).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    anchor_backward_kernel(const T* __restrict__ q0, const T* __restrict__ qa,
                           const T* __restrict__ qb, int64_t count,
                           const float* __restrict__ grad_out, float factor,
                           T* __restrict__ dqa, T* __restrict__ dqb) {
  const float scale = grad_out[0] * factor;
  for (int64_t e = blockIdx.x * (int64_t)kThreads + threadIdx.x; e < count;
       e += (int64_t)gridDim.x * kThreads) {
    const float p = to_float(q0[e]);
    dqa[e] = from_float<T>(-scale * safe_log_grad(p, to_float(qa[e])));
    dqb[e] = from_float<T>(-scale * safe_log_grad(p, to_float(qb[e])));
  }
}

// One warp per row: d_ik and q_ik (fp32). Lane k % 32 owns column k, in both passes.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    student_t_kernel(const T* __restrict__ h, const T* __restrict__ centers, int n, int k, int f,
                     float alpha, float* __restrict__ q, float* __restrict__ dist2) {
  const int row = blockIdx.x * kWarps + threadIdx.x / 32;
  if (row >= n) return;  // whole warp
  const T* hi = h + (int64_t)row * f;
  student_t_row([&](int e) { return to_float(hi[e]); },
                [&](int c, int e) { return to_float(centers[(int64_t)c * f + e]); }, k, f, alpha,
                q + (int64_t)row * k, dist2 + (int64_t)row * k);
}

// One warp per row: w (fp32 scratch, n x k) and dh.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    student_t_rows_backward_kernel(const T* __restrict__ h, const T* __restrict__ centers,
                                   const float* __restrict__ q, const float* __restrict__ dist2,
                                   const float* __restrict__ grad_q, int n, int k, int f,
                                   float alpha, float* __restrict__ w, T* __restrict__ dh) {
  const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= n) return;  // whole warp
  const int64_t base = (int64_t)row * k;
  float dot = 0.f;
  for (int c = lane; c < k; c += 32) dot = fmaf(grad_q[base + c], q[base + c], dot);
  dot = warp_sum(dot);
  const float power = -0.5f * (alpha + 1.f);
  float w_sum = 0.f;
  for (int c = lane; c < k; c += 32) {
    const float wc = q[base + c] * (grad_q[base + c] - dot) * power / (alpha + dist2[base + c]);
    w[base + c] = wc;
    w_sum += wc;
  }
  w_sum = warp_sum(w_sum);
  __syncwarp();  // every lane reads the whole row of w below
  const T* hi = h + (int64_t)row * f;
  T* out = dh + (int64_t)row * f;
  for (int e = lane; e < f; e += 32) {
    float mixed = 0.f;  // sum_k w_ik mu_ke
    for (int c = 0; c < k; ++c) {
      mixed = fmaf(w[base + c], to_float(centers[(int64_t)c * f + e]), mixed);
    }
    out[e] = from_float<T>(2.f * (to_float(hi[e]) * w_sum - mixed));
  }
}

constexpr int kCenterFeatures = 128;  // features per block of the center gradient

// Block (center c, feature slice): dmu_ce = -2 (sum_i w_ic h_ie - mu_ce sum_i w_ic).
template <typename T>
__global__ void __launch_bounds__(kCenterFeatures)
    student_t_centers_backward_kernel(const T* __restrict__ h, const T* __restrict__ centers,
                                      const float* __restrict__ w, int n, int k, int f,
                                      T* __restrict__ dcenters) {
  const int c = blockIdx.x;
  const int e = blockIdx.y * kCenterFeatures + threadIdx.x;
  if (e >= f) return;
  float weighted = 0.f, w_sum = 0.f;
  for (int i = 0; i < n; ++i) {
    const float wi = w[(int64_t)i * k + c];
    weighted = fmaf(wi, to_float(h[(int64_t)i * f + e]), weighted);
    w_sum += wi;
  }
  const int64_t at = (int64_t)c * f + e;
  dcenters[at] = from_float<T>(-2.f * (weighted - to_float(centers[at]) * w_sum));
}

bool valid(int n, int k) { return n >= 1 && k >= 1; }

}  // namespace

extern "C" int fcl_column_sums(int dtype, const void* q, int n, int k, float* f,
                               cudaStream_t stream) {
  if (!valid(n, k)) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    column_sum_kernel<T><<<blocks_for(k, 32), kThreads, 0, stream>>>(static_cast<const T*>(q),
                                                                    n, k, f);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_dec_rows(int dtype, const void* q, const float* f, int n, int k,
                            float* loss_rows, cudaStream_t stream) {
  if (!valid(n, k)) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    dec_rows_kernel<T, false><<<blocks_for(n, kWarps), kThreads, 0, stream>>>(
        static_cast<const T*>(q), f, n, k, loss_rows, nullptr, 0.f, nullptr);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_dec_backward(int dtype, const void* q, const float* f, int n, int k,
                                const float* grad_out, float factor, void* dq,
                                cudaStream_t stream) {
  if (!valid(n, k)) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    dec_rows_kernel<T, true><<<blocks_for(n, kWarps), kThreads, 0, stream>>>(
        static_cast<const T*>(q), f, n, k, nullptr, grad_out, factor, static_cast<T*>(dq));
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_anchor_rows(int dtype, const void* q0, const void* qa, const void* qb, int n,
                               int k, float* loss_rows, cudaStream_t stream) {
  if (!valid(n, k)) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    anchor_rows_kernel<T><<<blocks_for(n, kWarps), kThreads, 0, stream>>>(
        static_cast<const T*>(q0), static_cast<const T*>(qa), static_cast<const T*>(qb), n, k,
        loss_rows);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_anchor_backward(int dtype, const void* q0, const void* qa, const void* qb,
                                   int n, int k, const float* grad_out, float factor, void* dqa,
                                   void* dqb, cudaStream_t stream) {
  if (!valid(n, k)) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t count = (int64_t)n * k;
  const int blocks = static_cast<int>(count / kThreads < 4096 ? count / kThreads + 1 : 4096);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    anchor_backward_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(q0), static_cast<const T*>(qa), static_cast<const T*>(qb), count,
        grad_out, factor, static_cast<T*>(dqa), static_cast<T*>(dqb));
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_student_t(int dtype, const void* h, const void* centers, int n, int k, int f,
                             float alpha, float* q, float* dist2, cudaStream_t stream) {
  if (!valid(n, k) || f < 1 || !(alpha > 0.f)) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    student_t_kernel<T><<<blocks_for(n, kWarps), kThreads, 0, stream>>>(
        static_cast<const T*>(h), static_cast<const T*>(centers), n, k, f, alpha, q, dist2);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_student_t_backward(int dtype, const void* h, const void* centers,
                                      const float* q, const float* dist2, const float* grad_q,
                                      int n, int k, int f, float alpha, float* w, void* dh,
                                      void* dcenters, cudaStream_t stream) {
  if (!valid(n, k) || f < 1 || !(alpha > 0.f)) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    student_t_rows_backward_kernel<T><<<blocks_for(n, kWarps), kThreads, 0, stream>>>(
        static_cast<const T*>(h), static_cast<const T*>(centers), q, dist2, grad_q, n, k, f,
        alpha, w, static_cast<T*>(dh));
    const int launched = static_cast<int>(cudaGetLastError());
    if (launched != 0) return launched;
    const dim3 grid(k, blocks_for(f, kCenterFeatures));
    student_t_centers_backward_kernel<T><<<grid, kCenterFeatures, 0, stream>>>(
        static_cast<const T*>(h), static_cast<const T*>(centers), w, n, k, f,
        static_cast<T*>(dcenters));
    return static_cast<int>(cudaGetLastError());
  });
}
