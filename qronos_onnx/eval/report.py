"""One entry point for every evaluation task, and the float-vs-quantized table the CLI prints.

``evaluate(model, tasks, options)`` returns plain dicts (JSON-ready): the metrics, the protocol in words, and the
onnxruntime accuracy level, so that a figure is never separated from how it was measured. Work that does not depend
on the model (tokenizing the test text, loading images and articles) is done once per ``EvalData`` and shared.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

TASKS = ("ppl", "retrieval", "topic", "classify", "textdir")
# metric name -> True when higher is better (for the delta column's sign)
HIGHER_IS_BETTER = {"ppl": False, "nll": False, "top1": True, "mrr": True, "accuracy": True}


@dataclass
class EvalOptions:
    """What the evaluation needs besides the model. None means: the task's default (see ``describe``)."""

    tokenizer: str | None = None  # ppl, retrieval, topic: default the tokenizer in the model's folder
    text: str | None = None  # ppl: a .txt file; default the wiki-leads test split
    seq_len: int = 256
    windows: int | None = 64  # ppl: None = every full window
    images: str | None = None  # classify: .npz with input/label; default the MNIST test set
    articles: int = 2000
    seed: int = 0
    batch_size: int | None = None
    accuracy_level: int | None = 0  # session.qdq_matmulnbits_accuracy_level; None = onnxruntime's default

    def validate(self) -> "EvalOptions":
        if self.seq_len < 2:
            raise ConfigError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.windows is not None and self.windows < 1:
            raise ConfigError(f"--windows must be >= 1, got {self.windows}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"--accuracy-level must be 0..4, got {self.accuracy_level}")
        return self


@dataclass
class EvalData:
    """Model-independent inputs, loaded lazily and kept for the next model."""

    options: EvalOptions
    tokenizer: Path | None = None
    token_ids: np.ndarray | None = None
    text_source: str = ""
    images: tuple[np.ndarray, np.ndarray] | None = None
    image_source: str = ""
    articles: dict | None = None
    extra: dict = field(default_factory=dict)


def describe(task: str, opts: EvalOptions, data: EvalData) -> str:
    """The protocol of ``task`` in one sentence (printed with every result and stored in the JSON)."""
    if task == "ppl":
        w = "every" if opts.windows is None else f"the first {opts.windows}"
        return (f"{w} non-overlapping {opts.seq_len}-token windows of {data.text_source}, each scored alone (no "
                f"carried context, no BOS), all {opts.seq_len - 1} next-token predictions per window, "
                f"ppl = exp(mean NLL)")
    if task == "retrieval":
        return (f"{opts.articles} wiki-leads articles with a description (sorted keys, "
                f"np.random.default_rng({opts.seed}).permutation); query = description, document = extract; "
                f"mean-pooled, L2-normalized embeddings (max_length 128); top-1 and MRR over the {opts.articles} "
                f"extracts")
    if task == "topic":
        return (f"logistic regression (L2, C=1) on extract embeddings, 11 topics: articles with a description and a "
                f"topic other than 'Uncategorized', np.random.default_rng({opts.seed}).permutation, first 1500 "
                f"train / next 500 test; test accuracy")
    if task == "classify":
        return f"top-1 of argmax(logits) on {data.image_source}"
    if task == "textdir":
        return (f"top-1 of argmax(probabilities) on {data.extra.get('textdir_source', 'the rendered test lines')} "
                "(wiki-leads test-split words, DejaVu fonts, half rotated by 180 degrees; 0 = upright, 1 = 180)")
    raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def _tokenizer(data: EvalData, models: list[str]) -> Path:
    if data.tokenizer is None:
        from .tasks import default_tokenizer

        if data.options.tokenizer:
            data.tokenizer = Path(data.options.tokenizer)
        else:
            found = default_tokenizer(*models)
            if found is None:
                raise ConfigError(f"no tokenizer found next to {models[0]!r}; give --tokenizer DIR")
            data.tokenizer = found
    return data.tokenizer


def _ppl_ids(data: EvalData, models: list[str]) -> np.ndarray:
    if data.token_ids is None:
        from .wikileads import split_text, tokenize

        opts = data.options
        if opts.text:
            path = Path(opts.text)
            if not path.is_file():
                raise ConfigError(f"--text {str(path)!r} does not exist")
            text, data.text_source = path.read_text(encoding="utf-8"), f"{path.name}"
        else:
            from .cache import wikileads_paths

            cached = wikileads_paths().test
            text = cached.read_text(encoding="utf-8") if cached.is_file() else split_text("test")
            data.text_source = "the wiki-leads test split"
        data.token_ids = tokenize(text, _tokenizer(data, models))
    return data.token_ids


def _images(data: EvalData) -> tuple[np.ndarray, np.ndarray]:
    if data.images is None:
        from .tasks import load_image_npz, load_mnist_test

        if data.options.images:
            data.images = load_image_npz(data.options.images)
            data.image_source = f"{len(data.images[1])} images of {Path(data.options.images).name}"
        else:
            data.images = load_mnist_test()
            data.image_source = f"the {len(data.images[1])} MNIST test images"
    return data.images


def _textdir_images(data: EvalData) -> tuple[np.ndarray, np.ndarray]:
    if "textdir" not in data.extra:
        from .tasks import load_textdir_test

        x, y, path = load_textdir_test()
        data.extra["textdir"] = (x, y)
        data.extra["textdir_source"] = f"the {len(y)} text lines of {path}"
    return data.extra["textdir"]


def evaluate(model: str | os.PathLike, tasks: list[str], options: EvalOptions | None = None,
             data: EvalData | None = None, *, quiet: bool = True) -> dict[str, dict[str, Any]]:
    """``{task: {"metrics": {...}, "protocol": str, "accuracy_level": int|None, "seconds": float, ...}}``."""
    opts = (options or (data.options if data else EvalOptions())).validate()
    data = data or EvalData(opts)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ConfigError(f"unknown task(s) {bad}; expected one of {', '.join(TASKS)}")
    models = [str(model)]
    out: dict[str, dict[str, Any]] = {}
    if "ppl" in tasks:
        from .perplexity import perplexity

        ids = _ppl_ids(data, models)
        r = perplexity(model, ids, seq_len=opts.seq_len, max_windows=opts.windows, batch_size=opts.batch_size or 8,
                       accuracy_level=opts.accuracy_level, quiet=quiet)
        out["ppl"] = {"metrics": {"ppl": r.ppl, "nll": r.nll}, "details": r.as_dict()}
    enc_tasks = [t for t in tasks if t in ("retrieval", "topic")]
    if enc_tasks:
        from .tasks import encoder_tasks
        from .wikileads import load_articles

        if data.articles is None:
            data.articles = load_articles()
        res = encoder_tasks(model, _tokenizer(data, models), enc_tasks, articles=data.articles,
                            n_articles=opts.articles, seed=opts.seed, batch_size=opts.batch_size or 64,
                            accuracy_level=opts.accuracy_level, quiet=quiet)
        if "retrieval" in res:
            r = res["retrieval"]
            out["retrieval"] = {"metrics": {"top1": r.top1, "mrr": r.mrr}, "details": r.as_dict()}
        if "topic" in res:
            r = res["topic"]
            out["topic"] = {"metrics": {"accuracy": r.accuracy}, "details": r.as_dict()}
    if "classify" in tasks:
        from .tasks import classify

        x, y = _images(data)
        r = classify(model, x, y, batch_size=opts.batch_size or 1000, accuracy_level=opts.accuracy_level,
                     source=data.image_source, quiet=quiet)
        out["classify"] = {"metrics": {"top1": r.top1}, "details": r.as_dict()}
    if "textdir" in tasks:
        from .tasks import classify

        x, y = _textdir_images(data)
        r = classify(model, x, y, batch_size=opts.batch_size or 500, accuracy_level=opts.accuracy_level,
                     source=data.extra["textdir_source"], quiet=quiet)
        out["textdir"] = {"metrics": {"top1": r.top1}, "details": r.as_dict()}
    for task in out:
        out[task]["protocol"] = describe(task, opts, data)
        out[task]["accuracy_level"] = opts.accuracy_level
        out[task]["seconds"] = out[task]["details"]["seconds"]
    return {t: out[t] for t in tasks if t in out}


def side_by_side(results: dict[str, dict[str, dict]], reference: str | None = None) -> str:
    """A text table: one row per (task, metric), one column per model, plus the change vs ``reference``."""
    names = list(results)
    reference = reference if reference is not None else names[0]
    label = {n: Path(n).name for n in names}
    if len(set(label.values())) < len(label):  # e.g. two genai folders' model.onnx: name the folders too
        label = {n: f"{Path(n).parent.name}/{Path(n).name}" for n in names}
    width = max([14] + [len(v) for v in label.values()])
    lines = []
    header = f"{'task':<10} {'metric':<9} " + " ".join(f"{label[n]:>{width}}" for n in names)
    if len(names) > 1:
        header += f" {'change':>10}"
    lines.append(header)
    tasks = list(next(iter(results.values())))
    for task in tasks:
        for metric in results[reference][task]["metrics"]:
            vals = [results[n][task]["metrics"][metric] for n in names]
            row = f"{task:<10} {metric:<9} " + " ".join(f"{v:>{width}.4f}" for v in vals)
            if len(names) > 1:
                ref = results[reference][task]["metrics"][metric]
                other = next(results[n][task]["metrics"][metric] for n in names if n != reference)
                change = other - ref
                rel = f"{100 * change / ref:+.1f}%" if metric in ("ppl", "nll") and ref else f"{change:+.4f}"
                row += f" {rel:>10}"
            lines.append(row)
    lines.append("")
    for task in tasks:
        acc = results[reference][task]["accuracy_level"]
        acc_s = "onnxruntime default" if acc is None else str(acc)
        lines.append(f"{task}: {results[reference][task]['protocol']}; MatMulNBits accuracy_level {acc_s}")
    return "\n".join(lines)


def options_dict(opts: EvalOptions) -> dict:
    return asdict(opts)
