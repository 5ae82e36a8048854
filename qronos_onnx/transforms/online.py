"""Online input rotations (QuaRot / HIP style): x W = (x R)(R^T W) with R orthogonal, inserted before quantization.

A rotation spreads an outlier channel of the activations over many channels, so a per-token INT4 (or MX) scale is
no longer set by one channel; it does the same to the weights' columns (incoherence processing). Every MatMul / Gemm
target reading a tensor x gets its input from one new ``MatMul(x, R)`` node (q/k/v share it) and its weight replaced
by the rotated copy; the float model computes the same function up to float32 round-off. The rotation MatMuls stay
in float in the exported model (one K x K product per rotated tensor at run time); folding them into the preceding
norms (QuaRot's fused form) is not done.

R is a randomized Hadamard transform: H_{2^a} (Sylvester) Kronecker a seeded random orthogonal m x m block for the
odd part m of K (K = 2^a m), times seeded random signs, scaled to be orthogonal. For K a power of two it is a true
randomized Hadamard. All inputs of one width share one R, so the file holds one K x K matrix per width.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..errors import ModelError
from ..graph.model import graph_names
from ..graph.targets import Target

ROTATION_PREFIX = "qronos_rotate"


def rotation_matrix(k: int, seed: int = 0) -> np.ndarray:
    """An orthogonal ``[k, k]`` float64 matrix (see the module docstring); reproducible for a given seed."""
    if k < 1:
        raise ValueError(f"rotation size must be positive, got {k}")
    a, m = 0, k
    while m % 2 == 0:
        a, m = a + 1, m // 2
    h = np.ones((1, 1))
    for _ in range(a):
        h = np.block([[h, h], [h, -h]])
    h /= np.sqrt(h.shape[0])
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((m, m)))
    q *= np.sign(np.diag(r))  # Haar-distributed, not biased by the QR sign convention
    signs = rng.choice([-1.0, 1.0], size=k)
    return signs[:, None] * np.kron(h, q)


def rotate_inputs(model: ir.Model, targets: list[Target], seed: int = 0) -> list[str]:
    """Rotate the inputs of the MatMul / Gemm targets in place (see the module docstring).

    Conv targets, and weights that are also read by nodes outside the rotated group (a tied embedding, say), are left
    as they are. Returns the names of the rotation nodes, which must not be quantized themselves.
    """
    graph = model.graph
    nodes = {node.name: node for node in graph}
    by_input: dict[str, list[Target]] = {}
    for t in targets:
        if t.op_type in ("MatMul", "Gemm"):
            by_input.setdefault(t.input_name, []).append(t)
    taken = graph_names(graph)

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    rotation_nodes = []
    shared: dict[tuple, tuple[np.ndarray, ir.Value]] = {}  # one R per width (and dtype): stored once
    for i, (x_name, group) in enumerate(by_input.items()):
        members = {t.name for t in group}
        weights = {t.weight_name for t in group}
        k = group[0].in_features
        if any(t.in_features != k for t in group):
            raise ModelError(f"targets reading {x_name!r} disagree on the input width: "
                             f"{sorted((t.name, t.in_features) for t in group)}")
        if not _weights_private(graph, weights, members):
            continue
        first = nodes[group[0].name]
        x = first.inputs[0]
        dtype = group[0].weight_dtype
        key = (k, np.dtype(dtype).name)
        if key not in shared:
            R = rotation_matrix(k, seed)
            r_name = fresh(f"{ROTATION_PREFIX}/R{k}_{key[1]}")
            r_val = ir.Value(name=r_name, shape=ir.Shape([k, k]), type=ir.TensorType(ir.DataType.from_numpy(dtype)),
                             const_value=ir.Tensor(R.astype(dtype), name=r_name))
            graph.register_initializer(r_val)
            shared[key] = (R, r_val)
        R, r_val = shared[key]
        rot = ir.node("MatMul", [x, r_val], name=fresh(f"{ROTATION_PREFIX}/MatMul_{i}"))
        rot.outputs[0].name = fresh(f"{ROTATION_PREFIX}/x_{i}")
        rot.outputs[0].type = x.type
        rot.outputs[0].shape = x.shape
        graph.insert_before(first, rot)
        rotation_nodes.append(rot.name)
        done: dict[str, ir.Value] = {}
        for t in group:
            node = nodes[t.name]
            node.replace_input_with(0, rot.outputs[0])
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


def _weights_private(graph: ir.Graph, weights: set[str], members: set[str]) -> bool:
    """True when only the group's own nodes read its weights (otherwise rotating them would change other nodes)."""
    for name in weights:
        value = graph.initializers.get(name)
        if value is None or value.is_graph_output():
            return False
        if any(user.name not in members for user, _ in value.uses()):
            return False
    return True
