"""A Llama-shaped decoder ONNX with random weights in external data, written tensor by tensor.

Why not a torch export: the exporter holds the whole model in memory (twice, while it serializes) and takes minutes
for a billion parameters; this builder writes each weight to the ``.data`` file as it is drawn and keeps only the
graph (a few hundred KB) in memory, so it can write a 16 GB model on a machine with less RAM than that.

The graph: token embedding (Gather), per layer RMSNorm spelled out (Mul, ReduceMean, Add, Sqrt, Reciprocal, Mul,
Mul), q/k/v/o MatMuls with grouped-query attention (k and v expanded to the query heads), a causal mask built from
the sequence length, softmax attention, SwiGLU MLP (gate, up, down), the final norm and an untied lm_head MatMul.
No rotary embedding: it has no weights, and the memory and time of quantization are in the weights. Input
``input_ids`` int64 [batch, seq]; output ``logits`` [batch, seq, vocab] in the weight dtype.

    .venv/bin/python bench/synth_llama.py /tmp/llama.onnx --hidden 2048 --layers 22 --ffn 5632 --vocab 32000
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096  # data offsets on page boundaries, so that readers can memory-map each tensor


@dataclass(frozen=True)
class Shape:
    """Sizes of the decoder; the defaults are TinyLlama-1.1B's."""

    hidden: int = 2048
    layers: int = 22
    ffn: int = 5632
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 4
    dtype: str = "float32"  # or float16

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def n_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.ffn + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h

    def n_bytes(self) -> int:
        return self.n_params() * np.dtype(self.dtype).itemsize


# presets named after the models whose shapes they copy (random weights)
PRESETS = {
    "tinyllama-1.1b": Shape(),
    "llama3-8b": Shape(hidden=4096, layers=32, ffn=14336, vocab=128256, heads=32, kv_heads=8, dtype="float16"),
}


class _Writer:
    """Appends tensors to the external data file and returns their TensorProtos (metadata only, no bytes)."""

    def __init__(self, data_path: Path, dtype: np.dtype, seed: int):
        self.f = open(data_path, "wb")
        self.location = data_path.name
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.offset = 0

    def close(self) -> None:
        self.f.close()

    def tensor(self, name: str, arr: np.ndarray) -> TensorProto:
        pad = -self.offset % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        buf = np.ascontiguousarray(arr).tobytes()
        self.f.write(buf)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(self.offset)), ("length", str(len(buf)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += len(buf)
        return t

    def random(self, name: str, shape: tuple[int, ...], std: float) -> TensorProto:
        """Normal(0, std) drawn in row blocks of ~64 MB, so that no weight is held whole in float32 twice."""
        rows = max(1, (64 << 20) // (4 * math.prod(shape[1:]) or 1))
        pad = -self.offset % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for r0 in range(0, shape[0], rows):
            block = self.rng.standard_normal((min(rows, shape[0] - r0), *shape[1:]), dtype=np.float32)
            block *= std
            buf = block.astype(self.dtype).tobytes()
            self.f.write(buf)
            self.offset += len(buf)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(self.dtype)
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(start)), ("length", str(self.offset - start))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t


def build(path: str | Path, shape: Shape = Shape(), seed: int = 0) -> Path:
    """Write ``path`` and ``path.data``; returns ``path``. Memory: one 64 MB block of weights at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    dt = np.dtype(shape.dtype)
    elem = helper.np_dtype_to_tensor_dtype(dt)
    w = _Writer(data, dt, seed)
    h, nh, nkv, hd = shape.hidden, shape.heads, shape.kv_heads, shape.head_dim
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(onnx.numpy_helper.from_array(arr, name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out.replace("_out", ""), **attrs))
        return out

    try:
        inits.append(w.random("embed_tokens.weight", (shape.vocab, h), 1.0))
        axes = const("axes_last", np.array([-1], np.int64))
        eps = const("rms_eps", np.array(1e-5, dt))
        scale = const("attn_scale", np.array(1.0 / math.sqrt(hd), dt))
        neg = const("mask_fill", np.array([-1e4 if dt == np.float16 else -1e9], dt))
        heads_q = const("shape_q", np.array([0, 0, nh, hd], np.int64))
        heads_kv = const("shape_kv", np.array([0, 0, nkv, 1, hd], np.int64))
        rep = const("kv_repeat", np.array([1, 1, 1, nh // nkv, 1], np.int64))
        merge = const("shape_merge", np.array([0, 0, h], np.int64))
        one = const("one_i64", np.array([1], np.int64))

        x = node("Gather", ["embed_tokens.weight", "input_ids"], "embed_out")
        # causal mask [S, S]: mask_fill above the diagonal, 0 elsewhere
        shp = node("Shape", ["input_ids"], "ids_shape_out")
        s = node("Slice", [shp, one, const("two_i64", np.array([2], np.int64))], "seq_len_out")
        ss = node("Concat", [s, s], "mask_shape_out", axis=0)
        full = node("Expand", [neg, ss], "mask_full_out")
        mask = node("Trilu", [full, one], "causal_mask_out", upper=1)

        def rms(inp: str, prefix: str) -> str:
            g = w.tensor(f"{prefix}.weight", np.ones(h, dt))
            inits.append(g)
            sq = node("Mul", [inp, inp], f"{prefix}/sq_out")
            ms = node("ReduceMean", [sq, axes], f"{prefix}/mean_out", keepdims=1)
            ad = node("Add", [ms, eps], f"{prefix}/add_out")
            rt = node("Sqrt", [ad], f"{prefix}/sqrt_out")
            rc = node("Reciprocal", [rt], f"{prefix}/rcp_out")
            nx = node("Mul", [inp, rc], f"{prefix}/norm_out")
            return node("Mul", [nx, g.name], f"{prefix}/scale_out")

        def linear(inp: str, name: str, n_in: int, n_out: int) -> str:
            wt = w.random(f"{name}.weight", (n_in, n_out), 1.0 / math.sqrt(n_in))
            inits.append(wt)
            return node("MatMul", [inp, wt.name], f"{name}/MatMul_out")

        for i in range(shape.layers):
            p = f"model.layers.{i}"
            xn = rms(x, f"{p}.input_layernorm")
            q = linear(xn, f"{p}.self_attn.q_proj", h, h)
            k = linear(xn, f"{p}.self_attn.k_proj", h, nkv * hd)
            v = linear(xn, f"{p}.self_attn.v_proj", h, nkv * hd)
            q4 = node("Transpose", [node("Reshape", [q, heads_q], f"{p}/q4_out")], f"{p}/qt_out", perm=[0, 2, 1, 3])

            def expand(t: str, tag: str) -> str:
                t5 = node("Reshape", [t, heads_kv], f"{p}/{tag}5_out")
                te = node("Expand", [t5, rep], f"{p}/{tag}e_out")
                return node("Reshape", [te, heads_q], f"{p}/{tag}4_out")

            kt = node("Transpose", [expand(k, "k")], f"{p}/kt_out", perm=[0, 2, 3, 1])
            vt = node("Transpose", [expand(v, "v")], f"{p}/vt_out", perm=[0, 2, 1, 3])
            sc = node("Mul", [node("MatMul", [q4, kt], f"{p}/qk_out"), scale], f"{p}/scaled_out")
            pr = node("Softmax", [node("Add", [sc, mask], f"{p}/masked_out")], f"{p}/probs_out", axis=-1)
            at = node("Transpose", [node("MatMul", [pr, vt], f"{p}/pv_out")], f"{p}/at_out", perm=[0, 2, 1, 3])
            am = node("Reshape", [at, merge], f"{p}/attn_merged_out")
            x = node("Add", [x, linear(am, f"{p}.self_attn.o_proj", h, h)], f"{p}/res1_out")
            xn = rms(x, f"{p}.post_attention_layernorm")
            gate = linear(xn, f"{p}.mlp.gate_proj", h, shape.ffn)
            up = linear(xn, f"{p}.mlp.up_proj", h, shape.ffn)
            act = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/sig_out")], f"{p}/silu_out")
            hmid = node("Mul", [act, up], f"{p}/swiglu_out")
            x = node("Add", [x, linear(hmid, f"{p}.mlp.down_proj", shape.ffn, h)], f"{p}/res2_out")
        xn = rms(x, "model.norm")
        logits = linear(xn, "lm_head", h, shape.vocab)
        nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_identity"))
    finally:
        w.close()
    graph = helper.make_graph(
        nodes, "synthetic_llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", elem, ["batch", "seq", shape.vocab])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="synth_llama")
    model.ir_version = 8
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--preset", choices=sorted(PRESETS))
    for f in ("hidden", "layers", "ffn", "vocab", "heads", "kv_heads"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int)
    ap.add_argument("--dtype", choices=["float32", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    base = PRESETS[args.preset] if args.preset else Shape()
    over = {f: getattr(args, f) for f in ("hidden", "layers", "ffn", "vocab", "heads", "kv_heads", "dtype")
            if getattr(args, f) is not None}
    shape = Shape(**{**base.__dict__, **over})
    out = build(args.output, shape, args.seed)
    print(f"{out}: {shape.n_params() / 1e9:.3f} B parameters, {shape.n_bytes() / 1e9:.2f} GB {shape.dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
