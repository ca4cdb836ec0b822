"""The benchmark runner (`fastcluster-cl bench`, fastcluster_cl.bench): floors, peak memory,
skips, and a --quick CPU run whose JSON, table and plot hold real values."""

import json

import pytest
import torch

from fastcluster_cl.bench import runner as bench


def test_floor_counts_nt_xent_as_design_says():
    case = bench.Case("nt_xent", 6, 5, 3, "bfloat16", backward=False)
    fl = bench.floor(case)
    assert fl == {"flops": 2 * 6**2 * 5, "exps": 6**2, "bytes": 6 * 5 * 2}
    both = bench.floor(bench.Case("nt_xent", 6, 5, 3, "bfloat16", backward=True))
    assert both == {"flops": 3 * fl["flops"], "exps": 2 * fl["exps"], "bytes": 2 * fl["bytes"]}


def test_inputs_match_the_case():
    case = bench.Case("anchor_objective", 10, 7, 4, "float32", backward=True)
    z_a, z_b, h0, h_a, h_b, centers = bench.make_inputs(case, "cpu", seed=1)
    assert z_a.shape == (5, 7) and h_b.shape == (5, 7) and centers.shape == (4, 7)
    assert all(t.requires_grad and t.is_leaf for t in (z_a, z_b, h0, h_a, h_b, centers))
    logits_a, logits_b = bench.make_inputs(
        bench.Case("cc_cluster_loss", 10, 7, 4, "float32", False), "cpu"
    )
    assert not torch.equal(logits_a, logits_b)
    (q,) = bench.make_inputs(bench.Case("dec_loss", 10, 7, 4, "float64", False), "cpu")
    torch.testing.assert_close(q.sum(1), torch.ones(5, dtype=torch.float64))


def test_anchor_cases_take_a_backbone_width_and_fp32_centers_under_16_bit():
    """--features F: the anchor objective's h (N, F) and centers (K, F), float32 centers under
    bf16 inputs (autocast's parameter); other ops are not repeated over F."""
    got = bench.cases(
        ["anchor_objective", "nt_xent"], [10], [7], [4], ["bfloat16"], ["fwd"], [9, 11]
    )
    assert [(c.op, c.features) for c in got] == [
        ("anchor_objective", 9),
        ("anchor_objective", 11),
        ("nt_xent", 0),
    ]
    z_a, _, h0, _, _, centers = bench.make_inputs(got[0], "cpu")
    assert z_a.shape == (5, 7) and h0.shape == (5, 9) and centers.shape == (4, 9)
    assert h0.dtype == torch.bfloat16 and centers.dtype == torch.float32
    assert got[0].label == "anchor_objective-2N10-D7-F9-K4-bfloat16-fwd"
    parts = ("nt_xent", "student_t", "student_t", "student_t", "dec_loss", "anchor_loss")
    widths = {"student_t": 9}  # the assignments are over F, NT-Xent over D
    flops = [
        bench.floor(bench.Case(op, 10, widths.get(op, 7), 4, "bfloat16", False))["flops"]
        for op in parts
    ]
    assert bench.floor(got[0])["flops"] == sum(flops)


def test_cpu_peak_memory_measures_tensor_bytes():
    nbytes = 3_000_000

    def step():
        x = torch.ones(nbytes, dtype=torch.uint8)
        y = x + 1  # a second buffer of the same size, live with x
        return int(y[0])

    peak = bench.peak_memory(step, torch.device("cpu"))
    assert 2 * nbytes <= peak < 2 * nbytes + 4096


def test_pml_is_skipped_where_its_cubic_mask_does_not_fit():
    pytest.importorskip("pytorch_metric_learning")
    case = bench.Case("nt_xent", 2048, 8, 2, "float32", backward=False)
    with pytest.raises(bench.Skip, match="128 GiB at 2N = 2048"):
        bench.measure(case, "pml", torch.device("cpu"), min_run_time=0.01)


@pytest.mark.parametrize(
    ("impl", "op", "reason"),
    [
        ("triton", "nt_xent", "GPU-only"),
        ("cuda", "nt_xent", "GPU-only"),
        ("lightly", "cc_cluster_loss", "lightly has no cc_cluster_loss"),
        ("triton-separate", "nt_xent", "whole objectives only"),
        ("triton-separate", "cc_objective", "GPU-only"),
    ],
)
def test_unavailable_implementations_skip_with_a_reason(impl, op, reason):
    with pytest.raises(bench.Skip, match=reason):
        bench.resolve_impl(impl, op, torch.device("cpu"))


@pytest.mark.parametrize("op", bench.OBJECTIVES)
def test_objective_rows_time_the_total_and_sum_their_parts_floors(op):
    case = bench.Case(op, 8, 6, 3, "float32", backward=True)
    parts = {
        "anchor_objective": ["nt_xent"] + 3 * ["student_t"] + ["dec_loss", "anchor_loss"],
        "cc_objective": ["nt_xent", "cc_cluster_loss"],
    }[op]
    floors = [bench.floor(bench.Case(p, 8, 6, 3, "float32", True)) for p in parts]
    assert bench.floor(case) == {k: sum(f[k] for f in floors) for k in floors[0]}
    inputs = bench.make_inputs(case, "cpu")
    total = bench.resolve_impl("chunked", op, torch.device("cpu"))(*inputs)
    assert total.dim() == 0 and total.requires_grad


def test_quick_run_writes_json_table_and_plot(tmp_path, capsys):
    rc = bench.main(
        [
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--backends",
            "torch,chunked,triton",
            "--dims",
            "16",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    (json_path,) = tmp_path.glob("*.json")
    (png_path,) = tmp_path.glob("*.png")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(json_path.read_text())
    meta = report["meta"]
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__ and meta["date"]
    rows = report["results"]
    assert {(r["two_n"], r["mode"], r["impl"]) for r in rows} == {
        (n, m, i) for n in bench.QUICK_SIZES for m in bench.MODES for i in ("torch", "chunked")
    }
    assert {s["impl"] for s in report["skipped"]} == {"triton"}
    (ceiling,) = report["matmul_ceiling_tflops"].values()
    assert 1e-4 < ceiling < 100  # a CPU's float32 matrix product, in TFLOP/s
    for r in rows:
        assert r["median_s"] > 0 and r["dim"] == 16 and r["dtype"] == "float32"
        assert r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)
        assert r["ceiling_fraction"] == pytest.approx(r["tflops"] / ceiling)
        assert r["ratio"] > 0
        if r["impl"] == "torch":
            assert r["ratio"] == 1.0
            # the reference materialises S = Z Z^T / tau: (2N)^2 float32 at least
            assert r["peak_bytes"] >= 4 * r["two_n"] ** 2
    ref = {r["case"]: r["median_s"] for r in rows if r["impl"] == "torch"}
    for r in rows:
        assert r["ratio"] == pytest.approx(r["median_s"] / ref[r["case"]])
    assert "| nt_xent-2N64-D16-float32-fwd | torch |" in out
    assert f"matmul ceiling float32 {ceiling:.3g} TFLOP/s" in out
    assert (
        "| case | impl | median ms | x torch | TFLOP/s | % matmul ceiling | GB/s at floor "
        "| peak MiB |"
    ) in out
    summary = [
        line
        for line in out.splitlines()
        if line.startswith("| nt_xent-2N128-D16-float32-fwd+bwd | ") and " ms (" in line
    ]
    assert len(summary) == 1 and summary[0].split(" | ")[1].endswith(
        "(1.00x), "
        + format(
            next(
                r["peak_bytes"]
                for r in rows
                if r["impl"] == "torch" and r["two_n"] == 128 and r["backward"]
            )
            / 2**20,
            ".3g",
        )
        + " MiB"
    )
    assert (
        "skipped triton on 4 case(s), e.g. nt_xent-2N64-D16-float32-fwd: triton is GPU-only" in out
    )


def test_process_clock_ignores_time_off_cpu():
    import time

    def sleep():  # 2 ms off the CPU: autorange adds calls until min_run_time of CPU time accrues
        time.sleep(0.002)

    cpu = torch.device("cpu")
    assert bench.time_call(sleep, cpu, 0.005, clock="wall") >= 0.002
    assert bench.time_call(sleep, cpu, 0.001, clock="process") < 0.001


def test_implementations_of_a_case_take_turns_and_skip_alone():
    case = bench.Case("nt_xent", 16, 4, 2, "float32", backward=True)
    inputs = [bench.make_inputs(case, "cpu", seed) for seed in range(2)]
    rows, skipped = bench.measure_interleaved(
        case, ["torch", "triton", "chunked"], torch.device("cpu"), 0.01, inputs
    )
    assert [r["impl"] for r in rows] == ["torch", "chunked"]
    assert [impl for impl, _ in skipped] == ["triton"]
    for row in rows:
        assert len(row["round_s"]) == bench.ROUNDS and row["median_s"] > 0 and row["iqr_s"] >= 0


def test_peer_verdict_takes_the_ratio_round_by_round():
    # drift that hits both alike (rounds 3-5 twice as slow): every round's ratio is 0.9
    ours = {"round_s": [0.9, 0.9, 1.8, 1.8, 1.8], "median_s": 1.8}
    peer = {"round_s": [1.0, 1.0, 2.0, 2.0, 2.0], "median_s": 2.0}
    assert bench._ratio_and_verdict(ours, peer) == (pytest.approx(0.9), "ahead")
    mixed = {"round_s": [0.9, 1.1, 1.9, 2.1, 2.0], "median_s": 1.9}
    assert bench._ratio_and_verdict(mixed, peer)[1] == "within noise"
    assert bench._ratio_and_verdict(peer, ours)[1] == "behind"
