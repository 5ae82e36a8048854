#!/usr/bin/env python
"""How far a quantized sentence encoder's embeddings move from the float ones (MiniLM investigation, docs/benchmarks.md).

    python bench/encoder_drift.py RECIPE ALGO [ALGO ...] [--samples N] [--seq-len L] [--out DIR]

Quantizes all-MiniLM-L6-v2 with each algorithm (bench protocol: wiki-leads calibration windows), embeds the 2,000
retrieval extracts and descriptions of the bench's retrieval task with the float and each quantized model, and prints
per algorithm: mean cosine between quantized and float embeddings (extracts, descriptions; and for extracts after
removing each model's mean embedding), the share of the embedding error that is a direction common to all texts,
retrieval top-1 / MRR and the mean layer-wise error on the calibration windows. Answers whether a lower layer-wise error
on the calibration windows also means embeddings closer to float on the evaluated texts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qronos_onnx.api import quantize  # noqa: E402
from qronos_onnx.config import load_recipe  # noqa: E402
from qronos_onnx.eval import cache  # noqa: E402
from qronos_onnx.eval.tasks import (ENCODER_ARTICLES, SentenceEncoder, load_hf_tokenizer,  # noqa: E402
                                    retrieval_metrics, sample_articles)
from qronos_onnx.eval.wikileads import load_articles  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("algos", nargs="+")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default="/tmp/qronos-encoder-drift")
    a = p.parse_args()
    paths, wl = cache.minilm_paths(), cache.wikileads_paths()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    articles = load_articles()
    keys = sample_articles(articles, ENCODER_ARTICLES, 0)
    tok = load_hf_tokenizer(paths.tokenizer)
    extracts = [articles[k]["extract"] for k in keys]
    descs = [articles[k]["description"] for k in keys]

    def embed(model):
        enc = SentenceEncoder(model, tok)
        return enc.embed(extracts), enc.embed(descs)

    f_doc, f_q = embed(paths.onnx)
    rows = {}
    for algo in a.algos:
        cfg = load_recipe(a.recipe).override({"rounding.algorithm": algo, "capture.samples": a.samples,
                                              "capture.seq_len": a.seq_len})
        out = out_dir / f"minilm-{a.recipe}-{algo}.onnx"
        res = quantize(paths.onnx, wl.calib, out, cfg, tokenizer=paths.tokenizer, overwrite=True, quiet=True)
        q_doc, q_q = embed(out)
        top1, mrr = retrieval_metrics(q_q, q_doc)
        err = torch.cat([q_doc - f_doc, q_q - f_q])
        qc = torch.nn.functional.normalize(q_doc - q_doc.mean(0), dim=-1)
        fc = torch.nn.functional.normalize(f_doc - f_doc.mean(0), dim=-1)
        rows[algo] = {
            "cos_extracts": float((q_doc * f_doc).sum(-1).mean()),
            "cos_descriptions": float((q_q * f_q).sum(-1).mean()),
            # the share of the embedding error that is one direction common to all texts (ranking ignores most of it)
            "common_error_share": float(err.mean(0).square().sum() / err.square().sum(-1).mean()),
            # cosine after removing each model's mean embedding: closeness of what distinguishes the texts
            "cos_extracts_centered": float((qc * fc).sum(-1).mean()),
            "top1": top1, "mrr": mrr,
            "mean_layer_rel_error_calib": float(np.mean([r.rel_error for r in res.layers])),
        }
        print(algo, json.dumps(rows[algo]), flush=True)
    top1, mrr = retrieval_metrics(f_q, f_doc)
    print("float", json.dumps({"top1": top1, "mrr": mrr}))
    (out_dir / f"drift-{a.recipe}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
