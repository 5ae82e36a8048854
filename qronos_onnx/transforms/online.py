"""Online input rotations (QuaRot / HIP style): x W = (x R)(R^T W) with R orthogonal, inserted before quantization.

A rotation spreads an outlier channel of the activations over many channels, so a per-token INT4 (or MX) scale is
no longer set by one channel; it does the same to the weights' columns (incoherence processing). Every MatMul / Gemm
target reading a tensor x gets its input from one new ``MatMul(x, R)`` node (q/k/v share it) and its weight replaced
by the rotated copy; the float model computes the same function up to float32 round-off. The rotations stay in
float in the exported model; folding them into the preceding norms is QuaRot's fused form (``fused.py``), which
leaves this online one only where it cannot (down_proj). From ``FACTORED_MIN_WIDTH`` on, a width whose R is one
Hadamard is applied in Kronecker form, ``A^T reshape(x * s, [a, b]) B`` (``hadamard_factors``): two small MatMuls
between Reshapes, K (a + b) multiply-adds per row instead of K^2 (1536 = 32 x 48: 19x fewer); the weights are rotated
by the same R either way.

R is a randomized Hadamard transform (transforms/hadamard.py): a true Hadamard when K = 2^a m with m a Paley order
(12, 20, 28, 36, 44, 52, 60, ...; e.g. 576 = 16 * 36, 1536 = 128 * 12), else block-diagonal with the largest
constructible Hadamard blocks (a prime K = 17 gets 16 + 1), times seeded random signs; entries +-1/sqrt(block).
All inputs of one width share one R, so the file holds one K x K matrix per width.

The same transform is HIP (Hadamard incoherence processing, qronos_algorithm.md §4.2) for weight-only low bits on
graphs that are not decoders: W <- R^T W spreads each weight column's outliers over the block, which a per-channel
min-max grid then sees as a smaller range. Only MatMul / Gemm targets are rotated; Conv weights are left as they are
(their input is an image, not a feature vector one MatMul can rotate).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..errors import ModelError
from ..graph.model import name_factory
from ..graph.targets import Target
from . import TransformLog
from .hadamard import block_hadamard, hadamard_blocks, hadamard_factors

ROTATION_PREFIX = "qronos_rotate"
FACTORED_MIN_WIDTH = 256  # below it one K x K MatMul is as cheap as the factored form's extra nodes


def rotation_matrix(k: int, seed: int = 0) -> np.ndarray:
    """An orthogonal ``[k, k]`` float64 matrix (see the module docstring); reproducible for a given seed."""
    if k < 1:
        raise ValueError(f"rotation size must be positive, got {k}")
    return block_hadamard(k, seed=seed)


def rotate_inputs(model: ir.Model, targets: list[Target], seed: int = 0, log: TransformLog | None = None) -> list[str]:
    """Rotate the inputs of the MatMul / Gemm targets in place (see the module docstring).

    Conv targets, and weights that are also read by nodes outside the rotated group (a tied embedding, say), are left
    as they are. Returns the names of the rotation nodes, which must not be quantized themselves. ``log`` records each
    rotated target ("rotate:online"), the rotation nodes, and a note per group left alone or rotated block-diagonally.
    """
    log = log if log is not None else TransformLog()
    graph = model.graph
    nodes = {node.name: node for node in graph}
    by_input: dict[str, list[Target]] = {}
    for t in targets:
        if t.op_type in ("MatMul", "Gemm"):
            by_input.setdefault(t.input_name, []).append(t)
    fresh = name_factory(graph)

    rotation_nodes = []
    shared: dict[tuple, tuple[np.ndarray, list[ir.Value]]] = {}  # one R per width (and dtype): stored once
    for i, (x_name, group) in enumerate(by_input.items()):
        members = {t.name for t in group}
        weights = {t.weight_name for t in group}
        k = group[0].in_features
        if any(t.in_features != k for t in group):
            raise ModelError(f"targets reading {x_name!r} disagree on the input width: "
                             f"{sorted((t.name, t.in_features) for t in group)}")
        if not _weights_private(graph, weights, members):
            log.notes.append(f"rotate:online: the input {x_name!r} of {sorted(members)} is not rotated: a weight is "
                             "also read by nodes outside the group")
            continue
        first = nodes[group[0].name]
        x = first.inputs[0]
        dtype = group[0].weight_dtype
        key = (k, np.dtype(dtype).name)
        if key not in shared:
            R = rotation_matrix(k, seed)
            factors = hadamard_factors(k, seed) if k >= FACTORED_MIN_WIDTH else None
            if factors is None:
                consts = [(f"R{k}", R)]
            else:
                signs, A, B = factors
                consts = [(f"R{k}_signs", signs), (f"R{k}_left", A.T), (f"R{k}_right", B),
                          (f"R{k}_blocks", np.array([-1, A.shape[0], B.shape[0]], np.int64))]
            vals = []
            for base, arr in consts:
                arr = arr if arr.dtype == np.int64 else arr.astype(dtype)
                name = fresh(f"{ROTATION_PREFIX}/{base}_{key[1]}")
                val = ir.Value(name=name, shape=ir.Shape(list(arr.shape)),
                               type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)),
                               const_value=ir.Tensor(np.ascontiguousarray(arr), name=name))
                graph.register_initializer(val)
                vals.append(val)
            shared[key] = (R, vals)
        R, vals = shared[key]
        nodes_i, y = _rotation_nodes(x, vals, i, fresh)
        for node in nodes_i:
            graph.insert_before(first, node)
        matmuls = [n.name for n in nodes_i if n.op_type == "MatMul"]
        rotation_nodes += matmuls
        log.float_rotations.append(matmuls[-1])
        blocks = hadamard_blocks(k)
        if len(blocks) > 1:
            log.notes.append(f"rotate:online: width {k} of {x_name!r} has no Hadamard of that order here; "
                             f"block-diagonal Hadamard {'+'.join(map(str, blocks))}")
        done: dict[str, ir.Value] = {}
        for t in group:
            node = nodes[t.name]
            node.replace_input_with(0, y)
            log.touch(t.name, "rotate:online")
            if t.weight_name not in done:
                w = node.inputs[1].const_value.numpy().astype(np.float64)
                # MatMul / Gemm(transB=0): W [K, N] -> R^T W; Gemm(transB=1): W [N, K] -> W R
                new = (w @ R) if (t.op_type == "Gemm" and t.trans_b) else (R.T @ w)
                w_name = fresh(f"{t.weight_name}_rotated")
                done[t.weight_name] = ir.Value(
                    name=w_name, shape=ir.Shape(list(new.shape)), type=ir.TensorType(ir.DataType.from_numpy(dtype)),
                    const_value=ir.Tensor(new.astype(dtype), name=w_name))
                graph.register_initializer(done[t.weight_name])
            node.replace_input_with(1, done[t.weight_name])
    for name in {t.weight_name for t in targets}:  # the unrotated originals nobody reads any more
        value = graph.initializers.get(name)
        if value is not None and not value.uses() and not value.is_graph_output():
            graph.initializers.pop(name)
    return rotation_nodes


def _rotation_nodes(x: ir.Value, consts: list[ir.Value], i: int, fresh) -> tuple[list[ir.Node], ir.Value]:
    """``x R`` as nodes: one MatMul by R, or (Kronecker form) Mul by the signs, Reshape to [-1, a, b], MatMul by B,
    MatMul by A^T from the left, Reshape back to x's shape."""
    def out(node: ir.Node, name: str, same_shape: bool = False) -> ir.Value:
        v = node.outputs[0]
        v.name = fresh(f"{ROTATION_PREFIX}/{name}_{i}")
        v.type = x.type
        if same_shape:
            v.shape = x.shape
        return v

    if len(consts) == 1:
        rot = ir.node("MatMul", [x, consts[0]], name=fresh(f"{ROTATION_PREFIX}/MatMul_{i}"))
        return [rot], out(rot, "x", same_shape=True)
    signs, left, right, blocks = consts
    mul = ir.node("Mul", [x, signs], name=fresh(f"{ROTATION_PREFIX}/signs_{i}"))
    shape = ir.node("Shape", [x], name=fresh(f"{ROTATION_PREFIX}/shape_{i}"))
    shape.outputs[0].name = fresh(f"{ROTATION_PREFIX}/x_shape_{i}")
    split = ir.node("Reshape", [out(mul, "x_signed"), blocks], name=fresh(f"{ROTATION_PREFIX}/blocks_{i}"))
    mm_right = ir.node("MatMul", [out(split, "x_blocks"), right], name=fresh(f"{ROTATION_PREFIX}/MatMul_{i}"))
    mm_left = ir.node("MatMul", [left, out(mm_right, "x_right")], name=fresh(f"{ROTATION_PREFIX}/MatMul_left_{i}"))
    back = ir.node("Reshape", [out(mm_left, "x_both"), shape.outputs[0]], name=fresh(f"{ROTATION_PREFIX}/unblock_{i}"))
    return [mul, shape, split, mm_right, mm_left, back], out(back, "x", same_shape=True)


def _weights_private(graph: ir.Graph, weights: set[str], members: set[str]) -> bool:
    """True when only the group's own nodes read its weights (otherwise rotating them would change other nodes)."""
    for name in weights:
        value = graph.initializers.get(name)
        if value is None or value.is_graph_output():
            return False
        if any(user.name not in members for user, _ in value.uses()):
            return False
    return True
