"""Quality orderings on mismatched synthetic data (X~ = X + low-rank drift + noise), averaged over many seeds.

What the math supports and what is asserted (float32 solves, default damping, act-order, on the full mismatched
objective ||X W^T - X~ Q^T|| / ||X W^T||):
- every error-correcting solver beats RTN;
- Qronos, which targets the mismatched objective with diffusion, beats GPFQ (correction only) and GPTQ (which
  optimizes the matched surrogate and ignores the drift);
- with (almost) no mismatch, Qronos reduces to GPTQ up to the damping rule, so the two are within a few percent.
Measured while writing these tests (30 seeds, N = 32, m = 256): with a *small* drift (0.1) Qronos at its default
alpha = 1e-6 does not beat GPTQ (3-bit mean error 0.146 vs 0.142, 4-bit 0.091 vs 0.091); with alpha = 1e-3 it does
(0.138 / 0.083). GPTQ's larger damping regularizes better when the mismatch is small, so Qronos < GPTQ is asserted
only at drift 0.3, where it holds in 26-27 of 30 seeds with a wide margin.
"""
from __future__ import annotations

import pytest
import torch

from qronos_onnx.config import RoundingConfig, WeightQuantConfig
from qronos_onnx.formats.grid import make_int_grid
from qronos_onnx.rounding import reconstruction_error, round_weights

from .test_rounding import make_problem, stats

ALGORITHMS = ("rtn", "gptq", "gpfq", "qronos")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def mean_errors(bits: int, group_size: int, drift: float, seeds: int = 16) -> dict[str, float]:
    total = {a: 0.0 for a in ALGORITHMS}
    for s in range(seeds):
        X, Xt, W = make_problem(1000 + s, m=256, N=32, K=16, drift=drift)
        H, G, F = (t.float() for t in stats(X, Xt))
        W = W.float()[None]
        grid = make_int_grid(W, WeightQuantConfig(bits=bits, group_size=group_size))
        for a in ALGORITHMS:
            codes = round_weights(W, grid, H, G, RoundingConfig(algorithm=a)).codes
            total[a] += float(reconstruction_error(W, grid.decode(codes), H, G, F)[0]) / seeds
    return total


@pytest.mark.parametrize("bits,group_size", [(3, 0), (4, 0), (4, 16)])
def test_orderings_on_mismatched_data(bits, group_size):
    e = mean_errors(bits, group_size, drift=0.3)
    assert e["gptq"] < e["rtn"], e
    assert e["gpfq"] < e["rtn"], e
    assert e["qronos"] < e["gpfq"], e
    assert e["qronos"] < e["gptq"], e
    assert e["qronos"] < 0.95 * min(e["gpfq"], e["gptq"]), e  # a clear margin, not a tie


def test_without_mismatch_qronos_matches_gptq_closely():
    e = mean_errors(4, 0, drift=0.0, seeds=8)
    assert e["gptq"] < e["rtn"] and e["qronos"] < e["rtn"], e
    assert abs(e["qronos"] - e["gptq"]) < 0.05 * e["gptq"], e
