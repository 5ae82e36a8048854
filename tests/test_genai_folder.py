"""onnxruntime-genai model folders: ``quantize GENAI_DIR --calib text.txt -o OUT_DIR`` writes a folder genai loads and
generates with; ``eval`` and ``inspect`` take a genai folder; the input folder is never touched.

The genai folder is built once per module by onnxruntime-genai's own model builder (``-p fp32 -e cpu``, ~10 s) from a
tiny random transformers Llama (hidden 64, 2 layers, GQA 4/2 heads of 16) with a byte-level BPE tokenizer trained
here on a few sentences. The builder declares the cache head size as the symbolic dim ``kv_cache_dim``; the prefill
pass reads it from genai_config.json, as genai does.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install "
                                                     "'qronos-onnx[genai]')")
pytest.importorskip("transformers", reason="the genai builder needs transformers (pip install 'qronos-onnx[text]')")

from qronos_onnx import genai  # noqa: E402
from qronos_onnx.calib.kv_cache import known_dims, plan_prefill  # noqa: E402
from qronos_onnx.calib.specs import InputSpec  # noqa: E402
from qronos_onnx.cli import main  # noqa: E402
from qronos_onnx.errors import ModelError  # noqa: E402

SENTENCES = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
             "all that glitters is not gold", "the early bird catches the worm",
             "a model reads a window of tokens and writes the next one"]
QUICK = ["--seq-len", "32", "--samples", "8", "--group-size", "16", "--no-checkpoint", "--quiet"]


def _sha_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A genai folder written by the genai builder from a tiny random Llama checkpoint (built once per module)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("genai")
    hf = root / "hf"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(hf)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 500.0})  # not the default 10,000: an
    # exporter that misreads transformers 5's rope_parameters scores another ppl (the optimum route test)
    LlamaForCausalLM(cfg).eval().save_pretrained(hf)
    out = root / "fp32"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                          "-p", "fp32", "-e", "cpu", "-c", str(root / "cache")], capture_output=True, text=True,
                         env=env, cwd=root)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (out / "genai_config.json").is_file() and (out / "model.onnx.data").is_file()
    return out


@pytest.fixture(scope="module")
def checkpoint(folder) -> Path:
    """The Hugging Face checkpoint folder the genai folder was built from."""
    return folder.parent / "hf"


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = " ".join(SENTENCES).split()
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return path


def _generate(folder: Path, prompt: str = "the quick brown", max_length: int = 24) -> int:
    """Greedy generation in onnxruntime-genai; returns the number of new tokens."""
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    gen = og.Generator(model, params)
    ids = tokenizer.encode(prompt)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    seq = [int(t) for t in gen.get_sequence(0)]
    assert seq[:len(ids)] == [int(t) for t in ids]
    return len(seq) - len(ids)


def _inputs(model_file: Path) -> list[tuple[str, list]]:
    g = onnx.load(str(model_file), load_external_data=False).graph
    return [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in g.input]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --- the folder, its cache dims -------------------------------------------------------------------------------------

def test_folder_resolves_decoder_tokenizer_and_cache_dims(folder):
    src = genai.open_folder(folder)
    assert src.model_file == folder / "model.onnx" and src.tokenizer == folder
    assert src.decoder_files() == {folder / "model.onnx", folder / "model.onnx.data"}
    assert genai.kv_dims(src.model_file) == {"kv_cache_dim": 16}  # the builder leaves the head size symbolic
    assert genai.resolve_model(folder) == str(folder / "model.onnx")
    spec = InputSpec("past_key_values.0.key", np.dtype(np.float32),
                     ("batch_size", 2, "past_sequence_length", "kv_cache_dim"), "FLOAT")
    ids = InputSpec("input_ids", np.dtype(np.int64), ("batch_size", "sequence_length"), "INT64")
    with pytest.raises(Exception, match="give its folder"):
        plan_prefill([ids, spec])
    with known_dims(genai.kv_dims(src.model_file)):
        plan = plan_prefill([ids, spec])
    assert plan.feed(np.zeros((1, 5), np.int64))["past_key_values.0.key"].shape == (1, 2, 0, 16)


def test_not_a_genai_folder(tmp_path):
    with pytest.raises(ModelError, match="has no genai_config.json"):
        genai.open_folder(tmp_path)
    (tmp_path / "genai_config.json").write_text('{"model": {"decoder": {"filename": "missing.onnx"}}}')
    with pytest.raises(ModelError, match="does not exist"):
        genai.open_folder(tmp_path)
    (tmp_path / "genai_config.json").write_text('{"model": {}')
    with pytest.raises(ModelError, match="not valid JSON"):
        genai.open_folder(tmp_path)


# --- quantize a folder ----------------------------------------------------------------------------------------------

def test_quantize_folder_loads_and_generates_in_genai(folder, text, tmp_path, capsys):
    before = _sha_tree(folder)
    out = tmp_path / "w4"
    assert main(["quantize", str(folder), "--calib", str(text), "-o", str(out), *QUICK]) == 0
    assert _sha_tree(folder) == before, "the input folder changed"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["genai_config.json", "model.onnx", "model.onnx.config.yaml", "model.onnx.report.json",
                     "tokenizer.json", "tokenizer_config.json"]
    assert not list(tmp_path.glob("*.qronos-*")), "staging folder left behind"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    cfg_in = json.loads((folder / "genai_config.json").read_text())
    cfg_out = json.loads((out / "genai_config.json").read_text())
    assert cfg_out["model"]["decoder"]["filename"] == "model.onnx"
    assert cfg_out == cfg_in  # same decoder name: nothing else to change
    proto = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 11 and "MatMul" not in ops  # genai's own int4 form, lm_head included
    levels = {a.i for n in proto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {4}  # a CPU folder: the builder's own int4 default, onnxruntime's fast int8-activation kernels
    assert _inputs(out / "model.onnx") == _inputs(folder / "model.onnx")  # the cache interface as genai wrote it
    report = json.loads((out / "model.onnx.report.json").read_text())
    assert report["output"] == str(out / "model.onnx")
    assert _generate(out) > 0  # new tokens from the quantized folder


def test_eval_and_inspect_take_a_genai_folder(folder, text, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(folder), "--calib", str(text), "-o", str(out), *QUICK]) == 0
    capsys.readouterr()
    js = tmp_path / "ppl.json"
    assert main(["eval", str(folder), "--compare", str(out), "--task", "ppl", "--text", str(text), "--seq-len", "32",
                 "--windows", "8", "--quiet", "--json", str(js)]) == 0
    table = capsys.readouterr().out
    assert "fp32/model.onnx" in table and "q/model.onnx" in table  # two model.onnx told apart by their folders
    models = json.loads(js.read_text())["models"]
    ppl = [m["ppl"]["metrics"]["ppl"] for m in models.values()]
    assert len(ppl) == 2 and all(np.isfinite(ppl)) and abs(ppl[1] / ppl[0] - 1) < 0.05, ppl
    assert main(["inspect", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert "decoder of onnxruntime-genai folder" in shown and "head dim 16" in shown


def test_accuracy_level_follows_the_folders_execution_provider(folder):
    """Unset, export.accuracy_level becomes what genai's model builder writes for the folder's provider: 4 on the
    CPU and WebGPU, 0 on others (CUDA, DirectML); a value given by the user is kept."""
    from qronos_onnx.config import QuantConfig

    src = genai.open_folder(folder)
    assert src.providers == []
    assert genai.default_accuracy_level(QuantConfig(), src).export.accuracy_level == 4
    assert genai.default_accuracy_level(QuantConfig().override({"export.accuracy_level": 0}),
                                        src).export.accuracy_level == 0
    for providers, level in (([{"cuda": {}}], 0), ([{"webgpu": {}}], 4), ([{"dml": {}}, {"cpu": {}}], 0)):
        cfg = json.loads((folder / "genai_config.json").read_text())
        cfg["model"]["decoder"].setdefault("session_options", {})["provider_options"] = providers
        other = genai.GenaiFolder(folder, cfg, src.model_file)
        assert genai.default_accuracy_level(QuantConfig(), other).export.accuracy_level == level, providers


def test_accuracy_level_zero_and_a_symmetric_full_range_grid(folder, text, tmp_path):
    """--accuracy-level 0 keeps float math in MatMulNBits; --sym gives onnxruntime's own int4 grid (each block's
    extreme on -8, scales of either sign), recorded in the config written beside the decoder."""
    import yaml

    out = tmp_path / "sym"
    assert main(["quantize", str(folder), "--calib", str(text), "-o", str(out), "--sym", "--accuracy-level", "0",
                 "--algo", "rtn", *QUICK]) == 0
    proto = onnx.load(str(out / "model.onnx"))
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"} == {0}
    inits = {i.name: i for i in proto.graph.initializer}
    scales = np.concatenate([onnx.numpy_helper.to_array(inits[n.input[2]]).ravel() for n in nodes])
    assert (scales < 0).any() and (scales > 0).any()
    written = yaml.safe_load((out / "model.onnx.config.yaml").read_text())
    assert written["weights"]["full_range"] is True and written["export"]["accuracy_level"] == 0
    assert _generate(out) > 0


def test_explicit_dialect_qdq_also_loads_in_genai(folder, text, tmp_path):
    out = tmp_path / "qdq"
    assert main(["quantize", str(folder), "--calib", str(text), "-o", str(out), "--dialect", "qdq", *QUICK]) == 0
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert "MatMulNBits" not in ops and ops.count("DequantizeLinear") == 11
    assert _generate(out) > 0


# --- refusals: one line, nothing written, inputs untouched ------------------------------------------------------------

def test_output_into_or_over_the_input_is_refused(folder, text, tmp_path, capsys):
    before = _sha_tree(folder)
    cases = [(folder, "is the input genai folder"), (folder / "q", "inside the input genai folder"),
             (folder.parent, "contains the input genai folder")]
    for out, why in cases:
        for extra in ([], ["--overwrite"]):
            assert main(["quantize", str(folder), "--calib", str(text), "-o", str(out), *QUICK, *extra]) == 2
            assert why in _error_line(capsys)
    calib_home = tmp_path / "data"
    calib_home.mkdir()
    (calib_home / "genai_config.json").write_text("{}")
    inside = calib_home / "calib.txt"
    inside.write_text(text.read_text())
    assert main(["quantize", str(folder), "--calib", str(inside), "-o", str(calib_home), *QUICK, "--overwrite"]) == 2
    assert "contains the calibration data" in _error_line(capsys)
    assert _sha_tree(folder) == before
    assert not (folder / "q").exists()


def test_existing_output_needs_overwrite_and_is_replaced_whole(folder, text, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "genai_config.json").write_text("{}")
    (out / "stale.txt").write_text("from an earlier run")
    assert main(["quantize", str(folder), "--calib", str(text), "-o", str(out), *QUICK]) == 2
    assert "already exists; pass --overwrite" in _error_line(capsys)
    assert (out / "stale.txt").is_file()
    assert main(["quantize", str(folder), "--calib", str(text), "-o", str(out), *QUICK, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["quantize", str(folder), "--calib", str(text), "-o", str(other), *QUICK, "--overwrite"]) == 2
    assert "is not a genai folder" in _error_line(capsys)
    assert (other / "keep.txt").read_text() == "mine"
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(["quantize", str(folder), "--calib", str(text), "-o", str(afile), *QUICK, "--overwrite"]) == 2
    assert "is not a folder" in _error_line(capsys)


def test_a_failed_run_leaves_nothing(folder, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("the quick brown fox")
    out = tmp_path / "out"
    assert main(["quantize", str(folder), "--calib", str(short), "-o", str(out), *QUICK]) == 2
    assert "tokens" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]
    assert main(["quantize", str(tmp_path), "--calib", str(short), "-o", str(out), *QUICK]) == 2
    assert "has no genai_config.json" in _error_line(capsys)


def test_the_decoder_file_alone_quantizes_with_the_config_beside_it(folder, text, tmp_path):
    """A genai decoder given as a file: text calibration still finds the head size in genai_config.json beside it."""
    out = tmp_path / "model.q.onnx"
    assert main(["quantize", str(folder / "model.onnx"), "--calib", str(text), "--tokenizer", str(folder),
                 "-o", str(out), *QUICK]) == 0
    assert out.is_file()


# --- tools/hf_to_onnx.py: a Hugging Face checkpoint to a quantized model -----------------------------------------------

REPO = Path(__file__).resolve().parents[1]
OPTIMUM_VENV = Path(os.environ.get("QRONOS_OPTIMUM_VENV", "/tmp/venv-optimum"))


def _hf_to_onnx(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "hf_to_onnx.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_hf_to_onnx_genai_route(checkpoint, text, tmp_path):
    before = _sha_tree(checkpoint)
    run = _hf_to_onnx(checkpoint, "-o", tmp_path / "work", "--calib", text, "--", *QUICK)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "work" / "genai-q"
    assert f"quantized={out}" in run.stdout
    assert (out / "genai_config.json").is_file() and _generate(out) > 0
    assert _sha_tree(checkpoint) == before
    bad = _hf_to_onnx(tmp_path, "-o", tmp_path / "w2", "--calib", text)
    assert bad.returncode == 2 and "no config.json" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not (OPTIMUM_VENV / "bin" / "optimum-cli").is_file(),
                    reason=f"no optimum venv at {OPTIMUM_VENV} (python tools/hf_to_onnx.py --make-optimum-venv; "
                           "optimum-onnx pins transformers < 4.58, so it has its own venv)")
def test_hf_to_onnx_optimum_route_matches_the_genai_export(checkpoint, folder, text, tmp_path, capsys):
    run = _hf_to_onnx(checkpoint, "-o", tmp_path, "--calib", text, "--route", "optimum", "--optimum-venv",
                      OPTIMUM_VENV, "--", *QUICK)
    assert run.returncode == 0, run.stderr[-3000:]
    export = tmp_path / "optimum-fp32"
    assert (export / "model.q.onnx").is_file() and (export / "tokenizer.json").is_file()
    js = tmp_path / "ppl.json"
    assert main(["eval", str(folder), "--compare", str(export / "model.onnx"), "--task", "ppl", "--text", str(text),
                 "--seq-len", "32", "--windows", "8", "--quiet", "--json", str(js)]) == 0
    ppl = [m["ppl"]["metrics"]["ppl"] for m in json.loads(js.read_text())["models"].values()]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-4)  # the same weights through two exporters' cache graphs
    assert "export checked against transformers" in run.stderr
    assert json.loads((export / "config.json").read_text())["rope_theta"] == 500.0  # optimum read the translation
    assert not (tmp_path / "optimum-src").exists()


def test_interrupted_folder_run_resumes_to_the_same_folder(folder, text, tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-run keeps OUT.qronos-partial (with the checkpoint) and no OUT; --resume finishes the same bytes."""
    import qronos_onnx.checkpoint as ck

    args = ["quantize", str(folder), "--calib", str(text), "--seq-len", "32", "--samples", "8", "--group-size", "16",
            "--quiet"]
    assert main([*args, "-o", str(tmp_path / "whole")]) == 0
    orig = ck.Checkpoint.save

    def save(self, *a, **k):
        orig(self, *a, **k)
        if self.done == 3:
            raise KeyboardInterrupt

    out = tmp_path / "split"
    with monkeypatch.context() as m:
        m.setattr(ck.Checkpoint, "save", save)
        assert main([*args, "-o", str(out)]) == 130
    assert "rerun with --resume" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "split.qronos-partial" / "model.onnx.qronos-resume").is_dir()
    assert main([*args, "-o", str(out), "--resume"]) == 0
    assert not (tmp_path / "split.qronos-partial").exists()
    assert (out / "model.onnx").read_bytes() == (tmp_path / "whole" / "model.onnx").read_bytes()
    assert main([*args, "-o", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint" in _error_line(capsys)
    assert not (tmp_path / "none.qronos-partial").exists()


def test_decoder_in_a_subfolder_and_extra_files_are_carried(folder, text, tmp_path):
    """genai_config.json may name the decoder in a subfolder; every other file (subfolders too) is copied as it is."""
    import shutil

    src = tmp_path / "src"
    (src / "decoder").mkdir(parents=True)
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy2(folder / name, src / "decoder" / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(folder / name, src / name)
    cfg = json.loads((folder / "genai_config.json").read_text())
    cfg["model"]["decoder"]["filename"] = "decoder/model.onnx"
    (src / "genai_config.json").write_text(json.dumps(cfg, indent=4))
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("kept")
    before = _sha_tree(src)
    out = tmp_path / "out"
    assert main(["quantize", str(src), "--calib", str(text), "-o", str(out), *QUICK]) == 0
    assert _sha_tree(src) == before
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "decoder/model.onnx", "decoder/model.onnx.config.yaml", "decoder/model.onnx.report.json", "extra/notes.txt",
        "genai_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "decoder/model.onnx"
    assert _generate(out) > 0
