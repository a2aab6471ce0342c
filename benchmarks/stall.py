"""How long a decoding request stalls when a long prompt arrives, and that prompt's TTFT:
stock vLLM (its defaults: compiled, chunked prefill at its step budget, prefix caching) against
UniPrefill with the same defaults (pruned prompts prefilled in chunks) and, as the mechanism
view of what chunking costs, UniPrefill with the whole prompt in one step
(max_num_batched_tokens = max_model_len). All three engines live in this process and take turns
per repeat, on the same prompts (Python standard-library source, ttft.py's code corpus).

A repeat: a --short-len request starts and decodes; once it has two tokens, a prompt of
--input-len tokens arrives. Until that prompt's first token (and one more token of the short
request), the short request's gaps between tokens are recorded: the largest one is the stall.

    python benchmarks/stall.py --input-len 8192 --repeats 3 --json stall.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from machine import machine
from ttft import Prompts, effective, percentile
from vllm import LLM, SamplingParams

from uniprefill import models, serve

ENGINES = ("stock", "uniprefill", "whole")


def engine_args(name: str, dtype: str, max_len: int, budget: int | None) -> dict:
    args = dict(dtype=dtype, max_model_len=max_len, seed=0)
    if budget is not None:
        args["max_num_batched_tokens"] = budget
    if name != "stock":
        args["additional_config"] = {"uniprefill": {}}
    if name == "whole":
        args["max_num_batched_tokens"] = max_len
    return args


def stall(llm: LLM, short: list[int], long: list[int], tag: str) -> dict:
    """One repeat on one engine: the long prompt's TTFT and the short request's gaps."""
    core = llm.llm_engine
    decoding = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
    core.add_request(f"short-{tag}", {"prompt_token_ids": short}, decoding)
    times: list[float] = []

    def step() -> list:
        outs = core.step()
        now = time.perf_counter()
        for out in outs:
            if out.request_id == f"short-{tag}":
                times.extend([now] * (len(out.outputs[0].token_ids) - len(times)))
        return outs

    while len(times) < 2:
        step()
    arrival = time.perf_counter()
    core.add_request(f"long-{tag}", {"prompt_token_ids": long},
                     SamplingParams(temperature=0, max_tokens=1))  # fmt: skip
    first = None
    while first is None or times[-1] <= first:
        for out in step():
            if out.request_id == f"long-{tag}" and out.outputs[0].token_ids and first is None:
                first = time.perf_counter()
    core.abort_request([f"short-{tag}"])
    while core.has_unfinished_requests():
        core.step()
    window = [t for t in times if t > arrival]
    gaps = [b - a for a, b in zip([arrival, *window], window, strict=False)]
    return {"ttft": first - arrival, "max_gap": max(gaps), "gaps": gaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--input-len", type=int, default=8192)
    parser.add_argument("--short-len", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--dtype", default=None, help="default: the CPU's (uniprefill serve's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="step budget of stock and uniprefill (default: what LLM() picks; `vllm serve` "
        "picks 2048)",
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=ENGINES,
        default=list(ENGINES),
        help="which engines (stock always runs; 'whole' is slow and large at 32K)",
    )
    parser.add_argument("--warm-up-len", type=int, help="first-call prompt (default: --input-len)")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="per engine")
    parser.add_argument("--json", help="write the rows and every repeat here")
    args = parser.parse_args()
    engines = ["stock", *(e for e in ENGINES if e in args.engines and e != "stock")]
    os.environ.update(serve.serve_env(args.kv_cache_gib))  # what the engines read at start

    path = str(models.prepare(args.model))
    dtype = args.dtype or serve.default_dtype()
    llms = {name: LLM(model=path, **engine_args(name, dtype, args.max_model_len,
                                                      args.max_num_batched_tokens))
            for name in engines}  # fmt: skip
    prompts = Prompts(llms["stock"].get_tokenizer(), corpus="code")
    warm = prompts.take(args.warm_up_len or args.input_len, 1)[0][0]
    for llm in llms.values():  # first-call costs (compilation, the first pruned prefill)
        llm.generate([{"prompt_token_ids": warm}], SamplingParams(max_tokens=2))
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for repeat in range(args.repeats):
        (short,), _ = prompts.take(args.short_len, 1)
        (long,), _ = prompts.take(args.input_len, 1)
        order = engines if repeat % 2 == 0 else engines[::-1]
        for name in order:
            runs[name].append(stall(llms[name], short, long, f"{repeat}"))
            print(f"repeat {repeat} {name:10} TTFT {runs[name][-1]['ttft']:7.2f} s  "
                  f"largest gap {runs[name][-1]['max_gap']:6.2f} s", flush=True)  # fmt: skip
    rows = []
    for name in engines:
        gaps = [g for run in runs[name] for g in run["gaps"]]
        rows.append({
            "engine": name,
            "ttft_median": statistics.median(r["ttft"] for r in runs[name]),
            "max_gap_median": statistics.median(r["max_gap"] for r in runs[name]),
            "itl_p50": percentile(gaps, 0.5),
            "itl_p99": percentile(gaps, 0.99),
            "ttft_speedup": statistics.median(
                s["ttft"] / r["ttft"] for s, r in zip(runs["stock"], runs[name], strict=True)
            ),
            "gap_ratio": statistics.median(
                r["max_gap"] / s["max_gap"] for s, r in zip(runs["stock"], runs[name], strict=True)
            ),
            "config": effective(llms[name].llm_engine.vllm_config),
        })  # fmt: skip
    print(f"\n{args.input_len}-token prompt arriving while a {args.short_len}-token request "
          f"decodes; {dtype}; medians of {args.repeats} repeats")  # fmt: skip
    print("engine     | step budget | TTFT (s) | speedup | largest gap (s) | gap / stock | "
          "ITL p50 / p99 (s)")  # fmt: skip
    for row in rows:
        print(f"{row['engine']:10} | {row['config']['max_num_batched_tokens']:11} | "
              f"{row['ttft_median']:8.2f} | {row['ttft_speedup']:6.2f}x | "
              f"{row['max_gap_median']:15.2f} | {row['gap_ratio']:10.2f}x | "
              f"{row['itl_p50']:.3f} / {row['itl_p99']:.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            meta = {"args": vars(args), "machine": machine(), "dtype": dtype}
            json.dump({"meta": meta, "rows": rows, "runs": runs}, f, indent=1)
    for llm in llms.values():
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
