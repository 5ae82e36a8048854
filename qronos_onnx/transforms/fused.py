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

Pre-LN models with LayerNormalization (GPT-2, OPT) take the same rotation after SliceGPT's step: every writer is
centred (W <- W (I - 11^T/D), biases and embedding rows too), so the stream has zero mean and each LayerNorm's mean
subtraction does nothing; Q is chosen with Q 1 = 1 (``keep_ones``), so the rotated stream keeps a zero mean, and the
LayerNorm then divides by the same rms as before: it commutes with Q. Its gamma goes into the readers like an RMSNorm's
and its beta into their biases (beta W, into a Gemm's C, a bias Add, or a new Add).

The graph is recognised, never assumed: norms (spelled out as Pow/ReduceMean/Add/Sqrt/Reciprocal-or-Div/Mul, or
SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization / RMSNormalization / LayerNormalization on the last
axis), the residual stream (Add, Skip-norm sums, scalar Mul, Reshapes that keep the last axis and inference
Dropouts between norms and writers; a Reshape may also sit between a norm and its readers) and every consumer of
it. A norm read by anything but MatMul/Gemm targets (Qwen3's per-head q/k norms) is not a stream norm and is left
alone, provided its input is off the stream (a stream tensor read by anything else stops the transform). Anything
else on the stream (a graph input or output carrying it, a constant added to it, a non-linear op) stops the
transform with ``FusedRotationUnsupported`` naming the node; the caller falls back to online rotations. RMSNorms and
LayerNorms on one stream are refused (centring would change the RMSNorms). After the weights are changed, the float
model is run on a calibration sample and compared with the original; a mismatch undoes every change and also falls
back.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

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
# "auto" outlier channels: mean over the norms of E[n_c^2], n = r / rms(r), at least this many times a channel's
# share (1); at most OUTLIER_MAX_SHARE of the width
OUTLIER_ENERGY = 8.0
OUTLIER_MAX_SHARE = 1 / 16


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
    beta: ir.Value | None = None  # LayerNormalization: its constant shift (folded into the readers' biases)
    centering: bool = False  # LayerNormalization: subtracts the mean (see _Plan.centering)


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
    outlier_channels: list[int] = field(default_factory=list)  # residual channels kept out of Q, read in float
    float_side: list[str] = field(default_factory=list)  # the float MatMuls reading them (never quantized)
    centred: bool = False  # LayerNorms: the writers were centred so that the norms commute with Q


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


def _is_last_axis(x: ir.Value | None, axis: int) -> bool:
    rank = x.shape.rank() if x is not None and x.shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _keeps_last(node: ir.Node, dim: int) -> bool:
    """A Reshape whose target keeps a last axis of ``dim``: it regroups whole rows (merges or splits leading axes),
    so it commutes with a rotation of the last axis."""
    return node.op_type == "Reshape" and _shape_last(node.inputs[1], min_pieces=1) == dim


def _inference_dropout(node: ir.Node) -> bool:
    """A Dropout that is the identity: no training_mode input, or a constant false one; its mask unread."""
    if node.op_type != "Dropout":
        return False
    mode = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.array(False)
    if mode is None or bool(np.asarray(mode).reshape(-1)[0]):
        return False
    return not any(o is not None and o.name and o.uses() for o in list(node.outputs)[1:])


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
        elif op == "LayerNormalization" and dom in ("", "ai.onnx"):
            axis = _int_attr(node, "axis", -1)
            if not _is_last_axis(node.inputs[0], axis):
                raise FusedRotationUnsupported(node.name, f"LayerNormalization over axis {axis}, not the last one")
            if any(o is not None and o.name and o.uses() for o in list(node.outputs)[1:]):
                raise FusedRotationUnsupported(node.name, "its mean or inverse standard deviation is read")
            beta = node.inputs[2] if len(node.inputs) > 2 else None
            norms.append(_Norm(node, node.inputs[0], node.outputs[0], node.inputs[1], beta=beta, centering=True))
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
    # LayerNormalization norms: every writer is centred (W <- W (I - 11^T/D)), so the stream has zero mean and the
    # norms' mean subtraction does nothing; Q then keeps the ones vector (Q 1 = 1) so that the rotated stream keeps a
    # zero mean too, and each norm computes r Q / rms(r): the norm commutes with Q as an RMSNorm does (SliceGPT)
    centering: bool = False


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
        raise FusedRotationUnsupported(graph.name or "graph", "no RMSNorm or LayerNorm found (Pow/ReduceMean/Sqrt/Mul "
                                                              "spelled out, SimplifiedLayerNormalization, "
                                                              "RMSNormalization or LayerNormalization)")
    by_node = {t.name: t for t in targets}
    readers: dict[str, list[Target]] = {}
    transposed: dict[str, ir.Value] = {}  # reader node -> the table it reads through Transpose (a tied lm_head)
    dims = set()
    stream_norms: list[_Norm] = []
    inner: list[FusedRotationUnsupported] = []  # norms read by something else: not on the stream (Qwen3's q/k norms)
    for n in norms:
        rs, tr = [], {}
        width = _const(n.gamma).size if n.gamma is not None and _const(n.gamma) is not None else None
        x, users = n.output, list(_uses(n.output))
        if width is not None and len(users) == 1 and users[0][1] == 0 and _keeps_last(users[0][0], width) \
                and not users[0][0].outputs[0].is_graph_output():
            x = users[0][0].outputs[0]  # LN -> Reshape(..., D) -> readers (GPT-2's Conv1D as Gemm on 2-D rows)
            users = list(_uses(x))
        for user, idx in users:
            if user.op_type in _SHAPE_ONLY:
                continue
            t = by_node.get(user.name)
            if t is None and idx == 0:
                t = _transposed_reader(user, x)
                if t is not None:
                    tr[user.name] = user.inputs[1].producer().inputs[0]
            if t is None or idx != 0 or t.op_type not in ("MatMul", "Gemm"):
                inner.append(FusedRotationUnsupported(
                    user.name, f"{user.op_type} reads the output of norm {n.node.name!r} but is not a quantizable "
                               "MatMul/Gemm with a constant weight"))
                rs = None
                break
            rs.append(t)
        if rs is None:  # kept only if its input is off the stream: checked with the stream's consumers below
            continue
        stream_norms.append(n)
        transposed.update(tr)
        dims.update(t.in_features for t in rs)
        if n.output.is_graph_output():
            raise FusedRotationUnsupported(n.node.name, "its output is a graph output and would leave rotated")
        readers[n.output.name] = rs
        if n.gamma is not None:
            g = _const(n.gamma)
            if g is None or g.ndim != 1:
                raise FusedRotationUnsupported(n.node.name, "its scale is not a constant vector")
            dims.add(g.shape[0])
    if not stream_norms:
        raise inner[0]
    norms = stream_norms
    centering = any(n.centering for n in norms)
    if centering and not all(n.centering for n in norms):
        raise FusedRotationUnsupported(next(n for n in norms if not n.centering).node.name,
                                       "RMSNorms and LayerNorms on one stream: centring the writers for the LayerNorms "
                                       "would change what the RMSNorms compute")
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
        elif p.op_type == "Cast" or (p.op_type == "Reshape" and _keeps_last(p, dim)) \
                or (_inference_dropout(p) and p.outputs[0] is v):
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
            if idx == 0 and id(user.outputs[0]) in stream and (_keeps_last(user, dim) or _inference_dropout(user)):
                continue
            raise FusedRotationUnsupported(user.name, f"{user.op_type} reads residual-stream tensor {v.name!r} "
                                                      "and would see it rotated")
    return _Plan(dim, norms, readers, list(writers.values()), stream, transposed, centering)


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
        self._outputs: list[tuple[int, ir.Value, ir.Value, str]] = []
        self.tied_heads: list[str] = []

    def before(self, value: ir.Value) -> np.ndarray | None:
        """The value's constant before its first ``set`` (None: never set)."""
        for v, old in self._values:
            if v is value:
                return old.numpy()
        return None

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

    def replace_input(self, node: ir.Node, index: int, new: ir.Value) -> None:
        self._inputs.append((node, index, node.inputs[index]))
        node.replace_input_with(index, new)

    def constant(self, arr: np.ndarray, base: str) -> ir.Value:
        name = self._fresh(base)
        data = np.ascontiguousarray(arr)
        v = ir.Value(name=name, shape=ir.Shape(list(data.shape)),
                     type=ir.TensorType(ir.DataType.from_numpy(data.dtype)), const_value=ir.Tensor(data, name=name))
        self.graph.register_initializer(v)
        self._added.append(name)
        return v

    def take_output(self, old: ir.Value, new: ir.Value) -> None:
        """``new`` becomes the graph output ``old`` was, under its name; ``old`` gets a fresh name."""
        name = old.name
        index = list(self.graph.outputs).index(old)
        old.name = self._fresh(f"{name}_before")
        new.name = name
        self.graph.outputs[index] = new
        self._outputs.append((index, old, new, name))

    def insert_after(self, anchor: ir.Node, nodes: list[ir.Node]) -> None:
        self.graph.insert_after(anchor, nodes)
        self._nodes += nodes

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
        for index, old, new, name in reversed(self._outputs):
            self.graph.outputs[index] = old
            new.name = self._fresh(f"{name}_undone")
            old.name = name
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


def keep_ones(Q: np.ndarray) -> np.ndarray:
    """``G Q`` with G the Householder reflection taking Q1/|Q1| to 1/|1|: orthogonal, maps the ones vector to itself
    (so a zero-mean row stays zero-mean once rotated), and differs from Q by a rank-one term."""
    d = Q.shape[0]
    a = Q @ np.ones(d) / np.sqrt(d)
    u = np.ones(d) / np.sqrt(d)
    w = a - u
    n = np.linalg.norm(w)
    if n < 1e-12:
        return Q
    w /= n
    return Q - 2.0 * np.outer(w, w @ Q)


def _original(edits: _Edits, v: ir.Value) -> np.ndarray:
    """A constant's value before this transform changed it."""
    old = edits.before(v)
    return old if old is not None else v.const_value.numpy()


def _add_bias(edits: _Edits, node: ir.Node, delta: np.ndarray) -> None:
    """Add ``delta`` ([N]) to the output of reader ``node``: into Gemm's C, into a constant bias Add after it, or
    as a new Add."""
    if node.op_type == "Gemm":  # alpha A B + beta C: the shift is alpha beta_ln W
        alpha = node.attributes["alpha"].as_float() if "alpha" in node.attributes else 1.0
        delta = alpha * delta
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        scale = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
        if scale == 0.0:
            raise FusedRotationUnsupported(node.name, "its bias is multiplied by beta = 0")
        delta = delta / scale
        if _const(node.inputs[2]) is None:
            raise FusedRotationUnsupported(node.name, "a LayerNorm shift would go into this Gemm's bias, which is "
                                                      "not a constant")
        c = _owned(edits, node, 2, lambda u, node=node: u is node)
        old = c.const_value.numpy().astype(np.float64)
        if old.size not in (1, len(delta)):
            raise FusedRotationUnsupported(node.name, "its bias is not a per-output vector")
        edits.set(c, np.broadcast_to(old.reshape(-1), (len(delta),)) + delta)
        return
    y = node.outputs[0]
    after = _single_use(y)
    if after is not None and after.op_type == "Add" and not y.is_graph_output():
        k = 1 if after.inputs[0] is y else 0
        c = _const(after.inputs[k])
        if c is not None and c.size == len(delta) and c.shape[-1] == len(delta):
            cv = _owned(edits, after, k, lambda u, after=after: u is after)
            edits.set(cv, c.astype(np.float64) + delta.reshape(c.shape))
            return
    bias = edits.constant(delta.astype(np.dtype(y.dtype.numpy()) if y.dtype is not None else np.float32),
                          f"{node.name}_shift")
    add = ir.node("Add", [y, bias], name=edits._fresh(f"{node.name}/shift"))
    add.outputs[0].name = edits._fresh(f"{y.name}_shifted")
    add.outputs[0].type, add.outputs[0].shape = y.type, y.shape
    for user, idx in list(y.uses()):
        if user is not add:
            edits.replace_input(user, idx, add.outputs[0])
    edits.insert_after(node, [add])
    if y.is_graph_output():
        edits.take_output(y, add.outputs[0])


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
    for n in p.norms:  # a LayerNorm's shift beta reaches each reader as the bias beta W
        beta = _const(n.beta) if n.beta is not None else None
        if beta is None or not np.any(beta):
            continue
        beta = beta.astype(np.float64).reshape(-1)
        for t in p.readers[n.output.name]:
            node = node_by_name[t.name]
            if t.name in p.transposed:
                W = p.transposed[t.name].const_value.numpy().astype(np.float64).T  # [D, V], as read before rotation
            else:
                W = _original(edits, node.inputs[1]).astype(np.float64)
                W = W.T if t.op_type == "Gemm" and t.trans_b else W
            _add_bias(edits, node, beta @ W)
        bv = _owned(edits, n.node, 2, lambda u, n=n: u is n.node)
        edits.set(bv, np.zeros(p.dim))
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
            trans = w.kind == "gemm" and _int_attr(w.node, "transB", 0)
            if W.shape[0 if trans else 1] != p.dim:
                raise FusedRotationUnsupported(w.node.name, f"writes {W.shape} into a residual stream of width "
                                                            f"{p.dim}")
            if p.centering:  # each written row gets a zero mean over the stream's width
                W = W - W.mean(axis=0 if trans else 1, keepdims=True)
            if trans:
                edits.set(wv, Q.T @ W)
            else:
                edits.set(wv, W @ Q)
        if w.bias is not None:
            b = _const(w.bias).astype(np.float64)
            if b.shape != (p.dim,):
                raise FusedRotationUnsupported(w.node.name, f"bias of shape {b.shape} is not a [{p.dim}] vector")
            if p.centering:
                b = b - b.mean()
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


# --------------------------------------------------------------------------------------------- outlier channels

def residual_energy(p: _Plan, outputs: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """[norms, D]: per norm, the mean over tokens of n_c^2 for its normalized input n = r / rms(r) (each row sums
    to D). A channel far above 1 dominates every token's range once Q spreads it: SmolLM2's massive-activation
    channels reach 100-300 while their norm scales (1e-5..1e-4) make the readers ignore them."""
    rows = []
    for n in p.norms:
        parts = [n.residual] if n.residual is not None else list(n.sources)
        r = sum(np.asarray(feeds[v.name] if v.name in feeds else outputs[v.name], np.float64) for v in parts)
        if n.residual is None and n.bias is not None:
            r = r + _const(n.bias).astype(np.float64)
        r = r.reshape(-1, p.dim)
        nr = r / np.sqrt(np.maximum((r * r).mean(-1, keepdims=True), 1e-30))
        rows.append((nr * nr).mean(0))
    return np.stack(rows)


def stream_names(p: _Plan) -> list[str]:
    """The values residual_energy reads (each norm's input, or a Skip-norm's two summed inputs)."""
    return list(dict.fromkeys(v.name for n in p.norms for v in ([n.residual] if n.residual is not None
                                                                else n.sources)))


def choose_outlier_channels(energy: np.ndarray, request: int | str, block: int = 1) -> list[int]:
    """The channels to keep out of the rotation: ``request`` of them by mean energy over the norms, or with "auto"
    those at >= OUTLIER_ENERGY (at most OUTLIER_MAX_SHARE of the width). The count is rounded up to ``block`` (the
    weight group or MX block along the input axis), so that the rotated part keeps whole blocks."""
    dim = energy.shape[1]
    score = energy.mean(0)
    order = np.argsort(-score, kind="stable")
    k = int((score >= OUTLIER_ENERGY).sum()) if request == "auto" else int(request)
    if k <= 0:
        return []
    block = max(int(block), 1)
    k = -(-k // block) * block
    if request == "auto":
        k = min(k, int(dim * OUTLIER_MAX_SHARE) // block * block)
    if k >= dim:
        raise FusedRotationUnsupported("transforms.outlier_channels", f"{request} channels leave nothing of the "
                                                                      f"width {dim} to rotate")
    return sorted(int(c) for c in order[:k])


def outlier_rotation(dim: int, channels: Sequence[int], seed: int, ones: bool = False) -> np.ndarray:
    """An orthogonal Q that rotates every channel but ``channels`` among themselves (into the first D - k columns)
    and moves those k to the last columns untouched, so that a reader can take them apart with a Slice. ``ones``:
    Q 1 = 1 (``keep_ones`` on the rotated block; the moved channels keep their ones)."""
    k = len(channels)
    rest = np.setdiff1d(np.arange(dim), np.asarray(channels, dtype=np.int64))
    Q = np.zeros((dim, dim))
    R = rotation_matrix(dim - k, seed)
    Q[np.ix_(rest, np.arange(dim - k))] = keep_ones(R) if ones else R
    Q[np.asarray(channels, dtype=np.int64), np.arange(dim - k, dim)] = 1.0
    return Q


def _slice(edits: _Edits, x: ir.Value, start: int, end: int, after: ir.Node) -> ir.Value:
    ints = [edits.constant(np.array([v], np.int64), f"{x.name}_slice_{what}")
            for what, v in (("start", start), ("end", end), ("axis", -1))]
    node = ir.node("Slice", [x, *ints], name=edits._fresh(f"{x.name}/Slice_{start}_{end}"))
    out = node.outputs[0]
    out.name = edits._fresh(f"{x.name}_ch{start}_{end}")
    out.type = x.type
    if x.shape is not None:
        out.shape = ir.Shape([*list(x.shape)[:-1], end - start])
    edits.insert_after(after, [node])
    return out


def _split_readers(model: ir.Model, p: _Plan, k: int, edits: _Edits) -> list[str]:
    """Each reader y = n' W becomes y = n'[..., :D-k] W[:D-k] + n'[..., D-k:] W[D-k:]: the first product stays the
    quantization target, the second, over the k unrotated outlier channels, is a float side MatMul. Exact."""
    node_by_name = {n.name: n for n in model.graph}
    a = p.dim - k
    side: list[str] = []
    for n in p.norms:
        readers = [node_by_name[t.name] for t in p.readers[n.output.name]]
        # a head still tied to the table reads it through a Transpose (and a float D x D MatMul): left whole
        readers = [r for r in readers if r.inputs[0] is n.output and r.inputs[1].const_value is not None]
        if not readers:
            continue
        anchor = n.output.producer()
        head = _slice(edits, n.output, 0, a, anchor)
        tail = _slice(edits, n.output, a, p.dim, head.producer())
        for node in readers:
            wv = node.inputs[1]
            W = wv.const_value.numpy()
            by_rows = not (node.op_type == "Gemm" and _int_attr(node, "transB", 0))
            main, rest = (W[:a], W[a:]) if by_rows else (W[:, :a], W[:, a:].T)
            edits.new_input(node, 1, main, f"{wv.name}_rotated_part")
            edits.replace_input(node, 0, head)
            ws = edits.constant(np.ascontiguousarray(rest.astype(W.dtype)), f"{wv.name}_outlier_rows")
            y = node.outputs[0]
            mm = ir.node("MatMul", [tail, ws], name=edits._fresh(f"{node.name}/outlier_channels"))
            mm.outputs[0].name = edits._fresh(f"{y.name}_outlier_part")
            mm.outputs[0].type = y.type
            add = ir.node("Add", [y, mm.outputs[0]], name=edits._fresh(f"{node.name}/outlier_add"))
            add.outputs[0].name = edits._fresh(f"{y.name}_with_outliers")
            add.outputs[0].type, add.outputs[0].shape = y.type, y.shape
            for user, idx in list(y.uses()):
                if user is not add:
                    edits.replace_input(user, idx, add.outputs[0])
            edits.insert_after(node, [mm, add])
            if y.is_graph_output():  # the sum takes over the output's name and place (an lm_head's logits)
                edits.take_output(y, add.outputs[0])
            side.append(mm.name)
    return side


# --------------------------------------------------------------------------------------------- v / o heads

class _HeadPair(NamedTuple):
    v: Target
    o: Target
    head_dim: int
    bias: tuple[ir.Node, int] | None  # v's bias: (its Add, the input holding the constant)
    cols: tuple[int, int]  # v's output columns: all of them, or v's part of a fused q/k/v weight


def _head_pairs(model: ir.Model, p: _Plan, targets: Sequence[Target]) -> list[_HeadPair]:
    """(v_proj, o_proj, head_dim, v's bias, v's columns) where the path between them is per-head linear.

    v_proj may add a constant bias before the heads are split (Qwen2's q/k/v carry biases): the bias is rotated with
    v's columns. v may also be a constant slice of the last axis of a fused q/k/v projection (Phi-3's qkv_proj), when
    every other reader of that projection is a slice of columns outside v's: only v's columns are rotated."""
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
        part = None  # (the Slice, its column range) when v is a slice of a fused projection
        if prod is not None and prod.op_type == "Slice" and len(prod.outputs[0].uses()) == 1:
            span = _last_axis_slice(prod, rank_unknown_ok=True)
            if span is None:
                continue
            part = (prod, span)
            prod = prod.inputs[0].producer()
        bias = None
        if part is None and prod is not None and prod.op_type == "Add" and len(prod.outputs[0].uses()) == 1:
            consts = [i for i, x in enumerate(prod.inputs) if _is_init(x)]
            if len(consts) == 1:
                bias = (prod, consts[0])
                prod = prod.inputs[1 - consts[0]].producer()
        if prod is None or prod.name not in by_node or prod.name not in reader_names or head_dim is None:
            continue
        t_v, t_o = by_node[prod.name], by_node[w.node.name]
        if t_o.in_features % head_dim or t_v.op_type != "MatMul":
            continue
        cols = (0, t_v.out_channels)
        if part is None:
            if len(prod.outputs[0].uses()) != 1:  # v is read by something other than the attention path
                continue
        else:
            n = t_v.out_channels
            cols = _clamp(part[1], n)
            others = [u for u, _ in prod.outputs[0].uses() if u is not part[0]]
            spans = [_last_axis_slice(u, rank_unknown_ok=True)
                     if u.op_type == "Slice" and u.inputs[0] is prod.outputs[0] else None for u in others]
            if prod.outputs[0].is_graph_output() or any(sp is None for sp in spans) \
                    or any(_overlap(_clamp(sp, n), cols) for sp in spans):
                continue
            if _last_axis_slice(part[0]) is None:  # axis taken as the last on trust: the slices must tile [0, n)
                pieces = sorted([cols] + [_clamp(sp, n) for sp in spans])
                if len({_axis_of(u) for u in [part[0], *others]}) != 1 or pieces[0][0] != 0 \
                        or pieces[-1][1] != n or any(a[1] != b[0] for a, b in zip(pieces, pieces[1:])):
                    continue
        if (cols[1] - cols[0]) % head_dim or cols[1] <= cols[0]:
            continue
        if bias is not None:  # one value per v channel (any leading dims of size 1), else not per-head linear
            shape = bias[0].inputs[bias[1]].const_value.shape
            if shape is None or len(shape) == 0 or int(shape[-1]) != t_v.out_channels \
                    or any(int(d) != 1 for d in list(shape)[:-1]):
                continue
        pairs.append(_HeadPair(t_v, t_o, head_dim, bias, cols))
    return pairs


def _last_axis_slice(node: ir.Node, rank_unknown_ok: bool = False) -> tuple[int, int] | None:
    """(start, end) of a Slice of the last axis by constants with step 1, else None. ``rank_unknown_ok``: a positive
    axis counts as the last when the input's rank is not recorded (the TorchScript exporter writes few shapes)."""
    ins = list(node.inputs) + [None] * (5 - len(node.inputs))
    starts, ends, axes, steps = (_const(v) for v in ins[1:5])
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if steps is not None and (steps.size != 1 or int(steps.reshape(-1)[0]) != 1):
        return None
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    axis = int(axes.reshape(-1)[0]) if axes is not None and axes.size == 1 else (None if axes is not None else 0)
    if axis is None:
        return None
    if not (axis == -1 or (rank is not None and axis == rank - 1) or (rank is None and rank_unknown_ok and axis > 0)):
        return None
    return int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])


def _axis_of(node: ir.Node) -> int | None:
    axes = _const(node.inputs[3]) if len(node.inputs) > 3 else None
    return int(axes.reshape(-1)[0]) if axes is not None and axes.size == 1 else None


def _clamp(span: tuple[int, int], n: int) -> tuple[int, int]:
    """A Slice's (start, end) on an axis of length n, as ONNX clamps them (negative counts from the end)."""
    s, e = (min(max(i + n if i < 0 else i, 0), n) for i in span)
    return s, e


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def _shape_last(v: ir.Value, min_pieces: int = 3) -> int | None:
    """The last entry of a Reshape target shape: a constant, or the constant tail of a Concat of pieces; None when
    the shape has fewer than ``min_pieces`` entries (Concat inputs). The default asks for a per-head shape."""
    c = _const(v)
    if c is not None:
        return int(c.reshape(-1)[-1]) if c.size >= max(min_pieces, 1) else None
    p = v.producer()
    if p is not None and p.op_type == "Concat" and len(p.inputs) >= max(min_pieces, 1):
        tail = _const(p.inputs[-1])
        if tail is not None and tail.size >= 1:
            return int(tail.reshape(-1)[-1])
    return None


def _apply_heads(model: ir.Model, pairs: list[_HeadPair], seed: int, edits: _Edits) -> None:
    node_by_name = {n.name: n for n in model.graph}
    for pair in pairs:
        t_v, t_o, hd, bias = pair.v, pair.o, pair.head_dim, pair.bias
        Hh = rotation_matrix(hd, seed + 1)
        nv, no = node_by_name[t_v.name], node_by_name[t_o.name]
        wv = _owned(edits, nv, 1, lambda u, nv=nv: u is nv)
        Wv = wv.const_value.numpy().astype(np.float64)  # [D, Dv]
        a, b = pair.cols
        Wv[:, a:b] = (Wv[:, a:b].reshape(Wv.shape[0], -1, hd) @ Hh).reshape(Wv.shape[0], b - a)
        edits.set(wv, Wv)
        if bias is not None:
            add, index = bias
            bv = _owned(edits, add, index, lambda u, add=add: u is add)
            b = bv.const_value.numpy().astype(np.float64)
            edits.set(bv, (b.reshape(-1, hd) @ Hh).reshape(b.shape))
        wo = _owned(edits, no, 1, lambda u, no=no: u is no)
        Wo = wo.const_value.numpy().astype(np.float64)  # [Dv_o, D]
        edits.set(wo, (Hh.T @ Wo.reshape(-1, hd, Wo.shape[1])).reshape(Wo.shape))


# --------------------------------------------------------------------------------------------- entry point

def fuse_rotations(model: ir.Model, targets: Sequence[Target], sample: Mapping[str, np.ndarray] | None,
                   transform_log: TransformLog, *, seed: int = 0,
                   run: Callable[..., dict[str, np.ndarray]] | None = None, outlier_channels: int | str = 0,
                   block: int = 1) -> FusedRotation:
    """Fuse the rotations into ``model`` in place (see the module docstring); raises FusedRotationUnsupported and
    leaves the model unchanged when the graph is not recognised or the float outputs move.

    ``outlier_channels`` ("auto", or a count; 0 off: for quantized activations): residual channels whose normalized
    energy would dominate every token's quantization range once rotated are left out of Q and read by float side
    MatMuls (choose_outlier_channels, measured on ``sample``); ``block``: the input-axis block their count keeps."""
    p = plan(model, targets)
    reference = channels = None
    if run is not None and sample is not None:
        extra = stream_names(p) if outlier_channels else []
        reference = run(model, sample, extra) if extra else run(model, sample)
        if extra:
            channels = choose_outlier_channels(residual_energy(p, reference, sample), outlier_channels, block)
        outputs = {v.name for v in model.graph.outputs}
        reference = {k: v for k, v in reference.items() if k in outputs}
    channels = channels or []
    if channels:
        Q = outlier_rotation(p.dim, channels, seed, ones=p.centering)
    else:
        Q = keep_ones(rotation_matrix(p.dim, seed)) if p.centering else rotation_matrix(p.dim, seed)
    edits = _Edits(model.graph)
    side: list[str] = []
    try:
        readers, writers = _apply(model, p, Q, edits)
        pairs = _head_pairs(model, p, targets)
        _apply_heads(model, pairs, seed, edits)
        if channels:
            side = _split_readers(model, p, len(channels), edits)
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
        transform_log.touch(name, f"rotate:fused(input, {len(channels)} outlier channels float)" if side
                            else "rotate:fused(input)")
    for name in writers:
        transform_log.touch(name, "rotate:fused(output)")
    for t_v, t_o, hd, _, (a, b) in pairs:
        transform_log.touch(t_v.name, f"rotate:head{hd}(output)" if (a, b) == (0, t_v.out_channels)
                            else f"rotate:head{hd}(output columns {a}:{b})")
        transform_log.touch(t_o.name, f"rotate:head{hd}(input)")
    return FusedRotation(dim=p.dim, norms=len(p.norms), readers=readers, writers=writers,
                         head_rotated=[(pr.v.name, pr.o.name, pr.head_dim) for pr in pairs], online=[],
                         max_rel_diff=worst,
                         tied_heads=list(edits.tied_heads), outlier_channels=list(channels), float_side=side,
                         centred=p.centering)


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
