"""QuantConfig: everything a run needs to know, loaded from a recipe and overridden by flags.

A recipe is a YAML file whose sections mirror the dataclasses below. Unknown keys and bad values are refused
with a message naming the key, so a typo in a recipe never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

ALGORITHMS = ("rtn", "gptq", "gpfq", "qronos")
WEIGHT_FORMATS = ("int", "mxfp4", "mxfp8", "mxint8", "fp8")
SCALE_METHODS = ("minmax", "mse")
REFERENCE_MODES = ("float", "local")
DIALECTS = ("qdq", "mx", "matmulnbits")
# what each non-integer format fixes: OCP MX blocks of 32 along K; FP8 is per output channel; all symmetric
FORMAT_SETTINGS: dict[str, dict[str, Any]] = {
    "mxfp4": {"bits": 4, "group_size": 32, "symmetric": True},
    "mxfp8": {"bits": 8, "group_size": 32, "symmetric": True},
    "mxint8": {"bits": 8, "group_size": 32, "symmetric": True},
    "fp8": {"bits": 8, "group_size": 0, "symmetric": True},
}
_FORMAT_WHY = {"mxfp4": "e2m1 elements in OCP MX blocks of 32", "mxfp8": "e4m3 elements in OCP MX blocks of 32",
               "mxint8": "int8 elements in OCP MX blocks of 32", "fp8": "e4m3 elements with one scale per channel"}
DEVICES = ("auto", "cpu", "cuda")
STATS_DTYPES = ("float32", "float64")
ACT_FORMATS = ("none", "int", "mxfp4", "mxfp8", "fp8")
ACT_GRANULARITIES = ("per_tensor", "per_token", "per_block")
ACT_CALIBRATIONS = ("minmax", "percentile", "mse")
# what each non-integer activation format fixes: MX blocks of 32 with runtime E8M0 scales; FP8 static per tensor
ACT_FORMAT_SETTINGS: dict[str, dict[str, Any]] = {
    "mxfp4": {"bits": 4, "granularity": "per_block", "dynamic": True, "symmetric": True},
    "mxfp8": {"bits": 8, "granularity": "per_block", "dynamic": True, "symmetric": True},
    "fp8": {"bits": 8, "granularity": "per_tensor", "dynamic": False, "symmetric": True},
}


@dataclass(frozen=True)  # hashable: per-target plans group targets by format
class WeightQuantConfig:
    """How weights are gridded. Groups run along the input dimension; 0 means one scale per output channel."""

    format: str = "int"
    bits: int = 4
    symmetric: bool = False
    group_size: int = 0
    narrow: bool = False
    scale_method: str = "minmax"
    minmax_scale: float = 1.0  # beta of the "scaled min-max" grid (0.8 in the paper's 2-bit runs)
    # symmetric: the group's largest-magnitude value lands on the most negative code (-8 at 4 bits) and the scale takes
    # its sign, as onnxruntime's own int4 quantizer does: a step of amax/8 instead of amax/7 (formats/grid.py).
    # None: on for symmetric integer grids exported as MatMulNBits (whose own quantizer uses it), off in QDQ, where
    # a compiler may refuse a negative scale (QuantConfig.resolved)
    full_range: bool | None = None

    def validate(self) -> None:
        _choice("weights.format", self.format, WEIGHT_FORMATS)
        _choice("weights.scale_method", self.scale_method, SCALE_METHODS)
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"weights.bits must be an integer from 2 to 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(f"weights.group_size must be 0 (per channel) or a positive integer, got {self.group_size!r}")
        if self.group_size and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise ConfigError(
                f"weights.group_size must be a power of two >= 16 (what ONNX runtimes fuse), got {self.group_size}"
            )
        if not _is_number(self.minmax_scale) or not 0.0 < float(self.minmax_scale) <= 1.0:
            raise ConfigError(f"weights.minmax_scale must be in (0, 1], got {self.minmax_scale!r}")
        if self.full_range not in (None, True, False):
            raise ConfigError(f"weights.full_range must be true, false or null (auto), got {self.full_range!r}")
        if self.full_range and (not self.symmetric or self.narrow or self.format != "int"):
            raise ConfigError("weights.full_range applies to symmetric, non-narrow integer grids (it uses the code "
                              "-2^(bits-1) that a symmetric grid leaves unused)")
        if self.narrow and not self.symmetric and self.bits != 2:
            raise ConfigError("weights.narrow with an asymmetric grid is only defined for 2 bits (ternary)")
        fixed = FORMAT_SETTINGS.get(self.format)
        if fixed:
            for key, want in fixed.items():
                got = getattr(self, key)
                if got != want:
                    raise ConfigError(
                        f"weights.format {self.format} ({_FORMAT_WHY[self.format]}) needs weights.{key} = "
                        f"{str(want).lower()}, got {got!r}; set it, or drop the conflicting option"
                    )
            if self.narrow:
                raise ConfigError(f"weights.narrow applies to integer grids only, not weights.format {self.format}")

    @classmethod
    def for_format(cls, fmt: str, **kw: Any) -> "WeightQuantConfig":
        """A config for ``fmt`` with the bits / group size / symmetry that format fixes (``kw`` overrides)."""
        return cls(format=fmt, **{**FORMAT_SETTINGS.get(fmt, {}), **kw})


@dataclass(frozen=True)  # hashable: per-target plans group targets by format
class ActivationQuantConfig:
    """Activation quantizers on the inputs of quantized targets (export/activations.py builds them).

    ``int``: ``bits`` 4 or 8; static per-tensor scales (``dynamic: false``) are calibrated on the float model's
    activations with ``calibration`` (minmax, percentile with ``percentile``, or mse); dynamic scales are computed
    at run time per token (``per_token``) or per tensor. Asymmetric grids are unsigned with a zero point (static u8
    is the onnxruntime-fusable W8A8 form). ``mxfp4`` / ``mxfp8``: OCP MX blocks of 32 along the channel axis with a
    runtime power-of-two scale. ``fp8``: E4M3FN with one static scale amax / 448.
    """

    format: str = "none"
    bits: int = 8
    granularity: str = "per_tensor"
    dynamic: bool = False
    symmetric: bool = False
    calibration: str = "minmax"
    percentile: float = 99.99
    clip_ratio: float = 1.0  # dynamic INT: the run-time range (amax, or min and max) times this (QuaRot uses 0.9)

    def validate(self) -> None:
        _choice("activations.format", self.format, ACT_FORMATS)
        r = self.clip_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.5 <= float(r) <= 1.0:
            raise ConfigError(f"activations.clip_ratio must be a number in [0.5, 1], e.g. 0.9; got {r!r}")
        if float(r) != 1.0 and self.enabled and not (self.format == "int" and self.dynamic):
            raise ConfigError("activations.clip_ratio applies to dynamic integer activations (static scales are "
                              "clipped by activations.calibration; MX and FP8 scales are not); set it to 1")
        _choice("activations.granularity", self.granularity, ACT_GRANULARITIES)
        _choice("activations.calibration", self.calibration, ACT_CALIBRATIONS)
        for key in ("dynamic", "symmetric"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"activations.{key} must be true or false, got {getattr(self, key)!r}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 50.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"activations.percentile must be a number in (50, 100], e.g. 99.99; "
                              f"got {self.percentile!r}")
        if not self.enabled:
            return
        fixed = ACT_FORMAT_SETTINGS.get(self.format)
        if fixed:
            for key, want in fixed.items():
                got = getattr(self, key)
                if got != want:
                    raise ConfigError(
                        f"activations.format {self.format} needs activations.{key} = {str(want).lower()}, "
                        f"got {str(got).lower() if isinstance(got, bool) else repr(got)}; set it, or drop the "
                        "conflicting option")
            return
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            raise ConfigError(f"activations.bits must be 4 or 8 for integer activations, got {self.bits!r}")
        if self.granularity == "per_block":
            raise ConfigError("activations.granularity per_block is the MX block layout; integer activations are "
                              "per_tensor or per_token")
        if self.granularity == "per_token" and not self.dynamic:
            raise ConfigError("activations.granularity per_token needs activations.dynamic: true (per-token "
                              "scales are computed at run time)")

    @property
    def enabled(self) -> bool:
        return self.format != "none"

    @classmethod
    def for_format(cls, fmt: str, **kw: Any) -> "ActivationQuantConfig":
        """A config for ``fmt`` with the bits / granularity / dynamic / symmetry that format fixes (``kw`` wins)."""
        return cls(format=fmt, **{**ACT_FORMAT_SETTINGS.get(fmt, {}), **kw})


@dataclass
class RoundingConfig:
    """Which rounding algorithm and its knobs. ``damping=None`` takes each algorithm's published default."""

    algorithm: str = "qronos"
    act_order: bool = True
    damping: float | None = None
    block_size: int = 0  # 0: ceil(N / 100) as Brevitas does
    stats_dtype: str = "float32"

    def validate(self) -> None:
        _choice("rounding.algorithm", self.algorithm, ALGORITHMS)
        _choice("rounding.stats_dtype", self.stats_dtype, STATS_DTYPES)
        if self.damping is not None and (not _is_number(self.damping) or not float(self.damping) >= 0.0):
            raise ConfigError(f"rounding.damping must be >= 0, got {self.damping!r}")
        if not isinstance(self.block_size, int) or self.block_size < 0:
            raise ConfigError(f"rounding.block_size must be >= 0, got {self.block_size!r}")


CAPTURE_THREADS = 2


@dataclass
class CaptureConfig:
    """How X and X-tilde are produced."""

    reference: str = "float"
    max_memory: int = 4 << 30  # bytes of frontier kept in RAM before spilling to memory-mapped files
    samples: int | None = None  # use at most this many calibration samples (None: all)
    seq_len: int = 256  # window length when calibration data is text
    batch_size: int = 1  # calibration samples per onnxruntime call
    special_tokens: bool = False  # text: wrap each window in the tokenizer's special tokens ([CLS] ... [SEP])
    # onnxruntime intra-op threads for the capture sessions. Fixed, not the core count: onnxruntime's MatMul with a
    # weight fed as an input (how capture runs both streams through one session) blocks its inner sum by the share
    # of columns each thread gets, so the captured activations, and from them the codes, depend on the thread count.
    # 0 = every core (faster on many cores; the output then depends on the machine).
    threads: int = CAPTURE_THREADS

    def validate(self) -> None:
        _choice("capture.reference", self.reference, REFERENCE_MODES)
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 0:
            raise ConfigError(f"capture.threads must be an integer >= 0 (0 = every core), got {self.threads!r}")
        if not isinstance(self.max_memory, int) or self.max_memory < 0:
            raise ConfigError(f"capture.max_memory must be a byte count >= 0, got {self.max_memory!r}")
        if self.samples is not None and (not isinstance(self.samples, int) or self.samples < 1):
            raise ConfigError(f"capture.samples must be a positive integer, got {self.samples!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"capture.seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"capture.batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.special_tokens, bool):
            raise ConfigError(f"capture.special_tokens must be true or false, got {self.special_tokens!r}")


@dataclass
class ExportConfig:
    """``dialect``: qdq (DequantizeLinear, onnxruntime-runnable), mx (canonical opset-24 MX for compilers) or
    matmulnbits (com.microsoft.MatMulNBits for integer MatMul weights). ``accuracy_level`` is written on
    MatMulNBits nodes: 0 computes in float (exact); 4 quantizes activations to int8 per block (faster, inexact).
    None: 4 for an onnxruntime-genai folder that runs on the CPU or WebGPU (what genai's model builder writes there,
    genai.py), else 0."""

    dialect: str = "qdq"
    accuracy_level: int | None = None

    def validate(self) -> None:
        _choice("export.dialect", self.dialect, DIALECTS)
        if self.accuracy_level is not None and (self.accuracy_level not in (0, 1, 2, 3, 4)
                                                or isinstance(self.accuracy_level, bool)):
            raise ConfigError(f"export.accuracy_level must be 0, 1, 2, 3 or 4, got {self.accuracy_level!r}")


ROTATIONS = ("none", "online", "fused", "hadamard")  # hadamard: the old name of online


@dataclass
class TransformConfig:
    """Graph transforms applied to the float model before anything is captured. ``rotate: online`` puts a
    randomized Hadamard rotation in front of every MatMul / Gemm input (transforms/online.py; "hadamard" is its old
    name), what INT4 activations need on LLMs and HIP for low-bit weights; ``rotate: fused`` folds QuaRot rotations
    into a decoder's weights (transforms/fused.py). ``magr: ALPHA`` reduces weight magnitudes before the grid is fit
    (the pre-MagR weights stay the rounding reference); ``smoothquant: ALPHA`` migrates activation range into the
    weights per input channel."""

    rotate: str = "none"
    magr: float | None = None  # MagR alpha (transforms/magr.py; 0.01 in the paper); None: off
    smoothquant: float | None = None  # SmoothQuant migration strength alpha in [0, 1] (transforms/smoothquant.py)
    # fused rotation with quantized activations: residual channels kept out of the rotation and read in float by a
    # small side MatMul ("auto": those whose normalized energy is >= 8x a channel's share, transforms/fused.py; 0 off)
    outlier_channels: int | str = "auto"

    def validate(self) -> None:
        _choice("transforms.rotate", self.rotate, ROTATIONS)
        v = self.outlier_channels
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ConfigError(f"transforms.outlier_channels must be 'auto' or a whole number >= 0 (0: off), got {v!r}")
        for key, top in (("magr", None), ("smoothquant", 1.0)):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                                  or (top is not None and v > top) or (key == "magr" and v == 0)):
                raise ConfigError(f"transforms.{key} must be " + ("a positive number (e.g. 0.01)" if key == "magr"
                                  else "a number in [0, 1] (e.g. 0.5)") + f" or null (off), got {v!r}")


LAYER_RULE_KEYS = ("match", "float", "weights", "activations")
_WEIGHT_SHORTHAND = ("format", "bits", "group_size", "symmetric", "scale_method")


SENSITIVITY_METHODS = ("in-context", "isolated")


@dataclass
class PrecisionConfig:
    """Mixed precision (precision/plan.py). ``layers``: per-layer rules, each a node-name regular expression
    (``match``, searched in the node name) with weight and/or activation settings, or ``float: true``; every
    matching rule applies in file order, a later one overriding what an earlier one set. ``target_bits``: the
    average bits per target weight (scales and zero points counted) the run may spend; the targets whose promotion
    to the next precision of their family lowers the model's output error most per added bit are promoted
    (precision/sensitivity.py), measured on ``sensitivity_samples`` calibration samples, ``in-context`` (each
    promotion's benefit in the quantized model, re-measured over ``sensitivity_rounds`` rounds) or ``isolated``
    (each target quantized alone)."""

    target_bits: float | None = None
    layers: list = field(default_factory=list)
    sensitivity_samples: int | None = None  # None: enough for 65,536 output values, at most 4 (sensitivity.py)
    sensitivity: str = "in-context"
    sensitivity_rounds: int = 3
    sensitivity_recheck: float = 1.0  # in-context rounds after the first: the share of candidates measured again

    def validate(self) -> None:
        t = self.target_bits
        if t is not None and (not _is_number(t) or not 1.0 <= float(t) <= 32.0):
            raise ConfigError(f"precision.target_bits must be a number of bits per weight from 1 to 32, e.g. 4.5; "
                              f"got {t!r}")
        s = self.sensitivity_samples
        if s is not None and (not isinstance(s, int) or isinstance(s, bool) or s < 1):
            raise ConfigError(f"precision.sensitivity_samples must be a positive integer (or unset: chosen from the "
                              f"model's output size), got {s!r}")
        if self.sensitivity not in SENSITIVITY_METHODS:
            raise ConfigError(f"precision.sensitivity must be one of {', '.join(SENSITIVITY_METHODS)}, got "
                              f"{self.sensitivity!r}")
        r = self.sensitivity_rounds
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ConfigError(f"precision.sensitivity_rounds must be a positive integer, got {r!r}")
        f = self.sensitivity_recheck
        if not _is_number(f) or not 0.0 < float(f) <= 1.0:
            raise ConfigError(f"precision.sensitivity_recheck must be a share of the candidates, above 0 and at "
                              f"most 1 (e.g. 0.5), got {f!r}")
        self.layers = normalize_layer_rules(self.layers, "precision.layers")


def normalize_layer_rules(data: Any, source: str) -> list[dict[str, Any]]:
    """Layer rules in their one stored form: ``[{match, float, weights: {...}, activations: {...}}]``.

    Accepted input: a list of rules, or a mapping ``{regex: spec}``; a spec is ``float``, a weight format
    shorthand (``int8``, ``int4``, ``mxfp8``, ...), or a mapping with ``weights`` / ``activations`` sections (an
    activation section may be ``none`` / ``float`` or a format shorthand such as ``int8`` or ``mxfp8``) and the
    weight keys format, bits, group_size, symmetric, scale_method directly."""
    if data is None:
        return []
    if isinstance(data, dict):
        data = [{"match": k, **(_spec(v, f"{source}: {k!r}"))} for k, v in data.items()]
    if not isinstance(data, list):
        raise ConfigError(f"{source} must be a list of rules or a mapping of node-name patterns to settings, got "
                          f"{type(data).__name__}")
    rules = []
    for i, item in enumerate(data):
        where = f"{source}[{i}]"
        if not isinstance(item, dict) or "match" not in item:
            raise ConfigError(f"{where} must be a mapping with a 'match' pattern, got {item!r}")
        pattern = item["match"]
        where = f"{source}: rule {pattern!r}"
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}: 'match' must be a non-empty regular expression")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"{where} is not a valid regular expression: {err}") from None
        rest = {k: v for k, v in item.items() if k != "match"}
        if set(rest) - set(LAYER_RULE_KEYS):  # shorthand specs inside a list rule
            rest = _spec(rest, where)
        unknown = set(rest) - set(LAYER_RULE_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected "
                              f"{', '.join(LAYER_RULE_KEYS[1:])} or the weight keys {', '.join(_WEIGHT_SHORTHAND)}")
        is_float = rest.get("float", False)
        if not isinstance(is_float, bool):
            raise ConfigError(f"{where}: 'float' must be true or false, got {is_float!r}")
        weights = _section(rest.get("weights"), WeightQuantConfig, f"{where}: weights", _weight_word)
        acts = _section(rest.get("activations"), ActivationQuantConfig, f"{where}: activations", _act_word)
        if not is_float and not weights and not acts:
            raise ConfigError(f"{where} sets nothing; give weights and/or activations settings, or float")
        rules.append({"match": pattern, "float": is_float, "weights": weights, "activations": acts})
    return rules


def _spec(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str) and value.strip().lower() == "float":
        return {"float": True}
    if isinstance(value, str):
        return {"weights": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected float, a weight format such as int8, or a mapping of settings; "
                          f"got {value!r}")
    out = {k: v for k, v in value.items() if k not in _WEIGHT_SHORTHAND}
    short = {k: v for k, v in value.items() if k in _WEIGHT_SHORTHAND}
    if short:
        if isinstance(out.get("weights"), dict):
            out["weights"] = {**short, **out["weights"]}
        elif "weights" in out:
            raise ConfigError(f"{where}: give the weight settings either under 'weights' or directly, not both")
        else:
            out["weights"] = short
    return out


def _weight_word(word: str) -> dict[str, Any] | None:
    m = re.fullmatch(r"(?:int|w)([2-8])", word)
    if m:
        return {"format": "int", "bits": int(m.group(1))}
    return {"format": word, **FORMAT_SETTINGS[word]} if word in FORMAT_SETTINGS else None


def _act_word(word: str) -> dict[str, Any] | None:
    if word in ("none", "float"):
        return {"format": "none"}
    m = re.fullmatch(r"(?:int|a)([48])", word)
    if m:
        return {"format": "int", "bits": int(m.group(1))}
    return {"format": word, **ACT_FORMAT_SETTINGS[word]} if word in ACT_FORMAT_SETTINGS else None


def _section(value: Any, cls: type, where: str, word) -> dict[str, Any]:
    """A rule's weights / activations overrides, keys checked against ``cls`` (values are checked once the rule is
    applied on top of the run's settings, precision/plan.py)."""
    if value is None:
        return {}
    if isinstance(value, str):
        parsed = word(value.strip().lower())
        if parsed is None:
            raise ConfigError(f"{where}: unknown format {value!r}; e.g. int8, int4, mxfp8"
                              + (", none" if cls is ActivationQuantConfig else ""))
        return parsed
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping or a format name, got {value!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; expected one of {', '.join(sorted(names))}")
    fmt = value.get("format")
    fixed = (FORMAT_SETTINGS if cls is WeightQuantConfig else ACT_FORMAT_SETTINGS).get(fmt, {})
    return {**fixed, **value}


EMBEDDING_BITS = (8, 4, "float")
LM_HEADS = ("quantize", "float")


@dataclass
class EmbeddingConfig:
    """Constant-table Gathers (token embeddings) and the lm_head (graph/embeddings.py, export/gather.py).

    ``bits``: 8, 4 or float. A table has no activations to solve against, so it is rounded to nearest, per token
    vector with blocks of ``group_size`` along the hidden axis (None: one scale per row at 8 bits, 32 at 4 bits;
    else a power of two >= 16, what onnxruntime's GatherBlockQuantized takes). ``lm_head``: quantize (the head is a
    target like any other, a head tied to the embedding through a Transpose gets its own copy) or float.
    """

    bits: int | str = 8
    group_size: int | None = None
    symmetric: bool = False
    lm_head: str = "quantize"

    def validate(self) -> None:
        if self.bits not in EMBEDDING_BITS or isinstance(self.bits, bool):
            raise ConfigError(f"embeddings.bits must be 8, 4 or float, got {self.bits!r}")
        _choice("embeddings.lm_head", self.lm_head, LM_HEADS)
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 0
                              or (g and (g < 16 or g & (g - 1)))):
            raise ConfigError(f"embeddings.group_size must be null (auto), 0 (one scale per row) or a power of two "
                              f">= 16, got {g!r}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"embeddings.symmetric must be true or false, got {self.symmetric!r}")

    @property
    def enabled(self) -> bool:
        return self.bits != "float"

    @property
    def block(self) -> int:
        """Weights per scale along the hidden axis; 0: one per row."""
        if self.group_size is not None:
            return self.group_size
        return 0 if self.bits == 8 else 32

@dataclass
class QuantConfig:
    weights: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    activations: ActivationQuantConfig = field(default_factory=ActivationQuantConfig)
    rounding: RoundingConfig = field(default_factory=RoundingConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    exclude: list[str] = field(default_factory=list)  # regular expressions matched against node names
    device: str = "auto"
    seed: int = 0

    def validate(self) -> "QuantConfig":
        for section in (self.weights, self.activations, self.rounding, self.capture, self.export, self.transforms,
                        self.precision,
                        self.embeddings):
            section.validate()
        _choice("device", self.device, DEVICES)
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"exclude pattern {pattern!r} is not a valid regular expression: {err}") from None
        return self

    def resolved(self) -> "QuantConfig":
        """The settings left to the tool (None) decided, as the run uses them and OUT.config.yaml records them."""
        w, updates = self.weights, {}
        if w.full_range is None:
            updates["weights.full_range"] = (self.export.dialect == "matmulnbits" and w.format == "int"
                                             and w.symmetric and not w.narrow)
        if self.export.accuracy_level is None:
            updates["export.accuracy_level"] = 0
        return self.override(updates) if updates else self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "QuantConfig":
        return _build(cls, data or {}, source, "").validate()

    def override(self, updates: dict[str, Any]) -> "QuantConfig":
        """Return a copy with dotted keys replaced, e.g. ``{"weights.bits": 3}`` (flags win over recipes)."""
        data = self.to_dict()
        for dotted, value in updates.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            if leaf not in node:
                raise ConfigError(f"unknown option {dotted!r}")
            node[leaf] = value
        return QuantConfig.from_dict(data, source="flags")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'the recipe'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key {prefix + key!r}; expected one of {', '.join(sorted(fields))}"
            )
        sub = _SECTIONS.get(key) if cls is QuantConfig else None
        if sub is not None:
            kwargs[key] = _build(sub, value, source, prefix + key + ".")
        elif key == "max_memory":
            kwargs[key] = parse_bytes(value, f"{source}: {prefix}{key}")
        else:
            kwargs[key] = value
    if "exclude" in kwargs and not isinstance(kwargs["exclude"], list):
        raise ConfigError(f"{source}: exclude must be a list of patterns")
    return cls(**kwargs)


_SECTIONS = {
    "weights": WeightQuantConfig,
    "activations": ActivationQuantConfig,
    "rounding": RoundingConfig,
    "capture": CaptureConfig,
    "export": ExportConfig,
    "transforms": TransformConfig,
    "precision": PrecisionConfig,
    "embeddings": EmbeddingConfig,
}

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40}


def parse_bytes(value: Any, what: str = "size") -> int:
    """'4GB', '512M', 1024 -> bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size such as 4GB, got {value!r}")
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?B?)\s*", str(value).upper())
    if not match:
        raise ConfigError(f"{what} must be a size such as 4GB or 512MB, got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


# ---------------------------------------------------------------------------------------------------- recipes

def recipe_dir() -> Path:
    """The built-in recipes: the checkout's top-level recipes/ folder, or its installed copy in the package."""
    source = Path(__file__).resolve().parent.parent / "recipes"
    if source.is_dir():
        return source
    return Path(str(resources.files("qronos_onnx.recipes")))


def list_recipes() -> dict[str, str]:
    """name -> first comment line of the recipe (its one-line description)."""
    out = {}
    for path in sorted(recipe_dir().glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        out[path.stem] = first.lstrip("# ").strip()
    return out


def yaml_error_line(err: Exception, path: Path | str) -> str:
    """PyYAML's several-line message (with a ``^`` under the spot) as one line: file:line:column: problem."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = " ".join(str(p) for p in (getattr(err, "context", None), getattr(err, "problem", None)) if p)
    return f"{where}: not valid YAML: {problem or str(err).splitlines()[0]}"


def load_recipe(name_or_path: str) -> QuantConfig:
    """A built-in recipe by name, or a YAML file by path."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = recipe_dir() / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown recipe {name_or_path!r}; built-in recipes are: {', '.join(list_recipes())} "
                "(or give the path of a .yaml file)"
            )
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {yaml_error_line(err, path)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe {str(path)!r} cannot be read: {err}") from None
    return QuantConfig.from_dict(data or {}, source=f"recipe {path.name}")
