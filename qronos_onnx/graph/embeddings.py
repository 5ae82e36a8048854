"""Embedding tables (constant-table Gathers) and the lm_head, found on the float graph.

A table is a constant float 2-D initializer that a main-graph Gather reads along axis 0 with runtime indices (token
ids): the token embedding, and position / type embeddings written the same way. A head tied to the embedding reads
the table through ``Transpose(perm=[1, 0])`` (how the torch exporters write SmolLM2's); ``untie_heads`` gives such a
MatMul its own transposed copy, so that it becomes an ordinary target with its own grid. The tie is then undone in
the output file only: the float model the capture runs computes exactly what it did.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .model import name_factory, read_initializer
from .targets import FLOAT_TYPES, Target, name_nodes


@dataclass
class EmbeddingTable:
    """One constant table and the Gather nodes that read it."""

    name: str  # the initializer
    gathers: list[str]  # Gather node names
    shape: tuple[int, int]  # [rows (vocabulary), hidden]
    dtype: np.dtype
    other_readers: list[str] = field(default_factory=list)  # non-Gather nodes that read the table as well


@dataclass
class UntiedHead:
    node: str  # the head MatMul
    table: str  # the embedding initializer it read through a Transpose
    weight: str  # its own [D, V] initializer


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return int(a.as_int()) if a is not None else default


def _const_table(v: ir.Value | None) -> bool:
    return (v is not None and v.const_value is not None and v.is_initializer() and not v.is_graph_input()
            and v.const_value.dtype in FLOAT_TYPES and len(v.const_value.shape) == 2)


def find_embedding_tables(model: ir.Model, exclude: list[str] | tuple[str, ...] = ()) -> list[EmbeddingTable]:
    """Tables read by ``Gather(table, indices, axis=0)`` in the main graph (indices computed at run time), minus the
    Gathers whose node name matches ``exclude`` (a table some excluded Gather reads stays float)."""
    name_nodes(model)
    patterns = [re.compile(p) for p in exclude]
    found: dict[str, EmbeddingTable] = {}
    excluded: set[str] = set()
    for node in model.graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        table, idx = node.inputs
        if not _const_table(table) or idx is None or idx.const_value is not None:
            continue
        if _int_attr(node, "axis", 0) not in (0, -2):
            continue
        if any(p.search(node.name) for p in patterns):
            excluded.add(table.name)
            continue
        shape = tuple(int(d) for d in table.const_value.shape)
        t = found.setdefault(table.name, EmbeddingTable(table.name, [], shape, table.const_value.dtype.numpy()))
        t.gathers.append(node.name)
    out = []
    for t in found.values():
        if t.name in excluded:
            continue
        v = model.graph.initializers[t.name]
        t.other_readers = sorted({u.name for u, _ in v.uses() if u.name not in t.gathers})
        out.append(t)
    return out


def _tied_table(node: ir.Node) -> ir.Value | None:
    """The constant table a ``MatMul(x, Transpose(table, perm=[1, 0]))`` reads, or None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    tr = node.inputs[1].producer() if node.inputs[1] is not None else None
    if tr is None or tr.op_type != "Transpose" or tr.domain not in ("", "ai.onnx"):
        return None
    perm = list(tr.attributes["perm"].as_ints()) if "perm" in tr.attributes else [1, 0]
    return tr.inputs[0] if _const_table(tr.inputs[0]) and perm == [1, 0] else None


def tied_heads(model: ir.Model) -> list[tuple[str, str]]:
    """(MatMul node, table) for every head that reads a constant table through a Transpose."""
    name_nodes(model)
    return [(n.name, t.name) for n in model.graph if (t := _tied_table(n)) is not None]


def _read_own_transpose(graph: ir.Graph, node: ir.Node, index: int, table: ir.Value, name: str) -> str:
    """Input ``index`` of ``node`` (a ``Transpose(table)``) becomes a new initializer ``name`` holding the transposed
    values; the Transpose goes when nothing else reads it."""
    tr = node.inputs[index].producer()
    arr = np.ascontiguousarray(np.asarray(read_initializer(table)).T)
    new = ir.Value(name=name, shape=ir.Shape(list(arr.shape)), type=ir.TensorType(table.const_value.dtype),
                   const_value=ir.Tensor(arr, name=name))
    graph.register_initializer(new)
    old = node.inputs[index]
    node.replace_input_with(index, new)
    if not old.uses() and not old.is_graph_output():
        graph.remove(tr, safe=True)
    return name


def untie_heads(model: ir.Model, exclude: list[str] | tuple[str, ...] = ()) -> list[UntiedHead]:
    """``MatMul(x, Transpose(table))`` with a constant 2-D table -> ``MatMul(x, table_T)``, ``table_T`` its own
    initializer (the same values, so the float function is unchanged); the Transpose goes when nothing else reads it.
    Heads whose name matches ``exclude`` stay tied (an untied float copy would only grow the file). Returns what was
    untied."""
    name_nodes(model)
    patterns = [re.compile(p) for p in exclude]
    graph = model.graph
    fresh = name_factory(graph)
    done = []
    for node in list(graph):
        table = _tied_table(node)
        if table is None or any(p.search(node.name) for p in patterns):
            continue
        name = _read_own_transpose(graph, node, 1, table, fresh(f"{table.name}_lm_head"))
        done.append(UntiedHead(node.name, table.name, name))
    return done


def untie_transposed_tables(model: ir.Model) -> list[tuple[str, str]]:
    """``Gather(Transpose(W, perm=[1, 0]), ids, axis=0)`` with a constant 2-D ``W`` -> ``Gather(W_T, ids)``, ``W_T``
    its own initializer (the same values). onnxruntime-genai's builder writes a tied LM this way: the head's MatMul
    reads ``W`` [hidden, vocab] and the embedding gathers rows of its transpose. With its own table the embedding is
    quantized like any table (``--embeddings``), while ``W`` serves the head alone, so neither keeps a float copy
    for the other. Returns (Gather node, new table) pairs."""
    name_nodes(model)
    graph = model.graph
    fresh = name_factory(graph)
    done = []
    for node in list(graph):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        if _int_attr(node, "axis", 0) not in (0, -2) or node.inputs[0] is None:
            continue
        tr = node.inputs[0].producer()
        if tr is None or tr.op_type != "Transpose" or tr.domain not in ("", "ai.onnx"):
            continue
        perm = list(tr.attributes["perm"].as_ints()) if "perm" in tr.attributes else [1, 0]
        table = tr.inputs[0]
        if perm != [1, 0] or not _const_table(table):
            continue
        done.append((node.name, _read_own_transpose(graph, node, 0, table, fresh(f"{table.name}_embedding"))))
    return done


def find_heads(model: ir.Model, targets: list[Target], tables: list[EmbeddingTable],
               untied: list[UntiedHead]) -> list[str]:
    """The lm_head target(s): a head untied from a table, or a MatMul / Gemm that maps the hidden size of a gathered
    table to its row count (the vocabulary) and whose output reaches a graph output through no other target."""
    sizes = {t.shape for t in tables}
    untied_nodes = {u.node for u in untied}
    names = {t.name for t in targets}
    nodes = {n.name: n for n in model.graph}
    return [t.name for t in targets if t.op_type in ("MatMul", "Gemm") and (
        t.name in untied_nodes or ((t.out_channels, t.in_features) in sizes and _last(nodes[t.name], names)))]


def _last(node: ir.Node, targets: set[str], limit: int = 10_000) -> bool:
    """``node``'s output reaches a graph output without passing through a node of ``targets``."""
    todo, seen, reached = list(node.outputs), set(), False
    while todo and len(seen) < limit:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        reached = reached or v.is_graph_output()
        for user, _ in v.uses():
            if user.name in targets:
                return False
            todo.extend(user.outputs)
    return reached
