"""Targets: the MatMul / Gemm / Conv nodes whose weight is a constant, and how their weight maps to solver layout.

Solver layout is ``[groups, rows, cols]``: rows are output channels, cols are input features (for Conv, the
channel-major then kernel-offset order that im2col produces). ``groups`` is the Conv ``group`` attribute (1 for
MatMul/Gemm); each conv group has its own H and G.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from ..errors import ModelError
from .model import read_initializer

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


@dataclass(frozen=True)
class ConvParams:
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX order: all begins, then all ends
    dilations: tuple[int, ...]
    group: int
    auto_pad: str  # NOTSET, SAME_UPPER, SAME_LOWER, VALID

    @property
    def spatial_rank(self) -> int:
        return len(self.kernel_shape)


@dataclass
class Target:
    """One quantizable node. ``weight_shape`` is the ONNX initializer's shape."""

    name: str
    op_type: str  # MatMul | Gemm | Conv
    input_name: str  # the activation input
    weight_name: str
    weight_shape: tuple[int, ...]
    weight_dtype: np.dtype
    trans_b: bool = False  # Gemm transB
    conv: ConvParams | None = None
    shared_with: list[str] = field(default_factory=list)  # other targets reading the same weight

    @property
    def groups(self) -> int:
        return self.conv.group if self.conv else 1

    @property
    def out_channels(self) -> int:
        if self.op_type == "Conv":
            return self.weight_shape[0]
        if self.op_type == "Gemm" and self.trans_b:
            return self.weight_shape[0]
        return self.weight_shape[1]

    @property
    def in_features(self) -> int:
        """Columns of the solver matrix (per conv group)."""
        if self.op_type == "Conv":
            return int(np.prod(self.weight_shape[1:]))
        if self.op_type == "Gemm" and self.trans_b:
            return self.weight_shape[1]
        return self.weight_shape[0]

    @property
    def matrix_shape(self) -> tuple[int, int, int]:
        return (self.groups, self.out_channels // self.groups, self.in_features)

    def to_matrix(self, weight: np.ndarray | torch.Tensor) -> torch.Tensor:
        """ONNX weight -> ``[groups, rows, cols]`` float32 torch tensor."""
        w = np.asarray(weight)
        if w.dtype not in (np.float16, np.float32, np.float64):  # e.g. bfloat16 (ml_dtypes): numpy converts it
            w = w.astype(np.float32)
        with warnings.catch_warnings():  # a read-only (memory-mapped) weight: read here, never written, copied below
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            src = torch.from_numpy(w)
        t = src
        if self.op_type != "Conv" and not (self.op_type == "Gemm" and self.trans_b):
            # copied contiguous: every later pass over a transposed view would be strided. torch's blocked
            # transpose, in the stored dtype before widening: 3-10x faster than numpy's on large weights
            t = t.t().contiguous()
        out = t.to(torch.float32)
        if out.data_ptr() == src.data_ptr():  # nothing was copied: never hand out the caller's memory
            out = out.clone()
        if self.op_type == "Conv":
            return out.reshape(self.groups, self.out_channels // self.groups, self.in_features)
        return out.reshape(1, *t.shape)

    def from_matrix(self, mat: torch.Tensor) -> torch.Tensor:
        """``[groups, rows, cols]`` (or ``[rows_total, cols]``) -> tensor in the ONNX weight layout."""
        if self.op_type == "Conv":
            return mat.reshape(self.weight_shape)
        w = mat.reshape(self.out_channels, self.in_features)
        return w if (self.op_type == "Gemm" and self.trans_b) else w.t()


def _ints(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return tuple(attr.as_ints()) if attr is not None else default


def _int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return int(attr.as_int()) if attr is not None else default


def _const_weight(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.const_value is not None
        and value.is_initializer()
        and not value.is_graph_input()
        and value.const_value.dtype in FLOAT_TYPES
    )


def _node_target(node: ir.Node) -> Target | None:
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if x is None or not _const_weight(w):
        return None
    shape = tuple(int(d) for d in w.const_value.shape)
    dtype = w.const_value.dtype.numpy()
    common = dict(name=node.name, input_name=x.name, weight_name=w.name, weight_shape=shape, weight_dtype=dtype)
    if node.op_type == "MatMul" and len(shape) == 2:
        return Target(op_type="MatMul", **common)
    if node.op_type == "Gemm" and len(shape) == 2 and _int(node, "transA", 0) == 0:
        return Target(op_type="Gemm", trans_b=bool(_int(node, "transB", 0)), **common)
    if node.op_type == "Conv" and 3 <= len(shape) <= 5:
        k = shape[2:]
        rank = len(k)
        conv = ConvParams(
            kernel_shape=_ints(node, "kernel_shape", k),
            strides=_ints(node, "strides", (1,) * rank),
            pads=_ints(node, "pads", (0,) * (2 * rank)),
            dilations=_ints(node, "dilations", (1,) * rank),
            group=_int(node, "group", 1),
            auto_pad=(node.attributes["auto_pad"].as_string() if "auto_pad" in node.attributes else "NOTSET"),
        )
        if conv.kernel_shape != k:
            raise ModelError(f"Conv node {node.name!r}: kernel_shape {conv.kernel_shape} does not match weight {shape}")
        return Target(op_type="Conv", conv=conv, **common)
    return None


def name_nodes(model: ir.Model) -> None:
    """Give every unnamed node a unique name so that targets, reports and --exclude can refer to it."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            base = node.name or f"{node.op_type}_{i}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
        seen.add(node.name)


def find_targets(model: ir.Model, exclude: list[str] | tuple[str, ...] = ()) -> list[Target]:
    """Every quantizable node of the main graph, in topological order, minus those matching ``exclude``."""
    name_nodes(model)
    patterns = [re.compile(p) for p in exclude]
    targets = []
    for node in model.graph:  # onnx-ir keeps graph nodes in topological order
        t = _node_target(node)
        if t is None or any(p.search(t.name) for p in patterns):
            continue
        targets.append(t)
    by_weight: dict[str, list[Target]] = {}
    for t in targets:
        by_weight.setdefault(t.weight_name, []).append(t)
    for group in by_weight.values():
        layouts = {(t.op_type, t.trans_b, t.matrix_shape) for t in group}
        if len(layouts) > 1:
            raise ModelError(
                f"weight {group[0].weight_name!r} is shared by nodes that read it in different layouts "
                f"({', '.join(t.name for t in group)}); exclude all but one of them with --exclude"
            )
        for t in group:
            t.shared_with = [o.name for o in group if o is not t]
    return targets


def weight_matrix(model: ir.Model, target: Target) -> torch.Tensor:
    """The target's float weight in solver layout."""
    value = model.graph.initializers[target.weight_name]
    return target.to_matrix(read_initializer(value))


def untranspose_gemm_inputs(model: ir.Model) -> list[str]:
    """Gemm(transA=1) with a constant weight reads its activation transposed: give it an explicit Transpose in front
    (``x^T B = Gemm(Transpose(x), B)``, the same function) so that it becomes an ordinary target. Returns the names
    of the Gemm nodes rewritten; onnxruntime folds the Transpose into its GEMM call again."""
    from .model import name_factory

    name_nodes(model)
    graph = model.graph
    fresh = name_factory(graph)

    done = []
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or _int(node, "transA", 0) != 1:
            continue
        if len(node.inputs) < 2 or node.inputs[0] is None or not _const_weight(node.inputs[1]):
            continue
        x = node.inputs[0]
        tr = ir.node("Transpose", [x], attributes={"perm": [1, 0]}, name=fresh(f"{node.name}/transA"))
        tr.outputs[0].name = fresh(f"{x.name}_transposed")
        tr.outputs[0].type = x.type
        if x.shape is not None and len(x.shape) == 2:
            tr.outputs[0].shape = ir.Shape([x.shape[1], x.shape[0]])
        graph.insert_before(node, tr)
        node.replace_input_with(0, tr.outputs[0])
        node.attributes["transA"] = ir.AttrInt64("transA", 0)
        done.append(node.name)
    return done


def left_alone(model: ir.Model, targets: list[Target], exclude: list[str] | tuple[str, ...] = (),
               ignore: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """MatMul / Gemm / Conv nodes with a constant float weight that will stay float, each with the reason: what the
    report and the end-of-run warning list so that nothing is skipped without a word. ``ignore``: nodes the tool
    inserted itself (float rotations)."""
    chosen = {t.name for t in targets} | set(ignore)
    patterns = [re.compile(p) for p in exclude]
    owner: dict[int, ir.Node] = {}  # id(subgraph) -> the If / Loop / Scan node holding it
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                owner[id(attr.value)] = node
            elif attr.type == ir.AttributeType.GRAPHS:
                owner.update((id(g), node) for g in attr.value)
    out = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.inputs) < 2 or not _const_weight(node.inputs[1]) or node.name in chosen:
            continue
        w = node.inputs[1]
        if node.graph is not model.graph:
            parent = owner.get(id(node.graph))
            where = f" of {parent.op_type} node {parent.name!r}" if parent is not None else ""
            reason = f"inside a subgraph{where} (only main-graph nodes are captured)"
        elif any(p.search(node.name) for p in patterns):
            reason = "matches --exclude"
        else:
            reason = f"weight {w.name!r} of shape {list(w.const_value.shape)} has no supported layout"
        out.append({"node": node.name, "op": node.op_type, "weight": w.name, "reason": reason})
    return out


def fold_constant_aliases(model: ir.Model) -> list[str]:
    """``Identity(initializer)`` (how the TorchScript exporter shares equal weights) read as the initializer itself,
    so that the weights behind it are seen as constants. Returns the Identity nodes removed."""
    graph = model.graph
    removed = []
    for node in list(graph):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        src, out = node.inputs[0], node.outputs[0]
        if src is None or src.const_value is None or not src.is_initializer() or src.is_graph_input():
            continue
        if out.is_graph_output():
            continue
        out.replace_all_uses_with(src)
        graph.remove(node, safe=True)
        removed.append(node.name)
    return removed
