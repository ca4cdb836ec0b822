"""fp32 products on the tensor cores as bf16 parts (`numerics.parts_product`), used by the
chunked cc side on CUDA: exact splits, every kept term, fp32's accuracy, where they run, and
the cc side through them. Without a GPU the bf16 x bf16 -> fp32 products run on the CPU
(`EmulatedTensorCores`: products of bf16 numbers are exact in fp32, accumulated with IEEE
round-to-nearest, which the tensor cores' accumulation need not match: the `gpu` tests check
the accuracy on the hardware)."""

import pytest
import torch
from tensor_cores import EmulatedTensorCores
from tolerances import check_against_reference

import fastcluster_cl as fc
from fastcluster_cl.backends import numerics, reference

F64 = torch.float64


def _rand(*shape, seed, low=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=F64) * (1 - low) + low).float()


def test_bf16_parts_are_exact():
    g = torch.Generator().manual_seed(1)
    exponents = torch.randint(-30, 30, (4000,), generator=g)
    x = (torch.randn(4000, generator=g, dtype=F64) * 10.0**exponents).float()
    hi, mid, lo = numerics.bf16_parts(x)
    assert hi.dtype == mid.dtype == lo.dtype == torch.bfloat16
    assert torch.equal(hi.float() + mid.float() + lo.float(), x)


@pytest.mark.parametrize("signed", [False, True])
def test_parts_product_has_fp32_accuracy(signed):
    """Against float64: within twice fp32 matmul's error on the same inputs, for non-negative
    factors (cc's columns and probabilities) and signed ones whose sums cancel."""
    low = -1.0 if signed else 0.0
    a, b = _rand(300, 700, seed=2, low=low), _rand(700, 200, seed=3, low=low)
    want = a.double() @ b.double()
    with EmulatedTensorCores():
        got = numerics.parts_product(numerics.bf16_parts(a), numerics.bf16_parts(b))
    scale = want.abs().max()
    err = ((got.double() - want).abs().max() / scale).item()
    fp32 = (((a @ b).double() - want).abs().max() / scale).item()
    assert got.dtype == torch.float32 and err <= 2 * fp32, (err, fp32)


def test_every_part_product_is_kept():
    """One multiply-add per output (an outer product): no accumulation error, so each entry is
    the six kept part products, within 4 fp32 roundings of the exact a_i b_j. A term of order 1
    or 2 dropped or doubled errs by 2^-16 of it or more."""
    a, b = _rand(64, 1, seed=4, low=-1.0), _rand(1, 48, seed=5, low=-1.0)
    want = a.double() @ b.double()
    with EmulatedTensorCores():
        got = numerics.parts_product(numerics.bf16_parts(a), numerics.bf16_parts(b))
    assert ((got.double() - want).abs() <= 4 * 2.0**-24 * want.abs()).all()


def test_parts_gram_keeps_the_six_terms_in_four_products():
    """`parts_gram`, x^T x by symmetry: symmetric (exactly here, on the CPU); one row (an outer
    product, no accumulation) within 5 fp32 roundings of the exact x_i x_j, every kept term
    there (a term of order 1 or 2 dropped or doubled errs by 2^-16 of it or more); N = 700 rows
    within twice fp32 matmul's error against float64."""
    for x, bound in ((_rand(1, 48, seed=8, low=-1.0), "terms"), (_rand(700, 60, seed=9), "sum")):
        want = x.double().T @ x.double()
        with EmulatedTensorCores():
            got = numerics.parts_gram(numerics.bf16_parts(x))
        assert got.dtype == torch.float32 and torch.equal(got, got.T)
        if bound == "terms":
            assert ((got.double() - want).abs() <= 5 * 2.0**-24 * want.abs()).all()
        else:
            fp32 = ((x.T @ x).double() - want).abs().max()
            assert (got.double() - want).abs().max() <= 2 * fp32


def test_products_by_parts_only_where_they_pay(monkeypatch):
    """fp32 CUDA (or meta: the cost model's trace) products of at least PARTS_PRODUCT_MACS
    multiply-adds and PARTS_PRODUCT_MACS_PER_ELEMENT per operand element."""

    def by_parts(m, k, n, device="meta", dtype=torch.float32):
        a = torch.empty(m, k, device=device, dtype=dtype)
        return numerics._by_parts(a, torch.empty(k, n, device=device, dtype=dtype))

    assert by_parts(2000, 1024, 2000)  # cc's Gram at K = 1000, N = 1024
    assert by_parts(4096, 2000, 2000)  # its backward at N = 4096
    assert not by_parts(400, 32768, 400)  # K = 200 at N = 32768: the split costs more
    large = (400, 32768, 400, torch.float32, torch.device("meta"))
    assert numerics.products_by_parts(*large, split=True)  # unless Q comes split (cc's Triton)
    assert not numerics.products_by_parts(200, 32768, 200, *large[3:], split=True)  # too small
    assert not by_parts(200, 1024, 200)  # small
    assert not by_parts(2000, 1024, 2000, dtype=F64)
    assert not by_parts(2000, 1024, 2000, dtype=torch.bfloat16)
    assert not by_parts(64, 64, 64, device="cpu")
    monkeypatch.setattr(numerics, "tf32_allowed", lambda: True)  # one TF32 product is faster
    assert not by_parts(2000, 1024, 2000)


def test_cc_side_through_parts_matches_the_reference(monkeypatch):
    """The chunked cc side (K = 100: above the fused kernels' 64) with both products by parts:
    values and gradients against float64 at fp32's tolerance, confident and near-uniform rows."""
    monkeypatch.setattr(numerics, "_by_parts", lambda a, b: a.dtype == torch.float32)
    g = torch.Generator().manual_seed(5)
    confident = torch.randn(60, 100, generator=g, dtype=F64) * 8.0
    uniform = torch.randn(60, 100, generator=g, dtype=F64) * 0.01
    for logits_a, logits_b in ((confident, confident + 0.1), (uniform, uniform.flip(0))):
        with EmulatedTensorCores():
            check_against_reference(
                lambda a, b: fc.cc_cluster_loss(a, b, 1.0, backend="chunked"),
                lambda a, b: reference.cc_cluster_loss(a, b, 1.0),
                (logits_a, logits_b),
                torch.float32,
            )


@pytest.mark.gpu
def test_parts_product_on_the_gpu():
    """On the tensor cores (whose fp32 accumulation the CPU emulation does not reproduce):
    signed factors, within twice an IEEE fp32 matmul's error against float64."""
    a, b = _rand(2000, 1024, seed=6, low=-1.0).cuda(), _rand(1024, 2000, seed=7, low=-1.0).cuda()
    assert numerics._by_parts(a, b)
    want = a.double() @ b.double()
    scale = want.abs().max()
    err = ((numerics.fp32_product(a, b).double() - want).abs().max() / scale).item()
    fp32 = (((a @ b).double() - want).abs().max() / scale).item()  # IEEE: torch's default
    assert err <= 2 * fp32, (err, fp32)


@pytest.mark.gpu
def test_cc_objective_by_parts_on_the_gpu():
    """K = 1000 clusters over 1024 rows: auto runs the chunked cc side, both products by parts;
    values and gradients against float64 at fp32's tolerance."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(1024, 1000, generator=g, dtype=F64) * 4.0
    gram = torch.empty(2000, 1024, device="cuda"), torch.empty(1024, 2000, device="cuda")
    assert numerics._by_parts(*gram)
    check_against_reference(
        lambda a, b: fc.cc_cluster_loss(a, b, 1.0),
        lambda a, b: reference.cc_cluster_loss(a, b, 1.0),
        (logits, logits + 0.05 * torch.randn(1024, 1000, generator=g, dtype=F64)),
        torch.float32,
        device="cuda",
    )
