"""Tiny ONNX models built with onnx.helper, shared by the tests: deterministic, milliseconds to build and run."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qronos-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def transformer(n_blocks: int = 3, d: int = 32, ffn: int = 64, vocab: int = 50, seed: int = 0,
                dtype=np.float32) -> onnx.ModelProto:
    """Decoder-like stack: embeddings in, q/k/v share an input, an additive mask read by every block, logits out.

    Inputs: ``x`` [B, S, d] float and ``mask`` [S, S] float (additive). Output: ``logits`` [B, S, vocab].
    """
    rng = np.random.default_rng(seed)
    tdt = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    nodes, inits = [], []

    def w(name, shape, scale=None):
        scale = scale or 1.0 / np.sqrt(shape[0])
        inits.append(_init(name, (rng.standard_normal(shape) * scale).astype(dtype)))
        return name

    inits.append(_init("inv_sqrt_d", np.array(1.0 / np.sqrt(d), dtype)))
    h = "x"
    for b in range(n_blocks):
        p = f"b{b}_"
        nodes += [
            helper.make_node("MatMul", [h, w(p + "wq", (d, d))], [p + "q"], name=p + "q_proj"),
            helper.make_node("MatMul", [h, w(p + "wk", (d, d))], [p + "k"], name=p + "k_proj"),
            helper.make_node("MatMul", [h, w(p + "wv", (d, d))], [p + "v"], name=p + "v_proj"),
            helper.make_node("Transpose", [p + "k"], [p + "kt"], perm=[0, 2, 1], name=p + "kt"),
            helper.make_node("MatMul", [p + "q", p + "kt"], [p + "s0"], name=p + "scores"),
            helper.make_node("Mul", [p + "s0", "inv_sqrt_d"], [p + "s1"], name=p + "scale"),
            helper.make_node("Add", [p + "s1", "mask"], [p + "s2"], name=p + "mask_add"),
            helper.make_node("Softmax", [p + "s2"], [p + "a"], axis=-1, name=p + "softmax"),
            helper.make_node("MatMul", [p + "a", p + "v"], [p + "ctx"], name=p + "attn"),
            helper.make_node("MatMul", [p + "ctx", w(p + "wo", (d, d))], [p + "o"], name=p + "o_proj"),
            helper.make_node("Add", [h, p + "o"], [p + "h1"], name=p + "res1"),
            helper.make_node("MatMul", [p + "h1", w(p + "wg", (d, ffn))], [p + "g"], name=p + "gate_proj"),
            helper.make_node("MatMul", [p + "h1", w(p + "wu", (d, ffn))], [p + "u"], name=p + "up_proj"),
            helper.make_node("Sigmoid", [p + "g"], [p + "gs"], name=p + "sig"),
            helper.make_node("Mul", [p + "g", p + "gs"], [p + "silu"], name=p + "silu"),
            helper.make_node("Mul", [p + "silu", p + "u"], [p + "gu"], name=p + "glu"),
            helper.make_node("MatMul", [p + "gu", w(p + "wd", (ffn, d))], [p + "dn"], name=p + "down_proj"),
            helper.make_node("Add", [p + "h1", p + "dn"], [p + "out"], name=p + "res2"),
        ]
        h = p + "out"
    nodes.append(helper.make_node("MatMul", [h, w("lm_head_w", (d, vocab))], ["logits"], name="lm_head"))
    inputs = [helper.make_tensor_value_info("x", tdt, ["batch", "seq", d]),
              helper.make_tensor_value_info("mask", tdt, ["seq", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", tdt, ["batch", "seq", vocab])]
    return _model(nodes, inputs, outputs, inits)


def transformer_inputs(n: int = 4, seq: int = 8, d: int = 32, seed: int = 1, dtype=np.float32) -> list[dict]:
    rng = np.random.default_rng(seed)
    mask = np.triu(np.full((seq, seq), -1e4, dtype), k=1).astype(dtype)
    return [{"x": rng.standard_normal((1, seq, d)).astype(dtype), "mask": mask} for _ in range(n)]


def cnn(seed: int = 0) -> onnx.ModelProto:
    """SAME_UPPER conv, grouped strided conv with asymmetric pads, dilated depthwise conv, Gemm transB=1, Gemm."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [
        _init("c1_w", (rng.standard_normal((4, 1, 3, 3)) / 3).astype(f)), _init("c1_b", np.zeros(4, f)),
        _init("c2_w", (rng.standard_normal((8, 2, 3, 3)) / 4).astype(f)),
        _init("c3_w", (rng.standard_normal((8, 1, 3, 3)) / 3).astype(f)), _init("c3_b", rng.standard_normal(8).astype(f)),
        _init("fc1_w", (rng.standard_normal((16, 8 * 4 * 4)) / 11).astype(f)), _init("fc1_b", np.zeros(16, f)),
        _init("fc2_w", (rng.standard_normal((16, 10)) / 4).astype(f)), _init("fc2_b", np.zeros(10, f)),
    ]
    nodes = [
        helper.make_node("Conv", ["img", "c1_w", "c1_b"], ["c1"], auto_pad="SAME_UPPER", name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2_w"], ["c2"], group=2, strides=[2, 2], pads=[1, 1, 0, 0], name="conv2_grouped"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "c3_w", "c3_b"], ["c3"], group=8, dilations=[2, 2], pads=[2, 2, 2, 2],
                         name="conv3_depthwise"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("Flatten", ["r3"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1_w", "fc1_b"], ["fc1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["fc1"], ["r4"], name="relu4"),
        helper.make_node("Gemm", ["r4", "fc2_w", "fc2_b"], ["logits"], name="fc2"),
    ]
    inputs = [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 1, 8, 8])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])]
    return _model(nodes, inputs, outputs, inits)


def cnn_inputs(n: int = 4, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"img": rng.standard_normal((2, 1, 8, 8)).astype(np.float32)} for _ in range(n)]


def residual_mlp(d: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul -> Relu -> MatMul -> + x -> MatMul (shared weight with the first layer) -> y."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [_init("w_shared", (rng.standard_normal((d, d)) / 4).astype(f)),
             _init("w2", (rng.standard_normal((d, d)) / 4).astype(f))]
    nodes = [
        helper.make_node("MatMul", ["x", "w_shared"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["x", "h2"], ["h3"], name="res"),
        helper.make_node("MatMul", ["h3", "w_shared"], ["y"], name="fc3_shared"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])]
    return _model(nodes, inputs, outputs, inits)


def mlp_inputs(n: int = 4, d: int = 16, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, d)).astype(np.float32)} for _ in range(n)]


def token_decoder(tied: bool, vocab: int = 96, d: int = 64, ffn: int = 80, n_blocks: int = 2, seed: int = 0,
                  dtype=np.float32) -> onnx.ModelProto:
    """input_ids -> Gather(embedding) -> residual MLP blocks -> lm_head -> logits. ``tied``: the head reads the
    embedding table through Transpose(perm=[1, 0]) (how the torch exporters write a tied SmolLM2 head)."""
    rng = np.random.default_rng(seed)
    tdt = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    inits = [_init("embed_tokens", rng.standard_normal((vocab, d)).astype(dtype))]
    nodes = [helper.make_node("Gather", ["embed_tokens", "input_ids"], ["h0"], name="embed")]
    h = "h0"
    for b in range(n_blocks):
        p = f"b{b}_"
        inits += [_init(p + "wu", (rng.standard_normal((d, ffn)) / np.sqrt(d)).astype(dtype)),
                  _init(p + "wd", (rng.standard_normal((ffn, d)) / np.sqrt(ffn)).astype(dtype))]
        nodes += [helper.make_node("MatMul", [h, p + "wu"], [p + "u"], name=p + "up_proj"),
                  helper.make_node("Relu", [p + "u"], [p + "r"], name=p + "act"),
                  helper.make_node("MatMul", [p + "r", p + "wd"], [p + "dn"], name=p + "down_proj"),
                  helper.make_node("Add", [h, p + "dn"], [p + "out"], name=p + "res")]
        h = p + "out"
    if tied:
        nodes += [helper.make_node("Transpose", ["embed_tokens"], ["embed_tokens_t"], perm=[1, 0], name="tie"),
                  helper.make_node("MatMul", [h, "embed_tokens_t"], ["logits"], name="lm_head")]
    else:
        inits.append(_init("lm_head_w", (rng.standard_normal((d, vocab)) / np.sqrt(d)).astype(dtype)))
        nodes.append(helper.make_node("MatMul", [h, "lm_head_w"], ["logits"], name="lm_head"))
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", tdt, ["batch", "seq", vocab])]
    return _model(nodes, inputs, outputs, inits)


def token_inputs(n: int = 6, seq: int = 16, vocab: int = 96, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, vocab, (1, seq)).astype(np.int64)} for _ in range(n)]


def tall_cnn(c: int = 32, hw: int = 32, seed: int = 0) -> onnx.ModelProto:
    """3 -> c conv, c -> c strided conv, c -> c 1x1 conv, global average pool, Gemm: tall im2col matrices (hw² rows per
    image), the shape whose torch GEMMs (X^T X over many rows) give other bits on one thread than on two."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [
        _init("c1_w", (rng.standard_normal((c, 3, 3, 3)) / 5).astype(f)), _init("c1_b", np.zeros(c, f)),
        _init("c2_w", (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(f)),
        _init("c3_w", (rng.standard_normal((c, c, 1, 1)) / np.sqrt(c)).astype(f)),
        _init("c3_b", (rng.standard_normal(c) / 10).astype(f)),
        _init("fc_w", (rng.standard_normal((10, c)) / np.sqrt(c)).astype(f)), _init("fc_b", np.zeros(10, f)),
    ]
    nodes = [
        helper.make_node("Conv", ["img", "c1_w", "c1_b"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2_w"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "c3_w", "c3_b"], ["c3"], name="conv3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
    ]
    inputs = [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 3, hw, hw])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])]
    return _model(nodes, inputs, outputs, inits)


def tall_cnn_inputs(n: int = 4, hw: int = 32, batch: int = 4, seed: int = 1) -> list[dict]:
    """Smooth images (noise summed along both axes, like natural images' neighbouring pixels): nearly collinear
    im2col columns, an ill-conditioned X^T X whose last bits the solvers amplify."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = rng.standard_normal((batch, 3, hw, hw)).cumsum(axis=2).cumsum(axis=3) / hw
        out.append({"img": (img + 0.01 * rng.standard_normal(img.shape)).astype(np.float32)})
    return out
