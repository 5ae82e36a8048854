"""Perplexity of an ONNX causal LM in onnxruntime, under the anchors' window rule (docs/anchors.md).

KV-cache graphs (optimum ``*-with-past``, the onnxruntime-genai builder, dynamo exports with a cache) are scored by a
prefill pass: a zero-length past of the graph's dtype and head layout, a mask of ones, positions 0..seq-1, and
genai's ``seqlens_k`` / ``total_sequence_length`` where the graph takes them (``calib/kv_cache.py``); the present
outputs are computed and ignored. A graph input that cannot be built is named with its expected shape.

The token stream is cut into its first ``max_windows`` non-overlapping ``seq_len`` windows; each window is scored alone
(no carried context), all ``seq_len - 1`` next-token predictions count, and ppl = exp(mean NLL). The NLL is computed
in float64 from the model's float32 logits, so two runs of the same model agree to the last digit printed.

Quantized models: by default onnxruntime fuses DQ(int4) + MatMul into MatMulNBits with accuracy_level 4, which
quantizes activations to int8 and so changes numerics (docs/onnx_encodings.md 2c). This module sets
``session.qdq_matmulnbits_accuracy_level`` (0 by default: exact) and reports the value it used.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import ConfigError, ModelError

ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"
_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    n_windows: int
    n_tokens: int  # predicted tokens: n_windows * (seq_len - 1)
    seq_len: int
    seconds: float
    accuracy_level: int | None  # the MatMulNBits accuracy level set in the session; None = onnxruntime's default (4)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        acc = "ort default" if self.accuracy_level is None else self.accuracy_level
        return (f"ppl {self.ppl:.4f} (nll {self.nll:.5f}; {self.n_windows} windows x {self.seq_len} tokens, "
                f"{self.n_tokens} predictions; accuracy_level {acc}; {self.seconds:.1f} s)")


def windows(token_ids: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """``[n, seq_len]`` int64 copy of the first ``n = min(max_windows, len // seq_len)`` non-overlapping windows."""
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"token_ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if int(seq_len) < 2:
        raise ConfigError(f"seq_len must be >= 2 (one prediction needs two tokens), got {seq_len}")
    if max_windows is not None and int(max_windows) < 1:
        raise ConfigError(f"max_windows must be >= 1 or None, got {max_windows}")
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n == 0:
        raise ConfigError(f"{len(ids)} tokens are fewer than one window of seq_len={seq_len}")
    if ids.size and ids.min() < 0:
        raise ConfigError(f"token_ids contain a negative id ({int(ids.min())})")
    return np.array(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def window_nll(logits: np.ndarray | torch.Tensor, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per window, float64: ``logits [b, s, V]``, ``ids [b, s]`` -> ``[b]``."""
    lg = torch.as_tensor(logits)
    tg = torch.as_tensor(ids, dtype=torch.int64)
    out = torch.empty(lg.shape[0], dtype=torch.float64)
    for i in range(lg.shape[0]):  # one window at a time keeps the float64 copy small (seq x vocab)
        row = lg[i, :-1].to(torch.float64)
        lse = torch.logsumexp(row, dim=-1)
        picked = row.gather(-1, tg[i, 1:, None])[:, 0]
        out[i] = (lse - picked).sum()
    return out


def progress(total: int, desc: str, unit: str, quiet: bool):
    """A tqdm bar on stderr (redrawn at most every 5 s when stderr is not a terminal, e.g. a log); off when quiet."""
    import sys

    from tqdm.auto import tqdm

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=False, file=sys.stderr,
                mininterval=0.1 if tty else 5.0)


def make_session(model, providers=None, session_options=None, accuracy_level: int | None = 0):
    """An onnxruntime session for ``model`` (path or ModelProto) with the MatMulNBits accuracy level set.

    ``session_options`` is used as given, with the accuracy-level entry added to it when ``accuracy_level`` is not None.
    """
    import onnxruntime as ort

    so = session_options if session_options is not None else ort.SessionOptions()
    if accuracy_level is not None:
        if int(accuracy_level) not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy_level must be 0..4 or None, got {accuracy_level}")
        so.add_session_config_entry(ACCURACY_LEVEL_KEY, str(int(accuracy_level)))
    providers = list(providers) if providers else ["CPUExecutionProvider"]
    if hasattr(model, "SerializeToString"):
        src = model.SerializeToString()
    else:
        src = os.fspath(model)
        if not os.path.isfile(src):
            raise ModelError(f"model file {src!r} does not exist")
    try:
        return ort.InferenceSession(src, sess_options=so, providers=providers)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        name = "<in-memory model>" if isinstance(src, bytes) else repr(src)
        raise ModelError(f"onnxruntime cannot load model {name}: {first}") from None


def prefill_plan(sess):
    """How to feed the session a prefill pass (``calib/kv_cache.py``): input_ids, and what else the graph takes
    (attention mask, positions, zero-length past key/values of KV-cache graphs, genai's seqlens_k and
    total_sequence_length), built from the windows."""
    from ..calib.kv_cache import plan_prefill, specs_from_ort

    inputs = {i.name: i for i in sess.get_inputs()}
    if "input_ids" in inputs:
        ids_name = "input_ids"
    else:
        ints = [n for n, i in inputs.items() if i.type in _INT_TYPES]
        if len(ints) != 1:
            raise ModelError(f"the model has no 'input_ids' input (inputs: {sorted(inputs)}); expected a causal LM "
                             "taking input_ids [batch, seq] and returning logits [batch, seq, vocab]")
        ids_name = ints[0]
    if inputs[ids_name].type not in _INT_TYPES:
        raise ModelError(f"model input {ids_name!r} has type {inputs[ids_name].type}; expected int64 or int32")
    return plan_prefill(specs_from_ort(inputs.values()), [o.name for o in sess.get_outputs()], ids_name=ids_name,
                        error=ModelError, what="perplexity")


def _logits_output(sess, presents=()) -> tuple[str, int | None]:
    """The logits output's name (never a present key/value) and its vocabulary size when the graph states it."""
    outs = {o.name: o for o in sess.get_outputs()}
    others = [n for n in outs if n not in set(presents)] or list(outs)
    name = "logits" if "logits" in outs else next(iter(others))
    shape = outs[name].shape
    vocab = shape[-1] if shape and isinstance(shape[-1], int) and shape[-1] > 0 else None
    return name, vocab


def perplexity(model_path, token_ids: np.ndarray, *, seq_len: int = 256, max_windows: int | None = 64,
               batch_size: int = 8, providers=None, session_options=None, accuracy_level: int | None = 0,
               quiet: bool = False) -> PerplexityResult:
    """Perplexity of the ONNX causal LM ``model_path`` (path or ModelProto) on ``token_ids`` (1-D ints, no BOS added).

    Windows: the first ``max_windows`` (None: all) non-overlapping ``seq_len`` windows, each scored alone.
    """
    t0 = time.perf_counter()
    wins = windows(token_ids, seq_len, max_windows)
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    sess = make_session(model_path, providers, session_options, accuracy_level)
    if isinstance(model_path, (str, os.PathLike)):  # a genai decoder: the cache head size is in genai_config.json
        from ..genai import cache_dims

        with cache_dims(model_path):
            plan = prefill_plan(sess)
    else:
        plan = prefill_plan(sess)
    feeds, (out_name, vocab) = plan.feed, _logits_output(sess, plan.presents)
    max_id = int(wins.max())
    if vocab is not None and max_id >= vocab:
        raise ConfigError(f"token id {max_id} is outside the model's vocabulary of {vocab}")
    total = 0.0
    with progress(len(wins), f"perplexity x{seq_len}", "win", quiet) as bar:
        for start in range(0, len(wins), int(batch_size)):
            ids = wins[start:start + int(batch_size)]
            try:
                logits = sess.run([out_name], feeds(ids))[0]
            except Exception as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ModelError(f"onnxruntime failed on windows {start}..{start + len(ids) - 1} "
                                 f"(max token id {max_id}): {first}") from None
            if logits.ndim != 3 or logits.shape[:2] != ids.shape:
                raise ModelError(f"model output {out_name!r} has shape {logits.shape}; expected logits "
                                 f"[batch, seq, vocab] = [{ids.shape[0]}, {ids.shape[1]}, vocab]")
            if max_id >= logits.shape[2]:
                raise ConfigError(f"token id {max_id} is outside the model's vocabulary of {logits.shape[2]}")
            total += float(window_nll(logits, ids).sum())
            bar.update(len(ids))
    n_tokens = wins.shape[0] * (seq_len - 1)
    nll = total / n_tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_windows=int(wins.shape[0]), n_tokens=int(n_tokens),
                            seq_len=int(seq_len), seconds=time.perf_counter() - t0,
                            accuracy_level=None if accuracy_level is None else int(accuracy_level))
