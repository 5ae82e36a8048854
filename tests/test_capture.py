"""CaptureEngine against obviously-right references: the fully assembled quantized model and the float model, run
whole in onnxruntime with the target inputs as extra outputs."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx.capture import CaptureEngine
from qronos_onnx.capture.stats import tokens
from qronos_onnx.config import CaptureConfig
from qronos_onnx.errors import CalibrationError
from qronos_onnx.graph.model import read_initializer
from qronos_onnx.graph.targets import find_targets
from tests import tiny_models
from tests.test_schedule import _if_model

MODELS = {
    "transformer": (lambda: tiny_models.transformer(3), lambda: tiny_models.transformer_inputs(4)),
    "cnn": (tiny_models.cnn, lambda: tiny_models.cnn_inputs(4)),
    "mlp": (tiny_models.residual_mlp, lambda: tiny_models.mlp_inputs(4)),
}


def rtn(w: np.ndarray) -> np.ndarray:
    """A crude 3-bit per-tensor round-to-nearest: enough error that X~ visibly differs from X."""
    s = np.abs(w).max() / 3
    return (np.round(w / s) * s).astype(w.dtype)


def capture(proto, samples, cfg: CaptureConfig, quantizer=rtn, **kw):
    model = ir.serde.deserialize_model(proto)
    targets = find_targets(model)
    given: dict[str, np.ndarray] = {}
    all_stats = {}
    with CaptureEngine(model, targets, samples, cfg, quiet=True, keep_inputs=True, **kw) as engine:
        for _, stats in engine.waves():
            new = {name: quantizer(read_initializer(model.graph.initializers[name])) for name in stats}
            engine.set_weights(new)
            given.update(new)
            all_stats.update(stats)
    return engine, model, targets, given, all_stats


def run_whole(proto, samples, names, weights=None) -> dict[str, np.ndarray]:
    """Run the model (weights replaced) sample by sample; ``names`` as extra outputs, concatenated on axis 0."""
    m = copy.deepcopy(proto)
    for init in m.graph.initializer:
        if weights and init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    inputs = {i.name for i in m.graph.input}
    outputs = {o.name for o in m.graph.output}
    for n in names:
        if n not in inputs and n not in outputs:
            m.graph.output.append(helper.make_value_info(n, onnx.TypeProto()))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    fetch = [n for n in names if n not in inputs]
    per = [dict(zip(fetch, sess.run(fetch, s))) | {n: s[n] for n in names if n in inputs} for s in samples]
    return {n: np.concatenate([p[n] for p in per], axis=0) for n in names}


def kept(engine, name):
    k = engine.kept_inputs[name]
    return np.concatenate(k.x_tilde, axis=0), np.concatenate(k.x, axis=0)


def local_reference(float_model: ir.Model, seg_inputs, out_name, quant_values, n_samples):
    """The float op chain from a segment's inputs to ``out_name``, fed with the quantized stream's values."""
    sub = ir.convenience.extract(float_model.graph, seg_inputs, [out_name])
    for v in sub.inputs:
        v.type = ir.TensorType(ir.DataType.FLOAT)
        v.shape = None
    proto = ir.serde.serialize_model(ir.Model(sub, ir_version=8))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = []
    for i in range(n_samples):
        feeds = {n: quant_values[n][i] for n in seg_inputs}
        outs.append(sess.run([out_name], feeds)[0])
    return np.concatenate(outs, axis=0)


@pytest.mark.parametrize("reference", ["float", "local"])
@pytest.mark.parametrize("name", list(MODELS))
def test_inputs_match_the_assembled_quantized_model(name, reference):
    make, inputs = MODELS[name]
    proto, samples = make(), inputs()
    engine, model, targets, given, _ = capture(proto, samples, CaptureConfig(reference=reference, batch_size=2))
    assert engine.n_calls == 2  # the batches really were concatenated
    waves = engine.schedule.waves
    stat_targets = [t for w in waves for t in w]
    assert set(given) == {t.weight_name for t in targets}  # every weight went through set_weights (followers too)
    names = sorted({t.input_name for t in stat_targets})
    seg_inputs = sorted({n for seg in engine.schedule.segments for n in seg.inputs} - set(names))
    quant = run_whole(proto, samples, names + seg_inputs, weights=given)
    flt = run_whole(proto, samples, names)
    per_sample = {n: np.split(v, len(samples)) for n, v in quant.items()}
    float_model = ir.serde.deserialize_model(proto)
    differs = 0
    for w, wave in enumerate(waves):
        seg = engine.schedule.segments[w]
        for t in wave:
            x_tilde, x = kept(engine, t.name)
            np.testing.assert_allclose(x_tilde, quant[t.input_name], rtol=1e-4, atol=1e-5, err_msg=t.name)
            if reference == "float":
                np.testing.assert_allclose(x, flt[t.input_name], rtol=1e-4, atol=1e-5, err_msg=t.name)
            elif w == 0 or engine.schedule.produced_at[t.input_name] < w:
                assert np.array_equal(x, x_tilde), t.name  # nothing float happened in between
            else:
                ref = local_reference(float_model, seg.inputs, t.input_name, per_sample, len(samples))
                np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-5, err_msg=t.name)
                # where quantization error is carried into the segment, the block-local X is not the float model's
                if any(n not in engine.schedule.shared_values for n in seg.inputs):
                    assert not np.allclose(x, flt[t.input_name], rtol=1e-3, atol=1e-4), t.name
            if w == 0:
                assert np.array_equal(x, x_tilde)
            differs += not np.allclose(x, x_tilde, rtol=1e-3, atol=1e-4)
    assert differs >= len(stat_targets) - len(waves[0]) - 1  # quantization error reached the later waves


def test_stats_are_the_normalized_grams_of_the_inputs():
    for name in ("transformer", "cnn"):
        make, inputs = MODELS[name]
        engine, model, targets, _, stats = capture(make(), inputs(), CaptureConfig())
        for t in [t for w in engine.schedule.waves for t in w]:
            k = engine.kept_inputs[t.name]
            xq = torch.cat([tokens(a, t, "cpu", torch.float64) for a in k.x_tilde], dim=1)
            xf = torch.cat([tokens(a, t, "cpu", torch.float64) for a in k.x], dim=1)
            s = stats[t.weight_name]
            n = xq.shape[1]
            assert s.n_tokens == n and s.H.shape == (t.groups, t.in_features, t.in_features)
            for got, ref in ((s.H, xq.mT @ xq / n), (s.G, xq.mT @ xf / n), (s.F, xf.mT @ xf / n)):
                torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
        if name == "transformer":
            assert stats["b0_wq"] is stats["b0_wk"] is stats["b0_wv"]  # one object per shared input
            assert stats["b1_wg"] is stats["b1_wu"]


@pytest.mark.parametrize("name", ["transformer", "cnn"])
def test_stats_do_not_depend_on_batching_or_on_where_the_frontier_lives(name):
    make, inputs = MODELS[name]
    runs = {}
    for key, cfg in {"b1": CaptureConfig(batch_size=1), "b2": CaptureConfig(batch_size=2),
                     "b3_disk": CaptureConfig(batch_size=3, max_memory=0),
                     "b1_disk64": CaptureConfig(batch_size=1, max_memory=0)}.items():
        stats_dtype = torch.float64 if key.endswith("64") else torch.float32
        engine, *_, stats = capture(make(), inputs(), cfg, stats_dtype=stats_dtype)
        runs[key] = (engine, stats)
    assert runs["b1"][0].n_calls == 4 and runs["b2"][0].n_calls == 2 and runs["b3_disk"][0].n_calls == 2
    for key in ("b3_disk", "b1_disk64"):
        engine = runs[key][0]
        assert engine.frontier.spilled > 0 and engine.frontier.peak_ram_bytes == 0
        assert engine.tmp_dir is not None and not engine.tmp_dir.exists()
    ref = runs["b1"][1]
    for key, (_, stats) in runs.items():
        assert stats.keys() == ref.keys()
        for w, s in stats.items():
            assert s.n_tokens == ref[w].n_tokens
            for m in ("H", "G", "F"):
                torch.testing.assert_close(getattr(s, m).float(), getattr(ref[w], m), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_temp_dir_is_removed_when_the_loop_fails(exc):
    make, inputs = MODELS["transformer"]
    model = ir.serde.deserialize_model(make())
    targets = find_targets(model)
    seen = None
    with pytest.raises(exc):
        with CaptureEngine(model, targets, inputs(), CaptureConfig(max_memory=0), quiet=True) as engine:
            for i, (_, stats) in enumerate(engine.waves()):
                if i == 3:
                    seen = engine.tmp_dir
                    assert seen is not None and any(seen.iterdir())
                    raise exc("stop")
                engine.set_weights({n: read_initializer(model.graph.initializers[n]) for n in stats})
    assert seen is not None and not seen.exists()


def test_inputs_and_model_are_left_untouched_and_work_is_linear():
    for name, (make, inputs) in MODELS.items():
        proto, samples = make(), inputs()
        model = ir.serde.deserialize_model(proto)
        targets = find_targets(model)  # names nodes: done before the snapshot
        before = ir.serde.serialize_model(model).SerializeToString()
        originals = copy.deepcopy(samples)
        ids = [{k: id(v) for k, v in s.items()} for s in samples]

        def act_quant(t, x):
            assert not x.flags.writeable  # the engine hands out read-only views
            return x

        with CaptureEngine(model, targets, samples, CaptureConfig(batch_size=2), quiet=True,
                           act_quant=act_quant) as engine:
            for _, stats in engine.waves():
                engine.set_weights({n: rtn(read_initializer(model.graph.initializers[n])) for n in stats})
        assert ir.serde.serialize_model(model).SerializeToString() == before
        for s, o, i in zip(samples, originals, ids):
            assert {k: id(v) for k, v in s.items()} == i
            assert all(np.array_equal(s[k], o[k]) for k in o)
        total = sum(engine.node_executions.values())
        assert 0 < total <= 1.1 * 2 * engine.forward_pass_nodes, (name, engine.node_executions)
        assert len(engine.frontier) == 0  # everything was released


def test_shared_weight_read_through_two_inputs_in_one_wave():
    """W is read by x and by relu(x) in the same wave: one LayerStats over both token sets."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 6)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["rx"], name="relu"),
             helper.make_node("MatMul", ["x", "W"], ["a"], name="mm_a"),
             helper.make_node("MatMul", ["rx", "W"], ["b"], name="mm_b"),
             helper.make_node("Add", ["a", "b"], ["c"], name="add"),
             helper.make_node("MatMul", ["c", "W2"], ["y"], name="mm_out")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w.T.copy(), "W2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    samples = [{"x": rng.standard_normal((5, 6)).astype(np.float32)} for _ in range(3)]
    engine, model, targets, given, stats = capture(proto, samples, CaptureConfig())
    assert [[t.name for t in w] for w in engine.schedule.waves] == [["mm_a", "mm_b"], ["mm_out"]]
    x = np.concatenate([s["x"] for s in samples]).astype(np.float64)
    both = np.concatenate([x, np.maximum(x, 0)])
    s = stats["W"]
    assert s.n_tokens == 30
    np.testing.assert_allclose(s.H[0].numpy(), both.T @ both / 30, rtol=1e-5, atol=1e-6)
    # and the next wave saw the quantized W in both branches
    quant = run_whole(proto, samples, ["c"], weights=given)
    np.testing.assert_allclose(np.concatenate(engine.kept_inputs["mm_out"].x_tilde), quant["c"], rtol=1e-5,
                               atol=1e-6)


def test_if_node_reading_outer_scope_values():
    proto = _if_model()
    rng = np.random.default_rng(3)
    samples = [{"x": rng.standard_normal((3, 4)).astype(np.float32), "cond": np.array(i % 2 == 0),
                "s": np.array([0.5 + i], np.float32)} for i in range(4)]
    for reference in ("float", "local"):
        engine, model, targets, given, _ = capture(proto, samples, CaptureConfig(reference=reference, batch_size=2))
        quant = run_whole(proto, samples, ["h2"], weights=given)
        flt = run_whole(proto, samples, ["h2"])
        x_tilde, x = kept(engine, "fc2")
        np.testing.assert_allclose(x_tilde, quant["h2"], rtol=1e-5, atol=1e-6)
        if reference == "float":
            np.testing.assert_allclose(x, flt["h2"], rtol=1e-5, atol=1e-6)


def test_activation_quantizer_hooks():
    """act_quant on the statistics side and graph_hook on the quantized segments describe one quantized model."""
    make, inputs = MODELS["transformer"]
    proto, samples = make(), inputs()
    target_names = {t.name for t in find_targets(ir.serde.deserialize_model(proto))}
    scale = np.array(0.75, np.float32)

    def hook(graph: ir.Graph, segment) -> None:
        for node in list(graph):
            if node.name in target_names:
                c = ir.Value(name=f"{node.name}_aq_scale", const_value=ir.tensor(scale))
                graph.register_initializer(c)
                mul = ir.node("Mul", [node.inputs[0], c], name=f"{node.name}_aq")
                graph.insert_before(node, mul)
                node.replace_input_with(0, mul.outputs[0])

    engine, model, targets, given, _ = capture(proto, samples, CaptureConfig(), graph_hook=hook,
                                               act_quant=lambda t, x: x * scale)
    # reference: the quantized model with the same Mul in front of every target
    ref = copy.deepcopy(proto)
    nodes = []
    for node in ref.graph.node:
        if node.name in target_names:
            nodes.append(helper.make_node("Mul", [node.input[0], "aq_scale"], [node.name + "_aq"]))
            node.input[0] = node.name + "_aq"
        nodes.append(node)
    del ref.graph.node[:]
    ref.graph.node.extend(nodes)
    ref.graph.initializer.append(numpy_helper.from_array(scale, "aq_scale"))
    stat_targets = [t for w in engine.schedule.waves for t in w]
    quant = run_whole(ref, samples, [t.name + "_aq" for t in stat_targets], weights=given)
    flt = run_whole(proto, samples, [t.input_name for t in stat_targets])
    for t in stat_targets:
        x_tilde, x = kept(engine, t.name)
        np.testing.assert_allclose(x_tilde, quant[t.name + "_aq"], rtol=1e-4, atol=1e-5, err_msg=t.name)
        np.testing.assert_allclose(x, flt[t.input_name], rtol=1e-4, atol=1e-5, err_msg=t.name)


def test_misuse_gives_clear_errors():
    make, inputs = MODELS["mlp"]
    model = ir.serde.deserialize_model(make())
    targets = find_targets(model)
    with pytest.raises(CalibrationError, match="no input 'x'"):
        CaptureEngine(model, targets, [{"y": np.zeros((2, 16), np.float32)}], CaptureConfig())
    with pytest.raises(CalibrationError, match="dtype"):
        CaptureEngine(model, targets, [{"x": np.zeros((2, 16), np.float64)}], CaptureConfig())
    with CaptureEngine(model, targets, inputs(), CaptureConfig(), quiet=True) as engine:
        loop = engine.waves()
        _, stats = next(loop)
        with pytest.raises(ValueError, match="not rounded in wave 0"):
            engine.set_weights({"w2": np.zeros((16, 16), np.float32)})
        with pytest.raises(ValueError, match="shape"):
            engine.set_weights({"w_shared": np.zeros((4, 16), np.float32)})
        with pytest.raises(RuntimeError, match="set_weights.*w_shared"):
            next(loop)


def test_external_data_model_and_large_constants_stay_out_of_the_segment_protos(tmp_path):
    """Initializers in external data are read lazily; large non-target constants reach onnxruntime as external
    initializers, so no segment proto carries them (the >2 GB case)."""
    from qronos_onnx.capture.runner import build_segment_model
    from qronos_onnx.graph.model import load_model

    proto, samples = tiny_models.transformer(2), tiny_models.transformer_inputs(3)
    path = tmp_path / "tf.onnx"
    onnx.save_model(copy.deepcopy(proto), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="tf.onnx.data", size_threshold=0)
    runs = []
    for model in (load_model(path), ir.serde.deserialize_model(proto)):
        targets = [t for t in find_targets(model) if "gate" not in t.name]  # gate weights stay plain constants
        with CaptureEngine(model, targets, samples, CaptureConfig(), quiet=True) as engine:
            out = {}
            for _, stats in engine.waves():
                engine.set_weights({n: rtn(read_initializer(model.graph.initializers[n])) for n in stats})
                out.update({k: v.H.clone() for k, v in stats.items()})
        runs.append(out)
        seg = next(s for s in engine.schedule.segments if "b0_gate_proj" in s.nodes)
        assert "b0_wg" in seg.initializers and "b0_wo" in seg.weights
        seg_model, externals = build_segment_model(model, seg, {n: np.zeros((1, 8, 32), np.float32)
                                                                for n in seg.inputs})
        assert set(externals) == {"b0_wg"}
        seg_proto = ir.serde.serialize_model(seg_model)
        assert seg_proto.ByteSize() < 2048  # 8 KB of gate weight are not in it
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=1e-5, atol=1e-6)


def test_float16_model():
    """fp16 frontiers and weights (set_weights casts to the model dtype); statistics in float32."""
    proto = tiny_models.transformer(2, dtype=np.float16)
    samples = tiny_models.transformer_inputs(4, dtype=np.float16)
    engine, model, targets, given, stats = capture(proto, samples, CaptureConfig(batch_size=2),
                                                   quantizer=lambda w: rtn(w).astype(np.float32))
    assert all(g.dtype == np.float32 for g in given.values())  # the caller may hand float32; the engine casts
    names = sorted({t.input_name for w in engine.schedule.waves for t in w})
    quant = run_whole(proto, samples, names, weights={k: v.astype(np.float16) for k, v in given.items()})
    for t in [t for w in engine.schedule.waves for t in w]:
        x_tilde, _ = kept(engine, t.name)
        assert x_tilde.dtype == np.float16 and stats[t.weight_name].H.dtype == torch.float32
        ref = quant[t.input_name].astype(np.float32)
        assert np.abs(x_tilde.astype(np.float32) - ref).max() <= 1e-2 * np.abs(ref).max(), t.name
