#!/usr/bin/env python
"""Per-token INT4 activation error at each RMSNorm's first reader of SmolLM2-135M, for the three ways of rotating
it: online (the quantizer sees (n * gamma) H), fused (n Q, gamma folded into the weights) and fused with the top-k
residual channels left out of Q and read in float (transforms.outlier_channels).

    .venv/bin/python bench/fused_activation_error.py [--tokens 512] [--k 2 4 6 8 16 32]

Reads the Hugging Face checkpoint from the asset cache (~/.cache/qronos-onnx/smollm2/fp32) and the first tokens of
the wiki-leads calibration text; weights stay float, so only the activation quantizer's error is measured:
||q(x) W' - x W|| / ||x W|| for q_proj (input norm) and gate_proj (post-attention norm) of every block. The channels
are ranked as transforms/fused.py ranks them (mean over the norms of E[n_c^2]). Prints the per-norm figures and the
means; nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qronos_onnx.transforms.online import rotation_matrix  # noqa: E402


def q_per_token(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Dynamic asymmetric per-token fake quantization (the w4a4 recipe's activations)."""
    lo = x.min(-1, keepdim=True).values.clamp(max=0)
    hi = x.max(-1, keepdim=True).values.clamp(min=0)
    s = (hi - lo) / (2 ** bits - 1)
    s = torch.where(s == 0, torch.ones_like(s), s)
    zp = torch.round(-lo / s)
    return (torch.clamp(torch.round(x / s) + zp, 0, 2 ** bits - 1) - zp) * s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 6, 8, 16, 32])
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get("QRONOS_CACHE", Path.home() / ".cache" / "qronos-onnx"))
    ckpt = cache / "smollm2" / "fp32"
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    text = (cache / "wikileads" / "calib.txt").read_text()[: 40 * args.tokens]
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    caps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def f(mod, inp, out):
            caps[name] = (inp[0][0].detach().double(), mod.weight.detach().double())
        return f

    for i, layer in enumerate(model.model.layers):
        layer.input_layernorm.register_forward_hook(hook(f"{i}.in"))
        layer.post_attention_layernorm.register_forward_hook(hook(f"{i}.post"))
    with torch.no_grad():
        model(ids)
    D = model.config.hidden_size
    readers = [(f"{i}.in", layer.self_attn.q_proj.weight) for i, layer in enumerate(model.model.layers)]
    readers += [(f"{i}.post", layer.mlp.gate_proj.weight) for i, layer in enumerate(model.model.layers)]
    normed = {k: r / torch.sqrt((r * r).mean(-1, keepdim=True)) for k, (r, _) in caps.items()}
    score = torch.stack([(n * n).mean(0) for n in normed.values()]).mean(0)
    order = torch.argsort(score, descending=True)
    Q = torch.tensor(rotation_matrix(D, 0))
    H = torch.tensor(rotation_matrix(D, 1))
    rows = {"online": [], "fused": [], **{f"k={k}": [] for k in args.k}}
    for name, W in readers:
        n, g = normed[name], caps[name][1]
        W = W.detach().double().T
        Y = (n * g) @ W
        ref = Y.norm()
        rows["online"].append(((q_per_token((n * g) @ H) @ H.T @ W - Y).norm() / ref).item())
        rows["fused"].append(((q_per_token(n @ Q) @ (Q.T @ (g[:, None] * W)) - Y).norm() / ref).item())
        for k in args.k:
            S = order[:k]
            rest = torch.tensor(sorted(set(range(D)) - set(S.tolist())))
            R = torch.tensor(rotation_matrix(D - k, 0))
            got = q_per_token(n[:, rest] @ R) @ (R.T @ (g[rest, None] * W[rest])) + (n[:, S] * g[S]) @ W[S]
            rows[f"k={k}"].append(((got - Y).norm() / ref).item())
    print(f"{len(readers)} readers, {ids.shape[1]} tokens; channels by mean E[n_c^2]: "
          + ", ".join(f"{int(c)} ({score[c]:.1f})" for c in order[:8]))
    print("| rotation | mean | input norms | post-attention norms |\n|---|---|---|---|")
    half = len(readers) // 2
    for key, v in rows.items():
        print(f"| {key} | {np.mean(v):.4f} | {np.mean(v[:half]):.4f} | {np.mean(v[half:]):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
