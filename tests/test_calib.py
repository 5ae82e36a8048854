"""Calibration data: every source kind, the text window rule, and one test per kind of bad input."""
from __future__ import annotations

import json
import random

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx.calib import CalibrationSet, InputSpec, graph_input_specs, load_calibration, window_starts
from qronos_onnx.calib import dataset as calib_dataset
from qronos_onnx.errors import CalibrationError, ConfigError, ModelError
from tests import tiny_models

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a small model reads a long text one window at a time",
    "calibration data must match the graph inputs exactly",
    "every error names the file the key and what was expected",
]


# --- fixtures ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def transformer() -> ir.Model:
    return ir.from_proto(tiny_models.transformer(1))


@pytest.fixture(scope="module")
def cnn() -> ir.Model:
    return ir.from_proto(tiny_models.cnn())


def text_model(vocab: int = 40, inputs=("input_ids", "attention_mask", "position_ids"), ids_shape=("batch", "seq"),
               pos_type=TensorProto.INT32, extra: str | None = None, ids_type=TensorProto.INT64) -> ir.Model:
    """Embedding Gather on input_ids (+ position Gather, mask multiply): the shape of a decoder's text inputs."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, 4)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((512, 4)).astype(np.float32), "pos_emb")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h0"], name="embed")]
    vis = [helper.make_tensor_value_info("input_ids", ids_type, list(ids_shape))]
    h = "h0"
    if "token_type_ids" in inputs:
        vis.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, list(ids_shape)))
        nodes += [helper.make_node("Gather", ["pos_emb", "token_type_ids"], ["tt"], name="type_emb"),
                  helper.make_node("Add", [h, "tt"], ["h0t"], name="add_type")]
        h = "h0t"
    if "position_ids" in inputs:
        vis.append(helper.make_tensor_value_info("position_ids", pos_type, list(ids_shape)))
        nodes += [helper.make_node("Gather", ["pos_emb", "position_ids"], ["p"], name="pos"),
                  helper.make_node("Add", [h, "p"], ["h1"], name="add_pos")]
        h = "h1"
    if "attention_mask" in inputs:
        vis.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, list(ids_shape)))
        nodes += [helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT, name="cast"),
                  helper.make_node("Unsqueeze", ["mf", "axis"], ["mu"], name="unsq"),
                  helper.make_node("Mul", [h, "mu"], ["h2"], name="mask_mul")]
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axis"))
        h = "h2"
    if extra is not None:
        vis.append(helper.make_tensor_value_info(extra, TensorProto.FLOAT, ["batch", "seq", 4]))
        nodes.append(helper.make_node("Add", [h, extra], ["h3"], name="extra_add"))
        h = "h3"
    nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [ids_shape[0], ids_shape[1], 4])
    graph = helper.make_graph(nodes, "text", vis, [out], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def encode(tokenizer_json, text: str) -> np.ndarray:
    from tokenizers import Tokenizer

    return np.array(Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(SENTENCES * 6), encoding="utf-8")  # 6 * 40 = 240 tokens
    return path


def ort_run(model: ir.Model, feed: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def save(path, **arrays):
    np.savez(path, **arrays)
    return path


# --- specs ------------------------------------------------------------------------------------------------------------

def test_graph_input_specs_skips_initializers(transformer):
    specs = graph_input_specs(transformer)
    assert specs == [InputSpec("x", np.dtype(np.float32), ("batch", "seq", 32), "FLOAT"),
                     InputSpec("mask", np.dtype(np.float32), ("seq", "seq"), "FLOAT")]
    proto = tiny_models.residual_mlp()
    proto.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [16, 16]))  # overridable init
    assert [s.name for s in graph_input_specs(ir.from_proto(proto))] == ["x"]


def test_paddle_style_dims_are_dynamic(tmp_path):
    """Paddle2ONNX writes the batch as -1 and every unknown dim as "?": any size, and two "?" need not be equal."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "paddle", [x], [y])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]))
    assert graph_input_specs(model)[0].shape == (None, 3, None, None)
    img = np.zeros((5, 3, 4, 9), np.float32)
    assert len(load_calibration(save(tmp_path / "p.npz", x=img), model)) == 1  # one batch of 5, 4 != 9 accepted
    assert len(load_calibration(tmp_path / "p.npz", model, samples=2)) == 2  # rows of a dynamic batch


# --- npz --------------------------------------------------------------------------------------------------------------

def test_npz_directory_sorted_and_limited(tmp_path, transformer):
    feeds = tiny_models.transformer_inputs(3)
    for name, feed in zip(["b.npz", "a.npz", "c.npz"], feeds):
        save(tmp_path / name, **feed)
    (tmp_path / "notes.txt").write_text("ignored")
    calib = load_calibration(tmp_path, transformer)
    assert isinstance(calib, CalibrationSet) and len(calib) == 3 and calib.n_tokens is None
    order = [1, 0, 2]  # a.npz holds feeds[1]
    for sample, i in zip(calib, order):
        assert list(sample) == ["x", "mask"]
        np.testing.assert_array_equal(sample["x"], feeds[i]["x"])
    assert "3 .npz file(s)" in calib.source
    out = ort_run(transformer, calib[0])[0]
    assert out.shape == (1, 8, 50) and np.isfinite(out).all()
    (tmp_path / "d.npz").write_bytes(b"not a zip")  # after the first 2 samples: never read with samples=2
    two = load_calibration(tmp_path, transformer, samples=2)
    assert len(two) == 2 and "first 2 file(s)" in two.source
    np.testing.assert_array_equal(two[1]["x"], feeds[0]["x"])
    with pytest.raises(CalibrationError, match="d.npz"):
        load_calibration(tmp_path, transformer)


def test_npz_stacked_samples_split_along_axis0(tmp_path, transformer):
    feeds = tiny_models.transformer_inputs(4)
    x = np.stack([f["x"] for f in feeds])  # [4, 1, 8, 32]: one more dim than x
    mask = np.stack([f["mask"] for f in feeds])
    calib = load_calibration(save(tmp_path / "all.npz", x=x, mask=mask), transformer)
    assert len(calib) == 4
    for sample, feed in zip(calib, feeds):
        np.testing.assert_array_equal(sample["x"], feed["x"])
        assert sample["x"].shape == (1, 8, 32) and sample["mask"].shape == (8, 8)
    assert len(load_calibration(tmp_path / "all.npz", transformer, samples=3)) == 3


def test_npz_same_rank_is_one_sample_and_fixed_batch_is_chunked(tmp_path, cnn):
    img = np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32)
    calib = load_calibration(save(tmp_path / "imgs.npz", img=img), cnn)  # symbolic batch: one sample of 6
    assert len(calib) == 1 and calib[0]["img"].shape == (6, 1, 8, 8)
    model = text_model(inputs=("input_ids",), ids_shape=(1, "seq"))  # fixed batch 1
    ids = np.arange(5 * 16, dtype=np.int64).reshape(5, 16) % 40
    calib = load_calibration(save(tmp_path / "ids.npz", input_ids=ids), model)
    assert len(calib) == 5 and calib.n_tokens == 80
    for i, sample in enumerate(calib):
        np.testing.assert_array_equal(sample["input_ids"], ids[i:i + 1])


def test_npz_lazy_mode_rereads_and_detects_changes(tmp_path, transformer, monkeypatch):
    feeds = tiny_models.transformer_inputs(3)
    for i, feed in enumerate(feeds):
        save(tmp_path / f"{i}.npz", **feed)
    monkeypatch.setattr(calib_dataset, "IN_MEMORY_BYTES", 0)
    calib = load_calibration(tmp_path, transformer)
    assert not isinstance(calib.samples, list) and len(calib) == 3
    for sample, feed in zip(calib, feeds):
        np.testing.assert_array_equal(sample["x"], feed["x"])
    save(tmp_path / "1.npz", **feeds[0], extra=np.zeros(3))
    with pytest.raises(CalibrationError, match=r"1\.npz.*changed"):
        calib[1]


# --- lists and readers ------------------------------------------------------------------------------------------------

def test_list_is_kept_read_only_and_unmodified(transformer):
    feeds = tiny_models.transformer_inputs(3)
    before = [f["x"].copy() for f in feeds]
    calib = load_calibration(feeds, transformer, samples=2)
    assert len(calib) == 2
    assert np.shares_memory(calib[0]["x"], feeds[0]["x"])  # no copy
    assert not calib[0]["x"].flags.writeable and feeds[0]["x"].flags.writeable
    with pytest.raises(ValueError):
        calib[0]["x"][0, 0, 0] = 1.0
    for f, b in zip(feeds, before):
        np.testing.assert_array_equal(f["x"], b)
    assert ort_run(transformer, calib[1])[0].shape == (1, 8, 50)
    assert len(calib[1:]) == 1 and isinstance(calib[1:], CalibrationSet)


class Reader:
    def __init__(self, feeds):
        self.feeds, self.calls = list(feeds), 0

    def get_next(self):
        self.calls += 1
        return self.feeds.pop(0) if self.feeds else None


def test_reader_object(transformer):
    feeds = tiny_models.transformer_inputs(4)
    calib = load_calibration(Reader(feeds), transformer)
    assert len(calib) == 4 and "Reader" in calib.source
    np.testing.assert_array_equal(calib[3]["x"], feeds[3]["x"])
    reader = Reader(feeds)
    assert len(load_calibration(reader, transformer, samples=2)) == 2 and reader.calls == 2
    own = calib.reader()  # and back out as an ORT-style reader
    got = [own.get_next() for _ in range(5)]
    assert got[4] is None and got[0] is calib[0]
    own.rewind()
    assert own.get_next() is calib[0]


# --- text -------------------------------------------------------------------------------------------------------------

def test_window_rule_matches_python_random():
    n, seq_len = 1000, 64
    random.seed(7)
    expected = [random.randint(0, n - seq_len - 1) for _ in range(32)]
    state = random.getstate()
    assert window_starts(n, seq_len, 32, seed=7) == expected
    assert random.getstate() == state  # the global generator is left alone
    assert window_starts(n, seq_len, None) == list(range(0, 15 * 64, 64))  # 15 full windows, tail dropped
    assert window_starts(128, 64, None) == [0, 64]


def test_text_random_windows(text_file, tokenizer_json):
    model = text_model()
    calib = load_calibration(text_file, model, samples=5, seed=3, seq_len=16, tokenizer=tokenizer_json)
    ids = encode(tokenizer_json, text_file.read_text())
    assert ids.size == 240 and ids.min() >= 2  # no [UNK], no BOS
    random.seed(3)
    starts = [random.randint(0, ids.size - 16 - 1) for _ in range(5)]
    assert len(calib) == 5 and calib.n_tokens == 80
    for sample, start in zip(calib, starts):
        assert list(sample) == ["input_ids", "position_ids", "attention_mask"]  # graph order
        np.testing.assert_array_equal(sample["input_ids"], ids[None, start:start + 16])
        assert sample["input_ids"].dtype == np.int64 and sample["input_ids"].shape == (1, 16)
        np.testing.assert_array_equal(sample["attention_mask"], np.ones((1, 16), np.int64))
        assert sample["position_ids"].dtype == np.int32  # dtype per graph input
        np.testing.assert_array_equal(sample["position_ids"], np.arange(16)[None])
    assert "240 tokens" in calib.source and "seed 3" in calib.source
    assert ort_run(model, calib[0])[0].shape == (1, 16, 4)


def test_text_consecutive_windows_and_jsonl(tmp_path, tokenizer_json):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": SENTENCES[0], "id": 1}), "", json.dumps(SENTENCES[1]),
             json.dumps({"text": SENTENCES[2]})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids = encode(tokenizer_json, "\n\n".join(SENTENCES[:3]))
    calib = load_calibration(path, text_model(inputs=("input_ids",)), seq_len=8, tokenizer=tokenizer_json)
    assert len(calib) == ids.size // 8 and list(calib[0]) == ["input_ids"]
    for i, sample in enumerate(calib):
        np.testing.assert_array_equal(sample["input_ids"][0], ids[8 * i:8 * i + 8])


def test_text_int32_ids_and_token_type_ids(text_file, tokenizer_json):
    model = text_model(inputs=("input_ids", "token_type_ids", "attention_mask"), ids_type=TensorProto.INT32)
    calib = load_calibration(text_file, model, seq_len=32, tokenizer=tokenizer_json)
    ids = encode(tokenizer_json, text_file.read_text())
    assert len(calib) == 240 // 32
    np.testing.assert_array_equal(calib[2]["input_ids"][0], ids[64:96])
    assert calib[2]["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(calib[2]["token_type_ids"], np.zeros((1, 32), np.int64))
    assert ort_run(model, calib[2])[0].shape == (1, 32, 4)


def test_text_tokenizer_directory(text_file, tokenizer_json):
    calib = load_calibration(text_file, text_model(), samples=2, seq_len=16, tokenizer=tokenizer_json.parent)
    ids = encode(tokenizer_json, text_file.read_text())
    start = window_starts(ids.size, 16, 2, 0)[1]
    np.testing.assert_array_equal(calib[1]["input_ids"][0], ids[start:start + 16])


@pytest.fixture(scope="module")
def bert_tokenizer_json(tmp_path_factory):
    """A tokenizer that puts [CLS] ... [SEP] around every text, as BERT-style encoders' tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1),
                                                                                               ("[SEP]", 2)])
    path = tmp_path_factory.mktemp("bert_tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_text_special_tokens_wrap_every_window(text_file, bert_tokenizer_json, tokenizer_json):
    """Encoders always see [CLS] ... [SEP]; with special_tokens the calibration windows do too, seq_len in all."""
    model = text_model(inputs=("input_ids", "attention_mask"))
    ids = encode(bert_tokenizer_json, text_file.read_text())
    plain = load_calibration(text_file, model, samples=3, seed=1, seq_len=16, tokenizer=bert_tokenizer_json)
    assert all(1 not in s["input_ids"] and 2 not in s["input_ids"] for s in plain)  # off by default
    calib = load_calibration(text_file, model, samples=3, seed=1, seq_len=16, tokenizer=bert_tokenizer_json,
                             special_tokens=True)
    for sample, start in zip(calib, window_starts(ids.size, 14, 3, 1)):
        np.testing.assert_array_equal(sample["input_ids"][0], [1, *ids[start:start + 14], 2])
        np.testing.assert_array_equal(sample["attention_mask"], np.ones((1, 16), np.int64))
    assert "1 + 14 + 1" in calib.source
    # a directory holding tokenizer.json takes the same path
    again = load_calibration(text_file, model, samples=3, seed=1, seq_len=16, tokenizer=bert_tokenizer_json.parent,
                             special_tokens=True)
    np.testing.assert_array_equal(again[2]["input_ids"], calib[2]["input_ids"])
    bad("adds no special tokens", text_file, model, seq_len=16, tokenizer=tokenizer_json, special_tokens=True)
    # the CLI flag and the recipe key reach the loader as capture.special_tokens
    from qronos_onnx.cli import build_parser, config_from_args
    from qronos_onnx.config import ConfigError, QuantConfig

    args = build_parser().parse_args(["quantize", "m", "--calib", "c", "-o", "o", "--special-tokens"])
    assert config_from_args(args).capture.special_tokens is True
    assert QuantConfig().capture.special_tokens is False
    with pytest.raises(ConfigError, match="special_tokens"):
        QuantConfig().override({"capture.special_tokens": "yes"})
    bad("no room for text", text_file, model, seq_len=2, tokenizer=bert_tokenizer_json, special_tokens=True)


# --- bad input: one test each -----------------------------------------------------------------------------------------

def bad(match: str, source, model, **kw):
    with pytest.raises(CalibrationError, match=match) as info:
        load_calibration(source, model, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_input(tmp_path, transformer):
    msg = bad("missing graph input", save(tmp_path / "s.npz", x=tiny_models.transformer_inputs(1)[0]["x"]), transformer)
    assert "s.npz" in msg and "'mask'" in msg and "found keys 'x'" in msg


def test_extra_key(tmp_path, transformer):
    msg = bad("unexpected key", save(tmp_path / "s.npz", **tiny_models.transformer_inputs(1)[0], labels=np.zeros(3)),
              transformer)
    assert "s.npz" in msg and "'labels'" in msg and "'x', 'mask'" in msg


def test_dtype_mismatch(tmp_path, transformer):
    feed = tiny_models.transformer_inputs(1)[0]
    msg = bad("dtype", save(tmp_path / "s.npz", x=feed["x"].astype(np.float64), mask=feed["mask"]), transformer)
    assert "s.npz" in msg and "'x'" in msg and "float64" in msg and "expected float32" in msg


def test_rank_mismatch(tmp_path, transformer):
    feed = tiny_models.transformer_inputs(1)[0]
    msg = bad("dims", save(tmp_path / "s.npz", x=feed["x"][0, 0], mask=feed["mask"]), transformer)
    assert "s.npz" in msg and "'x'" in msg and "(32,)" in msg and "expected 3 dims [batch, seq, 32]" in msg


def test_fixed_dim_mismatch(tmp_path, transformer):
    feed = tiny_models.transformer_inputs(1)[0]
    msg = bad("dim 2 is 16, expected 32", save(tmp_path / "s.npz", x=feed["x"][..., :16], mask=feed["mask"]),
              transformer)
    assert "s.npz" in msg and "'x'" in msg


def test_symbolic_dim_disagreement(transformer):
    feed = tiny_models.transformer_inputs(1)[0]
    feed["mask"] = np.zeros((4, 4), np.float32)
    msg = bad("symbolic dim 'seq'", [feed], transformer)
    assert "list item 0" in msg and "'x'" in msg and "'mask'" in msg and "8" in msg and "4" in msg


def test_nan_and_inf(tmp_path, transformer):
    feeds = tiny_models.transformer_inputs(3)
    x = np.stack([f["x"] for f in feeds])
    x[2, 0, 1, :2] = np.nan
    x[2, 0, 3, 5] = -np.inf
    msg = bad("2 NaN and 1 Inf", save(tmp_path / "s.npz", x=x, mask=np.stack([f["mask"] for f in feeds])),
              transformer)
    assert "s.npz" in msg and "sample 2" in msg and "'x'" in msg and "finite" in msg


def test_empty_sets(tmp_path, transformer):
    bad("list is empty", [], transformer)
    bad("first get_next", Reader([]), transformer)
    (tmp_path / "readme.md").write_text("x")
    assert "readme.md" in bad("holds no .npz file", tmp_path, transformer)
    bad("0 samples", save(tmp_path / "e.npz", x=np.zeros((0, 1, 8, 32), np.float32),
                          mask=np.zeros((0, 8, 8), np.float32)), transformer)
    bad("holds no arrays", save(tmp_path / "n.npz"), transformer)


def test_corrupt_and_unreadable_files(tmp_path, transformer):
    (tmp_path / "junk.npz").write_bytes(b"\x00garbage")
    assert "junk.npz" in bad("not a readable .npz archive .not a zip", tmp_path / "junk.npz", transformer)
    import pickle
    (tmp_path / "pickle.npz").write_bytes(pickle.dumps(Payload()))
    assert "pickle.npz" in bad("pickled data, which is never loaded", tmp_path / "pickle.npz", transformer)
    good = save(tmp_path / "good.npz", **tiny_models.transformer_inputs(1)[0]).read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
    assert "cut.npz" in bad("cut.npz", tmp_path / "cut.npz", transformer)
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    assert "one.npz" in bad("single .npy array", tmp_path / "one.npz", transformer)
    bad("does not exist", tmp_path / "nope", transformer)
    (tmp_path / "x.npy").write_bytes(b"")
    bad("unsupported type", tmp_path / "x.npy", transformer)


TRIGGERED: list[str] = []


def _trigger(tag):
    TRIGGERED.append(tag)
    return tag


class Payload:
    def __reduce__(self):
        return (_trigger, ("unpickled",))


def test_pickled_object_array_is_refused_without_running_it(tmp_path, transformer):
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([Payload()], dtype=object), mask=np.zeros((8, 8), np.float32))
    TRIGGERED.clear()
    msg = bad("pickled", path, transformer)
    assert "evil.npz" in msg and "'x'" in msg and TRIGGERED == []
    msg = bad("dtype object", [{"x": np.array([1.0], dtype=object), "mask": np.zeros((8, 8), np.float32)}],
              transformer)
    assert "'x'" in msg and "expected float32" in msg


def test_mixed_stacked_and_single_keys(tmp_path, transformer):
    feed = tiny_models.transformer_inputs(1)[0]
    msg = bad("same number of samples", save(tmp_path / "m.npz", x=feed["x"][None].repeat(3, 0), mask=feed["mask"]),
              transformer)
    assert "m.npz" in msg and "'x'" in msg and "'mask'" in msg


def test_bad_list_items_and_sources(transformer):
    feed = tiny_models.transformer_inputs(1)[0]
    bad("list item 1: is a tuple", [feed, (1, 2)], transformer)
    bad("'x' is a builtins.list, expected a numpy array", [{"x": [1.0], "mask": feed["mask"]}], transformer)
    bad("single dict", feed, transformer)
    bad("not supported", 42, transformer)
    with pytest.raises(ConfigError, match="samples"):
        load_calibration([feed], transformer, samples=0)


def test_text_errors(tmp_path, text_file, tokenizer_json, transformer):
    msg = bad("needs a tokenizer", text_file, text_model())
    assert "corpus.txt" in msg
    bad("tokenizer .*does not exist", text_file, text_model(), tokenizer=tmp_path / "no_tok")
    msg = bad("240 tokens", text_file, text_model(), seq_len=240, samples=1, tokenizer=tokenizer_json)
    assert "corpus.txt" in msg and "at least 241" in msg
    assert len(load_calibration(text_file, text_model(), seq_len=240, tokenizer=tokenizer_json)) == 1
    bad("seq_len=241 needs at least 241", text_file, text_model(), seq_len=241, tokenizer=tokenizer_json)
    assert "'x', 'mask'" in bad("named 'input_ids'", text_file, transformer, tokenizer=tokenizer_json)
    bad("cannot build graph input.*'past_hidden'", text_file, text_model(extra="past_hidden"),
        tokenizer=tokenizer_json)
    bad("fixed sequence length 128.*set seq_len to 128", text_file, text_model(ids_shape=(1, 128)), seq_len=16,
        tokenizer=tokenizer_json)
    bad("token id .*'emb' has only 5 rows", text_file, text_model(vocab=5), seq_len=16, tokenizer=tokenizer_json)
    (tmp_path / "empty.txt").write_text("  \n")
    bad("holds no text", tmp_path / "empty.txt", text_model(), tokenizer=tokenizer_json)
    (tmp_path / "bad.jsonl").write_text('{"text": "a b"}\n{"body": "c"}\n')
    bad(r"bad.jsonl' line 2: expected a \"text\" key", tmp_path / "bad.jsonl", text_model(), tokenizer=tokenizer_json)
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 " * 100)
    bad("not UTF-8", tmp_path / "latin.txt", text_model(), tokenizer=tokenizer_json)


def test_model_input_without_type():
    proto = tiny_models.residual_mlp()
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.UNDEFINED
    with pytest.raises(ModelError, match="'x' declares no element type"):
        graph_input_specs(ir.from_proto(proto))
