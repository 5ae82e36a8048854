#!/usr/bin/env python
"""From a Hugging Face checkpoint folder to a quantized ONNX model, offline: export, then qronos-onnx.

    python tools/hf_to_onnx.py HF_DIR -o OUT --calib text.txt                       # genai builder route (default)
    python tools/hf_to_onnx.py HF_DIR -o OUT --calib text.txt --route optimum       # optimum route
    python tools/hf_to_onnx.py HF_DIR -o OUT --calib text.txt -- --w4 --group-size 128 --samples 32
    python tools/hf_to_onnx.py --make-optimum-venv [--optimum-venv DIR]           # the optimum venv, once

Routes (both export a decoder with a KV cache, which text calibration and ``eval --task ppl`` run as a prefill pass):

- ``genai``: ``onnxruntime_genai.models.builder -p fp32 -e cpu`` in this Python (it needs transformers 5 and
  ``pip install onnxruntime-genai``), into ``OUT/genai-fp32/``; then ``qronos-onnx quantize OUT/genai-fp32 -o
  OUT/genai-q`` writes a genai folder (MatMulNBits weights by default) that onnxruntime-genai loads and generates with.
- ``optimum``: ``optimum-cli export onnx --task text-generation-with-past`` in its own venv (optimum-onnx 0.1.0 pins
  transformers < 4.58, which cannot live beside transformers 5; ``--make-optimum-venv`` builds it: torch 2.13.0 CPU
  first, then optimum-onnx and onnxruntime), into ``OUT/optimum-fp32/`` (the checkpoint's tokenizer files are copied
  in when the exporter left them out); then ``qronos-onnx quantize OUT/optimum-fp32/model.onnx -o
  OUT/optimum-fp32/model.q.onnx`` (QDQ by default, ``-- --dialect matmulnbits`` for MatMulNBits).

Everything after ``--`` goes to ``qronos-onnx quantize`` (default ``--w4``). Nothing is downloaded
(``HF_HUB_OFFLINE=1``); an existing export folder is reused, so a second run only re-quantizes. Each step's command is
printed on stderr; a failure prints one line naming the step and exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OPTIMUM_VENV = Path(os.environ.get("QRONOS_OPTIMUM_VENV", "/tmp/venv-optimum"))
OPTIMUM_PINS = ["optimum-onnx==0.1.0", "onnxruntime"]  # onnxruntime: optimum fixes the dynamic axes with it
TORCH_PIN = "torch==2.13.0"  # first, so that pip never resolves a multi-GB CUDA build
CHECK_MAX_BYTES = 4 << 30  # check_export loads the checkpoint in float32 beside the export's session
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja")


class StepError(RuntimeError):
    """A step failed: said in one line."""


def log(msg: str) -> None:
    print(f"[hf_to_onnx] {msg}", file=sys.stderr, flush=True)


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def run(step: str, cmd: list[str], cwd: Path | None = None) -> None:
    log(" ".join(map(str, cmd)))
    try:
        rc = subprocess.run([str(c) for c in cmd], env=offline_env(), cwd=cwd).returncode
    except OSError as err:
        raise StepError(f"{step}: cannot run {cmd[0]}: {err.strerror or err}") from None
    if rc != 0:
        raise StepError(f"{step} failed (exit {rc}; its output is above): {' '.join(map(str, cmd))}")


def check_checkpoint(hf: Path) -> None:
    if not (hf / "config.json").is_file():
        raise StepError(f"{str(hf)!r} is not a Hugging Face checkpoint folder (no config.json)")
    if not any((hf / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise StepError(f"{str(hf)!r} holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json); text "
                        f"calibration and genai need it")


def genai_route(hf: Path, out: Path, calib: Path, qargs: list[str], overwrite: bool) -> Path:
    export = out / "genai-fp32"
    if not (export / "genai_config.json").is_file():
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            raise StepError("the genai route needs onnxruntime-genai: pip install 'qronos-onnx[genai]'") from None
        staging = out / "genai-fp32.partial"
        shutil.rmtree(staging, ignore_errors=True)
        run("the genai model builder", [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf,
                                        "-o", staging, "-p", "fp32", "-e", "cpu", "-c", out / ".builder-cache"])
        staging.rename(export)
        shutil.rmtree(out / ".builder-cache", ignore_errors=True)
    else:
        log(f"reusing {export}")
    target = out / "genai-q"
    run("qronos-onnx quantize", [sys.executable, "-m", "qronos_onnx", "quantize", export, "--calib", calib,
                                 "-o", target, *qargs, *(["--overwrite"] if overwrite else [])])
    return target


def legacy_config(config: dict) -> dict | None:
    """``config.json`` as transformers < 4.58 (optimum's) reads it, or None when it already does.

    transformers 5 writes the RoPE settings as ``rope_parameters``; the older library only knows ``rope_theta`` and
    ``rope_scaling``, and without them silently builds RoPE with its default theta of 10,000: SmolLM2 (theta 100,000)
    then exports without an error and scores ppl 16.70 instead of 15.58. A per-layer-type ``rope_parameters`` (one
    dict per attention type) has no older form and is refused.
    """
    params = config.get("rope_parameters")
    if params is None:
        return None
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise StepError("config.json's rope_parameters has one entry per layer type, which optimum's transformers "
                        "(< 4.58) cannot express; use the genai route (--route genai)")
    new = {k: v for k, v in config.items() if k != "rope_parameters"}
    rope = dict(params)
    for key in ("rope_theta", "partial_rotary_factor"):  # top-level keys in the older configs
        if key in rope:
            new[key] = rope.pop(key)
    new["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    return new


def export_source(hf: Path, out: Path) -> Path:
    """The folder optimum exports from: the checkpoint itself, or, when its config.json is transformers 5's, a
    folder of links to its files with the config translated (``legacy_config``); the checkpoint is never written."""
    config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    legacy = legacy_config(config)
    if legacy is None:
        return hf
    src = out / "optimum-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for entry in hf.iterdir():
        if entry.name != "config.json":
            (src / entry.name).symlink_to(entry.absolute())
    (src / "config.json").write_text(json.dumps(legacy, indent=2), encoding="utf-8")
    log(f"config.json is transformers 5's (rope_parameters): optimum reads a translated copy in {src}")
    return src


def check_export(hf: Path, onnx_file: Path, tokens: int = 16, tol: float = 1e-3) -> None:
    """The export computes the checkpoint's function: its logits for a fixed prefill of ``tokens`` tokens against
    transformers' (this Python's, when installed) within ``tol`` relative error; else one line says by how much."""
    weights = sum(f.stat().st_size for f in hf.iterdir() if f.suffix in (".safetensors", ".bin"))
    if weights > CHECK_MAX_BYTES:
        log(f"the checkpoint holds {weights / 2**30:.1f} GiB of weights: the export is not checked against it "
            f"(the check loads it in float32; limit {CHECK_MAX_BYTES / 2**30:.0f} GiB)")
        return
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        log("transformers is not installed here: the export is not checked against the checkpoint")
        return
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(REPO))
    from qronos_onnx.calib.kv_cache import plan_prefill, specs_from_ort

    config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    ids = np.random.default_rng(0).integers(3, min(int(config.get("vocab_size", 1000)), 1000), (1, tokens))
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    del model
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    plan = plan_prefill(specs_from_ort(sess.get_inputs()), [o.name for o in sess.get_outputs()],
                        what="the export check")
    names = [o.name for o in sess.get_outputs()]
    got = sess.run(None, plan.feed(ids))[names.index("logits") if "logits" in names else 0]
    err = float(np.abs(got - want).max() / np.abs(want).max())
    if not err <= tol:
        raise StepError(f"the export {str(onnx_file)!r} does not compute the checkpoint's logits (max relative "
                        f"difference {err:.3g} > {tol:g} on a {tokens}-token prefill); not quantizing it")
    log(f"export checked against transformers: max relative logit difference {err:.2g}")


def optimum_route(hf: Path, out: Path, calib: Path, qargs: list[str], overwrite: bool, venv: Path) -> Path:
    export = out / "optimum-fp32"
    cli = venv / "bin" / "optimum-cli"
    if not (export / "model.onnx").is_file():
        if not cli.is_file():
            raise StepError(f"no optimum-cli in {str(venv)!r}: run `python tools/hf_to_onnx.py --make-optimum-venv "
                            f"--optimum-venv {venv}` first (optimum-onnx pins transformers < 4.58)")
        staging = out / "optimum-fp32.partial"
        shutil.rmtree(staging, ignore_errors=True)
        src = export_source(hf, out)
        run("optimum-cli export", [cli, "export", "onnx", "--model", src, "--task", "text-generation-with-past",
                                   staging])
        for name in TOKENIZER_FILES:  # optimum skips a tokenizer its transformers cannot load (transformers 5's)
            if (hf / name).is_file() and not (staging / name).exists():
                shutil.copy2(hf / name, staging / name)
        check_export(hf, staging / "model.onnx")
        if src != hf:
            shutil.rmtree(src)
        staging.rename(export)
    else:
        log(f"reusing {export}")
    target = export / "model.q.onnx"
    run("qronos-onnx quantize", [sys.executable, "-m", "qronos_onnx", "quantize", export / "model.onnx", "--calib",
                                 calib, "--tokenizer", export, "-o", target, *qargs,
                                 *(["--overwrite"] if overwrite else [])])
    return target


def make_optimum_venv(venv: Path) -> None:
    if not (venv / "bin" / "python").is_file():
        run("creating the venv", [sys.executable, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    run(f"installing {TORCH_PIN}", [*pip, TORCH_PIN])
    run("installing optimum-onnx", [*pip, *OPTIMUM_PINS, "-c", _constraint(venv)])
    log(f"optimum-cli is {venv / 'bin' / 'optimum-cli'}")


def _constraint(venv: Path) -> Path:
    path = venv / "torch-constraint.txt"
    path.write_text(TORCH_PIN + "\n")  # pip may not replace the torch installed first
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    qargs: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, qargs = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="hf_to_onnx.py", description=__doc__.split("\n\n")[0])
    p.add_argument("hf", nargs="?", help="Hugging Face checkpoint folder (config.json, weights, tokenizer)")
    p.add_argument("-o", "--output", help="work folder: the fp32 export and the quantized model go in it")
    p.add_argument("--calib", help="calibration text (.txt or .jsonl)")
    p.add_argument("--route", choices=("genai", "optimum", "both"), default="genai")
    p.add_argument("--optimum-venv", type=Path, default=DEFAULT_OPTIMUM_VENV,
                   help=f"venv with optimum-onnx (default {DEFAULT_OPTIMUM_VENV}, or $QRONOS_OPTIMUM_VENV)")
    p.add_argument("--make-optimum-venv", action="store_true", help="create/upgrade that venv and exit")
    p.add_argument("--overwrite", action="store_true", help="replace the quantized output if it exists")
    args = p.parse_args(argv)
    try:
        if args.make_optimum_venv:
            make_optimum_venv(args.optimum_venv)
            return 0
        if not (args.hf and args.output and args.calib):
            p.error("HF_DIR, -o OUT and --calib are required")
        hf, out, calib = Path(args.hf).absolute(), Path(args.output).absolute(), Path(args.calib).absolute()
        check_checkpoint(hf)
        if not calib.is_file():
            raise StepError(f"calibration text {str(calib)!r} does not exist")
        if out == hf or hf in out.parents:
            raise StepError(f"output {str(out)!r} is inside the checkpoint folder; the input is never written into")
        out.mkdir(parents=True, exist_ok=True)
        qargs = qargs or ["--w4"]
        done = []
        if args.route in ("genai", "both"):
            done.append(genai_route(hf, out, calib, qargs, args.overwrite))
        if args.route in ("optimum", "both"):
            done.append(optimum_route(hf, out, calib, qargs, args.overwrite, args.optimum_venv))
        for path in done:
            print(f"quantized={path}")
        return 0
    except StepError as err:
        print(f"hf_to_onnx: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
