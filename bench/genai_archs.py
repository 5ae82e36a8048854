#!/usr/bin/env python
"""Tiny random checkpoints of other decoder architectures (Qwen2 with a tied head and attention bias, Gemma, Mistral,
Qwen3, Phi-3) through the onnxruntime-genai builder, then qronos-onnx on the folder: quantize from text, ppl float vs
quantized, and generation in onnxruntime-genai. A check of generality by hand, not a test (the builder takes ~10 s per
model).

    .venv/bin/python bench/genai_archs.py WORKDIR qwen2,gemma,mistral,qwen3,phi3
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

SENTENCES = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
             "all that glitters is not gold", "the early bird catches the worm",
             "a model reads a window of tokens and writes the next one"]
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _model(arch: str, vocab: int):
    import transformers as tf

    kw = dict(COMMON, vocab_size=vocab)
    return {
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**kw, tie_word_embeddings=True)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**kw, tie_word_embeddings=False, pad_token_id=0)),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**kw, head_dim=16, tie_word_embeddings=True)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**kw, tie_word_embeddings=False)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**kw, head_dim=16, tie_word_embeddings=True)),
    }[arch]()


def _run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, **kw)


def _generate(folder: Path) -> int:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=20, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(tok.encode("the quick brown"))
    while not gen.is_done():
        gen.generate_next_token()
    return len(gen.get_sequence(0))


def check(arch: str, root: Path, tok, text: Path) -> None:
    import torch
    from transformers import PreTrainedTokenizerFast

    d = root / arch
    hf, fp32, q = d / "hf", d / "fp32", d / "q"
    torch.manual_seed(0)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(hf)
    _model(arch, tok.get_vocab_size()).eval().save_pretrained(hf)
    r = _run("-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", fp32, "-p", "fp32", "-e", "cpu",
             "-c", d / "cache", env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=d)
    if r.returncode:
        print(arch, "BUILDER FAILED", r.stderr[-800:])
        return
    r = _run("-m", "qronos_onnx", "quantize", fp32, "--calib", text, "-o", q, "--seq-len", "32", "--samples", "8",
             "--group-size", "16", "--no-checkpoint", "--quiet", "--overwrite")
    print(arch, "quantize rc", r.returncode, r.stderr.strip()[-600:])
    if r.returncode:
        return
    r = _run("-m", "qronos_onnx", "eval", fp32, "--compare", q, "--task", "ppl", "--text", text, "--seq-len", "32",
             "--windows", "8", "--quiet")
    print(arch, "eval rc", r.returncode, (r.stdout + r.stderr).strip()[:300])
    print(arch, "generated", _generate(q))


def main() -> None:
    root, archs = Path(sys.argv[1]), sys.argv[2].split(",")
    root.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    text = root / "calib.txt"
    rng = random.Random(0)
    words = " ".join(SENTENCES).split()
    text.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    for arch in archs:
        check(arch, root, tok, text)


if __name__ == "__main__":
    main()
