"""im2col for ONNX Conv (1-D, 2-D, 3-D): the patches a conv multiplies with its weight, one token per output position.

The column order is channel-major, then kernel offsets in row-major order, the order of
``weight.reshape(OC, C_in / groups * prod(kernel))`` and so of ``Target.to_matrix``. Padding follows ONNX: explicit
``pads`` (begins then ends, possibly asymmetric) or ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ModelError
from ..graph.targets import ConvParams


def conv_pads(conv: ConvParams, spatial: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """(begin, end) padding of every spatial axis for an input of spatial shape ``spatial``."""
    r = conv.spatial_rank
    if conv.auto_pad in ("NOTSET", ""):
        return list(conv.pads[:r]), list(conv.pads[r:2 * r])
    if conv.auto_pad == "VALID":
        return [0] * r, [0] * r
    if conv.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ModelError(f"Conv auto_pad {conv.auto_pad!r} is not supported")
    begins, ends = [], []
    for size, k, s, d in zip(spatial, conv.kernel_shape, conv.strides, conv.dilations):
        out = math.ceil(size / s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if conv.auto_pad == "SAME_UPPER" else big)
        ends.append(big if conv.auto_pad == "SAME_UPPER" else small)
    return begins, ends


def windows(x: torch.Tensor, conv: ConvParams, groups: int | None = None) -> torch.Tensor:
    """``x`` [B, C, *spatial] -> a view ``[B, C, *out_spatial, *kernel]`` of its padded copy (no im2col copy yet).

    ``groups``: how many conv groups ``x`` holds (default ``conv.group``; fewer for a slice of the channels).
    """
    r, g = conv.spatial_rank, conv.group if groups is None else groups
    if x.dim() != r + 2:
        raise ModelError(f"Conv input of rank {x.dim()} does not match a {r}-D kernel {conv.kernel_shape}")
    if x.shape[1] % g:
        raise ModelError(f"Conv input has {x.shape[1]} channels, not divisible by group={g}")
    begins, ends = conv_pads(conv, tuple(x.shape[2:]))
    torch_pads: list[int] = []
    for i in reversed(range(r)):  # F.pad wants the last axis first
        torch_pads += [begins[i], ends[i]]
    if any(torch_pads):
        x = F.pad(x, torch_pads)
    for i, (k, s, d) in enumerate(zip(conv.kernel_shape, conv.strides, conv.dilations)):
        span = (k - 1) * d + 1
        if x.shape[2 + i] < span:
            raise ModelError(f"Conv input is smaller than the dilated kernel ({x.shape[2 + i]} < {span})")
        x = x.unfold(2 + i, span, s)  # [B, C, ..., L_i, ..., window_0, ..., window_i]
    return x[(slice(None),) * (2 + r) + tuple(slice(None, None, d) for d in conv.dilations)]


def unfold(x: torch.Tensor, conv: ConvParams) -> torch.Tensor:
    """``x`` [B, C, *spatial] -> ``[groups, B * prod(out_spatial), C / groups * prod(kernel)]``."""
    r, c = conv.spatial_rank, x.shape[1]
    x = windows(x, conv)
    # [B, C, L..., k...] -> [B, L..., C, k...] -> [B * prod(L), groups, C_g * prod(k)]
    perm = [0, *range(2, 2 + r), 1, *range(2 + r, 2 + 2 * r)]
    x = x.permute(*perm).reshape(-1, conv.group, (c // conv.group) * math.prod(conv.kernel_shape))
    return x.transpose(0, 1)


def unfold_rows(x: torch.Tensor, conv: ConvParams, groups: int | None = None) -> torch.Tensor:
    """``x`` [B, C, *spatial] -> ``[groups, C / groups * prod(kernel), B * prod(out_spatial)]``, contiguous.

    The transpose of ``unfold``: one row per feature, tokens contiguous. The copy then runs along output positions
    (long strided rows, not kernel-sized pieces) and X^T X is an NT product of contiguous rows. ``groups`` overrides
    ``conv.group`` for a slice of the channels (a run of whole groups).
    """
    r, (b, c) = conv.spatial_rank, x.shape[:2]
    g = conv.group if groups is None else groups
    x = windows(x, conv, g)
    out = x.shape[2:2 + r]
    # [B, C, L..., k...] -> [C, k..., B, L...] -> [groups, C_g * prod(k), B * prod(L)]
    perm = [1, *range(2 + r, 2 + 2 * r), 0, *range(2, 2 + r)]
    return x.permute(*perm).reshape(g, (c // g) * math.prod(conv.kernel_shape), b * math.prod(out))
