"""LayerStats: the second moments a rounding algorithm needs, accumulated batch by batch, never storing X.

H = X~^T X~ / n, G = X~^T X / n (rows indexed by quantized features), F = X^T X / n, one matrix per conv group.
All three are sums over tokens divided once, at the end, by the same token count n (one normalization).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ModelError
from ..graph.targets import ConvParams, Target
from ..threads import threads_for, torch_threads
from .im2col import conv_pads, unfold, unfold_rows

# im2col elements per stream and piece (2 MiB of float32): a piece's patches stay in cache between their copy and
# their product. A constant, so the pieces, and so the bits of the sums, do not depend on the machine.
PIECE_ELEMENTS = 1 << 19


@dataclass
class LayerStats:
    H: torch.Tensor  # [groups, N, N]   X~^T X~ / n
    G: torch.Tensor  # [groups, N, N]   X~^T X / n   (rows indexed by quantized features)
    F: torch.Tensor  # [groups, N, N]   X^T X / n
    n_tokens: int


def as_tensor(x: np.ndarray, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A numpy array on ``device`` as ``dtype`` (no copy when it already is)."""
    with warnings.catch_warnings():  # read-only frontier arrays (memory maps): only ever read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)


def tokens(x: np.ndarray, target: Target, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A target's input -> ``[groups, n, N]`` token rows on ``device`` (MatMul: any rank flattened; Conv: im2col)."""
    t = as_tensor(x, device, dtype)
    if target.op_type == "Conv":
        assert target.conv is not None
        out = unfold(t, target.conv)
    else:
        if target.op_type == "Gemm" and t.dim() != 2:
            raise ModelError(f"Gemm {target.name!r}: input {target.input_name!r} has rank {t.dim()}, expected 2")
        out = t.reshape(-1, t.shape[-1])[None]
    if out.shape[-1] != target.in_features:
        raise ModelError(f"target {target.name!r}: input {target.input_name!r} has {out.shape[-1]} features per "
                         f"token, the weight expects {target.in_features}")
    return out


def conv_input(x: np.ndarray, target: Target, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A Conv target's input [B, C, *spatial] on ``device``, checked against its weight (im2col comes later)."""
    assert target.conv is not None
    t = as_tensor(x, device, dtype)
    k = target.conv.kernel_shape
    if t.dim() != len(k) + 2 or t.shape[1] % target.groups or (t.shape[1] // target.groups) * math.prod(k) \
            != target.in_features:
        raise ModelError(f"target {target.name!r}: input {target.input_name!r} of shape {tuple(t.shape)} does not "
                         f"fit a conv weight {target.weight_shape} with group={target.groups}")
    return t


def out_spatial(x: torch.Tensor, conv: ConvParams) -> list[int]:
    """Output positions of a conv along each spatial axis of input ``x`` [B, C, *spatial]."""
    begins, ends = conv_pads(conv, tuple(x.shape[2:]))
    return [(n + b + e - ((k - 1) * d + 1)) // s + 1 for n, b, e, k, s, d in
            zip(x.shape[2:], begins, ends, conv.kernel_shape, conv.strides, conv.dilations)]


def pieces(x: torch.Tensor, conv: ConvParams) -> list[tuple[slice, slice]]:
    """(images, groups) slices of a conv input whose im2col has about ``PIECE_ELEMENTS`` elements each.

    Groups are split only when one image's patches are larger than a piece; images are packed only when all groups
    of one image fit. Image slices are what changes a sum's order; they depend on the shapes only.
    """
    b, c = x.shape[:2]
    g = conv.group
    per_group = max(1, (c // g) * math.prod(conv.kernel_shape) * math.prod(out_spatial(x, conv)))
    gp = min(g, max(1, PIECE_ELEMENTS // per_group))
    bp = max(1, PIECE_ELEMENTS // (per_group * g)) if gp == g else 1
    return [(slice(i, min(i + bp, b)), slice(j, min(j + gp, g))) for i in range(0, b, bp) for j in range(0, g, gp)]


class StatsAccumulator:
    """Running sums of X~^T X~, X~^T X and X^T X for one (input tensor, conv parameters) pair.

    Each batch's products are computed alone and then added to the sums, batch after batch: the result is the
    ordered sum of per-batch partials, which a distributed run reproduces bit for bit by adding the same partials
    in the same order (dist.py). ``hold`` keeps the partials instead (a rank > 0 adds them once the sums of the
    ranks before it arrive).
    """

    def __init__(self, groups: int, n_features: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, hold: bool = False):
        shape = (groups, n_features, n_features)
        self.device, self.dtype = torch.device(device), dtype
        with torch_threads(1):  # memset
            self.H = torch.zeros(shape, device=device, dtype=dtype)
            self.G = torch.zeros(shape, device=device, dtype=dtype)
            self.F = torch.zeros(shape, device=device, dtype=dtype)
        self.n = 0
        self.hold = hold
        self.held: list[list[torch.Tensor]] = []  # [H, G, F] partials of each batch, in order (hold=True)

    def add(self, x_tilde: torch.Tensor, x: torch.Tensor, same: bool = False, conv: ConvParams | None = None
            ) -> None:
        """Fold one batch of token rows ``[groups, n, N]``; ``same`` says x is x_tilde (one Gram instead of three).

        With ``conv``, x_tilde and x are the conv's inputs [B, C, *spatial], im2col'ed piece by piece (``add_conv``).
        """
        if x_tilde.shape != x.shape:
            raise ModelError(f"float and quantized inputs differ in shape ({tuple(x.shape)} vs "
                             f"{tuple(x_tilde.shape)}); data-dependent shapes are not supported")
        if conv is not None:
            self.add_conv(x_tilde, x, conv, same)
            return
        xt = x_tilde.transpose(1, 2)
        self.n += x_tilde.shape[1]
        if same:
            gram = torch.bmm(xt, x_tilde)
            products = [lambda: gram] * 3
        else:  # one N x N product alive at a time when folding
            products = [lambda: torch.bmm(xt, x_tilde), lambda: torch.bmm(xt, x),
                        lambda: torch.bmm(x.transpose(1, 2), x)]
        if self.hold:
            self.held.append([make() for make in products])
            return
        for total, make in zip((self.H, self.G, self.F), products):
            part = make()
            with torch_threads(1):  # elementwise: the same bits on any thread count
                total += part

    def add_conv(self, x_tilde: torch.Tensor, x: torch.Tensor, conv: ConvParams, same: bool) -> None:
        """Fold one batch of conv inputs [B, C, *spatial] without materializing the batch's im2col matrix.

        The patches are built one piece (``pieces``) at a time, rows of features with tokens contiguous, and their
        products added to this batch's sums right away, while the piece is still in cache. The batch's partial sums
        are then folded like ``add``'s: one partial per batch, added to the totals in batch order.
        """
        gemm = threads_for(self.H.shape[-1])  # the run's pinned count, or one for small products (threads.py)
        with torch_threads(1):  # elementwise (zeros, sums) and strided copies: memory-bound (threads.py)
            parts = [torch.zeros_like(self.H) for _ in range(1 if same else 3)]
            for images, groups in pieces(x_tilde, conv):
                channels = slice(groups.start * (x.shape[1] // conv.group), groups.stop * (x.shape[1] // conv.group))
                n_groups = groups.stop - groups.start
                pq = unfold_rows(x_tilde[images, channels], conv, n_groups)
                pf = pq if same else unfold_rows(x[images, channels], conv, n_groups)
                with torch_threads(gemm):
                    parts[0][groups].baddbmm_(pq, pq.transpose(1, 2))
                    if not same:
                        parts[1][groups].baddbmm_(pq, pf.transpose(1, 2))
                        parts[2][groups].baddbmm_(pf, pf.transpose(1, 2))
            self.n += math.prod(out_spatial(x, conv)) * x.shape[0]
            products = parts * 3 if same else parts
            if self.hold:
                self.held.append(products)
                return
            for total, part in zip((self.H, self.G, self.F), products):
                total += part

    def finalize(self, inplace: bool = False) -> LayerStats:
        return finalize([self], inplace=inplace)


def finalize(accs: list[StatsAccumulator], inplace: bool = False) -> LayerStats:
    """One LayerStats from one or several accumulators (a weight read through several inputs in one wave).

    ``inplace`` divides a single accumulator's sums in place (no copy of three N x N matrices); the accumulator
    must not be used afterwards.
    """
    n = sum(a.n for a in accs)
    if n == 0:
        raise ModelError("no calibration tokens reached this layer")
    if inplace and len(accs) == 1:
        a = accs[0]
        return LayerStats(H=a.H.div_(n), G=a.G.div_(n), F=a.F.div_(n), n_tokens=n)
    mats = []
    for name in ("H", "G", "F"):
        total = getattr(accs[0], name).clone()
        for a in accs[1:]:
            total += getattr(a, name)
        mats.append(total.div_(n))
    return LayerStats(*mats, n_tokens=n)
