"""Embedding tables and the lm_head: every --embeddings / --lm-head setting on tiny tied and untied decoders, the
quantized table decoded from the file bit for bit, a tied head untied only in the output, one-line errors."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qronos_onnx.api import quantize
from qronos_onnx.cli import main
from qronos_onnx.config import EmbeddingConfig, QuantConfig, load_recipe
from qronos_onnx.errors import ConfigError, ExportError
from qronos_onnx.export.gather import decode_gbq
from qronos_onnx.formats.table import quantize_table

from . import tiny_models as tm

V, D = 96, 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    d = tmp_path_factory.mktemp("decoders")
    out = {}
    for tied in (True, False):
        p = d / f"{'tied' if tied else 'untied'}.onnx"
        onnx.save(tm.token_decoder(tied, vocab=V, d=D), str(p))
        out[tied] = p
    return out


def _cfg(bits, head, **more) -> QuantConfig:
    return load_recipe("w4").override({"embeddings.bits": bits, "embeddings.lm_head": head, **more})


def _run(path, feed) -> np.ndarray:
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _inits(proto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _table(path) -> np.ndarray:
    return _inits(onnx.load(str(path)))["embed_tokens"]


def _gbq_table(proto) -> tuple[onnx.NodeProto, np.ndarray]:
    """The table a GatherBlockQuantized node holds, unpacked in numpy from the file's initializers."""
    node = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    inits = _inits(proto)
    attrs = {a.name: a.i for a in node.attribute}
    zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    scales = inits[node.input[2]]
    data = inits[node.input[0]]
    cols = data.shape[1] * 8 // attrs["bits"]
    return node, decode_gbq(data, scales, zp, attrs["bits"], attrs["block_size"], cols)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("bits", [8, 4, "float"])
@pytest.mark.parametrize("head", ["quantize", "float"])
def test_every_setting_runs_and_the_table_decodes_bit_exactly(decoders, tmp_path, tied, bits, head):
    src = decoders[tied]
    out = tmp_path / "q.onnx"
    res = quantize(src, tm.token_inputs(vocab=V), out, _cfg(bits, head, **{"rounding.algorithm": "rtn"}), quiet=True)
    proto = onnx.load(str(out))
    ops = [n.op_type for n in proto.graph.node]
    feed = {"input_ids": np.arange(V, dtype=np.int64)[None]}
    ref, got = _run(src, feed), _run(out, feed)
    assert got.shape == ref.shape and np.all(np.isfinite(got))
    assert np.abs(got - ref).max() <= 0.5 * np.abs(ref).max()  # W4: close, not equal
    report = json.loads(res.report_path.read_text())
    head_quantized = "lm_head" in {n for r in res.layers for n in r.nodes}
    assert head_quantized == (head == "quantize")
    assert report["lm_head"]["mode"] == head
    expected_rows = quantize_table(_table(src), EmbeddingConfig(bits=bits), "embed_tokens") if bits != "float" \
        else None
    if bits == "float":
        assert "GatherBlockQuantized" not in ops and report["embeddings"] == []
        gather = next(n for n in proto.graph.node if n.op_type == "Gather" and n.name == "embed")
        np.testing.assert_array_equal(_inits(proto)[gather.input[0]], _table(src))
    else:
        assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
        node, table = _gbq_table(proto)
        assert node.name == "embed" and node.domain == "com.microsoft" and node.output[0] == "h0"
        exp = expected_rows.dequantize().numpy()
        assert table.tobytes() == exp.tobytes()  # unpacked from the file's bytes
        (e,) = report["embeddings"]
        assert e["table"] == "embed_tokens" and e["bits"] == bits and e["form"] == "GatherBlockQuantized"
        assert e["group_size"] == (0 if bits == 8 else 32)
        # onnxruntime computes the same table: embedding rows are what the first block sees
        emb_only = onnx.helper.make_model(
            onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("input_ids", 7, [None, None])],
                                   [onnx.helper.make_tensor_value_info("h0", 1, None)],
                                   [i for i in proto.graph.initializer if i.name in node.input]),
            opset_imports=[onnx.helper.make_opsetid("", 21), onnx.helper.make_opsetid("com.microsoft", 1)])
        rows = _run(emb_only.SerializeToString(), feed)[0]
        assert rows.tobytes() == exp.tobytes()
    names = {i.name for i in proto.graph.initializer}
    head_node = next(n for n in proto.graph.node if n.name == "lm_head")
    w_in = head_node.input[1]
    producer = next((n for n in proto.graph.node if w_in in n.output), None)
    if head == "quantize":
        assert producer is not None and producer.op_type == "DequantizeLinear"
        if tied:  # untied in the output: the head reads its own codes, not the table's
            assert producer.input[0] not in {n.input[0] for n in proto.graph.node if n.op_type.startswith("Gather")}
            assert report["lm_head"]["untied"] == [{"node": "lm_head", "table": "embed_tokens",
                                                    "weight": "embed_tokens_lm_head"}]
            assert ("embed_tokens" in names) == (bits == "float")  # the float table is gone when both are quantized
    elif tied:  # a float tied head keeps reading the float table through its Transpose
        assert producer is not None and producer.op_type == "Transpose" and producer.input[0] == "embed_tokens"
        np.testing.assert_array_equal(_inits(proto)["embed_tokens"], _table(src))
        if bits != "float":
            assert report["embeddings"][0]["float_readers_kept"] == ["tie"]
    else:
        assert producer is None and w_in == "lm_head_w"


def test_tied_head_is_quantized_on_its_own_grid(decoders, tmp_path):
    """The tied head (a [D, V] weight, per output channel = per token) and the table (per row of [V, D]) are two
    different quantized tensors of the same float values."""
    out = tmp_path / "q.onnx"
    res = quantize(decoders[True], tm.token_inputs(vocab=V), out, _cfg(4, "quantize"), quiet=True)
    proto = onnx.load(str(out))
    inits = _inits(proto)
    node, table = _gbq_table(proto)
    head = next(n for n in proto.graph.node if n.name == "lm_head")
    dq = next(n for n in proto.graph.node if head.input[1] in n.output)
    assert dq.input[0] != node.input[0] and inits[dq.input[0]].shape == (D, V)
    (layer,) = [r for r in res.layers if r.nodes == ["lm_head"]]
    assert layer.weight == "embed_tokens_lm_head" and layer.shape == [D, V] and layer.algorithm == "qronos"
    assert not np.array_equal(table.T, _dq(inits, dq))  # separately rounded


def _dq(inits, dq) -> np.ndarray:
    q = inits[dq.input[0]].astype(np.int32)
    s = inits[dq.input[1]]
    z = inits[dq.input[2]].astype(np.int32) if len(dq.input) > 2 else 0
    return ((q - z) * s).astype(np.float32)


def test_both_float_leaves_the_graph_as_before(decoders, tmp_path):
    """--embeddings float --lm-head float: the tables, the tie and the head are what they were (only the block
    weights are quantized), and the file is byte-identical however often it is written."""
    outs = []
    for i in range(2):
        out = tmp_path / f"q{i}.onnx"
        quantize(decoders[True], tm.token_inputs(vocab=V), out, _cfg("float", "float"), quiet=True)
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    src, proto = onnx.load(str(decoders[True])), onnx.load(str(outs[0]))
    kept = [(n.op_type, list(n.input), list(n.output)) for n in src.graph.node if n.op_type in ("Gather", "Transpose")
            or n.name == "lm_head"]
    assert kept == [(n.op_type, list(n.input), list(n.output)) for n in proto.graph.node
                    if n.op_type in ("Gather", "Transpose") or n.name == "lm_head"]
    assert all(op.domain in ("", "ai.onnx") for op in proto.opset_import)
    assert proto.metadata_props and {p.key: p.value for p in proto.metadata_props}["quant.lm_head"] == "float"


def test_mx_dialect_and_odd_width_use_dequantize_linear_gather(tmp_path):
    """Compilers get the standard form; a 4-bit table of odd width cannot be row-packed: DQ -> Gather, golden too."""
    path = tmp_path / "odd.onnx"
    onnx.save(tm.token_decoder(False, vocab=V, d=D), str(path))
    out = tmp_path / "mx.onnx"
    res = quantize(path, tm.token_inputs(vocab=V), out, _cfg(4, "quantize", **{"export.dialect": "mx",
                                                                                "rounding.algorithm": "rtn"}),
                   quiet=True)
    assert res.embeddings[0]["form"] == "DequantizeLinear+Gather"
    proto = onnx.load(str(out))
    gather = next(n for n in proto.graph.node if n.name == "embed")
    dq = next(n for n in proto.graph.node if gather.input[0] in n.output)
    assert gather.op_type == "Gather" and dq.op_type == "DequantizeLinear"
    exp = quantize_table(_table(path), EmbeddingConfig(bits=4), "embed_tokens").dequantize().numpy()
    assert _dq_blocked(_inits(proto), dq).tobytes() == exp.tobytes()
    _run(out, {"input_ids": np.arange(V, dtype=np.int64)[None]})


def _dq_blocked(inits, dq) -> np.ndarray:
    q = inits[dq.input[0]].astype(np.int32)
    s = np.repeat(inits[dq.input[1]], 32, axis=1)[:, : q.shape[1]]
    z = np.repeat(inits[dq.input[2]].astype(np.int32), 32, axis=1)[:, : q.shape[1]] if len(dq.input) > 2 else 0
    return ((q - z).astype(np.float32) * s).astype(np.float32)


def test_golden_check_catches_a_wrong_table(decoders, tmp_path):
    from qronos_onnx.export.gather import QuantizedTable
    from qronos_onnx.export.validate import validate_export
    from qronos_onnx.graph.embeddings import find_embedding_tables
    from qronos_onnx.graph.model import load_model

    out = tmp_path / "q.onnx"
    quantize(decoders[False], tm.token_inputs(vocab=V), out, _cfg(8, "float", **{"rounding.algorithm": "rtn"}),
             quiet=True)
    (t,) = find_embedding_tables(load_model(decoders[False]))
    qw = quantize_table(_table(decoders[False]), EmbeddingConfig(bits=8), t.name)
    qw.codes[3, 5] += 1  # one code off
    with pytest.raises(ExportError, match=r"GatherBlockQuantized 'embed' for table 'embed_tokens' differs .* at 1 of"):
        validate_export(out, {}, [], tables=[QuantizedTable(t, qw, nodes=["embed"])])


def test_exclude_keeps_a_gather_float(decoders, tmp_path):
    res = quantize(decoders[False], tm.token_inputs(vocab=V), tmp_path / "q.onnx",
                   _cfg(8, "quantize", exclude=["^embed$"]), quiet=True)
    assert res.embeddings == []


def test_float16_table(tmp_path):
    path = tmp_path / "f16.onnx"
    onnx.save(tm.token_decoder(True, vocab=V, d=D, dtype=np.float16), str(path))
    out = tmp_path / "q.onnx"
    quantize(path, tm.token_inputs(vocab=V), out, _cfg(4, "quantize", **{"rounding.algorithm": "rtn"}), quiet=True)
    node, table = _gbq_table(onnx.load(str(out)))
    exp = quantize_table(_table(path), EmbeddingConfig(bits=4), "embed_tokens").dequantize()
    assert table.dtype == np.float16 and table.tobytes() == exp.numpy().tobytes()


@pytest.mark.parametrize("key, value, msg", [
    ("embeddings.bits", 3, "embeddings.bits must be 8, 4 or float, got 3"),
    ("embeddings.bits", "fp16", "embeddings.bits must be 8, 4 or float, got 'fp16'"),
    ("embeddings.lm_head", "tied", "embeddings.lm_head must be one of quantize, float; got 'tied'"),
    ("embeddings.group_size", 24, "embeddings.group_size must be null (auto), 0 (one scale per row) or a power"),
    ("embeddings.symmetric", "yes", "embeddings.symmetric must be true or false"),
])
def test_bad_config_values_are_one_line_errors(key, value, msg):
    with pytest.raises(ConfigError) as err:
        QuantConfig().override({key: value})
    assert msg in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("flag, value", [("--embeddings", "2"), ("--lm-head", "tied")])
def test_bad_flags_are_one_line_errors(decoders, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", str(decoders[True]), "--calib", str(tmp_path), "-o", str(tmp_path / "q.onnx"), flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "invalid choice" in err


def test_cli_flags_reach_the_config(decoders, tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, s in enumerate(tm.token_inputs(vocab=V)):
        np.savez(calib / f"s{i}.npz", **s)
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(decoders[True]), "--calib", str(calib), "-o", str(out), "--embeddings", "4",
                 "--lm-head", "quantize", "--algo", "rtn"]) == 0
    text = capsys.readouterr().out
    assert "embedding table embed_tokens 96x64: 4-bit g32 asym round-to-nearest, GatherBlockQuantized" in text
    assert "lm_head (quantize): lm_head (untied from embed_tokens in the output)" in text
    cfg = (tmp_path / "q.onnx.config.yaml").read_text()
    assert "embeddings:" in cfg and "bits: 4" in cfg
    assert main(["report", str(out) + ".report.json"]) == 0
    assert "embedding table embed_tokens" in capsys.readouterr().out


def test_inspect_lists_tables_and_tied_heads(decoders, capsys):
    assert main(["inspect", str(decoders[True])]) == 0
    text = capsys.readouterr().out
    assert "embedding tables (constant-table Gathers, --embeddings): 1" in text
    assert "gathered by embed, also read by tie" in text
    assert "tied lm_head: lm_head reads embed_tokens through a Transpose" in text


def test_untie_keeps_the_float_function_and_heads_are_found_by_shape_and_position(tmp_path):
    from qronos_onnx.graph.embeddings import find_embedding_tables, find_heads, untie_heads
    from qronos_onnx.graph.io import save_model
    from qronos_onnx.graph.model import load_model
    from qronos_onnx.graph.targets import find_targets

    # an FFN as wide as the vocabulary is not a head: its output feeds another target
    proto = tm.token_decoder(False, vocab=V, d=D, ffn=V)
    path = tmp_path / "wide.onnx"
    onnx.save(proto, str(path))
    model = load_model(path)
    assert find_heads(model, find_targets(model), find_embedding_tables(model), []) == ["lm_head"]
    path = tmp_path / "tied.onnx"
    onnx.save(tm.token_decoder(True, vocab=V, d=D), str(path))
    model = load_model(path)
    (u,) = untie_heads(model)
    assert (u.node, u.table) == ("lm_head", "embed_tokens")
    assert "tie" not in {n.name for n in model.graph}  # nothing else read the Transpose
    targets = find_targets(model)
    assert find_heads(model, targets, find_embedding_tables(model), [u]) == ["lm_head"]
    save_model(model, tmp_path / "untied.onnx")
    feed = {"input_ids": np.arange(V, dtype=np.int64)[None]}
    assert _run(path, feed).tobytes() == _run(tmp_path / "untied.onnx", feed).tobytes()


def _genai_tied(path) -> None:
    """The onnxruntime-genai builder's tie: the head's MatMul reads W [D, V] and the embedding gathers rows of
    Transpose(W)."""
    m = tm.token_decoder(True, vocab=V, d=D)
    g = m.graph
    w = next(i for i in g.initializer if i.name == "embed_tokens")
    arr = numpy_helper.to_array(w)
    g.initializer.remove(w)
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr.T), "lm_head.weight"))
    nodes = [n for n in g.node if n.name != "tie"]
    for n in nodes:
        n.input[:] = ["lm_head.weight" if x == "embed_tokens_t" else "embed_t" if x == "embed_tokens" else x
                      for x in n.input]
    tr = onnx.helper.make_node("Transpose", ["lm_head.weight"], ["embed_t"], perm=[1, 0], name="embed_transpose")
    del g.node[:]
    g.node.extend([tr, *nodes])
    onnx.save(m, str(path))


def test_genai_style_tie_gets_its_own_quantized_table(tmp_path):
    model, out = tmp_path / "genai_tied.onnx", tmp_path / "q.onnx"
    _genai_tied(model)
    before = model.read_bytes()
    feed = tm.token_inputs(vocab=V)[0]
    ref = _run(model, feed)
    res = quantize(model, tm.token_inputs(vocab=V), out, _cfg(8, "quantize"), quiet=True)
    proto = onnx.load(str(out))
    node, table = _gbq_table(proto)  # the embedding is a quantized table, no float copy of W is left
    inits = _inits(proto)
    assert not any(v.dtype == np.float32 and v.size >= V * D for v in inits.values())
    assert np.abs(table - numpy_helper.to_array(onnx.load(str(model)).graph.initializer[-1]).T).max() < 0.05
    assert "lm_head" in [n for r in res.layers for n in r.nodes]
    assert np.abs(_run(out, feed) - ref).max() < 0.5 * np.abs(ref).max()
    assert model.read_bytes() == before
