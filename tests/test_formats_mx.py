"""MX / FP8 element grids: encode/decode against slow references built from the OCP definitions, the power-of-two
scale rule, edge values, the config rules, and the rounding solvers running on these grids."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from qronos_onnx.cli import build_parser, config_from_args
from qronos_onnx.config import QuantConfig, RoundingConfig, WeightQuantConfig, load_recipe
from qronos_onnx.errors import ConfigError, ModelError
from qronos_onnx.formats import ElementGrid, QuantizedWeight, make_grid
from qronos_onnx.formats.elements import E2M1, E4M3, INT8
from qronos_onnx.formats.mx import exponent_range

# ------------------------------------------------------------------------------------------------ slow references


def _magnitudes(dtype) -> np.ndarray:
    """All finite non-negative values of a float element type, indexed by their magnitude bit pattern."""
    n = 8 if dtype == ml_dtypes.float4_e2m1fn else 127  # e4m3fn: 0x7F is NaN
    return np.arange(n, dtype=np.uint8).view(dtype).astype(np.float64)


def ref_nearest(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """OCP rounding, element by element: nearest representable magnitude, ties to the even bit pattern (even
    mantissa), saturating at the largest magnitude. Returns (value, magnitude index with the sign of x)."""
    mags = _magnitudes(dtype)
    vals, idxs = [], []
    for v in np.asarray(x, np.float64).ravel():
        a = abs(v)
        if a >= mags[-1]:
            i = len(mags) - 1
        else:
            d = np.abs(mags - a)
            cands = np.flatnonzero(d == d.min())
            i = int(cands[0]) if len(cands) == 1 else int(next(c for c in cands if c % 2 == 0))
        sign = -1.0 if v < 0 else 1.0
        vals.append(sign * mags[i] if i else 0.0)
        idxs.append(sign * i if i else 0.0)
    return np.array(vals).reshape(np.shape(x)), np.array(idxs).reshape(np.shape(x))


def _probe_points(dtype) -> np.ndarray:
    """Every representable value, every midpoint (ties) and its float32 neighbours, beyond-max values, tiny values."""
    m = _magnitudes(dtype)
    mids = (m[:-1] + m[1:]) / 2
    f = np.float32
    pts = np.concatenate([m, mids, np.nextafter(mids.astype(f), f(0)), np.nextafter(mids.astype(f), f(np.inf)),
                          [m[-1] * 1.0001, m[-1] * 1.5, m[-1] * 2, 1e30, m[1] / 4, m[1] / 2, 1e-40, 0.0]])
    pts = pts.astype(np.float32)
    return np.concatenate([pts, -pts])


# ------------------------------------------------------------------------------------------------ element encoding


def test_e2m1_matches_ocp_reference_on_edges():
    x = _probe_points(ml_dtypes.float4_e2m1fn)
    ref_v, _ = ref_nearest(x, ml_dtypes.float4_e2m1fn)
    codes = E2M1.encode(torch.from_numpy(x) * 2)  # x in element units -> code units (x2)
    np.testing.assert_array_equal(codes.numpy() / 2, ref_v)
    assert codes.abs().max() == 12 and torch.equal(codes, codes.round())
    # hand-checked OCP cases: subnormal 0.5, ties to even, saturation
    pairs = {0.25: 0.0, 0.5: 0.5, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0, 5.5: 6.0, 7.0: 6.0,
             100.0: 6.0, -0.75: -1.0, -5.0: -4.0, -1e9: -6.0}
    got = E2M1.encode(torch.tensor(list(pairs), dtype=torch.float32) * 2) / 2
    assert got.tolist() == list(pairs.values())
    # agreement with ml_dtypes' own round-to-nearest-even cast inside the range
    inside = x[np.abs(x) <= 6]
    np.testing.assert_array_equal(E2M1.encode(torch.from_numpy(inside) * 2).numpy() / 2,
                                  inside.astype(ml_dtypes.float4_e2m1fn).astype(np.float64))


def test_e4m3_matches_ocp_reference_on_edges():
    x = _probe_points(ml_dtypes.float8_e4m3fn)
    ref_v, ref_i = ref_nearest(x, ml_dtypes.float8_e4m3fn)
    codes = E4M3.encode(torch.from_numpy(x))
    np.testing.assert_array_equal(codes.numpy(), ref_i)  # sign * magnitude bit pattern
    np.testing.assert_array_equal(E4M3.values(codes).numpy(), ref_v)
    assert codes.abs().max() == 126  # 448 = 0x7E; the NaN pattern 0x7F is never produced
    got = E4M3.values(E4M3.encode(torch.tensor([2.0**-9, 2.0**-10, 3 * 2.0**-10, 449.0, 464.0, 1e6, -500.0])))
    assert got.tolist() == [2.0**-9, 0.0, 2.0**-8, 448.0, 448.0, 448.0, -448.0]  # subnormal, ties, saturation
    inside = x[np.abs(x) <= 448]
    np.testing.assert_array_equal(E4M3.values(E4M3.encode(torch.from_numpy(inside))).numpy(),
                                  inside.astype(ml_dtypes.float8_e4m3fn).astype(np.float64))


def test_int8_element_and_zero_sign():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 127.4, 200.0, -200.0, -0.3])
    assert INT8.encode(x).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 126.0, 127.0, 127.0, -127.0, 0.0]
    for el, v in ((E2M1, -0.1), (E4M3, -1e-5), (INT8, -0.3)):  # a negative value rounding to 0 gives +0
        c = el.encode(torch.tensor([v]))
        assert c.item() == 0 and not torch.signbit(c).item()


def test_decode_is_exact_on_every_code():
    table = _magnitudes(ml_dtypes.float8_e4m3fn)
    for fmt in ("mxfp4", "mxfp8", "mxint8", "fp8"):
        el = WeightQuantConfig.for_format(fmt)
        if fmt == "mxfp4":  # the valid codes are 2 * e2m1 values, not every integer in [-12, 12]
            m = 2 * _magnitudes(ml_dtypes.float4_e2m1fn)
            valid = torch.tensor(np.concatenate([-m[:0:-1], m]), dtype=torch.float32)
        else:
            q = {"mxint8": 127}.get(fmt, 126)
            valid = torch.arange(-q, q + 1, dtype=torch.float32)
        g = make_grid(torch.randn(3, len(valid)) * torch.tensor([[1e-3], [1.0], [1e3]]), el)
        codes = valid.repeat(3, 1)
        s = g.scale[:, g.group_index()].double()
        if g.linear:
            exp = codes.double() * s
        else:
            c = codes.numpy().astype(int)
            exp = torch.from_numpy(np.sign(c) * table[np.abs(c)]) * s
        w = g.decode(codes)
        assert w.dtype == torch.float32 and torch.equal(w, exp.float()), fmt  # one IEEE product, as DQ computes
        if g.is_mx:
            assert torch.equal(w.double(), exp), fmt  # power-of-two scales: exact
        assert torch.equal(g.codes(w), codes), fmt  # codes -> values -> codes round trip


# ------------------------------------------------------------------------------------------------ scale rule


@pytest.mark.parametrize("fmt,emax,shift", [("mxfp4", 2, 1), ("mxfp8", 8, 0), ("mxint8", 0, 6)])
def test_po2_scale_rule(fmt, emax, shift):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(5, 70, generator=gen) * torch.logspace(-3, 3, 70)  # ragged last block of 6 columns
    W[0, :32] = 0.0  # an all-zero block
    W[1, 32:64] = 0.0
    W[1, 40] = 4.0  # amax exactly a power of two
    W[2, :32] = 6.0 * (torch.arange(32) % 2 * 2 - 1)  # amax 6 (fp4 max) -> X = 1
    g = make_grid(W, WeightQuantConfig.for_format(fmt))
    assert isinstance(g, ElementGrid) and g.scale.shape == (5, 3) and g.group_size == 32 and g.cols == 70
    lo, hi = exponent_range(g.element, torch.float32)
    for r in range(5):
        for b in range(3):
            blk = W[r, 32 * b : 32 * (b + 1)].double()
            amax = float(blk.abs().max())
            e = lo if amax == 0 else max(lo, min(hi, math.frexp(amax)[1] - 1 - emax))
            assert g.scale[r, b].item() == 2.0 ** (e - shift), (r, b)
    assert g.scale[1, 1].item() == 2.0 ** (2 - emax - shift)
    # all-zero block decodes to zeros; its scale is the documented minimum
    assert g.scale[0, 0].item() == 2.0 ** (lo - shift) and (g.round(W)[0, :32] == 0).all()
    if fmt == "mxfp4":
        assert g.scale[2, 0].item() == 0.5 and torch.equal(g.round(W)[2, :32], W[2, :32])  # +-6 exact
        assert lo == -127
    # no element above the block max after rounding (saturation), and relative error is bounded
    q = g.round(W)
    assert torch.isfinite(q).all()


def test_exponent_range_keeps_fp16_and_e8m0_exact():
    assert exponent_range(INT8, torch.float32) == (-121, 127)  # canonical scale X * 2^-6 stays in E8M0
    assert exponent_range(E2M1, torch.float16) == (-23, 13)
    assert exponent_range(E4M3, torch.float16) == (-15, 7)
    W = torch.tensor([[60000.0] + [1e-7] * 31, [1e-30] * 32])
    for fmt in ("mxfp4", "mxfp8", "mxint8"):
        g = make_grid(W, WeightQuantConfig.for_format(fmt), torch.float16)
        q = g.round(W)
        assert torch.equal(q.half().float(), q) and torch.isfinite(q.half()).all()  # exact and finite in fp16
        assert torch.equal(g.scale.half().float(), g.scale)


def test_mse_scale_search():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(16, 128, generator=gen)
    W[:, ::32] *= 6  # outliers make a larger / smaller exponent worth trying
    for fmt in ("mxfp4", "mxfp8", "mxint8", "fp8"):
        base = make_grid(W, WeightQuantConfig.for_format(fmt))
        mse = make_grid(W, WeightQuantConfig.for_format(fmt, scale_method="mse"))
        eb = (base.round(W) - W).pow(2)
        em = (mse.round(W) - W).pow(2)
        if fmt == "fp8":
            assert (em.sum(-1) <= eb.sum(-1) + 1e-12).all()
        else:
            blocks = lambda t: t.reshape(16, 4, 32).sum(-1)  # noqa: E731
            assert (blocks(em) <= blocks(eb)).all()  # never worse per block
            ratio = (mse.scale / base.scale).log2()
            assert set(ratio.unique().tolist()) <= {-1.0, 0.0, 1.0}  # one exponent either side of the OCP rule
        assert em.sum() < eb.sum(), fmt  # and it found something better somewhere


def test_fp8_per_channel_grid():
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(6, 50, generator=gen)
    W[3] = 0
    g = make_grid(W, WeightQuantConfig.for_format("fp8"))
    assert g.scale.shape == (6, 1) and g.per_channel and g.format == "fp8"
    amax = W.abs().amax(-1)
    assert torch.equal(g.scale[[0, 1, 2, 4, 5], 0], amax[[0, 1, 2, 4, 5]] / 448) and g.scale[3, 0] == 1.0
    _, ref_i = ref_nearest((W / g.scale).numpy(), ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(g.codes(W).numpy(), ref_i)


def test_nonfinite_weights_refused_with_name():
    W = torch.randn(4, 32)
    W[1, 3] = float("nan")
    W[2, 5] = float("inf")
    for fmt in ("int", "mxfp4", "fp8"):
        cfg = WeightQuantConfig.for_format(fmt) if fmt != "int" else WeightQuantConfig()
        with pytest.raises(ModelError, match=r"weight 'layer3.w' has 1 NaN and 1 Inf"):
            make_grid(W, cfg, name="layer3.w")


def test_quantized_weight_carries_format_and_decodes_exactly():
    W = torch.randn(8, 96)
    for fmt in ("mxfp4", "mxfp8", "mxint8", "fp8"):
        g = make_grid(W, WeightQuantConfig.for_format(fmt))
        qw = QuantizedWeight(g.codes(W), g)
        assert qw.format == fmt and qw.codes.dtype == torch.int16 and qw.bits == (4 if fmt == "mxfp4" else 8)
        assert torch.equal(qw.dequantize(), g.decode(g.codes(W)))
        assert torch.equal(qw.dequantize(), g.round(W))
    assert QuantizedWeight(torch.zeros(2, 4), make_grid(torch.randn(2, 4), WeightQuantConfig())).format == "int"


def test_grid_interface_slicing_and_batches():
    W = torch.randn(2, 6, 64)  # leading batch dim
    g = make_grid(W, WeightQuantConfig.for_format("mxfp4"))
    assert g.scale.shape == (2, 6, 2) and g.n_groups == 2 and not g.per_channel
    assert (g.bits, g.qmin, g.qmax, g.symmetric, g.scale_dtype) == (4, -12, 12, True, torch.float32)
    assert torch.equal(g.group_index(slice(30, 34)), torch.tensor([0, 0, 1, 1]))
    c = g.codes(W)
    assert torch.equal(g.codes(W[..., 40:41], 40), c[..., 40:41])  # single column, like the solvers call it
    cols = torch.tensor([3, 33, 63])
    assert torch.equal(g.decode(c[..., cols], cols), g.decode(c)[..., cols])
    assert torch.equal(g.slice_rows(slice(1, 3)).round(W[:, 1:3]), g.round(W)[:, 1:3])
    assert g.to("cpu").format == "mxfp4"
    pc = make_grid(W, WeightQuantConfig.for_format("mxfp4"), force_per_channel=True)  # Conv weights
    assert pc.per_channel and pc.group_size == 64 and (pc.scale.log2() == pc.scale.log2().round()).all()


# ------------------------------------------------------------------------------------------------ config and CLI


def test_config_formats_and_contradictions():
    for fmt in ("mxfp4", "mxfp8", "mxint8", "fp8"):
        WeightQuantConfig.for_format(fmt).validate()
    with pytest.raises(ConfigError, match="mxfp4.*weights.bits = 4, got 3"):
        WeightQuantConfig.for_format("mxfp4", bits=3).validate()
    with pytest.raises(ConfigError, match="mxint8.*weights.group_size = 32, got 64"):
        WeightQuantConfig.for_format("mxint8", group_size=64).validate()
    with pytest.raises(ConfigError, match="fp8.*group_size = 0, got 32"):
        WeightQuantConfig.for_format("fp8", group_size=32).validate()
    with pytest.raises(ConfigError, match="mxfp8.*symmetric = true"):
        WeightQuantConfig.for_format("mxfp8", symmetric=False).validate()
    with pytest.raises(ConfigError, match="weights.format must be one of"):
        WeightQuantConfig(format="nvfp4").validate()
    with pytest.raises(ConfigError, match="export.dialect"):
        QuantConfig().override({"export.dialect": "qonnx"})
    with pytest.raises(ConfigError, match="export.accuracy_level"):
        QuantConfig().override({"export.accuracy_level": 5})
    assert load_recipe("mxfp4-w").weights == WeightQuantConfig.for_format("mxfp4")
    assert load_recipe("fp8-w").weights.format == "fp8"


def test_cli_format_and_dialect_flags():
    p = build_parser()
    cfg = config_from_args(p.parse_args(["quantize", "m.onnx", "--calib", "c", "-o", "o.onnx", "--format", "mxfp8",
                                         "--dialect", "mx"]))
    assert (cfg.weights.format, cfg.weights.bits, cfg.weights.group_size, cfg.weights.symmetric) == \
        ("mxfp8", 8, 32, True)
    assert cfg.export.dialect == "mx"
    with pytest.raises(ConfigError, match="bits = 4, got 3"):
        config_from_args(p.parse_args(["quantize", "m", "--calib", "c", "-o", "o", "--format", "mxfp4",
                                       "--bits", "3"]))
    cfg = config_from_args(p.parse_args(["quantize", "m", "--calib", "c", "-o", "o", "--recipe", "mxfp4-w",
                                         "--format", "int", "--dialect", "matmulnbits"]))
    assert (cfg.weights.format, cfg.weights.bits, cfg.weights.group_size) == ("int", 4, 32)


# ------------------------------------------------------------------------------------------------ the solvers


def test_rounding_solvers_run_on_mx_grids():
    from qronos_onnx.rounding import reconstruction_error, round_weights

    gen = torch.Generator().manual_seed(3)
    B, rows, N, n = 2, 6, 64, 256
    W = torch.randn(B, rows, N, generator=gen)
    X = torch.randn(B, n, N, generator=gen) @ torch.randn(N, N, generator=gen) * 0.3
    Xt = X + 0.05 * torch.randn(X.shape, generator=gen)
    H, G, F = Xt.mT @ Xt / n, Xt.mT @ X / n, X.mT @ X / n
    for fmt in ("mxfp4", "fp8"):
        grid = make_grid(W, WeightQuantConfig.for_format(fmt))
        errs = {}
        for algo in ("rtn", "gptq", "qronos"):
            res = round_weights(W, grid, H, G, RoundingConfig(algorithm=algo))
            assert res.codes.dtype == torch.int16 and res.codes.shape == W.shape
            assert int(res.codes.min()) >= grid.qmin and int(res.codes.max()) <= grid.qmax
            Q = grid.decode(res.codes.float())
            assert torch.equal(grid.round(Q), Q)  # every value lies on the grid
            assert all(i["status"] == "ok" for i in res.info)
            errs[algo] = float(reconstruction_error(W, Q, H, G, F).sum())
            if algo == "rtn":
                assert torch.equal(res.codes.float(), grid.codes(W))
        assert errs["gptq"] < errs["rtn"] and errs["qronos"] < errs["rtn"], (fmt, errs)
