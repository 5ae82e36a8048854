"""KV-cache graphs: text calibration and perplexity build a prefill pass (zero-length past, mask of ones, positions,
genai's seqlens_k / total_sequence_length) from the graph's own inputs; what cannot be built is named on one line.

Graphs (tests/kv_models.py; optimum and the genai builder do not install beside transformers 5): a hand-built
GroupQueryAttention decoder in the genai builder's shape, and a tiny random Llama exported by the torch dynamo exporter
with a cache (flat past/present tensors under optimum's names).
"""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qronos_onnx.api import quantize
from qronos_onnx.calib import InputSpec, graph_input_specs, load_calibration
from qronos_onnx.calib.kv_cache import plan_prefill, prefill_lines
from qronos_onnx.cli import main
from qronos_onnx.config import load_recipe
from qronos_onnx.errors import CalibrationError, ModelError
from qronos_onnx.eval.perplexity import perplexity, window_nll
from tests import kv_models as km

torch = pytest.importorskip("torch")

WORDS = ("the a model reads text window cache key value past present layer head token graph input output batch "
         "sequence length zero one mask position quantize weight scale round error float integer block group "
         "channel calibrate sample prefill decode attention query").split()
SEQ = 32


# --- fixtures ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(text file, tokenizer.json, tokenizer folder, token ids): ~2,400 words with some structure, ids < 45."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("kv_corpus")
    rng = np.random.default_rng(0)
    words, w = [], 0
    for _ in range(2400):  # a sticky random walk over the word list: predictable enough to have a ppl
        w = (w + int(rng.choice([1, 1, 2, 3, int(rng.integers(len(WORDS)))]))) % len(WORDS)
        words.append(WORDS[w])
    text = d / "corpus.txt"
    text.write_text(" ".join(words), encoding="utf-8")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok_json = d / "tokenizer.json"
    tok.save(str(tok_json))
    tok_dir = d / "tok"
    PreTrainedTokenizerFast(tokenizer_file=str(tok_json), unk_token="[UNK]").save_pretrained(str(tok_dir))
    ids = np.array(tok.encode(text.read_text(), add_special_tokens=False).ids, dtype=np.int64)
    assert ids.max() < len(WORDS) + 1 <= km.V
    return text, tok_json, tok_dir, ids


@pytest.fixture(scope="module")
def gqa_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("gqa")
    out = {}
    for explicit in (False, True):
        path = d / f"gqa_{'explicit' if explicit else 'builder'}.onnx"
        onnx.save(km.gqa_decoder(explicit), str(path))
        out[explicit] = path
    return out


@pytest.fixture(scope="module")
def llama_paths(tmp_path_factory):
    """(with past, without past) dynamo exports of the same random Llama, and the torch model (~1 min)."""
    d = tmp_path_factory.mktemp("llama_kv")
    model = km.tiny_llama()
    kv, plain = d / "llama_kv.onnx", d / "llama.onnx"
    km.export_with_past(model, kv)
    km.export_without_past(model, plain)
    return kv, plain, model


def reference_ppl(logits_fn, ids: np.ndarray, seq_len: int, n: int) -> float:
    wins = ids[: n * seq_len].reshape(n, seq_len)
    total = float(window_nll(torch.as_tensor(logits_fn(wins)), wins).sum())
    return math.exp(total / (n * (seq_len - 1)))


def spec(name, dtype, shape, elem=""):
    return InputSpec(name, np.dtype(dtype), shape, elem or np.dtype(dtype).name.upper())


# --- recognising inputs -----------------------------------------------------------------------------------------------

def test_plan_recognises_optimum_genai_and_torch_names():
    specs = [spec("input_ids", np.int64, ("batch_size", "sequence_length")),
             spec("attention_mask", np.int64, ("batch_size", "total_sequence_length")),
             spec("position_ids", np.int64, ("batch_size", "sequence_length")),
             spec("past_key_values.0.key", np.float16, ("batch_size", 3, "past_sequence_length", 64), "FLOAT16"),
             spec("past_key_values.0.value", np.float16, ("batch_size", 3, "past_sequence_length", 64), "FLOAT16"),
             spec("past_key_1", np.float32, ("b", 2, "p", 8)),  # torch-style flat names
             spec("past_value_1", np.float32, ("b", 2, "p", 8)),
             spec("past.2.v", np.float32, (None, 5, None, 4)),
             spec("seqlens_k", np.int32, ("batch_size",)),
             spec("total_sequence_length", np.int32, ()),
             spec("cache_position", np.int64, ("sequence_length",)),
             spec("use_cache_branch", np.bool_, (1,), "BOOL")]
    plan = plan_prefill(specs, ["logits", "present.0.key", "present.0.value", "hidden"])
    assert plan.presents == ["present.0.key", "present.0.value"]
    assert [(e.name, e.kind, e.layer, e.past_axis) for e in plan.past] == [
        ("past_key_values.0.key", "key", 0, 2), ("past_key_values.0.value", "value", 0, 2),
        ("past_key_1", "key", 1, 2), ("past_value_1", "value", 1, 2), ("past.2.v", "value", 2, 2)]
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    feed = plan.feed(ids)
    assert list(feed) == [s.name for s in specs]
    np.testing.assert_array_equal(feed["input_ids"], ids)
    assert feed["attention_mask"].dtype == np.int64 and (feed["attention_mask"] == 1).all()
    np.testing.assert_array_equal(feed["position_ids"], [list(range(6))] * 2)
    assert feed["past_key_values.0.key"].shape == (2, 3, 0, 64) and feed["past_key_values.0.key"].dtype == np.float16
    assert feed["past_key_1"].shape == (2, 2, 0, 8) and feed["past.2.v"].shape == (2, 5, 0, 4)
    assert feed["seqlens_k"].dtype == np.int32 and feed["seqlens_k"].tolist() == [5, 5]
    assert feed["total_sequence_length"].shape == () and int(feed["total_sequence_length"]) == 6
    np.testing.assert_array_equal(feed["cache_position"], np.arange(6))
    assert feed["use_cache_branch"].tolist() == [False]
    text = "\n".join(plan.describe())
    assert "2 past key/value inputs (past_key_values.0.key .. past_key_values.0.value, 1 layers)" in text
    assert "[batch, 3, 0, 64] float16 (kv heads 3, head dim 64)" in text
    assert "seqlens_k: seq - 1" in text and "2 present key/value output(s)" in text


def test_plan_names_each_input_it_cannot_build_on_one_line():
    ids = spec("input_ids", np.int64, ("batch", "seq"))
    past = spec("past_key_values.0.key", np.float32, ("batch", 2, "past", 16))
    with pytest.raises(CalibrationError) as info:
        plan_prefill([ids, past, spec("extra", np.float32, ("batch", 3))])
    msg = str(info.value)
    assert "\n" not in msg and "'extra'" in msg and "[batch, 3] float32" in msg
    with pytest.raises(ModelError) as info:
        plan_prefill([ids, spec("past_key_values.0.key", np.float32, (1, 2, 128, 16)), spec("pixel", np.float32, None),
                      spec("attention_mask", np.float32, ("batch", "seq"))], error=ModelError, what="perplexity")
    lines = str(info.value).splitlines()
    assert lines[0] == "perplexity cannot build 3 graph inputs:" and len(lines) == 4
    assert "'past_key_values.0.key' (graph input [1, 2, 128, 16] float32): past key/value input with a fixed past " \
           "length" in lines[1]
    assert "'pixel' (graph input [?] float32)" in lines[2]
    assert "'attention_mask' (graph input [batch, seq] float32): expected an integer type" in lines[3]
    with pytest.raises(CalibrationError, match="more than one dynamic dim"):
        plan_prefill([ids, spec("past_key_values.0.key", np.float32, ("batch", "heads", "past", "dim"))])


# --- the genai builder's GroupQueryAttention graph ----------------------------------------------------------------------

@pytest.mark.parametrize("explicit", [False, True], ids=["builder", "explicit_lengths"])
def test_gqa_text_calibration_builds_prefill_feeds(gqa_paths, corpus, explicit):
    text, tok_json, _, ids = corpus
    model = ir.load(str(gqa_paths[explicit]))
    calib = load_calibration(text, model, samples=3, seq_len=SEQ, tokenizer=tok_json)
    assert "3 random windows" in calib.source and "4 past key/value inputs built with past length 0" in calib.source
    sess = ort.InferenceSession(str(gqa_paths[explicit]), providers=["CPUExecutionProvider"])
    for feed in calib:
        assert feed["past_key_values.1.value"].shape == (1, km.KV, 0, km.HD)
        if explicit:
            assert feed["seqlens_k"].tolist() == [SEQ - 1] and int(feed["total_sequence_length"]) == SEQ
        logits, present = sess.run(["logits", "present.0.key"], feed)
        assert present.shape == (1, km.KV, SEQ, km.HD)
        np.testing.assert_allclose(logits, km.gqa_reference(feed["input_ids"]), rtol=0, atol=2e-4)


@pytest.mark.parametrize("explicit", [False, True], ids=["builder", "explicit_lengths"])
def test_gqa_ppl_through_the_cache_graph_equals_the_reference(gqa_paths, corpus, explicit):
    ids = corpus[3]
    res = perplexity(gqa_paths[explicit], ids, seq_len=SEQ, max_windows=6, batch_size=4, quiet=True)
    ref = reference_ppl(km.gqa_reference, ids, SEQ, 6)
    assert res.n_windows == 6 and abs(res.ppl / ref - 1) < 1e-4


def test_gqa_quantizes_from_text_end_to_end(gqa_paths, corpus, tmp_path):
    text, tok_json, _, ids = corpus
    cfg = load_recipe("w4").override({"capture.seq_len": SEQ, "capture.samples": 16})
    out = tmp_path / "gqa_w4.onnx"
    res = quantize(gqa_paths[False], text, out, cfg, tokenizer=str(tok_json), quiet=True)
    assert len(res.layers) == 6 * km.LAYERS + 1 and res.n_samples == 16
    names = {i.name for i in onnx.load(str(out), load_external_data=False).graph.input}
    assert "past_key_values.0.key" in names
    fp = perplexity(gqa_paths[False], ids, seq_len=SEQ, max_windows=6, quiet=True)
    q = perplexity(out, ids, seq_len=SEQ, max_windows=6, quiet=True)
    assert math.isfinite(q.ppl) and q.ppl != fp.ppl and abs(q.ppl / fp.ppl - 1) < 0.25


def test_gqa_unknown_input_is_named_with_its_shape(tmp_path, corpus):
    text, tok_json, _, ids = corpus
    path = tmp_path / "gqa_extra.onnx"
    onnx.save(km.gqa_decoder(extra_input="speaker_embedding"), str(path))
    with pytest.raises(CalibrationError) as info:
        load_calibration(text, ir.load(str(path)), seq_len=SEQ, tokenizer=tok_json)
    msg = str(info.value)
    assert "\n" not in msg
    assert "cannot build graph input 'speaker_embedding' (graph input [batch_size, 3] float)" in msg
    with pytest.raises(ModelError, match=r"'speaker_embedding' \(graph input \[batch_size, 3\] float"):
        perplexity(path, ids, seq_len=SEQ, max_windows=2, quiet=True)


def test_inspect_lists_what_is_synthesised(gqa_paths, tmp_path, capsys):
    assert main(["inspect", str(gqa_paths[True])]) == 0
    out = capsys.readouterr().out
    assert "synthesised for text calibration and ppl (a prefill pass, past length 0):" in out
    assert "  attention_mask: ones [batch, seq] int64" in out
    assert "  seqlens_k: seq - 1 (total length - 1) [batch] int32" in out
    assert "  total_sequence_length: seq [] int32" in out
    assert f"4 past key/value inputs (past_key_values.0.key .. past_key_values.1.value, 2 layers): zeros, past " \
           f"length 0 [batch, {km.KV}, 0, {km.HD}] float32 (kv heads {km.KV}, head dim {km.HD})" in out
    assert "4 present key/value output(s) (present.0.key .. present.1.value): computed, not read" in out
    path = tmp_path / "gqa_extra.onnx"
    onnx.save(km.gqa_decoder(extra_input="speaker_embedding"), str(path))
    assert main(["inspect", str(path)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("text/ppl feeds:")]
    assert len(lines) == 1 and "'speaker_embedding' (graph input [batch_size, 3] float)" in lines[0]
    assert prefill_lines(ir.load(str(gqa_paths[False])))[0].startswith("synthesised")


# --- a dynamo export of a transformers Llama with a cache ---------------------------------------------------------------

def test_llama_export_has_optimum_style_cache_io(llama_paths):
    kv, _, _ = llama_paths
    specs = {s.name: s for s in graph_input_specs(ir.load(str(kv)))}
    assert specs["past_key_values.1.value"].shape == ("batch", km.LLAMA_KV, "past_sequence_length", km.LLAMA_HD)
    plan = plan_prefill(list(specs.values()), [o.name for o in onnx.load(str(kv)).graph.output])
    assert len(plan.past) == 2 * km.LLAMA_LAYERS and len(plan.presents) == 2 * km.LLAMA_LAYERS


def test_llama_ppl_with_past_equals_without_past(llama_paths, corpus):
    kv, plain, model = llama_paths
    ids = corpus[3]
    with_past = perplexity(kv, ids, seq_len=SEQ, max_windows=8, batch_size=3, quiet=True)
    without = perplexity(plain, ids, seq_len=SEQ, max_windows=8, batch_size=3, quiet=True)

    def torch_logits(wins):
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(wins), use_cache=False).logits.numpy()

    ref = reference_ppl(torch_logits, ids, SEQ, 8)
    assert with_past.n_windows == without.n_windows == 8
    assert abs(with_past.ppl / without.ppl - 1) < 1e-4 and abs(with_past.ppl / ref - 1) < 1e-4


def test_llama_quantizes_from_text_through_the_cache(llama_paths, corpus, tmp_path):
    """The same calibration text through the cache graph and the plain graph: the same activations, so the same
    quantized model up to float noise; both are scored through their own graphs."""
    kv, plain, _ = llama_paths
    text, tok_json, _, ids = corpus
    cfg = load_recipe("w4").override({"capture.seq_len": SEQ, "capture.samples": 16})
    ppl = {}
    for name, path in (("kv", kv), ("plain", plain)):
        out = tmp_path / f"{name}_w4.onnx"
        res = quantize(path, text, out, cfg, tokenizer=str(tok_json), quiet=True)
        assert len(res.layers) == 7 * km.LLAMA_LAYERS + 1
        ppl[name] = perplexity(out, ids, seq_len=SEQ, max_windows=8, quiet=True).ppl
    fp = perplexity(plain, ids, seq_len=SEQ, max_windows=8, quiet=True).ppl
    assert abs(ppl["kv"] / ppl["plain"] - 1) < 1e-3, ppl
    assert ppl["kv"] != fp and abs(ppl["kv"] / fp - 1) < 0.25


def test_eval_cli_ppl_on_the_cache_graph(llama_paths, corpus, capsys, tmp_path):
    kv, plain, _ = llama_paths
    text, _, tok_dir, ids = corpus
    rc = main(["eval", str(kv), "--compare", str(plain), "--task", "ppl", "--text", str(text), "--tokenizer",
               str(tok_dir), "--seq-len", str(SEQ), "--windows", "4", "--json", str(tmp_path / "ppl.json")])
    assert rc == 0, capsys.readouterr()
    got = json.loads((tmp_path / "ppl.json").read_text())["models"]
    kv_ppl, plain_ppl = (got[str(p)]["ppl"]["metrics"]["ppl"] for p in (kv, plain))
    want = perplexity(plain, ids, seq_len=SEQ, max_windows=4, quiet=True).ppl
    assert abs(plain_ppl / want - 1) < 1e-9 and abs(kv_ppl / want - 1) < 1e-4
