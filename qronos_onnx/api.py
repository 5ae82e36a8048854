"""quantize(): the whole pipeline, one stage per line of the data flow in docs/ARCHITECTURE.md."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from . import __version__
from .calib import load_calibration
from .capture import CaptureEngine
from .capture.act_calib import plan_activations, required_opset
from .checkpoint import Checkpoint, checkpoint_dir, open_checkpoint, read_manifest, sigterm_as_interrupt
from .dist import Distributed
from .config import ActivationQuantConfig, QuantConfig, WeightQuantConfig
from .errors import ConfigError, ExportError, ModelError
from .export import export_model, validate_export
from .export.gather import QuantizedTable, export_tables
from .export.qdq import default_opset, ir_version_for_opset, upgrade_opset
from .formats import IntGrid, QuantizedWeight, make_grid
from .formats import spill
from .formats.spill import SpilledWeights
from .formats.table import quantize_table
from .graph.io import OutputStage, check_output_path, run_inputs
from .graph.preflight import (Preflight, check_free_space, check_input_model, describe_ops, estimate_output_bytes,
                              quantized_ops)
from .graph.embeddings import (EmbeddingTable, find_embedding_tables, find_heads, tied_heads, untie_heads,
                               untie_transposed_tables)
from .graph.model import load_model, read_initializer
from .memory import peak_rss_bytes, trim
from .graph.schedule import build_schedule
from .precision import (AUTO_SAMPLES_MAX, LayerPlan, apply_target_bits, average_bits, is_mixed, promote,
                        resolve_plan, storage_bits)
from .threads import pinned_threads, threads_for, torch_threads
from .transforms import TransformLog
from .transforms.fused import FusedRotationUnsupported, fuse_rotations
from .transforms.magr import magr_batch
from .transforms.smoothquant import smooth_inputs
from .transforms.online import rotate_inputs
from .transforms.verify import run_float_model
from .graph.targets import (Target, find_targets, fold_constant_aliases, left_alone, untranspose_gemm_inputs,
                            weight_matrix)
from .rounding import reconstruction_errors, round_weights

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    """What happened to one weight: the figures behind the end-of-run table and report.json."""

    weight: str
    nodes: list[str]
    shape: list[int]
    algorithm: str
    rel_error: float | None  # ||XW - X~Q|| / ||XW|| from H, G, F; None: not measured (data-free run, no X)
    rtn_rel_error: float | None  # the same for round-to-nearest on the same grid: what the algorithm bought
    damping: float | None  # the lam actually used (absolute)
    retries: int
    status: str
    seconds: float
    note: str = ""  # e.g. too few calibration tokens for the layer's width
    alpha: float | None = None  # Qronos: the ridge relative to sigma_max(H) that was chosen
    n_tokens: int = 0  # calibration tokens (or im2col patches) behind H and G
    group_size: int = 0  # weights per scale along the input as written (the input width when per channel)
    transforms: list[str] = field(default_factory=list)  # what the transforms did to this weight or its input
    weight_format: str = ""  # e.g. "int4 asym per-channel", "mxfp8" (the plan of this weight)
    act_format: str = ""  # its nodes' activation quantizer, or "float"
    plan_source: str = "config"  # config | layer-config | target-bits (promoted by the bit budget)
    bits: float = 0.0  # storage bits per weight, scales and zero points counted (precision/plan.py)


@dataclass
class QuantResult:
    output_path: Path
    config_path: Path
    report_path: Path
    config: QuantConfig
    layers: list[LayerReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    n_samples: int = 0
    transforms: dict = field(default_factory=dict)  # TransformLog.to_dict(): notes, float rotation nodes
    output_bytes: int = 0
    peak_rss_bytes: int = 0  # the process's peak resident memory up to the report (ru_maxrss; see peak_rss_bytes())
    precision: dict = field(default_factory=dict)  # the bit budget and what it promoted (--target-bits)
    embeddings: list[dict] = field(default_factory=list)  # QuantizedTable.report() of each quantized table
    lm_head: dict = field(default_factory=dict)  # mode, head nodes, heads untied from a table
    waves: list[dict] = field(default_factory=list)  # per wave run here: target nodes, capture_s, round_s

    @property
    def data_free(self) -> bool:
        """No calibration data: the output errors were not measured (None in every layer)."""
        return bool(self.layers) and all(r.rel_error is None for r in self.layers)

    def worst_layers(self, n: int = 10) -> list[LayerReport]:
        return sorted(self.layers, key=lambda r: -(r.rel_error if r.rel_error is not None else -1.0))[:n]


DATA_FREE_NOTE = ("not measured: no calibration data was given (data-free round-to-nearest); the output error "
                  "needs the layer's inputs X")


def calibration_needs(cfg: QuantConfig) -> list[str]:
    """The settings of ``cfg`` that need calibration data, each named as its option (empty: RTN can run
    data-free). Per-layer activation rules are checked in quantize() once the plan is resolved."""
    needs = []
    if cfg.rounding.algorithm != "rtn":
        needs.append(f"--algo {cfg.rounding.algorithm} (rounding.algorithm: it solves with the inputs' second "
                     "moments; --algo rtn does not)")
    if cfg.activations.enabled:
        needs.append(f"activation quantization (activations.format {cfg.activations.format}, e.g. --w4a8/--w8a8 "
                     "presets: quantized inputs are captured and calibrated; use a weight-only preset)")
    if cfg.transforms.smoothquant is not None:
        needs.append("--smoothquant (transforms.smoothquant: scales from the inputs' channel ranges)")
    if cfg.transforms.magr is not None:
        needs.append("--magr (transforms.magr: uses the inputs' Gram matrix)")
    if cfg.transforms.rotate == "fused":
        needs.append("--rotate fused (transforms.rotate: the fused rotation is verified on a calibration sample; "
                     "--rotate online needs no data)")
    if cfg.precision.target_bits is not None:
        needs.append("--target-bits (precision.target_bits: promotions follow measured output sensitivity)")
    return needs


def _no_calibration_error(needs: list[str]) -> ConfigError:
    return ConfigError("no calibration data (--calib) was given, but " + "; ".join(needs) + " needs it; give "
                       "--calib, or drop " + ("that setting" if len(needs) == 1 else "those settings")
                       + " (weight-only --algo rtn runs without data)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


@sigterm_as_interrupt
def quantize(model_path: str | Path, calib: Any, output_path: str | Path, config: QuantConfig | None = None, *,
             tokenizer: str | None = None, overwrite: bool = False, quiet: bool = False, resume: bool = False,
             checkpoint: bool = True, distributed: Distributed | None = None) -> QuantResult:
    """Quantize ``model_path`` with calibration data ``calib`` and write the QDQ model to ``output_path``.

    ``calib`` is a directory of .npz files, one .npz, a text file (with ``tokenizer``), a list of feed dicts or an
    onnxruntime ``CalibrationDataReader``; ``None`` for data-free weight-only RTN (no capture runs, the report's
    output errors are null; any setting that needs data is refused, naming it). The input model is never modified;
    the output is written atomically, with the resolved config (``.config.yaml``) and the per-layer report
    (``.report.json``) beside it.

    After each wave the state is checkpointed in ``OUTPUT.qronos-resume/`` (``checkpoint=False``: not);
    ``resume=True`` continues an interrupted run from there, with a byte-identical output (see checkpoint.py).

    ``distributed`` (dist.init_distributed(), one call per rank): the calibration chunks are split over the ranks
    and the solver batches of each wave too; the output is byte-identical to one process's (every rank pins torch's
    threads to ``capture.threads`` as one process does). Only rank 0 writes (output, config, report); the others
    return the same layers with nothing written. No checkpoints are kept (and ``resume`` is refused).
    """
    if distributed is None:
        return _quantize(model_path, calib, output_path, config, tokenizer=tokenizer, overwrite=overwrite,
                         quiet=quiet, resume=resume, checkpoint=checkpoint, dist=None)
    if resume:
        raise ConfigError("--resume is not supported with --distributed (a distributed run keeps no checkpoint); "
                          "rerun without --resume")
    with distributed.failure_guard():
        return _quantize(model_path, calib, output_path, config, tokenizer=tokenizer, overwrite=overwrite,
                         quiet=quiet or not distributed.is_main, resume=False, checkpoint=False, dist=distributed)


def _quantize(model_path, calib, output_path, config, **kwargs) -> QuantResult:
    cfg = (config or QuantConfig()).validate().resolved()
    # torch's thread count changes a GEMM's last bits, and the solvers turn those into other codes: the whole run
    # (statistics, solvers, grids, transforms, sensitivity) uses the count capture.threads gives onnxruntime, not
    # the machine's or the caller's, which is restored afterwards (threads.py)
    with torch_threads(pinned_threads(cfg.capture.threads)):
        return _quantize_pinned(model_path, calib, output_path, cfg, **kwargs)


def _quantize_pinned(model_path, calib, output_path, cfg: QuantConfig, *, tokenizer, overwrite, quiet, resume,
                     checkpoint, dist: Distributed | None) -> QuantResult:
    t_start = time.perf_counter()
    data_free = calib is None
    if data_free and calibration_needs(cfg):
        raise _no_calibration_error(calibration_needs(cfg))
    out = check_output_path(model_path, output_path, overwrite)  # the cheap refusals before any loading
    if resume:
        read_manifest(out)  # no checkpoint: say so before loading anything
    model = load_model(model_path)
    check_output_path(model_path, out, overwrite, inputs=run_inputs(model_path, model, calib, tokenizer))
    say = _status(quiet)
    # refusals the output would meet, before any work; a data-free run has no capture to protect and validates its
    # output anyway, so it checks the input only when the output fails (_validate_data_free)
    preflight = None if data_free else check_input_model(model_path)
    fold_constant_aliases(model)
    # a head tied to the embedding through a Transpose gets its own copy of the table (the float function is the
    # same); it is then a target like any other, quantized on its own grid: the tie is undone in the output only
    untied = untie_heads(model, cfg.exclude) if cfg.embeddings.lm_head == "quantize" else []
    if cfg.embeddings.enabled and cfg.embeddings.lm_head == "quantize":  # genai-style tie: Gather(Transpose(W))
        untie_transposed_tables(model)
    rewritten = untranspose_gemm_inputs(model)
    targets = find_targets(model, cfg.exclude)
    heads = find_heads(model, targets, find_embedding_tables(model, cfg.exclude), untied)
    exclude = list(cfg.exclude)
    if cfg.embeddings.lm_head == "float":
        exclude += [f"^{re.escape(h)}$" for h in heads]
        targets = [t for t in targets if t.name not in heads]
        if not heads and not tied_heads(model):
            log.warning("note: --lm-head float: no lm_head found (a MatMul/Gemm from the hidden size of a gathered "
                        "table to its row count, or one reading a table through a Transpose); nothing kept float "
                        "for it")
    lm_head = {"mode": cfg.embeddings.lm_head, "nodes": heads,
               "untied": [dataclasses.asdict(u) for u in untied]}
    samples = [] if data_free else load_calibration(calib, model, samples=cfg.capture.samples, seed=cfg.seed,
                                                    seq_len=cfg.capture.seq_len, tokenizer=tokenizer,
                                                    special_tokens=cfg.capture.special_tokens)
    transform_log = TransformLog()
    rotations = _rotate(model, targets, cfg, samples, transform_log) if targets else []
    chosen = {t.name for t in targets}  # transforms never change which nodes are quantized (a tied head stays float)
    if rotations or cfg.transforms.rotate == "fused":
        exclude += [f"^{re.escape(name)}$" for name in rotations]  # the rotations stay float
        targets = [t for t in find_targets(model, exclude) if t.name in chosen]
    plans = resolve_plan(targets, cfg)  # --layer-config rules: per-target formats, or float
    if data_free:
        acting = sorted({p.rule for p in plans.values() if not p.is_float and p.activations.enabled})
        if acting:
            raise _no_calibration_error([f"activation quantization by layer rule {acting[0]!r} (--layer-config)"])
    everything = list(targets)  # the bit budget counts float-by-rule targets too
    floated = {n: p.rule for n, p in plans.items() if p.is_float}
    if floated:
        exclude += [f"^{re.escape(name)}$" for name in floated]
        targets = [t for t in targets if t.name not in floated]
        chosen -= set(floated)
        if not targets:
            raise ConfigError("the layer rules leave every quantizable node float; nothing to quantize")
    # the activation subgraphs run inside the capture's segments; the weights' opset is raised now too, so that a
    # model the converter cannot take is refused before capture, not after it (promotions included)
    dtypes = sorted({np.dtype(t.weight_dtype).name for t in targets})
    options = [p for t in targets for p in (plans[t.name], promote(plans[t.name]) if cfg.precision.target_bits
                                            is not None else None) if p is not None]
    act_opset = max((required_opset(p.activations, dtypes) for p in options), default=0)
    need = max(act_opset, max((_weight_export_opset(cfg, targets, p.weights) for p in options), default=0),
               _table_export_opset(cfg, find_embedding_tables(model, cfg.exclude)))
    if targets and default_opset(model) < need:
        upgrade_opset(model, need)
        model.ir_version = max(int(model.ir_version or 0), ir_version_for_opset(need))
        targets = [t for t in find_targets(model, exclude) if t.name in chosen]
    already = quantized_ops(model)
    if not targets:
        if already:
            raise ModelError(f"model {str(model_path)!r} is already quantized (it holds {describe_ops(already)}) and "
                             f"has no float MatMul/Gemm/Conv weight left; give the float model")
        raise ModelError(
            f"model {str(model_path)!r} has no quantizable node (MatMul/Gemm/Conv with a constant float weight)"
            + (" left after --exclude" if cfg.exclude else "")
        )
    if already:
        log.warning("note: model %s already holds %s; those parts are kept as they are, only float weights are "
                    "quantized", model_path, describe_ops(already))
    skipped = left_alone(model, targets, exclude, ignore=set(rotations))
    for item in skipped:
        if item["node"] in heads and cfg.embeddings.lm_head == "float":
            item["reason"] = "--lm-head float"
        elif item["node"] in floated:
            item["reason"] = f"float by layer rule {floated[item['node']]!r}"
    unexplained = [s for s in skipped if s["reason"] not in ("matches --exclude", "--lm-head float")
                   and not s["reason"].startswith("float by layer rule")]
    if unexplained:
        shown = "; ".join(f"{s['node']} ({s['reason']})" for s in unexplained[:3])
        log.warning("warning: %d MatMul/Gemm/Conv node(s) with a constant weight stay float: %s%s (listed in the "
                    "report under left_float)", len(unexplained), shown, ", ..." if len(unexplained) > 3 else "")
    _check_group_size(cfg, targets)
    check_free_space(out, estimate_output_bytes(model, targets, max((_weight_bits(p.weights) for p in options),
                                                                    default=8)))
    if cfg.transforms.smoothquant is not None:  # one float pass for the channel ranges (spec §4.1: after rotation)
        smooth_inputs(model, targets, samples, cfg.transforms.smoothquant, batch_size=cfg.capture.batch_size,
                      log=transform_log)
        targets = [t for t in find_targets(model, exclude) if t.name in chosen]
    for t in targets if cfg.transforms.magr is not None else []:  # applied per wave in _round_wave
        transform_log.touch(t.name, f"magr(alpha={cfg.transforms.magr})")
    device = resolve_device(cfg.device)
    stats_dtype = torch.float64 if cfg.rounding.stats_dtype == "float64" else torch.float32
    budget = None
    if cfg.precision.target_bits is not None:
        n_sens = cfg.precision.sensitivity_samples
        n_sens = min(n_sens, len(samples)) if n_sens else f"up to {min(AUTO_SAMPLES_MAX, len(samples))}"
        say(f"measuring each target's sensitivity for --target-bits {cfg.precision.target_bits:g} ({n_sens} samples)")
        budget = apply_target_bits(model, targets, everything, samples, plans, cfg, quiet=quiet)
        plans = budget.plans
        say(f"promoted {len(budget.promoted)} of {len(targets)} targets: {budget.final_bits:.3f} bits per weight "
            f"(budget {budget.target_bits:g}, {budget.base_bits:.3f} before)")
    t0 = time.perf_counter()
    acts = _plan_activations(model, targets, samples, plans, cfg, device)
    t_act_calib = time.perf_counter() - t0

    quantized = _code_store(targets)
    reports: list[LayerReport] = []
    waves: list[dict] = []  # this run's waves: targets, capture and rounding seconds
    ckpt = None
    t_capture0 = time.perf_counter()
    if data_free:  # nothing needs activations: round wave by wave in schedule order; no capture, no checkpoint
        say(f"rounding {len(targets)} weights to nearest without calibration data (no capture)")
        with torch_threads(1):  # elementwise passes only (threads.py)
            t_round = _round_data_free(model, targets, cfg, device, quantized, reports, plans)
        t_capture = None
    else:
        ckpt = (open_checkpoint(out, model_path, samples, cfg.to_dict(), resume) if dist is None or dist.is_main
                else Checkpoint(checkpoint_dir(out), {}))  # ranks > 0 write nothing, not even a removal
        quantized.update(ckpt.quantized())
        reports.extend(LayerReport(**r) for r in ckpt.reports())
        t_round = 0.0
        with CaptureEngine(model, targets, samples, cfg.capture, device=device, stats_dtype=stats_dtype,
                           act_quant=acts.act_quant() if acts else None, graph_hook=acts.graph_hook if acts else None,
                           quiet=quiet, dist=dist) as engine:
            total, done = sum(1 for w in engine.schedule.waves if w), ckpt.done
            if ckpt.manifest is not None:
                engine.resume_from(ckpt.engine_state())
            try:
                t_wave = time.perf_counter()
                for wave_targets, stats in engine.waves():
                    t0 = time.perf_counter()
                    new = _round_wave(model, wave_targets, stats, cfg, device, quantized, reports, plans, dist)
                    t_round += time.perf_counter() - t0
                    # per wave, so that a big model's cost can be read per layer kind (docs/scaling.md)
                    waves.append({"targets": [t.name for t in wave_targets], "capture_s": round(t0 - t_wave, 3),
                                  "round_s": round(time.perf_counter() - t0, 3)})
                    engine.set_weights(new)
                    del new, stats
                    trim()  # the wave's sessions, weights and statistics: given back before the next (memory.py)
                    done += 1
                    if checkpoint:
                        ckpt.save(engine, engine.wave, done, total, quantized, reports)
                    t_wave = time.perf_counter()
            except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: say how far the checkpoint got (cli.py prints it)
                err.qronos_progress = (ckpt.done if checkpoint else done, total, checkpoint and ckpt.done > 0)
                raise
        t_capture = time.perf_counter() - t_capture0 - t_round - ckpt.seconds
    by_name = {t.name: t for t in targets}
    for r in reports:
        r.transforms = sorted({x for n in r.nodes for x in transform_log.touched.get(n, [])})
        plan = plans[r.nodes[0]]
        r.weight_format, r.act_format, r.plan_source = plan.weight_label(), plan.act_label(), plan.source
        t = by_name[r.nodes[0]]
        r.bits = round(storage_bits(t, plan.weights) / math.prod(t.matrix_shape), 4)
    mixed = is_mixed({n: plans[n] for n in chosen})
    if dist is not None and not dist.is_main:  # rank 0 writes the files; this rank has the same layers
        return QuantResult(output_path=out, config_path=out.with_name(out.name + ".config.yaml"),
                           report_path=out.with_name(out.name + ".report.json"), config=cfg, layers=reports,
                           timings={"total": time.perf_counter() - t_start}, n_samples=len(samples))

    t0 = time.perf_counter()
    metadata = {
        "quant.tool": f"qronos-onnx {__version__}",
        "quant.algorithm": cfg.rounding.algorithm,
        "quant.format": cfg.weights.format,
        "quant.bits": str(cfg.weights.bits),
        "quant.group_size": str(cfg.weights.group_size),
        "quant.symmetric": str(cfg.weights.symmetric).lower(),
        "quant.reference": cfg.capture.reference,
        "quant.calibration_samples": str(len(samples)),
        "quant.act_format": "none",
        "quant.rotation": cfg.transforms.rotate,
        **(acts.metadata() if acts else {}),
        "quant.weight_bits_average": f"{average_bits(everything, plans):.4f}",
    }
    if mixed:  # what `qronos-onnx inspect OUT` shows per node
        metadata["quant.layer_formats"] = json.dumps(
            {t.name: [plans[t.name].weight_label(), plans[t.name].act_label()] for t in targets})
    if budget is not None:
        metadata["quant.target_bits"] = f"{budget.target_bits:g}"
    with torch_threads(1):  # elementwise passes only (threads.py)
        tables = _quantize_tables(model, cfg)
    if tables:
        metadata["quant.embeddings"] = str(cfg.embeddings.bits)
    metadata["quant.lm_head"] = cfg.embeddings.lm_head
    say(f"exporting {len(quantized)} quantized weights ({cfg.export.dialect})"
        + (f" and {len(tables)} embedding table(s) ({cfg.embeddings.bits}-bit)" if tables else ""))
    with torch_threads(1):
        export_model(model, quantized, targets, dialect=cfg.export.dialect, metadata=metadata,
                     accuracy_level=cfg.export.accuracy_level)
        if acts is not None:
            acts.apply(model)
        export_tables(model, tables, cfg.export.dialect)
    if untied:
        log.info("lm_head: %s untied from %s in the output (each quantized on its own grid)",
                 ", ".join(u.node for u in untied), ", ".join(sorted({u.table for u in untied})))
    config_path, report_path = out.with_name(out.name + ".config.yaml"), out.with_name(out.name + ".report.json")
    with OutputStage(out, overwrite=overwrite) as stage:  # nothing under the final names until all is checked
        say(f"writing {out.name}")
        staged = stage.write_model(model)
        say("validating the written file (onnx.checker, onnxruntime load and one sample, every weight read back "
            "bit-exact)")
        with torch_threads(1):
            if preflight is None:
                preflight = _validate_data_free(model_path, staged, quantized, targets, tables)
            else:
                validate_export(staged, quantized, targets, checker=preflight.checker_ok, tables=tables,
                                sample=next(iter(samples), None))
        t_export = time.perf_counter() - t0
        result = QuantResult(
            output_path=out,
            config_path=config_path,
            report_path=report_path,
            config=cfg,
            layers=reports,
            timings={**({"sensitivity": budget.seconds} if budget is not None else {}),
                     **({"act_calibration": t_act_calib} if acts and not cfg.activations.dynamic else {}),
                     **({"capture": t_capture} if t_capture is not None else {}), "rounding": t_round,
                     **({"checkpoint": ckpt.seconds} if checkpoint and ckpt is not None else {}),
                     **({"communication": dist.seconds} if dist is not None else {}),
                     "export": t_export,
                     "total": time.perf_counter() - t_start},
            n_samples=len(samples),
            output_bytes=_file_bytes(staged),
            peak_rss_bytes=peak_rss_bytes(),
            transforms=transform_log.to_dict(),
            precision={"weight_bits_average": round(average_bits(everything, plans), 4), "mixed": mixed,
                       **(budget.to_dict() if budget is not None else {})},
            embeddings=[qt.report() for qt in tables],
            lm_head=lm_head,
            waves=waves,
        )
        stage.write_text(config_path, _config_yaml(cfg, plans, everything, budget))
        report = _report_dict(result, model_path)
        report.update(precision=result.precision, left_float=skipped, gemm_transA_rewritten=rewritten, transforms=transform_log.to_dict(),
                      input_checker=("ok" if preflight.checker_message != _NOT_RUN else _NOT_RUN)
                      if preflight.checker_ok else f"rejected: {preflight.checker_message} "
                                                                        "(output validated by onnxruntime)")
        stage.write_text(report_path, json.dumps(report, indent=2))
        stage.commit()
    if ckpt is not None:
        ckpt.remove()
    if isinstance(quantized, SpilledWeights):
        quantized.close()
    return result


def _code_store(targets: list[Target]) -> dict[str, QuantizedWeight]:
    """Where the run keeps its quantized weights: on disk past ``spill.SPILL_MIN_BYTES`` of codes (one byte per
    weight), in memory below (formats/spill.py)."""
    sizes = {t.weight_name: math.prod(t.weight_shape) for t in targets}
    return SpilledWeights() if sum(sizes.values()) >= spill.SPILL_MIN_BYTES else {}


_NOT_RUN = "not run (data-free run: the output passes onnx.checker)"


def _validate_data_free(model_path, staged: Path, quantized, targets, tables) -> Preflight:
    """Validate a data-free run's output; only when it fails are the input's checks run, to say whose fault it is.

    The same refusals as check_input_model before the run: an input onnxruntime cannot load is refused naming the
    input, and an input the checker already rejects has its output validated by onnxruntime instead.
    """
    try:
        validate_export(staged, quantized, targets, checker=True, tables=tables)
        return Preflight(checker_ok=True, checker_message=_NOT_RUN, ort_ok=True)
    except ExportError:
        pre = check_input_model(model_path)  # raises ModelError naming the input when onnxruntime cannot load it
        if pre.checker_ok:
            raise
    validate_export(staged, quantized, targets, checker=False, tables=tables)
    return pre


def _rotate(model, targets: list[Target], cfg: QuantConfig, samples, transform_log: TransformLog) -> list[str]:
    """The rotation the config asks for; returns the float nodes inserted (rotations and the side MatMuls of outlier
    channels), which are excluded from quantization.

    ``fused`` falls back to online rotations of every MatMul/Gemm input, with a warning naming the node that broke the
    decoder pattern, when the graph is not one it recognises.
    """
    mode = cfg.transforms.rotate
    if mode == "none":
        return []
    online_targets = targets
    side: list[str] = []
    if mode == "fused":
        try:
            fused = fuse_rotations(model, targets, samples[0] if len(samples) else None, transform_log,
                                   seed=cfg.seed, run=run_float_model, block=_input_block(cfg),
                                   outlier_channels=_outlier_request(cfg))
            side = fused.float_side
            # a head-wise rotation keeps an outlier head's channels together: with quantized activations the
            # o_proj input also gets QuaRot's online rotation (per-token INT4 error 0.16-0.18 -> 0.12 on SmolLM2)
            head_inputs = set() if cfg.activations.enabled else {o for _, o, _ in fused.head_rotated}
            online_targets = [t for t in targets if t.name not in fused.readers and t.name not in head_inputs]
            transform_log.notes.append(
                f"fused rotation: D={fused.dim}, {fused.norms} {'LayerNorms' if fused.centred else 'norms'} folded"
                f"{' (writers centred)' if fused.centred else ''}, {len(fused.readers)} readers, "
                f"{len(fused.writers)} writers, {len(fused.head_rotated)} v/o head pairs; float outputs moved by "
                f"{fused.max_rel_diff:.1e} (relative)"
                + (f"; tied head(s) {', '.join(fused.tied_heads)} keep reading the embedding table, their norm "
                   f"scale as one {fused.dim}x{fused.dim} float MatMul" if fused.tied_heads else "")
                + (f"; {len(fused.outlier_channels)} residual channel(s) kept out of the rotation and read by "
                   f"{len(side)} float side MatMul(s): {fused.outlier_channels}" if side else ""))
        except FusedRotationUnsupported as err:
            log.warning("warning: --rotate fused does not apply to this graph (at %s: %s); using online rotations "
                        "instead", err.node, err.why)
            transform_log.notes.append(f"fused rotation not applied (at {err.node}: {err.why}); online instead")
    return rotate_inputs(model, online_targets, seed=cfg.seed, log=transform_log) + side


def _outlier_request(cfg: QuantConfig) -> int | str:
    """``auto`` acts where activations are quantized (measured there); a count is taken as asked, weight-only too."""
    request = cfg.transforms.outlier_channels
    return request if cfg.activations.enabled or request != "auto" else 0


def _input_block(cfg: QuantConfig) -> int:
    """The block along a MatMul's input axis that the weight or activation format groups by (1: none)."""
    w, a = cfg.weights, cfg.activations
    mx = w.format.startswith("mx") or (a.enabled and a.format.startswith("mx"))
    return max(w.group_size or 1, 32 if mx else 1)


def _quantize_tables(model, cfg: QuantConfig) -> list[QuantizedTable]:
    """Round every embedding table of the final float model (after the transforms) to nearest on its grid."""
    if not cfg.embeddings.enabled:
        return []
    out = []
    for t in find_embedding_tables(model, cfg.exclude):
        arr = read_initializer(model.graph.initializers[t.name])
        out.append(QuantizedTable(t, quantize_table(arr, cfg.embeddings, t.name)))
    return out


def _table_export_opset(cfg: QuantConfig, tables: list[EmbeddingTable]) -> int:
    """The opset the tables' DequantizeLinear form will need (0 when every table becomes GatherBlockQuantized),
    raised with the weights' before capture so that the export never converts the graph again."""
    if not cfg.embeddings.enabled:
        return 0
    need = 0
    for t in tables:
        bits, block = int(cfg.embeddings.bits), cfg.embeddings.block
        if cfg.export.dialect == "mx" or (bits == 4 and t.shape[1] % 2):
            per_row = not block or block >= t.shape[1]
            need = max(need, 21 if bits <= 4 or not per_row else (19 if np.dtype(t.dtype) == np.float16 else 13))
    return need


def _status(quiet: bool):
    """One line per stage on stderr, so that no stage runs silently for long (the capture has its own bar)."""
    def say(msg: str) -> None:
        if not quiet:
            print(f"qronos-onnx: {msg}", file=sys.stderr, flush=True)
    return say


def _weight_bits(weights: WeightQuantConfig) -> float:
    return {"mxfp4": 4, "mxfp8": 8, "mxint8": 8, "fp8": 8}.get(weights.format, weights.bits)


def _weight_export_opset(cfg: QuantConfig, targets: list[Target], weights: WeightQuantConfig | None = None) -> int:
    """The opset the QDQ export of integer weights will need (WeightEncoding.opset, decided from the config alone):
    4-bit containers and blocked scales 21, float16 scales 19, else 13. 0 where export decides (MX, MatMulNBits).
    ``weights``: the format to decide for (default the run's)."""
    w = weights or cfg.weights
    if w.format != "int" or cfg.export.dialect != "qdq" or not targets:
        return 0
    g = w.group_size
    if w.bits <= 4 or any(g and t.op_type != "Conv" and g < t.in_features for t in targets):
        return 21
    return 19 if any(np.dtype(t.weight_dtype) == np.float16 for t in targets) else 13


def _check_group_size(cfg: QuantConfig, targets: list[Target]) -> None:
    """A group as wide as a weight's input is one scale per output channel: say so instead of labelling it g{N}."""
    g = cfg.weights.group_size
    if cfg.weights.format != "int" or not g:
        return
    widths = {t.name: t.in_features for t in targets if t.op_type != "Conv"}  # Conv weights are per channel anyway
    wide = [n for n, k in widths.items() if k <= g]
    if widths and len(wide) == len(widths):
        raise ConfigError(f"--group-size {g} is not smaller than the input width of any MatMul/Gemm weight (widest "
                          f"K = {max(widths.values())}): every weight would get one scale per output channel; use "
                          f"--group-size 0 for per-channel, or a smaller group")
    if wide:
        log.warning("note: --group-size %d is not smaller than the input width of %d of %d MatMul/Gemm weight(s) "
                    "(e.g. %s, K = %d): those are quantized per output channel (the report gives each weight's "
                    "group_size)", g, len(wide), len(widths), wide[0], widths[wide[0]])


def _plan_activations(model, targets: list[Target], samples, plans: dict[str, LayerPlan], cfg: QuantConfig,
                      device: torch.device):
    """One ActivationPlan over targets that may use different activation formats (calibrated per format)."""
    groups: dict[ActivationQuantConfig, list[Target]] = {}
    for t in targets:
        a = plans[t.name].activations
        if a.enabled:
            groups.setdefault(a, []).append(t)
    merged = None
    for acfg, ts in groups.items():
        part = plan_activations(model, ts, samples, acfg, cfg.capture, device=device, seed=cfg.seed)
        if merged is None:
            merged = part
        else:
            merged.quantizers.update(part.quantizers)
            merged.opset = max(merged.opset, part.opset)
    if merged is not None and cfg.activations.enabled:
        merged.config = cfg.activations  # the run's format names the file's metadata; per node in layer_formats
    return merged


def _config_yaml(cfg: QuantConfig, plans: dict[str, LayerPlan], everything: list[Target], budget) -> str:
    """The resolved config: per-layer rules by exact node name wherever the plan differs from the run's formats,
    so that ``--recipe OUT.config.yaml`` redoes the same plan without measuring again."""
    data = cfg.to_dict()
    head = ""
    base = LayerPlan(cfg.weights, cfg.activations)
    rules = []
    for t in everything:
        p = plans.get(t.name)
        if p is None or (p.weights, p.activations) == (base.weights, base.activations):
            continue
        if p.is_float:
            rules.append({"match": f"^{re.escape(t.name)}$", "float": True})
            continue
        rule: dict[str, Any] = {"match": f"^{re.escape(t.name)}$"}
        if p.weights != cfg.weights:
            rule["weights"] = dataclasses.asdict(p.weights)
        if p.activations != cfg.activations:
            rule["activations"] = dataclasses.asdict(p.activations)
        rules.append(rule)
    if rules or budget is not None:
        data["precision"]["layers"] = rules
        if budget is not None:
            head = (f"# per-layer plan resolved from --target-bits {budget.target_bits:g} (measured sensitivity: "
                    f"{len(budget.promoted)} weights promoted, {budget.final_bits:.3f} bits per weight); with this "
                    "file as --recipe the same plan is used without measuring again\n")
            data["precision"]["target_bits"] = None
    return head + yaml.safe_dump(data, sort_keys=False)


# ------------------------------------------------------------------------------------------------ rounding a wave

@dataclass
class _Unit:
    """Weights solved together: targets sharing one input share H and G, so their rows stack into one problem."""

    names: list[str]
    targets: list[Target]
    W: torch.Tensor  # [groups, rows, cols]
    grid: IntGrid
    stats: Any
    row_splits: list[int]
    plan: LayerPlan  # weights and activations format: only units with the same plan are solved together


def _round_wave(model, wave_targets: list[Target], stats: dict | None, cfg: QuantConfig, device: torch.device,
                quantized: dict[str, QuantizedWeight], reports: list[LayerReport],
                plans: dict[str, LayerPlan] | None = None, dist: Distributed | None = None) -> dict[str, np.ndarray]:
    """Round one wave's weights; ``stats`` None: data-free RTN (no errors measured); ``dist``: spread the solver
    batches over the ranks."""
    plans = plans or {t.name: LayerPlan(cfg.weights, cfg.activations) for t in wave_targets}
    by_weight: dict[str, list[Target]] = {}
    for t in wave_targets:
        by_weight.setdefault(t.weight_name, []).append(t)
    new: dict[str, np.ndarray] = {}
    todo: list[_Unit] = []
    no_stats: dict[tuple, _NoStats] = {}  # data-free: one per input, so q/k/v still stack as with data
    for name, ts in by_weight.items():
        if name in quantized:  # a shared weight rounded in an earlier wave: consumers reuse it
            with torch_threads(1):
                new[name] = _onnx_weight(ts[0], quantized[name])
            continue
        if stats is not None and name not in stats:
            continue
        t = ts[0]
        scale_dtype = torch.float16 if t.weight_dtype == np.float16 else torch.float32
        plan = plans[t.name]
        with torch_threads(1):  # copies, min/max and elementwise passes only (threads.py)
            W = weight_matrix(model, t)
            grid = make_grid(W, plan.weights, scale_dtype, force_per_channel=(t.op_type == "Conv"), name=name)
        st = stats[name] if stats is not None else no_stats.setdefault((t.input_name, t.conv), _NoStats())
        todo.append(_Unit([name], ts, W, grid, st, [W.shape[1]], LayerPlan(plan.weights, plan.activations)))

    batches = _batches(_merge_shared_inputs(todo))
    # distributed: each batch is solved whole by one rank (the same call a single process makes, so the same bits)
    # and its result broadcast, so that every rank records the same codes and feeds its stream the same weights
    owners = dist.owners([_solve_cost(b) for b in batches]) if dist is not None else [0] * len(batches)
    solved = [_solve_batch(batch, stats is not None, cfg, device) if dist is None or owner == dist.rank else None
              for batch, owner in zip(batches, owners)]
    if dist is not None:
        solved = [dist.broadcast_object(s, src=owner) for s, owner in zip(solved, owners)]
    for batch, s in zip(batches, solved):
        _record_batch(batch, s, cfg, quantized, reports, new)
    return new


def _solve_cost(batch: list[_Unit]) -> float:
    """Relative solve time of a batch (factorization ~cols^3, column loop ~rows*cols^2), to balance the ranks."""
    return float(sum(u.W.shape[0] * (u.W.shape[2] ** 3 + u.W.shape[1] * u.W.shape[2] ** 2) for u in batch))


@dataclass
class _Solved:
    """One solver batch's outcome: all that recording it needs, with nothing left that needs H, G or F."""

    codes: torch.Tensor  # [B, rows, cols] int16
    grid: IntGrid  # the batch's grid (MagR may refit it)
    info: list[dict]
    errors: list[list[tuple[float | None, float | None]]]  # per unit, per weight name: (error, rtn error)
    seconds: float


def _solve_batch(batch: list[_Unit], measured: bool, cfg: QuantConfig, device: torch.device) -> _Solved:
    # [B, rows, cols]; a batch of one is used as it is (a copy of an lm_head is hundreds of MB)
    with torch_threads(1):  # copies (threads.py)
        W = torch.cat([u.W for u in batch]) if len(batch) > 1 else batch[0].W
        grid = _cat_grids([u.grid for u in batch]) if len(batch) > 1 else batch[0].grid
        H, G, F = ((torch.cat([getattr(u.stats, m) for u in batch]).to(device) if measured else None)
                   for m in "HGF")
    t0 = time.perf_counter()
    plan = batch[0].plan
    V = W  # MagR (spec §4.5, §2.4): grid and solver start from V = MagR(W) on the float F; W stays the reference
    if cfg.transforms.magr is not None:
        V, grid = magr_batch(batch, W, F, dataclasses.replace(cfg, weights=plan.weights), device)
    n_tokens = [u.stats.n_tokens for u in batch for _ in range(u.W.shape[0])]
    # the solver's GEMMs (and MagR's, and the errors') run on the caller's threads: skinny GEMMs (a few columns,
    # many rows or tokens) give other bits on one thread than on two; small problems on one (threads.threads_for)
    solve_threads = threads_for(W.shape[-1])
    with torch_threads(solve_threads):
        res = round_weights(V.to(device), grid.to(device), H, G, cfg.rounding, act_quant=plan.activations.enabled,
                            seed=cfg.seed, n_tokens=n_tokens, device=device, W0=None if V is W else W.to(device))
    seconds = (time.perf_counter() - t0) / len(batch)
    errors: list[list[tuple[float | None, float | None]]] = []
    if measured:
        with torch_threads(1):
            grid_d = grid.to(device)
            Q = grid_d.decode(res.codes.to(device).float())
            Wd = W.to(device).float()
            # errors are against the original W either way; RTN's own codes are the RTN candidate (measure once)
            Q_rtn = Q if cfg.rounding.algorithm == "rtn" else grid_d.round(V.to(device).float())
        # a unit of several weights (q/k/v, gate/up solved as one) is measured per weight below: the whole-batch
        # errors are needed only for single-weight units (they cost as much as the solve's own products)
        if any(len(u.names) == 1 for u in batch):
            with torch_threads(solve_threads):  # small: one thread; the errors' last bits may differ from two
                errs = [e.cpu() for e in reconstruction_errors(Wd, [Q] if Q_rtn is Q else [Q, Q_rtn], H, G, F)]
            err, rtn_err = errs[0], errs[-1]
    b0 = 0
    for u in batch:
        g = u.W.shape[0]
        sl = slice(b0, b0 + g)
        # per-unit error: combine conv groups by their share of ||XW||^2 (equal weight is close enough here)
        e, e_rtn = (float(err[sl].mean()), float(rtn_err[sl].mean())) if measured and len(u.names) == 1 \
            else (None, None)
        unit: list[tuple[float | None, float | None]] = []
        r0 = 0
        for rows in u.row_splits:
            if len(u.names) > 1 and measured:  # q, k and v solved as one problem: each its own rows' error
                rs = slice(r0, r0 + rows)
                errs = [float(x.mean()) for x in reconstruction_errors(
                    Wd[sl, rs], [Q[sl, rs]] if Q_rtn is Q else [Q[sl, rs], Q_rtn[sl, rs]], H[sl], G[sl], F[sl])]
                e, e_rtn = errs[0], errs[-1]
            unit.append((e, e_rtn))
            r0 += rows
        errors.append(unit)
        b0 += g
    return _Solved(codes=res.codes.cpu(), grid=grid.to("cpu"), info=res.info, errors=errors, seconds=seconds)


def _record_batch(batch: list[_Unit], s: _Solved, cfg: QuantConfig, quantized: dict[str, QuantizedWeight],
                  reports: list[LayerReport], new: dict[str, np.ndarray]) -> None:
    """QuantizedWeights, report rows and the quant stream's weights of one solved batch."""
    codes, grid = s.codes, s.grid
    b0 = 0
    for u, unit_errors in zip(batch, s.errors or [[(None, None)] * len(u.names) for u in batch]):
        measured = u.stats.H is not None
        g = u.W.shape[0]
        sl = slice(b0, b0 + g)
        info = s.info[b0]
        r0 = 0
        for name, rows, (e, e_rtn) in zip(u.names, u.row_splits, unit_errors):
            ucodes = codes[sl, r0 : r0 + rows]  # [groups, rows, cols]
            ugrid = grid.slice_rows(slice(r0, r0 + rows))
            qw = QuantizedWeight(
                codes=ucodes.reshape(-1, ucodes.shape[-1]),
                grid=_flat_grid(dataclasses.replace(ugrid, scale=ugrid.scale[sl],
                                                    zero_point=ugrid.zero_point[sl])),
                info={**info, "rel_error": e, "rtn_rel_error": e_rtn},
            )
            quantized[name] = qw
            ts = [t for t in u.targets if t.weight_name == name]
            if measured:  # a data-free run has no quant stream to feed
                with torch_threads(1):
                    new[name] = _onnx_weight(ts[0], qw)
            reports.append(LayerReport(
                weight=name, nodes=[t.name for t in ts], shape=list(ts[0].weight_shape),
                algorithm=cfg.rounding.algorithm, rel_error=e, rtn_rel_error=e_rtn,
                damping=info.get("damping"), retries=int(info.get("retries", 0)),
                status=str(info.get("status", "ok")), seconds=s.seconds,
                note=(_data_note(u.stats.n_tokens, u.W.shape[-1], cfg.rounding.algorithm) if measured
                      else "rel_error " + DATA_FREE_NOTE),
                alpha=info.get("alpha"), n_tokens=int(u.stats.n_tokens),
                group_size=int(getattr(ugrid, "group_size", 0) or 0),
            ))
            r0 += rows
        b0 += g


@dataclass
class _NoStats:
    """Stands in for LayerStats in a data-free run: no moments, no tokens."""

    H: None = None
    G: None = None
    F: None = None
    n_tokens: int = 0


def _round_data_free(model, targets: list[Target], cfg: QuantConfig, device: torch.device,
                     quantized: dict[str, QuantizedWeight], reports: list[LayerReport],
                     plans: dict[str, LayerPlan]) -> float:
    """Weight-only RTN without data: the capture schedule's waves in its order, so that the codes, the batches and
    the report's order are those of a run with calibration data. Returns the seconds spent."""
    t0 = time.perf_counter()
    for wave in build_schedule(model, targets).waves:
        if wave:
            _round_wave(model, wave, None, cfg, device, quantized, reports, plans)
            trim()  # the wave's float copies go back to the system before the next wave reads its weights
    return time.perf_counter() - t0


TOKENS_PER_INPUT_WARNING = 8


def _data_note(n_tokens: int, cols: int, algorithm: str) -> str:
    """Least-squares re-fits (Qronos most, at its tiny default ridge) overfit when tokens barely outnumber inputs."""
    if algorithm == "rtn" or n_tokens >= TOKENS_PER_INPUT_WARNING * cols:
        return ""
    return (f"only {n_tokens} calibration tokens for {cols} inputs: the solution may overfit the calibration set; "
            "use more samples (Qronos already raises its default ridge to 1e-3 sigma_max below 32 tokens per input)")


def _merge_shared_inputs(units: list[_Unit]) -> list[_Unit]:
    """q/k/v (and gate/up) read one input: stack their rows into one problem over the shared H and G."""
    merged: dict[int, _Unit] = {}
    out: list[_Unit] = []
    for u in units:
        key = id(u.stats)
        m = merged.get(key)
        if m is not None and m.W.shape[0] == 1 and u.W.shape[0] == 1 and m.W.shape[2] == u.W.shape[2] \
                and m.grid.n_groups == u.grid.n_groups and m.grid.scale_dtype == u.grid.scale_dtype \
                and m.plan == u.plan:
            m.W = torch.cat([m.W, u.W], dim=1)
            m.grid = _cat_grids([m.grid, u.grid], dim=-2)
            m.names += u.names
            m.targets += u.targets
            m.row_splits += u.row_splits
        else:
            merged[key] = u
            out.append(u)
    return out


def _batches(units: list[_Unit]) -> list[list[_Unit]]:
    """Units with the same matrix shape and grid are solved in one batched call."""
    groups: dict[tuple, list[_Unit]] = {}
    for u in units:
        key = (tuple(u.W.shape[1:]), u.grid.n_groups, u.grid.scale_dtype, u.plan)
        groups.setdefault(key, []).append(u)
    return list(groups.values())


def _cat_grids(grids: list[IntGrid], dim: int = 0) -> IntGrid:
    g0 = grids[0]
    return dataclasses.replace(g0, scale=torch.cat([g.scale for g in grids], dim=dim),
                               zero_point=torch.cat([g.zero_point for g in grids], dim=dim))


def _flat_grid(grid: IntGrid) -> IntGrid:
    """[groups, rows, n_groups] -> [groups*rows, n_groups]: the layout QuantizedWeight keeps."""
    return dataclasses.replace(grid, scale=grid.scale.reshape(-1, grid.scale.shape[-1]).cpu(),
                               zero_point=grid.zero_point.reshape(-1, grid.zero_point.shape[-1]).cpu())


def _onnx_weight(target: Target, qw: QuantizedWeight) -> np.ndarray:
    """What the quant stream computes with: the dequantized weight in the ONNX layout and dtype."""
    return target.from_matrix(qw.dequantize()).contiguous().numpy().astype(target.weight_dtype, copy=False)


# ------------------------------------------------------------------------------------------------ output files

def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _report_dict(result: QuantResult, model_path) -> dict:
    return {
        "tool": f"qronos-onnx {__version__}",
        "model": str(model_path),
        "output": str(result.output_path),
        "output_bytes": result.output_bytes,
        "peak_rss_bytes": result.peak_rss_bytes,
        "calibration_samples": result.n_samples,
        "timings_seconds": result.timings,
        "waves": result.waves,
        "config": result.config.to_dict(),
        **({"output_errors": DATA_FREE_NOTE} if result.data_free else {}),
        "layers": [asdict(r) for r in result.layers],
        "embeddings": result.embeddings,
        "lm_head": result.lm_head,
    }
