"""The labelled text-direction set (eval/textdir.py) and the `textdir` eval task, without rapidocr.

Rendering needs Pillow and the DejaVu fonts (skipped without them); the rest runs on arrays and a tiny ONNX model
built here. The real classifier's float top-1 is in tests/test_realmodels.py (realmodel marker).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qronos_onnx.cli import main as cli_main
from qronos_onnx.eval import cache, textdir
from qronos_onnx.eval.report import evaluate
from qronos_onnx.eval.tasks import load_textdir_test


def _cv2_linear_reference(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.INTER_LINEAR written out pixel by pixel in float64 (half-pixel centres, edges clamped)."""
    h, w, c = img.shape
    out = np.zeros((height, width, c))
    for oy in range(height):
        sy = max((oy + 0.5) * h / height - 0.5, 0.0)
        y0 = min(int(math.floor(sy)), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for ox in range(width):
            sx = max((ox + 0.5) * w / width - 0.5, 0.0)
            x0 = min(int(math.floor(sx)), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[oy, ox] = top * (1 - fy) + bot * fy
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(7, 13, 5, 9), (5, 4, 12, 10), (9, 30, 48, 11)])
def test_resize_linear_matches_the_cv2_formula(size):
    h, w, oh, ow = size
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3)).astype(np.uint8)
    got = textdir.resize_linear(img, ow, oh).astype(int)
    assert np.abs(got - _cv2_linear_reference(img, ow, oh).astype(int)).max() <= 1  # float32 vs float64 rounding
    assert np.array_equal(textdir.resize_linear(img, w, h), img)


def test_resize_norm_keeps_aspect_pads_and_normalizes():
    narrow = np.full((20, 40, 3), 255, np.uint8)  # aspect 2 -> width ceil(48 * 2) = 96, then zero padding
    x = textdir.resize_norm(narrow)
    assert x.shape == textdir.CLS_SHAPE and x.dtype == np.float32
    assert np.allclose(x[:, :, :96], 1.0) and np.all(x[:, :, 96:] == 0)
    wide = np.zeros((10, 500, 3), np.uint8)  # aspect 50 > 4: squeezed to the full width 192, no padding
    assert np.allclose(textdir.resize_norm(wide), -1.0)


def test_orient_is_a_180_degree_turn():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(textdir.orient(img, 0), img)
    assert np.array_equal(textdir.orient(img, 1), np.rot90(img, 2))
    with pytest.raises(Exception, match="labels are 0"):
        textdir.orient(img, 2)


def test_text_lines_are_runs_of_consecutive_words():
    words = [f"w{i}" for i in range(50)]
    lines = textdir.text_lines(words, 30, np.random.default_rng(3))
    for line in lines:
        parts = line.split()
        assert 1 <= len(parts) <= 6
        first = int(parts[0][1:])
        assert parts == words[first:first + len(parts)]
    assert lines == textdir.text_lines(words, 30, np.random.default_rng(3))


def test_wiki_words_come_from_disjoint_articles():
    articles = {f"k{i:02d}": {"extract": f"alpha{i} beta{i} " + "x" * 25} for i in range(20)}
    test, calib = textdir.wiki_words("test", articles), textdir.wiki_words("calib", articles)
    assert test and calib and not set(test) & set(calib)
    assert all(len(w) <= 20 for w in test + calib)  # the 25-character word is dropped


@pytest.fixture(scope="module")
def fonts():
    pytest.importorskip("PIL")
    try:
        return textdir.font_files()[:3]
    except Exception as err:  # noqa: BLE001 - no DejaVu fonts on this machine
        pytest.skip(str(err))


def test_make_set_shapes_labels_and_determinism(fonts):
    lines = ["The quick brown fox", "jumps", "over the lazy dog", "Qronos", "text direction", "upside down"]
    x, y = textdir.make_set(lines, seed=5, fonts=fonts)
    assert x.shape == (6, *textdir.CLS_SHAPE) and x.dtype == np.float32 and y.dtype == np.int64
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]  # exactly half rotated
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 1], x[:, 2])  # grey: BGR or RGB alike
    for i in range(6):  # every line has ink (dark pixels) and a light background
        used = x[i, 0][:, np.any(x[i, 0] != 0, axis=0)]
        assert used.min() < -0.2 and used.max() > 0.5
    x2, y2 = textdir.make_set(lines, seed=5, fonts=fonts)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = textdir.make_set(lines, seed=6, fonts=fonts)
    assert not np.array_equal(x, x3)


def test_render_line_upright_has_ink_where_a_turned_one_does_not(fonts):
    """A line of T's has its crossbars on top: upright, the ink's centre of mass is in the upper half of the box;
    turned by 180 degrees, in the lower half."""
    img = textdir.render_line("TTTT", fonts[0], 40, np.random.default_rng(0),
                              textdir.RenderStyle(noise=(0.0, 0.0), margin=(2, 2)))
    ink = float(img.max()) - img[:, :, 0].astype(float)  # background (light, random) -> 0
    rows = np.arange(ink.shape[0])
    centre = (ink.sum(1) * rows).sum() / ink.sum() / ink.shape[0]
    turned = textdir.orient(img, 1)[:, :, 0]
    ink_t = float(turned.max()) - turned.astype(float)
    centre_t = (ink_t.sum(1) * rows).sum() / ink_t.sum() / ink.shape[0]
    assert centre < 0.5 < centre_t


# ------------------------------------------------------------------------------------------ the eval task (no rapidocr)


def tiny_direction_model(path):
    """x [batch, 3, ?, ?] (batch written as -1 and the other dims as "?", as Paddle2ONNX does) -> softmax of
    ReduceMean(x) @ W: a stand-in for the PP-OCR classifier's interface."""
    W = np.array([[1.0, -1.0], [0.5, 0.2], [-0.3, 0.9]], np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["m", "W"], ["l"]),
             helper.make_node("Softmax", ["l"], ["probs"], axis=1)]
    graph = helper.make_graph(nodes, "dir", [x], [y], [numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return W


@pytest.fixture()
def textdir_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((40, 3, 6, 10)).astype(np.float32)
    y = rng.integers(0, 2, 40)
    d = cache.ppocr_paths(tmp_path / "cache").dir
    d.mkdir(parents=True)
    np.savez(d / "test.npz", input=x, label=y)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    return x, y


def test_textdir_task_scores_the_cached_test_lines(tmp_path, textdir_cache):
    x, y = textdir_cache
    W = tiny_direction_model(tmp_path / "m.onnx")
    want = float(((x.mean((2, 3)) @ W).argmax(1) == y).mean())
    r = evaluate(tmp_path / "m.onnx", ["textdir"])["textdir"]
    assert r["metrics"]["top1"] == pytest.approx(want)
    assert "40 text lines" in r["protocol"] and "180" in r["protocol"]


def test_cli_eval_textdir_with_compare(tmp_path, textdir_cache, capsys):
    tiny_direction_model(tmp_path / "a.onnx")
    tiny_direction_model(tmp_path / "b.onnx")
    assert cli_main(["eval", str(tmp_path / "a.onnx"), "--compare", str(tmp_path / "b.onnx"), "--task", "textdir",
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "textdir" in out and "+0.0000" in out


def test_textdir_without_the_cached_lines_says_how_to_make_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(Exception, match="tools/assets.py ppocr"):
        load_textdir_test()
    tiny_direction_model(tmp_path / "a.onnx")
    assert cli_main(["eval", str(tmp_path / "a.onnx"), "--task", "textdir", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "tools/assets.py ppocr" in err and err.count("\n") == 1
