"""Command line: ``qronos-onnx quantize | inspect | recipes | eval | report``.

Every error is one line on stderr: a bad input (``QronosError``, a file the system refuses, a model or input that
onnxruntime rejects) exits 2, anything else is an internal error and exits 3; ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from . import __version__
from .checkpoint import interrupt_report, sigterm_as_interrupt
from .config import (ACT_CALIBRATIONS, ALGORITHMS, DIALECTS, FORMAT_SETTINGS, REFERENCE_MODES, SCALE_METHODS,
                     WEIGHT_FORMATS, QuantConfig, list_recipes, load_recipe, parse_bytes)
from .errors import ConfigError, QronosError

# flag -> recipe; the last five quantize activations too (recipes/*.yaml say how). --w2 / --w158 are HIP (Hadamard
# rotation) + MagR, as the paper's 2-bit runs; the plain 2-bit recipe stays available as --recipe w2. --w3 is HIP
# with MSE scales (w3-hip): Qronos SmolLM2 ppl 43.64 -> 24.93, MiniLM top-1 0.6125 -> 0.6565, the PP-OCR and MNIST
# CNNs within 0.002 (docs/transforms.md); the plain min-max recipe stays available as --recipe w3.
PRESETS = {"w8": "w8", "w4": "w4", "w3": "w3-hip", "w2": "w2-hip-magr", "w158": "w158-hip-magr", "w4a4": "w4a4",
           "w4a8": "w4a8", "w8a8": "w8a8", "mxfp4": "mxfp4", "fp8": "fp8"}


INTERNAL_ERROR = 3  # exit code of an unexpected exception (a bug); bad inputs exit 2 (QronosError.exit_code)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        self.exit(2, f"qronos-onnx: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qronos-onnx", description="Post-training quantization of ONNX models (Qronos, GPTQ, GPFQ, RTN).")
    p.add_argument("--version", action="version", version=f"qronos-onnx {__version__}")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also after the command)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model's weights with calibration data")
    q.add_argument("model", help="input ONNX model, or an onnxruntime-genai model folder (never modified)")
    q.add_argument("--calib", help="calibration data: .npz directory or file, or .txt/.jsonl text; may be omitted "
                                    "for weight-only --algo rtn (data-free: no capture, no output errors in the "
                                    "report)")
    q.add_argument("-o", "--output", required=True,
                   help="output ONNX path, or output folder for a genai folder (written atomically)")
    q.add_argument("--recipe", help="built-in recipe name (see `qronos-onnx recipes`) or a YAML file")
    preset = q.add_mutually_exclusive_group()
    for name in PRESETS:
        preset.add_argument(f"--{name}", dest="preset", action="store_const", const=name,
                            help=f"preset: recipe '{PRESETS[name]}'")
    q.add_argument("--algo", choices=ALGORITHMS, help="rounding algorithm (default qronos)")
    q.add_argument("--bits", type=int, help="weight bits, 2..8")
    q.add_argument("--group-size", type=int, help="weights per scale along the input dim; 0 = per output channel")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True, help="symmetric weight grid")
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False, help="asymmetric weight grid")
    full = q.add_mutually_exclusive_group()
    full.add_argument("--full-range", dest="full_range", action="store_const", const=True,
                      help="symmetric integer weights: each group's largest-magnitude value lands on -2^(bits-1) "
                           "with a scale of its sign (a step of amax/8 at 4 bits instead of amax/7, as onnxruntime's "
                           "own int4 quantizer does). Default: on for MatMulNBits output, off for QDQ (a compiler "
                           "may refuse negative scales)")
    full.add_argument("--no-full-range", dest="full_range", action="store_const", const=False,
                      help="symmetric integer weights on the +-(2^(bits-1)-1) grid, also for MatMulNBits output")
    q.add_argument("--scale-method", choices=SCALE_METHODS, help="min-max or MSE-searched weight scales")
    q.add_argument("--format", choices=WEIGHT_FORMATS,
                   help="weight format: int grid, OCP MX (mxfp4, mxfp8, mxint8; blocks of 32) or per-channel fp8")
    q.add_argument("--dialect", choices=DIALECTS,
                   help="export form: qdq (runs in onnxruntime; the default for ONNX files), mx (canonical opset-24 "
                        "MX for compilers), matmulnbits (com.microsoft.MatMulNBits for integer MatMul weights; the "
                        "default for genai folders)")
    q.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4),
                   help="MatMulNBits accuracy_level attribute: 0 computes in float (exact); 4 quantizes activations "
                        "to int8 per block (onnxruntime's fast CPU kernels). Default: 4 for a genai folder that runs "
                        "on the CPU or WebGPU (as genai's model builder writes), else 0")
    q.add_argument("--act-calibration", choices=ACT_CALIBRATIONS,
                   help="static activation scales from min-max, a percentile (--act-percentile) or an MSE search")
    q.add_argument("--act-percentile", type=float, help="percentile for --act-calibration percentile (e.g. 99.99)")
    q.add_argument("--act-clip", type=float, metavar="RATIO",
                   help="dynamic integer activations: each token's range times RATIO (0.5-1; QuaRot uses 0.9): the "
                        "largest values saturate, the rest get a finer step")
    q.add_argument("--reduce-range", action="store_true", default=None,
                   help="7-bit integer weights: onnxruntime's u8 x s8 W8A8 kernels saturate with full-range int8 "
                        "weights on x86 CPUs without VNNI")
    q.add_argument("--rotate", nargs="?", const="online", choices=("online", "fused"), default=None,
                   help="Hadamard rotations before quantizing, which spread activation outliers (what INT4 "
                        "activations need on LLMs): 'online' (default) puts a float rotation in front of every "
                        "MatMul/Gemm input; 'fused' folds them into the weights of a decoder's residual stream "
                        "(QuaRot: one float rotation per block left, at down_proj; two with quantized activations), falling back to online when the "
                        "graph is not a recognised pre-norm decoder")
    q.add_argument("--outlier-channels", metavar="auto|N",
                   help="with --rotate fused and quantized activations: residual channels left out of the rotation "
                        "and read by small float MatMuls, so that a massive channel does not set every token's range "
                        "(auto, the default: those holding >= 8x a channel's share of the normalized energy, at most "
                        "1/16 of the width; 0: none; N: the N largest)")
    q.add_argument("--magr", nargs="?", const=0.01, type=float, metavar="ALPHA",
                   help="MagR: shrink each weight row's largest magnitudes before rounding (200 proximal-gradient "
                        "steps on the float inputs' Gram matrix; ALPHA default 0.01); for 2-3 bit weights")
    q.add_argument("--smoothquant", type=float, metavar="ALPHA",
                   help="SmoothQuant: per-input-channel scales max|X|^ALPHA / max|W|^(1-ALPHA) folded into the "
                        "preceding norm or MatMul (else an explicit Mul); for static INT8 activations, e.g. 0.5")
    q.add_argument("--embeddings", choices=("float", "8", "4"),
                   help="constant-table Gathers (token embeddings), rounded to nearest per token vector: 8 (default: "
                        "one scale per row, no measurable cost), 4 (blocks of 32) or float; written as "
                        "com.microsoft.GatherBlockQuantized (DequantizeLinear -> Gather for --dialect mx)")
    q.add_argument("--lm-head", choices=("quantize", "float"),
                   help="the lm_head MatMul: quantize (default; a head tied to the embedding through a Transpose "
                        "gets its own copy, quantized on its own grid) or float")
    q.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="regular expression on node names to leave in float (repeatable; Gather nodes too)")
    q.add_argument("--layer-config", metavar="FILE",
                   help="YAML of per-layer settings: node-name regular expression -> weight format/bits/group size "
                        "and/or activation format, or float (e.g. '/conv1/: int8', 'head: float'); applied after "
                        "the recipe or preset, later rules winning, and before --target-bits")
    q.add_argument("--target-bits", type=float, metavar="B",
                   help="average bits per weight (scales and zero points counted) the run may spend: the targets "
                        "whose promotion (int4 -> int8, mxfp4 -> mxfp8, with their activations) lowers the model's "
                        "output error most per added bit are promoted until B is reached")
    q.add_argument("--sensitivity-rounds", type=int, metavar="N",
                   help="--target-bits: measure the promotions' benefit N times, each in the model with the earlier "
                        "rounds' promotions (default 3; 1 is about 1.5x a uniform run's time, 3 about 2x, and finds "
                        "the promotions that only help together, docs/mixed_precision.md)")
    q.add_argument("--samples", type=int, help="use at most this many calibration samples")
    q.add_argument("--seq-len", type=int, help="window length in tokens for text calibration data")
    q.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json for text calibration data")
    q.add_argument("--special-tokens", action="store_true", default=None,
                   help="text calibration: wrap each window in the tokenizer's special tokens ([CLS] ... [SEP]), "
                        "as encoders see them at run time")
    q.add_argument("--seed", type=int, help="seed for sampling windows and the solver's power iteration")
    q.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the rounding math runs")
    q.add_argument("--reference", choices=REFERENCE_MODES,
                   help="X from the float model ('float', default) or the float segment on quantized inputs ('local')")
    q.add_argument("--max-memory", help="RAM for captured activations before spilling to disk, e.g. 4GB")
    q.add_argument("--damping", type=float, help="override the algorithm's damping (GPTQ: relative to mean diag; "
                                                  "Qronos: alpha times sigma_max, default 1e-6 weight-only with >= 32 "
                                                  "calibration tokens per input, else 1e-3)")
    q.add_argument("--no-act-order", dest="act_order", action="store_false", default=None,
                   help="process columns in their natural order instead of by decreasing diag(H)")
    q.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    q.add_argument("--quiet", action="store_true", help="no progress bars or table")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same OUTPUT from its last completed wave (checkpoint in "
                        "OUTPUT.qronos-resume/); the result is byte-identical to an uninterrupted run")
    q.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                   help="do not checkpoint after each wave (saves the disk space and write time; no --resume)")
    q.add_argument("--distributed", action="store_true",
                   help="one rank of a torchrun launch (torchrun --nproc-per-node N -m qronos_onnx quantize ... "
                        "--distributed): calibration and solves split over the ranks, gloo on CPU, NCCL on CUDA; "
                        "rank 0 writes a file byte-identical to one process's (docs/scaling.md)")
    q.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --distributed: how long a rank waits for another before failing (default 1800)")

    i = sub.add_parser("inspect", help="list a model's opset, inputs and quantizable nodes")
    i.add_argument("model")
    i.add_argument("--exclude", action="append", default=None, metavar="PATTERN")

    sub.add_parser("recipes", help="list the built-in recipes")
    _add_eval_parser(sub)

    r = sub.add_parser("report", help="print the per-layer table of a finished run from its OUT.report.json")
    r.add_argument("report", help="the .report.json written next to a quantized model")
    r.add_argument("--top", type=int, default=10, help="worst layers to list (default 10; 0 = all)")
    r.add_argument("--plot", metavar="PNG", help="also draw the per-layer errors (RTN vs the algorithm) into PNG")
    r.add_argument("--overwrite", action="store_true", help="--plot: replace an existing PNG")

    for name, sp in sub.choices.items():  # --debug is accepted after the command too
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model (and compare it with another): perplexity or a task metric")
    e.add_argument("model", help="ONNX model or onnxruntime-genai folder to evaluate (e.g. the float model)")
    e.add_argument("--compare", metavar="OTHER.onnx", help="a second model (e.g. the quantized one), shown beside it")
    e.add_argument("--task", required=True, action="append", choices=("ppl", "retrieval", "topic", "classify",
                                                                         "textdir"),
                   help="ppl: wiki-leads perplexity (causal LM); retrieval/topic: the sentence-encoder tasks; "
                        "classify: image top-1; textdir: PP-OCR text-direction top-1 on the lines of "
                        "`tools/assets.py ppocr` (repeatable)")
    e.add_argument("--tokenizer", help="tokenizer folder (default: the one next to MODEL or OTHER)")
    e.add_argument("--text", help="ppl: a .txt file to score instead of the wiki-leads test split")
    e.add_argument("--seq-len", type=int, default=256, help="ppl: window length in tokens (default 256)")
    e.add_argument("--windows", type=int, default=64, help="ppl: number of windows, 0 = all (default 64)")
    e.add_argument("--images", help="classify: .npz with keys input and label (default: the MNIST test set)")
    e.add_argument("--articles", type=int, default=2000, help="retrieval/topic: articles sampled (default 2000)")
    e.add_argument("--seed", type=int, default=0, help="retrieval/topic: seed of the article sample (default 0)")
    e.add_argument("--batch-size", type=int, help="inputs per onnxruntime call")
    e.add_argument("--accuracy-level", default="0", choices=("0", "1", "2", "3", "4", "default"),
                   help="session.qdq_matmulnbits_accuracy_level: 0 = exact (default); 4 = int8 activations in "
                        "MatMulNBits; 'default' leaves onnxruntime's choice")
    e.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bars (they go to stderr)")
    e.add_argument("--progress", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for scripts


def _outlier_channels(text: str | None) -> int | str | None:
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--outlier-channels takes 'auto' or a whole number (0: none), got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> QuantConfig:
    """Recipe (or preset), then each flag that was given on top of it."""
    if args.recipe and args.preset:
        raise ConfigError(f"give either --recipe or --{args.preset}, not both")
    base = load_recipe(args.recipe or PRESETS.get(args.preset or "", "w4"))
    updates = {
        "rounding.algorithm": args.algo,
        "weights.bits": args.bits,
        "weights.group_size": args.group_size,
        "weights.symmetric": args.symmetric,
        "weights.scale_method": args.scale_method,
        "weights.format": args.format,
        "export.dialect": args.dialect,
        "export.accuracy_level": args.accuracy_level,
        "weights.full_range": args.full_range,
        "activations.calibration": args.act_calibration,
        "activations.percentile": args.act_percentile,
        "activations.clip_ratio": args.act_clip,
        "capture.samples": args.samples,
        "capture.seq_len": args.seq_len,
        "capture.special_tokens": args.special_tokens,
        "transforms.rotate": args.rotate,
        "transforms.outlier_channels": _outlier_channels(args.outlier_channels),
        "transforms.magr": args.magr,
        "transforms.smoothquant": args.smoothquant,
        "embeddings.bits": None if args.embeddings is None else (args.embeddings if args.embeddings == "float"
                                                                 else int(args.embeddings)),
        "embeddings.lm_head": args.lm_head,
        "capture.reference": args.reference,
        "capture.max_memory": parse_bytes(args.max_memory, "--max-memory") if args.max_memory else None,
        "rounding.damping": args.damping,
        "rounding.act_order": args.act_order,
        "seed": args.seed,
        "device": args.device,
    }
    # a non-integer --format fixes bits / group size / symmetry: fill them unless given (then validation checks them)
    for key, value in FORMAT_SETTINGS.get(args.format or "", {}).items():
        if updates.get(f"weights.{key}") is None:
            updates[f"weights.{key}"] = value
    if args.reduce_range:
        if (args.format or base.weights.format) != "int" or (args.bits or base.weights.bits) not in (7, 8):
            raise ConfigError("--reduce-range applies to 8-bit integer weights (it makes them 7-bit)")
        updates["weights.bits"] = 7
    cfg = base.override({k: v for k, v in updates.items() if v is not None})
    if args.exclude:
        cfg = cfg.override({"exclude": list(cfg.exclude) + args.exclude})
    if getattr(args, "layer_config", None):
        cfg = cfg.override({"precision.layers": list(cfg.precision.layers) + load_layer_config(args.layer_config)})
    if getattr(args, "target_bits", None) is not None:
        cfg = cfg.override({"precision.target_bits": args.target_bits})
    if getattr(args, "sensitivity_rounds", None) is not None:
        if cfg.precision.target_bits is None:
            raise ConfigError("--sensitivity-rounds applies to a --target-bits run (the recipe sets no target_bits)")
        cfg = cfg.override({"precision.sensitivity_rounds": args.sensitivity_rounds})
    return cfg


def load_layer_config(path: str) -> list[dict]:
    """--layer-config FILE: a mapping (pattern -> settings) or a list of rules, optionally under 'layers'."""
    import yaml

    from .config import normalize_layer_rules, yaml_error_line

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--layer-config {path!r} " + ("is not a file" if p.exists() else "does not exist"))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"--layer-config {yaml_error_line(err, p)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--layer-config {path!r} cannot be read: {err}") from None
    if isinstance(data, dict) and set(data) == {"layers"}:
        data = data["layers"]
    if not data:
        raise ConfigError(f"--layer-config {path!r} holds no rules")
    return normalize_layer_rules(data, f"--layer-config {p.name}")


def _quantize(args: argparse.Namespace) -> int:
    from . import genai
    from .api import quantize

    cfg = config_from_args(args)
    dist = _distributed(args, cfg)
    if dist is not None:
        try:
            with genai.cache_dims(args.model):
                result = quantize(args.model, args.calib, args.output, cfg, tokenizer=args.tokenizer,
                                  overwrite=args.overwrite, quiet=args.quiet, resume=args.resume,
                                  checkpoint=args.checkpoint, distributed=dist)
        finally:
            dist.close()
        if not args.quiet and dist.is_main:
            print(format_summary(result))
        return 0
    if Path(args.model).is_dir():  # an onnxruntime-genai folder in, a genai folder out (genai.py)
        cfg = genai.default_dialect(cfg, dialect_given=bool(args.dialect))
        result = genai.quantize_folder(args.model, args.calib, args.output, cfg, tokenizer=args.tokenizer,
                                       overwrite=args.overwrite, quiet=args.quiet, resume=args.resume,
                                       checkpoint=args.checkpoint)
    else:
        with genai.cache_dims(args.model):  # a genai decoder file: its cache head size is in genai_config.json
            result = quantize(args.model, args.calib, args.output, cfg, tokenizer=args.tokenizer,
                              overwrite=args.overwrite, quiet=args.quiet, resume=args.resume,
                              checkpoint=args.checkpoint)
    if not args.quiet:
        print(format_summary(result))
    return 0


def _distributed(args: argparse.Namespace, cfg):
    """The process group for --distributed (None without it); a torchrun launch without the flag is refused, since
    every rank would then write the same output."""
    from .dist import DEFAULT_TIMEOUT, init_distributed, torchrun_world

    if not args.distributed:
        if args.dist_timeout is not None:
            raise ConfigError("--dist-timeout applies only with --distributed")
        if torchrun_world() > 1:
            raise ConfigError(f"launched as one of {torchrun_world()} torchrun ranks without --distributed: every "
                              "rank would quantize and write the same output; add --distributed")
        return None
    if Path(args.model).is_dir():
        raise ConfigError("--distributed takes an ONNX model file, not an onnxruntime-genai folder; give the "
                          "folder's decoder .onnx file")
    return init_distributed(cfg.device, args.dist_timeout if args.dist_timeout is not None else DEFAULT_TIMEOUT)


def format_summary(result, top: int = 10) -> str:
    cfg = result.config
    lines = [
        f"wrote {result.output_path} ({result.output_bytes / 1e6:.1f} MB), {len(result.layers)} weights, "
        f"{cfg.rounding.algorithm} "
        f"{'W' + str(cfg.weights.bits) if cfg.weights.format == 'int' else cfg.weights.format}"
        f"{' g' + str(cfg.weights.group_size) if cfg.weights.group_size else ' per-channel'}"
        f" {'sym' if cfg.weights.symmetric else 'asym'}, {result.n_samples} calibration samples"
        + (f", activations {_act_summary(cfg.activations)}" if cfg.activations.enabled else ""),
        "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
        + (f"; peak memory {result.peak_rss_bytes / 1e9:.2f} GB resident" if result.peak_rss_bytes else ""),
        f"config: {result.config_path}   report: {result.report_path}",
        "",
        "worst layers (relative output error ||XW - X~Q|| / ||XW||):" if not result.data_free else
        "layers (relative output error not measured: no calibration data):",
        f"{'node (weight)':<48} {'shape':>12} {cfg.rounding.algorithm:>9} {'rtn':>9}  status",
    ]
    mixed = bool((getattr(result, "precision", None) or {}).get("mixed"))
    for r in result.worst_layers(top if top > 0 else len(result.layers)):
        shape = "x".join(map(str, r.shape))
        # exporters name weights val_123; the consuming node's name is what a user finds in the graph
        label = (r.nodes[0] + (f" +{len(r.nodes) - 1}" if len(r.nodes) > 1 else "") if r.nodes else "") \
            + f" ({r.weight})"
        lines.append(f"{label[-48:]:<48} {shape:>12} {_err(r.rel_error)} {_err(r.rtn_rel_error)}  {r.status}"
                     + (f" ({r.retries} retries)" if r.retries else "")
                     + (f" [{r.weight_format}{', promoted' if r.plan_source == 'target-bits' else ''}]"
                        if mixed and r.weight_format else ""))
    prec = getattr(result, "precision", None) or {}
    if prec.get("mixed") or prec.get("target_bits") is not None:
        kinds: dict[tuple[str, str], int] = {}
        for r in result.layers:
            kinds[(r.weight_format, r.act_format)] = kinds.get((r.weight_format, r.act_format), 0) + 1
        line = (f"mixed precision: {prec.get('weight_bits_average', 0):.3f} bits per weight"
                + (f" (budget {prec['target_bits']:g}, {len(prec.get('promoted', []))} promoted by measured "
                   f"sensitivity in {prec.get('seconds', 0):.1f}s)" if prec.get("target_bits") is not None else "")
                + "; " + ", ".join(f"{n} x {w}" + (f" / act {a}" if a not in ("float", "") else "")
                                   for (w, a), n in sorted(kinds.items(), key=lambda kv: -kv[1])))
        lines.append(line)
    touched = [r for r in result.layers if r.transforms]
    if touched:
        kinds: dict[str, int] = {}
        for r in touched:
            for x in r.transforms:
                kinds[x] = kinds.get(x, 0) + 1
        lines.append("transforms: " + ", ".join(f"{k} on {n}" for k, n in sorted(kinds.items()))
                     + f"; {result.transforms.get('float_rotation_nodes', 0)} float rotation MatMul(s) in the output")
    for e in getattr(result, "embeddings", []) or []:
        lines.append(f"embedding table {e['table']} {'x'.join(map(str, e['shape']))}: {e['bits']}-bit "
                     f"{'g' + str(e['group_size']) if e['group_size'] else 'per row'} "
                     f"{'sym' if e['symmetric'] else 'asym'} round-to-nearest, {e['form']}"
                     + (f", rel. error {e['rel_error']:.4f}" if isinstance(e.get("rel_error"), float) else "")
                     + (f"; float copy kept for {', '.join(e['float_readers_kept'])}"
                        if e.get("float_readers_kept") else ""))
    head = getattr(result, "lm_head", {}) or {}
    if head.get("nodes") or head.get("untied"):
        untied = {u["node"]: u["table"] for u in head.get("untied", [])}
        lines.append(f"lm_head ({head.get('mode')}): " + ", ".join(
            n + (f" (untied from {untied[n]} in the output)" if n in untied else "") for n in head.get("nodes", [])))
    for note in result.transforms.get("notes", []):
        lines.append(f"note: {note}")
    noted = [r for r in result.layers if r.note and r.rel_error is not None]
    if result.data_free:
        lines.append("note: data-free run (no --calib): weights rounded to nearest, output errors not measured")
    if noted:
        lines.append(f"note: {len(noted)} weights have few calibration tokens, e.g. {noted[0].weight}: {noted[0].note}")
    return "\n".join(lines)


def _err(value: float | None) -> str:
    """A relative error in the table's 9 columns; '-' where it was not measured (data-free run)."""
    return f"{value:9.4f}" if value is not None else f"{'-':>9}"


def _act_summary(act) -> str:
    if act.format != "int":
        return act.format + ("" if act.dynamic else f" static ({act.calibration})")
    kind = "dynamic" if act.dynamic else f"static ({act.calibration})"
    clip = f" clip {act.clip_ratio:g}" if act.dynamic and act.clip_ratio != 1.0 else ""
    return f"A{act.bits} {act.granularity} {kind} {'sym' if act.symmetric else 'asym'}{clip}"


def _inspect(args: argparse.Namespace) -> int:
    from .calib import graph_input_specs
    from .calib.kv_cache import prefill_lines
    from .graph.model import default_opset, load_model
    from .graph.targets import find_targets
    from . import genai

    path = genai.resolve_model(args.model)  # a genai folder: its decoder
    model = load_model(path)
    targets = find_targets(model, args.exclude or [])
    print(f"model: {path}" + (f" (decoder of onnxruntime-genai folder {args.model})" if path != args.model else ""))
    print(f"opset: {default_opset(model)}   ir_version: {model.ir_version}   nodes: {len(model.graph)}")
    print("inputs:")
    for spec in graph_input_specs(model):
        print(f"  {spec.name}: {spec.describe()}")
    with genai.cache_dims(path):
        lines = prefill_lines(model)
    for line in lines:
        print(line)
    _print_quantized(model)
    print(f"quantizable nodes: {len(targets)}")
    print(f"  {'node':<48} {'op':<7} {'weight shape':<16} layout")
    for t in targets:
        if t.op_type == "Conv":
            c = t.conv
            layout = f"[OC, IC/g, k] group={c.group} kernel={list(c.kernel_shape)} stride={list(c.strides)}"
        elif t.op_type == "Gemm":
            layout = "[N, K] (transB=1)" if t.trans_b else "[K, N] (transB=0)"
        else:
            layout = "[K, N]"
        shared = f" shared with {', '.join(t.shared_with)}" if t.shared_with else ""
        print(f"  {t.name[-48:]:<48} {t.op_type:<7} {str(list(t.weight_shape)):<16} {layout}{shared}")
    from .graph.embeddings import find_embedding_tables, tied_heads

    tables = find_embedding_tables(model, args.exclude or [])
    print(f"embedding tables (constant-table Gathers, --embeddings): {len(tables)}")
    for e in tables:
        also = f", also read by {', '.join(e.other_readers)}" if e.other_readers else ""
        print(f"  {e.name[-48:]:<48} {str(list(e.shape)):<16} gathered by {', '.join(e.gathers)}{also}")
    for node, table in tied_heads(model):
        print(f"tied lm_head: {node} reads {table} through a Transpose (--lm-head quantize unties it in the output)")
    return 0


def _print_quantized(model) -> None:
    """What a qronos-onnx output says about itself: its formats, per node when the plan is mixed."""
    props = dict(model.metadata_props)
    if "quant.tool" not in props:
        return
    act = props.get("quant.act_format", "none")
    print(f"quantized by {props['quant.tool']}: {props.get('quant.algorithm', '?')}, weights "
          f"{props.get('quant.format', '?')} {props.get('quant.bits', '?')}-bit, activations {act}, "
          f"{props.get('quant.weight_bits_average', '?')} bits per weight on average"
          + (f" (--target-bits {props['quant.target_bits']})" if "quant.target_bits" in props else ""))
    formats = props.get("quant.layer_formats")
    if formats:
        try:
            table = json.loads(formats)
        except json.JSONDecodeError:
            print("  (quant.layer_formats is not valid JSON)")
            return
        print(f"per-node formats ({len(table)} quantized nodes):")
        print(f"  {'node':<48} {'weights':<24} activations")
        for node, (w, a) in table.items():
            print(f"  {node[-48:]:<48} {w:<24} {a}")


def _eval(args: argparse.Namespace) -> int:
    from .eval.report import EvalData, EvalOptions, evaluate, options_dict, side_by_side
    from .genai import resolve_model

    if args.tokenizer is None and Path(args.model).is_dir():
        args.tokenizer = args.model  # a genai folder holds its tokenizer
    args.model = resolve_model(args.model)  # a genai folder: its decoder file
    args.compare = resolve_model(args.compare) if args.compare else None

    opts = EvalOptions(tokenizer=args.tokenizer, text=args.text, seq_len=args.seq_len,
                       windows=None if args.windows == 0 else args.windows, images=args.images,
                       articles=args.articles, seed=args.seed, batch_size=args.batch_size,
                       accuracy_level=None if args.accuracy_level == "default" else int(args.accuracy_level)).validate()
    if opts.tokenizer is None and any(t not in ("classify", "textdir") for t in args.task):
        from .eval.tasks import default_tokenizer

        found = default_tokenizer(args.model, args.compare)
        opts.tokenizer = str(found) if found else None
    tasks = list(dict.fromkeys(args.task))
    if args.json:  # before the (long) evaluation, not after it
        _check_writable(args.json, "--json")
    if args.compare and any(t != "ppl" for t in tasks):  # ppl builds each model's own feeds (KV-cache graphs too)
        _check_same_inputs(args.model, args.compare)
    data = EvalData(opts)
    results = {}
    for model in [args.model] + ([args.compare] if args.compare else []):
        results[model] = evaluate(model, tasks, opts, data, quiet=args.quiet)
    print(side_by_side(results))
    if args.json:
        payload = {"tool": f"qronos-onnx {__version__}", "options": options_dict(opts), "tasks": tasks,
                   "models": results}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _input_signature(path: str) -> dict[str, str] | None:
    """graph input name -> 'type [dims]' of an ONNX file (weights not loaded); None if it cannot be read here."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - missing or corrupt: evaluate() says so in its own words
        return None
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else "?" for d in t.shape.dim]
        out[v.name] = f"{onnx.TensorProto.DataType.Name(t.elem_type).lower()} [{', '.join(map(str, dims))}]"
    return out


def _check_same_inputs(model: str, other: str) -> None:
    """--compare runs both models on the same data: refuse, before any work, models that take different inputs."""
    a, b = _input_signature(model), _input_signature(other)
    if a is None or b is None or a == b:
        return
    diff = [f"{n}: {a.get(n, 'absent')} vs {b.get(n, 'absent')}" for n in dict.fromkeys([*a, *b])
            if a.get(n) != b.get(n)]
    raise ConfigError(f"--compare: {Path(model).name} and {Path(other).name} take different inputs "
                      f"({'; '.join(diff)}); compare a model with its own quantized version")


def _check_writable(path: str, flag: str) -> None:
    import os

    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ConfigError(f"{flag} {path!r} is a directory; give a file name")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{flag} {path!r}: folder {str(parent)!r} is not writable")


def load_report(path: str | Path):
    """A QuantResult rebuilt from ``OUT.report.json`` (what ``format_summary`` prints); one-line ConfigErrors."""
    import dataclasses

    from .api import LayerReport, QuantResult
    from .config import QuantConfig

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"report file {str(p)!r} does not exist" if not p.exists()
                          else f"report {str(p)!r} is not a file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"report {p}:{err.lineno}:{err.colno}: not valid JSON: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"report {str(p)!r} cannot be read: {err}") from None
    what = f"report {str(p)!r} is not a qronos-onnx report"
    if not isinstance(data, dict):
        raise ConfigError(f"{what} (a JSON {type(data).__name__}, expected an object)")
    missing = [k for k in ("output", "config", "layers") if k not in data]
    if missing:
        raise ConfigError(f"{what} (no {', '.join(repr(k) for k in missing)})")
    if not isinstance(data["layers"], list) or not all(isinstance(x, dict) for x in data["layers"]):
        raise ConfigError(f"{what} ('layers' must be a list of objects)")
    known = {f.name for f in dataclasses.fields(LayerReport)}
    layers = []
    for i, entry in enumerate(data["layers"]):
        try:
            layers.append(LayerReport(**{k: v for k, v in entry.items() if k in known}))
        except TypeError as err:
            raise ConfigError(f"{what} (layer {i}: {err})") from None
        if not all(isinstance(getattr(layers[-1], k), (int, float, type(None)))
                   for k in ("rel_error", "rtn_rel_error")):
            raise ConfigError(f"{what} (layer {i}: rel_error and rtn_rel_error must be numbers or null)")
    if not isinstance(data["config"], dict):
        raise ConfigError(f"{what} ('config' must be an object)")
    config = QuantConfig.from_dict(data["config"], source=f"report {p.name}: config")
    out = Path(str(data["output"]))
    timings = data.get("timings_seconds") or {}
    return QuantResult(output_path=out, config_path=out.with_name(out.name + ".config.yaml"), report_path=p,
                       config=config, layers=layers, precision=data.get("precision") or {},
                       timings={k: float(v) for k, v in timings.items() if isinstance(v, (int, float))},
                       n_samples=int(data.get("calibration_samples") or 0),
                       output_bytes=int(data.get("output_bytes") or 0),
                       peak_rss_bytes=int(data.get("peak_rss_bytes") or 0),
                       embeddings=[e for e in data.get("embeddings") or [] if isinstance(e, dict)
                                   and {"table", "shape", "bits", "group_size", "symmetric", "form"} <= set(e)],
                       lm_head=data.get("lm_head") if isinstance(data.get("lm_head"), dict) else {})


def _report(args: argparse.Namespace) -> int:
    result = load_report(args.report)
    if args.plot:
        from .eval.report_plot import check_plot_path, write_plot

        check_plot_path(args.report, args.plot, args.overwrite)  # before printing anything
    print(format_summary(result, top=args.top))
    if args.plot:
        print(f"plot: {write_plot(args.report, args.plot, overwrite=args.overwrite)}")
    return 0


def _recipes(_args: argparse.Namespace) -> int:
    for name, desc in list_recipes().items():
        print(f"{name:<16} {desc}")
    return 0


COMMANDS = {"quantize": _quantize, "inspect": _inspect, "recipes": _recipes, "eval": _eval, "report": _report}


def one_line(text: object) -> str:
    """A message on one line: its non-blank lines joined (onnxruntime and PyYAML write several)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _user_error(err: BaseException) -> str | None:
    """What the user did wrong, for the exceptions that are not bugs of this tool; None for the others."""
    if isinstance(err, QronosError):
        return one_line(err) or type(err).__name__
    if isinstance(err, OSError) and err.strerror:  # a path the system refuses: missing, no permission, disk full
        where = f": {err.filename!r}" if err.filename else ""
        return f"{err.strerror}{where}"
    if type(err).__module__.startswith("onnxruntime"):  # a model or input onnxruntime rejects, outside our checks
        return f"onnxruntime rejected the model or its inputs: {one_line(err)}"
    if isinstance(err, MemoryError):
        return "out of memory (try --max-memory, fewer --samples, or a machine with more RAM)"
    return None


@sigterm_as_interrupt  # SIGTERM unwinds like Ctrl-C: temp files deleted, no partial output, checkpoint kept
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as err:  # Ctrl-C: 130, SIGTERM: 143
        line, code = interrupt_report(err)
        print(f"qronos-onnx: {line}", file=sys.stderr)
        return code
    except Exception as err:  # noqa: BLE001 - the one place every failure becomes one line
        if debug:
            traceback.print_exc()
        message = _user_error(err)
        if message is not None:
            print(f"qronos-onnx: error: {message}", file=sys.stderr)
            return getattr(err, "exit_code", 2)
        print(f"qronos-onnx: internal error: {type(err).__name__}: {one_line(err)}"
              + ("" if debug else " (rerun with --debug for the traceback)"), file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
