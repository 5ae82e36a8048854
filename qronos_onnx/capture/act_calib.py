"""Activation quantization plan: which quantizer sits on each target's input, and its static scales.

Static scales (INT per-tensor, FP8) are calibrated on the FLOAT model's activations in one pre-pass (one float
forward over the calibration set, every target input as an output) before any wave is rounded, so they are frozen
when the quantized stream first needs them. Per calibration batch:

* ``minmax``: the global min and max (symmetric: the absolute max);
* ``percentile``: the ``percentile``-th value of x (and the (100 - p)-th for the low end; symmetric: of |x|) of each
  batch, averaged over batches weighted by their element count (Brevitas' running-average calibration);
* ``mse``: a fixed random subsample of every batch is pooled; the clipping range (lo, hi) * f, f = 1.00, 0.99, ...,
  0.21, with the least squared quantization error on the pool wins (exact global min / max as the start).

The plan then hands the same :class:`ActQuantizer` objects to the capture (``graph_hook`` edits the quantized
stream's segments, ``act_quant`` quantizes a frontier X~) and to the export (``apply``).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from ..config import ActivationQuantConfig, CaptureConfig
from ..errors import CalibrationError
from ..export.activations import ActQuantizer, ActQuantRunner, insert_activation_quantizers
from ..formats.elements import E4M3
from ..formats.grid import _MSE_GRID
from ..graph.schedule import Segment, closure_segment
from ..graph.targets import Target
from .runner import SegmentRunner, make_chunks, value_map

MSE_SAMPLES_PER_BATCH = 1 << 14  # elements per tensor and calibration batch pooled for the MSE search


def channel_layout(target: Target) -> tuple[int, int]:
    """(channel axis, channels) of a target's activation input: features last for MatMul / Gemm, NCHW for Conv."""
    if target.op_type == "Conv":
        return 1, int(target.weight_shape[1]) * target.groups
    return -1, int(target.in_features)


def required_opset(cfg: ActivationQuantConfig, dtypes: Sequence[str] = ("float32",)) -> int:
    """Opset the activation subgraphs of ``cfg`` need (the model is upgraded to it before capture)."""
    if not cfg.enabled:
        return 0
    return max(_quantizer(cfg, -1, 32, d, 1.0, 0).opset for d in dtypes or ("float32",))


def _quantizer(cfg: ActivationQuantConfig, axis: int, channels: int, dtype: str, scale: float | None,
               zero_point: int) -> ActQuantizer:
    return ActQuantizer(format=cfg.format, bits=cfg.bits, granularity=cfg.granularity, dynamic=cfg.dynamic,
                        symmetric=cfg.symmetric, channel_axis=axis, channels=channels, dtype=dtype,
                        scale=None if cfg.dynamic else scale, zero_point=zero_point,
                        clip_ratio=float(cfg.clip_ratio) if cfg.dynamic else 1.0)


# ------------------------------------------------------------------------------------------------ static scales

def static_params(cfg: ActivationQuantConfig, lo: float, hi: float, dtype: str = "float32") -> tuple[float, int]:
    """Scale (exact in ``dtype``) and zero point of a static quantizer covering [lo, hi]."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise CalibrationError(f"activation range [{lo}, {hi}] is not finite; the float model produces NaN/Inf")
    amax = max(abs(lo), abs(hi))
    if cfg.format == "fp8":
        scale, zp = amax / E4M3.max_value, 0
    elif cfg.symmetric:
        scale, zp = amax / (2 ** (cfg.bits - 1) - 1), 0
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale, zp = (hi - lo) / (2**cfg.bits - 1), None
    tiny = float(np.finfo(np.dtype(dtype)).smallest_subnormal)
    scale = float(np.array(max(scale, tiny) if scale > 0 else 1.0, np.dtype(dtype)))
    if zp is None:
        zp = int(np.clip(np.rint(-lo / scale), 0, 2**cfg.bits - 1))
    return scale, zp


def fake_quant_static(x: torch.Tensor, cfg: ActivationQuantConfig, scale: float, zero_point: int) -> torch.Tensor:
    """torch fake quantization with a static scale (the MSE search's error model; the graph is the reference)."""
    if cfg.format == "fp8":
        return E4M3.values(E4M3.encode(x / scale)) * scale
    if cfg.symmetric:
        qmin, qmax = -(2 ** (cfg.bits - 1)), 2 ** (cfg.bits - 1) - 1
    else:
        qmin, qmax = 0, 2**cfg.bits - 1
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def _kth(x: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a flat tensor by nearest rank (q = 1: max, q = 0: min)."""
    n = x.numel()
    k = min(max(int(np.ceil(q * n)), 1), n)
    return x.kthvalue(k).values


@dataclass
class _RangeStats:
    lo: float = np.inf
    hi: float = -np.inf
    p_lo: float = 0.0  # element-weighted sums of per-batch percentiles
    p_hi: float = 0.0
    weight: int = 0
    pool: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, cfg: ActivationQuantConfig, rng: np.random.Generator) -> None:
        x = x.reshape(-1)
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError("the float model produces NaN/Inf activations; cannot calibrate static scales")
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        if cfg.calibration == "percentile":
            p = float(cfg.percentile) / 100.0
            if cfg.symmetric or cfg.format == "fp8":
                a = float(_kth(x.abs(), p))
                lo, hi = -a, a
            else:
                lo, hi = float(_kth(x, 1.0 - p)), float(_kth(x, p))
            self.p_lo += lo * x.numel()
            self.p_hi += hi * x.numel()
            self.weight += x.numel()
        elif cfg.calibration == "mse":
            n = x.numel()
            if n > MSE_SAMPLES_PER_BATCH:
                x = x[torch.from_numpy(rng.integers(0, n, MSE_SAMPLES_PER_BATCH)).to(x.device)]
            self.pool.append(x.clone())

    def result(self, cfg: ActivationQuantConfig, dtype: str) -> tuple[float, float]:
        sym = cfg.symmetric or cfg.format == "fp8"
        if cfg.calibration == "percentile":
            return self.p_lo / self.weight, self.p_hi / self.weight
        lo, hi = self.lo, self.hi
        if sym:
            a = max(abs(lo), abs(hi))
            lo, hi = -a, a
        if cfg.calibration == "minmax":
            return lo, hi
        pool = torch.cat(self.pool).double()
        best, best_f = None, 1.0
        for f in _MSE_GRID:
            s, z = static_params(cfg, lo * f, hi * f, dtype)
            err = float((fake_quant_static(pool, cfg, s, z) - pool).pow(2).sum())
            if best is None or err < best:
                best, best_f = err, f
        return lo * best_f, hi * best_f


def float_activations(model: ir.Model, names: Sequence[str], samples: Sequence[Mapping[str, np.ndarray]],
                      batch_size: int = 1, providers: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The float model's tensors ``names`` for each calibration batch (one onnxruntime call per batch)."""
    values = value_map(model.graph)
    graph_inputs = {v.name for v in model.graph.inputs}
    computed = [n for n in names if n not in graph_inputs]
    seg: Segment | None = closure_segment(model, computed, weight_names=[]) if computed else None
    feed_names = list(dict.fromkeys((seg.inputs if seg else []) + [n for n in names if n in graph_inputs]))
    runner: SegmentRunner | None = None
    for chunk in make_chunks(samples, feed_names, values, batch_size):
        out = {n: chunk.feeds[n] for n in names if n in graph_inputs}
        if seg is not None:
            if runner is None:
                runner = SegmentRunner(model, seg, chunk.feeds, providers=providers)
            out.update(runner.run(chunk.feeds, {}))
        yield out


def calibrate_ranges(model: ir.Model, targets: Sequence[Target], samples: Sequence[Mapping[str, np.ndarray]],
                     cfg: ActivationQuantConfig, capture: CaptureConfig, *, device: str | torch.device = "cpu",
                     seed: int = 0, providers: Sequence[str] | None = None) -> dict[str, tuple[float, float]]:
    """input name -> calibrated (lo, hi) of the float activations of ``targets`` (symmetric: lo = -hi)."""
    names = list(dict.fromkeys(t.input_name for t in targets))
    samples = list(samples)[: capture.samples] if capture.samples else list(samples)
    if not samples:
        raise CalibrationError("no calibration samples to calibrate the activation scales with")
    stats = {n: _RangeStats() for n in names}
    rng = np.random.default_rng(seed)
    for out in float_activations(model, names, samples, capture.batch_size, providers):
        for n in names:
            arr = np.asarray(out[n], dtype=np.float32)
            if not arr.flags.writeable or not arr.flags.c_contiguous:  # borrowed calibration inputs: never touched
                arr = np.array(arr, order="C")
            x = torch.from_numpy(arr).to(device=device)
            stats[n].add(x, cfg, rng)
    dtype_of = {t.input_name: np.dtype(t.weight_dtype).name for t in targets}
    return {n: s.result(cfg, dtype_of[n]) for n, s in stats.items()}


# ------------------------------------------------------------------------------------------------ the plan

@dataclass
class ActivationPlan:
    """The activation quantizer of every target (by node name); one object drives capture and export alike."""

    config: ActivationQuantConfig
    quantizers: dict[str, ActQuantizer]
    opset: int = 0

    def graph_hook(self, graph: ir.Graph, segment: Segment) -> None:
        """CaptureEngine hook: targets inside a quantized-stream segment read their quantized input."""
        insert_activation_quantizers(graph, self.quantizers)

    def act_quant(self) -> ActQuantRunner:
        """CaptureEngine ``act_quant``: X~ of a wave = the quantized stream's input through the same subgraph."""
        return ActQuantRunner(self.quantizers, self.opset)

    def apply(self, model: ir.Model) -> int:
        """Insert the quantizers in front of the targets of ``model`` (the exported graph, in place)."""
        from ..export.qdq import default_opset, ir_version_for_opset, upgrade_opset

        if default_opset(model) < self.opset:
            upgrade_opset(model, self.opset)
        model.ir_version = max(int(model.ir_version or 0), ir_version_for_opset(max(self.opset, 13)))
        return len(insert_activation_quantizers(model.graph, self.quantizers))

    def metadata(self) -> dict[str, str]:
        c = self.config
        meta = {"quant.act_format": c.format, "quant.act_bits": str(c.bits), "quant.act_granularity": c.granularity,
                "quant.act_dynamic": str(c.dynamic).lower(), "quant.act_symmetric": str(c.symmetric).lower(),
                "quant.act_quantizers": str(len(self.quantizers)),
                "quant.activations": ", ".join(sorted({q.describe() for q in self.quantizers.values()}))}
        if not c.dynamic:
            meta["quant.act_calibration"] = c.calibration + (f" {c.percentile}" if c.calibration == "percentile"
                                                             else "")
        return meta


def plan_activations(model: ir.Model, targets: Sequence[Target], samples: Sequence[Mapping[str, np.ndarray]],
                     cfg: ActivationQuantConfig, capture: CaptureConfig, *, device: str | torch.device = "cpu",
                     seed: int = 0, providers: Sequence[str] | None = None) -> ActivationPlan | None:
    """Quantizers for the inputs of ``targets`` (None when activations stay float); static ones calibrated now."""
    if not cfg.enabled:
        return None
    ranges = {} if cfg.dynamic else calibrate_ranges(model, targets, samples, cfg, capture, device=device,
                                                     seed=seed, providers=providers)
    quantizers = {}
    for t in targets:
        axis, channels = channel_layout(t)
        dtype = np.dtype(t.weight_dtype).name
        scale, zp = static_params(cfg, *ranges[t.input_name], dtype) if not cfg.dynamic else (None, 0)
        quantizers[t.name] = _quantizer(cfg, axis, channels, dtype, scale, zp)
    opset = max(q.opset for q in quantizers.values()) if quantizers else 0
    return ActivationPlan(cfg, quantizers, opset)
