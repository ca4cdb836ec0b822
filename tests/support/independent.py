"""Independent float64 NumPy implementations of every loss, written from the papers' formulas
(CC's cross-entropy form of NT-Xent, explicit loops over rows), not from the reference code."""

import numpy as np


def nt_xent(z_a, z_b, tau):
    z = np.concatenate([z_a, z_b]).astype(np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    two_n, n = z.shape[0], z_a.shape[0]
    total = 0.0
    for i in range(two_n):
        pos = i + n if i < n else i - n
        logits = np.array([z[i] @ z[k] / tau for k in range(two_n) if k != i])
        positive = z[i] @ z[pos] / tau
        m = logits.max()
        total += m + np.log(np.exp(logits - m).sum()) - positive  # cross entropy, target = pos
    return total / two_n


def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def entropy_term(q):
    p = q.sum(0) / q.sum()
    return np.log(q.shape[1]) + np.sum(p * np.log(p))


def cc_cluster_loss(c_a, c_b, tau):
    q_a, q_b = softmax(c_a), softmax(c_b)
    return nt_xent(q_a.T, q_b.T, tau) + entropy_term(q_a) + entropy_term(q_b)


def student_t(h, mu, alpha):
    q = np.empty((h.shape[0], mu.shape[0]))
    for i in range(h.shape[0]):
        for k in range(mu.shape[0]):
            q[i, k] = (1 + np.sum((h[i] - mu[k]) ** 2) / alpha) ** (-(alpha + 1) / 2)
    return q / q.sum(1, keepdims=True)


def kl(p, q):
    mask = p > 0
    return np.sum(p[mask] * np.log(p[mask] / q[mask]))


def dec_loss(q):
    f = q.sum(0)
    p = q**2 / f
    p = p / p.sum(1, keepdims=True)
    return np.mean([kl(p[i], q[i]) for i in range(q.shape[0])])


def anchor_loss(q0, q_a, q_b):
    return np.mean([kl(q0[i], q_a[i]) + kl(q0[i], q_b[i]) for i in range(q0.shape[0])])


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def tcc_loss(
    z_a, z_b, logits_a, logits_b, centers, r_a, r_b, pi_a, pi_b, tau_i, tau_c, lam, alpha, prior
):
    """TCC's three parts (instance, cluster, prior) for given assignment samples pi (N x K),
    written from the specification (docs/methods.md) with explicit loops over clusters."""
    v_a, v_b = _unit(z_a), _unit(z_b)
    c = _unit(centers)
    e_a = _unit(_unit(pi_a @ c) + alpha * _unit(r_a))
    e_b = _unit(_unit(pi_b @ c) + alpha * _unit(r_b))
    k = centers.shape[0]
    s_a = np.stack([sum(pi_a[i, j] * v_a[i] for i in range(len(v_a))) for j in range(k)])
    s_b = np.stack([sum(pi_b[i, j] * v_b[i] for i in range(len(v_b))) for j in range(k)])
    q_a, q_b = softmax(logits_a / lam), softmax(logits_b / lam)
    if prior == "kl":
        kl = [np.sum(q * np.log(q * k)) for q in np.concatenate([q_a, q_b])]
        prior_value = float(np.mean(kl))
    else:
        prior_value = entropy_term(q_a) + entropy_term(q_b)
    return {
        "instance": nt_xent(e_a, e_b, tau_i),
        "cluster": nt_xent(s_a, s_b, tau_c),
        "prior": prior_value,
    }
