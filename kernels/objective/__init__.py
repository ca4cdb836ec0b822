"""The whole objective of the anchor method and of Contrastive Clustering in one pass: instance
NT-Xent, the clustering terms and the weighted total in two launches forward and two backward,
with no torch compute between them (`fastcluster_cl.backends.reference.anchor_objective` and
`cc_objective` define the math).

Layout. Z = [z_a; z_b] (2N x D) is never concatenated: program p owns the N-row indices
I = [p BLOCK_M, (p + 1) BLOCK_M) and handles rows i and i + N of Z, so a row's positive pair,
and the assignments of sample i (q0_i, qa_i, qb_i for the anchor method; both views' softmax
rows for CC) live in the same program. Columns are streamed as pairs of tiles (z_a rows J,
z_b rows J): against both, row i's diagonal and positive are the column j = i, so one mask
serves the four products of a column pair (`nt_xent._edge_tile` with N rows).

Modules: `instance` (the NT-Xent rows and gradient both share, scalars, partial sums), `anchor`
and `cc` (each method's kernels and host launchers).

Forward row launch (`_anchor_rows_kernel` / `_cc_rows_kernel`), per program:
  * NT-Xent (`_instance_rows`): there is no prologue launch, so each column tile is normalised
    as it is loaded (`nt_xent.scaled_rows`: the exact power-of-two row scaling of the NT-Xent
    prologue, safe for |z| ~ 1e19 or 1e-30, then cast to the fp16 copy for bf16/fp16 inputs),
    which costs O(BLOCK_N D) elementwise work per tile beside the O(BLOCK_M BLOCK_N D) GEMMs.
    The program writes its own rows of what the backward (`nt_xent.grad_block`) reads: Zs, rs,
    norms, the row weights and row losses (2N x D and 2N-sized), and its partial loss sum.
    Row losses use `accumulate_negatives` / `row_losses` (fixed shift or online max, the
    cancellation-free positive term ||zn_i - zn_pos||^2 / 2).
  * anchor, in slices of `_SUB_M` rows (registers independent of BLOCK_M): Student-t logits of
    h0, h_a, h_b against all K centers in tiles (`student_t._distances`; mixed bf16 features
    and fp32 centers meet in fp32), an online log-sum-exp per view (pass 1), then pass 2 recomputes
    the logits and forms q = exp(logit - lse): the anchor terms KL(q0||qa) + KL(q0||qb) (log q
    clamped at the smallest normal as `numerics.safe_log`), q0's partial column sums f (one
    row per slice: deterministic), q0 itself (an N x K temporary for the epilogue, not saved),
    and per row lse_v and c_v = sum_k q0_k [q_v,k >= tiny] (the clamp-aware gradient's sums).
  * cc: softmax rows of both views (`cc_cluster.softmax_rows`), the block's partial Gram of
    [P_a P_b] (three K x K blocks) and column sums.
  * scalars (1/tau, alpha or 1/tau_cluster, the weights) arrive as (hi, lo) fp32 kernel
    arguments (`_common.float_param`: fp64 precision kept) and program 0 writes them into the
    params tensor the later launches read: no host-to-device copy (torch.tensor(...,
    device="cuda") would synchronise the host), no fill.
Epilogue (one program, `_anchor_epilogue_kernel` O(N K) / `_cc_epilogue_kernel` O(K^2)): sums
the partials in a fixed order; anchor: f, DEC's row totals T_i = sum_k q0^2 / f and KL(p||q0)
per row (`kl._dec_row_totals`, `kl._dec_weights`), and c_dec = sum_k p [q0 >= tiny]; cc: the
2K x 2K cluster NT-Xent from the normalised Gram and the marginal entropies; then the means and
the weighted total written straight into the (4,) / (3,) output.

Backward: the incoming gradient g (4,) / (3,) and the weights w fold into one scalar per part
(g_part + g_total w_part) inside the kernels.
  * anchor: one row launch (`_anchor_grad_kernel`): NT-Xent dz of both row blocks through
    `nt_xent.grad_block` (the fast path's kernel body: expm1 positive weights, fp16 tile
    weights scaled from the largest row loss, which the row launch's programs and the epilogue
    reduce into PARAMS[5], the normalisation's backward), and the Student-t rows recomputed
    from h and the centers with the saved lse, f, T, c, in 16-row slices and one view at a
    time (the static report: three views at once spilled): with G = dL/dlogit,
        DEC    G0 = g_dec (q0 c_dec - p [q0 >= tiny]) / N   (p detached)
        anchor Ga = g_anc (qa c_a - q0 [qa >= tiny]) / N, likewise b, none into q0,
    w = -G (alpha + 1) / (alpha + d2), dh = (sum_k w) h - w mu, and the block's partial
    dmu = colsum(w) mu - w^T h (added up over the slices and views in the program's own
    partial, barriers between them); a second small launch
    (`_sum_partials_kernel`) reduces the partial dmu in a fixed order.
  * cc: a one-program launch (`_cc_cluster_grad_kernel`) turns the saved Gram and column sums
    into M = dG + dG^T and dL/dcolsum, then the row launch (`_cc_grad_kernel`) writes dz
    (`grad_block`) and dlogits (`cc_cluster.cluster_grad_rows`: dQ = Q M + dc, softmax
    backward).

Launch shapes: `instance.instance_config` (the forward takes more rows per program than the
fast path, to amortise the per-column normalisation). The static sm_90a numbers, and how they
were reached, are in benchmarks/static_notes.md (section 8).

Saved for the backward: the 2N x D fp16/input-dtype copy Zs and 2N-, N-, K-sized vectors (and
the 2K x 2K Gram for cc); never an N x K or 2N x 2N matrix.

Limits: D and F at most `MAX_FEATURES` (rows in registers); K at most `student_t.MAX_CENTERS`
(anchor, tiled) and `cc_cluster.MAX_CLUSTERS` (cc, the Gram in registers); float64 for all
inputs or none. `anchor_objective_fits` / `cc_objective_fits` say whether a call is within them:
`fastcluster_cl.functional` runs the separate ops (the same function) for calls that are not.
Spills by size are in the static report (`python -m fastcluster_cl.bench static`). The anchor
epilogue is one program walking N x K (a multi-program epilogue would need a third launch or
atomics). The partial dmu is (programs x K x F) floats.
"""

from .anchor import anchor_objective, anchor_objective_fits
from .cc import cc_objective, cc_objective_fits

__all__ = ["anchor_objective", "anchor_objective_fits", "cc_objective", "cc_objective_fits"]
