"""im2col against torch convolutions (explicit pads) and onnxruntime's Conv (ONNX auto_pad semantics)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from qronos_onnx.capture.im2col import conv_pads, unfold
from qronos_onnx.graph.targets import ConvParams

# (spatial input, in channels, out channels, kernel, strides, pads, dilations, group, auto_pad)
CASES = [
    ((9,), 4, 6, (3,), (1,), (1, 1), (1,), 1, "NOTSET"),
    ((10,), 4, 4, (3,), (2,), (2, 0), (2,), 2, "NOTSET"),  # asymmetric, strided, dilated, grouped
    ((11,), 3, 3, (4,), (3,), (0, 0), (1,), 3, "SAME_LOWER"),  # depthwise
    ((8, 8), 1, 4, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, "NOTSET"),  # tiny_models.cnn conv1
    ((8, 8), 4, 8, (3, 3), (2, 2), (1, 0, 1, 0), (1, 1), 2, "NOTSET"),  # cnn conv2_grouped
    ((4, 4), 8, 8, (3, 3), (1, 1), (0, 0, 0, 0), (2, 2), 8, "SAME_UPPER"),  # cnn conv3_depthwise
    ((7, 9), 4, 6, (2, 3), (2, 1), (0, 0, 0, 0), (1, 2), 2, "SAME_UPPER"),
    ((7, 9), 4, 6, (2, 3), (2, 3), (0, 0, 0, 0), (1, 1), 1, "SAME_LOWER"),
    ((7, 6), 2, 4, (3, 2), (1, 2), (0, 0, 0, 0), (1, 1), 1, "VALID"),
    ((5, 6, 7), 4, 4, (3, 2, 3), (1, 2, 2), (1, 0, 2, 1, 1, 0), (1, 1, 2), 2, "NOTSET"),
    ((5, 6, 5), 2, 4, (2, 3, 2), (2, 1, 2), (0,) * 6, (2, 1, 1), 1, "SAME_UPPER"),
]


def _params(case) -> tuple[ConvParams, tuple[int, ...], int, int]:
    spatial, cin, cout, k, s, p, d, g, auto = case
    return ConvParams(k, s, p, d, g, auto), spatial, cin, cout


def _matmul_conv(x: torch.Tensor, w: torch.Tensor, conv: ConvParams) -> torch.Tensor:
    """conv via im2col: [groups, n, N] @ [groups, N, OC/g] -> [B, OC, *out_spatial] (float64)."""
    cols = unfold(x, conv)  # [g, B*L, N]
    g = conv.group
    wm = w.reshape(g, w.shape[0] // g, -1)  # Target.to_matrix layout
    y = torch.bmm(cols, wm.transpose(1, 2))  # [g, B*L, OC/g]
    return y.permute(1, 0, 2).reshape(x.shape[0], -1, w.shape[0])


def _out_spatial(conv: ConvParams, spatial) -> list[int]:
    begins, ends = conv_pads(conv, spatial)
    return [(n + b + e - ((k - 1) * d + 1)) // s + 1
            for n, b, e, k, s, d in zip(spatial, begins, ends, conv.kernel_shape, conv.strides, conv.dilations)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}d-{c[8]}-g{c[7]}-s{c[4]}-d{c[6]}-p{c[5]}")
def test_unfold_matches_torch_and_onnxruntime(case):
    conv, spatial, cin, cout = _params(case)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, cin, *spatial, generator=gen, dtype=torch.float64)
    w = torch.randn(cout, cin // conv.group, *conv.kernel_shape, generator=gen, dtype=torch.float64)
    out = _out_spatial(conv, spatial)
    got = _matmul_conv(x, w, conv).reshape(2, *out, cout).movedim(-1, 1)

    # torch: explicit (possibly asymmetric) pads via F.pad, then an unpadded conv
    begins, ends = conv_pads(conv, spatial)
    pads = [p for i in reversed(range(len(spatial))) for p in (begins[i], ends[i])]
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(spatial)]
    ref = conv_fn(F.pad(x, pads), w, stride=conv.strides, dilation=conv.dilations, groups=conv.group)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)

    # onnxruntime: the ONNX Conv node itself (checks auto_pad / pads semantics independently of conv_pads).
    # onnxruntime refuses SAME_* with dilation > 1 ("Dilation not supported"), so those cases rest on torch and the
    # ONNX spec formula alone.
    if conv.auto_pad.startswith("SAME") and any(d > 1 for d in conv.dilations):
        return
    attrs = dict(kernel_shape=list(conv.kernel_shape), strides=list(conv.strides), dilations=list(conv.dilations),
                 group=conv.group)
    if conv.auto_pad == "NOTSET":
        attrs["pads"] = list(conv.pads)
    else:
        attrs["auto_pad"] = conv.auto_pad
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape)),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x.float().numpy(), "w": w.float().numpy()})[0]
    np.testing.assert_allclose(got.numpy(), y, rtol=1e-4, atol=1e-4)


def test_unfold_column_order_is_channel_major_then_kernel():
    conv = ConvParams((2, 2), (1, 1), (0, 0, 0, 0), (1, 1), 2, "NOTSET")
    x = torch.arange(4 * 2 * 2, dtype=torch.float32).reshape(1, 4, 2, 2)  # one output position
    cols = unfold(x, conv)
    assert cols.shape == (2, 1, 8)
    # group 0 holds channels 0, 1; within a channel the 2x2 window in row-major order
    assert cols[0, 0].tolist() == list(range(0, 8))
    assert cols[1, 0].tolist() == list(range(8, 16))
