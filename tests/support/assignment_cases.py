"""Assignment matrices and the (dtype, N, K) cases per backend shared by the DEC and anchor op
tests (ops/test_op_dec_loss.py, test_op_anchor_loss.py, test_op_dec_anchor_losses.py)."""

import torch
from backend_cases import cases
from tolerances import BF16, F16, F32, F64


def assignments(n, k, seed, zero=False):
    """Rows of softmax(2 randn) (float64); zero: q[0, 1] = 0 exactly, rows renormalised."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.softmax(2.0 * torch.randn(n, k, generator=gen, dtype=F64), dim=1)
    if zero:
        q[0, 1] = 0.0
    return q / q.sum(1, keepdim=True)


# (dtype, n, k, q with an exact zero)
DEC_CASES = cases(
    {
        "torch": [(F32, 37, 10, False)],
        "chunked": [(F64, 37, 10, False)],
        "triton": [
            (dtype, n, k, False)
            for dtype in (F64, F32, BF16)
            for n, k in [(37, 10), (6, 2), (70, 13)]
        ],
        "cuda-emulated": [
            (dtype, n, k, True) for dtype in (F32, F16, BF16) for n, k in [(37, 10), (20, 45)]
        ],
        "cuda": [
            (dtype, n, k, True)
            for dtype in (F32, F16, BF16)
            for n, k in [(37, 10), (3, 2), (129, 40)]
        ],
    }
)
