"""Where the offline bench assets (exported models, text splits) live: outside git, in a per-user cache.

``tools/assets.py`` writes them; the CLI, benchmarks and real-model tests find them here without redoing the work.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "QRONOS_CACHE"
STAMP_NAME = "stamp.json"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """``override``, else ``$QRONOS_CACHE``, else ``~/.cache/qronos-onnx``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qronos-onnx"


@dataclass(frozen=True)
class SmolLM2Paths:
    """The exported SmolLM2-135M assets. ``dir`` holds the ONNX file and, next to it, the tokenizer."""

    dir: Path
    onnx: Path  # fp32 ONNX, input_ids [batch, seq] -> logits [batch, seq, 49152]
    checkpoint: Path  # plain fp32 transformers checkpoint (save_pretrained), with its tokenizer
    stamp: Path

    @property
    def tokenizer(self) -> Path:
        return self.dir


def smollm2_paths(root: str | os.PathLike | None = None) -> SmolLM2Paths:
    d = cache_root(root) / "smollm2"
    return SmolLM2Paths(dir=d, onnx=d / "smollm2.onnx", checkpoint=d / "fp32", stamp=d / STAMP_NAME)


@dataclass(frozen=True)
class WikiLeadsPaths:
    dir: Path
    calib: Path
    test: Path
    stamp: Path


def wikileads_paths(root: str | os.PathLike | None = None) -> WikiLeadsPaths:
    d = cache_root(root) / "wikileads"
    return WikiLeadsPaths(dir=d, calib=d / "calib.txt", test=d / "test.txt", stamp=d / STAMP_NAME)


@dataclass(frozen=True)
class ModelPaths:
    """An exported bench model: ``dir`` holds the ONNX file, its stamp and (for text models) the tokenizer."""

    dir: Path
    onnx: Path
    stamp: Path

    @property
    def tokenizer(self) -> Path:
        return self.dir


def minilm_paths(root: str | os.PathLike | None = None) -> ModelPaths:
    """all-MiniLM-L6-v2: input_ids, attention_mask, token_type_ids [batch, seq] -> last_hidden_state."""
    d = cache_root(root) / "minilm"
    return ModelPaths(dir=d, onnx=d / "minilm_l6.onnx", stamp=d / STAMP_NAME)


def mnist_paths(root: str | os.PathLike | None = None) -> ModelPaths:
    """The MNIST CNN: input [batch, 1, 28, 28] (normalized) -> logits [batch, 10]; ``dir/calib.npz`` beside it."""
    d = cache_root(root) / "mnist"
    return ModelPaths(dir=d, onnx=d / "mnist_cnn.onnx", stamp=d / STAMP_NAME)


def ppocr_paths(root: str | os.PathLike | None = None) -> ModelPaths:
    """The PP-OCR text-direction classifier: x [batch, 3, 48, 192] -> probabilities [batch, 2] (0 = upright,
    1 = rotated 180 degrees); ``dir/calib.npz`` (key ``x``) and ``dir/test.npz`` (``input``, ``label``) beside it."""
    d = cache_root(root) / "ppocr"
    return ModelPaths(dir=d, onnx=d / "ppocr_cls.onnx", stamp=d / STAMP_NAME)


def read_stamp(path: Path) -> dict:
    """The stamp file's steps (``{}`` if absent or unreadable: then everything is redone)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_stamp(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def file_record(base: Path, *paths: Path) -> dict[str, int]:
    """``{path relative to base: size}``, for a stamp entry that ``files_match`` can check later."""
    return {str(Path(p).relative_to(base)): Path(p).stat().st_size for p in paths}


def files_match(base: Path, record: dict | None) -> bool:
    """True when every file named in a stamp entry still exists under ``base`` with the recorded size."""
    if not record:
        return False
    for name, size in record.items():
        p = Path(base) / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def smollm2_ready(root: str | os.PathLike | None = None) -> bool:
    """True when ``tools/assets.py smollm2`` has finished for this cache root."""
    paths = smollm2_paths(root)
    return files_match(paths.dir, read_stamp(paths.stamp).get("onnx", {}).get("files"))
