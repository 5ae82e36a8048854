"""Fused (QuaRot-style) rotations on tiny Llama decoders exported by the torch dynamo and TorchScript exporters:
function-preserving, norms folded exactly, at most one float rotation per block, a clear fallback otherwise."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qronos_onnx.api import quantize
from qronos_onnx.config import load_recipe
from qronos_onnx.graph.io import save_model
from qronos_onnx.graph.model import load_model
from qronos_onnx.graph.targets import find_targets, fold_constant_aliases
from qronos_onnx.transforms import TransformLog
from qronos_onnx.transforms.fused import FusedRotationUnsupported, find_norms, fuse_rotations
from qronos_onnx.transforms.online import ROTATION_PREFIX
from qronos_onnx.transforms.verify import run_float_model

from . import tiny_models as tm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, BLOCKS = 128, 2


def _llama(attn: str):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=BLOCKS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, use_cache=False, attn_implementation=attn)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:  # non-trivial RMSNorm scales, so that folding them is tested
                p.uniform_(0.5, 1.5)
    return m


class _Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """{exporter: path} for the same random Llama; built once per test run (~20 s)."""
    d = tmp_path_factory.mktemp("llama")
    ids = torch.randint(0, VOCAB, (1, 8))
    out = {}
    dyn = d / "dynamo.onnx"
    torch.onnx.export(_Logits(_llama("sdpa")), (ids, torch.ones_like(ids)), str(dyn), dynamo=True,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("b", max=8), 1: torch.export.Dim("s", max=64)},
                                      {0: torch.export.Dim("b", max=8), 1: torch.export.Dim("s", max=64)}))
    out["dynamo"] = dyn
    ts = d / "torchscript.onnx"
    torch.onnx.export(_Logits(_llama("eager")), (ids, torch.ones_like(ids)), str(ts), dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
    out["torchscript"] = ts
    return out


def _feeds(model_path: Path, n: int = 1, seq: int = 8, seed: int = 0) -> list[dict]:
    names = [i.name for i in onnx.load(str(model_path), load_external_data=False).graph.input]
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        ids = rng.integers(0, VOCAB, (1, seq)).astype(np.int64)
        f = {"input_ids": ids}
        if "attention_mask" in names:
            f["attention_mask"] = np.ones_like(ids)
        feeds.append(f)
    return feeds


def _ort(path: Path, feed: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fused_rotation_preserves_the_function_and_folds_norms(llamas, exporter, tmp_path):
    path = llamas[exporter]
    model = load_model(path)
    fold_constant_aliases(model)
    targets = find_targets(model)
    feed = _feeds(path)[0]
    tlog = TransformLog()
    fr = fuse_rotations(model, targets, feed, tlog, seed=3, run=run_float_model)
    assert fr.dim == 64 and fr.norms == 2 * BLOCKS + 1
    assert len(fr.readers) == 5 * BLOCKS + 1  # q, k, v, gate, up per block, and lm_head
    assert len(fr.writers) == 2 * BLOCKS + 1  # o_proj, down_proj per block, and the embedding table
    assert len(fr.head_rotated) == BLOCKS and all(hd == 16 for _, _, hd in fr.head_rotated)
    for n in find_norms(model.graph):  # every scale folded into the readers: exactly ones
        assert n.gamma is not None and np.array_equal(n.gamma.const_value.numpy(), np.ones(64, np.float32))
    out = tmp_path / "rot.onnx"
    save_model(model, out)
    for f in _feeds(path, n=3, seq=11, seed=5):  # another length than the verification sample
        ref, got = _ort(path, f), _ort(out, f)
        assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))
        assert not np.array_equal(got, ref)  # the weights really changed


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "qwen3"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_other_decoder_families_fuse(arch, exporter, tmp_path):
    """Qwen2: q/k/v carry biases (MatMul + Add); v's bias is rotated with its columns. Phi-3: one qkv_proj whose
    output is sliced; only v's columns are rotated. Either way v/o take the head-sized Hadamard, so weight-only keeps
    one float rotation per block (down_proj). Qwen3: RMSNorms over each q/k head (read by the attention, not by a
    MatMul) are off the residual stream and left alone."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=BLOCKS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
                  attn_implementation="eager")
    torch.manual_seed(1)
    if arch == "qwen2":
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
        assert m.model.layers[0].self_attn.v_proj.bias is not None
    elif arch == "qwen3":
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common)).eval()
        assert m.model.layers[0].self_attn.q_norm is not None
    else:
        m = transformers.Phi3ForCausalLM(transformers.Phi3Config(pad_token_id=0, **common)).eval()
        assert hasattr(m.model.layers[0].self_attn, "qkv_proj")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):  # non-zero biases, so that rotating v's is tested
                p.uniform_(-0.5, 0.5)
            if "norm" in name:  # non-trivial scales: folded on the stream, kept on the q/k heads
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, VOCAB, (1, 8))
    path = tmp_path / f"{arch}.onnx"
    if exporter == "dynamo":
        torch.onnx.export(_Logits(m), (ids, torch.ones_like(ids)), str(path), dynamo=True,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes=({1: torch.export.Dim("s", max=64)}, {1: torch.export.Dim("s", max=64)}))
    else:
        torch.onnx.export(_Logits(m), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {1: "s"}, "attention_mask": {1: "s"}})
    model = load_model(path)
    fold_constant_aliases(model)
    tlog = TransformLog()
    fr = fuse_rotations(model, find_targets(model), _feeds(path)[0], tlog, seed=3, run=run_float_model)
    assert len(fr.head_rotated) == BLOCKS and all(hd == 16 for _, _, hd in fr.head_rotated)
    if arch == "phi3":  # q (64 columns) and k (32) untouched, v = the last 32
        assert all("rotate:head16(output columns 96:128)" in tlog.touched[v] for v, _, _ in fr.head_rotated)
    assert fr.norms == 2 * BLOCKS + 1
    gammas = [n.gamma.const_value.numpy() for n in find_norms(model.graph) if n.gamma is not None]
    folded = [g for g in gammas if g.shape == (64,) and np.array_equal(g, np.ones(64, np.float32))]
    assert len(folded) == 2 * BLOCKS + 1
    if arch == "qwen3":  # q_norm and k_norm (16 wide) per block, unchanged
        heads = [g for g in gammas if g.shape == (16,)]
        assert len(heads) == 2 * BLOCKS and not any(np.array_equal(g, np.ones(16, np.float32)) for g in heads)
    out = tmp_path / "rot.onnx"
    save_model(model, out)
    for f in _feeds(path, n=2, seq=11, seed=5):
        ref, got = _ort(path, f), _ort(out, f)
        assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))


@pytest.mark.parametrize("recipe, per_block", [("w4", 1), ("w4a4", 2)])
def test_fused_leaves_few_float_rotations(llamas, tmp_path, recipe, per_block):
    """Weight-only: one online rotation per block (down_proj). W4A4: QuaRot's second one, at o_proj, too."""
    path = llamas["dynamo"]
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, f in enumerate(_feeds(path, n=8, seq=16, seed=1)):
        np.savez(calib / f"s{i}.npz", **f)
    cfg = load_recipe(recipe).override({"transforms.rotate": "fused", "rounding.algorithm": "rtn"})
    res = quantize(path, calib, tmp_path / "q.onnx", cfg, quiet=True)
    q = onnx.load(str(tmp_path / "q.onnx"))
    rotations = [n for n in q.graph.node if n.op_type == "MatMul" and n.name.startswith(ROTATION_PREFIX)]
    assert len(rotations) == per_block * BLOCKS
    report = json.loads(res.report_path.read_text())
    assert report["transforms"]["float_rotation_nodes"] == per_block * BLOCKS
    touched = report["transforms"]["touched"]
    assert sum("rotate:online" in v for v in touched.values()) == per_block * BLOCKS
    assert sum("rotate:fused(input)" in v for v in touched.values()) == 5 * BLOCKS + 1
    online = [r for r in res.layers if r.weight.startswith(ROTATION_PREFIX)]
    assert not online  # the float rotations are not quantized
    f = _feeds(path, n=1, seq=8, seed=9)[0]
    ref, got = _ort(path, f), _ort(tmp_path / "q.onnx", f)
    assert np.isfinite(got).all() and np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1.0


def test_fused_falls_back_to_online_and_names_the_node(llamas, tmp_path, caplog):
    # a residual-stream tensor that is also a graph output: the rotated stream would leak out
    proto = onnx.load(str(llamas["dynamo"]))
    model = load_model(llamas["dynamo"])
    norms = find_norms(model.graph)
    stream_value = norms[1].residual.name  # the residual after the first attention block
    vi = onnx.helper.make_tensor_value_info(stream_value, onnx.TensorProto.FLOAT, None)
    proto.graph.output.append(vi)
    leaky = tmp_path / "leaky.onnx"
    onnx.save(proto, str(leaky))
    model = load_model(leaky)
    with pytest.raises(FusedRotationUnsupported, match=f"{stream_value}.*graph output"):
        fuse_rotations(model, find_targets(model), None, TransformLog())
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, f in enumerate(_feeds(leaky, n=4, seq=8)):
        np.savez(calib / f"s{i}.npz", **f)
    cfg = load_recipe("w4").override({"transforms.rotate": "fused", "rounding.algorithm": "rtn"})
    with caplog.at_level(logging.WARNING):
        res = quantize(leaky, calib, tmp_path / "q.onnx", cfg, quiet=True)
    assert f"--rotate fused does not apply to this graph (at {stream_value}" in caplog.text
    report = json.loads(res.report_path.read_text())
    assert report["transforms"]["float_rotation_nodes"] > BLOCKS  # online rotations in front of every input
    assert any("not applied" in n for n in report["transforms"]["notes"])


def test_fused_on_a_graph_without_norms_falls_back(tmp_path, caplog):
    path = tmp_path / "t.onnx"
    onnx.save(tm.transformer(n_blocks=1), str(path))
    calib = tmp_path / "c"
    calib.mkdir()
    for i, s in enumerate(tm.transformer_inputs(n=4)):
        np.savez(calib / f"s{i}.npz", **s)
    with caplog.at_level(logging.WARNING):
        quantize(path, calib, tmp_path / "q.onnx", load_recipe("w4").override(
            {"transforms.rotate": "fused", "rounding.algorithm": "rtn"}), quiet=True)
    assert "no RMSNorm or LayerNorm found" in caplog.text


def test_tied_head_read_through_transpose_stays_tied_in_float_or_is_untied_and_quantized(llamas, tmp_path):
    # how the dynamo exporter writes SmolLM2's tied head: MatMul(norm, Transpose(embedding table))
    proto = onnx.load(str(llamas["dynamo"]))
    gather = next(n for n in proto.graph.node if n.op_type == "Gather"
                  and any(i.name == n.input[0] for i in proto.graph.initializer))
    head = next(n for n in proto.graph.node if n.op_type == "MatMul" and n.output[0] == "logits")
    old_w = head.input[1]
    proto.graph.node.insert(list(proto.graph.node).index(head), onnx.helper.make_node(
        "Transpose", [gather.input[0]], ["tied_head_w"], perm=[1, 0], name="tied_transpose"))
    head.input[1] = "tied_head_w"
    proto.graph.initializer.remove(next(i for i in proto.graph.initializer if i.name == old_w))
    tied = tmp_path / "tied.onnx"
    onnx.save(proto, str(tied))
    model = load_model(tied)
    targets = find_targets(model)
    assert head.name not in {t.name for t in targets}  # the head has no constant weight of its own
    feed = _feeds(tied)[0]
    fr = fuse_rotations(model, targets, feed, TransformLog(), run=run_float_model)
    assert head.name in fr.readers and len(fr.readers) == 5 * BLOCKS + 1
    assert fr.tied_heads == [head.name]  # still tied: the table is stored once, the final norm scale is a D x D MatMul
    nodes = {n.name: n for n in model.graph}
    assert "tied_transpose" in nodes and nodes[head.name].inputs[1].producer() is nodes["tied_transpose"]
    assert sum(v.const_value.shape == (VOCAB, 64) for v in model.graph.initializers.values()
               if v.const_value is not None) == 1
    out = tmp_path / "rot.onnx"
    save_model(model, out)
    for f in _feeds(tied, n=2, seq=9, seed=4):
        ref, got = _ort(tied, f), _ort(out, f)
        assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, f in enumerate(_feeds(tied, n=4, seq=8)):
        np.savez(calib / f"s{i}.npz", **f)
    res = quantize(tied, calib, tmp_path / "q.onnx", load_recipe("w4").override(
        {"transforms.rotate": "fused", "rounding.algorithm": "rtn", "embeddings.lm_head": "float"}), quiet=True)
    assert head.name not in {n for r in res.layers for n in r.nodes}  # rotation does not make it a target
    assert any("tied head(s)" in n for n in res.transforms["notes"])
    # --lm-head quantize (the default): untied before the rotation, the head is a reader with its own rotated
    # weight and a target like any other; the Gather reads the rotated table, quantized on its own grid
    res = quantize(tied, calib, tmp_path / "qh.onnx", load_recipe("w4").override(
        {"transforms.rotate": "fused", "rounding.algorithm": "rtn"}), quiet=True)
    (layer,) = [r for r in res.layers if head.name in r.nodes]
    assert layer.shape == [64, VOCAB] and layer.transforms == ["rotate:fused(input)"]
    assert not any("tied head(s)" in n for n in res.transforms["notes"])
    assert res.lm_head["untied"][0]["node"] == head.name and res.embeddings[0]["form"] == "GatherBlockQuantized"
    q = onnx.load(str(tmp_path / "qh.onnx"))
    qnodes = {n.name: n for n in q.graph.node}
    assert qnodes[gather.name].op_type == "GatherBlockQuantized"
    assert next(n for n in q.graph.node if qnodes[head.name].input[1] in n.output).op_type == "DequantizeLinear"
    for f in _feeds(tied, n=2, seq=9, seed=4):
        ref, got = _ort(tied, f), _ort(tmp_path / "qh.onnx", f)
        assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.9


# --------------------------------------------------------------------------------------------- outlier channels

MASSIVE = 5  # the residual channel made massive (and ignored by every norm), as SmolLM2's channels 247 and 507


@pytest.fixture(scope="module")
def massive_llama(tmp_path_factory):
    """A tiny Llama whose residual stream carries one huge channel that every norm scale suppresses (1e-4)."""
    m = _llama("sdpa")
    with torch.no_grad():
        m.model.embed_tokens.weight[:, MASSIVE] = 0.5  # ~90 % of each token's energy at the first norm
        for name, p in m.named_parameters():
            if "norm" in name:
                p[MASSIVE] = 1e-4
    ids = torch.randint(0, VOCAB, (1, 8))
    path = tmp_path_factory.mktemp("massive") / "m.onnx"
    torch.onnx.export(_Logits(m), (ids, torch.ones_like(ids)), str(path), dynamo=True,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("b", max=8), 1: torch.export.Dim("s", max=64)},
                                      {0: torch.export.Dim("b", max=8), 1: torch.export.Dim("s", max=64)}))
    return path


def test_choose_outlier_channels():
    from qronos_onnx.transforms.fused import OUTLIER_ENERGY, choose_outlier_channels

    energy = np.ones((3, 64))
    energy[:, 7] = 40.0
    energy[:, 2] = OUTLIER_ENERGY  # at the threshold: kept
    energy[0, 9] = 2 * OUTLIER_ENERGY  # high at one norm only: its mean over the norms is under
    energy[1:, 9] = 0.4
    assert choose_outlier_channels(energy, "auto") == [2, 7]
    assert choose_outlier_channels(energy, 0) == [] and choose_outlier_channels(np.ones((2, 64)), "auto") == []
    assert choose_outlier_channels(energy, 3) == [2, 7, 9]  # a count: the highest means
    assert len(choose_outlier_channels(energy, "auto", block=32)) == 0  # 2 rounded to 32 passes the cap (64/16)
    assert len(choose_outlier_channels(energy, 1, block=16)) == 16  # an explicit count is rounded up to the block
    big = np.full((1, 64), 0.1)
    big[0, :20] = 20.0
    assert len(choose_outlier_channels(big, "auto")) == 4  # at most a 16th of the width
    with pytest.raises(FusedRotationUnsupported, match="nothing of the width 64"):
        choose_outlier_channels(energy, 64)


def test_outlier_rotation_is_orthogonal_and_moves_the_channels_to_the_end():
    from qronos_onnx.transforms.fused import outlier_rotation

    Q = outlier_rotation(24, [3, 17], seed=1)
    assert np.allclose(Q @ Q.T, np.eye(24), atol=1e-12)
    x = np.random.default_rng(0).normal(size=(5, 24))
    y = x @ Q
    assert np.array_equal(y[:, -2:], x[:, [3, 17]])  # untouched, last
    assert np.allclose(np.linalg.norm(y[:, :-2], axis=1), np.linalg.norm(np.delete(x, [3, 17], 1), axis=1))


def test_outlier_channels_stay_out_of_the_rotation_exactly(massive_llama, tmp_path):
    model = load_model(massive_llama)
    fold_constant_aliases(model)
    feed = _feeds(massive_llama)[0]
    fr = fuse_rotations(model, find_targets(model), feed, TransformLog(), run=run_float_model,
                        outlier_channels="auto")
    assert fr.outlier_channels == [MASSIVE]
    assert len(fr.float_side) == 5 * BLOCKS + 1  # q, k, v, gate, up per block, and lm_head (a graph output)
    nodes = {n.name: n for n in model.graph}
    for name in fr.float_side:
        side = nodes[name]
        assert side.inputs[1].const_value.shape[0] == 1 and side.inputs[0].producer().op_type == "Slice"
    for name in (s.split("/")[0] for s in fr.float_side):  # each reader's weight lost the outlier row and reads
        assert nodes[name].inputs[0].producer().op_type == "Slice"  # the rotated part
        assert nodes[name].inputs[1].const_value.shape[0] == 63
    out = tmp_path / "rot.onnx"
    save_model(model, out)
    for f in _feeds(massive_llama, n=2, seq=10, seed=6):
        ref, got = _ort(massive_llama, f), _ort(out, f)
        assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_w4a4_fused_with_outlier_channels_beats_without(massive_llama, tmp_path):
    """Rotated with the others, the massive channel sets every token's INT4 range; kept out (and read in float), it
    does not. Float side MatMuls are not quantized and are not rotations."""
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, f in enumerate(_feeds(massive_llama, n=8, seq=16, seed=1)):
        np.savez(calib / f"s{i}.npz", **f)
    errors = {}
    for mode in ("auto", 0):
        cfg = load_recipe("w4a4").override({"transforms.rotate": "fused", "rounding.algorithm": "rtn",
                                            "transforms.outlier_channels": mode})
        out = tmp_path / f"q{mode}.onnx"
        res = quantize(massive_llama, calib, out, cfg, quiet=True)
        assert res.transforms["float_rotation_nodes"] == 2 * BLOCKS
        assert not any("outlier_channels" in n for r in res.layers for n in r.nodes)
        noted = any("residual channel(s) kept out of the rotation" in n for n in res.transforms["notes"])
        assert noted == (mode == "auto")
        errs = []
        for f in _feeds(massive_llama, n=3, seq=12, seed=7):
            ref, got = _ort(massive_llama, f), _ort(out, f)
            errs.append(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        errors[mode] = float(np.mean(errs))
    assert errors["auto"] < 0.7 * errors[0], errors


def test_outlier_channels_config_and_flag_are_checked():
    from qronos_onnx.cli import build_parser, config_from_args
    from qronos_onnx.errors import ConfigError

    assert load_recipe("w4a4").transforms.outlier_channels == "auto"
    for bad in (-1, "some", 1.5, True):
        with pytest.raises(ConfigError, match="transforms.outlier_channels"):
            load_recipe("w4a4").override({"transforms.outlier_channels": bad})
    p = build_parser()
    base = ["quantize", "m.onnx", "--calib", "c", "-o", "o.onnx", "--w4a4", "--rotate", "fused"]
    assert config_from_args(p.parse_args(base + ["--outlier-channels", "3"])).transforms.outlier_channels == 3
    assert config_from_args(p.parse_args(base + ["--outlier-channels", "0"])).transforms.outlier_channels == 0
    with pytest.raises(ConfigError, match="--outlier-channels takes 'auto' or a whole number"):
        config_from_args(p.parse_args(base + ["--outlier-channels", "many"]))


def _genai_style_decoder(path: Path, d: int = 32, vocab: int = 50, seed: int = 0) -> None:
    """Two MLP-only blocks written as onnxruntime-genai writes its norms: SimplifiedLayerNormalization first, then
    com.microsoft.SkipSimplifiedLayerNormalization summing each writer into the residual (output 3 carries it on).
    Channel 3 of the stream is massive and every norm scale suppresses it."""
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(seed)
    f = np.float32
    emb = (g.standard_normal((vocab, d)) * 0.1).astype(f)
    emb[:, 3] = 4.0
    inits = {"emb": emb, "head": (g.standard_normal((d, vocab)) / np.sqrt(d)).astype(f)}
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x0"], name="embed")]
    stream = "x0"
    for b in range(3):
        gamma = g.uniform(0.5, 1.5, d).astype(f)
        gamma[3] = 1e-4
        inits[f"g{b}"] = gamma
        if b == 0:
            nodes.append(helper.make_node("SimplifiedLayerNormalization", ["x0", "g0"], ["n0"], axis=-1,
                                          epsilon=1e-6, name="norm0"))
        else:
            nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [f"w{b - 1}", stream, f"g{b}"],
                                          [f"n{b}", "", "", f"s{b}"], epsilon=1e-6, domain="com.microsoft",
                                          name=f"norm{b}"))
            stream = f"s{b}"
        if b == 2:
            break
        inits[f"up{b}"] = (g.standard_normal((d, 2 * d)) / np.sqrt(d)).astype(f)
        inits[f"down{b}"] = (g.standard_normal((2 * d, d)) / np.sqrt(2 * d) * 0.3).astype(f)
        nodes += [helper.make_node("MatMul", [f"n{b}", f"up{b}"], [f"u{b}"], name=f"up_proj{b}"),
                  helper.make_node("Relu", [f"u{b}"], [f"r{b}"], name=f"act{b}"),
                  helper.make_node("MatMul", [f"r{b}", f"down{b}"], [f"w{b}"], name=f"down_proj{b}")]
    nodes.append(helper.make_node("MatMul", ["n2", "head"], ["logits"], name="lm_head"))
    graph = helper.make_graph(nodes, "genai_style", [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                                   ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", vocab])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))


def test_outlier_channels_on_genai_style_skip_norms(tmp_path):
    path = tmp_path / "genai_style.onnx"
    _genai_style_decoder(path)
    feeds = [{"ids": np.random.default_rng(i).integers(0, 50, (1, 12)).astype(np.int64)} for i in range(3)]
    model = load_model(path)
    fr = fuse_rotations(model, find_targets(model), feeds[0], TransformLog(), run=run_float_model,
                        outlier_channels="auto")
    assert fr.norms == 3 and fr.outlier_channels == [3]
    assert len(fr.float_side) == 3  # up_proj0, up_proj1, lm_head
    out = tmp_path / "rot.onnx"
    save_model(model, out)
    for f in feeds[1:]:
        ref, got = _ort(path, f), _ort(out, f)
        assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_weight_only_takes_outlier_channels_only_when_counted(massive_llama, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, f in enumerate(_feeds(massive_llama, n=4, seq=12, seed=2)):
        np.savez(calib / f"s{i}.npz", **f)
    for request, split in (("auto", False), (1, True)):
        cfg = load_recipe("w4").override({"transforms.rotate": "fused", "rounding.algorithm": "rtn",
                                          "transforms.outlier_channels": request})
        res = quantize(massive_llama, calib, tmp_path / f"q{request}.onnx", cfg, quiet=True)
        noted = any("residual channel(s) kept out of the rotation" in n for n in res.transforms["notes"])
        assert noted == split, res.transforms["notes"]


def test_keep_ones_is_orthogonal_and_fixes_the_ones_vector():
    from qronos_onnx.transforms.fused import keep_ones, outlier_rotation
    from qronos_onnx.transforms.online import rotation_matrix
    for d in (8, 64, 96, 576):
        Q = keep_ones(rotation_matrix(d, seed=2))
        assert np.allclose(Q @ Q.T, np.eye(d), atol=1e-12)
        assert np.allclose(Q @ np.ones(d), np.ones(d), atol=1e-12)
        assert np.max(np.abs(Q)) < 4 / np.sqrt(d) + 1e-12  # still incoherent: no entry near 1
    Q = outlier_rotation(64, [3, 40], seed=1, ones=True)
    assert np.allclose(Q @ Q.T, np.eye(64), atol=1e-12) and np.allclose(Q @ np.ones(64), np.ones(64), atol=1e-12)
    assert Q[3, 62] == 1.0 and Q[40, 63] == 1.0


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_layernorm_decoders_fuse_with_centred_writers(arch, tmp_path):
    """Pre-LN decoders with LayerNormalization (GPT-2: Conv1D written as Gemm on 2-D rows behind Reshapes; OPT:
    MatMul + bias Adds): the writers are centred, Q keeps the ones vector, gamma and beta go into the readers, and
    the float model is unchanged; quantized with W4A4, two float rotations per block remain."""
    torch.manual_seed(2)
    if arch == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=BLOCKS, n_head=4,
                                                                 n_positions=64)).eval()
    else:
        m = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96,
                                                               num_hidden_layers=BLOCKS, num_attention_heads=4,
                                                               max_position_embeddings=64,
                                                               word_embed_proj_dim=64)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "ln" in name or "layer_norm" in name:  # non-trivial gamma and beta
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    ids = torch.randint(0, VOCAB, (1, 8))
    path = tmp_path / f"{arch}.onnx"
    torch.onnx.export(Logits(m).eval(), (ids,), str(path), dynamo=True, input_names=["input_ids"],
                      output_names=["logits"], dynamic_shapes=({1: torch.export.Dim("s", max=64)},))
    model = load_model(path)
    fold_constant_aliases(model)
    feeds = [{"input_ids": f["input_ids"]} for f in _feeds(path, n=3, seq=11, seed=5)]
    fr = fuse_rotations(model, find_targets(model), feeds[0], TransformLog(), seed=3, run=run_float_model)
    assert fr.norms == 2 * BLOCKS + 1 and len(fr.readers) >= 2 * BLOCKS + 1
    for node in model.graph:
        if node.op_type == "LayerNormalization":  # gamma 1, beta 0: the norm only divides by the rms now
            assert np.array_equal(node.inputs[1].const_value.numpy(), np.ones(64, np.float32))
            assert len(node.inputs) < 3 or not np.any(node.inputs[2].const_value.numpy())
    out = tmp_path / "rot.onnx"
    save_model(model, out)
    for f in feeds:
        ref, got = _ort(path, f), _ort(out, f)
        assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))
        assert not np.array_equal(got, ref)

    calib = tmp_path / "calib"
    calib.mkdir()
    for i, f in enumerate(_feeds(path, n=4, seq=16, seed=1)):
        np.savez(calib / f"s{i}.npz", input_ids=f["input_ids"])
    cfg = load_recipe("w4a4").override({"transforms.rotate": "fused", "rounding.algorithm": "rtn"})
    res = quantize(path, calib, tmp_path / "q.onnx", cfg, quiet=True)
    report = json.loads(res.report_path.read_text())
    assert report["transforms"]["float_rotation_nodes"] == 2 * BLOCKS
    assert "fused rotation: D=64, 5 LayerNorms folded (writers centred)" in report["transforms"]["notes"][0]
