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
    p = q ** 2 / f
    p = p / p.sum(1, keepdims=True)
    return np.mean([kl(p[i], q[i]) for i in range(q.shape[0])])


def anchor_loss(q0, q_a, q_b):
    return np.mean([kl(q0[i], q_a[i]) + kl(q0[i], q_b[i]) for i in range(q0.shape[0])])
