"""Derive table variants of a quantized SmolLM2 cell without quantizing again: the capture never sees the table (the
quantized stream gathers float embeddings), so every other weight is the same whatever --embeddings is; only the
table's Gather changes. float: Gather(float table); 8: the GatherBlockQuantized node and initializers of an
--embeddings 8 cell (RTN of the same float table, identical for every algorithm)."""
import sys

import onnx
from onnx import helper

base, kind, out = sys.argv[1], sys.argv[2], sys.argv[3]
q = onnx.load(base)
nodes = list(q.graph.node)
i, gbq = next((k, n) for k, n in enumerate(nodes) if n.op_type == "GatherBlockQuantized")
drop = set(gbq.input) - {gbq.input[1]}
keep = [t for t in q.graph.initializer if t.name not in drop]
if kind == "float":
    src = onnx.load("/root/.cache/qronos-onnx/smollm2/smollm2.onnx")
    new = [next(t for t in src.graph.initializer if t.name == "m.lm_head.weight")]
    node = helper.make_node("Gather", ["m.lm_head.weight", gbq.input[1]], list(gbq.output), name=gbq.name, axis=0)
else:
    donor = onnx.load(kind)
    node = next(n for n in donor.graph.node if n.op_type == "GatherBlockQuantized")
    new = [t for t in donor.graph.initializer if t.name in set(node.input)]
q.graph.node.remove(gbq)
q.graph.node.insert(i, node)
del q.graph.initializer[:]
q.graph.initializer.extend(keep + new)
onnx.checker.check_model(q)
onnx.save(q, out)
