"""QuaRot-style rotations fused into the weights of a decoder's residual stream (``transforms.rotate: fused``).

x W = (x Q)(Q^T W) for an orthogonal Q. In a pre-norm transformer every block reads the residual stream r through
an RMSNorm, and RMSNorm commutes with Q once its scale gamma is folded into the readers: rms(r Q) = rms(r). So one
D x D rotation Q can be fused offline into
- every *writer* of the residual stream (token/position embedding tables, o_proj, down_proj and their biases): W Q;
- every *reader* (the MatMul/Gemm nodes fed by a norm: q/k/v, gate/up, lm_head): Q^T diag(gamma) W, gamma := 1;
and the stream carries r Q at run time with no extra operator. A head-sized Hadamard is fused into v_proj's output
and o_proj's input where the path between them is per-head linear (reshapes, transposes, the attention-probability
MatMul). What is left, the down_proj input in practice, gets the online rotation of ``online.py``: one float MatMul
per block. Activation outliers are then spread by Q exactly where INT4 activation quantizers see them.

The graph is recognised, never assumed: norms (spelled out as Pow/ReduceMean/Add/Sqrt/Reciprocal-or-Div/Mul, or
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization / RMSNormalization on the last axis), the residual
stream (Add, Skip-norm sums, scalar Mul between norms and writers) and every consumer of it. Anything else on the
stream (a LayerNormalization that centres, a graph input or output carrying it, a non-linear op) stops the transform
with ``FusedRotationUnsupported`` naming the node; the caller falls back to online rotations. After the weights are
changed, the float model is run on a calibration sample and compared with the original; a mismatch undoes every
change and also falls back.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..graph.model import name_factory
from ..graph.targets import Target
from . import TransformLog
from .online import rotation_matrix

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
_TRANSPARENT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast", "Expand"}  # v -> attention path
_SHAPE_ONLY = {"Shape", "Size"}  # read a tensor's shape, which a rotation keeps
VERIFY_TOLERANCE = 1e-3  # max |diff| / max |reference| of the float outputs after the rotation


class FusedRotationUnsupported(Exception):
    """The graph is not a pre-norm decoder this transform understands; ``node`` is where the pattern broke."""

    def __init__(self, node: str, why: str):
        super().__init__(f"{node}: {why}")
        self.node, self.why = node, why


@dataclass
class _Norm:
    node: ir.Node  # the node producing the normed output (for messages)
    residual: ir.Value  # the tensor normalized (the stream)
    output: ir.Value  # what the readers consume
    gamma: ir.Value | None  # constant [D] scale (None: no scale)
    sources: list[ir.Value] = field(default_factory=list)  # Skip-norm: its two summed inputs (stream members)
    bias: ir.Value | None = None  # Skip-norm: constant bias added to the sum


@dataclass
class _Writer:
    node: ir.Node
    kind: str  # "gather" | "matmul" | "gemm"
    weight: ir.Value
    bias: ir.Value | None = None


@dataclass
class FusedRotation:
    """What ``fuse_rotations`` did (or would undo)."""

    dim: int
    norms: int
    readers: list[str]
    writers: list[str]
    head_rotated: list[tuple[str, str, int]]  # (v_proj, o_proj, head_dim)
    online: list[str]  # rotation nodes left in float (down_proj inputs)
    max_rel_diff: float = 0.0
    tied_heads: list[str] = field(default_factory=list)  # heads reading the rotated table through a D x D MatMul


# --------------------------------------------------------------------------------------------- graph helpers

def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    if v.const_value is not None:
        return v.const_value.numpy()
    p = v.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].as_tensor().numpy()
    if p is not None and p.op_type == "Identity":
        return _const(p.inputs[0])
    return None


def _is_init(v: ir.Value | None) -> bool:
    return v is not None and v.const_value is not None and v.is_initializer() and not v.is_graph_input()


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return int(a.as_int()) if a is not None else default


def _through_casts(v: ir.Value) -> ir.Value:
    p = v.producer()
    while p is not None and p.op_type == "Cast":
        v = p.inputs[0]
        p = v.producer()
    return v


def _uses(v: ir.Value) -> list[tuple[ir.Node, int]]:
    return list(v.uses())


def _single_use(v: ir.Value) -> ir.Node | None:
    """The one consumer of ``v`` that reads its values (Shape / Size readers do not count)."""
    uses = [(u, i) for u, i in _uses(v) if u.op_type not in _SHAPE_ONLY]
    return uses[0][0] if len(uses) == 1 and not v.is_graph_output() else None


def _last_axis(node: ir.Node) -> bool:
    """ReduceMean over the last axis only (axes attribute up to opset 17, an input from 18)."""
    axes = None
    if "axes" in node.attributes:
        axes = list(node.attributes["axes"].as_ints())
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        c = _const(node.inputs[1])
        axes = None if c is None else [int(a) for a in np.atleast_1d(c)]
    if axes != [-1]:
        rank = node.inputs[0].shape.rank() if node.inputs[0].shape is not None else None
        if not (axes and rank and len(axes) == 1 and axes[0] == rank - 1):
            return False
    return _int_attr(node, "keepdims", 1) == 1


# --------------------------------------------------------------------------------------------- finding norms

def _spelled_norm(mean: ir.Node) -> _Norm | None:
    """x -> Pow(2)|Mul(x,x) -> ReduceMean(-1) -> Add/Sqrt/Reciprocal/Div/Cast... -> Mul|Div(x, .) [-> Mul(gamma)]."""
    sq = mean.inputs[0].producer() if mean.inputs[0] is not None else None
    if sq is None or not _last_axis(mean):
        return None
    if sq.op_type == "Pow":
        e = _const(sq.inputs[1])
        if e is None or e.size != 1 or float(e.reshape(-1)[0]) != 2.0:
            return None
        x = _through_casts(sq.inputs[0])
    elif sq.op_type == "Mul" and sq.inputs[0] is sq.inputs[1]:
        x = _through_casts(sq.inputs[0])
    else:
        return None
    v = mean.outputs[0]
    for _ in range(8):  # a short chain of scalar, per-token ops
        node = _single_use(v)
        if node is None:
            return None
        others = [i for i in node.inputs if i is not v]
        if node.op_type in ("Sqrt", "Reciprocal", "Cast"):
            v = node.outputs[0]
            continue
        if node.op_type == "Add" and len(others) == 1 and _const(others[0]) is not None \
                and _const(others[0]).size == 1:
            v = node.outputs[0]
            continue
        if node.op_type == "Div" and node.inputs[1] is v and _const(node.inputs[0]) is not None \
                and _const(node.inputs[0]).size == 1:
            v = node.outputs[0]
            continue
        if node.op_type in ("Mul", "Div") and len(others) == 1 and _through_casts(others[0]) is x \
                and (node.op_type == "Mul" or node.inputs[1] is v):
            out = node.outputs[0]
            after = _single_use(out)
            while after is not None and after.op_type == "Cast":
                out = after.outputs[0]
                after = _single_use(out)
            if after is not None and after.op_type == "Mul":
                g = [i for i in after.inputs if i is not out]
                c = _const(g[0]) if len(g) == 1 else None
                if c is not None and c.ndim == 1 and _is_init(g[0]):
                    return _Norm(after, x, after.outputs[0], g[0])
            return _Norm(node, x, out, None)
        return None
    return None


def find_norms(graph: ir.Graph) -> list[_Norm]:
    norms = []
    for node in graph:
        op, dom = node.op_type, node.domain
        if op == "ReduceMean" and dom in ("", "ai.onnx"):
            n = _spelled_norm(node)
            if n is not None:
                norms.append(n)
        elif op in ("SimplifiedLayerNormalization", "RMSNormalization") and dom in ("", "ai.onnx", MS_DOMAIN):
            if _int_attr(node, "axis", -1) != -1:
                raise FusedRotationUnsupported(node.name, f"{op} over axis {_int_attr(node, 'axis', -1)}, not the "
                                                          "last one")
            norms.append(_Norm(node, node.inputs[0], node.outputs[0], node.inputs[1]))
        elif op == "SkipSimplifiedLayerNormalization" and dom == MS_DOMAIN:
            if len(node.outputs) < 4 or node.outputs[3] is None or not node.outputs[3].name:
                summed = None
            else:
                summed = node.outputs[3]
            bias = node.inputs[3] if len(node.inputs) > 3 else None
            norms.append(_Norm(node, summed, node.outputs[0], node.inputs[2],
                               sources=[node.inputs[0], node.inputs[1]], bias=bias))
    return norms


# --------------------------------------------------------------------------------------------- the plan

@dataclass
class _Plan:
    dim: int
    norms: list[_Norm]
    readers: dict[str, list[Target]]  # norm output name -> reader targets
    writers: list[_Writer]
    stream: set[int]  # id() of the residual stream values
    transposed: dict[str, ir.Value] = field(default_factory=dict)  # reader -> table read through a Transpose


def _transposed_reader(node: ir.Node, x: ir.Value) -> Target | None:
    """MatMul(x, Transpose(table)): how exporters write an lm_head tied to the embedding. The reader gets its own
    rotated copy of the table (untied in the output); it is not a quantization target unless it already was."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    tr = node.inputs[1].producer()
    if tr is None or tr.op_type != "Transpose" or not _is_init(tr.inputs[0]):
        return None
    table = tr.inputs[0].const_value
    perm = list(tr.attributes["perm"].as_ints()) if "perm" in tr.attributes else [1, 0]
    if len(table.shape) != 2 or perm != [1, 0]:
        return None
    v_rows, d = (int(s) for s in table.shape)
    return Target(name=node.name, op_type="MatMul", input_name=x.name, weight_name=tr.inputs[0].name,
                  weight_shape=(d, v_rows), weight_dtype=table.dtype.numpy())


def _writer_of(v: ir.Value) -> _Writer | None:
    p = v.producer()
    if p is None:
        return None
    if p.op_type == "Gather" and p.domain in ("", "ai.onnx") and _is_init(p.inputs[0]) \
            and _int_attr(p, "axis", 0) == 0 and len(p.inputs[0].const_value.shape) == 2:
        return _Writer(p, "gather", p.inputs[0])
    if p.op_type == "MatMul" and p.domain in ("", "ai.onnx") and _is_init(p.inputs[1]) \
            and len(p.inputs[1].const_value.shape) == 2:
        return _Writer(p, "matmul", p.inputs[1])
    if p.op_type == "Gemm" and p.domain in ("", "ai.onnx") and _is_init(p.inputs[1]) \
            and _int_attr(p, "transA", 0) == 0:
        bias = p.inputs[2] if len(p.inputs) > 2 and p.inputs[2] is not None else None
        if bias is not None and not _is_init(bias):
            return None
        return _Writer(p, "gemm", p.inputs[1], bias)
    if p.op_type == "Add":  # a writer followed by a constant bias
        a, b = p.inputs
        for x, c in ((a, b), (b, a)):
            if _is_init(c) and c.const_value.shape is not None and len(c.const_value.shape) == 1:
                w = _writer_of(x)
                if w is not None and w.kind == "matmul" and w.bias is None and _single_use(x) is p:
                    w.bias = c
                    return w
    return None


def plan(model: ir.Model, targets: Sequence[Target]) -> _Plan:
    """Recognise norms, readers, the residual stream and its writers; raises FusedRotationUnsupported."""
    graph = model.graph
    norms = find_norms(graph)
    if not norms:
        raise FusedRotationUnsupported(graph.name or "graph", "no RMSNorm found (Pow/ReduceMean/Sqrt/Mul spelled out, "
                                                              "SimplifiedLayerNormalization or RMSNormalization)")
    for node in graph:
        if node.op_type == "LayerNormalization":
            raise FusedRotationUnsupported(node.name, "LayerNormalization centres its input, which does not commute "
                                                      "with a rotation")
    by_node = {t.name: t for t in targets}
    readers: dict[str, list[Target]] = {}
    transposed: dict[str, ir.Value] = {}  # reader node -> the table it reads through Transpose (a tied lm_head)
    dims = set()
    for n in norms:
        rs = []
        for user, idx in _uses(n.output):
            if user.op_type in _SHAPE_ONLY:
                continue
            t = by_node.get(user.name)
            if t is None and idx == 0:
                t = _transposed_reader(user, n.output)
                if t is not None:
                    transposed[user.name] = user.inputs[1].producer().inputs[0]
            if t is None or idx != 0 or t.op_type not in ("MatMul", "Gemm"):
                raise FusedRotationUnsupported(user.name, f"{user.op_type} reads the output of norm {n.node.name!r} "
                                                          "but is not a quantizable MatMul/Gemm with a constant weight")
            rs.append(t)
            dims.add(t.in_features)
        if n.output.is_graph_output():
            raise FusedRotationUnsupported(n.node.name, "its output is a graph output and would leave rotated")
        readers[n.output.name] = rs
        if n.gamma is not None:
            g = _const(n.gamma)
            if g is None or g.ndim != 1:
                raise FusedRotationUnsupported(n.node.name, "its scale is not a constant vector")
            dims.add(g.shape[0])
    if len(dims) != 1:
        raise FusedRotationUnsupported(norms[0].node.name, f"norms and their readers disagree on the width: "
                                                           f"{sorted(dims)}")
    dim = dims.pop()

    stream: set[int] = set()
    writers: dict[int, _Writer] = {}
    todo: list[ir.Value] = []
    for n in norms:
        if n.residual is not None:
            todo.append(n.residual)
        todo += n.sources
    while todo:
        v = todo.pop()
        if id(v) in stream:
            continue
        w = _writer_of(v)
        if w is not None:
            if id(w.node) not in writers:
                writers[id(w.node)] = w
            # the writer's raw output (before its bias Add) belongs to the stream space too
            stream.add(id(v))
            stream.add(id(w.node.outputs[0]))
            continue
        p = v.producer()
        if _is_init(v) or _const(v) is not None:
            raise FusedRotationUnsupported(v.name, "a constant is added to the residual stream")
        if v.is_graph_input() or p is None:
            raise FusedRotationUnsupported(v.name, "a graph input feeds the residual stream (it would have to arrive "
                                                   "rotated)")
        stream.add(id(v))
        if p.op_type == "Add" and p.domain in ("", "ai.onnx"):
            todo += list(p.inputs)
        elif p.op_type == "Mul" and any(_const(i) is not None and _const(i).size == 1 for i in p.inputs):
            todo += [i for i in p.inputs if _const(i) is None or _const(i).size != 1]
        elif p.op_type == "Cast":
            todo.append(p.inputs[0])
        elif p.op_type == "SkipSimplifiedLayerNormalization" and p.outputs.index(v) == 3:
            todo += [p.inputs[0], p.inputs[1]]
        else:
            raise FusedRotationUnsupported(p.name, f"{p.op_type} produces residual-stream tensor {v.name!r}; only "
                                                   "Add, a scalar Mul, embeddings and MatMul/Gemm writers can")
    # every consumer of the stream must be part of it: a norm, an Add or scalar Mul inside it, or a writer's bias
    norm_nodes = {id(n.node) for n in norms}
    skip_nodes = {id(n.node) for n in norms if n.sources}
    spelled_parts = _spelled_internal_nodes(norms)
    values = _all_values(graph)
    for v in values:
        if id(v) not in stream:
            continue
        if v.is_graph_output():
            raise FusedRotationUnsupported(v.name, "a residual-stream tensor is a graph output and would leave "
                                                   "rotated")
        for user, idx in _uses(v):
            if user.op_type in _SHAPE_ONLY or id(user) in spelled_parts or id(user) in skip_nodes or (id(user) in norm_nodes and idx == 0):
                continue
            if user.op_type in ("Add", "Mul", "Cast") and all(id(o) in stream for o in user.outputs):
                continue
            raise FusedRotationUnsupported(user.name, f"{user.op_type} reads residual-stream tensor {v.name!r} "
                                                      "and would see it rotated")
    return _Plan(dim, norms, readers, list(writers.values()), stream, transposed)


def _all_values(graph: ir.Graph) -> list[ir.Value]:
    vals = list(graph.inputs)
    for node in graph:
        vals += [o for o in node.outputs if o is not None]
    return vals


def _spelled_internal_nodes(norms: list[_Norm]) -> set[int]:
    """Pow / Mul(x, x) / the normalizing Mul or Div and Casts of spelled-out norms: they read the stream legally."""
    out: set[int] = set()
    for n in norms:
        if n.residual is None:
            continue
        frontier = [n.residual]
        for _ in range(3):
            nxt = []
            for v in frontier:
                for user, _ in _uses(v):
                    if user.op_type in ("Pow", "Mul", "Div", "Cast") and _reaches(user, n.output, 12):
                        out.add(id(user))
                        if user.op_type == "Cast":
                            nxt.append(user.outputs[0])
            frontier = nxt
    return out


def _reaches(node: ir.Node, target: ir.Value, depth: int) -> bool:
    """True when ``target`` is computed from ``node`` within ``depth`` steps (a norm's internal nodes)."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for nd in frontier:
            for o in nd.outputs:
                if o is target:
                    return True
                nxt += [u for u, _ in o.uses()]
        frontier = nxt
        if not frontier:
            return False
    return False


# --------------------------------------------------------------------------------------------- applying

class _Edits:
    """Every change made, so that a failed verification can put the model back exactly."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self._fresh = name_factory(graph)
        self._values: list[tuple[ir.Value, object]] = []
        self._inputs: list[tuple[ir.Node, int, ir.Value]] = []
        self._added: list[str] = []
        self._nodes: list[ir.Node] = []
        self.tied_heads: list[str] = []

    def set(self, value: ir.Value, arr: np.ndarray) -> None:
        self._values.append((value, value.const_value))
        value.const_value = ir.Tensor(np.ascontiguousarray(arr.astype(value.const_value.dtype.numpy())),
                                      name=value.name)

    def private_copy(self, node: ir.Node, index: int) -> ir.Value:
        """A fresh initializer for ``node``'s input ``index`` (its old value stays for its other readers)."""
        old = node.inputs[index]
        name = self._fresh(f"{old.name}_untied")
        arr = old.const_value.numpy()
        new = ir.Value(name=name, shape=ir.Shape(list(arr.shape)), type=old.type,
                       const_value=ir.Tensor(np.array(arr), name=name))
        self.graph.register_initializer(new)
        self._added.append(name)
        self._inputs.append((node, index, old))
        node.replace_input_with(index, new)
        return new

    def new_input(self, node: ir.Node, index: int, arr: np.ndarray, base: str) -> None:
        """Feed ``node``'s input ``index`` from a new initializer holding ``arr`` (in the old input's dtype)."""
        old = node.inputs[index]
        name = self._fresh(base)
        dtype = np.dtype(old.dtype.numpy() if old.dtype is not None else np.float32)
        data = np.ascontiguousarray(arr.astype(dtype))
        new = ir.Value(name=name, shape=ir.Shape(list(data.shape)), type=ir.TensorType(ir.DataType.from_numpy(dtype)),
                       const_value=ir.Tensor(data, name=name))
        self.graph.register_initializer(new)
        self._added.append(name)
        self._inputs.append((node, index, old))
        node.replace_input_with(index, new)

    def insert_matmul(self, node: ir.Node, M: np.ndarray, base: str) -> None:
        """``node`` reads ``MatMul(x, M)`` instead of its input 0 ``x`` (M stays float)."""
        x = node.inputs[0]
        name = self._fresh(base)
        dtype = np.dtype(x.dtype.numpy() if x.dtype is not None else np.float32)
        m = ir.Value(name=name, shape=ir.Shape(list(M.shape)), type=ir.TensorType(ir.DataType.from_numpy(dtype)),
                     const_value=ir.Tensor(np.ascontiguousarray(M.astype(dtype)), name=name))
        self.graph.register_initializer(m)
        self._added.append(name)
        mm = ir.node("MatMul", [x, m], name=f"{name}/MatMul")
        mm.outputs[0].name = f"{name}/out"
        mm.outputs[0].type = x.type
        mm.outputs[0].shape = x.shape
        self.graph.insert_before(node, mm)
        self._nodes.append(mm)
        self._inputs.append((node, 0, x))
        node.replace_input_with(0, mm.outputs[0])

    def drop_orphans(self) -> None:
        """Initializers that only the replaced inputs read (a tied weight untied from both sides, say)."""
        for _, _, old in self._inputs:
            producer = old.producer()
            if old.name in self.graph.initializers and not old.uses() and not old.is_graph_output():
                self.graph.initializers.pop(old.name)
            elif producer is not None and not old.uses() and not old.is_graph_output() \
                    and len(producer.outputs) == 1:  # a Transpose of a tied table nobody reads any more
                self.graph.remove(producer, safe=True)

    def undo(self) -> None:
        for node, index, old in reversed(self._inputs):
            node.replace_input_with(index, old)
        for node in reversed(self._nodes):
            self.graph.remove(node, safe=True)
        for name in self._added:
            self.graph.initializers.pop(name, None)
        for value, tensor in reversed(self._values):
            value.const_value = tensor


def _owned(edits: _Edits, node: ir.Node, index: int, allowed: Callable[[ir.Node], bool]) -> ir.Value:
    """The node's constant input, copied first if some node outside ``allowed`` also reads it."""
    v = node.inputs[index]
    if any(not allowed(u) for u, _ in v.uses()) or v.is_graph_output():
        return edits.private_copy(node, index)
    return v


def _apply(model: ir.Model, p: _Plan, Q: np.ndarray, edits: _Edits) -> tuple[list[str], list[str]]:
    graph = model.graph
    reader_nodes = {t.name for ts in p.readers.values() for t in ts}
    node_by_name = {n.name: n for n in graph}
    # 1. readers: W' = Q^T diag(gamma) W, and gamma := 1
    written = {id(w.weight) for w in p.writers if w.kind == "gather"}
    tied_transposes = {id(u) for v in p.transposed.values() for u, _ in v.uses() if u.op_type == "Transpose"}
    tied_heads: list[str] = []
    done: dict[int, bool] = {}
    for n in p.norms:
        gamma = _const(n.gamma).astype(np.float64) if n.gamma is not None else np.ones(p.dim)
        for t in p.readers[n.output.name]:
            node = node_by_name[t.name]
            if t.name in p.transposed:
                src = p.transposed[t.name]
                if id(src) in written:  # tied: the table becomes EQ; keep the tie, gamma as one D x D float MatMul
                    if not np.array_equal(gamma, np.ones_like(gamma)):
                        edits.insert_matmul(node, Q.T @ (gamma[:, None] * Q), f"{src.name}_head_scale")
                        tied_heads.append(node.name)
                    continue
                table = src.const_value.numpy().astype(np.float64)  # its own rotated [D, V] copy
                edits.new_input(node, 1, Q.T @ (gamma[:, None] * table.T), f"{src.name}_head")
                continue
            w = _owned(edits, node, 1, lambda u, n=n: u.name in {r.name for r in p.readers[n.output.name]})
            if id(w) in done:
                continue
            done[id(w)] = True
            W = w.const_value.numpy().astype(np.float64)
            if t.op_type == "Gemm" and t.trans_b:  # [N, D]
                edits.set(w, (W * gamma[None, :]) @ Q)
            else:  # [D, N]
                edits.set(w, Q.T @ (gamma[:, None] * W))
    for n in p.norms:
        if n.gamma is None:
            continue
        g = _owned(edits, n.node, list(n.node.inputs).index(n.gamma), lambda u, n=n: u is n.node)
        edits.set(g, np.ones(p.dim))
    # 2. writers: W' = W Q (the stream leaves them rotated), biases b Q
    done = {}
    for w in p.writers:
        allowed = {id(x.node) for x in p.writers if x.weight is w.weight} | tied_transposes
        wv = _owned(edits, w.node, 0 if w.kind == "gather" else 1, lambda u, a=allowed: id(u) in a)
        if id(wv) not in done:
            done[id(wv)] = True
            W = wv.const_value.numpy().astype(np.float64)
            if W.shape[0 if (w.kind == "gemm" and _int_attr(w.node, "transB", 0)) else 1] != p.dim:
                raise FusedRotationUnsupported(w.node.name, f"writes {W.shape} into a residual stream of width "
                                                            f"{p.dim}")
            if w.kind == "gemm" and _int_attr(w.node, "transB", 0):
                edits.set(wv, Q.T @ W)
            else:
                edits.set(wv, W @ Q)
        if w.bias is not None:
            b = _const(w.bias).astype(np.float64)
            if b.shape != (p.dim,):
                raise FusedRotationUnsupported(w.node.name, f"bias of shape {b.shape} is not a [{p.dim}] vector")
            user = next(u for u, _ in w.bias.uses())
            bv = _owned(edits, user, list(user.inputs).index(w.bias), lambda u, user=user: u is user)
            edits.set(bv, b @ Q)
    for n in p.norms:
        if n.bias is not None:
            b = _const(n.bias).astype(np.float64)
            bv = _owned(edits, n.node, 3, lambda u, n=n: u is n.node)
            edits.set(bv, b @ Q)
    edits.tied_heads = tied_heads
    return sorted(reader_nodes), sorted(w.node.name for w in p.writers)


# --------------------------------------------------------------------------------------------- v / o heads

def _head_pairs(model: ir.Model, p: _Plan, targets: Sequence[Target]) -> list[tuple[Target, Target, int]]:
    """(v_proj, o_proj, head_dim) where the path between them is per-head linear."""
    by_node = {t.name: t for t in targets}
    reader_names = {t.name for ts in p.readers.values() for t in ts}
    pairs = []
    for w in p.writers:
        if w.kind != "matmul" or w.node.name not in by_node:
            continue
        x = w.node.inputs[0]
        node = x.producer()
        while node is not None and node.op_type in _TRANSPARENT - {"Expand"}:
            node = node.inputs[0].producer()
        if node is None or node.op_type != "MatMul" or _is_init(node.inputs[1]):
            continue
        v = node.inputs[1]  # attention probabilities x V
        head_dim = None
        prod = v.producer()
        while prod is not None and prod.op_type in _TRANSPARENT:
            if prod.op_type == "Reshape":
                last = _shape_last(prod.inputs[1])
                if last is not None and last > 0:
                    head_dim = last
            prod = prod.inputs[0].producer()
        if prod is None or prod.name not in by_node or prod.name not in reader_names or head_dim is None:
            continue
        t_v, t_o = by_node[prod.name], by_node[w.node.name]
        if t_v.out_channels % head_dim or t_o.in_features % head_dim or t_v.op_type != "MatMul":
            continue
        if len(prod.outputs[0].uses()) != 1:  # v is read by something other than the attention path
            continue
        pairs.append((t_v, t_o, head_dim))
    return pairs


def _shape_last(v: ir.Value) -> int | None:
    """The last entry of a Reshape target shape: a constant, or the constant tail of a Concat of pieces."""
    c = _const(v)
    if c is not None:
        return int(c.reshape(-1)[-1]) if c.size >= 3 else None
    p = v.producer()
    if p is not None and p.op_type == "Concat" and len(p.inputs) >= 3:
        tail = _const(p.inputs[-1])
        if tail is not None and tail.size >= 1:
            return int(tail.reshape(-1)[-1])
    return None


def _apply_heads(model: ir.Model, pairs, seed: int, edits: _Edits) -> None:
    node_by_name = {n.name: n for n in model.graph}
    for t_v, t_o, hd in pairs:
        Hh = rotation_matrix(hd, seed + 1)
        nv, no = node_by_name[t_v.name], node_by_name[t_o.name]
        wv = _owned(edits, nv, 1, lambda u, nv=nv: u is nv)
        Wv = wv.const_value.numpy().astype(np.float64)  # [D, Dv]
        edits.set(wv, (Wv.reshape(Wv.shape[0], -1, hd) @ Hh).reshape(Wv.shape))
        wo = _owned(edits, no, 1, lambda u, no=no: u is no)
        Wo = wo.const_value.numpy().astype(np.float64)  # [Dv_o, D]
        edits.set(wo, (Hh.T @ Wo.reshape(-1, hd, Wo.shape[1])).reshape(Wo.shape))


# --------------------------------------------------------------------------------------------- entry point

def fuse_rotations(model: ir.Model, targets: Sequence[Target], sample: Mapping[str, np.ndarray] | None,
                   transform_log: TransformLog, *, seed: int = 0,
                   run: Callable[[ir.Model, Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None
                   ) -> FusedRotation:
    """Fuse the rotations into ``model`` in place (see the module docstring); raises FusedRotationUnsupported and
    leaves the model unchanged when the graph is not recognised or the float outputs move."""
    p = plan(model, targets)
    Q = rotation_matrix(p.dim, seed)
    reference = run(model, sample) if run is not None and sample is not None else None
    edits = _Edits(model.graph)
    try:
        readers, writers = _apply(model, p, Q, edits)
        pairs = _head_pairs(model, p, targets)
        _apply_heads(model, pairs, seed, edits)
    except FusedRotationUnsupported:
        edits.undo()
        raise
    worst = 0.0
    if reference is not None:
        got = run(model, sample)
        worst = _max_rel_diff(reference, got)
        if not worst <= VERIFY_TOLERANCE:
            edits.undo()
            raise FusedRotationUnsupported(model.graph.name or "graph", f"the rotated float model differs from the "
                                                                        f"original by {worst:.2e} (relative) on a "
                                                                        f"calibration sample")
    edits.drop_orphans()
    for name in readers:
        transform_log.touch(name, "rotate:fused(input)")
    for name in writers:
        transform_log.touch(name, "rotate:fused(output)")
    for t_v, t_o, hd in pairs:
        transform_log.touch(t_v.name, f"rotate:head{hd}(output)")
        transform_log.touch(t_o.name, f"rotate:head{hd}(input)")
    return FusedRotation(dim=p.dim, norms=len(p.norms), readers=readers, writers=writers,
                         head_rotated=[(a.name, b.name, hd) for a, b, hd in pairs], online=[], max_rel_diff=worst,
                         tied_heads=list(edits.tied_heads))


def _max_rel_diff(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """Worst relative difference over the outputs that are not fed back (KV-cache 'present' tensors hold the
    head-rotated values by design; the next step reads them back through the same rotation)."""
    worst = 0.0
    for name, a in ref.items():
        if "present" in name or not np.issubdtype(np.asarray(a).dtype, np.floating):
            continue
        a, b = np.asarray(a, np.float64), np.asarray(got[name], np.float64)
        scale = max(float(np.max(np.abs(a))), 1e-12) if a.size else 1.0
        worst = max(worst, float(np.max(np.abs(a - b))) / scale if a.size else 0.0)
    return worst
