"""The per-target plan: which weight and activation format each quantized node gets.

A run starts from one format (the recipe, preset and flags); ``--layer-config`` rules then set other formats or
float on the nodes they match, and ``--target-bits`` promotes the most sensitive targets (precision/sensitivity.py).
Everything after the plan (grids, solver batches, activation quantizers, export, report) reads it per target.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import numpy as np

from ..config import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from ..errors import ConfigError
from ..graph.targets import Target

MX_BLOCK = 32
E8M0_BITS = 8
_ELEMENT_BITS = {"mxfp4": 4, "mxfp8": 8, "mxint8": 8, "fp8": 8}


@dataclass(frozen=True)
class LayerPlan:
    """One target's formats. ``weights`` None: the node stays float (its activations too)."""

    weights: WeightQuantConfig | None
    activations: ActivationQuantConfig
    source: str = "config"  # what decided it: the run's settings, a layer-config rule, or the bit budget
    rule: str = ""  # the last layer-config pattern that matched

    @property
    def is_float(self) -> bool:
        return self.weights is None

    def weight_label(self) -> str:
        return weight_label(self.weights)

    def act_label(self) -> str:
        return act_label(self.activations) if self.weights is not None else "float"


def weight_label(w: WeightQuantConfig | None) -> str:
    """'int4 asym per-channel', 'int8 sym g128', 'mxfp4', 'float'."""
    if w is None:
        return "float"
    if w.format != "int":
        return w.format
    narrow = " narrow" if w.narrow else ""
    return (f"int{w.bits} {'sym' if w.symmetric else 'asym'}{narrow} "
            + (f"g{w.group_size}" if w.group_size else "per-channel"))


def act_label(a: ActivationQuantConfig) -> str:
    if not a.enabled:
        return "float"
    if a.format != "int":
        return a.format
    return f"int{a.bits} {a.granularity} {'dynamic' if a.dynamic else 'static'} {'sym' if a.symmetric else 'asym'}"


def base_plan(cfg: QuantConfig) -> LayerPlan:
    return LayerPlan(cfg.weights, cfg.activations)


def resolve_plan(targets: list[Target], cfg: QuantConfig, rules: list[dict] | None = None) -> dict[str, LayerPlan]:
    """node name -> LayerPlan: the run's formats, then each matching layer rule in order (later rules win).

    A rule that matches no target, or leaves a target with settings that do not validate, is refused naming the
    pattern; targets that share one weight must end with the same weight format (one set of codes serves them).
    """
    rules = cfg.precision.layers if rules is None else rules
    plans = {t.name: base_plan(cfg) for t in targets}
    for rule in rules:
        pattern = re.compile(rule["match"])
        hits = [t for t in targets if pattern.search(t.name)]
        if not hits:
            names = ", ".join(repr(t.name) for t in targets[:3])
            raise ConfigError(f"layer rule {rule['match']!r} matches no quantizable node (node names look like "
                              f"{names}; `qronos-onnx inspect MODEL` lists them all)")
        for t in hits:
            plans[t.name] = _apply(plans[t.name], rule, cfg)
    by_weight: dict[str, list[Target]] = {}
    for t in targets:
        by_weight.setdefault(t.weight_name, []).append(t)
    for name, ts in by_weight.items():
        formats = {plans[t.name].weights for t in ts}
        if len(formats) > 1:
            raise ConfigError(f"nodes {', '.join(t.name for t in ts)} share weight {name!r} but the layer rules give "
                              f"them different weight formats ({', '.join(sorted(map(weight_label, formats)))}); "
                              f"one set of codes serves them all: give them the same settings")
    return plans


def _apply(plan: LayerPlan, rule: dict, cfg: QuantConfig) -> LayerPlan:
    where = f"layer rule {rule['match']!r}"
    if rule["float"]:
        return LayerPlan(None, ActivationQuantConfig(), "layer-config", rule["match"])
    weights = plan.weights or cfg.weights  # a float rule followed by a format rule: the format wins
    acts = plan.activations
    try:
        if rule["weights"]:
            w = dict(rule["weights"])
            if w.get("format") == "int" and weights.format != "int":  # leaving MX / FP8: their fixed settings go
                w = {"group_size": 0, "symmetric": cfg.weights.symmetric if cfg.weights.format == "int" else True,
                     **w}
            if "bits" in w and w["bits"] != weights.bits:  # a ternary grid is 2-bit only
                w.setdefault("narrow", False)
            if weights.full_range and (w.get("symmetric") is False or w.get("format", "int") != "int"
                                       or w.get("narrow")):  # the run's full-range grid has no such form
                w.setdefault("full_range", False)
            weights = dataclasses.replace(weights, **w)
            weights.validate()
        if rule["activations"]:
            a = dict(rule["activations"])
            base = acts if acts.enabled else cfg.activations
            if a.get("format") == "int" and base.format != "int":
                a = {"granularity": "per_token", "dynamic": True, "symmetric": False, **a}
            acts = dataclasses.replace(base, **a)
            acts.validate()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return LayerPlan(weights, acts, "layer-config", rule["match"])


def is_mixed(plans: dict[str, LayerPlan]) -> bool:
    return len({(p.weights, p.activations) for p in plans.values()}) > 1


# ------------------------------------------------------------------------------------------------ promotion

def promote(plan: LayerPlan) -> LayerPlan | None:
    """The next precision of the same family, weights and activations together; None when there is none.

    int2/int3 -> int4, int4..int7 -> int8 (same symmetry and group size); mxfp4 -> mxfp8. Activations follow:
    int4 -> int8 (same granularity, unclipped: a clip ratio is for 4-bit ranges), mxfp4 -> mxfp8; anything else
    keeps its activation format.
    """
    w = plan.weights
    if w is None:
        return None
    if w.format == "int" and w.bits < 8:
        nw = dataclasses.replace(w, bits=4 if w.bits < 4 else 8, narrow=False, minmax_scale=1.0)
    elif w.format == "mxfp4":
        nw = WeightQuantConfig.for_format("mxfp8", scale_method=w.scale_method)
    else:
        return None
    a = plan.activations
    if a.enabled and a.format == "int" and a.bits < 8:
        a = dataclasses.replace(a, bits=8, clip_ratio=1.0)
    elif a.format == "mxfp4":
        a = ActivationQuantConfig.for_format("mxfp8")
    return LayerPlan(nw, a, "target-bits", plan.rule)


# ------------------------------------------------------------------------------------------------ bits

def storage_bits(target: Target, w: WeightQuantConfig | None) -> float:
    """Bits this target's weight takes as its format stores it: codes and zero points at the grid's width
    (2- and 3-bit codes count 2 and 3 bits although QDQ files hold them in 4-bit containers), scales in the model's
    float type; MX elements with one 8-bit E8M0 scale per block of 32 (the canonical encoding); float: the dtype."""
    groups, rows, cols = target.matrix_shape
    params = groups * rows * cols
    float_bits = np.dtype(target.weight_dtype).itemsize * 8
    if w is None:
        return float(params * float_bits)
    scale_bits = 16 if np.dtype(target.weight_dtype) == np.float16 else 32
    if w.format == "int":
        g = w.group_size if w.group_size and target.op_type != "Conv" and w.group_size < cols else cols
        n_scales = groups * rows * math.ceil(cols / g)
        return float(params * w.bits + n_scales * (scale_bits + (0 if w.symmetric else w.bits)))
    bits = _ELEMENT_BITS[w.format]
    if w.format == "fp8":
        return float(params * bits + groups * rows * scale_bits)
    blocks = groups * rows * (1 if target.op_type == "Conv" else math.ceil(cols / MX_BLOCK))
    return float(params * bits + blocks * E8M0_BITS)


def average_bits(targets: list[Target], plans: dict[str, LayerPlan]) -> float:
    """Average storage bits per target parameter (each shared weight counted once)."""
    seen: dict[str, tuple[int, float]] = {}
    for t in targets:
        if t.weight_name not in seen:
            g, r, c = t.matrix_shape
            seen[t.weight_name] = (g * r * c, storage_bits(t, plans[t.name].weights))
    params = sum(p for p, _ in seen.values())
    return sum(b for _, b in seen.values()) / max(params, 1)
