"""docs/scaling.md's tables, computed from bench_dist.py's measured single-rank figures (a JSON-lines file).

    python bench/scaling_table.py bench/results/dist_single_rank.jsonl [--tokens 262144] [--chunk 2048]

Models (stated in docs/scaling.md): statistics time = c_s * T * N^2 (c_s from the widest measured N, float64);
solve time = c_v * (N^3 + rows * N^2) (c_v from the widest measured square solve, per algorithm); bytes are exact
counts of what dist.py sends. Nothing here is measured on more than one rank.
"""
from __future__ import annotations

import argparse
import json

LLAMA = {  # hidden, intermediate, kv width (8 kv heads x 128), layers
    "Llama-3 8B": (4096, 14336, 1024, 32),
    "Llama-3 70B": (8192, 28672, 1024, 80),
    "Llama-3 405B": (16384, 53248, 1024, 126),
}
GB = 1e9


def waves(h: int, i: int, kv: int) -> list[tuple[str, int, int]]:
    """(name, rows, cols) of one decoder block's waves: each is one solver batch (stacked rows share the input)."""
    return [("q/k/v", h + 2 * kv, h), ("o", h, h), ("gate/up", 2 * i, h), ("down", h, i)]


def _comm_seconds(W: int, hgf: int, codes: int, bandwidth: float) -> float:
    """The chain is serial: W-1 hops of H+G+F; the broadcasts (total, codes) as a binary tree: ceil(log2 W) hops."""
    if W == 1:
        return 0.0
    hops = (W - 1).bit_length()
    return ((W - 1) * hgf + hops * (hgf + codes)) / (bandwidth * GB)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens (default 128 x 2048)")
    ap.add_argument("--chunk", type=int, default=2048, help="tokens per chunk (one sample of 2048)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--bandwidth", type=float, default=100.0, help="assumed GB/s per link (not measured)")
    ap.add_argument("--chunks-per-rank", type=int, default=1,
                    help="chunks each rank holds (capture.batch_size = samples / (ranks * this)); default 1")
    args = ap.parse_args()
    rows = [json.loads(x) for x in open(args.results) if x.startswith("{")]
    st = max((r for r in rows if r.get("what") == "stats" and r["dtype"] == "float64"), key=lambda r: r["N"])
    c_s = st["seconds"] / (st["tokens"] * st["N"] ** 2)
    c_v = {}
    for algo in ("gptq", "qronos"):
        sv = max((r for r in rows if r.get("what") == "solve" and r["algo"] == algo), key=lambda r: r["cols"])
        c_v[algo] = sv["seconds"] / (sv["cols"] ** 3 + sv["rows"] * sv["cols"] ** 2)
    print(f"c_s = {c_s:.3e} s per token*N^2 (stats N={st['N']}, float64); "
          + ", ".join(f"c_v[{a}] = {v:.3e} s per (N^3 + rows*N^2)" for a, v in c_v.items()))
    T, k = args.tokens, args.chunks_per_rank
    print(f"\ncalibration: {T} tokens, {k} chunk(s) per rank; statistics float64; link {args.bandwidth:g} GB/s "
          "assumed")
    print("\n| model | wave | N (cols) | rows | H+G+F (GB) | stats, 1 rank (s) | solve gptq / qronos (s) "
          "| sent per wave, W=8 (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {}
    for model, (h, i, kv, layers) in LLAMA.items():
        tot = {"stats": 0.0, "gptq": 0.0, "qronos": 0.0, "bytes": {W: 0.0 for W in args.ranks}, "mem": {},
               "time": {}}
        for name, r, n in waves(h, i, kv):
            hgf = 3 * n * n * 8
            stats = c_s * T * n * n
            solve = {a: c_v[a] * (n ** 3 + r * n * n) for a in c_v}
            codes = r * n * 2 + r * 8  # int16 codes + float32 scale and zero point per row (per channel)
            sent = {W: ((W - 1) * hgf + (W - 1) * hgf + (W - 1) * codes) for W in args.ranks}  # chain+bcast+codes
            tot["stats"] += stats
            for a in c_v:
                tot[a] += solve[a]
            for W in args.ranks:
                tot["bytes"][W] += sent[W]
                tot["time"][W] = tot["time"].get(W, 0.0) + _comm_seconds(W, hgf, codes, args.bandwidth)
                # the running sums, plus (ranks > 0) the held partials, plus one chunk's product being computed
                tot["mem"][W] = max(tot["mem"].get(W, 0), hgf * (1 + k if W > 1 else 1) + n * n * 8)
            print(f"| {model} | {name} | {n} | {r} | {hgf / GB:.2f} | {stats:.1f} | {solve['gptq']:.0f} / "
                  f"{solve['qronos']:.0f} | {sent.get(8, 0) / GB:.1f} |")
        totals[model] = (tot, layers, h)
    print("\n| model | ranks | stats per rank per block (s) | comm per block at the link (s) | solve per block, "
          "gptq / qronos (s) | whole model, gptq / qronos (h) | stats memory per rank (GB) |")
    print("|---|---|---|---|---|---|---|")
    for model, (tot, layers, h) in totals.items():
        for W in args.ranks:
            stats = tot["stats"] / W
            comm = tot["time"][W]
            whole = {a: layers * (stats + comm + tot[a]) / 3600 for a in c_v}
            print(f"| {model} | {W} | {stats:.1f} | {comm:.1f} | {tot['gptq']:.0f} / {tot['qronos']:.0f} | "
                  f"{whole['gptq']:.1f} / {whole['qronos']:.1f} | {tot['mem'][W] / GB:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
