"""Mixed precision: --layer-config rules and --target-bits promotions from measured sensitivity (precision/)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx.api import quantize
from qronos_onnx.config import QuantConfig, load_recipe, normalize_layer_rules
from qronos_onnx.errors import ConfigError
from qronos_onnx.graph.model import load_model
from qronos_onnx.graph.targets import find_targets
from qronos_onnx.precision import promote, resolve_plan, storage_bits
from qronos_onnx.precision.plan import LayerPlan, average_bits

from . import tiny_models as tm

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "qronos_onnx"]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd or REPO)


# ------------------------------------------------------------------------------------------------ tiny models

def fragile_mlp(d: int = 32, layers: int = 4, fragile: int = 2, seed: int = 0) -> onnx.ModelProto:
    """A chain of MatMul+ReLU. Input channel 0 of layer ``fragile`` is always 0 (its producer column has a large
    negative bias before the ReLU), and that layer's weights on channel 0 are 200x larger: the float function does
    not see them, but a per-channel grid spans them, and every other weight of that layer rounds to 0 at 4 bits."""
    rng = np.random.default_rng(seed)
    f = np.float32
    nodes, inits, h = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(f)
        if i == fragile:
            w[0, :] = 200.0 * np.abs(w[0, :]) + 20.0
        b = (0.1 * rng.standard_normal(d)).astype(f)
        if i == fragile - 1:
            b[0] = -1e3  # channel 0 of this layer's output is dead after the ReLU
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"bias{i}")]
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"], name=f"relu{i}"))
            h = f"h{i}"
    graph = helper.make_graph(nodes, "fragile_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info(f"a{layers - 1}", TensorProto.FLOAT, ["n", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def fragile_cnn(seed: int = 0) -> onnx.ModelProto:
    """conv -> relu -> depthwise conv -> relu -> conv -> relu -> Gemm; the depthwise conv is fragile: one channel
    of its input is always 0 and that channel's 3x3 kernel is huge. Conv grids are per output channel, so that
    alone does not hurt it; what does is a per-tensor INT activation quantizer in front of it, whose range the
    other channels' outliers set (channel 1 of the first conv is scaled 100x)."""
    rng = np.random.default_rng(seed)
    f = np.float32
    c1 = (rng.standard_normal((8, 1, 3, 3)) / 3).astype(f)
    c1[1] *= 100.0  # an activation outlier channel into the depthwise conv
    dw = (rng.standard_normal((8, 1, 3, 3)) / 3).astype(f)
    dw[1] /= 100.0  # ... that the depthwise conv scales back, so the float output is ordinary
    c3 = (rng.standard_normal((8, 8, 1, 1)) / 3).astype(f)
    fc = (rng.standard_normal((10, 8 * 8 * 8)) / 20).astype(f)
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((c1, "c1_w"), (dw, "dw_w"), (c3, "c3_w"), (fc, "fc_w"), (np.zeros(10, f), "fc_b"))]
    nodes = [
        helper.make_node("Conv", ["img", "c1_w"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "dw_w"], ["c2"], group=8, pads=[1, 1, 1, 1], name="conv2_depthwise"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "c3_w"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("Flatten", ["r3"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(nodes, "fragile_cnn",
                              [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _mlp_inputs(n: int = 8, d: int = 32) -> list[dict]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((16, d)).astype(np.float32)} for _ in range(n)]


def _budget_for(model_path: Path, cfg: QuantConfig, promote_names: list[str]) -> float:
    """The average bits when exactly ``promote_names`` are promoted (plus a hair)."""
    targets = find_targets(load_model(model_path))
    plans = resolve_plan(targets, cfg)
    plans.update({t.name: promote(plans[t.name]) for t in targets if t.name in promote_names})
    return average_bits(targets, plans) + 1e-4


def _file_bits(path: Path) -> tuple[float, dict[str, int]]:
    """Average bits per target weight counted in the written file: DequantizeLinear codes, scales and zero points
    that feed a MatMul/Gemm/Conv, and target weights left float; also the code width per consumer node."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    width = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8}
    dtype_of = {i.name: i.data_type for i in model.graph.initializer}
    total_bits, params, seen, code_bits = 0.0, 0, set(), {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        w = node.input[1]
        dq = producers.get(w)
        if dq is not None and dq.op_type == "DequantizeLinear":
            codes = dq.input[0]
            code_bits[node.name] = width[dtype_of[codes]]
            if codes in seen:
                continue
            seen.add(codes)
            n = inits[codes].size
            params += n
            scale = inits[dq.input[1]]
            total_bits += n * width[dtype_of[codes]] + scale.size * scale.dtype.itemsize * 8
            if len(dq.input) > 2 and dq.input[2]:
                total_bits += inits[dq.input[2]].size * width[dtype_of[dq.input[2]]]
        elif w in inits and w not in seen:
            seen.add(w)
            params += inits[w].size
            total_bits += inits[w].size * inits[w].dtype.itemsize * 8
            code_bits[node.name] = inits[w].dtype.itemsize * 8
    return total_bits / params, code_bits


# ------------------------------------------------------------------------------------------------ layer rules

def test_layer_rules_forms_and_one_line_errors():
    rules = normalize_layer_rules({"fc0": "int8", "fc1": {"bits": 8, "activations": "none"}, "fc3": "float"}, "t")
    assert rules[0] == {"match": "fc0", "float": False, "weights": {"format": "int", "bits": 8}, "activations": {}}
    assert rules[1]["weights"] == {"bits": 8} and rules[1]["activations"] == {"format": "none"}
    assert rules[2]["float"] is True
    listed = normalize_layer_rules([{"match": "fc0", "weights": "mxfp8"}], "t")
    assert listed[0]["weights"]["format"] == "mxfp8" and listed[0]["weights"]["group_size"] == 32
    assert normalize_layer_rules(listed, "t") == listed  # the stored form is stable
    for bad, msg in [({"fc(": "int8"}, "not a valid regular expression"),
                     ({"fc0": "int9"}, "unknown format 'int9'"),
                     ({"fc0": {"weights": {"bitz": 8}}}, "unknown key"),
                     ([{"weights": "int8"}], "'match' pattern"),
                     ({"fc0": {}}, "sets nothing"),
                     ({"fc0": 8}, "expected float, a weight format")]:
        with pytest.raises(ConfigError, match=msg) as err:
            normalize_layer_rules(bad, "--layer-config x.yaml")
        assert "\n" not in str(err.value)


def test_resolve_plan_order_values_and_errors(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(fragile_mlp(), str(path))
    targets = find_targets(load_model(path))
    cfg = load_recipe("w4")
    plans = resolve_plan(targets, cfg, normalize_layer_rules(
        [{"match": "fc[01]", "weights": "int8"}, {"match": "fc1", "weights": {"group_size": 16}},
         {"match": "fc3", "float": True}], "t"))
    assert plans["fc0"].weight_label() == "int8 asym per-channel"
    assert plans["fc1"].weight_label() == "int8 asym g16"  # later rules refine earlier ones
    assert plans["fc2"].weight_label() == "int4 asym per-channel" and plans["fc2"].source == "config"
    assert plans["fc3"].is_float and plans["fc3"].rule == "fc3"
    with pytest.raises(ConfigError, match="'nomatch' matches no quantizable node"):
        resolve_plan(targets, cfg, normalize_layer_rules({"nomatch": "int8"}, "t"))
    with pytest.raises(ConfigError, match="layer rule 'fc0'.*group_size must be a power of two"):
        resolve_plan(targets, cfg, normalize_layer_rules({"fc0": {"group_size": 24}}, "t"))


def test_layer_config_cli_file_inspect_and_replay(tmp_path):
    model, calib = tmp_path / "t.onnx", tmp_path / "calib.npz"
    onnx.save(tm.transformer(), str(model))
    xs = tm.transformer_inputs(4)
    np.savez(calib, x=np.concatenate([s["x"] for s in xs]), mask=xs[0]["mask"])
    (tmp_path / "layers.yaml").write_text(yaml.safe_dump({
        "b0_[qkv]_proj": "int8",
        "lm_head": "float",
        "b2_down_proj": {"weights": {"bits": 8, "group_size": 16}},
    }))
    out = tmp_path / "q.onnx"
    r = _cli("quantize", str(model), "--calib", str(calib), "-o", str(out), "--w4", "--quiet",
             "--layer-config", str(tmp_path / "layers.yaml"))
    assert r.returncode == 0, r.stderr
    _, widths = _file_bits(out)
    assert widths["b0_q_proj"] == widths["b0_k_proj"] == widths["b0_v_proj"] == 8
    assert widths["b0_o_proj"] == 4 and widths["b2_down_proj"] == 8 and widths["lm_head"] == 32
    report = json.loads(Path(str(out) + ".report.json").read_text())
    assert {x["node"]: x["reason"] for x in report["left_float"]}["lm_head"] == "float by layer rule 'lm_head'"
    by_node = {x["nodes"][0]: x for x in report["layers"]}
    assert by_node["b2_down_proj"]["weight_format"] == "int8 asym g16"
    assert by_node["b0_q_proj"]["plan_source"] == "layer-config" and by_node["b1_q_proj"]["plan_source"] == "config"
    shown = _cli("inspect", str(out))
    assert shown.returncode == 0, shown.stderr
    line = next(x for x in shown.stdout.splitlines() if x.strip().startswith("b2_down_proj"))
    assert "int8 asym g16" in line and "float" in line
    # the resolved plan in OUT.config.yaml reproduces the same file
    again = tmp_path / "again.onnx"
    r = _cli("quantize", str(model), "--calib", str(calib), "-o", str(again), "--recipe",
             str(out) + ".config.yaml", "--quiet")
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == out.read_bytes()


def test_layer_config_bad_inputs_one_line(tmp_path):
    model, calib = tmp_path / "t.onnx", tmp_path / "calib.npz"
    onnx.save(fragile_mlp(), str(model))
    np.savez(calib, x=_mlp_inputs(1)[0]["x"])
    cases = [("missing.yaml", None, "does not exist"),
             ("bad.yaml", "fc0: [int8\n", "not valid YAML"),
             ("nomatch.yaml", "typo_.*: int8\n", "matches no quantizable node"),
             ("badfmt.yaml", "fc0: int12\n", "unknown format"),
             ("empty.yaml", "", "holds no rules")]
    for name, text, msg in cases:
        if text is not None:
            (tmp_path / name).write_text(text)
        r = _cli("quantize", str(model), "--calib", str(calib), "-o", str(tmp_path / "o.onnx"), "--w4", "--quiet",
                 "--layer-config", str(tmp_path / name))
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------------------------------ --target-bits

@pytest.mark.parametrize("recipe,method", [("w4", "in-context"), ("w4a8", "in-context"), ("w4", "isolated")])
def test_target_bits_promotes_the_fragile_layer_first(tmp_path, recipe, method):
    path = tmp_path / "m.onnx"
    onnx.save(fragile_mlp(), str(path))
    cfg = load_recipe(recipe).override({"precision.sensitivity": method})
    budget = _budget_for(path, cfg, ["fc2"])  # room for exactly one promotion
    res = quantize(path, _mlp_inputs(), tmp_path / "q.onnx", cfg.override({"precision.target_bits": budget}),
                   quiet=True)
    assert res.precision["promoted"] == ["w2"] and res.precision["method"] == method
    sens = {s["weight"]: s for s in res.precision["sensitivity"]}
    assert max(sens, key=lambda w: sens[w]["base_error"] - sens[w]["promoted_error"]) == "w2"
    assert res.precision["sensitivity"][0]["weight"] == "w2"  # listed by benefit
    if method == "in-context":  # every candidate measured once, in the same (all-quantized) context
        assert len({s["base_error"] for s in sens.values()}) == 1 and all(s["round"] == 1 for s in sens.values())
        assert res.precision["rounds"][0]["promoted"] == ["w2"]
    layer = {r.weight: r for r in res.layers}["w2"]
    assert layer.plan_source == "target-bits" and layer.weight_format.startswith("int8")
    if recipe == "w4a8":  # A8 already: the promotion keeps it
        assert layer.act_format.startswith("int8")
    avg, widths = _file_bits(res.output_path)
    assert widths["fc2"] == 8 and widths["fc0"] == widths["fc1"] == widths["fc3"] == 4
    assert avg <= budget + 1e-9
    assert math.isclose(avg, res.precision["weight_bits_average"], rel_tol=1e-3)


def fragile_transformer() -> onnx.ModelProto:
    """The tiny decoder with block 1's o_proj made fragile: v's channel 0 is 0 (its column of wv is 0), so the
    attention context's channel 0 is always 0, and o_proj's weights on that channel are 200x larger."""
    m = tm.transformer()
    for init in m.graph.initializer:
        w = numpy_helper.to_array(init).copy()
        if init.name == "b1_wv":
            w[:, 0] = 0.0
        elif init.name == "b1_wo":
            w[0, :] = 200.0 * np.abs(w[0, :]) + 20.0
        else:
            continue
        init.CopyFrom(numpy_helper.from_array(w, init.name))
    return m


def test_target_bits_promotes_the_fragile_transformer_layer_first(tmp_path):
    path = tmp_path / "t.onnx"
    onnx.save(fragile_transformer(), str(path))
    samples = tm.transformer_inputs(4)
    cfg = load_recipe("w4").override({"rounding.algorithm": "rtn"})
    res = quantize(path, samples, tmp_path / "q.onnx",
                   cfg.override({"precision.target_bits": _budget_for(path, cfg, ["b1_o_proj"])}), quiet=True)
    assert res.precision["promoted"] == ["b1_wo"]


def test_target_bits_budget_never_exceeded(tmp_path):
    path = tmp_path / "t.onnx"
    onnx.save(tm.transformer(), str(path))
    cfg = load_recipe("w4")
    base = _budget_for(path, cfg, [])
    for extra in (0.3, 1.0, 2.5):
        out = tmp_path / f"q{extra}.onnx"
        res = quantize(path, tm.transformer_inputs(4), out,
                       cfg.override({"precision.target_bits": base + extra, "rounding.algorithm": "rtn"}), quiet=True)
        avg, widths = _file_bits(out)
        assert avg <= base + extra + 1e-9
        assert sum(w == 8 for w in widths.values()) == len({s for s in res.precision["promoted"]})
        assert res.precision["promoted"]  # each budget buys at least one promotion on this model


def test_target_bits_w4a4_promotes_activations_with_the_weight(tmp_path):
    path = tmp_path / "c.onnx"
    onnx.save(fragile_cnn(), str(path))
    cfg = load_recipe("w4a8").override({"activations.bits": 4, "activations.dynamic": False,
                                        "activations.granularity": "per_tensor"})
    samples = [{"img": np.random.default_rng(i).standard_normal((4, 1, 8, 8)).astype(np.float32)} for i in range(6)]
    budget = _budget_for(path, cfg, ["conv2_depthwise"])
    res = quantize(path, samples, tmp_path / "q.onnx", cfg.override({"precision.target_bits": budget}), quiet=True)
    assert res.precision["promoted"] == ["dw_w"]
    meta = {p.key: p.value for p in onnx.load(str(res.output_path)).metadata_props}
    formats = json.loads(meta["quant.layer_formats"])
    assert formats["conv2_depthwise"][1].startswith("int8 per_tensor static")
    assert formats["conv3"][1].startswith("int4 per_tensor static")
    ort.InferenceSession(str(res.output_path), providers=["CPUExecutionProvider"]).run(None, samples[0])


@pytest.mark.parametrize("dialect", ["qdq", "matmulnbits", "mx"])
def test_mixed_plans_export_in_every_dialect(tmp_path, dialect):
    path = tmp_path / "m.onnx"
    onnx.save(fragile_mlp(d=64), str(path))
    recipe = "mxfp4" if dialect == "mx" else "w4"
    cfg = load_recipe(recipe).override({"export.dialect": dialect, "rounding.algorithm": "gptq"})
    cfg = cfg.override({"precision.layers": normalize_layer_rules({"fc0": "int8" if dialect != "mx" else "mxfp8"},
                                                                  "t")})
    samples = [{"x": s["x"][:, :64]} for s in _mlp_inputs(6, d=64)]
    budget = _budget_for(path, cfg, ["fc2"])
    res = quantize(path, samples, tmp_path / "q.onnx", cfg.override({"precision.target_bits": budget}), quiet=True)
    assert res.precision["promoted"] == ["w2"]  # validate_export (golden DQ, ORT load) ran inside quantize
    formats = {r.weight: r.weight_format for r in res.layers}
    assert formats["w0"] == formats["w2"] == ("int8 asym per-channel" if dialect != "mx" else "mxfp8")
    assert formats["w1"] == ("int4 asym per-channel" if dialect != "mx" else "mxfp4")


def test_target_bits_errors(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(fragile_mlp(), str(path))
    with pytest.raises(ConfigError, match="below what the chosen formats already cost") as err:
        quantize(path, _mlp_inputs(2), tmp_path / "a.onnx", load_recipe("w4").override({"precision.target_bits": 4}),
                 quiet=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no target can be promoted"):
        quantize(path, _mlp_inputs(2), tmp_path / "b.onnx", load_recipe("w8").override({"precision.target_bits": 16}),
                 quiet=True)
    with pytest.raises(ConfigError, match="target_bits must be a number"):
        load_recipe("w4").override({"precision.target_bits": 0.5})
    with pytest.raises(ConfigError, match="sensitivity_samples must be a positive integer"):
        load_recipe("w4").override({"precision.sensitivity_samples": 0})
    with pytest.raises(ConfigError, match="precision.sensitivity must be one of in-context, isolated"):
        load_recipe("w4").override({"precision.sensitivity": "hessian"})
    with pytest.raises(ConfigError, match="sensitivity_rounds must be a positive integer"):
        load_recipe("w4").override({"precision.sensitivity_rounds": 0})
    for bad in (0, 1.5, "half"):
        with pytest.raises(ConfigError, match="sensitivity_recheck must be a share of the candidates"):
            load_recipe("w4").override({"precision.sensitivity_recheck": bad})
    assert not list(tmp_path.glob("[ab].onnx*"))


def test_storage_bits_counts_scales_and_zero_points(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(fragile_mlp(d=64), str(path))
    t = find_targets(load_model(path))[0]
    w4 = load_recipe("w4").weights
    assert storage_bits(t, w4) == 64 * 64 * 4 + 64 * (32 + 4)
    assert storage_bits(t, promote(resolve_plan([t], load_recipe("w4"))[t.name]).weights) == 64 * 64 * 8 + 64 * 40
    assert storage_bits(t, load_recipe("mxfp4").weights) == 64 * 64 * 4 + 64 * 2 * 8
    assert storage_bits(t, None) == 64 * 64 * 32


class _TableProbe:
    """A stand-in for the onnxruntime probe: the output error is a table over the set of targets left at the base
    format (promoted ones count as lossless), so that errors do not add: target "a" alone costs little, but in the
    quantized model it is what the others amplify."""

    def __init__(self, names, table):
        self.targets = [SimpleNamespace(name=n) for n in names]
        self.table = table
        self.context: set[str] = set()  # float
        self.runs = 0
        self.batch = 2  # candidates measured per call of ``errors``

    def _base(self, plans, names):
        return {n for n in names if plans[n].source != "target-bits"}

    def set_context(self, plans):
        self.runs += 1
        self.context = self._base(plans, [t.name for t in self.targets])
        return self.table[frozenset(self.context)]

    def error(self, changed, plans):
        self.runs += 1
        names = {t.name for t in changed}
        return self.table[frozenset((self.context - names) | self._base(plans, names))]

    def errors(self, jobs):
        return [self.error(changed, plans) for changed, plans in jobs]


def test_in_context_sees_interactions_that_isolated_misses():
    from qronos_onnx.precision.sensitivity import Candidate, _in_context, _isolated

    names = ["a", "b", "c"]
    table = {frozenset(): 0.0, frozenset("a"): 0.01, frozenset("b"): 0.2, frozenset("c"): 0.05,
             frozenset("abc"): 1.0, frozenset("bc"): 0.3, frozenset("ac"): 0.8, frozenset("ab"): 0.9}
    cfg = load_recipe("w4")
    plans = {n: LayerPlan(cfg.weights, cfg.activations) for n in names}

    def cands():
        return [Candidate(n, [SimpleNamespace(name=n)], extra_bits=1.0) for n in names]

    probe = _TableProbe(names, table)
    assert [c.weight for c in _isolated(cands(), 1.0, plans, probe, True)] == ["b"]  # the largest error alone
    probe = _TableProbe(names, table)
    rounds: list[dict] = []
    chosen = _in_context(cands(), 1.0, plans, probe, 2, rounds, True)
    assert [c.weight for c in chosen] == ["a"]  # removes 0.7 of the quantized model's 1.0
    assert rounds == [{"round": 1, "output_error": 1.0, "measured": 3, "promoted": ["a"]}]
    assert probe.runs == 4  # the context, then each candidate once; no room left for a second round


@pytest.mark.parametrize("recheck, measured, runs", [(1.0, 2, 7), (0.5, 1, 6)])
def test_later_rounds_measure_again_the_recheck_share(recheck, measured, runs):
    """precision.sensitivity_recheck: rounds after the first measure again only the best share of what is left, by
    the benefit per bit each had when last measured."""
    from qronos_onnx.precision.sensitivity import Candidate, _in_context

    names = ["a", "b", "c"]
    table = {frozenset(): 0.0, frozenset("a"): 0.01, frozenset("b"): 0.2, frozenset("c"): 0.05,
             frozenset("abc"): 1.0, frozenset("bc"): 0.3, frozenset("ac"): 0.8, frozenset("ab"): 0.9}
    cfg = load_recipe("w4")
    plans = {n: LayerPlan(cfg.weights, cfg.activations) for n in names}
    probe = _TableProbe(names, table)
    rounds: list[dict] = []
    cands = [Candidate(n, [SimpleNamespace(name=n)], extra_bits=1.0) for n in names]
    chosen = _in_context(cands, 2.0, plans, probe, 2, rounds, True, recheck=recheck)
    assert [c.weight for c in chosen] == ["a", "b"]
    # round 1 ranked b (0.2) above c (0.1): with half, only b is measured again (0.3 -> 0.05)
    assert rounds[1] == {"round": 2, "output_error": 0.3, "measured": measured, "promoted": ["b"]}
    assert probe.runs == runs
    assert cands[2].round == (2 if recheck == 1.0 else 1)  # c keeps its round-1 measurement


@pytest.mark.parametrize("which", ["transformer", "cnn"])
def test_probe_suffix_runs_equal_whole_model_runs(tmp_path, which):
    """error(changed) runs only the nodes from the deepest cut above the change, with the rest taken from the
    context run: it must equal running the whole model with the same plan."""
    from qronos_onnx.export.qdq import upgrade_opset
    from qronos_onnx.precision.sensitivity import _Probe

    def _saved(proto):
        onnx.save(proto, str(tmp_path / "m.onnx"))
        return tmp_path / "m.onnx"

    if which == "transformer":
        model = load_model(_saved(tm.transformer()))
        samples = tm.transformer_inputs(3)
        cfg = load_recipe("w4a8")
    else:
        model = load_model(_saved(fragile_cnn()))
        samples = [{"img": np.random.default_rng(i).standard_normal((4, 1, 8, 8)).astype(np.float32)}
                   for i in range(3)]
        cfg = load_recipe("w4a8").override({"activations.bits": 4, "activations.dynamic": False,
                                            "activations.granularity": "per_tensor"})
    upgrade_opset(model, 21)  # what quantize() does before measuring: the activation quantizers need it
    targets = find_targets(model)
    cfg = cfg.override({"precision.sensitivity_samples": 2})
    plans = resolve_plan(targets, cfg)
    with _Probe(model, targets, samples, plans, cfg, quiet=True, cuts=3) as probe:
        assert len(probe.suffixes) == min(3, len({probe.depth[t.name] for t in targets}))
        context = probe.set_context(plans)
        assert context > 0
        helped = 0
        for t in targets:
            up = dict(plans)
            up[t.name] = promote(plans[t.name])
            by_suffix = probe.error([t], up)
            whole = probe.set_context(up)
            probe.set_context(plans)
            assert by_suffix == pytest.approx(whole, rel=1e-6, abs=1e-12), t.name
            helped += by_suffix < context  # not every promotion helps: errors interact
        assert helped > 0
        # the pool runs candidates concurrently, each on one thread: the same numbers as one at a time
        assert probe.workers == 2
        jobs = [([t], {**plans, t.name: promote(plans[t.name])}) for t in targets]
        assert probe.errors(jobs) == [probe.error(*job) for job in jobs]


def test_a_file_onnxruntime_cannot_run_is_refused_not_written(tmp_path, monkeypatch):
    """Unsigned per-token INT8 activations in front of 8-bit weights load in onnxruntime, which fuses them into
    MatMulIntegerToFloat and then fails at run time (one activation scale only): what a W4A4 --target-bits promotion
    wrote on SmolLM2 before the per-token codes became signed. Validation runs one calibration sample, so such a file
    is refused with the node and the reason, and nothing is written."""
    from qronos_onnx.errors import ExportError
    from qronos_onnx.export import activations

    monkeypatch.setattr(activations, "SIGNED_PER_TOKEN", False)  # the old form
    path = tmp_path / "t.onnx"
    onnx.save(tm.transformer(), str(path))
    cfg = load_recipe("w4a4").override({"weights.bits": 8, "activations.bits": 8, "rounding.algorithm": "rtn"})
    with pytest.raises(ExportError, match="fails to run it on a calibration sample.*MatMulIntegerToFloat") as err:
        quantize(path, tm.transformer_inputs(2), tmp_path / "q.onnx", cfg, quiet=True)
    assert "per-token activation quantizer" in str(err.value)
    for name in ("q.onnx", "q.onnx.data", "q.onnx.config.yaml", "q.onnx.report.json"):
        assert not (tmp_path / name).exists()  # (the checkpoint stays, for --resume after a fix)


@pytest.mark.parametrize("symmetric", [False, True])
def test_8bit_weights_behind_per_token_int8_activations_run(tmp_path, symmetric):
    """The same layers as above, as written now: the file runs at onnxruntime's default optimizations and gives
    what it gives with fusions off (no MatMulIntegerToFloat took the per-token scale)."""
    path = tmp_path / "t.onnx"
    onnx.save(tm.transformer(), str(path))
    cfg = load_recipe("w4a4").override({"weights.bits": 8, "activations.bits": 8, "rounding.algorithm": "rtn",
                                        "activations.symmetric": symmetric})
    res = quantize(path, tm.transformer_inputs(2), tmp_path / "q.onnx", cfg, quiet=True)
    feed = tm.transformer_inputs(1)[0]
    outs = {}
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        outs[level] = ort.InferenceSession(str(res.output_path), so, providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(*outs.values()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    model = onnx.load(str(res.output_path), load_external_data=False)
    per_token = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
                 and any(a.name == "block_size" for a in n.attribute)]
    assert per_token  # the per-token quantizers are there, as blocked Q/DQ


def test_targets_reading_one_tensor_are_promoted_together(tmp_path):
    """Under W+A formats q/k/v (and gate/up) read one tensor and share its quantizer: they are one candidate, so a
    promotion never leaves two quantizers on one tensor, and the measurement takes 4 passes per block, not 7."""
    from qronos_onnx.precision.sensitivity import _units

    path = tmp_path / "t.onnx"
    onnx.save(tm.transformer(), str(path))
    targets = find_targets(load_model(path))
    units = [[t.name for t in u] for u in _units(targets)]
    assert units[:4] == [["b0_q_proj", "b0_k_proj", "b0_v_proj"], ["b0_o_proj"], ["b0_gate_proj", "b0_up_proj"],
                         ["b0_down_proj"]]
    assert len(units) == 13
    assert len(_units(targets, by_tensor=False)) == len(targets)  # weight-only: one unit per weight
    cfg = load_recipe("w4a4").override({"rounding.algorithm": "rtn"})
    out = tmp_path / "q.onnx"
    res = quantize(path, tm.transformer_inputs(3), out,
                   cfg.override({"precision.target_bits": _budget_for(path, cfg, []) + 1.0}), quiet=True)
    promoted = set(res.precision["promoted"])
    assert promoted
    for group in (["b{}_wq", "b{}_wk", "b{}_wv"], ["b{}_wg", "b{}_wu"]):
        for b in range(3):
            names = {n.format(b) for n in group}
            assert names <= promoted or not names & promoted, names
    model = onnx.load(str(out), load_external_data=False)
    readers: dict[str, set[str]] = {}  # activation tensor -> the per-token quantizers reading it
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and any(a.name == "block_size" for a in n.attribute):
            readers.setdefault(n.input[0], set()).add(n.name)
    assert readers and all(len(v) == 1 for v in readers.values())


def test_target_bits_w4a4_on_a_float16_model(tmp_path):
    """The probe's If branches carry float16 activations (the dynamic quantizers compute in float32 between Casts);
    the budget holds and the file runs."""
    path = tmp_path / "t16.onnx"
    onnx.save(tm.transformer(dtype=np.float16), str(path))
    cfg = load_recipe("w4a4").override({"rounding.algorithm": "rtn"})
    out = tmp_path / "q.onnx"
    budget = _budget_for(path, cfg, []) + 1.0
    res = quantize(path, tm.transformer_inputs(3, dtype=np.float16), out,
                   cfg.override({"precision.target_bits": budget}), quiet=True)
    assert res.precision["promoted"]
    avg, _ = _file_bits(out)
    assert avg <= budget + 1e-9
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, tm.transformer_inputs(1, dtype=np.float16)[0])[0]
    assert got.dtype == np.float16 and np.isfinite(got).all()



def test_cli_sensitivity_rounds_sets_the_config():
    from qronos_onnx.cli import build_parser, config_from_args

    args = build_parser().parse_args(["quantize", "m.onnx", "--calib", "c", "-o", "o.onnx", "--w4a4",
                                      "--target-bits", "5", "--sensitivity-rounds", "1"])
    cfg = config_from_args(args)
    assert cfg.precision.target_bits == 5 and cfg.precision.sensitivity_rounds == 1
    plain = config_from_args(build_parser().parse_args(["quantize", "m.onnx", "--calib", "c", "-o", "o.onnx",
                                                        "--w4a4", "--target-bits", "5"]))
    assert plain.precision.sensitivity_rounds == 3


@pytest.mark.parametrize("values, expect", [(None, 3), (1, 1), ("one", 1), ("one+1", 2)])
def test_probe_samples_unset_follow_the_output_size(tmp_path, monkeypatch, values, expect):
    """precision.sensitivity_samples unset: the fewest samples whose float outputs hold AUTO_OUTPUT_VALUES values,
    at most AUTO_SAMPLES_MAX and the samples there are."""
    from qronos_onnx.export.qdq import upgrade_opset
    from qronos_onnx.precision import sensitivity as S

    onnx.save(fragile_cnn(), str(tmp_path / "m.onnx"))
    model = load_model(tmp_path / "m.onnx")
    upgrade_opset(model, 21)
    samples = [{"img": np.random.default_rng(i).standard_normal((4, 1, 8, 8)).astype(np.float32)} for i in range(3)]
    cfg = load_recipe("w4")
    assert cfg.precision.sensitivity_samples is None
    targets = find_targets(model)
    plans = resolve_plan(targets, cfg)
    one = None
    if values is not None:
        with S._Probe(model, targets, samples, plans, cfg.override({"precision.sensitivity_samples": 1}),
                      quiet=True) as probe:
            one = sum(int(np.size(y)) for y in probe.reference[0])
        monkeypatch.setattr(S, "AUTO_OUTPUT_VALUES", {1: 1, "one": one, "one+1": one + 1}[values])
    with S._Probe(model, targets, samples, plans, cfg, quiet=True) as probe:
        assert len(probe.samples) == expect
