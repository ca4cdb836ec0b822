// Tiles shared by the NT-Xent kernels (csrc/nt_xent.cu) and the memory-bank kernels
// (csrc/nt_xent_bank.cu): block shape, shared-memory layout, global -> shared tile loads, the
// fp32-accumulated score tile A_rows B_cols^T and the gradient accumulator G += P Zd. See
// nt_xent.cu's header comment for the design.
#ifndef FASTCLUSTER_CL_TILES_CUH_
#define FASTCLUSTER_CL_TILES_CUH_

#include <mma.h>
#include <stdint.h>

#include <type_traits>

#include "common.cuh"

namespace fcl {
namespace tiles {

using namespace nvcuda;

constexpr int kThreads = 128;  // 4 warps; each warp owns 16 of the BM rows on the wmma path
constexpr int kWarps = kThreads / 32;
constexpr int BM = 64;         // rows per block
constexpr int BN = 64;         // columns per tile
constexpr int BK = 32;         // features per step of the S product

// The normalised rows' element type: fp16 for 16-bit inputs, fp32 for fp32.
template <typename T>
using Normed = typename std::conditional<std::is_same<T, float>::value, float, __half>::type;

constexpr int round_up(int x, int to) { return (x + to - 1) / to * to; }
constexpr int max_of(int a, int b) { return a > b ? a : b; }

// Shared-memory layout per element type. Offsets are multiples of 128 bytes and every wmma
// pointer lands on a 32-byte boundary: rows of 16-bit tiles are padded by 8 elements (16 bytes),
// fp32 score/staging tiles by 4 floats, fp32 SIMT operand tiles by 1 float (conflict-free
// column reads). Padding also spreads rows across banks.
template <typename T>
struct Tile {
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  static constexpr int kPad = kTensorCores ? 8 : 1;
  static constexpr int LDA = BK + kPad;                 // As (BM x BK) and Bs (BN x BK)
  static constexpr int LDS = BN + 4;                    // Ss: fp32 scores, BM x BN
  static constexpr int BD = kTensorCores ? 128 : 64;    // gradient features per block
  static constexpr int LDP = kTensorCores ? BN + 8 : LDS;  // Ps: A tile (fp32: in place in Ss)
  static constexpr int LDZ = BD + kPad;                 // Zd: BN x BD slice of the columns
  static constexpr int LDG = BD + 4;                    // fp32 staging of G (wmma path)

  static constexpr int kStageBytes = round_up(2 * BM * LDA * (int)sizeof(T), 128);  // As, Bs
  static constexpr int kPBytes = kTensorCores ? round_up(BM * LDP * (int)sizeof(T), 128) : 0;
  static constexpr int kZOffset = kPBytes;              // Ps, Zd alias As, Bs (phase 2)
  static constexpr int kZBytes = round_up(BN * LDZ * (int)sizeof(T), 128);
  static constexpr int kSOffset = max_of(kStageBytes, kPBytes + kZBytes);
  static constexpr int kLseOffset = kSOffset + round_up(BM * LDS * (int)sizeof(float), 128);
  static constexpr int kRsOffset = kLseOffset + round_up(BN * (int)sizeof(float), 128);
  static constexpr int kBytes = kRsOffset + round_up(BN * (int)sizeof(float), 128);

  static_assert(BM == kWarps * 16, "each warp owns 16 rows on the wmma path");
  static_assert(BM == BN, "As and Bs share one leading dimension");
  static_assert(kBytes <= 48 * 1024, "static shared memory is limited to 48 KiB");
  static_assert(!kTensorCores || BM * LDG * (int)sizeof(float) <= kBytes,
                "G staging must fit in the shared buffer");
};

// dst[r][c] = src[(r0 + r) * d + c0 + c] for r0 + r < r_end and c0 + c < d, else 0; r < 64.
// When rows are 16-byte multiples (d % (16 / sizeof(T)) == 0) and src is 16-byte aligned, each
// thread moves 16 bytes per load (and per store when LD keeps shared rows 16-byte aligned).
template <typename T, int WIDTH, int LD>
__device__ __forceinline__ void load_tile(T* dst, const T* __restrict__ src, int d, int r0,
                                          int r_end, int c0) {
  constexpr int V = 16 / sizeof(T);  // elements per 16 bytes
  static_assert(WIDTH % V == 0, "tile width must be whole 16-byte vectors");
  if (d % V == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
#pragma unroll 2  // bounded: the gradient kernel holds its G accumulator in registers
    for (int e = threadIdx.x; e < 64 * WIDTH / V; e += kThreads) {
      const int r = e / (WIDTH / V), c = e % (WIDTH / V) * V;
      const int row = r0 + r, col = c0 + c;  // col < d implies col + V <= d
      const bool inside = row < r_end && col < d;
      if constexpr (LD * sizeof(T) % 16 == 0) {
        uint4 vec = make_uint4(0u, 0u, 0u, 0u);  // zero bits are +0 in every element type
        if (inside) vec = *reinterpret_cast<const uint4*>(src + (int64_t)row * d + col);
        *reinterpret_cast<uint4*>(dst + r * LD + c) = vec;
      } else {  // the fp32 SIMT tiles (rows padded by one float): 16-byte loads, 4-byte stores
        static_assert(std::is_same<T, float>::value, "16-bit tiles keep 16-byte rows");
        float4 vec = make_float4(0.f, 0.f, 0.f, 0.f);
        if (inside) vec = *reinterpret_cast<const float4*>(src + (int64_t)row * d + col);
        float* out = dst + r * LD + c;
        out[0] = vec.x;
        out[1] = vec.y;
        out[2] = vec.z;
        out[3] = vec.w;
      }
    }
  } else {
    for (int e = threadIdx.x; e < 64 * WIDTH; e += kThreads) {
      const int r = e / WIDTH, c = e % WIDTH;
      const int row = r0 + r, col = c0 + c;
      dst[r * LD + c] =
          (row < r_end && col < d) ? src[(int64_t)row * d + col] : from_float<T>(0.f);
    }
  }
}

// acc[n] += A B_n for n < N (wmma, one warp): A the 16 x K row-major strip at a (leading
// dimension lda), B_n the K x 16 operand of layout LB at b + n * n_step, whose k-th 16-row step
// starts k_step * 16 elements further (ldb its leading dimension).
template <typename T, typename LB, int K, int N>
__device__ __forceinline__ void mma_strip(
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> (&acc)[N], const T* a, int lda,
    const T* b, int ldb, int k_step, int n_step) {
#pragma unroll
  for (int kk = 0; kk < K; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + kk, lda);
#pragma unroll
    for (int n = 0; n < N; ++n) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
      wmma::load_matrix_sync(fb, b + kk * k_step + n * n_step, ldb);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// Ss[r][c] = a[r0 + r] . b[c0 + c] (fp32 accumulation) for rows r0 + r < a_end and columns
// c0 + c < b_end (zero elsewhere); with kSplit the columns are b + b_lo (a wider matrix carried
// as two fp16 halves, csrc/nt_xent_bank.cu) and each k-step takes both products. Ends with a
// barrier, after which As/Bs are free and Ss is readable.
template <typename T, bool kSplit = false>
__device__ void score_tile(const T* __restrict__ a, int a_end, int r0, const T* __restrict__ b,
                           const T* __restrict__ b_lo, int b_end, int c0, int d,
                           unsigned char* smem) {
  using Tr = Tile<T>;
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + BM * Tr::LDA;
  float* Ss = reinterpret_cast<float*>(smem + Tr::kSOffset);
  // wmma: each warp owns 16 rows; SIMT: an 8 x 16 thread grid, thread (tr, tc) owns rows
  // tr + 8i (i < 8) and columns tc + 16j (j < 4).
  const int warp = threadIdx.x / 32;
  const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag[Tr::kTensorCores ? BN / 16 : 1];
  float acc[8][4] = {};
  if constexpr (Tr::kTensorCores) {
#pragma unroll
    for (int n = 0; n < BN / 16; ++n) wmma::fill_fragment(frag[n], 0.f);
  }
  for (int k0 = 0; k0 < d; k0 += BK) {
    load_tile<T, BK, Tr::LDA>(As, a, d, r0, a_end, k0);
#pragma unroll
    for (int part = 0; part < (kSplit ? 2 : 1); ++part) {
      load_tile<T, BK, Tr::LDA>(Bs, part == 0 ? b : b_lo, d, c0, b_end, k0);
      __syncthreads();
      if constexpr (Tr::kTensorCores) {
        // Bs holds column rows [n][k]: read as the K x N operand it is column-major.
        mma_strip<T, wmma::col_major, BK>(frag, As + warp * 16 * Tr::LDA, Tr::LDA, Bs, Tr::LDA,
                                          1, 16 * Tr::LDA);
      } else {
#pragma unroll 4
        for (int kk = 0; kk < BK; ++kk) {
          float va[8], vb[4];
#pragma unroll
          for (int i = 0; i < 8; ++i) va[i] = As[(tr + 8 * i) * Tr::LDA + kk];
#pragma unroll
          for (int j = 0; j < 4; ++j) vb[j] = Bs[(tc + 16 * j) * Tr::LDA + kk];
#pragma unroll
          for (int i = 0; i < 8; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(va[i], vb[j], acc[i][j]);
          }
        }
      }
      __syncthreads();
    }
  }
  if constexpr (Tr::kTensorCores) {
#pragma unroll
    for (int n = 0; n < BN / 16; ++n) {
      wmma::store_matrix_sync(Ss + warp * 16 * Tr::LDS + n * 16, frag[n], Tr::LDS,
                              wmma::mem_row_major);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) Ss[(tr + 8 * i) * Tr::LDS + tc + 16 * j] = acc[i][j];
    }
  }
  __syncthreads();
}

// G (BM x BD, fp32) += Ps (BM x BN tile weights) Zd (BN x BD): wmma fragments (each warp owns 16
// rows) on the tensor-core path, else 8 x 4 entries per thread (rows tr + 8i, columns tc + 16j).
template <typename T>
struct GradAccumulator {
  using Tr = Tile<T>;
  static constexpr int BD = Tr::BD;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> frag[Tr::kTensorCores ? BD / 16 : 1];
  float simt[8][4] = {};

  __device__ __forceinline__ GradAccumulator() {
    if constexpr (Tr::kTensorCores) {
#pragma unroll
      for (int n = 0; n < BD / 16; ++n) wmma::fill_fragment(frag[n], 0.f);
    }
  }

  // Ps and Zd are in shared memory, published by a barrier.
  __device__ __forceinline__ void add(const T* Ps, const T* Zd) {
    if constexpr (Tr::kTensorCores) {
      const int warp = threadIdx.x / 32;
      mma_strip<T, wmma::row_major, BN>(frag, Ps + warp * 16 * Tr::LDP, Tr::LDP, Zd, Tr::LDZ,
                                        Tr::LDZ, 16);
    } else {
      const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll 4
      for (int kk = 0; kk < BN; ++kk) {
        float a[8], b[4];
#pragma unroll
        for (int ii = 0; ii < 8; ++ii) a[ii] = to_float(Ps[(tr + 8 * ii) * Tr::LDP + kk]);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) b[jj] = to_float(Zd[kk * Tr::LDZ + tc + 16 * jj]);
#pragma unroll
        for (int ii = 0; ii < 8; ++ii) {
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) simt[ii][jj] = fmaf(a[ii], b[jj], simt[ii][jj]);
        }
      }
    }
  }

  // g[(row - row_start) * d + col] = G * unscale (the tile weights' 1 / scale) for the block's
  // rows r0 + r < row_end and features d0 + c < d. Call after a barrier: the wmma path stages
  // G in smem (all of it).
  __device__ __forceinline__ void store(float* __restrict__ g, unsigned char* smem, int r0,
                                        int row_start, int row_end, int d0, int d,
                                        float unscale) {
    if constexpr (Tr::kTensorCores) {
      float* Gs = reinterpret_cast<float*>(smem);
      const int warp = threadIdx.x / 32;
#pragma unroll
      for (int n = 0; n < BD / 16; ++n) {
        wmma::store_matrix_sync(Gs + warp * 16 * Tr::LDG + n * 16, frag[n], Tr::LDG,
                                wmma::mem_row_major);
      }
      __syncthreads();
      for (int e = threadIdx.x; e < BM * BD; e += kThreads) {
        const int rr = e / BD, cc = e % BD;
        const int row = r0 + rr, col = d0 + cc;
        if (row < row_end && col < d) {
          g[(int64_t)(row - row_start) * d + col] = Gs[rr * Tr::LDG + cc] * unscale;
        }
      }
    } else {
      const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
#pragma unroll
      for (int ii = 0; ii < 8; ++ii) {
        const int row = r0 + tr + 8 * ii;
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const int col = d0 + tc + 16 * jj;
          if (row < row_end && col < d) {
            g[(int64_t)(row - row_start) * d + col] = simt[ii][jj] * unscale;
          }
        }
      }
    }
  }
};

}  // namespace tiles
}  // namespace fcl

#endif  // FASTCLUSTER_CL_TILES_CUH_
