"""Waves and segments: cut the graph so that X and X-tilde of every target cost about one forward pass per stream.

depth(node) = max(depth(producers)) + (1 if the node is a target); graph inputs and constants have depth 0.
A target of depth d is rounded in wave d - 1, so targets that share an input (q/k/v, gate/up) land in one wave.
Segment d holds the needed nodes of depth d: they read only tensors of depth <= d, so when segment d runs, every
target it contains (depth d, wave d - 1) has already been rounded. "Needed" means an ancestor of some rounded
target's input; everything else (logits, the last layers' outputs, present key/values) is pruned.

Step d of the capture: run segment d on both streams, then take the statistics of wave d from the tensors alive
after it (the frontier), round wave d, go on with segment d + 1.

A weight shared by several targets is rounded once, at the wave of its earliest consumer, from the statistics of
the consumers in that wave; later consumers ("followers") just compute with it. Target weights are segment
*inputs* (not constants), so one onnxruntime session serves the float stream and the quantized stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from ..errors import ModelError
from .targets import Target


@dataclass
class Segment:
    """One cut of the graph. All fields are tensor / node names of the main graph."""

    index: int
    nodes: list[str]  # in graph (topological) order
    inputs: list[str]  # frontier in: produced by earlier segments, or graph inputs
    outputs: list[str]  # produced here and needed later (by a later segment or by statistics)
    weights: list[str] = field(default_factory=list)  # target weights read here: fed as inputs
    initializers: list[str] = field(default_factory=list)  # other constants read here (kept as constants)
    frontier: list[str] = field(default_factory=list)  # every tensor alive after this segment (frontier out)

    @property
    def empty(self) -> bool:
        return not self.nodes


@dataclass
class Schedule:
    """The plan of a capture run; ``waves[w]`` are the targets whose statistics are taken after ``segments[w]``.

    ``waves[w]`` may be empty (a wave holding only followers of shared weights); ``len(waves) == len(segments)``.
    """

    waves: list[list[Target]]
    segments: list[Segment]
    followers: dict[str, list[Target]]  # weight name -> targets reusing a weight rounded at an earlier wave
    shared_values: set[str]  # tensors that do not depend on any target: identical in both streams
    produced_at: dict[str, int]  # tensor -> segment producing it (-1: graph input)
    last_use: dict[str, int]  # tensor -> last step that reads it (a segment run or a wave's statistics)
    weight_last_use: dict[str, int]  # target weight -> last segment that reads it
    graph_inputs: list[str]  # graph inputs the capture needs, in graph order
    node_count: int  # nodes in the whole graph (a plain forward pass)

    @property
    def round_wave(self) -> dict[str, int]:
        """weight name -> the wave in which it is rounded."""
        return {t.weight_name: w for w, wave in enumerate(self.waves) for t in wave}

    def describe(self) -> str:
        """A readable plan, for debugging and `inspect`."""
        lines = [
            f"{len(self.waves)} waves, {sum(len(w) for w in self.waves)} targets with statistics, "
            f"{sum(len(s.nodes) for s in self.segments)} of {self.node_count} nodes scheduled, "
            f"graph inputs: {', '.join(self.graph_inputs) or '-'}"
        ]
        for seg, wave in zip(self.segments, self.waves):
            nodes = ", ".join(seg.nodes) if len(seg.nodes) <= 6 else (
                f"{', '.join(seg.nodes[:3])}, ... ({len(seg.nodes) - 5} more) ..., {', '.join(seg.nodes[-2:])}")
            lines.append(f"segment {seg.index}: {len(seg.nodes)} nodes [{nodes}]")
            lines.append(f"  in: {', '.join(seg.inputs) or '-'}")
            lines.append(f"  out: {', '.join(seg.outputs) or '-'}; weights: {', '.join(seg.weights) or '-'}")
            lines.append(f"  frontier: {', '.join(seg.frontier) or '-'}")
            lines.append(f"wave {seg.index}: {', '.join(f'{t.name} ({t.weight_name})' for t in wave) or '-'}")
        for weight, targets in self.followers.items():
            lines.append(f"follower(s) of {weight}: {', '.join(t.name for t in targets)}")
        return "\n".join(lines)


def _outer_values(graph: ir.Graph, node: ir.Node) -> list[ir.Value]:
    """Values of ``graph`` read from inside the node's subgraphs (If/Loop/Scan bodies), at any nesting level."""
    out: list[ir.Value] = []
    subgraphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            subgraphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            subgraphs.extend(attr.as_graphs())
    for sub in subgraphs:
        for inner in ir.traversal.RecursiveGraphIterator(sub):
            out.extend(v for v in inner.inputs if v is not None and v.graph is graph)
        out.extend(v for v in sub.outputs if v.graph is graph)
        for inner in ir.traversal.RecursiveGraphIterator(sub):
            for attr in inner.attributes.values():  # outputs of nested subgraphs that name outer values
                graphs = ([attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else
                          attr.as_graphs() if attr.type == ir.AttributeType.GRAPHS else [])
                for g in graphs:
                    out.extend(v for v in g.outputs if v.graph is graph)
    return out


class _GraphIndex:
    """Producers, dependencies and value kinds of the main graph, computed once."""

    def __init__(self, model: ir.Model, weight_names: set[str]):
        self.graph = graph = model.graph
        self.nodes = list(graph)
        self.pos = {node: i for i, node in enumerate(self.nodes)}
        self.weight_names = weight_names
        self.deps: dict[ir.Node, list[ir.Value]] = {}
        for node in self.nodes:
            vals = [v for v in node.inputs if v is not None] + _outer_values(graph, node)
            seen: set[int] = set()
            self.deps[node] = [v for v in vals if not (id(v) in seen or seen.add(id(v)))]
        self.by_name = {node.name: node for node in self.nodes}
        if len(self.by_name) != len(self.nodes):
            raise ModelError("the graph has nodes with duplicate or empty names; call find_targets() first "
                             "(it names every node)")

    def producer(self, value: ir.Value, reader: ir.Node | None = None) -> ir.Node | None:
        """The main-graph node producing ``value`` (None for graph inputs and constants), checking order."""
        if value.is_graph_input() or value.is_initializer():
            return None
        node = value.producer()
        if node is None or node not in self.pos:
            raise ModelError(f"tensor {value.name!r} has no producer in the main graph and is neither a graph "
                             "input nor an initializer")
        if reader is not None and self.pos[node] >= self.pos[reader]:
            raise ModelError(f"the graph is not topologically sorted: node {reader.name!r} reads {value.name!r} "
                             f"before {node.name!r} produces it")
        return node

    def kind(self, value: ir.Value) -> str:
        """'weight' (a target weight, fed as input), 'const' (other initializer), 'input' or 'node'."""
        if value.is_graph_input():
            return "input"
        if value.is_initializer() or (value.const_value is not None and value.producer() is None):
            return "weight" if value.name in self.weight_names else "const"
        return "node"


def build_schedule(model: ir.Model, targets: list[Target]) -> Schedule:
    """Waves and segments for ``targets`` (as returned by find_targets). Reads the model, never changes it."""
    if not targets:
        raise ModelError("nothing to schedule: the model has no quantizable MatMul/Gemm/Conv with a constant weight")
    by_target = {t.name: t for t in targets}
    index = _GraphIndex(model, {t.weight_name for t in targets})
    missing = [name for name in by_target if name not in index.by_name]
    if missing:
        raise ModelError(f"target node(s) {', '.join(missing[:5])} are not in the model's main graph")

    depth = _depths(index, set(by_target))  # longest path counted in targets

    # which targets get statistics at which wave; followers of shared weights reuse an earlier rounding
    natural = {t.name: depth[index.by_name[t.name]] - 1 for t in targets}
    first_wave: dict[str, int] = {}
    for t in targets:
        first_wave[t.weight_name] = min(first_wave.get(t.weight_name, natural[t.name]), natural[t.name])
    stat_targets = [t for t in targets if natural[t.name] == first_wave[t.weight_name]]
    followers: dict[str, list[Target]] = {}
    for t in targets:
        if natural[t.name] != first_wave[t.weight_name]:
            followers.setdefault(t.weight_name, []).append(t)
    n_waves = max(natural[t.name] for t in stat_targets) + 1
    waves: list[list[Target]] = [[] for _ in range(n_waves)]
    for t in stat_targets:
        waves[natural[t.name]].append(t)

    # prune: only ancestors of the inputs of targets with statistics are run
    values_by_name: dict[str, ir.Value] = {}
    needed: set[ir.Node] = set()
    stack: list[ir.Value] = []
    for t in stat_targets:
        node = index.by_name[t.name]
        x = node.inputs[0]
        assert x is not None and x.name == t.input_name
        if index.kind(x) in ("weight", "const"):
            raise ModelError(f"target {t.name!r} reads the constant {x.name!r} as its activation input; "
                             "exclude it (--exclude) or fold it before quantizing")
        stack.append(x)
    while stack:
        v = stack.pop()
        values_by_name[v.name] = v
        p = index.producer(v)
        if p is not None and p not in needed:
            needed.add(p)
            stack.extend(index.deps[p])

    # when each tensor is produced and when it is last read
    produced_at: dict[str, int] = {}
    uses: dict[str, list[int]] = {}
    seg_nodes: list[list[ir.Node]] = [[] for _ in range(n_waves)]
    for node in index.nodes:
        if node in needed:
            seg_nodes[depth[node]].append(node)
            for out in node.outputs:
                produced_at[out.name] = depth[node]
    graph_inputs: list[str] = []
    for node in index.nodes:
        if node not in needed:
            continue
        for v in index.deps[node]:
            kind = index.kind(v)
            if kind == "input" and v.name not in produced_at:
                produced_at[v.name] = -1
                graph_inputs.append(v.name)
            if kind in ("input", "node") and produced_at[v.name] < depth[node]:
                uses.setdefault(v.name, []).append(depth[node])
    for w, wave in enumerate(waves):
        for t in wave:
            v = values_by_name[t.input_name]
            if index.kind(v) == "input" and v.name not in produced_at:
                produced_at[v.name] = -1
                graph_inputs.append(v.name)
            uses.setdefault(t.input_name, []).append(w)
    order = {v.name: i for i, v in enumerate(index.graph.inputs)}
    graph_inputs.sort(key=lambda n: order.get(n, len(order)))
    last_use = {name: max(steps) for name, steps in uses.items()}

    shared = {name for name, p in produced_at.items() if p <= 0}
    segments: list[Segment] = []
    weight_last_use: dict[str, int] = {}
    for d, nodes in enumerate(seg_nodes):
        inputs: list[str] = []
        weights: list[str] = []
        consts: list[str] = []
        for node in nodes:
            for v in index.deps[node]:
                kind = index.kind(v)
                bucket = {"weight": weights, "const": consts}.get(kind, inputs)
                if kind in ("input", "node") and produced_at[v.name] >= d:
                    continue  # produced inside this segment
                if v.name not in bucket:
                    bucket.append(v.name)
                if kind == "weight":
                    weight_last_use[v.name] = max(weight_last_use.get(v.name, -1), d)
        outputs = [out.name for node in nodes for out in node.outputs
                   if out.name in last_use and last_use[out.name] >= d and
                   (last_use[out.name] > d or any(t.input_name == out.name for t in waves[d]))]
        frontier = sorted((n for n, p in produced_at.items() if p <= d and n in last_use and last_use[n] >= d
                           and (last_use[n] > d or any(t.input_name == n for t in waves[d]))),
                          key=lambda n: (produced_at[n], n))
        segments.append(Segment(d, [n.name for n in nodes], inputs, outputs, weights, consts, frontier))
    return Schedule(waves, segments, followers, shared, produced_at, last_use, weight_last_use, graph_inputs,
                    len(index.nodes))


def closure_segment(model: ir.Model, outputs: list[str], weight_names: set[str] | list[str]) -> Segment:
    """One segment computing ``outputs`` from the graph inputs (every ancestor), ``weight_names`` fed as inputs.

    The naive prefix re-run of the benchmark and some test references use it.
    """
    index = _GraphIndex(model, set(weight_names))
    values = {v.name: v for v in index.graph.inputs}
    for node in index.nodes:
        for v in index.deps[node]:
            values.setdefault(v.name, v)
        for v in node.outputs:
            values[v.name] = v
    needed: set[ir.Node] = set()
    stack = []
    for name in outputs:
        if name not in values:
            raise ModelError(f"tensor {name!r} is not in the model's main graph")
        stack.append(values[name])
    while stack:
        v = stack.pop()
        p = index.producer(v)
        if p is not None and p not in needed:
            needed.add(p)
            stack.extend(index.deps[p])
    nodes = [n for n in index.nodes if n in needed]
    inputs, weights, consts = [], [], []
    for node in nodes:
        for v in index.deps[node]:
            kind = index.kind(v)
            bucket = {"weight": weights, "const": consts, "input": inputs}.get(kind)
            if bucket is not None and v.name not in bucket:
                bucket.append(v.name)
    for name in outputs:  # a requested graph input passes straight through
        if index.kind(values[name]) == "input" and name not in inputs:
            inputs.append(name)
    return Segment(0, [n.name for n in nodes], inputs, list(outputs), weights, consts, list(outputs))


def target_depths(model: ir.Model, targets: list[Target]) -> dict[str, int]:
    """Node name -> depth (the longest path from the inputs counted in targets; a target counts itself), for every
    node of the main graph. Nodes of depth < d never depend on a target of depth >= d."""
    index = _GraphIndex(model, {t.weight_name for t in targets})
    return {node.name: d for node, d in _depths(index, {t.name for t in targets}).items()}


def _depths(index: _GraphIndex, target_names: set[str]) -> dict[ir.Node, int]:
    depth: dict[ir.Node, int] = {}
    for node in index.nodes:
        d = 0
        for v in index.deps[node]:
            p = index.producer(v, node)
            if p is not None:
                d = max(d, depth[p])
        depth[node] = d + (1 if node.name in target_names else 0)
    return depth


def suffix_segment(model: ir.Model, depths: dict[str, int], start: int, weight_names: set[str],
                   outputs: list[str]) -> Segment:
    """Every node of depth >= ``start``, computing those of ``outputs`` they produce: what changes when a target of
    depth >= ``start`` changes. Its inputs are the graph inputs it reads and the tensors earlier nodes produce
    (taken from a run of the whole graph); ``outputs`` produced earlier are not in ``Segment.outputs``."""
    index = _GraphIndex(model, weight_names)
    nodes = [n for n in index.nodes if depths[n.name] >= start]
    inside = set(nodes)
    inputs, weights, consts = [], [], []
    for node in nodes:
        for v in index.deps[node]:
            kind = index.kind(v)
            if kind == "node" and index.producer(v) in inside:
                continue
            bucket = {"weight": weights, "const": consts}.get(kind, inputs)
            if v.name not in bucket:
                bucket.append(v.name)
    produced = {v.name for n in nodes for v in n.outputs}
    outs = [name for name in outputs if name in produced]
    return Segment(-1 - start, [n.name for n in nodes], inputs, outs, weights, consts, outs)
