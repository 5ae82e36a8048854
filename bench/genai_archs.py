#!/usr/bin/env python
"""Tiny random checkpoints of other decoder architectures (Qwen2 with a tied head and attention bias, Gemma, Mistral,
Qwen3, Phi-3) through the onnxruntime-genai builder, then qronos-onnx on the folder: quantize from text, ppl float vs
quantized, and generation in onnxruntime-genai. A check of generality by hand, not a test (the builder takes ~10 s per
model).

    .venv/bin/python bench/genai_archs.py WORKDIR qwen2,gemma,mistral,qwen3,phi3
"""
import os
import random
import subprocess
import sys
from pathlib import Path
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
import transformers as T

root = Path(sys.argv[1]); root.mkdir(exist_ok=True)
archs = sys.argv[2].split(",")
SENT = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine", "all that glitters is not gold",
        "the early bird catches the worm", "a model reads a window of tokens and writes the next one"]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False); tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(SENT * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
text = root / "calib.txt"
rng = random.Random(0); words = " ".join(SENT).split()
text.write_text(" ".join(rng.choice(words) for _ in range(3000)))
common = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
              eos_token_id=2)
cfgs = {
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**common, tie_word_embeddings=True)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**common, tie_word_embeddings=False, pad_token_id=0)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**common, head_dim=16, tie_word_embeddings=True)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**common, tie_word_embeddings=False)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)),
}
env = {**os.environ, "HF_HUB_OFFLINE": "1"}
PY = sys.executable
for arch in archs:
    d = root / arch
    hf = d / "hf"
    torch.manual_seed(0)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(hf)
    cfgs[arch]().eval().save_pretrained(hf)
    out = d / "fp32"
    r = subprocess.run([PY, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", "fp32", "-e",
                        "cpu", "-c", str(d / "cache")], capture_output=True, text=True, env=env, cwd=d)
    if r.returncode:
        print(arch, "BUILDER FAILED", r.stderr[-800:]); continue
    q = d / "q"
    r = subprocess.run([PY, "-m", "qronos_onnx", "quantize", str(out), "--calib", str(text), "-o", str(q), "--seq-len", "32",
                        "--samples", "8", "--group-size", "16", "--no-checkpoint", "--quiet", "--overwrite"], capture_output=True, text=True)
    print(arch, "quantize rc", r.returncode, r.stderr.strip()[-600:])
    if r.returncode:
        continue
    r = subprocess.run([PY, "-m", "qronos_onnx", "eval", str(out), "--compare", str(q), "--task", "ppl", "--text", str(text),
                        "--seq-len", "32", "--windows", "8", "--quiet"], capture_output=True, text=True)
    print(arch, "eval rc", r.returncode, (r.stdout + r.stderr).strip()[:300])
    import onnxruntime_genai as og
    m = og.Model(str(q)); tk = og.Tokenizer(m); p = og.GeneratorParams(m); p.set_search_options(max_length=20, do_sample=False)
    g = og.Generator(m, p); g.append_tokens(tk.encode("the quick brown"))
    while not g.is_done():
        g.generate_next_token()
    print(arch, "generated", len(g.get_sequence(0)))
