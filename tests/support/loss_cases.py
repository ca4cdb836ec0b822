"""Every loss and every method of ClusterContrastiveLoss as (name, function, inputs), small,
for the tests that run them all (torch.compile, opcheck)."""

import torch

import fastcluster_cl as fc


def loss_cases(backend):
    """(name, function, inputs) for every loss and every method of ClusterContrastiveLoss."""
    g = torch.Generator().manual_seed(0)
    z, c, h = (
        torch.randn(6, 4, generator=g),
        torch.randn(6, 3, generator=g),
        torch.randn(6, 4, generator=g),
    )
    q, mu = torch.softmax(c, 1), torch.randn(3, 4, generator=g)
    cases = [
        ("nt_xent", lambda a, b: fc.nt_xent(a, b, backend=backend), (z, z + 1)),
        ("cc_cluster_loss", lambda a, b: fc.cc_cluster_loss(a, b, backend=backend), (c, c + 1)),
        ("student_t", lambda a, b: fc.student_t(a, b, backend=backend), (h, mu)),
        ("dec_loss", lambda a: fc.dec_loss(a, backend=backend), (q,)),
        ("anchor_loss", lambda a, b: fc.anchor_loss(a, b, b, backend=backend), (q, q.flip(0))),
    ]
    cases += [
        (
            "anchor_objective",
            lambda a, b: fc.anchor_objective(a, b, h, h + 1, h - 1, mu, backend=backend).total,
            (z, z + 1),
        ),
        (
            "cc_objective",
            lambda a, b: fc.cc_objective(a, b, c, c + 1, backend=backend).total,
            (z, z + 1),
        ),
    ]
    methods = {
        "anchor": lambda: dict(q0=q, q_a=q.flip(0), q_b=q),
        "anchor(h)": lambda: dict(h0=h, h_a=h + 1, h_b=h - 1, centers=mu),
        "cc": lambda: dict(logits_a=c, logits_b=c + 1),
        "tcc": lambda: dict(
            logits_a=c, logits_b=c + 1, centers=z[: c.shape[1]], r_a=z + 2, r_b=z - 2
        ),
    }
    for method, inputs in methods.items():
        crit = fc.ClusterContrastiveLoss(method.split("(")[0], backend=backend)
        cases.append(
            (
                f"ClusterContrastiveLoss({method})",
                lambda a, b, crit=crit, inputs=inputs: crit(a, b, **inputs()).total,
                (z, z + 1),
            )
        )
    return cases
