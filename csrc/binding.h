// The torch binding's shared checks and the registration function of each op's binding file
// (<op>_binding.cpp beside <op>.cu); binding.cpp defines the module from them.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <climits>
#include <tuple>
#include <vector>

#include "fcl_kernels.h"

namespace py = pybind11;

inline int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return FCL_FLOAT32;
    case at::kHalf: return FCL_FLOAT16;
    case at::kBFloat16: return FCL_BFLOAT16;
    default:
      TORCH_CHECK(false, "backend='cuda' takes float32, float16 or bfloat16 tensors, got ",
                  t.scalar_type());
  }
  return -1;  // unreachable
}

inline void check_launch(int err, const char* launcher) {
  TORCH_CHECK(err == 0, launcher, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

inline int checked_int(int64_t value, const char* what) {
  TORCH_CHECK(value >= 0 && value <= INT_MAX, what, " = ", value, " does not fit the kernels' int");
  return static_cast<int>(value);
}

inline void check_cuda_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_float_vector(const at::Tensor& t, const char* name, int64_t length,
                        const at::Tensor& like) {
  check_cuda_tensor(t, name, 1);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == length, name, " must have ", length, " entries, got ", t.size(0));
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", zn on ", like.device());
}

inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& like) {
  TORCH_CHECK(grad_out.is_cuda() && grad_out.device() == like.device() &&
                  grad_out.scalar_type() == at::kFloat && grad_out.numel() == 1 &&
                  grad_out.is_contiguous(),
              "grad_out must be one contiguous float32 on ", like.device());
}

// Validates zn (m x d) and the row range; returns {m, d}.
inline std::pair<int, int> check_rows(const at::Tensor& zn, int64_t row_start, int64_t row_end) {
  check_cuda_tensor(zn, "zn", 2);
  dtype_code(zn);
  const int m = checked_int(zn.size(0), "rows of zn");
  const int d = checked_int(zn.size(1), "features of zn");
  TORCH_CHECK(m >= 2 && d >= 1, "zn must be at least 2 x 1, got ", zn.sizes());
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= m,
              "row range [", row_start, ", ", row_end, ") is not inside [0, ", m, ")");
  return {m, d};
}

void bind_nt_xent(py::module_& m);
void bind_cluster(py::module_& m);
void bind_nt_xent_bank(py::module_& m);
void bind_objective(py::module_& m);
