"""KV-cache decoder graphs for the tests, built without optimum or onnxruntime-genai (neither installs beside this
environment's transformers 5):

- ``gqa_decoder``: a hand-built graph in the onnxruntime-genai builder's shape: com.microsoft GroupQueryAttention with
  rotary inside the op, inputs input_ids, attention_mask [batch, total_sequence_length] and
  past_key_values.N.key/value [batch, kv_heads, past_sequence_length, head_dim], outputs logits and present.N.key/value.
  ``seqlens_k`` / ``total_sequence_length`` are computed from the mask inside the graph as the builder does, or taken
  as graph inputs (``explicit_lengths``). ``gqa_reference`` computes the same model's logits in torch, without a cache.
- ``llama_kv_export``: a tiny random transformers Llama exported by the torch dynamo exporter through a wrapper that
  takes input_ids, attention_mask, position_ids and flat past key/value tensors (optimum's names), builds a
  DynamicCache, and returns logits and flat present tensors (present.N.key/value); plus the same weights exported
  without a cache.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

V, D, H, KV, HD, FFN, LAYERS, MAX_POS = 64, 64, 4, 2, 16, 96, 2, 128


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"emb": rng.standard_normal((V, D)).astype(np.float32), "lm_head": (rng.standard_normal((D, V)) /
                                                                          np.sqrt(D)).astype(np.float32)}
    for i in range(LAYERS):
        for name, shape in (("q", (D, H * HD)), ("k", (D, KV * HD)), ("v", (D, KV * HD)), ("o", (H * HD, D)),
                            ("up", (D, FFN)), ("down", (FFN, D))):
            w[f"l{i}.{name}"] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
    inv = 1.0 / (10000.0 ** (np.arange(0, HD, 2, dtype=np.float64) / HD))
    ang = np.arange(MAX_POS, dtype=np.float64)[:, None] * inv[None, :]
    w["cos_cache"], w["sin_cache"] = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    return w


def gqa_decoder(explicit_lengths: bool = False, extra_input: str | None = None, seed: int = 0) -> onnx.ModelProto:
    w = _weights(seed)
    inits = [numpy_helper.from_array(a, n) for n, a in w.items()]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", V])]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h0"], name="embed")]
    if explicit_lengths:
        inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
                   helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    else:  # as the genai builder: seqlens_k = sum(mask) - 1, total = mask.shape[1]
        inits += [numpy_helper.from_array(np.array([1], np.int64), "one_axis"),
                  numpy_helper.from_array(np.array(1, np.int64), "one")]
        nodes += [helper.make_node("ReduceSum", ["attention_mask", "one_axis"], ["mask_sum"], keepdims=0,
                                   name="mask_sum"),
                  helper.make_node("Sub", ["mask_sum", "one"], ["mask_sub"], name="mask_sub"),
                  helper.make_node("Cast", ["mask_sub"], ["seqlens_k"], to=TensorProto.INT32, name="seqlens"),
                  helper.make_node("Shape", ["attention_mask"], ["mask_shape"], name="mask_shape"),
                  helper.make_node("Gather", ["mask_shape", "one"], ["total64"], axis=0, name="total_gather"),
                  helper.make_node("Cast", ["total64"], ["total_sequence_length"], to=TensorProto.INT32,
                                   name="total")]
    h = "h0"
    for i in range(LAYERS):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        ["batch_size", KV, "past_sequence_length", HD]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         ["batch_size", KV, "total_sequence_length", HD]))
        p = f"/model/layers.{i}"
        nodes += [helper.make_node("MatMul", [h, f"l{i}.q"], [f"{p}/q"], name=f"{p}/attn/q_proj/MatMul"),
                  helper.make_node("MatMul", [h, f"l{i}.k"], [f"{p}/k"], name=f"{p}/attn/k_proj/MatMul"),
                  helper.make_node("MatMul", [h, f"l{i}.v"], [f"{p}/v"], name=f"{p}/attn/v_proj/MatMul"),
                  helper.make_node("GroupQueryAttention",
                                   [f"{p}/q", f"{p}/k", f"{p}/v", f"past_key_values.{i}.key",
                                    f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length",
                                    "cos_cache", "sin_cache"],
                                   [f"{p}/attn", f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft",
                                   num_heads=H, kv_num_heads=KV, do_rotary=1, rotary_interleaved=0,
                                   name=f"{p}/attn/GroupQueryAttention"),
                  helper.make_node("MatMul", [f"{p}/attn", f"l{i}.o"], [f"{p}/o"], name=f"{p}/attn/o_proj/MatMul"),
                  helper.make_node("Add", [h, f"{p}/o"], [f"{p}/h1"], name=f"{p}/attn_add"),
                  helper.make_node("MatMul", [f"{p}/h1", f"l{i}.up"], [f"{p}/up"], name=f"{p}/mlp/up_proj/MatMul"),
                  helper.make_node("Relu", [f"{p}/up"], [f"{p}/act"], name=f"{p}/mlp/act"),
                  helper.make_node("MatMul", [f"{p}/act", f"l{i}.down"], [f"{p}/down"],
                                   name=f"{p}/mlp/down_proj/MatMul"),
                  helper.make_node("Add", [f"{p}/h1", f"{p}/down"], [f"{p}/h2"], name=f"{p}/mlp_add")]
        h = f"{p}/h2"
    if extra_input:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "idx1"))
        inputs.append(helper.make_tensor_value_info(extra_input, TensorProto.FLOAT, ["batch_size", 3]))
        nodes += [helper.make_node("ReduceSum", [extra_input], [f"{extra_input}_sum"], keepdims=1, name="extra_sum"),
                  helper.make_node("Unsqueeze", [f"{extra_input}_sum", "idx1"], [f"{extra_input}_u"],
                                   name="extra_unsq"),
                  helper.make_node("Add", [h, f"{extra_input}_u"], ["h_extra"], name="extra_add")]
        h = "h_extra"
    nodes.append(helper.make_node("MatMul", [h, "lm_head"], ["logits"], name="/lm_head/MatMul"))
    graph = helper.make_graph(nodes, "gqa_decoder", inputs, outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8
    return proto


def gqa_reference(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """The logits of ``gqa_decoder`` for ``ids`` [b, s], computed in torch float64 without a cache."""
    import torch

    w = {k: torch.from_numpy(v).double() for k, v in _weights(seed).items()}
    ids_t = torch.from_numpy(ids)
    b, s = ids.shape
    h = w["emb"][ids_t]
    cos, sin = w["cos_cache"][:s], w["sin_cache"][:s]  # positions 0 .. s-1

    def rope(x):  # x [b, heads, s, HD], halves rotated (rotary_interleaved=0)
        x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(LAYERS):
        q = (h @ w[f"l{i}.q"]).view(b, s, H, HD).transpose(1, 2)
        k = (h @ w[f"l{i}.k"]).view(b, s, KV, HD).transpose(1, 2)
        v = (h @ w[f"l{i}.v"]).view(b, s, KV, HD).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        att = (q @ k.transpose(-1, -2)) / np.sqrt(HD)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(b, s, H * HD)
        h = h + o @ w[f"l{i}.o"]
        h = h + torch.relu(h @ w[f"l{i}.up"]) @ w[f"l{i}.down"]
    return (h @ w["lm_head"]).numpy()


# ------------------------------------------------------------------------------------------- dynamo Llama with a cache

LLAMA_VOCAB, LLAMA_LAYERS, LLAMA_KV, LLAMA_HD = 128, 2, 2, 16


def tiny_llama():
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=LLAMA_VOCAB, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=LLAMA_LAYERS, num_attention_heads=4,
                                   num_key_value_heads=LLAMA_KV, max_position_embeddings=256,
                                   tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def past_names(layers: int) -> tuple[list[str], list[str]]:
    """optimum's names: past_key_values.N.key/value in, present.N.key/value out."""
    return ([f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")],
            [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")])


def kv_wrapper(model):
    """input_ids, attention_mask, position_ids, flat past key/values -> logits, flat present key/values."""
    import torch
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers

    class KVWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.m.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            flat = []
            for layer in out.past_key_values.layers[:layers]:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return KVWrapper().eval()


def export_with_past(model, path, opset: int = 18) -> None:
    """The dynamo export with a cache: dims batch, sequence_length, past_sequence_length, total_sequence_length."""
    import torch

    cfg = model.config
    layers, kv = cfg.num_hidden_layers, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    b, s, p = 2, 8, 3  # a non-empty past while tracing, so that no dim is specialised to 0
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    past = tuple(torch.randn(b, kv, p, hd) for _ in range(2 * layers))
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s)[None].repeat(b, 1)
    B = torch.export.Dim("batch", max=64)
    S = torch.export.Dim("sequence_length", max=2048)
    P = torch.export.Dim("past_sequence_length", max=2048)
    T = torch.export.Dim("total_sequence_length", max=4096)
    ins, outs = past_names(layers)
    torch.onnx.export(kv_wrapper(model), (ids, mask, pos, *past), str(path), dynamo=True,
                      input_names=["input_ids", "attention_mask", "position_ids", *ins],
                      output_names=["logits", *outs], opset_version=opset, external_data=False,
                      dynamic_shapes=({0: B, 1: S}, {0: B, 1: T}, {0: B, 1: S}, tuple({0: B, 2: P} for _ in ins)))


def export_without_past(model, path, opset: int = 18) -> None:
    """The same weights exported as tools/assets.py exports SmolLM2: input_ids -> logits, no cache."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    torch.onnx.export(Logits().eval(), (ids,), str(path), dynamo=True, input_names=["input_ids"],
                      output_names=["logits"], opset_version=opset, external_data=False,
                      dynamic_shapes={"input_ids": {0: torch.export.Dim("batch", max=64),
                                                    1: torch.export.Dim("seq", max=2048)}})
