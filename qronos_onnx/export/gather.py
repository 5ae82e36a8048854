"""Quantized embedding tables: com.microsoft.GatherBlockQuantized where onnxruntime runs it, else the standard
``DequantizeLinear -> Gather``.

GatherBlockQuantized(data, indices, scales[, zero_points]) gathers rows of a block-quantized table and dequantizes
them: ``(code - zero_point) * scale`` per block of ``block_size`` along ``quantize_axis`` (the hidden axis). What is
written, and why (every form checked on onnxruntime 1.32's CPU kernel, bit for bit):

* data is uint8: one code per byte at 8 bits, two per byte at 4 bits (element 2j in the low nibble). uint8 is the
  form every onnxruntime provider with the op (CPU, CUDA, WebGPU) reads; int4 / uint4 data are not universal.
* symmetric grids are shifted by 2^(bits-1) and written without zero points (that is the op's default zero point);
  asymmetric grids write their zero points, packed like the data at 4 bits.
* block_size is the grid's group (a power of two >= 16, as the op requires); a grid with one scale per row uses
  the next power of two >= the hidden size (one block per row).
* scales are the table's dtype (float32, or float16 for float16 tables): the op outputs the scales' type.
* A 4-bit table with an odd hidden size cannot be packed by rows, and the "mx" dialect is for compilers that know
  only standard operators: both get ``DequantizeLinear(codes) -> Gather`` (opset 21 for 4-bit or blocked).

The Gather node keeps its name and output; a table that other nodes also read (a float head tied to it) keeps its
float initializer for them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from ..errors import ExportError
from ..formats import QuantizedWeight
from ..graph.embeddings import EmbeddingTable
from .matmulnbits import MS_DOMAIN, pack_bits, unpack_bits
from .qdq import (_SCALE_NP, CONTAINERS, _all_names, _const, _unique, container_for, default_opset,
                  ir_version_for_opset, upgrade_opset)

log = logging.getLogger(__name__)

GBQ = "GatherBlockQuantized"
FORM_GBQ, FORM_DQ = "GatherBlockQuantized", "DequantizeLinear+Gather"


@dataclass
class QuantizedTable:
    """A table, its codes, and (after export) how the file holds it."""

    table: EmbeddingTable
    qw: QuantizedWeight
    form: str = ""
    block_size: int = 0  # as written
    nodes: list[str] = field(default_factory=list)  # the Gather / GatherBlockQuantized nodes in the file

    def report(self) -> dict:
        g = self.qw.grid
        return {"table": self.table.name, "gathers": list(self.table.gathers), "shape": list(self.table.shape),
                "bits": g.bits, "symmetric": g.symmetric, "group_size": 0 if g.per_channel else g.group_size,
                "form": self.form, "rel_error": self.qw.info.get("rel_error"),
                "float_readers_kept": list(self.table.other_readers)}


def gbq_block(qw: QuantizedWeight) -> int:
    g = qw.grid
    if not g.per_channel:
        return g.group_size
    return max(16, 1 << (g.cols - 1).bit_length())


def form_for(qw: QuantizedWeight, dialect: str) -> str:
    g = qw.grid
    if dialect == "mx" or (g.bits == 4 and g.cols % 2) or g.bits not in (4, 8):
        return FORM_DQ
    return FORM_GBQ


def dq_opset(qw: QuantizedWeight) -> int:
    """Opset the DequantizeLinear form needs: 4-bit containers and blocked scales 21, float16 scales 19, else 13."""
    g = qw.grid
    if g.bits <= 4 or not g.per_channel:
        return 21
    return 19 if g.scale_dtype == torch.float16 else 13


def _checked(name: str, qw: QuantizedWeight, table: EmbeddingTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """codes [V, D] int32, scales [V, n_groups] in the file's dtype, zero points [V, n_groups] int32."""
    g = qw.grid
    if tuple(qw.codes.shape) != tuple(table.shape):
        raise ExportError(f"quantized table {name!r} has codes of shape {tuple(qw.codes.shape)}, the table is "
                          f"{list(table.shape)}")
    scale_np = _SCALE_NP.get(g.scale_dtype)
    if scale_np is None or np.dtype(scale_np) != np.dtype(table.dtype):
        raise ExportError(f"quantized table {name!r}: scale dtype {g.scale_dtype} does not match the table's "
                          f"{np.dtype(table.dtype).name}")
    codes = qw.codes.cpu().numpy().astype(np.int32)
    if codes.min() < g.qmin or codes.max() > g.qmax:
        raise ExportError(f"quantized table {name!r}: codes outside the {g.bits}-bit grid [{g.qmin}, {g.qmax}]")
    scale32 = g.scale.cpu().float().numpy()
    scale = scale32.astype(scale_np)
    if not np.array_equal(scale.astype(np.float32), scale32) or not np.all(np.isfinite(scale32)) \
            or np.any(scale32 <= 0):
        raise ExportError(f"quantized table {name!r}: scales must be finite, > 0 and exact in {np.dtype(scale_np)}")
    zero = g.zero_point.cpu().float().numpy()
    if not np.array_equal(zero, np.round(zero)):
        raise ExportError(f"quantized table {name!r}: zero points are not integers")
    return codes, np.ascontiguousarray(scale), zero.astype(np.int32)


def _gbq_inputs(name: str, qw: QuantizedWeight, table: EmbeddingTable
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    codes, scale, zero = _checked(name, qw, table)
    g = qw.grid
    bits, block = g.bits, gbq_block(qw)
    if -(-g.cols // block) != scale.shape[1]:
        raise ExportError(f"quantized table {name!r}: {scale.shape[1]} scale blocks do not tile {g.cols} columns "
                          f"with block size {block}")
    offset = 1 << (bits - 1)
    if g.symmetric:  # the op's default zero point is 2^(bits-1): shift the signed codes onto it
        u, zp = codes + offset, None
    else:
        u, zp = codes, zero
    if u.min() < 0 or u.max() >= (1 << bits) or (zp is not None and (zp.min() < 0 or zp.max() >= (1 << bits))):
        raise ExportError(f"quantized table {name!r}: codes or zero points do not fit unsigned {bits} bits")
    data = u.astype(np.uint8) if bits == 8 else pack_bits(u.astype(np.uint8), 4)
    zp_arr = None if zp is None else (zp.astype(np.uint8) if bits == 8 else pack_bits(zp.astype(np.uint8), 4))
    return np.ascontiguousarray(data), scale, zp_arr, block


def decode_gbq(data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block: int,
               cols: int) -> np.ndarray:
    """The [V, D] table a GatherBlockQuantized node holds, computed in numpy as the op does (float32, then the
    scales' dtype)."""
    u = data.astype(np.int32) if bits == 8 else unpack_bits(data, 4, cols).astype(np.int32)
    nb = scales.shape[1]
    if zero_points is None:
        z = np.full(scales.shape, 1 << (bits - 1), np.int32)
    else:
        z = (zero_points if bits == 8 else unpack_bits(zero_points, 4, nb)).astype(np.int32)
    gi = np.arange(cols) // block
    return ((u - z[:, gi]).astype(np.float32) * scales[:, gi].astype(np.float32)).astype(scales.dtype)


def _dq_inputs(name: str, qw: QuantizedWeight, table: EmbeddingTable
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    codes, scale, zero = _checked(name, qw, table)
    g = qw.grid
    container = container_for(g.bits, g.symmetric)
    _, np_dtype, cmin, cmax = CONTAINERS[container]
    store = np.int8 if cmin < 0 else np.uint8
    data = codes.astype(store).astype(np_dtype)
    zp = None if g.symmetric else zero.astype(store).astype(np_dtype)
    if g.per_channel:  # one scale per row: per-axis along the rows
        return data, np.ascontiguousarray(scale[:, 0]), None if zp is None else np.ascontiguousarray(zp[:, 0]), \
            {"axis": 0}
    return data, scale, zp, {"axis": 1, "block_size": g.group_size}


def export_tables(model: ir.Model, tables: list[QuantizedTable], dialect: str = "qdq") -> list[QuantizedTable]:
    """Rewrite the Gathers of each table to read its quantized form (``model`` edited in place)."""
    if not tables:
        return tables
    for qt in tables:
        qt.form = form_for(qt.qw, dialect)
    need = max((dq_opset(qt.qw) for qt in tables if qt.form == FORM_DQ), default=0)
    if need and default_opset(model) < need:
        upgrade_opset(model, need)
        model.ir_version = max(int(model.ir_version or 0), ir_version_for_opset(need))
    if any(qt.form == FORM_DQ and qt.qw.grid.bits <= 4 for qt in tables):
        model.ir_version = max(int(model.ir_version or 0), 10)  # INT4 / UINT4 initializers
    if any(qt.form == FORM_GBQ for qt in tables):
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    graph = model.graph
    nodes = {n.name: n for n in graph if n.name}
    taken = _all_names(model)
    for qt in tables:
        name = qt.table.name
        old = graph.initializers.get(name)
        if old is None:
            raise ExportError(f"embedding table {name!r} is not an initializer of the model's main graph")
        gathers = []
        for gname in qt.table.gathers:
            node = nodes.get(gname)
            if node is None or node.op_type != "Gather" or node.inputs[0] is not old:
                raise ExportError(f"Gather node {gname!r} does not read embedding table {name!r} in the model")
            gathers.append(node)
        if qt.form == FORM_GBQ:
            data, scale, zp, block = _gbq_inputs(name, qt.qw, qt.table)
            qt.block_size = block
            ins = [_const(graph, _unique(f"{name}_quantized", taken), data), None,
                   _const(graph, _unique(f"{name}_scale", taken), scale)]
            if zp is not None:
                ins.append(_const(graph, _unique(f"{name}_zero_point", taken), zp))
            for node in gathers:
                idx, out = node.inputs[1], node.outputs[0]
                new = ir.node(GBQ, [ins[0], idx, *ins[2:]], domain=MS_DOMAIN, name=node.name,
                              attributes={"bits": qt.qw.grid.bits, "block_size": block, "gather_axis": 0,
                                          "quantize_axis": 1})
                graph.insert_before(node, new)
                new_out = new.outputs[0]
                new_out.type, new_out.shape = out.type, out.shape
                out.replace_all_uses_with(new_out, replace_graph_outputs=True)
                graph.remove(node, safe=True)
                new_out.name = out.name
                qt.nodes.append(new.name)
        else:
            data, scale, zp, attrs = _dq_inputs(name, qt.qw, qt.table)
            qt.block_size = attrs.get("block_size", 0)
            ins = [_const(graph, _unique(f"{name}_quantized", taken), data),
                   _const(graph, _unique(f"{name}_scale", taken), scale)]
            if zp is not None:
                ins.append(_const(graph, _unique(f"{name}_zero_point", taken), zp))
            for node in gathers:
                dq = ir.node("DequantizeLinear", ins, attributes=attrs, name=_unique(f"{name}_DequantizeLinear", taken))
                out = dq.outputs[0]
                out.name = _unique(f"{name}_dequantized", taken)
                out.dtype = ir.DataType.from_numpy(scale.dtype)
                out.shape = ir.Shape(list(data.shape))
                graph.insert_before(node, dq)
                node.replace_input_with(0, out)
                qt.nodes.append(node.name)
        if not old.uses() and not old.is_graph_output():
            graph.initializers.pop(name)
    props = model.metadata_props
    props["quant.embedding_tables"] = ",".join(qt.table.name for qt in tables)
    props["quant.embedding_bits"] = ",".join(sorted({str(qt.qw.grid.bits) for qt in tables}))
    props["quant.embedding_form"] = ",".join(sorted({qt.form for qt in tables}))
    log.info("embedding export: %d table(s), %s", len(tables), ", ".join(f"{qt.table.name} {qt.form}" for qt in tables))
    return tables
