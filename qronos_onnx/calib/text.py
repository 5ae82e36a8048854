"""Text calibration: read a .txt/.jsonl file, tokenize it once with a local tokenizer, cut windows of seq_len tokens.

Window rule (the Brevitas LLM example's sampler, so results compare with ``docs/anchors.md``):
- ``samples`` given: ``random.seed(seed)`` then ``random.randint(0, n_tokens - seq_len - 1)`` drawn ``samples`` times,
  each draw the start of one window (windows may overlap or repeat). A private ``random.Random(seed)`` is used, which
  draws exactly what the seeded module-level ``random`` would, without touching the global generator.
- ``samples`` is None: consecutive non-overlapping windows from token 0; a tail shorter than seq_len is dropped.
The whole text is tokenized in one call, without special tokens (no BOS), as the anchors protocol does.
``special_tokens`` (for encoders such as BERT, which always see [CLS] ... [SEP]) wraps every window in the
tokenizer's own special tokens; the windows are then cut with seq_len minus those tokens.
"""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import CalibrationError
from .kv_cache import PrefillPlan, plan_prefill
from .specs import InputSpec, check_sample

TEXT_SUFFIXES = (".txt", ".jsonl")


def window_starts(n_tokens: int, seq_len: int, samples: int | None, seed: int = 0) -> list[int]:
    """Start offsets of the windows (see the module docstring for the rule)."""
    if samples is None:
        return list(range(0, n_tokens - seq_len + 1, seq_len))
    rng = random.Random(seed)
    return [rng.randint(0, n_tokens - seq_len - 1) for _ in range(samples)]


def read_text(path: Path) -> str:
    """The whole text of a .txt file, or the texts of a .jsonl file (one JSON object with a "text" key, or one JSON
    string, per line; blank lines skipped) joined with "\\n\\n", as the anchors protocol joins extracts."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CalibrationError(f"text file {str(path)!r} is not UTF-8 text ({err.reason} at byte "
                               f"{err.start})") from None
    except OSError as err:
        raise CalibrationError(f"cannot read text file {str(path)!r}: {err.strerror or err}") from None
    if path.suffix.lower() == ".txt":
        text = raw
    else:
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationError(f"{str(path)!r} line {lineno}: not valid JSON ({err.msg}); expected one JSON "
                                       f"object with a \"text\" key or one JSON string per line") from None
            if isinstance(item, dict):
                if not isinstance(item.get("text"), str):
                    raise CalibrationError(f"{str(path)!r} line {lineno}: expected a \"text\" key holding a string, "
                                           f"found keys {sorted(item)}")
                item = item["text"]
            elif not isinstance(item, str):
                raise CalibrationError(f"{str(path)!r} line {lineno}: is a JSON {type(item).__name__}, expected an "
                                       f"object with a \"text\" key or a string")
            texts.append(item)
        text = "\n\n".join(texts)
    if not text.strip():
        raise CalibrationError(f"text file {str(path)!r} holds no text")
    return text


@dataclass
class Encoder:
    """A loaded tokenizer reduced to what calibration needs: text -> token ids (without special tokens), and the
    special tokens it puts around one text (e.g. [CLS] ... [SEP] for BERT-style encoders)."""

    name: str
    encode: Callable[[str], list[int]]
    encode_special: Callable[[str], list[int]] | None = None  # the same text with the tokenizer's special tokens

    def special_wrap(self) -> tuple[list[int], list[int]]:
        """(prefix, suffix) special-token ids the tokenizer adds around a text, found by encoding a probe both ways."""
        if self.encode_special is None:
            return [], []
        probe = "calibration"
        plain, full = self.encode(probe), self.encode_special(probe)
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return full[:i], full[i + len(plain):]
        raise CalibrationError(f"tokenizer {self.name!r}: cannot locate the text among its special tokens "
                               f"({plain} within {full})")


def load_tokenizer(spec: str | os.PathLike) -> Encoder:
    """A local HF tokenizer directory (AutoTokenizer, no downloads) or a ``tokenizer.json`` file (tokenizers)."""
    path = Path(spec)
    if not path.exists():
        raise CalibrationError(f"tokenizer {str(spec)!r} does not exist; expected a local tokenizer directory or a "
                               f"tokenizer.json file (downloads are off)")
    if path.is_file():
        return _tokenizers_file(path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        if (path / "tokenizer.json").is_file():
            return _tokenizers_file(path / "tokenizer.json")
        raise CalibrationError(f"cannot load a tokenizer from directory {str(path)!r} ({_first_line(err)}); expected "
                               f"a Hugging Face tokenizer directory or a tokenizer.json file") from None

    def encode(text: str, special: bool = False) -> list[int]:
        return list(tok(text, add_special_tokens=special, verbose=False)["input_ids"])

    return Encoder(str(path), encode, lambda text: encode(text, True))


def _tokenizers_file(path: Path) -> Encoder:
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
    except Exception as err:
        raise CalibrationError(f"cannot load tokenizer file {str(path)!r} ({_first_line(err)}); expected a "
                               f"tokenizers tokenizer.json") from None
    return Encoder(str(path), lambda text: tok.encode(text, add_special_tokens=False).ids,
                   lambda text: tok.encode(text, add_special_tokens=True).ids)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_text_model(specs: Sequence[InputSpec], seq_len: int, output_names: Sequence[str] = ()) -> PrefillPlan:
    """Before any tokenizing: the model takes input_ids [batch (1), seq (seq_len)] and nothing text cannot build.

    Besides the tokens, a prefill pass's inputs are built (``kv_cache.py``): attention mask, positions, token types,
    zero-length past key/values, the genai inputs ``seqlens_k`` / ``total_sequence_length``.
    """
    names = [s.name for s in specs]
    by_name = {s.name: s for s in specs}
    if "input_ids" not in by_name:
        raise CalibrationError(f"text calibration needs a graph input named 'input_ids'; the model's inputs are "
                               f"{', '.join(map(repr, names))} (give a directory of .npz samples instead)")
    plan = plan_prefill(specs, output_names)
    batched = ("input_ids", "attention_mask", "token_type_ids", "seqlens_k", "past")
    for entry in plan.entries:
        spec = entry.spec
        if not spec.shape:
            continue
        if entry.role in batched or (entry.role == "position_ids" and spec.rank == 2):
            batch = spec.shape[0]
            if isinstance(batch, int) and batch != 1:
                raise CalibrationError(f"text calibration feeds one window per sample, but graph input {spec.name!r} "
                                       f"has a fixed batch of {batch} ({spec.describe()})")
        if entry.role != "past" and spec.rank in (1, 2) and entry.role not in ("seqlens_k", "use_cache_branch",
                                                                             "total_sequence_length"):
            seq = spec.shape[-1]
            if isinstance(seq, int) and seq != seq_len:
                raise CalibrationError(f"graph input {spec.name!r} has a fixed sequence length {seq} "
                                       f"({spec.describe()}), but seq_len is {seq_len}; set seq_len to {seq}")
    return plan


def embedding_rows(model: ir.Model) -> tuple[str, int] | None:
    """(name, rows) of a constant embedding table that a Gather reads with input_ids, if there is one."""
    ids = next((v for v in model.graph.inputs if v.name == "input_ids"), None)
    if ids is None:
        return None
    for node, index in ids.uses():
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and index == 1:
            table = node.inputs[0]
            if table is not None and table.const_value is not None and len(table.const_value.shape) >= 1:
                return table.name, int(table.const_value.shape[0])
    return None


def text_samples(path: Path, model: ir.Model, specs: Sequence[InputSpec], tokenizer: str | os.PathLike | None,
                 samples: int | None, seed: int, seq_len: int,
                 special_tokens: bool = False) -> tuple[list[dict[str, np.ndarray]], str, int]:
    """Feeds for a text file: (samples, description, tokens in the stream).

    ``special_tokens``: every window is wrapped in the tokenizer's special tokens (seq_len in all), so that an encoder
    that always sees [CLS] ... [SEP] at run time is calibrated on the same positions; the windows are cut from the
    text as usual, with seq_len minus the special tokens each.
    """
    if tokenizer is None:
        raise CalibrationError(f"text calibration file {str(path)!r} needs a tokenizer (a local Hugging Face tokenizer "
                               f"directory or a tokenizer.json file)")
    plan = check_text_model(specs, seq_len, [v.name for v in model.graph.outputs])
    encoder = load_tokenizer(tokenizer)
    text = read_text(path)
    ids = np.asarray(encoder.encode(text), dtype=np.int64)
    n = int(ids.size)
    prefix, suffix = encoder.special_wrap() if special_tokens else ([], [])
    if special_tokens and not (prefix or suffix):
        raise CalibrationError(f"special_tokens is on, but tokenizer {encoder.name!r} adds no special tokens to a text; "
                               f"turn it off (the windows would be unchanged)")
    inner = seq_len - len(prefix) - len(suffix)
    if inner < 1:
        raise CalibrationError(f"seq_len={seq_len} leaves no room for text between the tokenizer's "
                               f"{len(prefix) + len(suffix)} special tokens")
    need = inner if samples is None else inner + 1
    if n < need:
        raise CalibrationError(f"text file {str(path)!r} gives {n} tokens with tokenizer {encoder.name!r}; one window "
                               f"of seq_len={seq_len} needs at least {need}")
    rows = embedding_rows(model)
    if rows is not None and int(ids.max()) >= rows[1]:
        raise CalibrationError(f"tokenizer {encoder.name!r} produces token id {int(ids.max())}, but the model's "
                               f"embedding {rows[0]!r} has only {rows[1]} rows: is it the model's tokenizer?")
    starts = window_starts(n, inner, samples, seed)
    head, tail = np.asarray(prefix, dtype=np.int64), np.asarray(suffix, dtype=np.int64)
    feeds = []
    for i, start in enumerate(starts):
        window = np.concatenate([head, ids[start:start + inner], tail])[None, :]
        feeds.append(check_sample(plan.feed(window), specs, f"text file {str(path)!r} window {i} (start {start})"))
    rule = (f"{len(starts)} random windows (seed {seed})" if samples is not None
            else f"{len(starts)} consecutive windows")
    desc = f"text {str(path)!r}, {n} tokens with tokenizer {encoder.name!r}, {rule} of {seq_len} tokens"
    if plan.has_cache:
        desc += f" (prefill pass: {len(plan.past)} past key/value inputs built with past length 0)"
    if special_tokens:
        desc += f" (each {len(prefix)} + {inner} + {len(suffix)}: the tokenizer's special tokens around the text)"
    return feeds, desc, n
