"""Every loss op x implementation, forward and forward+backward, by 2N tier, D, K and dtype.

The "small" tier is one D and one K per op (the quick profile: `-k small`); the "medium" and
"large" tiers cross every D and K.

Backends (torch, chunked, triton, cuda) run through the public API; the peers (torch.compile of
the reference, lightly, pytorch-metric-learning) are measured for NT-Xent, the loss they share.
Group and compare with e.g. `--benchmark-group-by=param:case`.
"""

import pytest
from conftest import DEVICE, DTYPES, SIZES

from fastcluster_cl.bench import runner as bench

DIMS = (128, 512)
KS = (10, 100)

PARAMS = []
for tier, two_n in SIZES.items():
    dims, ks = (DIMS[:1], KS[:1]) if tier == "small" else (DIMS, KS)
    ops = [op for op in bench.OPS if op not in bench.OBJECTIVES]
    for case in bench.cases(ops, [two_n], dims, ks, DTYPES):
        impls = bench.IMPLS if case.op == "nt_xent" else bench.BACKENDS
        PARAMS += [pytest.param(case, impl, id=f"{tier}-{case.label}-{impl}") for impl in impls]

# The whole objectives, one pass against the separate ops: the small batch is where launch
# count matters. 2N = 65536 needs a GPU (the torch reference's 2N x 2N matrix is 16 GiB).
OBJECTIVE_SIZES = (512, 4096, 65536) if DEVICE.type == "cuda" else (512, 4096)
for case in bench.cases(bench.OBJECTIVES, OBJECTIVE_SIZES, DIMS[:1], KS, DTYPES):
    PARAMS += [
        pytest.param(case, impl, id=f"objective-{case.label}-{impl}")
        for impl in bench.BACKENDS + bench.SEPARATE
    ]


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_loss(run_case, case, impl):
    run_case(case, impl)
