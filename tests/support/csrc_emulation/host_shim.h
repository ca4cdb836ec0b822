// Host emulation of the few CUDA features the csrc kernels use, so that their exact source runs
// on a CPU (g++, one std::thread per CUDA thread, blocks in sequence). Test-only: it checks the
// kernels' indexing, tiling, masking and barrier placement, not their speed. Every thread of a
// warp holds a whole wmma fragment (16 x 16) and computes the full product, which is the
// documented meaning of the collective wmma operations.
#pragma once

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define __restrict__ __restrict

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cmath>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

namespace emu {

struct Dim { unsigned x = 1, y = 1, z = 1; };

struct Block {
  explicit Block(int threads) : block(threads), shuffle(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> shuffle;
};

inline thread_local Block* current = nullptr;
inline std::atomic<bool> misaligned{false};  // a wmma pointer or ldm broke the alignment rules
inline thread_local Dim thread_idx, block_idx;
inline Dim grid_dim, block_dim;

inline Dim to_dim(int x) { return Dim{static_cast<unsigned>(x), 1, 1}; }
inline Dim to_dim(dim3 d) { return Dim{d.x, d.y, d.z}; }

// Runs body() as the grid: blocks one after another (static "shared" memory is then per block),
// the threads of a block concurrently.
inline void launch(Dim grid, int threads, const std::function<void()>& body) {
  grid_dim = grid;
  block_dim = Dim{static_cast<unsigned>(threads), 1, 1};
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block block(threads);
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            current = &block;
            thread_idx = Dim{static_cast<unsigned>(t), 0, 0};
            block_idx = Dim{bx, by, bz};
            body();
          });
        }
        for (auto& thread : pool) thread.join();
      }
    }
  }
}

}  // namespace emu

#undef threadIdx
#undef blockIdx
#undef gridDim
#undef blockDim
#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define gridDim (emu::grid_dim)
#define blockDim (emu::block_dim)

// The launch status: misaligned wmma accesses (undefined behaviour on a GPU) are reported as
// cudaErrorMisalignedAddress; a real cudaGetLastError would need a driver.
inline cudaError_t emulated_last_error() {
  return emu::misaligned.exchange(false) ? cudaErrorMisalignedAddress : cudaSuccess;
}
#define cudaGetLastError() emulated_last_error()

inline void __syncthreads() { emu::current->block.arrive_and_wait(); }

inline void __syncwarp() { emu::current->warps[threadIdx.x / 32]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const int t = static_cast<int>(threadIdx.x), warp = t / 32, lane = t % 32;
  auto& barrier = *emu::current->warps[warp];
  emu::current->shuffle[t] = value;
  barrier.arrive_and_wait();
  const float result = emu::current->shuffle[warp * 32 + (lane ^ lane_mask)];
  barrier.arrive_and_wait();
  return result;
}

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[16][16];  // element values (16-bit inputs are exact in float)
};

// wmma needs 256-bit aligned pointers and ldm a multiple of 16 bytes.
template <typename T>
void check_alignment(const T* p, unsigned ldm) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0) {
    emu::misaligned = true;
  }
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_alignment(p, ldm);
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      const T v = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
      if constexpr (std::is_same_v<T, __half>) f.x[r][c] = __half2float(v);
      else f.x[r][c] = __bfloat162float(v);
    }
  }
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, T value) {
  for (auto& row : f.x) for (auto& v : row) v = value;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i][j];
      for (int k = 0; k < 16; ++k) s = std::fma(a.x[i][k], b.x[k][j], s);
      out[i][j] = s;
    }
  }
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j) d.x[i][j] = out[i][j];
}

// Collective store: lane 0 of the warp writes (all lanes hold the same fragment).
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  check_alignment(p, ldm);
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r][c];
    }
  }
}

}  // namespace nvcuda::wmma
