"""Task metrics (eval/tasks.py), the evaluation entry point (eval/report.py) and `qronos-onnx eval`.

Everything runs on tiny ONNX models and a tiny word-level tokenizer built here, against naive numpy/float64
references: mean pooling, retrieval ranks, the logistic-regression optimum (its gradient vanishes), image top-1.
"""
from __future__ import annotations

import json
import random

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx.cli import main as cli_main
from qronos_onnx.errors import CalibrationError, ConfigError, ModelError
from qronos_onnx.eval import tasks
from qronos_onnx.eval.report import EvalData, EvalOptions, evaluate, side_by_side

D, WORDS = 8, [f"w{i}" for i in range(60)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
V = len(SPECIAL) + len(WORDS)


# ------------------------------------------------------------------------------------------------- tiny fixtures


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A BERT-like fast tokenizer: whitespace words, [CLS] text [SEP], [PAD] = 0, token type ids."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(str(d))
    return d


def encoder_weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((V, D))).astype(np.float32), (rng.standard_normal((2, D))).astype(np.float32),
            (rng.standard_normal((D, D)) * 0.5).astype(np.float32))


def tiny_encoder(path, seed: int = 0):
    """hidden = ((E[ids] + T[type]) * mask) @ W: a stand-in for a BERT encoder with the same three inputs."""
    E, T, W = encoder_weights(seed)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["e"]),
             helper.make_node("Gather", ["T", "token_type_ids"], ["t"]),
             helper.make_node("Add", ["e", "t"], ["h0"]),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "ax"], ["mu"]),
             helper.make_node("Mul", ["h0", "mu"], ["h1"]),
             helper.make_node("MatMul", ["h1", "W"], ["last_hidden_state"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    graph = helper.make_graph(nodes, "enc", inputs,
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", D])],
                              [numpy_helper.from_array(E, "E"), numpy_helper.from_array(T, "T"),
                               numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array([-1], np.int64),
                                                                                        "ax")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def reference_embedding(text: str, seed: int = 0, max_length: int = 128) -> np.ndarray:
    """float64, one text at a time, no padding: mean of ((E + T[0]) @ W) over [CLS] words [SEP], normalized."""
    E, T, W = (a.astype(np.float64) for a in encoder_weights(seed))
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    ids = [2] + [vocab.get(w, 1) for w in text.split()][: max_length - 2] + [3]
    h = (E[ids] + T[0]) @ W
    v = h.mean(0)
    return v / np.linalg.norm(v)


def make_articles(n: int = 40, seed: int = 0) -> dict[str, dict]:
    rng = random.Random(seed)
    topics = ["Arts", "History", "People", tasks.DROPPED_TOPIC]
    arts = {}
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 20))]
        desc = " ".join(rng.sample(words, 3) + [rng.choice(WORDS)])
        arts[f"k{i:03d}"] = {"title": f"t{i}", "extract": " ".join(words), "description": desc,
                             "topic": topics[i % 4]}
    return arts


# ------------------------------------------------------------------------------------------------------ pure math


def test_mean_pool_matches_naive_masked_mean():
    rng = np.random.default_rng(1)
    h = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    got = tasks.mean_pool(h, mask).numpy()
    for i in range(3):
        n = mask[i].sum()
        v = h[i, :n].astype(np.float64).mean(0)
        np.testing.assert_allclose(got[i], v / np.linalg.norm(v), rtol=1e-5, atol=1e-6)
    h2 = h.copy()
    h2[1, 2:] = 1e3  # padded positions must not matter
    np.testing.assert_allclose(tasks.mean_pool(h2, mask).numpy(), got, rtol=1e-6)


def naive_ranks(q: np.ndarray, d: np.ndarray) -> list[int]:
    ranks = []
    for i in range(len(q)):
        s = [float(np.dot(q[i], d[j])) for j in range(len(d))]
        ranks.append(sum(1 for j in range(len(d)) if s[j] > s[i]))
    return ranks


def test_retrieval_metrics_match_naive_ranks():
    rng = np.random.default_rng(2)
    d = rng.standard_normal((30, 6))
    q = d + rng.standard_normal((30, 6)) * 1.5
    ranks = naive_ranks(q, d)
    top1, mrr = tasks.retrieval_metrics(torch.tensor(q), torch.tensor(d))
    assert top1 == pytest.approx(np.mean([r == 0 for r in ranks]))
    assert mrr == pytest.approx(np.mean([1 / (r + 1) for r in ranks]))
    assert 0 < top1 < 1  # the case is not trivial


def test_retrieval_metrics_known_case_and_ties():
    d = torch.eye(3, dtype=torch.float64)
    assert tasks.retrieval_metrics(d, d) == (1.0, 1.0)
    q = d[[1, 0, 2]]  # queries 0 and 1 point at each other's document: rank 1 each
    top1, mrr = tasks.retrieval_metrics(q, d)
    assert top1 == pytest.approx(1 / 3) and mrr == pytest.approx((0.5 + 0.5 + 1) / 3)
    tie = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert tasks.retrieval_metrics(tie, tie) == (1.0, 1.0)  # ties count in the correct document's favour
    with pytest.raises(ConfigError, match="same shape"):
        tasks.retrieval_metrics(torch.zeros(3, 2), torch.zeros(4, 2))


def sklearn_objective_grad(X, y, W, b, C):
    """Gradient of C * sum_i CE_i + ||W||^2 / 2 in float64 numpy, written out by hand."""
    Z = X @ W + b
    Z = Z - Z.max(1, keepdims=True)
    P = np.exp(Z) / np.exp(Z).sum(1, keepdims=True)
    Y = np.eye(W.shape[1])[y]
    return C * X.T @ (P - Y) + W, C * (P - Y).sum(0)


@pytest.mark.parametrize("C", [1.0, 0.1])
def test_logreg_reaches_the_regularized_optimum(C):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((120, 5))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = (X[:, 0] > 0).astype(int) + 2 * (X[:, 1] > 0.3)
    W, b = tasks.fit_logreg(X, y, 4, C=C)
    gW, gb = sklearn_objective_grad(X, y, W.numpy(), b.numpy(), C)
    assert np.abs(gW).max() < 1e-6 and np.abs(gb).max() < 1e-6  # stationary point of a strictly convex objective
    assert np.abs(W.numpy()).max() > 0.1  # and not the trivial start
    # a naive reference: plain gradient descent on the same objective lands on the same weights
    W2, b2 = np.zeros((5, 4)), np.zeros(4)
    step = 1.0 / (C * (np.linalg.norm(X, 2) ** 2 + len(X)) + 1)  # below 1 / Lipschitz constant of the gradient
    for _ in range(4000):
        g1, g2 = sklearn_objective_grad(X, y, W2, b2, C)
        W2 -= step * g1
        b2 -= step * g2
    np.testing.assert_allclose(W.numpy(), W2, atol=1e-4)


def test_logreg_separates_separable_data_and_predicts():
    rng = np.random.default_rng(4)
    centers = np.eye(3) * 5
    y = np.repeat(np.arange(3), 20)
    X = centers[y] + rng.standard_normal((60, 3)) * 0.3
    W, b = tasks.fit_logreg(X, y, 3)
    assert (tasks.logreg_predict(X, W, b) == y).all()
    with pytest.raises(ConfigError, match="x \\[n, d\\]"):
        tasks.fit_logreg(X, y[:5], 3)


# ------------------------------------------------------------------------------------------------- article rules


def test_sample_articles_rule_and_independence_of_dict_order():
    arts = make_articles(40)
    arts["k003"]["description"] = ""  # articles without a description are never drawn
    keys = tasks.sample_articles(arts, 10, seed=5)
    pool = [k for k in sorted(arts) if k != "k003"]
    assert keys == [pool[i] for i in np.random.default_rng(5).permutation(39)[:10]]
    shuffled = dict(reversed(list(arts.items())))
    assert tasks.sample_articles(shuffled, 10, seed=5) == keys
    assert tasks.sample_articles(arts, 10, seed=6) != keys
    with pytest.raises(ConfigError, match="cannot sample 40 articles for the retrieval task from 39"):
        tasks.sample_articles(arts, 40)


def test_topic_split_drops_uncategorized_and_keeps_order():
    arts = make_articles(40)
    arts["k001"]["topic"] = ""  # no topic: dropped as well
    arts["k002"]["description"] = ""  # no description: dropped
    train, test, topics = tasks.topic_split(arts, 10, 5, seed=3)
    pool = [k for k in sorted(arts) if arts[k]["topic"] not in ("", tasks.DROPPED_TOPIC) and k != "k002"]
    drawn = [pool[i] for i in np.random.default_rng(3).permutation(len(pool))[:15]]
    assert train == drawn[:10] and test == drawn[10:]
    assert tasks.DROPPED_TOPIC not in topics and topics == sorted({arts[k]["topic"] for k in drawn})
    with pytest.raises(ConfigError, match="cannot sample 30 articles for the topic task from 28"):
        tasks.topic_split(arts, 25, 5)


# ---------------------------------------------------------------------------------------------- encoder in ORT


def test_sentence_encoder_matches_reference_with_padding_and_truncation(tmp_path, tokenizer_dir):
    model = tiny_encoder(tmp_path / "enc.onnx")
    enc = tasks.SentenceEncoder(model, tasks.load_hf_tokenizer(tokenizer_dir), batch_size=3)
    long_text = " ".join(WORDS[i % 60] for i in range(300))  # > 128 tokens: truncated
    texts = ["w1 w2 w3", "w5", long_text, "w7 w8 w9 w10 w11 w12 w13", "w1 zzz w2", ""]
    got = enc.embed(texts).numpy()
    for i, t in enumerate(texts):
        np.testing.assert_allclose(got[i], reference_embedding(t), atol=2e-5)
    assert not np.allclose(got[2], reference_embedding(long_text, max_length=512), atol=1e-3)


def test_encoder_tasks_against_numpy_reference(tmp_path, tokenizer_dir):
    model = tiny_encoder(tmp_path / "enc.onnx")
    arts = make_articles(40)
    res = tasks.encoder_tasks(model, tokenizer_dir, ("retrieval", "topic"), articles=arts, n_articles=32, seed=0,
                              batch_size=5, topic_sizes=(16, 8))
    keys = [sorted(arts)[i] for i in np.random.default_rng(0).permutation(40)[:32]]
    docs = np.stack([reference_embedding(arts[k]["extract"]) for k in keys])
    qs = np.stack([reference_embedding(arts[k]["description"]) for k in keys])
    ranks = naive_ranks(qs, docs)
    r = res["retrieval"]
    assert r.n_articles == 32 and r.accuracy_level == 0
    assert r.top1 == pytest.approx(np.mean([x == 0 for x in ranks]))
    assert r.mrr == pytest.approx(np.mean([1 / (x + 1) for x in ranks]))
    t = res["topic"]
    assert (t.n_train, t.n_test, t.n_topics) == (16, 8, 3)
    train, test, topics = tasks.topic_split(arts, 16, 8)
    lab = {x: i for i, x in enumerate(topics)}
    emb = {k: reference_embedding(arts[k]["extract"]) for k in train + test}
    W, b = tasks.fit_logreg(np.stack([emb[k] for k in train]), np.array([lab[arts[k]["topic"]] for k in train]), 3)
    pred = tasks.logreg_predict(np.stack([emb[k] for k in test]), W, b)
    assert t.accuracy == pytest.approx(np.mean(pred == np.array([lab[arts[k]["topic"]] for k in test])))
    only = tasks.encoder_tasks(model, tokenizer_dir, ("retrieval",), articles=arts, n_articles=32)
    assert set(only) == {"retrieval"} and only["retrieval"].top1 == r.top1
    only = tasks.encoder_tasks(model, tokenizer_dir, ("topic",), articles=arts, topic_sizes=(16, 8))
    assert set(only) == {"topic"} and only["topic"].accuracy == t.accuracy
    with pytest.raises(ConfigError, match="encoder tasks"):
        tasks.encoder_tasks(model, tokenizer_dir, ("ppl",), articles=arts)


def test_encoder_errors(tmp_path, tokenizer_dir):
    with pytest.raises(CalibrationError, match="does not exist"):
        tasks.load_hf_tokenizer(tmp_path / "nowhere")
    lm = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["pixels"], ["y"])], "g",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])]), opset_imports=[helper.make_opsetid("", 17)])
    lm.ir_version = 8
    with pytest.raises(ModelError, match="no 'input_ids'"):
        tasks.SentenceEncoder(lm, None)


# ---------------------------------------------------------------------------------------------------- images


def tiny_classifier(path, seed: int = 0, n_in: int = 12, n_out: int = 4, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_in, n_out)).astype(np.float32) + shift
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["logits"])], "cls",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", 1, 3, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", n_out])], [numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return W


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 1, 3, 4)).astype(np.float32)
    y = rng.integers(0, 4, 50)
    path = tmp_path / "imgs.npz"
    np.savez(path, input=x, label=y)
    return path, x, y


def test_classify_matches_numpy(tmp_path, images):
    path, x, y = images
    W = tiny_classifier(tmp_path / "c.onnx")
    lx, ly = tasks.load_image_npz(path)
    r = tasks.classify(tmp_path / "c.onnx", lx, ly, batch_size=7)
    ref = float(((x.reshape(50, -1).astype(np.float64) @ W).argmax(1) == y).mean())
    assert r.top1 == pytest.approx(ref) and r.n_images == 50 and r.accuracy_level == 0
    assert 0 < r.top1 < 1


def test_load_image_npz_errors(tmp_path):
    np.savez(tmp_path / "a.npz", input=np.zeros((2, 3)))
    with pytest.raises(CalibrationError, match="lacks key"):
        tasks.load_image_npz(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", input=np.zeros((2, 3)), label=np.zeros(2, np.float32))
    with pytest.raises(CalibrationError, match="integers"):
        tasks.load_image_npz(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", input=np.array([{"a": 1}], dtype=object), label=np.zeros(1, np.int64))
    with pytest.raises(CalibrationError, match="cannot read"):  # object arrays are never unpickled
        tasks.load_image_npz(tmp_path / "c.npz")
    with pytest.raises(CalibrationError, match="does not exist"):
        tasks.load_image_npz(tmp_path / "none.npz")


# ------------------------------------------------------------------------------------------- report and CLI


def test_evaluate_and_side_by_side(tmp_path, images):
    path, x, y = images
    tiny_classifier(tmp_path / "a.onnx", seed=0)
    tiny_classifier(tmp_path / "b.onnx", seed=1)
    opts = EvalOptions(images=str(path))
    data = EvalData(opts)
    ra = evaluate(tmp_path / "a.onnx", ["classify"], opts, data)
    rb = evaluate(tmp_path / "b.onnx", ["classify"], opts, data)
    assert ra["classify"]["accuracy_level"] == 0 and "imgs.npz" in ra["classify"]["protocol"]
    table = side_by_side({"a.onnx": ra, "b.onnx": rb})
    va, vb = ra["classify"]["metrics"]["top1"], rb["classify"]["metrics"]["top1"]
    assert va != vb
    assert f"{va:.4f}" in table and f"{vb:.4f}" in table and f"{vb - va:+.4f}" in table
    with pytest.raises(ConfigError, match="unknown task"):
        evaluate(tmp_path / "a.onnx", ["bleu"], opts)


def test_cli_eval_classify_with_compare_and_json(tmp_path, images, capsys):
    path, _, _ = images
    tiny_classifier(tmp_path / "a.onnx", seed=0)
    tiny_classifier(tmp_path / "b.onnx", seed=1)
    out = tmp_path / "r.json"
    rc = cli_main(["eval", str(tmp_path / "a.onnx"), "--compare", str(tmp_path / "b.onnx"), "--task", "classify",
                   "--images", str(path), "--json", str(out), "--accuracy-level", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "a.onnx" in text and "b.onnx" in text and "accuracy_level 4" in text
    payload = json.loads(out.read_text())
    assert payload["options"]["accuracy_level"] == 4 and payload["tasks"] == ["classify"]
    assert set(payload["models"]) == {str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")}


def test_cli_eval_ppl_states_window_rule(tmp_path, capsys):
    """ppl on a tiny LM with a text file and a tokenizer found next to the model."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from .test_eval import tiny_lm

    words = [f"w{i}" for i in range(30)]
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>").save_pretrained(str(tmp_path))
    onnx.save(tiny_lm(), str(tmp_path / "lm.onnx"))
    rng = random.Random(0)
    (tmp_path / "t.txt").write_text(" ".join(rng.choice(words) for _ in range(200)))
    rc = cli_main(["eval", str(tmp_path / "lm.onnx"), "--task", "ppl", "--text", str(tmp_path / "t.txt"),
                   "--seq-len", "16", "--windows", "5", "--json", str(tmp_path / "p.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "first 5 non-overlapping 16-token windows of t.txt, each scored alone" in text
    res = json.loads((tmp_path / "p.json").read_text())["models"][str(tmp_path / "lm.onnx")]["ppl"]
    assert res["details"]["n_windows"] == 5 and res["details"]["n_tokens"] == 5 * 15
    assert res["metrics"]["ppl"] > 1


def test_cli_eval_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["eval", "m.onnx", "--task", "bleu"])
    assert e.value.code == 2
    tiny_classifier(tmp_path / "a.onnx")
    rc = cli_main(["eval", str(tmp_path / "a.onnx"), "--task", "classify", "--images", str(tmp_path / "no.npz")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = cli_main(["eval", str(tmp_path / "a.onnx"), "--task", "retrieval"])
    err = capsys.readouterr().err
    # without the bench packages the first thing missing is the text, otherwise the tokenizer: both are one clear line
    assert rc == 2 and ("--tokenizer" in err or "tools/assets.py install" in err), err


# ------------------------------------------------------------------------------------------ the bench driver


def _bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "run.py"
    spec = importlib.util.spec_from_file_location("bench_run", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


GRID = {"models": ["mnist", {"name": "smollm2", "formats": ["w3"], "algorithms": ["qronos"],
                             "overrides": {"capture.reference": "local"}}],
        "algorithms": ["rtn", "qronos"],
        "formats": [{"name": "w4", "recipe": "w4"}, {"name": "w3", "recipe": "w3",
                                                     "overrides": {"capture.samples": 8}}],
        "anchors": {"mnist": {"w4": {"qronos": 0.99}}}}


def test_bench_grid_expansion_and_config():
    b = _bench()
    cells = b.expand(GRID)
    assert [c.id for c in cells] == ["mnist-float", "mnist-w4-rtn", "mnist-w4-qronos", "mnist-w3-rtn",
                                     "mnist-w3-qronos", "smollm2-float", "smollm2-w3-qronos"]
    cfg = b.cell_config(cells[-1])  # model defaults, then the format's and the model entry's overrides
    assert (cfg.weights.bits, cfg.rounding.algorithm, cfg.capture.samples, cfg.capture.seq_len,
            cfg.capture.reference) == (3, "qronos", 8, 256, "local")
    with pytest.raises(SystemExit, match="unknown model"):
        b.expand({**GRID, "models": ["resnet"]})
    for name in ("smollm2", "mnist", "minilm", "smoke", "smollm2-ablation"):  # the shipped grids expand
        assert b.expand(b.load_grid(name)[1])


def _record(b, cell, metric, bits, extra=None):
    rec = {"cell": cell.id, "model": cell.model, "format": cell.fmt, "algorithm": cell.algorithm, "bits": bits,
           "group_size": 0, "output_bytes": 1000 if cell.algorithm == "float" else 150,
           "machine": {"cpu": "x", "cores": 2, "ram_gib": 1, "os": "linux", "torch_threads": 2, "cuda": None},
           "versions": {"torch": "t"}, "commit": "abc", "source": "def",
           "eval": {"classify": {"metrics": {"top1": metric}, "accuracy_level": 0, "protocol": "p"}}}
    if cell.algorithm != "float":
        rec["quant"] = {"wall_s": 1.5, "cpu_s": 2.0, "timings": {"capture": 0.5, "rounding": 0.7, "export": 0.1},
                        "peak_rss_mb": 900.0, "rss_before_quantize_mb": 300.0, "mean_rel_error": 0.1,
                        "mean_rtn_rel_error": 0.2}
    return rec


def test_bench_report_table_plot_and_resume(tmp_path, capsys):
    import argparse

    b = _bench()
    grid = {k: v for k, v in GRID.items()}
    grid["models"] = ["mnist"]
    cells = b.expand(grid)
    res = tmp_path / "g"
    res.mkdir()
    values = {"mnist-float": 0.9905, "mnist-w4-rtn": 0.9901, "mnist-w4-qronos": 0.9904, "mnist-w3-rtn": 0.97}
    for c in cells:
        if c.id in values:
            (res / f"{c.id}.json").write_text(json.dumps(_record(b, c, values[c.id], 4 if "w4" in c.id else 3)))
    args = argparse.Namespace(results=str(tmp_path), accuracy_level=0, only=None, force=False, dry_run=True,
                              work=str(tmp_path / "w"), cache=None, keep_models=False)
    b.run_grid("g", grid, args)  # dry run: the four cells with JSON are done, one is left
    out = capsys.readouterr().out
    assert "5 cells, 1 to run (4 already done)" in out and "todo  mnist-w3-qronos" in out
    md = b.write_report("g", grid, res, args).read_text()
    assert "| w4 | 0.9905 | 0.9901 | 0.9904 (0.99) |" in md
    assert "| w3 | 0.9905 | 0.9700 | - |" in md and "Not measured yet: mnist-w3-qronos" in md
    assert "| w4-qronos | 1.5 | 2 | 0.5 | 0.7 | 0.1 | 900 | 300 | 0.0 | 0.150 |" in md
    assert "commit abc (package source hash def)" in md
    assert (tmp_path / "g.png").is_file() or (tmp_path / "g.svg").is_file()  # png with matplotlib, else svg
    import xml.etree.ElementTree as ET

    by_id = {r["cell"]: r for r in b.load_records(res)}
    svg = b.write_svg("g", by_id, {c.id: c for c in cells}, ["mnist"], tmp_path)
    root = ET.parse(svg).getroot()  # well-formed, one polyline per algorithm
    assert len([e for e in root.iter() if e.tag.endswith("polyline")]) == 2
    # a format marked `ablation: true` in the grid is plotted as its own points, not as part of the bits line
    import dataclasses

    marked = {c.id: dataclasses.replace(c, ablation=(c.fmt == "w3")) for c in cells}
    series, _ = b._series(by_id, marked, "mnist")
    assert sorted(series) == ["qronos", "rtn", "rtn w3"] and series["rtn"] == [(4, 0.9901)]


def test_bench_worker_measures_one_quantization(tmp_path):
    from . import tiny_models as tm

    b = _bench()
    onnx.save(tm.residual_mlp(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", **tm.mlp_inputs(4)[0])
    from qronos_onnx.config import load_recipe

    spec = {"model": str(tmp_path / "m.onnx"), "calib": str(tmp_path / "c.npz"), "output": str(tmp_path / "q.onnx"),
            "tokenizer": None, "config": load_recipe("w4").override({"device": "cpu"}).to_dict(),
            "result": str(tmp_path / "r.json")}
    (tmp_path / "s.json").write_text(json.dumps(spec))
    assert b.worker(str(tmp_path / "s.json")) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["n_weights"] > 0 and r["output_bytes"] == (tmp_path / "q.onnx").stat().st_size
    assert r["peak_rss_mb"] >= r["rss_before_quantize_mb"] > 10 and r["wall_s"] > 0
    assert r["config"]["weights"]["bits"] == 4
