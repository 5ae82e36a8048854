"""Labelled text-direction images for the PP-OCR direction classifier (``ch_ppocr_mobile_v2.0_cls_mobile.onnx``).

The classifier ships in the ``rapidocr`` wheel without data; labels come free by rendering text lines and turning
half of them upside down (docs/offline_assets.md). Each line is rendered with PIL in a DejaVu font of random size,
dark text on a light background, a random margin and a little Gaussian noise; grey (the three channels equal), so the
BGR order rapidocr reads images in does not matter. Label 0 = upright (the model's output 0, rapidocr's label "0"),
1 = rotated by 180 degrees (output 1, label "180").

Preprocessing is rapidocr's ``TextClassifier.resize_norm_img`` for the PP-OCRv4 cls shape [3, 48, 192]: resize to
height 48 keeping the aspect ratio (width ``ceil(48 * w / h)``, at most 192) with OpenCV's ``INTER_LINEAR`` (done
here in numpy: half-pixel centres, no antialiasing, rounded back to uint8 as cv2 does for uint8 images), then
``(x / 255 - 0.5) / 0.5`` and zero padding on the right up to width 192.

The rendering needs Pillow (requirements-bench.txt); nothing here needs rapidocr.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CalibrationError, ConfigError

CLS_SHAPE = (3, 48, 192)  # rapidocr's CLS_SHAPE_BY_OCR_VERSION[PP-OCRv4]
LABELS = ("0", "180")  # rapidocr config.yaml Cls.label_list: output index -> label
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
RAPIDOCR_DIST = "rapidocr==3.10.0"
MODEL_FILE = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"


@dataclass(frozen=True)
class RenderStyle:
    """The ranges one line's look is drawn from (defaults: what the bench set uses)."""

    size: tuple[int, int] = (18, 44)  # font size in px, inclusive
    words: tuple[int, int] = (1, 6)  # words per line, inclusive
    noise: tuple[float, float] = (0.0, 8.0)  # Gaussian noise sigma in grey levels
    margin: tuple[int, int] = (2, 12)  # px around the text


def _pil():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise ConfigError("rendering text lines needs Pillow: pip install pillow (see requirements-bench.txt)") from None
    return Image, ImageDraw, ImageFont


def font_files(directory: str | os.PathLike = FONT_DIR) -> list[Path]:
    """The DejaVu text fonts in ``directory``, sorted (the math font has few Latin glyph shapes and is left out)."""
    d = Path(directory)
    fonts = sorted(p for p in d.glob("DejaVu*.ttf") if "Math" not in p.name) if d.is_dir() else []
    if not fonts:
        raise ConfigError(f"no DejaVu*.ttf fonts in {str(d)!r}; install the fonts-dejavu-core package")
    return fonts


def render_line(text: str, font: str | os.PathLike, size: int, rng: np.random.Generator,
                style: RenderStyle = RenderStyle()) -> np.ndarray:
    """One upright text line as a uint8 ``[h, w, 3]`` image (h, w as the text needs)."""
    Image, ImageDraw, ImageFont = _pil()
    f = ImageFont.truetype(str(font), int(size))
    left, top, right, bottom = f.getbbox(text)
    m = int(rng.integers(style.margin[0], style.margin[1] + 1, endpoint=False))
    bg = int(rng.integers(200, 256))
    fg = int(rng.integers(0, 80))
    # the line box spans the font's ascent + descent (not just the ink), as a detector's crop of a line would
    ascent, descent = f.getmetrics()
    w, h = max(right - left, 1) + 2 * m, ascent + descent + 2 * m
    img = Image.new("L", (w, h), bg)
    ImageDraw.Draw(img).text((m - left, m), text, fill=fg, font=f)
    a = np.asarray(img, dtype=np.float32)
    sigma = float(rng.uniform(*style.noise))
    if sigma > 0:
        a = a + rng.normal(0.0, sigma, a.shape).astype(np.float32)
    g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def resize_linear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)`` for a uint8 ``[h, w, c]`` image."""
    h, w = img.shape[:2]

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, None)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)

    y0, y1, fy = axis(height, h)
    x0, x1, fx = axis(width, w)
    a = img.astype(np.float32)
    rows = a[y0] * (1 - fy)[:, None, None] + a[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_norm(img: np.ndarray, shape: tuple[int, int, int] = CLS_SHAPE) -> np.ndarray:
    """rapidocr's ``TextClassifier.resize_norm_img``: ``[h, w, 3]`` uint8 -> ``[3, 48, 192]`` float32 in [-1, 1]."""
    c, H, W = shape
    h, w = img.shape[:2]
    rw = W if math.ceil(H * w / float(h)) > W else int(math.ceil(H * w / float(h)))
    x = resize_linear(img, rw, H).astype(np.float32).transpose(2, 0, 1) / 255
    x = (x - 0.5) / 0.5
    out = np.zeros((c, H, W), dtype=np.float32)
    out[:, :, :rw] = x
    return out


def text_lines(words: Sequence[str], n: int, rng: np.random.Generator,
               style: RenderStyle = RenderStyle()) -> list[str]:
    """``n`` lines of consecutive words from ``words``, each starting at a random place, 1-6 words long."""
    if len(words) < style.words[1]:
        raise ConfigError(f"need at least {style.words[1]} words to build text lines, got {len(words)}")
    out = []
    for _ in range(n):
        k = int(rng.integers(style.words[0], style.words[1] + 1))
        s = int(rng.integers(0, len(words) - k + 1))
        out.append(" ".join(words[s:s + k]))
    return out


def orient(img: np.ndarray, label: int) -> np.ndarray:
    """The line as the set shows it: label 0 upright, 1 rotated by 180 degrees (``cv2.rotate(img, ROTATE_180)``)."""
    if label not in (0, 1):
        raise ConfigError(f"text-direction labels are 0 (upright) and 1 (180 degrees), got {label}")
    return img if label == 0 else np.ascontiguousarray(img[::-1, ::-1])


def make_set(lines: Sequence[str], seed: int, fonts: Sequence[str | os.PathLike] | None = None,
             style: RenderStyle = RenderStyle()) -> tuple[np.ndarray, np.ndarray]:
    """``(input [n, 3, 48, 192] float32, label [n] int64)``: each line rendered and preprocessed; the lines at even
    positions of a seeded permutation are upright (0), the others rotated by 180 degrees (1): exactly half each."""
    fonts = list(fonts) if fonts is not None else font_files()
    rng = np.random.default_rng(seed)
    n = len(lines)
    labels = np.zeros(n, dtype=np.int64)
    labels[rng.permutation(n)[: n // 2]] = 1
    x = np.empty((n, *CLS_SHAPE), dtype=np.float32)
    for i, text in enumerate(lines):
        font = fonts[int(rng.integers(len(fonts)))]
        size = int(rng.integers(style.size[0], style.size[1] + 1))
        x[i] = resize_norm(orient(render_line(text, font, size, rng, style), int(labels[i])))
    return x, labels


def wiki_words(which: str, articles: dict[str, dict] | None = None) -> list[str]:
    """Whitespace words of one wiki-leads split (``calib`` or ``test``: disjoint articles), in text order.

    Words longer than 20 characters (URLs, chemical names) are dropped: they would make one-word lines of extreme
    aspect ratio.
    """
    from .wikileads import split_text

    return [w for w in split_text(which, articles).split() if len(w) <= 20]


def rapidocr_model() -> Path:
    """The classifier's .onnx inside the installed rapidocr wheel (located, not imported: it needs opencv)."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(f"the text-direction model needs {RAPIDOCR_DIST}: run `python tools/assets.py install` "
                               f"(or `pip install --no-deps {RAPIDOCR_DIST}`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / MODEL_FILE
    if not path.is_file():
        raise CalibrationError(f"{path} is missing: reinstall {RAPIDOCR_DIST} (--no-deps)")
    return path
