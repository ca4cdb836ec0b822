// The torch binding of csrc/cluster.cu: Student-t, DEC and anchor, forward and backward.
#include "binding.h"

namespace {  // only bind_* below is visible to the module definition

namespace {

// Validates an n x k assignment matrix; returns {n, k}.
std::pair<int, int> check_assignments(const at::Tensor& q, const char* name) {
  check_cuda_tensor(q, name, 2);
  dtype_code(q);
  return {checked_int(q.size(0), "rows of q"), checked_int(q.size(1), "columns of q")};
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_cuda_tensor(t, name, like.dim());
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() &&
                  t.device() == like.device(),
              name, " must match q0 in shape, dtype and device");
}

}  // namespace

// (loss_rows, f): per-row DEC KL(p_i || q_i) and the column sums f (both fp32).
std::vector<at::Tensor> dec_forward(const at::Tensor& q) {
  const auto [n, k] = check_assignments(q, "q");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor f = at::empty({k}, f32);
  at::Tensor loss_rows = at::empty({n}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(fcl_column_sums(dtype_code(q), q.data_ptr(), n, k, f.data_ptr<float>(), stream),
               "fcl_column_sums");
  check_launch(fcl_dec_rows(dtype_code(q), q.data_ptr(), f.data_ptr<float>(), n, k,
                            loss_rows.data_ptr<float>(), stream),
               "fcl_dec_rows");
  return {loss_rows, f};
}

at::Tensor dec_backward(const at::Tensor& q, const at::Tensor& f, const at::Tensor& grad_out,
                        double factor) {
  const auto [n, k] = check_assignments(q, "q");
  check_float_vector(f, "f", k, q);
  check_grad_out(grad_out, q);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty_like(q);
  check_launch(fcl_dec_backward(dtype_code(q), q.data_ptr(), f.data_ptr<float>(), n, k,
                                grad_out.data_ptr<float>(), static_cast<float>(factor),
                                dq.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "fcl_dec_backward");
  return dq;
}

// Per-row KL(q0_i || qa_i) + KL(q0_i || qb_i) (fp32).
at::Tensor anchor_forward(const at::Tensor& q0, const at::Tensor& qa, const at::Tensor& qb) {
  const auto [n, k] = check_assignments(q0, "q0");
  check_like(qa, "q_a", q0);
  check_like(qb, "q_b", q0);
  const c10::cuda::CUDAGuard guard(q0.device());
  at::Tensor loss_rows = at::empty({n}, q0.options().dtype(at::kFloat));
  check_launch(fcl_anchor_rows(dtype_code(q0), q0.data_ptr(), qa.data_ptr(), qb.data_ptr(), n, k,
                               loss_rows.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "fcl_anchor_rows");
  return loss_rows;
}

std::vector<at::Tensor> anchor_backward(const at::Tensor& q0, const at::Tensor& qa,
                                        const at::Tensor& qb, const at::Tensor& grad_out,
                                        double factor) {
  const auto [n, k] = check_assignments(q0, "q0");
  check_like(qa, "q_a", q0);
  check_like(qb, "q_b", q0);
  check_grad_out(grad_out, q0);
  const c10::cuda::CUDAGuard guard(q0.device());
  at::Tensor dqa = at::empty_like(qa);
  at::Tensor dqb = at::empty_like(qb);
  check_launch(fcl_anchor_backward(dtype_code(q0), q0.data_ptr(), qa.data_ptr(), qb.data_ptr(), n,
                                   k, grad_out.data_ptr<float>(), static_cast<float>(factor),
                                   dqa.data_ptr(), dqb.data_ptr(),
                                   c10::cuda::getCurrentCUDAStream()),
               "fcl_anchor_backward");
  return {dqa, dqb};
}

// (q, dist2): Student-t assignment of h (n x f) to centers (k x f), both n x k fp32.
std::vector<at::Tensor> student_t_forward(const at::Tensor& h, const at::Tensor& centers,
                                          double alpha) {
  check_cuda_tensor(h, "h", 2);
  check_cuda_tensor(centers, "centers", 2);
  TORCH_CHECK(centers.scalar_type() == h.scalar_type() && centers.device() == h.device() &&
                  centers.size(1) == h.size(1),
              "centers must match h in dtype, device and features, got ", centers.sizes(), " ",
              centers.scalar_type(), " and ", h.sizes(), " ", h.scalar_type());
  TORCH_CHECK(alpha > 0, "alpha must be > 0, got ", alpha);
  const int n = checked_int(h.size(0), "rows of h");
  const int f = checked_int(h.size(1), "features of h");
  const int k = checked_int(centers.size(0), "rows of centers");
  const c10::cuda::CUDAGuard guard(h.device());
  const auto f32 = h.options().dtype(at::kFloat);
  at::Tensor q = at::empty({n, k}, f32);
  at::Tensor dist2 = at::empty({n, k}, f32);
  check_launch(fcl_student_t(dtype_code(h), h.data_ptr(), centers.data_ptr(), n, k, f,
                             static_cast<float>(alpha), q.data_ptr<float>(),
                             dist2.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "fcl_student_t");
  return {q, dist2};
}

// (dh, dcenters) from grad_q = dL/dq (n x k fp32) and the forward's q and dist2.
std::vector<at::Tensor> student_t_backward(const at::Tensor& h, const at::Tensor& centers,
                                           const at::Tensor& q, const at::Tensor& dist2,
                                           const at::Tensor& grad_q, double alpha) {
  check_cuda_tensor(h, "h", 2);
  check_cuda_tensor(centers, "centers", 2);
  const int n = checked_int(h.size(0), "rows of h");
  const int f = checked_int(h.size(1), "features of h");
  const int k = checked_int(centers.size(0), "rows of centers");
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&dist2, "dist2"}, {&grad_q, "grad_q"}}) {
    check_cuda_tensor(*t, name, 2);
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->size(0) == n && t->size(1) == k &&
                    t->device() == h.device(),
                name, " must be float32 of shape [", n, ", ", k, "] on ", h.device());
  }
  const c10::cuda::CUDAGuard guard(h.device());
  at::Tensor w = at::empty({n, k}, q.options());
  at::Tensor dh = at::empty_like(h);
  at::Tensor dcenters = at::empty_like(centers);
  check_launch(fcl_student_t_backward(dtype_code(h), h.data_ptr(), centers.data_ptr(),
                                      q.data_ptr<float>(), dist2.data_ptr<float>(),
                                      grad_q.data_ptr<float>(), n, k, f,
                                      static_cast<float>(alpha), w.data_ptr<float>(),
                                      dh.data_ptr(), dcenters.data_ptr(),
                                      c10::cuda::getCurrentCUDAStream()),
               "fcl_student_t_backward");
  return {dh, dcenters};
}

}  // namespace

void bind_cluster(py::module_& m) {
  m.def("student_t_forward", &student_t_forward, "Student-t assignment q and distances",
        py::arg("h"), py::arg("centers"), py::arg("alpha"));
  m.def("student_t_backward", &student_t_backward, "gradients for h and centers", py::arg("h"),
        py::arg("centers"), py::arg("q"), py::arg("dist2"), py::arg("grad_q"), py::arg("alpha"));
  m.def("dec_forward", &dec_forward, "per-row DEC loss and column sums f", py::arg("q"));
  m.def("dec_backward", &dec_backward, "gradient of the DEC loss", py::arg("q"), py::arg("f"),
        py::arg("grad_out"), py::arg("factor"));
  m.def("anchor_forward", &anchor_forward, "per-row anchor loss", py::arg("q0"), py::arg("q_a"),
        py::arg("q_b"));
  m.def("anchor_backward", &anchor_backward, "gradients of the anchor loss for q_a, q_b",
        py::arg("q0"), py::arg("q_a"), py::arg("q_b"), py::arg("grad_out"), py::arg("factor"));
  // memory bank (csrc/nt_xent_bank.cu)
}
