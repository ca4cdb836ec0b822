// torch.utils.cpp_extension binding of the CUDA twin (fastcluster_cl.backends.cuda builds it).
//
// Each function checks its tensors, allocates the outputs and calls the extern "C" launchers of
// fcl_kernels.h on the current stream. fastcluster_cl/backends/cuda/ registers them as
// torch.library ops; NT-Xent's one autograd.Function is fastcluster_cl/backends/autograd/nt_xent.py
// and the cluster ops' autograd is registered on their ops (docs/ops.md). The row-range functions
// are also the building blocks of the distributed path (each rank: its rows against the
// all-gathered Z and lse).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <climits>
#include <tuple>
#include <vector>

#include "fcl_kernels.h"

namespace {

int dtype_code(const at::Tensor& t) {
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

void check_launch(int err, const char* launcher) {
  TORCH_CHECK(err == 0, launcher, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

int checked_int(int64_t value, const char* what) {
  TORCH_CHECK(value >= 0 && value <= INT_MAX, what, " = ", value, " does not fit the kernels' int");
  return static_cast<int>(value);
}

void check_cuda_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_float_vector(const at::Tensor& t, const char* name, int64_t length,
                        const at::Tensor& like) {
  check_cuda_tensor(t, name, 1);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == length, name, " must have ", length, " entries, got ", t.size(0));
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", zn on ", like.device());
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& like) {
  TORCH_CHECK(grad_out.is_cuda() && grad_out.device() == like.device() &&
                  grad_out.scalar_type() == at::kFloat && grad_out.numel() == 1 &&
                  grad_out.is_contiguous(),
              "grad_out must be one contiguous float32 on ", like.device());
}

// Validates zn (m x d) and the row range; returns {m, d}.
std::pair<int, int> check_rows(const at::Tensor& zn, int64_t row_start, int64_t row_end) {
  check_cuda_tensor(zn, "zn", 2);
  dtype_code(zn);
  const int m = checked_int(zn.size(0), "rows of zn");
  const int d = checked_int(zn.size(1), "features of zn");
  TORCH_CHECK(m >= 2 && d >= 1, "zn must be at least 2 x 1, got ", zn.sizes());
  TORCH_CHECK(0 <= row_start && row_start <= row_end && row_end <= m,
              "row range [", row_start, ", ", row_end, ") is not inside [0, ", m, ")");
  return {m, d};
}

}  // namespace

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

// ---- One-pass fused objectives (csrc/objective.cu) -------------------------------------------
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

// Registers the objective entry points (called from the module definition below).
void define_objectives(py::module_& m) {
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA C++ twin of the fastcluster_cl fused NT-Xent (see csrc/fcl_kernels.h)";
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
  m.def("bank_forward", &bank_forward, "row losses and row weights against a memory bank",
        py::arg("zs"), py::arg("rs"), py::arg("dist"), py::arg("bank"), py::arg("bank_lo"),
        py::arg("inv_tau"), py::arg("fixed_shift"));
  m.def("bank_backward", &bank_backward, "dz_a, dz_b of the loss against a memory bank",
        py::arg("zs"), py::arg("rs"), py::arg("norm"), py::arg("dist"), py::arg("bank"),
        py::arg("bank_lo"), py::arg("row_w"), py::arg("row_loss"), py::arg("w"),
        py::arg("inv_tau"), py::arg("fixed_shift"), py::arg("out"));
  define_objectives(m);
}
