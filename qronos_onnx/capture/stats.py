"""LayerStats: the second moments a rounding algorithm needs, accumulated batch by batch, never storing X.

H = X~^T X~ / n, G = X~^T X / n (rows indexed by quantized features), F = X^T X / n, one matrix per conv group.
All three are sums over tokens divided once, at the end, by the same token count n (one normalization).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ModelError
from ..graph.targets import Target
from .im2col import unfold


@dataclass
class LayerStats:
    H: torch.Tensor  # [groups, N, N]   X~^T X~ / n
    G: torch.Tensor  # [groups, N, N]   X~^T X / n   (rows indexed by quantized features)
    F: torch.Tensor  # [groups, N, N]   X^T X / n
    n_tokens: int


def tokens(x: np.ndarray, target: Target, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A target's input -> ``[groups, n, N]`` token rows on ``device`` (MatMul: any rank flattened; Conv: im2col)."""
    with warnings.catch_warnings():  # read-only frontier arrays (memory maps): only ever read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)
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
        self.H = torch.zeros(shape, device=device, dtype=dtype)
        self.G = torch.zeros(shape, device=device, dtype=dtype)
        self.F = torch.zeros(shape, device=device, dtype=dtype)
        self.n = 0
        self.hold = hold
        self.held: list[list[torch.Tensor]] = []  # [H, G, F] partials of each batch, in order (hold=True)

    def add(self, x_tilde: torch.Tensor, x: torch.Tensor, same: bool = False) -> None:
        """Fold one batch of token rows ``[groups, n, N]``; ``same`` says x is x_tilde (one Gram instead of three)."""
        if x_tilde.shape != x.shape:
            raise ModelError(f"float and quantized inputs differ in shape ({tuple(x.shape)} vs "
                             f"{tuple(x_tilde.shape)}); data-dependent shapes are not supported")
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
            total += make()

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
