"""Online Hadamard rotations (transforms/online.py, --rotate): orthogonal, function-preserving, and what W4A4 needs."""
from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qronos_onnx.api import quantize
from qronos_onnx.config import ConfigError, QuantConfig, load_recipe
from qronos_onnx.graph.io import save_model
from qronos_onnx.graph.model import load_model
from qronos_onnx.transforms.online import ROTATION_PREFIX, rotate_inputs, rotation_matrix
from qronos_onnx.graph.targets import find_targets

from . import tiny_models as tm


def _run(path, feed):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("k", [1, 2, 7, 12, 32, 48, 64, 96])
def test_rotation_is_orthogonal_and_seeded(k):
    R = rotation_matrix(k, seed=5)
    np.testing.assert_allclose(R.T @ R, np.eye(k), atol=1e-12)
    np.testing.assert_array_equal(R, rotation_matrix(k, seed=5))
    if k > 4:  # tiny sizes have only a few sign patterns
        assert not np.allclose(R, rotation_matrix(k, seed=6))


def test_power_of_two_rotation_is_a_signed_hadamard():
    R = rotation_matrix(64, seed=0)
    np.testing.assert_allclose(np.abs(R), np.full((64, 64), 1 / 8), atol=1e-12)  # every entry +-1/sqrt(64)


def test_rotated_model_computes_the_same_function(tmp_path):
    path = tmp_path / "t.onnx"
    onnx.save(tm.transformer(n_blocks=2), str(path))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    model = load_model(path)
    targets = find_targets(model)
    rotations = rotate_inputs(model, targets, seed=0)
    # one rotation per distinct input: q/k/v share one, gate/up share one; plus o, down per block and lm_head
    assert len(rotations) == 2 * 4 + 1 and all(r.startswith(ROTATION_PREFIX) for r in rotations)
    save_model(model, tmp_path / "rot.onnx", overwrite=True)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    feed = tm.transformer_inputs(n=1, seq=8, seed=7)[0]
    ref, got = _run(path, feed), _run(tmp_path / "rot.onnx", feed)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    rotated = load_model(tmp_path / "rot.onnx")
    names = {t.name for t in find_targets(rotated, [f"^{r}$" for r in rotations])}
    assert names == {t.name for t in targets}  # the rotations themselves are not quantization targets
    assert not any(n.endswith("wq") for n in rotated.graph.initializers)  # unrotated originals are dropped
    # one stored R per input width (32 and the 64-wide down projections), shared by all rotations of that width
    assert sorted(n for n in rotated.graph.initializers if n.startswith(ROTATION_PREFIX)) == [
        f"{ROTATION_PREFIX}/R32_float32", f"{ROTATION_PREFIX}/R64_float32"]


def test_weight_read_by_another_node_is_left_alone(tmp_path):
    """A weight that some other node also reads (a tied embedding, say) cannot be rotated for one reader only."""
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"), helper.make_node("Identity", ["W"], ["w_out"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [4, 4])],
        [onnx.numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    model = load_model(tmp_path / "m.onnx")
    assert rotate_inputs(model, find_targets(model)) == []
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), w)


def _outlier_inputs(n, seed):
    feeds = tm.transformer_inputs(n=n, seq=16, seed=seed)
    for f in feeds:
        f["x"][..., 3] *= 40.0  # one massive channel, as LLM residual streams have
    return feeds


def test_rotation_rescues_int4_activations_with_an_outlier_channel(tmp_path):
    model = tmp_path / "t.onnx"
    onnx.save(tm.transformer(n_blocks=2), str(model))
    calib, held_out = _outlier_inputs(16, 1), _outlier_inputs(4, 9)
    refs = [_run(model, f) for f in held_out]
    err = {}
    for rotate in ("none", "hadamard"):
        cfg = load_recipe("w4a4").override({"transforms.rotate": rotate, "rounding.algorithm": "rtn"})
        out = tmp_path / f"{rotate}.onnx"
        res = quantize(model, calib, out, cfg, quiet=True)
        assert len(res.layers) == 15
        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert meta["quant.rotation"] == rotate
        err[rotate] = float(np.mean([np.linalg.norm(_run(out, f) - r) / np.linalg.norm(r)
                                     for f, r in zip(held_out, refs)]))
        assert np.isfinite(err[rotate])
    # End to end, W4A4 RTN on this 32-wide model is too coarse for a stable ordering: over seeds 0-5 the rotated
    # output error was 0.60-0.89 (mean 0.72) vs 0.754 unrotated with the Paley/Sylvester Hadamard, and 0.57-0.99
    # (mean 0.76) with the earlier Sylvester x random-orthogonal rotation. The mechanism is stable: per-token
    # asymmetric INT4 of the rotated input (mapped back by R^T) loses about half as much of the ordinary channels
    # as INT4 of the raw input, whose range the outlier channel sets (0.36 vs 0.68 for seeds 0-3).
    x = np.concatenate([f["x"].reshape(-1, 32) for f in held_out])
    ordinary = np.arange(32) != 3

    def int4_per_token(v):
        lo, hi = np.minimum(v.min(-1, keepdims=True), 0), np.maximum(v.max(-1, keepdims=True), 0)
        s = (hi - lo) / 15
        z = np.round(-lo / s)
        return (np.clip(np.round(v / s) + z, 0, 15) - z) * s

    R = rotation_matrix(32, seed=0)
    raw = np.linalg.norm((int4_per_token(x) - x)[:, ordinary]) / np.linalg.norm(x[:, ordinary])
    rotated = np.linalg.norm((int4_per_token(x @ R) @ R.T - x)[:, ordinary]) / np.linalg.norm(x[:, ordinary])
    assert rotated < 0.6 * raw, (rotated, raw, err)


def test_rotate_option_is_validated():
    from qronos_onnx.cli import build_parser, config_from_args

    assert QuantConfig().transforms.rotate == "none"
    args = build_parser().parse_args(["quantize", "m", "--calib", "c", "-o", "o", "--w4a4", "--rotate"])
    assert config_from_args(args).transforms.rotate == "online"
    with pytest.raises(ConfigError, match="transforms.rotate"):
        QuantConfig().override({"transforms.rotate": "givens"})


def test_wide_rotations_run_in_kronecker_form(tmp_path, monkeypatch):
    """From FACTORED_MIN_WIDTH on, R = diag(s) kron(A, B) runs as A^T reshape(x s) B: same function, two small
    MatMuls per rotation, neither quantized; the weights are rotated by the same R. (The width threshold is lowered
    so that the tiny 32/64-wide transformer takes that form.)"""
    from qronos_onnx.transforms import TransformLog, online
    from qronos_onnx.transforms.hadamard import hadamard_factors

    for k in (32, 64, 576, 1536):
        s, A, B = hadamard_factors(k, seed=0)
        assert np.allclose(np.diag(s) @ np.kron(A, B), rotation_matrix(k, seed=0), atol=1e-14)
        assert A.shape[0] * B.shape[0] == k and A.shape[0] > 1 and B.shape[0] > 1
    monkeypatch.setattr(online, "FACTORED_MIN_WIDTH", 32)
    path = tmp_path / "t.onnx"
    onnx.save(tm.transformer(n_blocks=2), str(path))
    model = load_model(path)
    targets = find_targets(model)
    log = TransformLog()
    rotations = rotate_inputs(model, targets, seed=0, log=log)
    assert len(log.float_rotations) == 2 * 4 + 1 and len(rotations) == 2 * len(log.float_rotations)
    save_model(model, tmp_path / "rot.onnx", overwrite=True)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "rot.onnx")).graph.node if n.name.startswith(ROTATION_PREFIX)]
    assert ops.count("MatMul") == 2 * 9 and ops.count("Reshape") == 2 * 9 and ops.count("Mul") == 9
    for feed in tm.transformer_inputs(n=2, seq=8, seed=7):
        ref, got = _run(path, feed), _run(tmp_path / "rot.onnx", feed)
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    rotated = load_model(tmp_path / "rot.onnx")
    assert {t.name for t in find_targets(rotated, [f"^{r}$" for r in rotations])} == {t.name for t in targets}

    cfg = load_recipe("w4a4").override({"transforms.rotate": "online", "rounding.algorithm": "rtn"})
    res = quantize(path, _outlier_inputs(8, 1), tmp_path / "q.onnx", cfg, quiet=True)
    assert len(res.layers) == 15  # the rotations' small MatMuls stay float
    import json
    assert json.loads(res.report_path.read_text())["transforms"]["float_rotation_nodes"] == 9
    feed = _outlier_inputs(1, 9)[0]
    assert np.isfinite(_run(tmp_path / "q.onnx", feed)).all()
