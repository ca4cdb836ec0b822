// The one-pass fused objectives of the CUDA twin (reference.anchor_objective and
// reference.cc_objective): the instance NT-Xent of Z = [z_a; z_b] (m = 2n rows) and the
// method's cluster terms in one row-parallel kernel, then one small single-block epilogue;
// backward: one row-parallel kernel plus one small kernel for the K-sized terms.
//
// Row blocks. Block b owns the index pairs i in [16 b, 16 b + 16) and handles the rows i and
// n + i of Z (BM = 32 rows), so the positive pair's 1 - cos = ||zn_i - zn_pos||^2 / 2 is formed
// inside the block without cancellation, and the cluster rows i of h0/h_a/h_b (anchor) or of
// both logits (cc). Rows and columns are normalised on the fly: zn = (z p) rs with p the power
// of two that puts the row's largest |element| into [1, 2) and rs = 1 / max(||z p||, 1e-12 p)
// (rows of any finite magnitude; no prologue launch), each column tile's p and rs computed by
// the block that reads it. Similarity tiles are BM x BN = 32 x 32 over feature steps of
// BK = 32 of z p (exact), accumulated in fp32: wmma tensor cores on fp16 tiles for 16-bit
// inputs (one 16 x 16 block per warp), an fp32 SIMT product for fp32; rs is applied after.
//   forward:  online base-2 log-sum-exp of each row over its negatives, then
//             loss_i = softplus(lse_neg_i - S_i,pos); the rows' rs, norm, lse, loss and p are
//             saved (rows: 5 x m floats) for the backward.
//             anchor: Student-t rows q0, qa, qb against all K centers (fp32, the centers given
//             in fp32; q = exp(logit - lse), the row's lse saved: 3 x n), the per-row anchor
//             term and c_v = sum_k q0_k [q_v,k >= tiny] (saved, 2 x n), and per-block partial
//             column sums of q0 (no atomics); q0 (n x K) is workspace scratch handed to the
//             epilogue, never saved.
//             cc: softmax rows of both logits in shared memory (their lse saved, 2 x n),
//             per-block partial marginals and a partial 2K x 2K Gram of the columns of
//             [q_a, q_b] (blocks x 4K^2 floats; K <= FCL_CC_MAX_CLUSTERS = 64).
//   epilogue: one block sums the partials in a fixed order; anchor: f = column sums of q0
//             (saved), DEC per row from q0 and f (its row total T = sum_k q0^2 / f and
//             c_dec = sum_k p_k [q0_k >= tiny] saved); cc: the cluster NT-Xent over the 2K columns
//             (cos = Gram / norms, the positive's too: cos_pos is not cancellation-free here,
//             an absolute error ~ eps / tau_c; lse and loss per column saved) and the marginal
//             entropies; both: the means and out = [total, parts...], total = weights . parts.
//   backward: NT-Xent: A_ij = P_ij + P_ji (the positive: expm1(-loss_i) + expm1(-loss_pos)),
//             G_i = sum_j A_ij zn_j = (A diag(rs)) (z p)_j accumulated per column tile (wmma:
//             the A tile scaled by `weight_scale` and rounded to fp16, as in nt_xent.cu) into an
//             fp32 m x d scratch (each element owned by one thread: no atomics), then
//             dz_i = (u - zn_i (zn_i . u)) / norm_i with u = s G_i, s = dL/dinstance / (m tau).
//             anchor: the distances and q recomputed from h, the centers and the saved lse
//             (nothing N x K is saved); G = dL/dlogit, the exact derivative of the clamped log
//             (kernels/objective/anchor.py): DEC (q0 c_dec - p [q0 >= tiny]) / n with the detached
//             target p = q0^2 / f / T, anchor (qa c_a - q0 [qa >= tiny]) / n and likewise b;
//             w_ik = -G_ik (alpha + 1) / (alpha + d2_ik);
//             dh_i = sum_k w_ik (h_i - mu_k) and per-block partials of
//             dmu_k = sum_i w_ik (mu_k - h_i), summed over the blocks by sum_splits_kernel.
//             cc: cc_weights_kernel first turns the saved Gram, column lse/loss and marginals
//             into W (2K x 2K) and e (2K) with dL/dQ_i = Q_i W^T + e for the rows Q_i =
//             [qa_i, qb_i]; the row kernel recomputes Q_i from the logits and the saved lse
//             and applies the softmax backward.
// The incoming gradient (4 or 3 floats) and the output weights are folded in the kernels.
// See fcl_kernels.h for the launcher contract.
#include <float.h>
#include <math.h>
#include <mma.h>
#include <stdint.h>

#include <type_traits>

#include "common.cuh"

namespace {

using namespace nvcuda;
using namespace fcl;  // the shared device helpers of common.cuh

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int BP = 16;         // index pairs per block
constexpr int BM = 2 * BP;     // rows per block: i and n + i
constexpr int BN = 32;         // columns per tile
constexpr int BK = 32;         // features per step
constexpr int kPerThread = BM * BN / kThreads;  // tile entries per thread
constexpr int kEpilogueThreads = 256;
static_assert(BM * 4 == kThreads && BN == 4 * kPerThread,
              "thread t owns row t / 4 and columns t % 4 + 4 j of a tile");
static_assert(BM == 32 && BN == 32 && BK == 32 && kThreads == 128,
              "the wmma path: warp w owns the 16 x 16 block (w / 2, w % 2) of a 32 x 32 tile");

// Tile elements: z p (p a power of two: exact) as fp16 for 16-bit inputs (tensor cores, fp32
// accumulation; bf16 values fit fp16's mantissa, only elements below 2^-24 of the row's largest
// flush), as fp32 for fp32 (SIMT).
template <typename T>
using Elem = typename std::conditional<std::is_same<T, float>::value, float, __half>::type;

template <typename T>
struct Tiles {
  using E = Elem<T>;
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  // Leading dimensions: wmma needs 16-byte multiples and 32-byte aligned fragment pointers.
  static constexpr int LDA = kTensorCores ? BK + 8 : BK + 1;
  static constexpr int LDS = BN + 4;
  static constexpr int LDP = BN + 8;
  __align__(128) E a[BM][LDA];    // the block's rows z p (feature step)
  __align__(128) E b[BN][LDA];    // the tile's columns z p (feature step)
  __align__(128) float s[BM][LDS];  // wmma: score / G staging; SIMT backward: the A tile
  __align__(128) E pa[kTensorCores ? BM : 1][LDP];  // wmma backward: A diag(rs_cols) scaled
  float row_p[BM], row_rs[BM];    // powers of two and 1 / max(||z p||, eps p) of the rows
  float col_p[BN], col_rs[BN];    // ... and of the tile's columns
  float col_lse[BN], col_pos[BN];  // backward: the columns' lse (base 2) and expm1(-loss)
  float dist[BP];                 // forward: 1 - cos of the block's positive pairs
};

// Row j < 2n of Z = [z_a; z_b].
template <typename T>
__device__ __forceinline__ const T* z_row(const T* z_a, const T* z_b, int n, int d, int j) {
  return j < n ? z_a + (int64_t)j * d : z_b + (int64_t)(j - n) * d;
}

// The global row of the block's row r (pairs i0 .. i0 + BP - 1, then their partners), or -1.
__device__ __forceinline__ int block_row(int i0, int n, int r) {
  const int i = i0 + r % BP;
  return i >= n ? -1 : (r < BP ? i : n + i);
}

// One warp: z's power of two p (largest |z p| in [1, 2)), rs = 1 / max(||z p||, eps p) (so
// that zn = (z p) rs = z / max(||z||, eps) for rows of any finite magnitude) and the clamped
// norm max(||z||, eps).
template <typename T>
__device__ void unit_scale(const T* z, int d, float& p, float& rs, float& norm) {
  const int lane = threadIdx.x % 32;
  float mx = 0.f;
  for (int e = lane; e < d; e += 32) mx = fmaxf(mx, fabsf(to_float(z[e])));
  p = row_scale(warp_max(mx));
  float sum = 0.f;
  for (int e = lane; e < d; e += 32) {
    const float v = to_float(z[e]) * p;
    sum = fmaf(v, v, sum);
  }
  const float s = sqrtf(warp_sum(sum));
  rs = 1.f / fmaxf(s, kNormEps * p);
  norm = fmaxf(s / p, kNormEps);
}

// dst[r][kk] = z[row_of(r)][k0 + kk] p[r] (0 outside), r < 32.
template <typename T, int LD, typename RowOf>
__device__ __forceinline__ void load_scaled(Elem<T> (*dst)[LD], const T* z_a, const T* z_b,
                                            int n, int d, int k0, RowOf row_of,
                                            const float* p) {
  for (int e = threadIdx.x; e < 32 * BK; e += kThreads) {
    const int r = e / BK, kk = e % BK;
    const int j = row_of(r);
    const float v = (j >= 0 && k0 + kk < d) ? to_float(z_row(z_a, z_b, n, d, j)[k0 + kk]) * p[r]
                                            : 0.f;
    dst[r][kk] = from_float<Elem<T>>(v);
  }
}

// frag += a (16 x 32, row-major) times the 32 x 16 operand b for one warp (wmma, fp32
// accumulation); b is row-major K x N, or col-major (its N rows of K contiguous elements).
using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

template <typename LayoutB, typename E>
__device__ __forceinline__ void warp_mma_32(Accumulator& frag, const E* a, int lda, const E* b,
                                            int ldb) {
#pragma unroll
  for (int kk = 0; kk < 32; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, E, LayoutB> fb;
    wmma::load_matrix_sync(fa, a + kk, lda);
    wmma::load_matrix_sync(fb, b + (std::is_same<LayoutB, wmma::col_major>::value ? kk : kk * ldb),
                           ldb);
    wmma::mma_sync(frag, fa, fb, frag);
  }
}

// acc[jj] = scale2 zn_row(t / 4) . zn_col(c0 + t % 4 + 4 jj): the product of the z p tiles in
// fp32, times rs of both; the caller publishes row_p / row_rs / col_p / col_rs first. Ends with
// a barrier.
template <typename T>
__device__ void score_tile(const T* z_a, const T* z_b, int n, int d, int i0, int c0,
                           float scale2, Tiles<T>& t, float (&acc)[kPerThread]) {
  using Tr = Tiles<T>;
  const int r = threadIdx.x / 4, q = threadIdx.x % 4, m = 2 * n;
  auto rows = [&](int rr) { return block_row(i0, n, rr); };
  auto cols = [&](int cc) { return c0 + cc < m ? c0 + cc : -1; };
  if constexpr (Tr::kTensorCores) {
    const int warp = threadIdx.x / 32, wr = warp / 2 * 16, wc = warp % 2 * 16;
    Accumulator frag;
    wmma::fill_fragment(frag, 0.f);
    for (int k0 = 0; k0 < d; k0 += BK) {
      load_scaled<T>(t.a, z_a, z_b, n, d, k0, rows, t.row_p);
      load_scaled<T>(t.b, z_a, z_b, n, d, k0, cols, t.col_p);
      __syncthreads();
      // b holds column rows [c][k]: read as the K x N operand it is column-major
      warp_mma_32<wmma::col_major>(frag, &t.a[wr][0], Tr::LDA, &t.b[wc][0], Tr::LDA);
      __syncthreads();
    }
    wmma::store_matrix_sync(&t.s[wr][wc], frag, Tr::LDS, wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kPerThread; ++jj) acc[jj] = t.s[r][q + 4 * jj];
  } else {
#pragma unroll
    for (int jj = 0; jj < kPerThread; ++jj) acc[jj] = 0.f;
    for (int k0 = 0; k0 < d; k0 += BK) {
      load_scaled<T>(t.a, z_a, z_b, n, d, k0, rows, t.row_p);
      load_scaled<T>(t.b, z_a, z_b, n, d, k0, cols, t.col_p);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        const float a = t.a[r][kk];
#pragma unroll
        for (int jj = 0; jj < kPerThread; ++jj) acc[jj] = fmaf(a, t.b[q + 4 * jj][kk], acc[jj]);
      }
      __syncthreads();
    }
  }
  const float row_factor = t.row_rs[r] * scale2;
#pragma unroll
  for (int jj = 0; jj < kPerThread; ++jj) acc[jj] *= row_factor * t.col_rs[q + 4 * jj];
  __syncthreads();  // t.s (wmma) and t.a / t.b are free again
}

// Forward NT-Xent of the block's rows: rows[0..m) = rs, rows[m..2m) = norm,
// rows[2m..3m) = lse (over all k != i, natural log), rows[3m..4m) = loss, rows[4m..5m) = p.
template <typename T>
__device__ void nt_xent_forward_block(const T* z_a, const T* z_b, int n, int d, float inv_tau,
                                      int i0, Tiles<T>& t, float* rows) {
  const int m = 2 * n, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int p = warp; p < BP; p += kWarps) {  // the pairs: scaling and 1 - cos
    const int i = i0 + p;
    if (i >= n) {  // whole warp
      if (lane == 0) t.row_p[p] = t.row_p[BP + p] = t.row_rs[p] = t.row_rs[BP + p] = 0.f;
      continue;
    }
    const T* a = z_a + (int64_t)i * d;
    const T* b = z_b + (int64_t)i * d;
    float pa, rsa, na, pb, rsb, nb;
    unit_scale(a, d, pa, rsa, na);
    unit_scale(b, d, pb, rsb, nb);
    float gap = 0.f, dot = 0.f;
    for (int e = lane; e < d; e += 32) {
      const float ya = to_float(a[e]) * pa * rsa, yb = to_float(b[e]) * pb * rsb;
      gap = fmaf(ya - yb, ya - yb, gap);
      dot = fmaf(ya, yb, dot);
    }
    gap = warp_sum(gap);
    dot = warp_sum(dot);
    if (lane == 0) {
      t.row_p[p] = pa;
      t.row_p[BP + p] = pb;
      t.row_rs[p] = rsa;
      t.row_rs[BP + p] = rsb;
      t.dist[p] = (na > kNormEps && nb > kNormEps) ? 0.5f * gap : 1.f - dot;
      rows[i] = rsa;
      rows[n + i] = rsb;
      rows[m + i] = na;
      rows[m + n + i] = nb;
      rows[4 * m + i] = pa;
      rows[4 * m + n + i] = pb;
    }
  }
  const int r = threadIdx.x / 4, q = threadIdx.x % 4;
  const int gi = block_row(i0, n, r);
  const int pos = gi < n ? gi + n : gi - n;
  const float scale2 = inv_tau * kLog2e;
  float run_max = -INFINITY, run_sum = 0.f;
  for (int c0 = 0; c0 < m; c0 += BN) {
    for (int cc = warp; cc < BN; cc += kWarps) {
      float p = 0.f, rs = 0.f, norm;
      if (c0 + cc < m) unit_scale(z_row(z_a, z_b, n, d, c0 + cc), d, p, rs, norm);  // warp
      if (lane == 0) {
        t.col_p[cc] = p;
        t.col_rs[cc] = rs;
      }
    }
    __syncthreads();  // col_p, col_rs (and the first time the rows' values)
    float acc[kPerThread];
    score_tile(z_a, z_b, n, d, i0, c0, scale2, t, acc);
#pragma unroll
    for (int jj = 0; jj < kPerThread; ++jj) {
      const int j = c0 + q + 4 * jj;
      if (gi < 0 || j >= m || j == gi || j == pos) acc[jj] = -INFINITY;
    }
    lse2_add(acc, run_max, run_sum);
  }
#pragma unroll
  for (int offset = 1; offset < 4; offset <<= 1) {  // the row's 4 threads, adjacent lanes
    const float other_max = __shfl_xor_sync(kFullMask, run_max, offset);
    const float other_sum = __shfl_xor_sync(kFullMask, run_sum, offset);
    lse2_merge(run_max, run_sum, other_max, other_sum);
  }
  if (gi >= 0 && q == 0) {
    const float lse_neg = (run_max + log2f(run_sum)) * kLn2;  // -inf without negatives
    const float s_pos = (1.f - t.dist[r % BP]) * inv_tau;
    const float loss = softplus(lse_neg - s_pos);
    rows[2 * m + gi] = s_pos + loss;
    rows[3 * m + gi] = loss;
  }
}

// Backward NT-Xent of the block's rows: dz from scale = dL/dinstance * inv_tau / m; g is an
// m x d fp32 scratch (G_i = sum_j A_ij zn_j).
template <typename T>
__device__ void nt_xent_backward_block(const T* z_a, const T* z_b, int n, int d, float inv_tau,
                                       int i0, const float* rows, float scale, Tiles<T>& t,
                                       float* g, T* dz_a, T* dz_b) {
  using Tr = Tiles<T>;
  const int m = 2 * n, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r = threadIdx.x / 4, q = threadIdx.x % 4;
  const int gi = block_row(i0, n, r);
  const int pos = gi < n ? gi + n : gi - n;
  const float scale2 = inv_tau * kLog2e;
  for (int e = threadIdx.x; e < BM; e += kThreads) {
    const int j = block_row(i0, n, e);
    t.row_rs[e] = j >= 0 ? rows[j] : 0.f;
    t.row_p[e] = j >= 0 ? rows[4 * m + j] : 0.f;
  }
  const float lse_i = gi >= 0 ? rows[2 * m + gi] * kLog2e : 0.f;
  const float pos_i = gi >= 0 ? expm1f(-rows[3 * m + gi]) : 0.f;  // P_i,pos - 1
  // the A tile's scale from its bound 2 min(max loss, 1) (nt_xent.cu's grad_kernel)
  __shared__ float red[kWarps];
  const float wscale = weight_scale(2.f * fminf(block_max<kWarps>(rows + 3 * m, m, red), 1.f));
  const float unscale = 1.f / wscale;
  auto cols = [&](int c0) { return [=](int cc) { return c0 + cc < m ? c0 + cc : -1; }; };
  for (int c0 = 0; c0 < m; c0 += BN) {
    for (int e = threadIdx.x; e < BN; e += kThreads) {
      const int j = c0 + e;
      t.col_rs[e] = j < m ? rows[j] : 0.f;
      t.col_p[e] = j < m ? rows[4 * m + j] : 0.f;
      t.col_lse[e] = j < m ? rows[2 * m + j] * kLog2e : 0.f;
      t.col_pos[e] = j < m ? expm1f(-rows[3 * m + j]) : 0.f;
    }
    __syncthreads();
    float acc[kPerThread];
    score_tile(z_a, z_b, n, d, i0, c0, scale2, t, acc);
#pragma unroll
    for (int jj = 0; jj < kPerThread; ++jj) {
      const int col = q + 4 * jj, j = c0 + col;
      float a = 0.f;
      if (gi >= 0 && j < m && j != gi) {
        if (j == pos) {
          a = pos_i + t.col_pos[col];
        } else {
          a = exp2f(acc[jj] - lse_i) + exp2f(acc[jj] - t.col_lse[col]);
        }
      }
      // A zn_cols = (A diag(rs_cols)) (z p)_cols
      if constexpr (Tr::kTensorCores) {
        t.pa[r][col] = __float2half_rn(a * t.col_rs[col] * wscale);
      } else {
        t.s[r][col] = a * t.col_rs[col];
      }
    }
    for (int k0 = 0; k0 < d; k0 += BK) {  // G[r][k0 + q + 4 jj] += (A diag(rs)) (z p)_cols
      load_scaled<T>(t.b, z_a, z_b, n, d, k0, cols(c0), t.col_p);
      __syncthreads();  // (the first step also publishes the A tile)
      float part[kPerThread];
      if constexpr (Tr::kTensorCores) {
        const int wr = warp / 2 * 16, wc = warp % 2 * 16;
        Accumulator frag;
        wmma::fill_fragment(frag, 0.f);
        warp_mma_32<wmma::row_major>(frag, &t.pa[wr][0], Tr::LDP, &t.b[0][wc], Tr::LDA);
        wmma::store_matrix_sync(&t.s[wr][wc], frag, Tr::LDS, wmma::mem_row_major);
        __syncthreads();
#pragma unroll
        for (int jj = 0; jj < kPerThread; ++jj) part[jj] = t.s[r][q + 4 * jj] * unscale;
      } else {
#pragma unroll
        for (int jj = 0; jj < kPerThread; ++jj) part[jj] = 0.f;
#pragma unroll 4
        for (int cc = 0; cc < BN; ++cc) {
          const float a = t.s[r][cc];
#pragma unroll
          for (int jj = 0; jj < kPerThread; ++jj) {
            part[jj] = fmaf(a, to_float(t.b[cc][q + 4 * jj]), part[jj]);
          }
        }
      }
      if (gi >= 0) {
#pragma unroll
        for (int jj = 0; jj < kPerThread; ++jj) {
          const int e = k0 + q + 4 * jj;
          if (e < d) {
            float* ge = g + (int64_t)gi * d + e;
            *ge = (c0 == 0 ? 0.f : *ge) + part[jj];
          }
        }
      }
      __syncthreads();
    }
  }
  // The block's G rows are complete (its own global writes are visible after the barrier).
  for (int rr = warp; rr < BM; rr += kWarps) {
    const int row = block_row(i0, n, rr);
    if (row < 0) continue;  // whole warp
    const T* z = z_row(z_a, z_b, n, d, row);
    const float c = t.row_p[rr] * t.row_rs[rr], norm = rows[m + row];  // zn = z c
    const float* gr = g + (int64_t)row * d;
    float dot = 0.f;
    for (int e = lane; e < d; e += 32) dot = fmaf(to_float(z[e]) * c, scale * gr[e], dot);
    dot = warp_sum(dot);
    const float radial = norm > kNormEps ? dot : 0.f;
    T* out = row < n ? dz_a + (int64_t)row * d : dz_b + (int64_t)(row - n) * d;
    for (int e = lane; e < d; e += 32) {
      out[e] = from_float<T>((scale * gr[e] - to_float(z[e]) * c * radial) / norm);
    }
  }
}

// Sum of v over the block, the same value in every thread, in a fixed order.
__device__ float block_sum(float v, float* scratch) {
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // scratch is free
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// ---------------------------------------------------------------- anchor (DEC + anchor KL)

// View v of three pointers, without a dynamically indexed (local-memory) array.
template <typename P>
__device__ __forceinline__ P pick(int v, P p0, P p1, P p2) {
  return v == 0 ? p0 : (v == 1 ? p1 : p2);
}

struct ClusterInputs {  // h0, h_a, h_b (n x f, dtype h_dtype) and the fp32 centers (k x f)
  int dtype;
  const void *h0, *h_a, *h_b;
  const float* centers;
  int k, f;
  float alpha;
};

// The Student-t logit -(alpha + 1) / 2 log1p(d2 / alpha) of a squared distance and q = its
// exp minus the row's log-normaliser lse (the forward and the backward use these same two
// expressions, so the recomputed q is the forward's).
__device__ __forceinline__ float student_t_logit(float d2, float alpha) {
  return -0.5f * (alpha + 1.f) * log1pf(d2 / alpha);
}
__device__ __forceinline__ float student_t_q(float d2, float alpha, float lse) {
  return expf(student_t_logit(d2, alpha) - lse);
}

// One warp: the squared distances d2_c = ||h_i - mu_c||^2 of view v's row i against all K
// centers (squared differences in fp32, like the reference), written to dist2[c] by lane c % 32
// (the lane that reads them back: no __syncwarp needed).
__device__ void student_t_dist2(const ClusterInputs& in, int v, int i, float* dist2) {
  const int lane = threadIdx.x % 32;
  const void* h = pick(v, in.h0, in.h_a, in.h_b);
  const int64_t h_base = (int64_t)i * in.f;
  for (int c = 0; c < in.k; ++c) {
    float partial = 0.f;
    for (int e = lane; e < in.f; e += 32) {
      const float diff = load_any(h, in.dtype, h_base + e) - in.centers[(int64_t)c * in.f + e];
      partial = fmaf(diff, diff, partial);
    }
    const float d2 = warp_sum(partial);
    if (lane == c % 32) dist2[c] = d2;
  }
}

// ... and the row's log-normaliser lse = log sum_c exp(logit_c) (the same in every lane).
__device__ float student_t_lse(const ClusterInputs& in, int v, int i, float* dist2) {
  const int lane = threadIdx.x % 32;
  student_t_dist2(in, v, i, dist2);
  float row_max = -INFINITY;
  for (int c = lane; c < in.k; c += 32) {
    row_max = fmaxf(row_max, student_t_logit(dist2[c], in.alpha));
  }
  row_max = warp_max(row_max);
  float sum = 0.f;
  for (int c = lane; c < in.k; c += 32) sum += expf(student_t_logit(dist2[c], in.alpha) - row_max);
  return row_max + logf(warp_sum(sum));
}

// Forward row kernel. assign (7 x n, saved): the Student-t lse of h0, h_a, h_b per row
// ([0..3n)), then ([5n..7n)) c_a and c_b = sum_k q0_k [q_v,k >= tiny]; the epilogue fills
// [3n..5n). q0 (n x k) and dist2 (n x k, one view at a time) are scratch of this forward only.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    anchor_forward_kernel(const T* __restrict__ z_a, const T* __restrict__ z_b, int n, int d,
                          float inv_tau, ClusterInputs in, float* __restrict__ rows,
                          float* __restrict__ assign, float* __restrict__ q0,
                          float* __restrict__ dist2, float* __restrict__ col_part,
                          float* __restrict__ anchor_rows) {
  __shared__ Tiles<T> t;
  const int i0 = blockIdx.x * BP, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int k = in.k;
  nt_xent_forward_block(z_a, z_b, n, d, inv_tau, i0, t, rows);
  for (int p = warp; p < BP; p += kWarps) {
    const int i = i0 + p;
    if (i >= n) continue;  // whole warp
    float* q0i = q0 + (int64_t)i * k;
    float* di = dist2 + (int64_t)i * k;
    float loss = 0.f;  // lane c % 32 owns column c of q0i and di
    for (int v = 0; v < 3; ++v) {
      const float lse = student_t_lse(in, v, i, di);
      float clamp_sum = 0.f;
      for (int c = lane; c < k; c += 32) {
        const float q = student_t_q(di[c], in.alpha, lse);
        if (v == 0) {
          q0i[c] = q;
          loss += 2.f * xlogx(q);
        } else {
          loss -= q0i[c] * safe_log(q);
          clamp_sum += q >= FLT_MIN ? q0i[c] : 0.f;
        }
      }
      clamp_sum = warp_sum(clamp_sum);
      if (lane == 0) {
        assign[(int64_t)v * n + i] = lse;
        if (v > 0) assign[(int64_t)(4 + v) * n + i] = clamp_sum;
      }
    }
    loss = warp_sum(loss);
    if (lane == 0) anchor_rows[i] = loss;
  }
  __syncthreads();  // q0 of the block's rows
  for (int c = threadIdx.x; c < k; c += kThreads) {
    float sum = 0.f;
    for (int p = 0; p < BP && i0 + p < n; ++p) sum += q0[(int64_t)(i0 + p) * k + c];
    col_part[(int64_t)blockIdx.x * k + c] = sum;
  }
}

// One block: f = column sums of q0 (saved), DEC per row from q0 and f with the row totals
// T_i = sum_k q0^2 / f and c_dec = sum_k p_k [q0_k >= tiny] (saved: assign[3n..5n)), the means
// and out = [total, instance, DEC, anchor].
__global__ void __launch_bounds__(kEpilogueThreads)
    anchor_epilogue_kernel(int n, int k, int blocks, const float* __restrict__ col_part,
                           const float* __restrict__ q0, const float* __restrict__ row_loss,
                           const float* __restrict__ anchor_rows, float w_instance,
                           float w_cluster, float w_anchor, float* __restrict__ f,
                           float* __restrict__ assign, float* __restrict__ out) {
  __shared__ float scratch[kEpilogueThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = kEpilogueThreads / 32;
  for (int c = threadIdx.x; c < k; c += kEpilogueThreads) {
    float sum = 0.f;
    for (int b = 0; b < blocks; ++b) sum += col_part[(int64_t)b * k + c];
    f[c] = sum;
  }
  __syncthreads();
  float dec = 0.f;  // this warp's rows, in order
  for (int i = warp; i < n; i += warps) {
    const float* qi = q0 + (int64_t)i * k;
    float weight_sum = 0.f;
    for (int c = lane; c < k; c += 32) weight_sum += qi[c] * qi[c] / fmaxf(f[c], FLT_MIN);
    weight_sum = warp_sum(weight_sum);
    float loss = 0.f, clamp_sum = 0.f;
    for (int c = lane; c < k; c += 32) {
      const float p = qi[c] * qi[c] / fmaxf(f[c], FLT_MIN) / weight_sum;
      loss += xlogx(p) - p * safe_log(qi[c]);
      clamp_sum += qi[c] >= FLT_MIN ? p : 0.f;
    }
    dec += warp_sum(loss);
    clamp_sum = warp_sum(clamp_sum);
    if (lane == 0) {
      assign[3 * (int64_t)n + i] = weight_sum;
      assign[4 * (int64_t)n + i] = clamp_sum;
    }
  }
  float instance = 0.f, anchor = 0.f;
  for (int i = threadIdx.x; i < 2 * n; i += kEpilogueThreads) instance += row_loss[i];
  for (int i = threadIdx.x; i < n; i += kEpilogueThreads) anchor += anchor_rows[i];
  instance = block_sum(instance, scratch) / (2 * n);
  dec = block_sum(lane == 0 ? dec : 0.f, scratch) / n;
  anchor = block_sum(anchor, scratch) / n;
  if (threadIdx.x == 0) {
    out[0] = w_instance * instance + w_cluster * dec + w_anchor * anchor;
    out[1] = instance;
    out[2] = dec;
    out[3] = anchor;
  }
}

// dh_i of view v = sum_k w_ik (h_i - mu_k) from the warp's row w (published by __syncwarp).
__device__ void student_t_dh(const ClusterInputs& in, int v, int i, const float* w, void* dh) {
  const int lane = threadIdx.x % 32;
  const void* h = pick(v, in.h0, in.h_a, in.h_b);
  const int64_t h_base = (int64_t)i * in.f;
  for (int e = lane; e < in.f; e += 32) {
    const float he = load_any(h, in.dtype, h_base + e);
    float sum = 0.f;
    for (int c = 0; c < in.k; ++c) sum = fmaf(w[c], he - in.centers[(int64_t)c * in.f + e], sum);
    store_any(dh, in.dtype, h_base + e, sum);
  }
}

// Backward row kernel: the Student-t rows are recomputed from h, the centers and the saved lse
// (no N x K state); with G = dL/dlogit (the exact derivative of the clamped log):
//   DEC    G0 = s_dec (q0 c_dec - p [q0 >= tiny]), p = q0^2 / f / T (detached)
//   anchor Ga = s_anc (qa c_a - q0 [qa >= tiny]), likewise b, none into q0,
// w = -G (alpha + 1) / (alpha + d2) in w (3 x n x k scratch, holding d2 until then).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    anchor_backward_kernel(const T* __restrict__ z_a, const T* __restrict__ z_b, int n, int d,
                           float inv_tau, ClusterInputs in, const float* __restrict__ rows,
                           const float* __restrict__ assign, const float* __restrict__ f,
                           const float* __restrict__ grad, float w_instance, float w_cluster,
                           float w_anchor, float* __restrict__ g, float* __restrict__ w,
                           float* __restrict__ center_part, T* __restrict__ dz_a,
                           T* __restrict__ dz_b, void* dh0, void* dh_a, void* dh_b) {
  __shared__ Tiles<T> t;
  const int i0 = blockIdx.x * BP, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int k = in.k, nf = in.f;
  const float s_instance = (grad[0] * w_instance + grad[1]) * inv_tau / (2 * n);
  const float s_cluster = (grad[0] * w_cluster + grad[2]) / n;
  const float s_anchor = (grad[0] * w_anchor + grad[3]) / n;
  nt_xent_backward_block(z_a, z_b, n, d, inv_tau, i0, rows, s_instance, t, g, dz_a, dz_b);
  const float alpha = in.alpha, power = alpha + 1.f;
  for (int p = warp; p < BP; p += kWarps) {
    const int i = i0 + p;
    if (i >= n) continue;  // whole warp
    float* w0 = w + (int64_t)i * k;  // d2 of h0 until the views a and b are done
    student_t_dist2(in, 0, i, w0);
    const float lse0 = assign[i];
    for (int v = 1; v < 3; ++v) {
      float* wv = w + ((int64_t)v * n + i) * k;
      student_t_dist2(in, v, i, wv);
      const float lse = assign[(int64_t)v * n + i];
      const float clamp_sum = assign[(int64_t)(4 + v) * n + i];
      for (int c = lane; c < k; c += 32) {  // lane c % 32 owns column c
        const float q0 = student_t_q(w0[c], alpha, lse0);
        const float q = student_t_q(wv[c], alpha, lse);
        const float grad_logit = s_anchor * (q * clamp_sum - (q >= FLT_MIN ? q0 : 0.f));
        wv[c] = -grad_logit * power / (alpha + wv[c]);
      }
      __syncwarp();  // every lane reads the whole row of w
      student_t_dh(in, v, i, wv, pick(v, dh0, dh_a, dh_b));
    }
    const float total = assign[3 * (int64_t)n + i], clamp_sum = assign[4 * (int64_t)n + i];
    for (int c = lane; c < k; c += 32) {
      const float d2 = w0[c];
      const float q0 = student_t_q(d2, alpha, lse0);
      const float target = q0 * q0 / fmaxf(f[c], FLT_MIN) / total;
      const float grad_logit = s_cluster * (q0 * clamp_sum - (q0 >= FLT_MIN ? target : 0.f));
      w0[c] = -grad_logit * power / (alpha + d2);
    }
    __syncwarp();
    student_t_dh(in, 0, i, w0, dh0);
  }
  __syncthreads();  // w of the block's rows
  const int64_t count = (int64_t)k * nf;
  for (int64_t at = threadIdx.x; at < count; at += kThreads) {
    const int c = static_cast<int>(at / nf), e = static_cast<int>(at % nf);
    const float mu = in.centers[at];
    float sum = 0.f;
    for (int p = 0; p < BP && i0 + p < n; ++p) {
      for (int v = 0; v < 3; ++v) {
        const float h =
            load_any(pick(v, in.h0, in.h_a, in.h_b), in.dtype, (int64_t)(i0 + p) * nf + e);
        sum = fmaf(w[((int64_t)v * n + i0 + p) * k + c], mu - h, sum);
      }
    }
    center_part[(int64_t)blockIdx.x * count + at] = sum;
  }
}

// ---------------------------------------------------------------- cc (Contrastive Clustering)

constexpr int kMaxClusters = FCL_CC_MAX_CLUSTERS;  // the rows' [qa_i, qb_i] in shared memory
// An element index of a 2K x 2K matrix fits in int under the limit the launchers enforce (a
// 64-bit loop index spilled in cc_weights_kernel); offsets that multiply it by a block count,
// and the workspace sizes, are int64.
static_assert(4 * kMaxClusters * kMaxClusters < (1 << 30), "2K x 2K indices fit in int");

// One warp: the block's row p of [softmax(logits_a), softmax(logits_b)] (row i) into qs[p]
// (q = exp(logit - lse), the same expression forward and backward); returns the lse of view v
// in lse_v (lane c % 32 writes column c; the caller publishes qs).
__device__ void softmax_pair(int l_dtype, const void* logits_a, const void* logits_b, int k,
                             int i, float* qs, float& lse_a, float& lse_b,
                             const float* saved_lse, int n) {
  const int lane = threadIdx.x % 32;
  for (int v = 0; v < 2; ++v) {
    const void* logits = v == 0 ? logits_a : logits_b;
    const int64_t base = (int64_t)i * k;
    float lse;
    if (saved_lse != nullptr) {
      lse = saved_lse[(int64_t)v * n + i];
    } else {
      float mx = -INFINITY;
      for (int c = lane; c < k; c += 32) mx = fmaxf(mx, load_any(logits, l_dtype, base + c));
      mx = warp_max(mx);
      float sum = 0.f;
      for (int c = lane; c < k; c += 32) sum += expf(load_any(logits, l_dtype, base + c) - mx);
      lse = mx + logf(warp_sum(sum));
    }
    for (int c = lane; c < k; c += 32) {
      qs[v * k + c] = expf(load_any(logits, l_dtype, base + c) - lse);
    }
    (v == 0 ? lse_a : lse_b) = lse;
  }
}

// Forward row kernel: NT-Xent, the block's softmax rows (shared memory only; their lse saved
// in row_lse, 2 x n), per-block partial marginals and the partial 2K x 2K Gram.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    cc_forward_kernel(const T* __restrict__ z_a, const T* __restrict__ z_b, int n, int d,
                      float inv_tau, int l_dtype, const void* logits_a, const void* logits_b,
                      int k, float* __restrict__ rows, float* __restrict__ row_lse,
                      float* __restrict__ gram_part, float* __restrict__ marginal_part) {
  __shared__ Tiles<T> t;
  __shared__ float qs[BP][2 * kMaxClusters];
  const int i0 = blockIdx.x * BP, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  nt_xent_forward_block(z_a, z_b, n, d, inv_tau, i0, t, rows);
  for (int p = warp; p < BP; p += kWarps) {
    const int i = i0 + p;
    if (i >= n) continue;  // whole warp
    float lse_a, lse_b;
    softmax_pair(l_dtype, logits_a, logits_b, k, i, qs[p], lse_a, lse_b, nullptr, n);
    if (lane == 0) {
      row_lse[i] = lse_a;
      row_lse[(int64_t)n + i] = lse_b;
    }
  }
  __syncthreads();  // qs of the block's rows
  const int k2 = 2 * k;
  const int k2sq = k2 * k2;  // <= 4 kMaxClusters^2
  const int last = n - i0 < BP ? n - i0 : BP;
  for (int j = threadIdx.x; j < k2; j += kThreads) {
    float sum = 0.f;
    for (int p = 0; p < last; ++p) sum += qs[p][j];
    marginal_part[(int64_t)blockIdx.x * k2 + j] = sum;
  }
  for (int at = threadIdx.x; at < k2sq; at += kThreads) {
    const int j = at / k2, l = at % k2;
    float sum = 0.f;
    for (int p = 0; p < last; ++p) sum = fmaf(qs[p][j], qs[p][l], sum);
    gram_part[(int64_t)blockIdx.x * k2sq + at] = sum;
  }
}

// Clamped column norm of the 2K cluster columns from the Gram diagonal.
__device__ __forceinline__ float column_norm(const float* gram, int k2, int j) {
  return fmaxf(sqrtf(gram[(int64_t)j * k2 + j]), kNormEps);
}

// One block: Gram and marginal sums (saved), the cluster NT-Xent over the 2K columns (lse and
// loss per column saved in cluster_rows[0..2K), [2K..4K); the marginal sums in [4K..6K)), the
// entropies and out = [total, instance, cluster].
__global__ void __launch_bounds__(kEpilogueThreads)
    cc_epilogue_kernel(int n, int k, int blocks, const float* __restrict__ gram_part,
                       const float* __restrict__ marginal_part,
                       const float* __restrict__ row_loss, float inv_tau_c, float w_instance,
                       float w_cluster, float* __restrict__ gram,
                       float* __restrict__ cluster_rows, float* __restrict__ out) {
  __shared__ float scratch[kEpilogueThreads / 32];
  const int k2 = 2 * k;
  const int k2sq = k2 * k2;  // <= 4 kMaxClusters^2
  for (int at = threadIdx.x; at < k2sq; at += kEpilogueThreads) {
    float sum = 0.f;
    for (int b = 0; b < blocks; ++b) sum += gram_part[(int64_t)b * k2sq + at];
    gram[at] = sum;
  }
  for (int j = threadIdx.x; j < k2; j += kEpilogueThreads) {
    float sum = 0.f;
    for (int b = 0; b < blocks; ++b) sum += marginal_part[(int64_t)b * k2 + j];
    cluster_rows[2 * k2 + j] = sum;
  }
  __syncthreads();
  float cluster = 0.f, entropy = 0.f;
  for (int j = threadIdx.x; j < k2; j += kEpilogueThreads) {
    const int pos = j < k ? j + k : j - k;
    const float nj = column_norm(gram, k2, j);
    float mx = -INFINITY;
    for (int l = 0; l < k2; ++l) {
      if (l == j || l == pos) continue;
      mx = fmaxf(mx, gram[(int64_t)j * k2 + l] / (nj * column_norm(gram, k2, l)) * inv_tau_c);
    }
    float sum = 0.f;
    for (int l = 0; l < k2; ++l) {
      if (l == j || l == pos) continue;
      sum += expf(gram[(int64_t)j * k2 + l] / (nj * column_norm(gram, k2, l)) * inv_tau_c - mx);
    }
    const float lse_neg = mx == -INFINITY ? -INFINITY : mx + logf(sum);
    const float s_pos = gram[(int64_t)j * k2 + pos] / (nj * column_norm(gram, k2, pos)) * inv_tau_c;
    const float loss = softplus(lse_neg - s_pos);
    cluster_rows[j] = s_pos + loss;
    cluster_rows[k2 + j] = loss;
    cluster += loss;
    const float share = cluster_rows[2 * k2 + j] / n;
    entropy += share * safe_log(share);
  }
  float instance = 0.f;
  for (int i = threadIdx.x; i < 2 * n; i += kEpilogueThreads) instance += row_loss[i];
  instance = block_sum(instance, scratch) / (2 * n);
  cluster = block_sum(cluster, scratch) / k2 + block_sum(entropy, scratch) + 2.f * logf(k);
  if (threadIdx.x == 0) {
    out[0] = w_instance * instance + w_cluster * cluster;
    out[1] = instance;
    out[2] = cluster;
  }
}

// A_jl of the cluster NT-Xent (P_jl + P_lj; the positive's expm1(-loss_j) + expm1(-loss_l))
// and cos_jl, from the saved Gram and column lse / loss.
__device__ __forceinline__ float cluster_weight(const float* gram, const float* cluster_rows,
                                                int k, int j, int l, float inv_tau_c,
                                                float& cosine) {
  const int k2 = 2 * k;
  cosine = gram[(int64_t)j * k2 + l] / (column_norm(gram, k2, j) * column_norm(gram, k2, l));
  if (l == (j < k ? j + k : j - k)) {
    return expm1f(-cluster_rows[k2 + j]) + expm1f(-cluster_rows[k2 + l]);
  }
  const float s = cosine * inv_tau_c;
  return expf(s - cluster_rows[j]) + expf(s - cluster_rows[l]);
}

// One block: dL/dQ_i = Q_i W^T + e for the rows Q_i = [qa_i, qb_i] (dL/dcluster folded in):
// W_jl = s A_jl / (2K tau n_j n_l), W_jj = -s sum_l A_jl cos_jl / (2K tau n_j^2) (the
// normalisation's radial part, 0 for a clamped norm), e_j = s (safe_log(P_j) + [P_j >= tiny])
// / n with P_j the column mean.
__global__ void __launch_bounds__(kEpilogueThreads)
    cc_weights_kernel(int n, int k, const float* __restrict__ gram,
                      const float* __restrict__ cluster_rows, const float* __restrict__ grad,
                      float w_cluster, float inv_tau_c, float* __restrict__ weights,
                      float* __restrict__ offsets) {
  const int k2 = 2 * k;
  const float s = grad[0] * w_cluster + grad[2];
  const float scale = s * inv_tau_c / k2;
  for (int at = threadIdx.x; at < k2 * k2; at += kEpilogueThreads) {  // <= 4 kMaxClusters^2
    const int j = at / k2, l = at % k2;
    if (j == l) continue;
    float cosine;
    const float a = cluster_weight(gram, cluster_rows, k, j, l, inv_tau_c, cosine);
    weights[at] = scale * a / (column_norm(gram, k2, j) * column_norm(gram, k2, l));
  }
  for (int j = threadIdx.x; j < k2; j += kEpilogueThreads) {
    float radial = 0.f;
    for (int l = 0; l < k2; ++l) {
      if (l == j) continue;
      float cosine;
      const float a = cluster_weight(gram, cluster_rows, k, j, l, inv_tau_c, cosine);
      radial = fmaf(a, cosine, radial);
    }
    const float nj = column_norm(gram, k2, j);
    weights[(int64_t)j * k2 + j] = nj > kNormEps ? -scale * radial / (nj * nj) : 0.f;
    const float share = cluster_rows[2 * k2 + j] / n;
    offsets[j] = s * (safe_log(share) + (share >= FLT_MIN ? 1.f : 0.f)) / n;
  }
}

// Backward row kernel: NT-Xent, then the softmax rows recomputed from the logits and the saved
// lse into shared memory and the softmax backward of dL/dq = Q_i W^T + e.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    cc_backward_kernel(const T* __restrict__ z_a, const T* __restrict__ z_b, int n, int d,
                       float inv_tau, int l_dtype, const void* logits_a, const void* logits_b,
                       int k, const float* __restrict__ rows, const float* __restrict__ row_lse,
                       const float* __restrict__ grad, float w_instance,
                       const float* __restrict__ weights, const float* __restrict__ offsets,
                       float* __restrict__ g, T* __restrict__ dz_a, T* __restrict__ dz_b,
                       void* dlogits_a, void* dlogits_b) {
  __shared__ Tiles<T> t;
  __shared__ float qs[BP][2 * kMaxClusters];
  const int i0 = blockIdx.x * BP, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float s_instance = (grad[0] * w_instance + grad[1]) * inv_tau / (2 * n);
  nt_xent_backward_block(z_a, z_b, n, d, inv_tau, i0, rows, s_instance, t, g, dz_a, dz_b);
  const int k2 = 2 * k;
  for (int p = warp; p < BP; p += kWarps) {
    const int i = i0 + p;
    if (i >= n) continue;  // whole warp
    const float* qi = qs[p];  // [qa_i, qb_i]
    float lse_a, lse_b;
    softmax_pair(l_dtype, logits_a, logits_b, k, i, qs[p], lse_a, lse_b, row_lse, n);
    __syncwarp();  // every lane reads the whole row
    for (int v = 0; v < 2; ++v) {
      auto dq = [&](int c) {  // dL/dq_ic of this view
        const int j = v * k + c;
        float sum = offsets[j];
        for (int l = 0; l < k2; ++l) sum = fmaf(weights[(int64_t)j * k2 + l], qi[l], sum);
        return sum;
      };
      float dot = 0.f;
      for (int c = lane; c < k; c += 32) dot = fmaf(dq(c), qi[v * k + c], dot);
      dot = warp_sum(dot);
      void* out = v == 0 ? dlogits_a : dlogits_b;
      for (int c = lane; c < k; c += 32) {
        store_any(out, l_dtype, (int64_t)i * k + c, qi[v * k + c] * (dq(c) - dot));
      }
    }
  }
}

bool valid_sizes(int n, int d, int k) { return n >= 1 && d >= 1 && k >= 1; }

}  // namespace

extern "C" long long fcl_objective_workspace(int objective, int backward, int n, int d, int k,
                                             int f) {
  const long long blocks = blocks_for(n, BP), m = 2LL * n, k2 = 2LL * k;
  if (objective == FCL_OBJECTIVE_ANCHOR) {  // forward: partial f, anchor rows, q0 and d2 rows
    return backward ? m * d + 3LL * n * k + blocks * k * f : blocks * k + n + 2LL * n * k;
  }
  return backward ? m * d + k2 * k2 + k2 : blocks * (k2 * k2 + k2);
}

extern "C" int fcl_anchor_objective_forward(int z_dtype, const void* z_a, const void* z_b, int n,
                                            int d, int h_dtype, const void* h0, const void* h_a,
                                            const void* h_b, const float* centers, int k, int f,
                                            float inv_tau, float alpha, float w_instance,
                                            float w_cluster, float w_anchor, float* rows,
                                            float* assign, float* col_sums, float* workspace,
                                            float* out, cudaStream_t stream) {
  if (!valid_sizes(n, d, k) || f < 1 || !(alpha > 0.f)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const int blocks = blocks_for(n, BP);
  const ClusterInputs in{h_dtype, h0, h_a, h_b, centers, k, f, alpha};
  float* col_part = workspace;
  float* anchor_rows = col_part + (int64_t)blocks * k;
  float* q0 = anchor_rows + n;
  float* dist2 = q0 + (int64_t)n * k;
  return dispatch(z_dtype, [&](auto tag) {
    using T = decltype(tag);
    anchor_forward_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(z_a), static_cast<const T*>(z_b), n, d, inv_tau, in, rows, assign,
        q0, dist2, col_part, anchor_rows);
    const int launched = static_cast<int>(cudaGetLastError());
    if (launched != 0) return launched;
    anchor_epilogue_kernel<<<1, kEpilogueThreads, 0, stream>>>(
        n, k, blocks, col_part, q0, rows + 3 * 2 * (int64_t)n, anchor_rows, w_instance,
        w_cluster, w_anchor, col_sums, assign, out);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_anchor_objective_backward(
    int z_dtype, const void* z_a, const void* z_b, int n, int d, int h_dtype, const void* h0,
    const void* h_a, const void* h_b, const float* centers, int k, int f, float inv_tau,
    float alpha, float w_instance, float w_cluster, float w_anchor, const float* rows,
    const float* assign, const float* col_sums, const float* grad, float* workspace, void* dz_a,
    void* dz_b, void* dh0, void* dh_a, void* dh_b, float* dcenters, cudaStream_t stream) {
  if (!valid_sizes(n, d, k) || f < 1 || !(alpha > 0.f)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const int blocks = blocks_for(n, BP);
  const ClusterInputs in{h_dtype, h0, h_a, h_b, centers, k, f, alpha};
  float* g = workspace;
  float* w = g + 2 * (int64_t)n * d;
  float* center_part = w + 3 * (int64_t)n * k;
  return dispatch(z_dtype, [&](auto tag) {
    using T = decltype(tag);
    anchor_backward_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(z_a), static_cast<const T*>(z_b), n, d, inv_tau, in, rows, assign,
        col_sums, grad, w_instance, w_cluster, w_anchor, g, w, center_part,
        static_cast<T*>(dz_a), static_cast<T*>(dz_b), dh0, dh_a, dh_b);
    const int launched = static_cast<int>(cudaGetLastError());
    if (launched != 0) return launched;
    const int64_t count = (int64_t)k * f;
    const int grid =
        static_cast<int>(count / kEpilogueThreads < 4096 ? count / kEpilogueThreads + 1 : 4096);
    sum_splits_kernel<kEpilogueThreads><<<grid, kEpilogueThreads, 0, stream>>>(
        center_part, count, blocks, dcenters);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_cc_objective_forward(int z_dtype, const void* z_a, const void* z_b, int n,
                                        int d, int l_dtype, const void* logits_a,
                                        const void* logits_b, int k, float inv_tau,
                                        float inv_tau_c, float w_instance, float w_cluster,
                                        float* rows, float* row_lse, float* gram,
                                        float* cluster_rows, float* workspace, float* out,
                                        cudaStream_t stream) {
  if (!valid_sizes(n, d, k) || k > kMaxClusters) return static_cast<int>(cudaErrorInvalidValue);
  const int blocks = blocks_for(n, BP);
  const int64_t k2 = 2 * (int64_t)k;
  float* gram_part = workspace;
  float* marginal_part = workspace + blocks * k2 * k2;
  return dispatch(z_dtype, [&](auto tag) {
    using T = decltype(tag);
    cc_forward_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(z_a), static_cast<const T*>(z_b), n, d, inv_tau, l_dtype,
        logits_a, logits_b, k, rows, row_lse, gram_part, marginal_part);
    const int launched = static_cast<int>(cudaGetLastError());
    if (launched != 0) return launched;
    cc_epilogue_kernel<<<1, kEpilogueThreads, 0, stream>>>(
        n, k, blocks, gram_part, marginal_part, rows + 3 * 2 * (int64_t)n, inv_tau_c, w_instance,
        w_cluster, gram, cluster_rows, out);
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int fcl_cc_objective_backward(int z_dtype, const void* z_a, const void* z_b, int n,
                                         int d, int l_dtype, const void* logits_a,
                                         const void* logits_b, int k, float inv_tau,
                                         float inv_tau_c, float w_instance, float w_cluster,
                                         const float* rows, const float* row_lse,
                                         const float* gram, const float* cluster_rows,
                                         const float* grad, float* workspace, void* dz_a,
                                         void* dz_b, void* dlogits_a, void* dlogits_b,
                                         cudaStream_t stream) {
  if (!valid_sizes(n, d, k) || k > kMaxClusters) return static_cast<int>(cudaErrorInvalidValue);
  const int blocks = blocks_for(n, BP);
  const int64_t k2 = 2 * (int64_t)k;
  float* g = workspace;
  float* weights = g + 2 * (int64_t)n * d;
  float* offsets = weights + k2 * k2;
  cc_weights_kernel<<<1, kEpilogueThreads, 0, stream>>>(n, k, gram, cluster_rows, grad,
                                                        w_cluster, inv_tau_c, weights, offsets);
  const int launched = static_cast<int>(cudaGetLastError());
  if (launched != 0) return launched;
  return dispatch(z_dtype, [&](auto tag) {
    using T = decltype(tag);
    cc_backward_kernel<T><<<blocks, kThreads, 0, stream>>>(
        static_cast<const T*>(z_a), static_cast<const T*>(z_b), n, d, inv_tau, l_dtype,
        logits_a, logits_b, k, rows, row_lse, grad, w_instance, weights, offsets, g,
        static_cast<T*>(dz_a), static_cast<T*>(dz_b), dlogits_a, dlogits_b);
    return static_cast<int>(cudaGetLastError());
  });
}
