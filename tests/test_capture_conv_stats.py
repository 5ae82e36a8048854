"""Conv statistics from im2col pieces (StatsAccumulator.add with ``conv``) against a float64 naive reference.

The reference builds every patch of the batch in float64 (im2col.unfold, itself checked against torch and
onnxruntime convolutions in test_capture_im2col.py) and multiplies the whole matrices; the pieces must give the
same sums up to float32 round-off, whatever the stride, padding, dilation, groups and kernel size, and however
the batch is cut into pieces.
"""
from __future__ import annotations

import math

import pytest
import torch

from qronos_onnx.capture import stats
from qronos_onnx.capture.im2col import unfold, unfold_rows
from qronos_onnx.capture.stats import StatsAccumulator, finalize, pieces
from qronos_onnx.graph.targets import ConvParams

# (spatial, channels, kernel, strides, pads, dilations, group, auto_pad)
CASES = [
    ((9, 9), 4, (1, 1), (1, 1), (0,) * 4, (1, 1), 1, "NOTSET"),  # pointwise
    ((9, 8), 3, (3, 3), (1, 1), (1,) * 4, (1, 1), 1, "NOTSET"),  # stem-like 3x3, padded
    ((11, 11), 3, (3, 3), (2, 2), (1,) * 4, (1, 1), 1, "NOTSET"),  # strided
    ((10, 9), 6, (3, 3), (1, 1), (1,) * 4, (1, 1), 6, "NOTSET"),  # depthwise 3x3
    ((11, 10), 6, (3, 3), (2, 2), (0, 1, 1, 0), (1, 1), 6, "NOTSET"),  # depthwise, strided, asymmetric pads
    ((12, 12), 5, (5, 5), (1, 1), (2,) * 4, (1, 1), 5, "NOTSET"),  # depthwise 5x5
    ((13, 12), 4, (5, 5), (2, 2), (2,) * 4, (1, 1), 4, "NOTSET"),  # depthwise 5x5 strided
    ((12, 11), 4, (3, 3), (1, 1), (2,) * 4, (2, 2), 4, "NOTSET"),  # depthwise dilated
    ((10, 10), 8, (3, 3), (2, 1), (0,) * 4, (2, 1), 2, "SAME_UPPER"),  # grouped, mixed strides and dilations
    ((9, 10), 4, (5, 3), (1, 2), (0,) * 4, (1, 1), 1, "SAME_LOWER"),
    ((15,), 4, (3,), (2,), (1, 0), (2,), 4, "NOTSET"),  # 1-D depthwise
    ((5, 6, 5), 4, (3, 1, 3), (1, 2, 1), (1, 0, 1, 1, 0, 1), (1, 1, 1), 2, "NOTSET"),  # 3-D grouped
]


def _conv(case) -> tuple[ConvParams, tuple[int, ...], int]:
    spatial, c, k, s, p, d, g, auto = case
    return ConvParams(k, s, p, d, g, auto), spatial, c


def _reference(xq: torch.Tensor, xf: torch.Tensor, conv: ConvParams) -> list[torch.Tensor]:
    """[H, G, F] sums (not divided) from the whole batch's float64 patches."""
    tq, tf = unfold(xq.double(), conv), unfold(xf.double(), conv)
    return [tq.mT @ tq, tq.mT @ tf, tf.mT @ tf]


def _inputs(case, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, ConvParams]:
    conv, spatial, c = _conv(case)
    gen = torch.Generator().manual_seed(seed)
    xf = torch.randn(batch, c, *spatial, generator=gen) + 0.5  # a mean, as after an activation: large diagonals
    xq = xf + 0.05 * torch.randn(xf.shape, generator=gen)
    return xq, xf, conv


def _check(acc: StatsAccumulator, ref: list[torch.Tensor]) -> None:
    for got, want in zip((acc.H, acc.G, acc.F), ref):
        assert got.dtype == torch.float32 and got.shape == want.shape
        scale = want.abs().amax()
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=2e-6)


@pytest.mark.parametrize("pieces_of", [None, 7, 64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}d-k{c[2]}-s{c[3]}-d{c[5]}-g{c[6]}-{c[7]}")
def test_conv_stats_match_the_float64_reference(case, pieces_of, monkeypatch):
    """Whole batch in one piece (None), or cut across images and groups (a few elements per piece)."""
    if pieces_of is not None:
        monkeypatch.setattr(stats, "PIECE_ELEMENTS", pieces_of)
    xq, xf, conv = _inputs(case)
    n_features = (xq.shape[1] // conv.group) * math.prod(conv.kernel_shape)
    acc = StatsAccumulator(conv.group, n_features)
    ref = [torch.zeros(conv.group, n_features, n_features, dtype=torch.float64) for _ in range(3)]
    for batch in range(2):  # two calls: partials folded in order
        xq, xf, _ = _inputs(case, seed=batch)
        acc.add(xq, xf, conv=conv)
        ref = [r + p for r, p in zip(ref, _reference(xq, xf, conv))]
    _check(acc, ref)
    assert acc.n == 2 * unfold(xq, conv).shape[1]


@pytest.mark.parametrize("case", CASES[3:6], ids=lambda c: f"k{c[2]}-s{c[3]}-g{c[6]}")
def test_same_input_and_held_partials(case, monkeypatch):
    """``same`` gives one Gram for H, G and F; ``hold`` keeps one partial per call, equal to the folded sums."""
    monkeypatch.setattr(stats, "PIECE_ELEMENTS", 50)
    xq, xf, conv = _inputs(case)
    n_features = (xq.shape[1] // conv.group) * math.prod(conv.kernel_shape)
    same = StatsAccumulator(conv.group, n_features)
    same.add(xf, xf, same=True, conv=conv)
    _check(same, [_reference(xf, xf, conv)[2]] * 3)
    held, folded = StatsAccumulator(conv.group, n_features, hold=True), StatsAccumulator(conv.group, n_features)
    held.add(xq, xf, conv=conv)
    folded.add(xq, xf, conv=conv)
    assert len(held.held) == 1 and held.n == folded.n
    for part, total in zip(held.held[0], (folded.H, folded.G, folded.F)):
        assert torch.equal(part, total)


def test_pieces_and_token_rows_agree_with_the_token_path():
    """The piecewise sums equal the whole-batch token path (``tokens`` + ``add``) up to float32 round-off."""
    xq, xf, conv = _inputs(CASES[6], batch=4)
    n_features = (xq.shape[1] // conv.group) * math.prod(conv.kernel_shape)
    rows = unfold_rows(xq, conv)
    assert torch.equal(rows, unfold(xq, conv).mT)  # the same patches, transposed
    a, b = StatsAccumulator(conv.group, n_features), StatsAccumulator(conv.group, n_features)
    a.add(xq, xf, conv=conv)
    b.add(unfold(xq, conv), unfold(xf, conv))
    sa, sb = finalize([a]), finalize([b])
    assert sa.n_tokens == sb.n_tokens
    for m in ("H", "G", "F"):
        torch.testing.assert_close(getattr(sa, m), getattr(sb, m), rtol=1e-5, atol=1e-5)


def test_pieces_split_groups_before_images(monkeypatch):
    """Pieces cover every (image, group) once; images are packed only when whole images fit."""
    x = torch.zeros(5, 6, 8, 8)
    conv = ConvParams((3, 3), (1, 1), (1,) * 4, (1, 1), 6, "NOTSET")  # 9 * 64 = 576 elements per image and group
    for budget, want in ((10_000, [(slice(0, 2), slice(0, 6)), (slice(2, 4), slice(0, 6)), (slice(4, 5), slice(0, 6))]),
                         (1200, [(slice(i, i + 1), slice(j, min(j + 2, 6))) for i in range(5) for j in (0, 2, 4)])):
        monkeypatch.setattr(stats, "PIECE_ELEMENTS", budget)
        assert pieces(x, conv) == want
