"""Waves and segments on the tiny models: grouping, pruning, frontiers, followers of shared weights, subgraphs."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx.errors import ModelError
from qronos_onnx.graph.schedule import build_schedule, closure_segment
from qronos_onnx.graph.targets import find_targets
from tests import tiny_models


def _load(proto):
    model = ir.serde.deserialize_model(proto)
    return model, find_targets(model)


def _check_frontiers(model: ir.Model, sched) -> None:
    """Every segment input is a graph input or alive in the previous frontier; stats inputs are in the frontier."""
    graph_inputs = {v.name for v in model.graph.inputs}
    alive = set(graph_inputs)
    seen_nodes: set[str] = set()
    for seg, wave in zip(sched.segments, sched.waves):
        for name in seg.inputs:
            assert name in alive, (seg.index, name)
        assert not seen_nodes & set(seg.nodes), "a node runs in two segments"
        seen_nodes |= set(seg.nodes)
        for t in wave:
            assert t.input_name in seg.frontier, (seg.index, t.name)
        assert set(seg.outputs) <= set(seg.frontier)
        alive = set(seg.frontier) | graph_inputs


def test_transformer_waves_group_shared_inputs_and_prune_the_head():
    model, targets = _load(tiny_models.transformer(3))
    targets = [t for t in targets if t.name != "lm_head"]  # as with --exclude lm_head
    sched = build_schedule(model, targets)
    names = [[t.name for t in wave] for wave in sched.waves]
    assert len(names) == 12
    for b in range(3):
        assert names[4 * b: 4 * b + 4] == [[f"b{b}_q_proj", f"b{b}_k_proj", f"b{b}_v_proj"], [f"b{b}_o_proj"],
                                            [f"b{b}_gate_proj", f"b{b}_up_proj"], [f"b{b}_down_proj"]]
    scheduled = [n for seg in sched.segments for n in seg.nodes]
    # the last down projection, the residual after it and the head compute nothing any statistic needs
    assert "lm_head" not in scheduled and "b2_down_proj" not in scheduled and "b2_res2" not in scheduled
    assert len(scheduled) == sched.node_count - 3
    # the mask is read by every block: it stays in the frontier until the last attention
    last_attn = max(i for i, seg in enumerate(sched.segments) if "b2_mask_add" in seg.nodes)
    assert last_attn == 9  # segment 9 runs block 2's q/k/v (wave 8) and its attention
    assert all("mask" in sched.segments[i].frontier for i in range(0, last_attn))
    assert "mask" not in sched.segments[last_attn].frontier
    assert {"x", "mask"} <= sched.shared_values
    assert sched.segments[0].empty  # wave 0 reads the graph input x directly
    # target weights are segment inputs, in the segment that holds their node
    assert sched.segments[1].weights == ["b0_wq", "b0_wk", "b0_wv"]
    _check_frontiers(model, sched)
    text = sched.describe()
    assert "b1_gate_proj" in text and "segment 11" in text


def test_cnn_and_followers_of_a_shared_weight():
    model, targets = _load(tiny_models.cnn())
    sched = build_schedule(model, targets)
    assert [[t.name for t in w] for w in sched.waves] == [["conv1"], ["conv2_grouped"], ["conv3_depthwise"],
                                                          ["fc1"], ["fc2"]]
    _check_frontiers(model, sched)

    model, targets = _load(tiny_models.residual_mlp())
    sched = build_schedule(model, targets)
    # w_shared is rounded once, at fc1's wave; fc3_shared only computes with it
    assert [[t.name for t in w] for w in sched.waves] == [["fc1"], ["fc2"]]
    assert [t.name for t in sched.followers["w_shared"]] == ["fc3_shared"]
    assert sched.round_wave == {"w_shared": 0, "w2": 1}
    _check_frontiers(model, sched)


def _if_model():
    """x -> MatMul(w1) -> h -> If(cond){ h * s } else { -h } -> MatMul(w2): the branches read outer h and s."""
    rng = np.random.default_rng(0)
    then_g = helper.make_graph([helper.make_node("Mul", ["h", "s"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("If", ["cond"], ["h2"], then_branch=then_g, else_branch=else_g, name="branch"),
             helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "if", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        helper.make_tensor_value_info("s", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_outer_scope_values_of_subgraphs_are_segment_inputs():
    model, targets = _load(_if_model())
    sched = build_schedule(model, targets)
    assert sched.segments[1].nodes == ["fc1", "branch"]
    assert set(sched.segments[1].inputs) == {"x", "cond", "s"}  # s is read only inside the then-branch
    _check_frontiers(model, sched)


def test_unsorted_graph_and_missing_targets_are_refused():
    proto = tiny_models.residual_mlp()
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend([nodes[1], nodes[0], *nodes[2:]])  # relu before the MatMul producing its input
    model = ir.serde.deserialize_model(proto)
    targets = find_targets(model)
    with pytest.raises(ModelError, match="topologically sorted"):
        build_schedule(model, targets)
    with pytest.raises(ModelError, match="nothing to schedule"):
        build_schedule(model, [])


def test_closure_segment_is_the_whole_prefix():
    model, targets = _load(tiny_models.transformer(2))
    seg = closure_segment(model, ["b1_h1"], {t.weight_name for t in targets})
    assert seg.inputs == ["x", "mask"]
    assert seg.nodes[0] == "b0_q_proj" and seg.nodes[-1] == "b1_res1"
    assert "b1_wg" not in seg.weights and "b1_wo" in seg.weights
