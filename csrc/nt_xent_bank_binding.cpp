// The torch binding of csrc/nt_xent_bank.cu: NT-Xent against a memory bank.
#include "binding.h"

namespace {  // only bind_* below is visible to the module definition

// NT-Xent against a memory bank (csrc/nt_xent_bank.cu). zs, rs, norm, dist: the outputs of
// normalize on (z_a, z_b); bank (M x d) in zs's dtype, with bank_lo its low fp16 half when the
// bank is wider than zs (scores take both products). fixed_shift: the kernels sum 2^(x - 1/tau
// log2 e) (the caller's check that exp(-2/tau) is a normal float), else the online row max.

namespace {

// Validates the bank operands against zs (2n x d); returns {n, M, d}.
std::tuple<int, int, int> check_bank(const at::Tensor& zs, const at::Tensor& rs,
                                     const at::Tensor& bank,
                                     const std::optional<at::Tensor>& bank_lo) {
  check_cuda_tensor(zs, "zs", 2);
  dtype_code(zs);
  TORCH_CHECK(zs.size(0) >= 2 && zs.size(0) % 2 == 0, "zs must hold [z_a; z_b], got ",
              zs.sizes());
  const int n = checked_int(zs.size(0) / 2, "rows of z_a");
  const int d = checked_int(zs.size(1), "features of zs");
  check_float_vector(rs, "rs", 2 * static_cast<int64_t>(n), zs);
  for (const at::Tensor* b : {&bank, bank_lo.has_value() ? &*bank_lo : &bank}) {
    check_cuda_tensor(*b, "bank", 2);
    TORCH_CHECK(b->scalar_type() == zs.scalar_type() && b->size(1) == d &&
                    b->size(0) == bank.size(0) && b->device() == zs.device(),
                "bank must be M x ", d, " of zs's dtype ", zs.scalar_type(), " on ",
                zs.device(), ", got ", b->sizes(), " ", b->scalar_type(), " on ", b->device());
  }
  const int m_bank = checked_int(bank.size(0), "rows of bank");
  TORCH_CHECK(m_bank >= 1 && d >= 1, "bank must be at least 1 x 1, got ", bank.sizes());
  return {n, m_bank, d};
}

}  // namespace

// (row_loss, row_w): the n row losses and the backward's per-row weights (fp32).
std::vector<at::Tensor> bank_forward(const at::Tensor& zs, const at::Tensor& rs,
                                     const at::Tensor& dist, const at::Tensor& bank,
                                     const std::optional<at::Tensor>& bank_lo, double inv_tau,
                                     bool fixed_shift) {
  const auto [n, m_bank, d] = check_bank(zs, rs, bank, bank_lo);
  check_float_vector(dist, "dist", n, zs);
  const c10::cuda::CUDAGuard guard(zs.device());
  const auto f32 = zs.options().dtype(at::kFloat);
  at::Tensor row_loss = at::empty({n}, f32);
  at::Tensor row_w = at::empty({n}, f32);
  check_launch(fcl_nt_xent_bank_lse(dtype_code(zs), zs.data_ptr(), rs.data_ptr<float>(),
                                    dist.data_ptr<float>(), bank.data_ptr(),
                                    bank_lo.has_value() ? bank_lo->data_ptr() : nullptr, n,
                                    m_bank, d, static_cast<float>(inv_tau), fixed_shift ? 1 : 0,
                                    row_loss.data_ptr<float>(), row_w.data_ptr<float>(),
                                    c10::cuda::getCurrentCUDAStream()),
               "fcl_nt_xent_bank_lse");
  return {row_loss, row_w};
}

// (dz_a, dz_b) in dtype `out` from the forward's state and w, the n incoming row gradients
// (1/n each for the mean's; fp32).
std::vector<at::Tensor> bank_backward(const at::Tensor& zs, const at::Tensor& rs,
                                      const at::Tensor& norm, const at::Tensor& dist,
                                      const at::Tensor& bank,
                                      const std::optional<at::Tensor>& bank_lo,
                                      const at::Tensor& row_w, const at::Tensor& row_loss,
                                      const at::Tensor& w, double inv_tau, bool fixed_shift,
                                      at::ScalarType out) {
  const auto [n, m_bank, d] = check_bank(zs, rs, bank, bank_lo);
  check_float_vector(norm, "norm", 2 * static_cast<int64_t>(n), zs);
  check_float_vector(dist, "dist", n, zs);
  check_float_vector(row_w, "row_w", n, zs);
  check_float_vector(row_loss, "row_loss", n, zs);
  check_float_vector(w, "w", n, zs);
  const c10::cuda::CUDAGuard guard(zs.device());
  at::Tensor workspace = at::empty({n, d}, zs.options().dtype(at::kFloat));
  at::Tensor dz_a = at::empty({n, d}, zs.options().dtype(out));
  at::Tensor dz_b = at::empty({n, d}, zs.options().dtype(out));
  check_launch(fcl_nt_xent_bank_grad(dtype_code(zs), zs.data_ptr(), rs.data_ptr<float>(),
                                     norm.data_ptr<float>(), dist.data_ptr<float>(),
                                     bank.data_ptr(),
                                     bank_lo.has_value() ? bank_lo->data_ptr() : nullptr, n,
                                     m_bank, d, static_cast<float>(inv_tau),
                                     fixed_shift ? 1 : 0, row_w.data_ptr<float>(),
                                     row_loss.data_ptr<float>(), w.data_ptr<float>(),
                                     workspace.data_ptr<float>(), dtype_code(dz_a),
                                     dz_a.data_ptr(), dz_b.data_ptr(),
                                     c10::cuda::getCurrentCUDAStream()),
               "fcl_nt_xent_bank_grad");
  return {dz_a, dz_b};
}

}  // namespace

void bind_nt_xent_bank(py::module_& m) {
  m.def("bank_forward", &bank_forward, "row losses and row weights against a memory bank",
        py::arg("zs"), py::arg("rs"), py::arg("dist"), py::arg("bank"), py::arg("bank_lo"),
        py::arg("inv_tau"), py::arg("fixed_shift"));
  m.def("bank_backward", &bank_backward, "dz_a, dz_b of the loss against a memory bank",
        py::arg("zs"), py::arg("rs"), py::arg("norm"), py::arg("dist"), py::arg("bank"),
        py::arg("bank_lo"), py::arg("row_w"), py::arg("row_loss"), py::arg("w"),
        py::arg("inv_tau"), py::arg("fixed_shift"), py::arg("out"));
}
