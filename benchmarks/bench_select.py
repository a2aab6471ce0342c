"""Cost of `select_tokens` against one decoder layer's prefill, at the same prompt length.

Qwen2.5-Coder-0.5B-Instruct shapes by default (14 query heads, 2 key heads, head dim 64): the
layer is transformers' Qwen2DecoderLayer built from the embedded model's config (random
weights, SDPA attention), timed on the same inputs. Both side by side in one run.

    python benchmarks/bench_select.py --lengths 2048 4096 8192 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from machine import machine

from uniprefill import __version__, models
from uniprefill.ops import SelectionRule, select_tokens


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decoder_layer(model_name: str, dtype: torch.dtype):
    from transformers import AutoConfig
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    config = AutoConfig.from_pretrained(models.prepare(model_name))
    config._attn_implementation = "sdpa"
    layer = Qwen2DecoderLayer(config, layer_idx=0).to(dtype).eval()
    return config, layer, Qwen2RotaryEmbedding(config)


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config, layer, rotary = decoder_layer(args.model, dtype)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    rule = SelectionRule(block_size=64, sink=128, last_q=args.last_q)
    rows = []
    for n in args.lengths:
        hidden = torch.randn(1, n, config.hidden_size, dtype=dtype)
        positions = torch.arange(n)[None]
        embeddings = rotary(hidden, positions)

        @torch.inference_mode()
        def layer_prefill(hidden=hidden, positions=positions, embeddings=embeddings):
            layer(hidden, position_ids=positions, position_embeddings=embeddings)

        q = torch.randn(n, heads, head_dim, dtype=dtype)
        k = torch.randn(n, kv_heads, head_dim, dtype=dtype)
        cu = torch.tensor([0, n], dtype=torch.int32)
        layer_s = median_seconds(layer_prefill, args.repeats)
        row = {"tokens": n, "layer_ms": layer_s * 1e3}
        for backend in args.backends:

            @torch.inference_mode()
            def select(backend=backend, q=q, k=k, cu=cu):
                select_tokens(q, k, cu, p=0.99, rule=rule, backend=backend)

            select_s = median_seconds(select, args.repeats)
            row[f"{backend}_ms"] = select_s * 1e3
            row[f"{backend}_pct_of_layer"] = 100 * select_s / layer_s
        rows.append(row)
        print_row(row, args.backends)
    return rows


def print_row(row: dict, backends: list[str]) -> None:
    cells = [f"{row['tokens']:>7}", f"{row['layer_ms']:>10.1f}"]
    cells += [f"{row[f'{b}_ms']:>10.1f} {row[f'{b}_pct_of_layer']:>6.2f}%" for b in backends]
    print(" | ".join(cells), flush=True)


def plot(rows: list[dict], backends: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in backends:
        ax.plot([r["tokens"] for r in rows], [r[f"{backend}_pct_of_layer"] for r in rows],
                marker="o", label=backend)  # fmt: skip
    ax.axhline(3.0, color="gray", linestyle="--", label="3% target")
    ax.set(xlabel="prompt tokens", ylabel="select_tokens / one decoder layer (%)", xscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--backends", nargs="+", default=["torch"])
    parser.add_argument("--last-q", type=int, default=128)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--json", help="write the rows and the setup here")
    parser.add_argument("--plot", help="write a PNG here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = {
        "uniprefill": __version__,
        **machine(),
        "threads": torch.get_num_threads(),
        **{k: v for k, v in vars(args).items() if k not in ("json", "plot", "threads")},
    }
    print(json.dumps(setup))
    header = ["tokens", "layer ms"] + [f"{b} ms  % layer" for b in args.backends]
    print(" | ".join(header))
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.backends, args.plot)


if __name__ == "__main__":
    main()
