"""The "matmulnbits" dialect: com.microsoft.MatMulNBits for integer MatMul weights (onnx_encodings.md §4).

MatMulNBits(A, B, scales[, zero_points]) computes A @ dequant(B)^T with B uint8 [N, k_blocks, block*bits/8]: row n
holds output column n's K codes, unsigned, packed LSB first (4-bit: element 2j in the low nibble), each block padded
to ``block_size``. ``scales`` is [N, k_blocks] in A's type; ``zero_points`` packed uint8 [N, ceil(k_blocks*bits/8)]
(asymmetric grids) or absent, meaning 2^(bits-1): symmetric codes are shifted by that default to become unsigned.

What is written, and why:

* bits: onnxruntime's CPU kernel takes 2, 4 and 8 only, so 3-bit codes live in 4 bits and 5-7 in 8 (the true width
  is in ``metadata_props``); 2-bit blocks above 256 (rejected by onnxruntime) use 4 bits.
* block_size: the group size (a power of two >= 16, as the config requires). Per-channel grids repeat the row's
  scale (and zero point) over blocks of min(next_pow2(K), 128) (exact; onnxruntime itself turns per-axis DQ into
  blocks, and accepts block_size > K).
* MXFP4 / MXINT8 weights (linear int8 codes, one power-of-two scale per 32) become 8-bit, block 32, zero point 128.
* ``accuracy_level`` (default 0: float compute, bit-exact weights). 4 quantizes A to int8 per block: faster on CPU,
  different numerics.
* Everything else (Gemm, Conv, MXFP8 / FP8 weights, weights also read by a non-MatMul target, non power-of-two groups)
  falls back to QDQ (``export_qdq``, dialect "qdq"). Each MatMulNBits keeps the MatMul's node name and output.

The codes and scales are packed from the QuantizedWeight as they are; :func:`decode_matmulnbits` unpacks a node
back to the [K, N] weight for the golden check.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from ..errors import ExportError
from ..formats import IntGrid, QuantizedWeight
from ..graph.targets import Target
from .qdq import _SCALE_NP, _all_names, _const, _lazy_const, _unique, check_scale_signs, export_qdq

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
PER_CHANNEL_BLOCK_MAX = 128
TWO_BIT_BLOCK_MAX = 256


@dataclass
class NBitsEncoding:
    """MatMulNBits initializers and attributes for one weight."""

    weight_name: str
    B: np.ndarray  # uint8 [N, k_blocks, blob]
    scales: np.ndarray  # [N, k_blocks] float32 / float16
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)], None: default 2^(bits-1)
    K: int
    N: int
    bits: int  # container bits: 2, 4, 8
    block_size: int
    true_bits: int


def pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, LSB first, padding with zeros to whole bytes."""
    per = 8 // bits
    pad = (-u.shape[-1]) % per
    if pad:
        u = np.concatenate([u, np.zeros(u.shape[:-1] + (pad,), u.dtype)], axis=-1)
    u = u.astype(np.uint8).reshape(u.shape[:-1] + (-1, per))
    out = np.zeros(u.shape[:-1], np.uint8)
    for j in range(per):
        out |= (u[..., j] << (bits * j)).astype(np.uint8)
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes along the last axis (uint8)."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per)]
    return np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :count].astype(np.uint8)


def _container_bits(bits: int, block: int) -> int:
    if bits <= 2 and block <= TWO_BIT_BLOCK_MAX:
        return 2
    return 4 if bits <= 4 else 8


def _pow2_at_least(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


def nbits_eligible(qw: QuantizedWeight, targets: list[Target]) -> str | None:
    """None if ``qw`` can be written as MatMulNBits for all its ``targets``, else the reason it cannot."""
    if any(t.op_type != "MatMul" for t in targets):
        return "not every consumer is a MatMul"
    grid = qw.grid
    if isinstance(grid, IntGrid):
        if not 2 <= grid.bits <= 8:
            return f"{grid.bits}-bit grid"
    elif not (getattr(grid, "is_mx", False) and getattr(grid, "linear", False)):
        return f"{qw.format} codes are not integers on a uniform grid"
    g = grid.group_size
    if grid.n_groups > 1 and (g < 16 or g & (g - 1)):
        return f"group size {g} is not a power of two >= 16"
    if grid.scale_dtype not in _SCALE_NP:
        return f"scale dtype {grid.scale_dtype}"
    return None


def encode_nbits(name: str, qw: QuantizedWeight, target: Target) -> NBitsEncoding:
    """Pack one QuantizedWeight of a MatMul [K, N] weight (solver layout [N, K]) as MatMulNBits inputs."""
    grid = qw.grid
    _, N, K = target.matrix_shape
    if target.op_type != "MatMul" or len(target.weight_shape) != 2 or tuple(qw.codes.shape) != (N, K) \
            or grid.cols != K or tuple(grid.scale.shape) != (N, grid.n_groups):
        raise ExportError(f"quantized weight {name!r} (codes {tuple(qw.codes.shape)}) cannot be written as "
                          f"MatMulNBits for node {target.name!r} (weight {list(target.weight_shape)})")
    if np.dtype(target.weight_dtype) != np.dtype(_SCALE_NP[grid.scale_dtype]):
        raise ExportError(f"quantized weight {name!r}: scales are {grid.scale_dtype} but the weight is "
                          f"{np.dtype(target.weight_dtype).name}; they must match")
    per_channel = grid.n_groups == 1  # one scale per row: repeated over power-of-two blocks
    block = min(_pow2_at_least(K), PER_CHANNEL_BLOCK_MAX) if per_channel else grid.group_size
    k_blocks = -(-K // block)
    bits = _container_bits(grid.bits, block) if isinstance(grid, IntGrid) else 8  # MXFP4 codes 2*e2m1 span +-12
    codes = qw.codes.detach().cpu().to(torch.int32).numpy()
    scale = grid.scale.detach().cpu().float()
    zero = grid.zero_point.detach().cpu().float()
    check_scale_signs(name, scale, grid.symmetric)
    if not torch.equal(scale.to(grid.scale_dtype).float(), scale) or not torch.equal(zero, torch.round(zero)):
        raise ExportError(f"quantized weight {name!r}: scales not exact in {grid.scale_dtype} or zero points not "
                          f"integers")
    if per_channel:
        scale, zero = scale.expand(N, k_blocks), zero.expand(N, k_blocks)
    elif grid.n_groups != k_blocks:
        raise ExportError(f"quantized weight {name!r}: {grid.n_groups} groups do not tile K={K} in blocks of {block}")
    symmetric = grid.symmetric
    offset = (1 << (bits - 1)) if symmetric else 0
    if symmetric and bool((zero != 0).any()):
        raise ExportError(f"quantized weight {name!r}: a symmetric grid must have zero points 0")
    u = codes + offset
    if u.min() < 0 or u.max() > (1 << bits) - 1:
        raise ExportError(f"quantized weight {name!r}: codes span [{codes.min()}, {codes.max()}], which do not fit "
                          f"{bits}-bit MatMulNBits codes")
    u = np.concatenate([u, np.full((N, k_blocks * block - K), offset, np.int32)], axis=1)  # pad: decodes to 0
    B = pack_bits(u.astype(np.uint8).reshape(N, k_blocks, block), bits)
    zp = None
    if not symmetric:
        z = zero.numpy().astype(np.int32)
        if z.min() < 0 or z.max() > (1 << bits) - 1:
            raise ExportError(f"quantized weight {name!r}: zero points outside the {bits}-bit range")
        zp = pack_bits(z.astype(np.uint8), bits)
    scales = np.ascontiguousarray(scale.to(grid.scale_dtype).numpy())
    return NBitsEncoding(name, np.ascontiguousarray(B), scales, zp, K, N, bits, block, grid.bits)


def decode_matmulnbits(node: ir.Node) -> np.ndarray:
    """The weight a MatMulNBits node multiplies by, [K, N] in the scales' dtype: (code - zero point) * scale."""
    return np.ascontiguousarray(decode_matmulnbits_nk(node).T)


def decode_matmulnbits_nk(node: ir.Node) -> np.ndarray:
    """:func:`decode_matmulnbits` in the packed layout [N, K] (the solver's), without the transposed copy."""
    a = {k: v.value for k, v in node.attributes.items()}
    K, N, bits, block = int(a["K"]), int(a["N"]), int(a["bits"]), int(a["block_size"])
    B = np.asarray(node.inputs[1].const_value.numpy())
    scales = np.asarray(node.inputs[2].const_value.numpy())
    k_blocks = -(-K // block)
    codes = unpack_bits(B, bits, block).reshape(N, k_blocks * block).astype(np.int32)
    zv = node.inputs[3] if len(node.inputs) > 3 else None
    if zv is None:
        zero = np.full((N, k_blocks), 1 << (bits - 1), np.int32)
    else:
        zero = unpack_bits(np.asarray(zv.const_value.numpy()), bits, k_blocks).astype(np.int32)
    scales = scales.reshape(N, k_blocks, 1)  # broadcast per block: the same products as repeating them
    w = (codes.reshape(N, k_blocks, block) - zero[..., None]).astype(scales.dtype)
    w *= scales
    return w.reshape(N, k_blocks * block)[:, :K]


def _deferred_nbits(enc: NBitsEncoding) -> NBitsEncoding:
    """``enc`` without its packed codes (a zero-size broadcast view of the same shape stands in): the B initializer
    is a LazyTensor that packs again when the file is written or the golden check reads it, so that the export never
    holds every weight's packed codes at once (as export_qdq does for its codes; scales stay, they are small)."""
    return dataclasses.replace(enc, B=np.broadcast_to(np.zeros((), enc.B.dtype), enc.B.shape))


def _rewire_nbits(model: ir.Model, enc: NBitsEncoding, targets: list[Target], taken: set[str],
                  accuracy_level: int, nodes: dict[str, ir.Node], encode: Callable[[], NBitsEncoding]) -> int:
    """Replace the weight's MatMuls by MatMulNBits; ``nodes`` (name -> node, built once) is kept up to date;
    ``encode`` packs B again when the file is written (a lazy initializer: ``enc`` is the deferred encoding)."""
    graph = model.graph
    w = enc.weight_name
    old = graph.initializers.get(w)
    if old is None:
        raise ExportError(f"weight initializer {w!r} is not in the model's main graph")
    B = _lazy_const(graph, _unique(f"{w}_MatMulNBits_B", taken), lambda: encode().B, enc.B.dtype, enc.B.shape)
    scales = _const(graph, _unique(f"{w}_MatMulNBits_scales", taken), enc.scales)
    zp = None if enc.zero_points is None else _const(graph, _unique(f"{w}_MatMulNBits_zero_points", taken),
                                                      enc.zero_points)
    attrs = {"K": enc.K, "N": enc.N, "bits": enc.bits, "block_size": enc.block_size,
             "accuracy_level": accuracy_level}
    for t in targets:
        node = nodes.get(t.name)
        if node is None or node.op_type != "MatMul" or len(node.inputs) != 2 or node.inputs[1] is not old:
            raise ExportError(f"node {t.name!r} is not a MatMul reading weight {w!r} as its second input")
        new = ir.node("MatMulNBits", inputs=[node.inputs[0], B, scales] + ([zp] if zp is not None else []),
                      attributes=attrs, domain=MS_DOMAIN, name=node.name)
        # the new output takes the old one's name, type, shape and consumers (graph outputs included)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
        nodes[t.name] = new
    if not old.uses() and not old.is_graph_output():
        graph.initializers.pop(w)
    return len(targets)


def export_matmulnbits(model: ir.Model, quantized: dict[str, QuantizedWeight], targets: list[Target], *,
                       metadata: dict[str, str], accuracy_level: int = 0) -> ir.Model:
    """MatMulNBits for every eligible MatMul weight, QDQ for the rest; ``model`` is edited in place and returned."""
    by_weight: dict[str, list[Target]] = {}
    for t in targets:
        by_weight.setdefault(t.weight_name, []).append(t)
    nbits: list[tuple[NBitsEncoding, list[Target], Callable[[], NBitsEncoding]]] = []
    rest: dict[str, QuantizedWeight] = {}
    for name, qw in quantized.items():
        ts = by_weight.get(name)
        if not ts:
            raise ExportError(f"quantized weight {name!r} has no target node in the target list")
        why = nbits_eligible(qw, ts)
        if why is None:
            encode = functools.partial(encode_nbits, name, qw, ts[0])
            nbits.append((_deferred_nbits(encode()), ts, encode))  # encoded once here: its checks raise now
        else:
            log.info("MatMulNBits: weight %s written as QDQ (%s)", name, why)
            rest[name] = qw
    # QDQ first: it may convert the opset, which rebuilds the graph
    if rest:
        export_qdq(model, rest, [t for t in targets if t.weight_name in rest], metadata=metadata, dialect="qdq")
    else:
        model.metadata_props.update({str(k): str(v) for k, v in metadata.items()})
    taken = _all_names(model)
    nodes = {n.name: n for n in model.graph if n.name}
    n = sum(_rewire_nbits(model, enc, ts, taken, accuracy_level, nodes, encode) for enc, ts, encode in nbits)
    if nbits:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    props = model.metadata_props
    bits = sorted({q.bits for q in quantized.values()})
    if bits:
        props["quant.weight_bits"] = ",".join(map(str, bits))
        props.setdefault("quant.bits", props["quant.weight_bits"])
        props["quant.format"] = ",".join(sorted({q.format for q in quantized.values()}))
    props["quant.dialect"] = "matmulnbits"
    props["quant.quantized_weights"] = str(len(quantized))
    props["quant.matmulnbits_nodes"] = str(n)
    props["quant.matmulnbits_bits"] = ",".join(sorted({str(e.bits) for e, _, _ in nbits}))
    props["quant.matmulnbits_accuracy_level"] = str(accuracy_level)
    log.info("MatMulNBits export: %d weights as %d MatMulNBits nodes, %d weights as QDQ", len(nbits), n, len(rest))
    return model
