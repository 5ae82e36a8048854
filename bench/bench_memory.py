#!/usr/bin/env python
"""Peak memory of quantizing a Llama-shaped model with random weights (bench/synth_llama.py), one run per process.

    .venv/bin/python bench/bench_memory.py --dir /tmp/mem --preset tinyllama-1.1b --layers 8 --runs rtn qronos
    .venv/bin/python bench/bench_memory.py --dir /tmp/mem --layers 6 --runs rtn --repo /path/to/older/checkout

Builds ``DIR/llama-<hidden>x<layers>-<dtype>.onnx`` (reused when present), then runs each row as a CLI subprocess:

- ``rtn``: ``quantize MODEL --w4 --algo rtn`` without ``--calib`` (data-free weight-only RTN);
- ``qronos``: ``quantize MODEL --w4 --calib DIR/calib.npz`` (``--windows`` windows of ``--seq-len`` random tokens).

For each: wall seconds, CPU seconds (user + system of the child), peak RSS (``ru_maxrss`` of the child, which counts
the memory-mapped file pages it touched as well as its heap), minor page faults, the output's size and the
``peak_rss`` the run reports itself. One JSON line per row on stdout (``--json`` appends them to a file).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.synth_llama import PRESETS, Shape, build  # noqa: E402


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size if path.exists() else 0) + (data.stat().st_size if data.exists() else 0)


def _calib(path: Path, vocab: int, windows: int, seq_len: int) -> Path:
    import numpy as np

    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, input_ids=rng.integers(0, vocab, size=(windows, 1, seq_len), dtype=np.int64))
    return path


def run_row(row: str, model: Path, out: Path, calib: Path | None, extra: list[str], repo: Path = REPO) -> dict:
    cmd = [sys.executable, "-m", "qronos_onnx", "quantize", str(model), "-o", str(out), "--w4", "--overwrite",
           "--quiet", *extra]
    if row == "rtn":
        cmd += ["--algo", "rtn"]
    else:
        cmd += ["--algo", row, "--calib", str(calib)]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # run in the checkout: ``python -m`` puts the working directory ahead of PYTHONPATH
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=repo)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = {"row": row, "model": model.name, "model_gb": round(_file_bytes(model) / 1e9, 3), "rc": proc.returncode,
           "wall_s": round(wall, 1), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime
                                                    - before.ru_stime, 1),
           # ru_maxrss of RUSAGE_CHILDREN is the largest of any child so far: one row per bench process keeps it exact
           "peak_rss_gb": round(after.ru_maxrss * 1024 / 1e9, 3),
           "minor_faults_m": round((after.ru_minflt - before.ru_minflt) / 1e6, 2),
           "output_gb": round(_file_bytes(out) / 1e9, 3), "repo": str(repo), "cmd": " ".join(cmd[1:])}
    report = out.with_name(out.name + ".report.json")
    if proc.returncode == 0 and report.exists():
        rep = json.loads(report.read_text())
        res["reported_peak_rss_gb"] = round((rep.get("peak_rss_bytes") or 0) / 1e9, 3)
        res["timings"] = {k: round(v, 1) for k, v in rep.get("timings_seconds", {}).items()}
    else:
        res["stderr"] = proc.stderr[-2000:]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qronos-mem"))
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    for f in ("hidden", "layers", "ffn", "vocab", "heads", "kv_heads"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int)
    ap.add_argument("--dtype", choices=["float32", "float16"])
    ap.add_argument("--runs", nargs="+", default=["rtn"], help="rows: rtn, qronos, gptq (one process each)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--extra", default="", help="more quantize flags, space-separated")
    ap.add_argument("--json", type=Path, help="append the rows here")
    ap.add_argument("--keep-output", action="store_true")
    ap.add_argument("--repo", type=Path, default=REPO, help="the qronos-onnx checkout to run (e.g. a worktree of an "
                    "older commit, for a before/after); default: this one")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    over = {f: getattr(args, f) for f in ("hidden", "layers", "ffn", "vocab", "heads", "kv_heads", "dtype")
            if getattr(args, f) is not None}
    shape = Shape(**{**PRESETS[args.preset].__dict__, **over})
    args.dir = args.dir.resolve()
    args.repo = args.repo.resolve()
    args.dir.mkdir(parents=True, exist_ok=True)
    model = args.dir / f"llama-{shape.hidden}x{shape.layers}-v{shape.vocab}-{shape.dtype}.onnx"
    if not model.exists():
        t0 = time.perf_counter()
        build(model, shape)
        print(f"# built {model} ({shape.n_params() / 1e9:.3f} B parameters, {_file_bytes(model) / 1e9:.2f} GB) in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    calib = _calib(args.dir / f"calib-{args.windows}x{args.seq_len}-v{shape.vocab}.npz", shape.vocab, args.windows,
                   args.seq_len)
    for row in args.runs:
        if args.worker is None and len(args.runs) > 1:  # one process per row: RUSAGE_CHILDREN's max is per process
            sub = [sys.executable, __file__, *[a for a in (argv if argv is not None else sys.argv[1:])]]
            i = sub.index("--runs")
            j = i + 1
            while j < len(sub) and not sub[j].startswith("--"):
                j += 1
            sub[i:j] = ["--runs", row]
            subprocess.run(sub, check=False)
            continue
        out = args.dir / f"{model.stem}.{row}.onnx"
        res = run_row(row, model, out, calib, args.extra.split(), args.repo)
        line = json.dumps(res)
        print(line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")
        if not args.keep_output:
            for p in (out, out.with_name(out.name + ".data")):
                p.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
