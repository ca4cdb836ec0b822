// C interface of the CUDA twin: the fused NT-Xent (docs/design.md, "The losses", item 1;
// csrc/nt_xent.cu) and the Student-t, DEC and anchor terms (items 4 to 6; csrc/cluster.cu).
//
// NT-Xent: Z = [z_a; z_b] has m = 2n rows of d features; row i's positive is (i + m/2) mod m. Every
// launcher takes raw device pointers, sizes and a stream, launches asynchronously and returns
// the cudaError_t of the launch (cudaSuccess == 0). Row-range launchers work on the global rows
// [row_start, row_end) of the full normalised Z; their per-row inputs and outputs are indexed
// from row_start (entry 0 is row row_start), so a distributed caller passes its own rows and the
// all-gathered Z and lse. Inputs: float32 (SIMT fp32 path) or float16/bfloat16 (tensor cores,
// fp32 accumulation); every statistic and gradient accumulator is float32.
#ifndef FASTCLUSTER_CL_FCL_KERNELS_H_
#define FASTCLUSTER_CL_FCL_KERNELS_H_

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of z, zs and dz.
enum FclDtype { FCL_FLOAT32 = 0, FCL_FLOAT16 = 1, FCL_BFLOAT16 = 2 };

// zs[i] = p z_a[i], zs[n + i] likewise for z_b, with p the power of two that puts the row's
// largest |element| into [1, 2) (zs: 2n x d; fp16 for fp16 and bf16 inputs, fp32 for fp32);
// rs[0..2n) = 1 / max(||zs_i||, 1e-12 p), so that zs_i rs_i = z_i / max(||z_i||, 1e-12) (rows of
// any finite magnitude are exact); norm[0..2n) = max(||z_i||, 1e-12); dist[i] = 1 - zn[i] .
// zn[n + i] = 1 - tau S_{i,pos(i)}, without cancellation for correlated views (all fp32).
// z_a, z_b: n x d, contiguous.
int fcl_nt_xent_normalize(int dtype, const void* z_a, const void* z_b, int n, int d, void* zs,
                          float* rs, float* norm, float* dist, cudaStream_t stream);

// Column splits: the lse and gradient launchers can divide the m columns among `splits` groups
// of blocks (more blocks when few rows are asked for) and combine the partial results from a
// caller-provided fp32 workspace, in a fixed order (deterministic for a given split count).
// Returns the split count recommended for a GPU with `multiprocessors` SMs (backward = 0 for
// fcl_nt_xent_lse, 1 for fcl_nt_xent_grad). Counts are clamped to [1, column tiles]; 1 needs no
// workspace.
int fcl_nt_xent_splits(int dtype, int m, int d, int rows, int backward, int multiprocessors);

// lse[i - row_start] = log sum_{k != i, pos(i)} exp(inv_tau * zn[i] . zn[k]) for the rows
// [row_start, row_end), zn = zs rs (the outputs of normalize), over the negatives only
// (pos(i) = i +- m/2): online log-sum-exp over column tiles, no m x m buffer. m >= 2 and even;
// dtype is zs's.
// workspace: 2 * splits * (row_end - row_start) floats when splits > 1, else may be NULL.
int fcl_nt_xent_lse(int dtype, const void* zs, const float* rs, int m, int d, int row_start,
                    int row_end, float inv_tau, int splits, float* workspace, float* lse,
                    cudaStream_t stream);

// g[i - row_start] = sum_{j != i} (P_ij + P_ji) zn[j] - 2 zn[pos(i)] for the rows
// [row_start, row_end), with P_ij = exp(inv_tau * zn[i] . zn[j] - lse_full[i]); lse_full and
// loss_full hold all m rows' lse and loss (lse_i - S_i,pos(i)), the positive's weight being
// expm1(-loss_i) + expm1(-loss_pos(i)). g is fp32, (row_end - row_start) x d: the unscaled
// dL/dzn (no atomics). weight_full (NULL for the mean's gradient) holds m per-row loss weights
// c, |c| <= 1: then A_ij = c_i P_ij + c_j P_ji and the positive's c_i expm1(-loss_i) +
// c_pos expm1(-loss_pos(i)).
// workspace: splits * (row_end - row_start) * d floats when splits > 1, else may be NULL.
int fcl_nt_xent_grad(int dtype, const void* zs, const float* rs, int m, int d, int row_start,
                     int row_end, float inv_tau, const float* lse_full, const float* loss_full,
                     const float* weight_full, int splits, float* workspace, float* g,
                     cudaStream_t stream);

// Finishes the gradient of rows [row_start, row_end): u = (*grad_out * factor) * g, factor =
// inv_tau / m for the mean loss, then the backward of the L2 normalisation:
// dz = (u - zn (zn . u)) / norm where norm > 1e-12, else u / norm, zn = zs rs (rs indexed
// from 0). norm and g are indexed from row_start (the outputs of normalize and grad); dz is
// (row_end - row_start) x d of dtype dz_dtype (the input's). grad_out is a device pointer to one
// float (the loss's gradient).
int fcl_nt_xent_norm_backward(int dtype, const void* zs, const float* rs, const float* norm,
                              const float* g, int m, int d, int row_start, int row_end,
                              const float* grad_out, float factor, int dz_dtype, void* dz,
                              cudaStream_t stream);

// Student-t assignment (csrc/cluster.cu): h n x f, centers k x f (input dtype, contiguous);
// q[i][c] = softmax_c(-(alpha+1)/2 log1p(dist2[i][c] / alpha)), dist2[i][c] = ||h_i - mu_c||^2
// (both n x k, fp32; dist2 is kept for the backward).
int fcl_student_t(int dtype, const void* h, const void* centers, int n, int k, int f, float alpha,
                  float* q, float* dist2, cudaStream_t stream);

// dh (n x f) and dcenters (k x f) in the input dtype from grad_q = dL/dq (n x k, fp32); w is an
// n x k fp32 scratch buffer that receives dL/d dist2.
int fcl_student_t_backward(int dtype, const void* h, const void* centers, const float* q,
                           const float* dist2, const float* grad_q, int n, int k, int f,
                           float alpha, float* w, void* dh, void* dcenters, cudaStream_t stream);

// DEC and anchor terms (csrc/cluster.cu); q, q0, qa, qb: n x k, contiguous, input dtype.
// f[c] = sum_i q[i][c] (fp32). A distributed caller all-reduces f before fcl_dec_rows.
int fcl_column_sums(int dtype, const void* q, int n, int k, float* f, cudaStream_t stream);

// loss_rows[i] = KL(p_i || q_i) with the DEC target p_ik = (q_ik^2 / f_k) / sum_j (q_ij^2 / f_j).
int fcl_dec_rows(int dtype, const void* q, const float* f, int n, int k, float* loss_rows,
                 cudaStream_t stream);

// dq = -(*grad_out * factor) p / q (p held fixed; 0 where q < FLT_MIN, the clamped log).
int fcl_dec_backward(int dtype, const void* q, const float* f, int n, int k,
                     const float* grad_out, float factor, void* dq, cudaStream_t stream);

// loss_rows[i] = KL(q0_i || qa_i) + KL(q0_i || qb_i).
int fcl_anchor_rows(int dtype, const void* q0, const void* qa, const void* qb, int n, int k,
                    float* loss_rows, cudaStream_t stream);

// dqa = -(*grad_out * factor) q0 / qa, dqb likewise (q0 held fixed; clamped log as above).
int fcl_anchor_backward(int dtype, const void* q0, const void* qa, const void* qb, int n, int k,
                        const float* grad_out, float factor, void* dqa, void* dqb,
                        cudaStream_t stream);

// ---- One-pass fused objectives (csrc/objective.cu) -------------------------------------------
// reference.anchor_objective and reference.cc_objective: the instance NT-Xent of [z_a; z_b]
// (n x d each, m = 2n rows, z_dtype) and the method's cluster terms; forward: one row kernel and
// one single-block epilogue; backward: one row kernel and one small kernel. Every buffer is
// caller-allocated and contiguous; the fp32 state the forward writes is the backward's input,
// and it holds no n x k (or m x m) matrix: the backward recomputes the assignments.
//   rows (5 x m): per row of [z_a; z_b] rs = 1 / max(||z p||, 1e-12 p), max(||z||, 1e-12), the
//     lse over all k != i, the row loss and p, the power of two that puts the row's largest
//     |element| into [1, 2) (zn = (z p) rs).
// grad: device pointer to dL/dout (4 floats for anchor, 3 for cc); the output weights and the
// incoming gradients are folded inside the kernels. workspace: fcl_objective_workspace floats
// (scratch of one call, nothing in it outlives the call).
enum FclObjective { FCL_OBJECTIVE_ANCHOR = 0, FCL_OBJECTIVE_CC = 1 };

// The most clusters the cc launchers take (the rows' [qa_i, qb_i] live in shared memory, the
// forward's workspace holds a 2K x 2K Gram per 16 rows); more: cudaErrorInvalidValue.
enum { FCL_CC_MAX_CLUSTERS = 64 };

// fp32 workspace size (floats) of the forward (backward = 0) or backward launcher; f = 0 for cc.
long long fcl_objective_workspace(int objective, int backward, int n, int d, int k, int f);

// out (4) = [total, instance NT-Xent, DEC KL on q0, KL(q0||qa) + KL(q0||qb) (q0 detached)],
// total = w_instance instance + w_cluster DEC + w_anchor anchor, with q = Student-t(h, centers,
// alpha) per view (fp32). h0, h_a, h_b: n x f of h_dtype; centers: k x f float32. State: rows,
// assign (7 x n: the Student-t lse of h0, h_a, h_b per row; DEC's row totals T_i =
// sum_k q0_ik^2 / f_k and c_dec_i = sum_k p_ik [q0_ik >= FLT_MIN]; c_a_i and c_b_i =
// sum_k q0_ik [q_v,ik >= FLT_MIN], the sums of the clamped log's exact gradient), col_sums
// (k: f_k = sum_i q0_ik).
int fcl_anchor_objective_forward(int z_dtype, const void* z_a, const void* z_b, int n, int d,
                                 int h_dtype, const void* h0, const void* h_a, const void* h_b,
                                 const float* centers, int k, int f, float inv_tau, float alpha,
                                 float w_instance, float w_cluster, float w_anchor, float* rows,
                                 float* assign, float* col_sums, float* workspace, float* out,
                                 cudaStream_t stream);

// dz_a, dz_b (z_dtype), dh0, dh_a, dh_b (h_dtype) and dcenters (k x f float32); the Student-t
// rows are recomputed from h, centers and the saved lse.
int fcl_anchor_objective_backward(int z_dtype, const void* z_a, const void* z_b, int n, int d,
                                  int h_dtype, const void* h0, const void* h_a, const void* h_b,
                                  const float* centers, int k, int f, float inv_tau, float alpha,
                                  float w_instance, float w_cluster, float w_anchor,
                                  const float* rows, const float* assign, const float* col_sums,
                                  const float* grad, float* workspace, void* dz_a, void* dz_b,
                                  void* dh0, void* dh_a, void* dh_b, float* dcenters,
                                  cudaStream_t stream);

// out (3) = [total, instance NT-Xent (inv_tau), CC cluster loss (inv_tau_c: NT-Xent over the 2K
// L2-normalised columns of [softmax(logits_a), softmax(logits_b)] plus both marginal entropy
// terms)], total = w_instance instance + w_cluster cluster. logits: n x k of l_dtype, k at most
// FCL_CC_MAX_CLUSTERS. State: rows, row_lse (2 x n: the softmax lse of each view's row), gram
// (2k x 2k, of the columns), cluster_rows (3 x 2k: each column's lse and loss, the column sums).
int fcl_cc_objective_forward(int z_dtype, const void* z_a, const void* z_b, int n, int d,
                             int l_dtype, const void* logits_a, const void* logits_b, int k,
                             float inv_tau, float inv_tau_c, float w_instance, float w_cluster,
                             float* rows, float* row_lse, float* gram, float* cluster_rows,
                             float* workspace, float* out, cudaStream_t stream);

// dz_a, dz_b (z_dtype), dlogits_a, dlogits_b (l_dtype); the softmax rows are recomputed from the
// logits and row_lse.
int fcl_cc_objective_backward(int z_dtype, const void* z_a, const void* z_b, int n, int d,
                              int l_dtype, const void* logits_a, const void* logits_b, int k,
                              float inv_tau, float inv_tau_c, float w_instance, float w_cluster,
                              const float* rows, const float* row_lse, const float* gram,
                              const float* cluster_rows, const float* grad, float* workspace,
                              void* dz_a, void* dz_b, void* dlogits_a, void* dlogits_b,
                              cudaStream_t stream);

// NT-Xent against a memory bank (csrc/nt_xent_bank.cu). zs, rs, dist, norm: the outputs of
// fcl_nt_xent_normalize on (z_a, z_b) (zs 2n x d, rows i < n the anchors); bank: m_bank x d in
// zs's element type, contiguous, rows of norm <= 1, used as given; bank_lo: NULL, or the low
// half of a bank wider than fp16 (bank + bank_lo is the bank; the scores take both products).
// fixed_shift != 0 sums 2^(x - log2(e) inv_tau) (valid where exp(-2 inv_tau) is a normal
// float), else uses the online row max. Forward: row_loss[i] = log(1 + sum_k exp(S_ik -
// S_pos_i)) and the backward's row weight row_w[i] (exp(1/tau - lse_i) under the fixed shift,
// else lse_i log2 e), fp32, n entries each.
int fcl_nt_xent_bank_lse(int dtype, const void* zs, const float* rs, const float* dist,
                         const void* bank, const void* bank_lo, int n, int m_bank, int d,
                         float inv_tau, int fixed_shift, float* row_loss, float* row_w,
                         cudaStream_t stream);

// dz_a, dz_b (n x d, dz_dtype) of sum_i w[i] row_loss[i] (w: n fp32 row gradients, 1/n each
// for the mean), from the forward's row_w and row_loss; workspace: n x d floats (G = sum_k P_ik
// bank_k). The bank gets no gradient.
int fcl_nt_xent_bank_grad(int dtype, const void* zs, const float* rs, const float* norm,
                          const float* dist, const void* bank, const void* bank_lo, int n,
                          int m_bank, int d, float inv_tau, int fixed_shift, const float* row_w,
                          const float* row_loss, const float* w, float* workspace, int dz_dtype,
                          void* dz_a, void* dz_b, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif  // FASTCLUSTER_CL_FCL_KERNELS_H_
