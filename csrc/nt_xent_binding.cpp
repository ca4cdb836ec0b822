// The torch binding of csrc/nt_xent.cu: normalisation, row-range lse and gradients, the
// normalisation's backward (also the distributed path's building blocks).
#include "binding.h"

namespace {  // only bind_* below is visible to the module definition

// (zs, rs, norm, dist): [z_a; z_b] with rows scaled by powers of two (fp16 for 16-bit inputs,
// else fp32), the inverse scaled norms (zn = zs rs), the clamped row norms, and
// dist[i] = 1 - zn[i] . zn[n + i] (fp32; see fcl_kernels.h).
std::vector<at::Tensor> normalize(const at::Tensor& z_a, const at::Tensor& z_b) {
  check_cuda_tensor(z_a, "z_a", 2);
  check_cuda_tensor(z_b, "z_b", 2);
  TORCH_CHECK(z_a.sizes() == z_b.sizes() && z_a.scalar_type() == z_b.scalar_type() &&
                  z_a.device() == z_b.device(),
              "z_a and z_b must share shape, dtype and device");
  const int dtype = dtype_code(z_a);
  const int n = checked_int(z_a.size(0), "rows of z_a");
  const int d = checked_int(z_a.size(1), "features of z_a");
  checked_int(2 * static_cast<int64_t>(n), "2 * rows of z_a");
  TORCH_CHECK(n >= 1 && d >= 1, "z_a must be at least 1 x 1, got ", z_a.sizes());
  const c10::cuda::CUDAGuard guard(z_a.device());
  const auto f32 = z_a.options().dtype(at::kFloat);
  const auto normed = z_a.scalar_type() == at::kFloat ? at::kFloat : at::kHalf;
  at::Tensor zs = at::empty({2 * static_cast<int64_t>(n), d}, z_a.options().dtype(normed));
  at::Tensor rs = at::empty({2 * static_cast<int64_t>(n)}, f32);
  at::Tensor norm = at::empty({2 * static_cast<int64_t>(n)}, f32);
  at::Tensor dist = at::empty({n}, f32);
  check_launch(fcl_nt_xent_normalize(dtype, z_a.data_ptr(), z_b.data_ptr(), n, d, zs.data_ptr(),
                                     rs.data_ptr<float>(), norm.data_ptr<float>(),
                                     dist.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "fcl_nt_xent_normalize");
  return {zs, rs, norm, dist};
}

namespace {

// The column split count: `splits` when >= 1, else the launchers' recommendation for this GPU.
int column_splits(const at::Tensor& zn, int m, int d, int64_t rows, bool backward,
                  int64_t splits) {
  if (splits >= 1) return checked_int(splits, "splits");
  int multiprocessors = 0;
  check_launch(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount,
                                      zn.get_device()),
               "cudaDeviceGetAttribute");
  return fcl_nt_xent_splits(dtype_code(zn), m, d, static_cast<int>(rows), backward ? 1 : 0,
                            multiprocessors);
}

}  // namespace

// lse of the rows [row_start, row_end) of zn over their negatives (all rows but the diagonal
// and the positive pair; fp32).
// splits < 1 picks the column split for this GPU (see fcl_nt_xent_splits).
at::Tensor lse_rows(const at::Tensor& zn, const at::Tensor& rs, int64_t row_start,
                    int64_t row_end, double inv_tau, int64_t splits) {
  const auto [m, d] = check_rows(zn, row_start, row_end);
  TORCH_CHECK(m % 2 == 0, "zs must have an even number of rows ([z_a; z_b]), got ", m);
  check_float_vector(rs, "rs", m, zn);
  const c10::cuda::CUDAGuard guard(zn.device());
  const int64_t rows = row_end - row_start;
  const auto f32 = zn.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({rows}, f32);
  if (rows == 0) return lse;
  const int split = column_splits(zn, m, d, rows, false, splits);
  at::Tensor workspace = at::empty({split > 1 ? 2 * split * rows : 0}, f32);
  check_launch(fcl_nt_xent_lse(dtype_code(zn), zn.data_ptr(), rs.data_ptr<float>(), m, d,
                               static_cast<int>(row_start),
                               static_cast<int>(row_end), static_cast<float>(inv_tau), split,
                               split > 1 ? workspace.data_ptr<float>() : nullptr,
                               lse.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "fcl_nt_xent_lse");
  return lse;
}

// g = sum_j (P_ij + P_ji) zn_j - 2 zn_pos(i) for the rows [row_start, row_end), given every
// row's lse and loss (fp32).
at::Tensor grad_rows(const at::Tensor& zn, const at::Tensor& rs, const at::Tensor& lse_full,
                     const at::Tensor& loss_full, int64_t row_start, int64_t row_end,
                     double inv_tau, int64_t splits, const std::optional<at::Tensor>& weight) {
  const auto [m, d] = check_rows(zn, row_start, row_end);
  TORCH_CHECK(m % 2 == 0, "zs must have an even number of rows ([z_a; z_b]), got ", m);
  check_float_vector(rs, "rs", m, zn);
  check_float_vector(lse_full, "lse", m, zn);
  check_float_vector(loss_full, "row_loss", m, zn);
  if (weight.has_value()) check_float_vector(*weight, "weight", m, zn);
  const c10::cuda::CUDAGuard guard(zn.device());
  const int64_t rows = row_end - row_start;
  const auto f32 = zn.options().dtype(at::kFloat);
  at::Tensor g = at::empty({rows, d}, f32);
  if (rows == 0) return g;
  const int split = column_splits(zn, m, d, rows, true, splits);
  at::Tensor workspace = at::empty({split > 1 ? split * rows * d : 0}, f32);
  check_launch(fcl_nt_xent_grad(dtype_code(zn), zn.data_ptr(), rs.data_ptr<float>(), m, d,
                                static_cast<int>(row_start),
                                static_cast<int>(row_end), static_cast<float>(inv_tau),
                                lse_full.data_ptr<float>(), loss_full.data_ptr<float>(),
                                weight.has_value() ? weight->data_ptr<float>() : nullptr, split,
                                split > 1 ? workspace.data_ptr<float>() : nullptr,
                                g.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "fcl_nt_xent_grad");
  return g;
}

// dz of the rows [row_start, row_end): scaling by grad_out * factor and the backward of the L2
// normalisation, in dtype `out` (the input's). norm and g are indexed from row_start.
at::Tensor norm_backward(const at::Tensor& zn, const at::Tensor& rs, const at::Tensor& norm,
                         const at::Tensor& g, int64_t row_start, int64_t row_end,
                         const at::Tensor& grad_out, double factor, at::ScalarType out) {
  const auto [m, d] = check_rows(zn, row_start, row_end);
  check_float_vector(rs, "rs", m, zn);
  check_float_vector(norm, "norm", row_end - row_start, zn);
  check_cuda_tensor(g, "g", 2);
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.size(0) == row_end - row_start &&
                  g.size(1) == d && g.device() == zn.device(),
              "g must be float32 of shape [", row_end - row_start, ", ", d, "] on ", zn.device(),
              ", got ", g.scalar_type(), " ", g.sizes());
  check_grad_out(grad_out, zn);
  const c10::cuda::CUDAGuard guard(zn.device());
  at::Tensor dz = at::empty({row_end - row_start, d}, zn.options().dtype(out));
  check_launch(fcl_nt_xent_norm_backward(dtype_code(zn), zn.data_ptr(), rs.data_ptr<float>(),
                                         norm.data_ptr<float>(),
                                         g.data_ptr<float>(), m, d, static_cast<int>(row_start),
                                         static_cast<int>(row_end), grad_out.data_ptr<float>(),
                                         static_cast<float>(factor), dtype_code(dz),
                                         dz.data_ptr(),
                                         c10::cuda::getCurrentCUDAStream()),
               "fcl_nt_xent_norm_backward");
  return dz;
}

}  // namespace

void bind_nt_xent(py::module_& m) {
  m.def("normalize", &normalize, "zs, rs, norm, dist of [z_a; z_b]", py::arg("z_a"),
        py::arg("z_b"));
  m.def("lse_rows", &lse_rows, "log-sum-exp over the negatives of rows [row_start, row_end)",
        py::arg("zs"), py::arg("rs"), py::arg("row_start"), py::arg("row_end"),
        py::arg("inv_tau"), py::arg("splits") = 0);
  m.def("grad_rows", &grad_rows, "unscaled dL/dzn of rows [row_start, row_end)",
        py::arg("zs"), py::arg("rs"), py::arg("lse"), py::arg("row_loss"), py::arg("row_start"),
        py::arg("row_end"), py::arg("inv_tau"), py::arg("splits") = 0,
        py::arg("weight") = py::none());
  m.def("norm_backward", &norm_backward, "dz of rows [row_start, row_end)", py::arg("zs"),
        py::arg("rs"), py::arg("norm"), py::arg("g"), py::arg("row_start"), py::arg("row_end"),
        py::arg("grad_out"), py::arg("factor"), py::arg("out"));
}
