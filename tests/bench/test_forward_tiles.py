"""benchmarks/forward_tiles.py (the GPU run's timing of the 128-row forward tiles) runs: under
the interpreter both tile shapes give the same row lse."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "forward_tiles.py"


def test_both_tile_shapes_run_and_agree():
    spec = importlib.util.spec_from_file_location("forward_tiles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    times = module.time_forward(200, 40, device)  # checks the lse of each against the first
    assert list(times) == list(module.TILES) and all(t > 0 for t in times.values())
