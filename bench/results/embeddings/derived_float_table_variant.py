"""Derive the 'lm_head W4 RTN, table float' model from the emb8 RTN cell: the capture never sees the table (the
quantized stream gathers float embeddings), so every other weight is identical; only the Gather is put back."""
import onnx
from onnx import helper, numpy_helper
q = onnx.load("/tmp/emb/bench/smollm2-w4-pc-head-emb8-rtn.onnx")
src = onnx.load("/root/.cache/qronos-onnx/smollm2/smollm2.onnx")
table = next(i for i in src.graph.initializer if i.name == "m.lm_head.weight")
nodes = list(q.graph.node)
i, gbq = next((k, n) for k, n in enumerate(nodes) if n.op_type == "GatherBlockQuantized")
gather = helper.make_node("Gather", ["m.lm_head.weight", gbq.input[1]], list(gbq.output), name=gbq.name, axis=0)
q.graph.node.remove(gbq)
q.graph.node.insert(i, gather)
drop = set(gbq.input) - {gbq.input[1]}
keep = [t for t in q.graph.initializer if t.name not in drop]
del q.graph.initializer[:]
q.graph.initializer.extend(keep + [table])
onnx.checker.check_model(q)
onnx.save(q, "/tmp/emb/head-w4-rtn-table-float.onnx")
print("ok")
