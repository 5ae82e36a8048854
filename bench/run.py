#!/usr/bin/env python
"""Run a named benchmark grid (models x formats x algorithms) and write its table and plot to bench/results/.

    .venv/bin/python bench/run.py smollm2            # bench/grids/smollm2.yaml
    .venv/bin/python bench/run.py mnist --dry-run    # list the cells and which are already done
    .venv/bin/python bench/run.py minilm --only 'w4-.*-qronos' --force
    .venv/bin/python bench/run.py smollm2 --report-only

Each quantization runs alone in a subprocess (``bench/run.py --worker SPEC``) so that its peak RSS (VmHWM) and
wall time are its own; the evaluation then runs in this process. Every cell's figures go to
``bench/results/<grid>/<cell>.json`` together with the machine and package versions; a cell whose JSON exists is
skipped (resumable), ``--force`` redoes it. Quantized models are written under the work folder (default
``~/.cache/qronos-onnx/bench/<grid>``) and deleted after evaluation unless ``--keep-models``.

A grid names ``models``, ``algorithms`` and ``formats``; each format has a ``name`` and a ``recipe`` and may add
``overrides`` (QuantConfig dotted keys), its own ``algorithms``, a ``note``, and ``ablation: true`` (a variant such
as other calibration data, plotted as separate points rather than on the bits line). A grid may say
``checkpoint: false``: its quantizations run without per-wave checkpoints (``quantize(checkpoint=False)``).

The bench models and their protocols are defined in ``MODELS`` below (docs/benchmarks.md has the prose); the assets
come from ``tools/assets.py`` (``python tools/assets.py smollm2|wikileads|minilm|mnist|ppocr``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from bench.machine_info import cpu_name  # noqa: E402

GRIDS = REPO / "bench" / "grids"
RESULTS = REPO / "bench" / "results"


# ------------------------------------------------------------------------------------------------- the bench models


@dataclass(frozen=True)
class BenchModel:
    """One bench model: where its ONNX file and calibration data are, and how it is evaluated."""

    name: str
    tasks: tuple[str, ...]
    primary: tuple[str, str]  # (task, metric) plotted and tabulated
    capture: dict  # capture.* overrides for quantize()
    eval: dict  # EvalOptions fields
    protocol: str  # one line for the report

    def paths(self, cache: str | None = None) -> dict[str, Path]:
        from qronos_onnx.eval import cache as c

        if self.name == "smollm2":
            p, w = c.smollm2_paths(cache), c.wikileads_paths(cache)
            return {"onnx": p.onnx, "tokenizer": p.tokenizer, "calib": w.calib, "test": w.test}
        if self.name == "minilm":
            p, w = c.minilm_paths(cache), c.wikileads_paths(cache)
            return {"onnx": p.onnx, "tokenizer": p.tokenizer, "calib": w.calib}
        if self.name == "mnist":
            p = c.mnist_paths(cache)
            return {"onnx": p.onnx, "calib": p.dir / "calib.npz"}
        if self.name == "ppocr":
            p = c.ppocr_paths(cache)
            return {"onnx": p.onnx, "calib": p.dir / "calib.npz", "test": p.dir / "test.npz"}
        raise KeyError(self.name)


MODELS: dict[str, BenchModel] = {
    "smollm2": BenchModel(
        "smollm2", ("ppl",), ("ppl", "ppl"), {"samples": 32, "seq_len": 256},
        {"seq_len": 256, "windows": 64},
        "SmolLM2-135M (fp32 ONNX). Calibration: 32 windows x 256 tokens of the wiki-leads calibration split, starts "
        "from random.seed(0) (the anchors protocol). Eval: wiki-leads ppl, the first 64 non-overlapping 256-token "
        "windows of the test split, each scored alone."),
    "minilm": BenchModel(
        "minilm", ("retrieval", "topic"), ("retrieval", "top1"), {"samples": 128, "seq_len": 128},
        {"articles": 2000, "seed": 0},
        "all-MiniLM-L6-v2 (fp32 ONNX). Calibration: 128 windows x 128 tokens of the wiki-leads calibration split "
        "(random.seed(0) starts; attention_mask = 1, token_type_ids = 0). Eval: description->extract retrieval over "
        "2,000 articles (top-1, MRR) and the 11-topic logistic-regression probe (1500/500)."),
    "mnist": BenchModel(
        "mnist", ("classify",), ("classify", "top1"), {}, {},
        "MNIST CNN (fp32 ONNX). Calibration: the 512 training images of calib.npz. Eval: top-1 on the 10,000 test "
        "images."),
    "ppocr": BenchModel(
        "ppocr", ("textdir",), ("textdir", "top1"), {"samples": 16}, {},
        "PP-OCR text-direction classifier ch_ppocr_mobile_v2.0_cls_mobile (rapidocr 3.10.0, fp32 ONNX, 53 Conv incl. "
        "depthwise + 1 MatMul; Constant-node weights lifted to initializers). Calibration: the first 16 samples of 8 "
        "lines (128 lines) of calib.npz (rendered wiki-leads calibration-split words). Eval: top-1 on the 2,000 rendered lines "
        "of test.npz (test-split words, other seed), half rotated by 180 degrees (`python tools/assets.py ppocr`)."),
}


# ------------------------------------------------------------------------------------------------------ the grid


@dataclass
class Cell:
    model: str
    fmt: str  # the format's name in the grid
    algorithm: str  # "float" for the unquantized model
    overrides: dict = field(default_factory=dict)  # QuantConfig dotted keys
    recipe: str = "w4"
    ablation: bool = False  # grid format key `ablation: true` (e.g. other calibration data): a point in the plot

    @property
    def id(self) -> str:
        return f"{self.model}-float" if self.algorithm == "float" else f"{self.model}-{self.fmt}-{self.algorithm}"


def load_grid(name_or_path: str) -> tuple[str, dict]:
    path = Path(name_or_path)
    if not path.suffix:
        path = GRIDS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in GRIDS.glob("*.yaml")))
        raise SystemExit(f"bench/run.py: no grid {name_or_path!r} (known: {known})")
    grid = yaml.safe_load(path.read_text()) or {}
    for key in ("models", "algorithms", "formats"):
        if key not in grid:
            raise SystemExit(f"bench/run.py: grid {str(path)!r} lacks the key {key!r}")
    return path.stem, grid


def expand(grid: dict) -> list[Cell]:
    """Every cell of the grid: per model, its float reference then formats x algorithms (model entries may narrow
    the grid's algorithms/formats and add overrides)."""
    formats = {f["name"]: f for f in grid["formats"]}
    cells = []
    for entry in grid["models"]:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        name = entry["name"]
        if name not in MODELS:
            raise SystemExit(f"bench/run.py: unknown model {name!r} (known: {', '.join(MODELS)})")
        cells.append(Cell(name, "float", "float"))
        for fname in entry.get("formats", list(formats)):
            if fname not in formats:
                raise SystemExit(f"bench/run.py: model {name!r} names format {fname!r}, not in the grid's formats")
            f = formats[fname]
            for algo in entry.get("algorithms", f.get("algorithms", grid["algorithms"])):
                over = {**grid.get("overrides", {}), **f.get("overrides", {}), **entry.get("overrides", {})}
                cells.append(Cell(name, fname, algo, over, f.get("recipe", "w4"), bool(f.get("ablation", False))))
    return cells


def cell_config(cell: Cell):
    from qronos_onnx.config import load_recipe

    bm = MODELS[cell.model]
    updates = {f"capture.{k}": v for k, v in bm.capture.items()}
    updates.update(cell.overrides)
    updates["rounding.algorithm"] = cell.algorithm
    return load_recipe(cell.recipe).override(updates)


# ---------------------------------------------------------------------------------------------- machine, versions


def machine() -> dict:
    cpu = cpu_name()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    import torch

    return {"cpu": cpu, "cores": cores, "ram_gib": mem, "os": platform.platform(), "torch_threads":
            torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("qronos-onnx", "torch", "onnxruntime", "onnx", "onnx-ir", "numpy", "transformers", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def source_hash() -> str:
    """sha256 (first 12 hex) of the package's .py files: tells cells run on the same uncommitted code apart."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((REPO / "qronos_onnx").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# -------------------------------------------------------------------------------------------------- the worker


def _rss_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process in MB, from /proc/self/status.

    Not ``ru_maxrss``: Linux carries the parent's RSS into a forked child's maximum across exec, so a worker started
    by a driver holding a big session would report the driver's memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec_path: str) -> int:
    """Quantize one cell (called in a fresh subprocess) and write timings and peak RSS as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    from qronos_onnx.api import quantize
    from qronos_onnx.config import QuantConfig

    rss_ready = _rss_mb("VmRSS")
    cfg = QuantConfig.from_dict(spec["config"])
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    res = quantize(spec["model"], spec["calib"], spec["output"], cfg, tokenizer=spec.get("tokenizer"),
                   overwrite=True, quiet=True, checkpoint=spec.get("checkpoint", True))
    wall = time.perf_counter() - t0
    errs = [r.rel_error for r in res.layers if r.rel_error is not None]  # None: a data-free run
    rtn = [r.rtn_rel_error for r in res.layers if r.rtn_rel_error is not None]
    out = {
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu0,
        "timings": res.timings,
        "peak_rss_mb": _rss_mb("VmHWM"),
        "rss_before_quantize_mb": rss_ready,
        "output_bytes": res.output_bytes,
        "n_weights": len(res.layers),
        "n_samples": res.n_samples,
        "mean_rel_error": sum(errs) / len(errs) if errs else None,
        "mean_rtn_rel_error": sum(rtn) / len(rtn) if rtn else None,
        "retries": sum(r.retries for r in res.layers),
        "precision": {k: v for k, v in res.precision.items() if k != "sensitivity"},  # the bit budget's choices
        "config": cfg.to_dict(),
    }
    Path(spec["result"]).write_text(json.dumps(out, indent=2))
    return 0


def run_quantization(cell: Cell, paths: dict[str, Path], work: Path, log, checkpoint: bool = True) -> dict:
    cfg = cell_config(cell)
    work.mkdir(parents=True, exist_ok=True)
    spec = {"model": str(paths["onnx"]), "calib": str(paths["calib"]), "output": str(work / f"{cell.id}.onnx"),
            "tokenizer": str(paths["tokenizer"]) if str(paths["calib"]).endswith(".txt") else None,
            "config": cfg.to_dict(), "result": str(work / f"{cell.id}.quant.json"), "checkpoint": checkpoint}
    spec_path = work / f"{cell.id}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    Path(spec["result"]).unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                          capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        log("\n".join(tail))
        raise RuntimeError(f"quantization of {cell.id} failed (exit {proc.returncode}): {tail[-1] if tail else ''}")
    out = json.loads(Path(spec["result"]).read_text())
    out["subprocess_wall_s"] = total
    out["output"] = spec["output"]
    return out


# ------------------------------------------------------------------------------------------------------- running


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def run_grid(name: str, grid: dict, args: argparse.Namespace) -> None:
    from qronos_onnx.eval.report import EvalData, EvalOptions, evaluate

    results_dir = Path(args.results) / name
    work = Path(args.work).expanduser() if args.work else Path.home() / ".cache" / "qronos-onnx" / "bench" / name
    cells = expand(grid)
    if args.only:
        pattern = re.compile(args.only)
        cells = [c for c in cells if pattern.search(c.id)]
    todo = [c for c in cells if args.force or not (results_dir / f"{c.id}.json").is_file()]
    print(f"grid {name}: {len(cells)} cells, {len(todo)} to run ({len(cells) - len(todo)} already done)",
          flush=True)
    if args.dry_run:
        for c in cells:
            state = "todo" if c in todo else "done"
            print(f"  {state}  {c.id}")
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    env = {"machine": machine(), "versions": versions(), "commit": git_commit(), "source": source_hash()}
    data: dict[str, EvalData] = {}
    for i, cell in enumerate(todo, 1):
        bm = MODELS[cell.model]
        paths = bm.paths(args.cache)
        missing = [str(p) for k, p in paths.items() if k != "test" and not Path(p).exists()]
        if missing:
            print(f"[{i}/{len(todo)}] {cell.id}: SKIPPED, missing {missing[0]} (run `python tools/assets.py "
                  f"{cell.model}`{' and wikileads' if cell.model in ('smollm2', 'minilm') else ''})", flush=True)
            continue
        print(f"[{i}/{len(todo)}] {cell.id} ...", flush=True)
        opts = EvalOptions(**{**bm.eval, "tokenizer": str(paths["tokenizer"]) if "tokenizer" in paths else None,
                              "accuracy_level": args.accuracy_level})
        record: dict[str, Any] = {"cell": cell.id, "model": cell.model, "format": cell.fmt,
                                  "algorithm": cell.algorithm, "grid": name, "started": _now(), **env}
        if cell.algorithm == "float":
            model_path = Path(paths["onnx"])
            record["output_bytes"] = file_bytes(model_path)
            record["bits"] = 32
        else:
            q = run_quantization(cell, paths, work, lambda s: print(s, file=sys.stderr),
                                 checkpoint=bool(grid.get("checkpoint", True)))
            q["checkpoint"] = bool(grid.get("checkpoint", True))
            record["quant"] = q
            record["output_bytes"] = q["output_bytes"]
            w = q["config"]["weights"]
            record["bits"], record["group_size"], record["symmetric"] = w["bits"], w["group_size"], w["symmetric"]
            model_path = Path(q["output"])
            print(f"    quantized in {q['wall_s']:.1f} s, peak RSS {q['peak_rss_mb']:.0f} MB, "
                  f"{q['output_bytes'] / 1e6:.1f} MB", flush=True)
        t0 = time.perf_counter()
        d = data.setdefault(cell.model, EvalData(opts))
        record["eval"] = evaluate(model_path, list(bm.tasks), opts, d)
        record["eval_wall_s"] = time.perf_counter() - t0
        metrics = ", ".join(f"{t}.{m} {v:.4f}" for t, r in record["eval"].items() for m, v in r["metrics"].items())
        print(f"    {metrics} (eval {record['eval_wall_s']:.1f} s)", flush=True)
        (results_dir / f"{cell.id}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        if cell.algorithm != "float" and not args.keep_models:
            for p in (model_path, model_path.with_name(model_path.name + ".data")):
                p.unlink(missing_ok=True)
    write_report(name, grid, results_dir, args)


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------------- the report


def load_records(results_dir: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    return [r for r in records if "cell" in r]  # (side files, e.g. a run stopped before its evaluation)


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    if metric in ("ppl",):
        return f"{v:.2f}" if v < 1000 else f"{v:.0f}"
    return f"{v:.4f}"


def write_report(name: str, grid: dict, results_dir: Path, args: argparse.Namespace) -> Path:
    records = [r for r in load_records(results_dir)]
    cells = {c.id: c for c in expand(grid)}
    by_id = {r["cell"]: r for r in records if r["cell"] in cells}
    env = {"machine": machine(), "versions": versions(), "commit": git_commit()}
    lines = [f"# Benchmark grid `{name}`", ""]
    if grid.get("description"):
        lines += [grid["description"].strip(), ""]
    lines += [
        "Command (from the repository root):", "", "```",
        f".venv/bin/python bench/run.py {name}" + (f" --accuracy-level {args.accuracy_level}"
                                                    if args.accuracy_level != 0 else ""),
        "```", "",
        f"Report written {_now()} by `{' '.join(shlex.quote(a) for a in sys.argv)}`; commit {env['commit']}.", "",
    ]
    machines = {json.dumps(r.get("machine"), sort_keys=True) for r in by_id.values()}
    vers = {json.dumps(r.get("versions"), sort_keys=True) for r in by_id.values()}
    m = env["machine"] if len(machines) != 1 else json.loads(next(iter(machines)))
    v = env["versions"] if len(vers) != 1 else json.loads(next(iter(vers)))
    lines += [f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, torch threads {m['torch_threads']}"
              + (f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU") + f"; {m['os']}.",
              "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", ""]
    codes = sorted({(str(r.get("commit")), str(r.get("source", "not recorded"))) for r in by_id.values()})
    if codes:
        lines += ["Code of the measured cells: " + "; ".join(f"commit {c} (package source hash {h})"
                                                          for c, h in codes) + ".", ""]
    if len(machines) > 1 or len(vers) > 1:
        lines += ["**Note:** the cells below were measured on more than one machine or package set; each cell's "
                  f"JSON in `bench/results/{name}/` records its own.", ""]
    acc_levels = {r["eval"][t]["accuracy_level"] for r in by_id.values() for t in r["eval"]}
    lines += ["onnxruntime session option `session.qdq_matmulnbits_accuracy_level`: "
              + ", ".join("default (4)" if a is None else str(a) for a in sorted(acc_levels, key=str))
              + " (0 = exact float math for int4 DQ + MatMul).", ""]

    models = list(dict.fromkeys(c.model for c in cells.values()))
    anchors = grid.get("anchors", {})
    for model in models:
        bm = MODELS[model]
        mcells = [c for c in cells.values() if c.model == model]
        lines += [f"## {model}", "", bm.protocol, ""]
        fl = by_id.get(f"{model}-float")
        algos = list(dict.fromkeys(c.algorithm for c in mcells if c.algorithm != "float"))
        fmts = list(dict.fromkeys(c.fmt for c in mcells if c.algorithm != "float"))
        for task in bm.tasks:
            metric_names = list((fl or next((by_id[c.id] for c in mcells if c.id in by_id), {"eval": {}}))
                                ["eval"].get(task, {}).get("metrics", {}))
            for metric in metric_names:
                if metric == "nll":
                    continue
                lines += [f"**{task} {metric}**" + (" (lower is better)" if metric == "ppl" else ""), ""]
                lines.append("| format | float | " + " | ".join(algos) + " |")
                lines.append("|---|---|" + "---|" * len(algos))
                fv = fl["eval"][task]["metrics"][metric] if fl else None
                for f in fmts:
                    row = [f, _fmt(fv, metric)]
                    for a in algos:
                        r = by_id.get(f"{model}-{f}-{a}")
                        val = _fmt(r["eval"][task]["metrics"][metric], metric) if r else "-"
                        anc = anchors.get(model, {}).get(f, {}).get(a) if metric == bm.primary[1] \
                            and task == bm.primary[0] else None
                        row.append(val + (f" ({anc})" if anc is not None else ""))
                    lines.append("| " + " | ".join(row) + " |")
                lines.append("")
        if anchors.get(model):
            lines += ["Figures in parentheses: the Brevitas anchors on the same protocol (docs/anchors.md).", ""]
        lines += ["Cost of each quantization (one subprocess each; wall = the `quantize()` call, CPU = its process "
                  "CPU time over all threads; peak RSS = the "
                  "subprocess' VmHWM, imports included; RSS at start = after imports, before `quantize()`):", "",
                  "| cell | wall s | CPU s | capture s | rounding s | export s | peak RSS MB | RSS at start MB | "
                  "output MB | size vs float | mean rel. err | its RTN rel. err |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        fbytes = fl["output_bytes"] if fl else None
        for c in mcells:
            r = by_id.get(c.id)
            if r is None or c.algorithm == "float":
                continue
            q = r["quant"]
            t = q["timings"]
            ratio = f"{r['output_bytes'] / fbytes:.3f}" if fbytes else "-"
            lines.append(f"| {c.fmt}-{c.algorithm} | {q['wall_s']:.1f} | {q.get('cpu_s', 0):.0f} | "
                         f"{t.get('capture', 0):.1f} | "
                         f"{t.get('rounding', 0):.1f} | {t.get('export', 0):.1f} | {q['peak_rss_mb']:.0f} | "
                         f"{q['rss_before_quantize_mb']:.0f} | {r['output_bytes'] / 1e6:.1f} | "
                         f"{ratio} | {_fmt(q.get('mean_rel_error'), '')} | {_fmt(q.get('mean_rtn_rel_error'), '')} |")
        lines.append("")
        missing = [c.id for c in mcells if c.id not in by_id]
        if missing:
            lines += [f"Not measured yet: {', '.join(missing)}.", ""]
    formats = {f["name"]: f for f in grid["formats"]}
    lines += ["## Formats", ""]
    for fname, f in formats.items():
        lines.append(f"- `{fname}`: recipe `{f.get('recipe', 'w4')}`"
                     + (f", overrides {f['overrides']}" if f.get("overrides") else "")
                     + (f" — {f['note']}" if f.get("note") else ""))
    lines.append("")
    plot = write_plot(name, grid, by_id, cells, Path(args.results))
    if plot is not None:
        lines += [f"![metric vs bits]({plot.name})", ""]
    out = Path(args.results) / f"{name}.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out}" + (f" and {plot}" if plot else ""))
    return out


def _series(by_id: dict, cells: dict, model: str) -> tuple[dict[str, list[tuple[int, float]]], float | None]:
    bm = MODELS[model]
    task, metric = bm.primary
    series: dict[str, list[tuple[int, float]]] = {}
    for c in cells.values():
        r = by_id.get(c.id)
        if c.model != model or r is None:
            continue
        v = r["eval"][task]["metrics"][metric]
        if c.algorithm == "float":
            continue
        g = r.get("group_size") or 0
        qc = r.get("quant", {}).get("config", {})
        if (qc.get("activations", {}).get("format", "none") != "none"
                or qc.get("weights", {}).get("format", "int") != "int" or c.ablation):
            key = f"{c.algorithm} {c.fmt}"  # weight-activation, MX/FP8 and ablation cells: points, not a bits line
        else:
            key = c.algorithm + (f" g{g}" if g else "")
        series.setdefault(key, []).append((int(r["bits"]), float(v)))
    fl = by_id.get(f"{model}-float")
    fv = fl["eval"][task]["metrics"][metric] if fl else None
    return {k: sorted(v) for k, v in series.items()}, fv


def write_plot(name: str, grid: dict, by_id: dict, cells: dict, out_dir: Path) -> Path | None:
    models = [m for m in dict.fromkeys(c.model for c in cells.values())
              if any(r["model"] == m for r in by_id.values())]
    if not models:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return write_svg(name, by_id, cells, models, out_dir)
    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 4.2), squeeze=False)
    algo_color = {"rtn": "C0", "gptq": "C1", "gpfq": "C2", "qronos": "C3"}
    point_markers = ["s", "^", "D", "v", "P", "X", "*", "h"]
    for ax, model in zip(axes[0], models):
        series, fv = _series(by_id, cells, model)
        task, metric = MODELS[model].primary
        extras = sorted({k.split(" ", 1)[1] for k in series if " " in k and not k.split(" ", 1)[1].startswith("g")})
        for key, pts in series.items():
            algo, _, rest = key.partition(" ")
            color = algo_color.get(algo)
            if rest and not rest.startswith("g"):  # a weight-activation / MX cell: one marker per format
                marker = point_markers[extras.index(rest) % len(point_markers)]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="none", marker=marker, color=color, label=key)
            else:  # weight-only INT: a line over the bits, dashed for grouped scales
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, ls="--" if rest else "-",
                        label=key)
        if fv is not None:
            ax.axhline(fv, color="k", ls="--", lw=1, label="float")
        if metric == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("weight bits")
        ax.set_ylabel(f"{task} {metric}")
        ax.set_title(model)
        bits = sorted({p[0] for pts in series.values() for p in pts})
        if bits:
            ax.set_xticks(bits)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(series) < 14 else 2)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_svg(name: str, by_id: dict, cells: dict, models: list[str], out_dir: Path) -> Path:
    """A plain SVG line chart per model (used when matplotlib is not installed)."""
    W, H, pad = 420, 300, 50
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(models)}" height="{H}" '
             f'font-family="sans-serif" font-size="11">']
    for i, model in enumerate(models):
        series, fv = _series(by_id, cells, model)
        task, metric = MODELS[model].primary
        log = metric == "ppl"
        xs = sorted({p[0] for pts in series.values() for p in pts}) or [0, 1]
        ys = [p[1] for pts in series.values() for p in pts] + ([fv] if fv is not None else [])
        tr = (lambda y: math.log10(y)) if log else (lambda y: y)
        lo, hi = (min(map(tr, ys)), max(map(tr, ys))) if ys else (0, 1)
        hi = hi if hi > lo else lo + 1
        x0 = i * W

        def px(x, xs=xs, x0=x0):
            return x0 + pad + (W - 2 * pad) * ((xs.index(x) / (len(xs) - 1)) if len(xs) > 1 else 0.5)

        def py(y, lo=lo, hi=hi, tr=tr):
            return H - pad - (H - 2 * pad) * (tr(y) - lo) / (hi - lo)

        parts.append(f'<text x="{x0 + W / 2}" y="20" text-anchor="middle">{model}: {task} {metric}'
                     f'{" (log)" if log else ""}</text>')
        parts.append(f'<line x1="{x0 + pad}" y1="{H - pad}" x2="{x0 + W - pad}" y2="{H - pad}" stroke="black"/>')
        for x in xs:
            parts.append(f'<text x="{px(x):.1f}" y="{H - pad + 15}" text-anchor="middle">W{x}</text>')
        if fv is not None:
            parts.append(f'<line x1="{x0 + pad}" y1="{py(fv):.1f}" x2="{x0 + W - pad}" y2="{py(fv):.1f}" '
                         f'stroke="black" stroke-dasharray="4"/><text x="{x0 + W - pad}" y="{py(fv) - 3:.1f}" '
                         f'text-anchor="end">float {fv:.4g}</text>')
        for j, (key, pts) in enumerate(series.items()):
            c = colors[j % len(colors)]
            pts_s = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{pts_s}" fill="none" stroke="{c}" stroke-width="1.5"/>')
            for x, y in pts:
                parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}">'
                             f'<title>{key} W{x}: {y:.4g}</title></circle>')
            parts.append(f'<text x="{x0 + pad + 5}" y="{40 + 13 * j}" fill="{c}">{key}</text>')
    parts.append("</svg>")
    path = out_dir / f"{name}.svg"
    path.write_text("\n".join(parts))
    return path


# ----------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("grid", nargs="?", help="grid name (bench/grids/NAME.yaml) or a YAML path")
    p.add_argument("--results", default=str(RESULTS), help="results folder (default bench/results)")
    p.add_argument("--work", help="where quantized models go (default ~/.cache/qronos-onnx/bench/GRID)")
    p.add_argument("--cache", help="asset cache root (default $QRONOS_CACHE or ~/.cache/qronos-onnx)")
    p.add_argument("--only", help="regular expression on cell ids (e.g. 'smollm2-w4-pc-.*')")
    p.add_argument("--force", action="store_true", help="redo cells whose result JSON exists")
    p.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done")
    p.add_argument("--report-only", action="store_true", help="only rewrite the markdown table and plot")
    p.add_argument("--keep-models", action="store_true", help="keep the quantized ONNX files")
    p.add_argument("--accuracy-level", type=int, default=0, choices=(0, 1, 2, 3, 4),
                   help="session.qdq_matmulnbits_accuracy_level for evaluation (default 0: exact)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if not args.grid:
        p.error("give a grid name")
    name, grid = load_grid(args.grid)
    if args.report_only:
        write_report(name, grid, Path(args.results) / name, args)
        return 0
    run_grid(name, grid, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
