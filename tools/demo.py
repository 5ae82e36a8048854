"""The README's main job: quantize the real SmolLM2-135M and compare wiki-leads perplexity with the float model.

Protocol (docs/benchmarks.md, the same as the Brevitas anchors): calibration = 32 windows of 256 tokens drawn from
the wiki-leads calibration split with Python's random.seed(0); evaluation = the first 64 non-overlapping 256-token
windows of the test split, every window scored alone. The models and text are cached under ~/.cache/qronos-onnx.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qronos_onnx.api import quantize  # noqa: E402
from qronos_onnx.cli import format_summary  # noqa: E402
from qronos_onnx.config import load_recipe  # noqa: E402
from qronos_onnx.eval.perplexity import perplexity  # noqa: E402
from qronos_onnx.eval.wikileads import split_text, tokenize  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", default="qronos", choices=["rtn", "gptq", "gpfq", "qronos"])
    p.add_argument("--recipe", default="w4", help="recipe name or YAML file (default w4: 4-bit asym per-channel)")
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--reference", default=None, choices=["float", "local"])
    p.add_argument("--cache", default=None, help="asset cache (default ~/.cache/qronos-onnx)")
    p.add_argument("--out", default=None, help="output model path (default: in the cache)")
    args = p.parse_args()

    cache_args = ["--cache", args.cache] if args.cache else []
    paths = {}
    for what in ("smollm2", "wikileads"):
        proc = subprocess.run([sys.executable, str(REPO / "tools" / "assets.py"), what, *cache_args],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            return proc.returncode
        for line in proc.stdout.splitlines():
            if "=" in line and not line.startswith(" "):
                k, v = line.split("=", 1)
                paths[k.strip()] = v.strip()
    model, tok_dir, calib_txt = Path(paths["onnx"]), paths["tokenizer"], paths["calib_txt"]

    # the README table's protocol: the decoder's linear layers; the table and head stay float as in the anchors
    cfg = load_recipe(args.recipe).override({"embeddings.bits": "float", "embeddings.lm_head": "float"})
    cfg = cfg.override({"rounding.algorithm": args.algo, "capture.samples": args.samples,
                        "capture.seq_len": args.seq_len})
    if args.group_size is not None:
        cfg = cfg.override({"weights.group_size": args.group_size})
    if args.reference:
        cfg = cfg.override({"capture.reference": args.reference})
    tag = f"{args.algo}-w{cfg.weights.bits}" + (f"g{cfg.weights.group_size}" if cfg.weights.group_size else "")
    out = Path(args.out) if args.out else model.with_name(f"smollm2.{tag}.onnx")
    t0 = time.perf_counter()
    res = quantize(model, calib_txt, out, cfg, tokenizer=tok_dir, overwrite=True)
    print(format_summary(res))
    print(f"quantization wall time: {time.perf_counter() - t0:.1f} s")

    test_ids = tokenize(split_text("test"), tok_dir)
    rows = []
    for name, path in (("float", model), (tag, out)):
        r = perplexity(path, test_ids, seq_len=args.seq_len, max_windows=args.eval_windows)
        rows.append((name, path, r))
    size0 = model.stat().st_size
    print(f"\nwiki-leads perplexity, {args.eval_windows} windows x {args.seq_len} tokens (test split)")
    print(f"{'model':<18} {'ppl':>9} {'size MB':>9} {'size ratio':>10}")
    for name, path, r in rows:
        size = path.stat().st_size + (path.with_name(path.name + '.data').stat().st_size
                                      if path.with_name(path.name + '.data').exists() else 0)
        print(f"{name:<18} {r.ppl:9.3f} {size / 1e6:9.1f} {size / size0:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
