"""SmoothQuant: migrate activation range into the weights, per input channel (qronos_algorithm.md §4.6).

For the MatMul / Gemm targets reading one tensor x (q/k/v share one), with a_j = max |x_j| over the calibration set
(one float pass, before capture) and w_j = max_i |W_ij| over the group's weights:

    s_j = a_j^alpha / w_j^(1 - alpha)        (s_j = 1 where a_j or w_j is ~0)

and x W = (x diag(1/s)) (diag(s) W): the weights' input rows are multiplied by s, the input divided by s. The
division is folded where that is exact, i.e. where x is read by the group alone and the producer's parameter is
read by the producer alone:

- LayerNormalization / SimplifiedLayerNormalization / SkipLayerNormalization / SkipSimplifiedLayerNormalization
  (x = output 0, normalised over the last axis): gamma and beta divided by s;
- an RMSNorm written out, whose last op is Mul(normed, gamma) with a constant gamma: gamma divided by s;
- a preceding MatMul / Gemm with a constant weight (and Gemm's bias), or MatMul + Add(constant bias): its output
  columns divided by s.

Otherwise an explicit ``Mul(x, 1/s)`` node is inserted before the group and reported (TransformLog note). Conv
targets are not smoothed (their input channel is not the last axis and per-channel activation scales matter little
there). The float model computes the same function up to float32 round-off.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from ..capture.act_calib import float_activations
from ..graph.model import name_factory
from ..graph.targets import Target
from . import TransformLog

SMOOTH_PREFIX = "qronos_smooth"
EPS = 1e-5
NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization")


def channel_absmax(model: ir.Model, names: Sequence[str], samples: Sequence[Mapping[str, np.ndarray]],
                   batch_size: int = 1) -> dict[str, np.ndarray]:
    """max |x_j| over every calibration sample and token, per last-axis channel, for each tensor in ``names``."""
    out: dict[str, np.ndarray] = {}
    for batch in float_activations(model, list(names), samples, batch_size):
        for n in names:
            x = np.abs(np.asarray(batch[n], dtype=np.float64))
            m = x.reshape(-1, x.shape[-1]).max(0)
            out[n] = m if n not in out else np.maximum(out[n], m)
    return out


def smoothing_scales(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = a_j^alpha / w_j^(1 - alpha), 1 where either range is <= EPS, clipped to [1e-4, 1e4]."""
    a, w = np.asarray(act_max, np.float64), np.asarray(weight_max, np.float64)
    ok = (a > EPS) & (w > EPS)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-4, 1e4)


def smooth_inputs(model: ir.Model, targets: list[Target], samples: Sequence[Mapping[str, np.ndarray]], alpha: float,
                  *, batch_size: int = 1, log: TransformLog | None = None) -> list[str]:
    """Apply SmoothQuant in place (see the module docstring); returns the names of the inserted Mul nodes."""
    log = log if log is not None else TransformLog()
    graph = model.graph
    nodes = {node.name: node for node in graph}
    groups: dict[str, list[Target]] = {}
    for t in targets:
        if t.op_type in ("MatMul", "Gemm"):
            groups.setdefault(t.input_name, []).append(t)
    skipped_conv = [t.name for t in targets if t.op_type == "Conv"]
    if skipped_conv:
        log.notes.append(f"smoothquant: {len(skipped_conv)} Conv target(s) not smoothed (MatMul/Gemm only), "
                         f"e.g. {skipped_conv[0]}")
    todo = {}
    for x_name, group in groups.items():
        members = {t.name for t in group}
        if not _private(graph, {t.weight_name for t in group}, members):
            log.notes.append(f"smoothquant: the input {x_name!r} of {sorted(members)} is not smoothed: a weight is "
                             "also read by nodes outside the group")
            continue
        todo[x_name] = group
    if not todo:
        return []
    act = channel_absmax(model, list(todo), samples, batch_size)
    fresh = name_factory(graph)

    inserted = []
    # downstream groups first: a fold divides the producer's output columns, and when that producer is itself an
    # earlier target its weight must be final before its own scales are computed (then every group's smoothed ranges
    # meet: max|x'_j| = max_i |W'_ij| at alpha 0.5). The inputs' ranges are unaffected by later folds.
    for i, (x_name, group) in reversed(list(enumerate(todo.items()))):
        members = {t.name for t in group}
        first = nodes[group[0].name]
        x = first.inputs[0]
        # the weights as the graph holds them now (a later group's fold may have replaced a target's weight)
        current = {nodes[t.name].inputs[1].name: t for t in group}
        weights = {name: _matrix(_const(graph, name), t) for name, t in current.items()}  # [K, N]
        w_max = np.max([np.abs(w).max(1) for w in weights.values()], axis=0)
        s = smoothing_scales(act[x_name], w_max, alpha)
        dtype = np.dtype(group[0].weight_dtype)
        for name, t in current.items():  # weight rows (inputs) times s
            _replace_const(graph, name, _from_matrix(weights[name] * s[:, None], t).astype(dtype), fresh)
        how = _fold(graph, x, members, 1.0 / s, fresh)
        if how is None:
            inv_name = fresh(f"{SMOOTH_PREFIX}/inv_s_{i}")
            inv = ir.Value(name=inv_name, shape=ir.Shape([len(s)]), type=ir.TensorType(ir.DataType.from_numpy(dtype)),
                           const_value=ir.Tensor((1.0 / s).astype(dtype), name=inv_name))
            graph.register_initializer(inv)
            mul = ir.node("Mul", [x, inv], name=fresh(f"{SMOOTH_PREFIX}/Mul_{i}"))
            mul.outputs[0].name = fresh(f"{SMOOTH_PREFIX}/x_{i}")
            mul.outputs[0].type = x.type
            mul.outputs[0].shape = x.shape
            graph.insert_before(first, mul)
            for t in group:
                nodes[t.name].replace_input_with(0, mul.outputs[0])
            inserted.append(mul.name)
            producer = x.producer()
            log.notes.append(f"smoothquant: explicit Mul {mul.name!r} before {sorted(members)} (input {x_name!r} "
                             + (f"from {producer.op_type} {producer.name!r}" if producer is not None else
                                "is a graph input") + ": no exact fold)")
            how = "explicit Mul"
        for t in group:
            log.touch(t.name, f"smoothquant({how})")
    return inserted


# ------------------------------------------------------------------------------------------------ folding

def _fold(graph: ir.Graph, x: ir.Value, members: set[str], inv_s: np.ndarray, fresh) -> str | None:
    """Divide the producer of x by s along its output channels where that is exact; returns what was folded into."""
    node = x.producer()
    if node is None or x.is_graph_output() or any(u.name not in members for u, _ in x.uses()):
        return None
    K = len(inv_s)
    if node.op_type in NORM_OPS and node.domain in ("", "com.microsoft", "ai.onnx") and x is node.outputs[0]:
        if node.op_type == "LayerNormalization" and _attr(node, "axis", -1) not in (-1, _rank(x) - 1):
            return None
        k_scale = 2 if node.op_type.startswith("Skip") else 1  # Skip*: input, skip, gamma, beta, bias
        params = [j for j in (k_scale, k_scale + 1) if j < len(node.inputs) and node.inputs[j] is not None]
        if node.op_type == "SimplifiedLayerNormalization" or node.op_type == "SkipSimplifiedLayerNormalization":
            params = [k_scale]  # no beta (SkipSimplified's 4th input is a bias added before the norm)
        if not all(_own_const(graph, node, j, K) for j in params):
            return None
        for j in params:
            _scale_input(graph, node, j, inv_s, fresh)
        return f"folded into {node.op_type} {node.name}"
    if node.op_type == "Mul":
        for j in (0, 1):
            if _own_const(graph, node, j, K, allow_scalar=True) and _const_value(node.inputs[1 - j]) is None:
                _scale_input(graph, node, j, inv_s, fresh)
                return f"folded into Mul {node.name}"
        return None
    if node.op_type == "Add":  # MatMul + Add(bias)
        for j in (0, 1):
            other = node.inputs[1 - j]
            prod = other.producer() if other is not None else None
            if (_own_const(graph, node, j, K, allow_scalar=True) and prod is not None and prod.op_type == "MatMul"
                    and len(other.uses()) == 1 and not other.is_graph_output() and _matmul_ok(graph, prod, K)):
                _scale_input(graph, node, j, inv_s, fresh)
                _scale_weight_cols(graph, prod, inv_s, fresh)
                return f"folded into MatMul {prod.name} + Add {node.name}"
        return None
    if node.op_type in ("MatMul", "Gemm") and _matmul_ok(graph, node, K):
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            if not _own_const(graph, node, 2, K, allow_scalar=True):
                return None
            _scale_input(graph, node, 2, inv_s, fresh)
        _scale_weight_cols(graph, node, inv_s, fresh)
        return f"folded into {node.op_type} {node.name}"
    return None


def _matmul_ok(graph: ir.Graph, node: ir.Node, K: int) -> bool:
    w = node.inputs[1]  # (Gemm's alpha and transA act on the product / on A: dividing B's columns stays exact)
    val = _const_value(w)
    if val is None or val.ndim != 2 or not _private(graph, {w.name}, {node.name}):
        return False
    trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0)
    return (val.shape[0] if trans_b else val.shape[1]) == K


def _scale_weight_cols(graph: ir.Graph, node: ir.Node, inv_s: np.ndarray, fresh) -> None:
    w = _const_value(node.inputs[1])
    trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0)
    new = (w.astype(np.float64) * inv_s[:, None]) if trans_b else (w.astype(np.float64) * inv_s[None, :])
    _set_input(graph, node, 1, new.astype(w.dtype), fresh)


def _scale_input(graph: ir.Graph, node: ir.Node, j: int, inv_s: np.ndarray, fresh) -> None:
    """A constant operand broadcast along the last axis (size K or 1) times inv_s."""
    val = _const_value(node.inputs[j])
    new = val.astype(np.float64) * inv_s if val.size > 1 else val.reshape(()).astype(np.float64) * inv_s
    _set_input(graph, node, j, new.astype(val.dtype), fresh)


def _own_const(graph: ir.Graph, node: ir.Node, j: int, K: int, allow_scalar: bool = False) -> bool:
    """Input j of node is a constant read by node alone, of shape [K] (or [..1.., K]; a scalar when allowed)."""
    if j >= len(node.inputs) or node.inputs[j] is None:
        return False
    v = node.inputs[j]
    val = _const_value(v)
    if val is None or not _private(graph, {v.name}, {node.name}) or val.dtype.kind != "f":
        return False
    if val.size == 1:
        return allow_scalar and val.ndim <= 1
    return val.shape[-1] == K and val.size == K and val.ndim == 1


def _private(graph: ir.Graph, names: set[str], members: set[str]) -> bool:
    for name in names:
        value = graph.initializers.get(name)
        if value is None or value.is_graph_output() or value.const_value is None:
            return False
        if any(user.name not in members for user, _ in value.uses()):
            return False
    return True


def _const_value(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.const_value is None:
        return None
    return v.const_value.numpy()


def _const(graph: ir.Graph, name: str) -> np.ndarray:
    return graph.initializers[name].const_value.numpy()


def _set_input(graph: ir.Graph, node: ir.Node, j: int, arr: np.ndarray, fresh) -> None:
    old = node.inputs[j]
    name = fresh(f"{old.name}_smoothed")
    new = ir.Value(name=name, shape=ir.Shape(list(arr.shape)), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                   const_value=ir.Tensor(arr, name=name))
    graph.register_initializer(new)
    node.replace_input_with(j, new)
    if old.name in graph.initializers and not old.uses() and not old.is_graph_output():
        graph.initializers.pop(old.name)


def _replace_const(graph: ir.Graph, name: str, arr: np.ndarray, fresh) -> None:
    value = graph.initializers[name]
    users = list(value.uses())
    new_name = fresh(f"{name}_smoothed")
    new = ir.Value(name=new_name, shape=ir.Shape(list(arr.shape)),
                   type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)), const_value=ir.Tensor(arr, name=new_name))
    graph.register_initializer(new)
    for user, j in users:
        user.replace_input_with(j, new)
    graph.initializers.pop(name)


def _matrix(w: np.ndarray, t: Target) -> np.ndarray:
    """The weight as [K, N] float64 (Gemm transB=1 stores [N, K])."""
    w = w.astype(np.float64)
    return w.T if (t.op_type == "Gemm" and t.trans_b) else w


def _from_matrix(m: np.ndarray, t: Target) -> np.ndarray:
    return m.T if (t.op_type == "Gemm" and t.trans_b) else m


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _rank(v: ir.Value) -> int:
    return len(v.shape) if v.shape is not None else -1
