// The torch binding of csrc/objective.cu: the one-pass anchor and CC objectives.
#include "binding.h"

namespace {  // only bind_* below is visible to the module definition

namespace {

// z_a, z_b: n x d CUDA, same dtype; returns {n, d}.
std::pair<int, int> check_views(const at::Tensor& z_a, const at::Tensor& z_b) {
  check_cuda_tensor(z_a, "z_a", 2);
  check_cuda_tensor(z_b, "z_b", 2);
  TORCH_CHECK(z_a.sizes() == z_b.sizes() && z_a.scalar_type() == z_b.scalar_type() &&
                  z_a.device() == z_b.device(),
              "z_a and z_b must share shape, dtype and device");
  dtype_code(z_a);
  const int n = checked_int(z_a.size(0), "rows of z_a");
  const int d = checked_int(z_a.size(1), "features of z_a");
  checked_int(2 * static_cast<int64_t>(n), "2 * rows of z_a");
  TORCH_CHECK(n >= 1 && d >= 1, "z_a must be at least 1 x 1, got ", z_a.sizes());
  return {n, d};
}

// Tensors of one per-row input (h0/h_a/h_b or the logits): n rows, one dtype and shape.
void check_row_inputs(std::initializer_list<std::pair<const at::Tensor*, const char*>> inputs,
                      const at::Tensor& z_a) {
  const at::Tensor& first = *inputs.begin()->first;
  for (const auto& [t, name] : inputs) {
    check_cuda_tensor(*t, name, 2);
    dtype_code(*t);
    TORCH_CHECK(t->sizes() == first.sizes() && t->scalar_type() == first.scalar_type() &&
                    t->device() == z_a.device() && t->size(0) == z_a.size(0),
                name, " must be (", z_a.size(0), ", *) on ", z_a.device(), " like ",
                inputs.begin()->second, ", got ", t->sizes(), " ", t->scalar_type());
  }
}

void check_state(const at::Tensor& t, const char* name, at::IntArrayRef shape,
                 const at::Tensor& like) {
  check_cuda_tensor(t, name, static_cast<int64_t>(shape.size()));
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.sizes() == shape && t.device() == like.device(),
              name, " must be float32 of shape ", shape, " on ", like.device(), ", got ",
              t.scalar_type(), " ", t.sizes());
}

at::Tensor workspace(int objective, int backward, int n, int d, int k, int f,
                     const at::Tensor& like) {
  return at::empty({fcl_objective_workspace(objective, backward, n, d, k, f)},
                   like.options().dtype(at::kFloat));
}

}  // namespace

// (out (4) = [total, instance, DEC, anchor], rows (5 x 2n), assign (7 x n), f (k)).
std::vector<at::Tensor> anchor_objective_forward(const at::Tensor& z_a, const at::Tensor& z_b,
                                                 const at::Tensor& h0, const at::Tensor& h_a,
                                                 const at::Tensor& h_b, const at::Tensor& centers,
                                                 double inv_tau, double alpha, double w_instance,
                                                 double w_cluster, double w_anchor) {
  const auto [n, d] = check_views(z_a, z_b);
  check_row_inputs({{&h0, "h0"}, {&h_a, "h_a"}, {&h_b, "h_b"}}, z_a);
  check_cuda_tensor(centers, "centers", 2);
  TORCH_CHECK(centers.scalar_type() == at::kFloat && centers.size(1) == h0.size(1) &&
                  centers.device() == z_a.device(),
              "centers must be float32 (K, ", h0.size(1), ") on ", z_a.device());
  TORCH_CHECK(alpha > 0, "alpha must be > 0, got ", alpha);
  const int k = checked_int(centers.size(0), "rows of centers");
  const int f = checked_int(centers.size(1), "features of centers");
  const c10::cuda::CUDAGuard guard(z_a.device());
  const auto f32 = z_a.options().dtype(at::kFloat);
  at::Tensor out = at::empty({4}, f32), rows = at::empty({5, 2 * static_cast<int64_t>(n)}, f32);
  at::Tensor assign = at::empty({7, n}, f32), col_sums = at::empty({k}, f32);
  at::Tensor ws = workspace(FCL_OBJECTIVE_ANCHOR, 0, n, d, k, f, z_a);
  check_launch(fcl_anchor_objective_forward(
                   dtype_code(z_a), z_a.data_ptr(), z_b.data_ptr(), n, d, dtype_code(h0),
                   h0.data_ptr(), h_a.data_ptr(), h_b.data_ptr(), centers.data_ptr<float>(), k, f,
                   static_cast<float>(inv_tau), static_cast<float>(alpha),
                   static_cast<float>(w_instance), static_cast<float>(w_cluster),
                   static_cast<float>(w_anchor), rows.data_ptr<float>(),
                   assign.data_ptr<float>(), col_sums.data_ptr<float>(), ws.data_ptr<float>(),
                   out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "fcl_anchor_objective_forward");
  return {out, rows, assign, col_sums};
}

// (dz_a, dz_b, dh0, dh_a, dh_b, dcenters (float32)) from grad = dL/dout (4 floats).
std::vector<at::Tensor> anchor_objective_backward(
    const at::Tensor& z_a, const at::Tensor& z_b, const at::Tensor& h0, const at::Tensor& h_a,
    const at::Tensor& h_b, const at::Tensor& centers, const at::Tensor& rows,
    const at::Tensor& assign, const at::Tensor& col_sums, const at::Tensor& grad, double inv_tau,
    double alpha, double w_instance, double w_cluster, double w_anchor) {
  const auto [n, d] = check_views(z_a, z_b);
  check_row_inputs({{&h0, "h0"}, {&h_a, "h_a"}, {&h_b, "h_b"}}, z_a);
  const int k = checked_int(centers.size(0), "rows of centers");
  const int f = checked_int(h0.size(1), "features of h0");
  check_state(centers, "centers", {k, f}, z_a);
  check_state(rows, "rows", {5, 2 * static_cast<int64_t>(n)}, z_a);
  check_state(assign, "assign", {7, n}, z_a);
  check_state(col_sums, "f", {k}, z_a);
  check_state(grad, "grad", {4}, z_a);
  const c10::cuda::CUDAGuard guard(z_a.device());
  at::Tensor dz_a = at::empty_like(z_a), dz_b = at::empty_like(z_b);
  at::Tensor dh0 = at::empty_like(h0), dh_a = at::empty_like(h_a), dh_b = at::empty_like(h_b);
  at::Tensor dcenters = at::empty_like(centers);
  at::Tensor ws = workspace(FCL_OBJECTIVE_ANCHOR, 1, n, d, k, f, z_a);
  check_launch(fcl_anchor_objective_backward(
                   dtype_code(z_a), z_a.data_ptr(), z_b.data_ptr(), n, d, dtype_code(h0),
                   h0.data_ptr(), h_a.data_ptr(), h_b.data_ptr(), centers.data_ptr<float>(), k, f,
                   static_cast<float>(inv_tau), static_cast<float>(alpha),
                   static_cast<float>(w_instance), static_cast<float>(w_cluster),
                   static_cast<float>(w_anchor), rows.data_ptr<float>(),
                   assign.data_ptr<float>(), col_sums.data_ptr<float>(), grad.data_ptr<float>(),
                   ws.data_ptr<float>(), dz_a.data_ptr(), dz_b.data_ptr(), dh0.data_ptr(),
                   dh_a.data_ptr(), dh_b.data_ptr(), dcenters.data_ptr<float>(),
                   c10::cuda::getCurrentCUDAStream()),
               "fcl_anchor_objective_backward");
  return {dz_a, dz_b, dh0, dh_a, dh_b, dcenters};
}

// (out (3) = [total, instance, cluster], rows (5 x 2n), row_lse (2 x n), gram (2k x 2k),
// cluster_rows (3 x 2k)).
std::vector<at::Tensor> cc_objective_forward(const at::Tensor& z_a, const at::Tensor& z_b,
                                             const at::Tensor& logits_a,
                                             const at::Tensor& logits_b, double inv_tau,
                                             double inv_tau_c, double w_instance,
                                             double w_cluster) {
  const auto [n, d] = check_views(z_a, z_b);
  check_row_inputs({{&logits_a, "logits_a"}, {&logits_b, "logits_b"}}, z_a);
  const int k = checked_int(logits_a.size(1), "columns of logits_a");
  TORCH_CHECK(k >= 1, "logits must have at least one column");
  TORCH_CHECK_VALUE(k <= FCL_CC_MAX_CLUSTERS, "backend='cuda' fuses the cluster contrast for at "
                    "most ", int(FCL_CC_MAX_CLUSTERS), " clusters, got K = ", k,
                    "; use backend='chunked'");
  const c10::cuda::CUDAGuard guard(z_a.device());
  const auto f32 = z_a.options().dtype(at::kFloat);
  at::Tensor out = at::empty({3}, f32), rows = at::empty({5, 2 * static_cast<int64_t>(n)}, f32);
  at::Tensor row_lse = at::empty({2, n}, f32), gram = at::empty({2 * k, 2 * k}, f32);
  at::Tensor cluster_rows = at::empty({3, 2 * k}, f32);
  at::Tensor ws = workspace(FCL_OBJECTIVE_CC, 0, n, d, k, 0, z_a);
  check_launch(fcl_cc_objective_forward(
                   dtype_code(z_a), z_a.data_ptr(), z_b.data_ptr(), n, d, dtype_code(logits_a),
                   logits_a.data_ptr(), logits_b.data_ptr(), k, static_cast<float>(inv_tau),
                   static_cast<float>(inv_tau_c), static_cast<float>(w_instance),
                   static_cast<float>(w_cluster), rows.data_ptr<float>(),
                   row_lse.data_ptr<float>(), gram.data_ptr<float>(),
                   cluster_rows.data_ptr<float>(), ws.data_ptr<float>(), out.data_ptr<float>(),
                   c10::cuda::getCurrentCUDAStream()),
               "fcl_cc_objective_forward");
  return {out, rows, row_lse, gram, cluster_rows};
}

// (dz_a, dz_b, dlogits_a, dlogits_b) from grad = dL/dout (3 floats).
std::vector<at::Tensor> cc_objective_backward(const at::Tensor& z_a, const at::Tensor& z_b,
                                              const at::Tensor& logits_a,
                                              const at::Tensor& logits_b, const at::Tensor& rows,
                                              const at::Tensor& row_lse,
                                              const at::Tensor& gram,
                                              const at::Tensor& cluster_rows,
                                              const at::Tensor& grad, double inv_tau,
                                              double inv_tau_c, double w_instance,
                                              double w_cluster) {
  const auto [n, d] = check_views(z_a, z_b);
  check_row_inputs({{&logits_a, "logits_a"}, {&logits_b, "logits_b"}}, z_a);
  const int k = checked_int(logits_a.size(1), "columns of logits_a");
  check_state(rows, "rows", {5, 2 * static_cast<int64_t>(n)}, z_a);
  TORCH_CHECK_VALUE(k <= FCL_CC_MAX_CLUSTERS, "backend='cuda' fuses the cluster contrast for at "
                    "most ", int(FCL_CC_MAX_CLUSTERS), " clusters, got K = ", k,
                    "; use backend='chunked'");
  check_state(row_lse, "row_lse", {2, n}, z_a);
  check_state(gram, "gram", {2 * k, 2 * k}, z_a);
  check_state(cluster_rows, "cluster_rows", {3, 2 * k}, z_a);
  check_state(grad, "grad", {3}, z_a);
  const c10::cuda::CUDAGuard guard(z_a.device());
  at::Tensor dz_a = at::empty_like(z_a), dz_b = at::empty_like(z_b);
  at::Tensor dlogits_a = at::empty_like(logits_a), dlogits_b = at::empty_like(logits_b);
  at::Tensor ws = workspace(FCL_OBJECTIVE_CC, 1, n, d, k, 0, z_a);
  check_launch(fcl_cc_objective_backward(
                   dtype_code(z_a), z_a.data_ptr(), z_b.data_ptr(), n, d, dtype_code(logits_a),
                   logits_a.data_ptr(), logits_b.data_ptr(), k, static_cast<float>(inv_tau),
                   static_cast<float>(inv_tau_c), static_cast<float>(w_instance),
                   static_cast<float>(w_cluster), rows.data_ptr<float>(),
                   row_lse.data_ptr<float>(), gram.data_ptr<float>(),
                   cluster_rows.data_ptr<float>(), grad.data_ptr<float>(), ws.data_ptr<float>(),
                   dz_a.data_ptr(), dz_b.data_ptr(), dlogits_a.data_ptr(), dlogits_b.data_ptr(),
                   c10::cuda::getCurrentCUDAStream()),
               "fcl_cc_objective_backward");
  return {dz_a, dz_b, dlogits_a, dlogits_b};
}

}  // namespace

void bind_objective(py::module_& m) {
  m.def("anchor_objective_forward", &anchor_objective_forward,
        "fused anchor objective: out, rows, assign, f", py::arg("z_a"), py::arg("z_b"),
        py::arg("h0"), py::arg("h_a"), py::arg("h_b"), py::arg("centers"), py::arg("inv_tau"),
        py::arg("alpha"), py::arg("w_instance"), py::arg("w_cluster"), py::arg("w_anchor"));
  m.def("anchor_objective_backward", &anchor_objective_backward,
        "gradients of the fused anchor objective", py::arg("z_a"), py::arg("z_b"), py::arg("h0"),
        py::arg("h_a"), py::arg("h_b"), py::arg("centers"), py::arg("rows"), py::arg("assign"),
        py::arg("f"), py::arg("grad"), py::arg("inv_tau"), py::arg("alpha"),
        py::arg("w_instance"), py::arg("w_cluster"), py::arg("w_anchor"));
  m.def("cc_objective_forward", &cc_objective_forward,
        "fused CC objective: out, rows, row_lse, gram, cluster_rows", py::arg("z_a"),
        py::arg("z_b"), py::arg("logits_a"), py::arg("logits_b"), py::arg("inv_tau"),
        py::arg("inv_tau_c"), py::arg("w_instance"), py::arg("w_cluster"));
  m.def("cc_objective_backward", &cc_objective_backward, "gradients of the fused CC objective",
        py::arg("z_a"), py::arg("z_b"), py::arg("logits_a"), py::arg("logits_b"), py::arg("rows"),
        py::arg("row_lse"), py::arg("gram"), py::arg("cluster_rows"), py::arg("grad"),
        py::arg("inv_tau"), py::arg("inv_tau_c"), py::arg("w_instance"), py::arg("w_cluster"));
}
