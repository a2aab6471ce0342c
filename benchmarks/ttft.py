"""TTFT of baseline vLLM and UniPrefill, side by side in one run, on the same prompts.

Both engines get the same engine arguments (UniPrefill's: eager mode, the whole prompt in one
step; no prefix caching); only pruning differs. Each setting (input length x concurrency) runs
on the baseline engine, then on the UniPrefill engine, with `concurrency` requests in flight at a
time. Prompts are passkey questions over varied prose (benchmarks/ruler_tasks.py), trimmed to
the input length.

Per setting: TTFT median and p90 for both, the speedup (baseline / UniPrefill median TTFT), the
ideal speedup (baseline token-layers / pruned token-layers, from the keep counts the workers
report), decode tokens/s for both and passkey accuracy for both. Decode tokens/s counts the tokens
produced after the setting's last first token, when no prefill is left in the batch, over that
window's length: it measures decode steps alone, not decodes queued behind a long prefill.

    python benchmarks/ttft.py --model qwen2.5-coder-0.5b-instruct --input-lens 2048 4096 8192 \\
        --concurrency 1 2 4 8 --mode offline --json ttft.json --plot ttft.png

--mode serve drives two real `vllm serve ... [--plugin uniprefill]` servers over HTTP with
concurrent streaming clients (keep counts come from their /collective_rpc dev endpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from machine import machine
from ruler_tasks import make_sample

from uniprefill import models, serve
from uniprefill.config import UniPrefillConfig

ENGINES = ("baseline", "uniprefill")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Request:
    ttft: float  # seconds from submission to the first token
    token_times: list[float]  # arrival time of each output token
    correct: bool


def decode_tps(requests: list[Request]) -> float:
    """Tokens/s of the decode-only window: after the last first token, until the last token."""
    start = max(r.token_times[0] for r in requests)
    end = max(r.token_times[-1] for r in requests)
    tokens = sum(t > start for r in requests for t in r.token_times)
    return tokens / (end - start) if end > start else float("nan")


def make_prompts(tokenizer, length: int, count: int) -> tuple[list[list[int]], list[str]]:
    """`count` chat-formatted passkey prompts of about `length` tokens, and their answers."""
    prompts, answers = [], []
    for i in range(count):
        words = int(length * 0.7)
        for _ in range(4):  # rescale the haystack until the prompt is just under `length`
            sample = make_sample("passkey", i, words, depth=(i % 5 + 0.5) / 5)
            ids = _encode(tokenizer, sample.messages)
            words = int(words * 0.995 * length / len(ids))
        prompts.append(list(ids))
        answers.append(sample.answers[0])
    return prompts, answers


def _encode(tokenizer, messages: list[dict]) -> list[int]:
    """Chat-formatted ids; plain text (with the tokenizer's own special tokens) for base models
    without a chat template, such as Gemma-3-270M."""
    if tokenizer.chat_template is None:
        text = "\n\n".join(m["content"] for m in messages) + "\nThe passkey is"
        return tokenizer(text)["input_ids"]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def token_layers(kept: list[int], drops: list[int], depth: int) -> int:
    """Tokens x layers of one prefill: stage s runs kept[s] tokens through its layers."""
    bounds = [-1, *drops, depth - 1]
    return sum(k * (hi - lo) for k, lo, hi in zip(kept, bounds[:-1], bounds[1:], strict=True))


# ---- offline: two LLM engines in this process --------------------------------------------------


class OfflineEngine:
    def __init__(self, path: str, engine_args: dict, uniprefill: dict | None):
        from vllm import LLM

        extra = {"additional_config": {"uniprefill": uniprefill}} if uniprefill is not None else {}
        self.llm = LLM(model=path, **engine_args, **extra)
        self.count = 0

    def run(self, prompts, answers, concurrency, max_tokens) -> list[Request]:
        from vllm import SamplingParams

        core = self.llm.llm_engine
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        pending = list(enumerate(prompts))
        start, times, results = {}, {}, {}
        while pending or core.has_unfinished_requests():
            while pending and len(start) - len(results) < concurrency:
                i, ids = pending.pop(0)
                self.count += 1
                req_id = f"r{self.count}"
                start[req_id] = (i, time.perf_counter())
                times[req_id] = []
                core.add_request(req_id, {"prompt_token_ids": ids}, params)
            for out in core.step():
                now = time.perf_counter()
                new = len(out.outputs[0].token_ids) - len(times[out.request_id])
                times[out.request_id] += [now] * new
                if out.finished:
                    results[out.request_id] = out.outputs[0].text
        return [_request(*start[r], times[r], results[r], answers) for r in results]

    def kept_counts(self) -> list[list[int]]:
        (state,) = self.llm.collective_rpc("uniprefill_requests")
        return [kept for _, kept in state["recent"]]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def _request(i: int, submitted: float, token_times: list[float], text: str, answers) -> Request:
    return Request(token_times[0] - submitted, token_times, answers[i] in text)


# ---- serve: two real vLLM servers, streaming clients -------------------------------------------


def _cli_flag(key: str, value: Any) -> str:
    flag = key.replace("_", "-")
    if isinstance(value, bool):  # vLLM's boolean options: --flag / --no-flag
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag}={value}"


class ServedEngine:
    def __init__(self, path: str, engine_args: dict, uniprefill: dict | None, log: Path):
        import httpx

        self.httpx = httpx
        self.port = serve.free_port()
        self.name = Path(path).name
        extra = [_cli_flag(k, v) for k, v in engine_args.items() if k != "dtype"]
        if uniprefill is not None:
            extra += ["--additional-config", json.dumps({"uniprefill": uniprefill})]
        cmd = serve.serve_command(path, served_name=self.name, host="127.0.0.1", port=self.port,
                                  dtype=engine_args["dtype"], extra_args=extra,
                                  uniprefill=uniprefill is not None)  # fmt: skip
        env = serve.serve_env() | {"VLLM_SERVER_DEV_MODE": "1"}
        self.proc = serve.start(cmd, env, log)
        serve.wait_until_ready(self.proc, f"http://127.0.0.1:{self.port}", timeout_s=1800)

    def run(self, prompts, answers, concurrency, max_tokens) -> list[Request]:
        return asyncio.run(self._run(prompts, answers, concurrency, max_tokens))

    async def _run(self, prompts, answers, concurrency, max_tokens):
        import openai

        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="-")
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, ids: list[int]) -> Request:
            async with gate:
                t0 = time.perf_counter()
                stream = await client.completions.create(
                    model=self.name, prompt=ids, max_tokens=max_tokens, temperature=0,
                    stream=True, stream_options={"include_usage": True},
                )  # fmt: skip
                text, times = "", []
                async for chunk in stream:  # one chunk per token; the usage chunk has no choices
                    if chunk.choices:
                        times.append(time.perf_counter())
                        text += chunk.choices[0].text
                return _request(i, t0, times, text, answers)

        return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))

    def kept_counts(self) -> list[list[int]]:
        url = f"http://127.0.0.1:{self.port}/collective_rpc"
        (state,) = self.httpx.post(url, json={"method": "uniprefill_requests"}).json()["results"]
        return [kept for _, kept in state["recent"]]

    def close(self) -> None:
        serve.stop(self.proc)


# ---- report ----------------------------------------------------------------------------------


def summarize(length, concurrency, runs, kept, drops, depth, tokens) -> dict:
    base, uni = runs["baseline"], runs["uniprefill"]
    med = {e: statistics.median(r.ttft for r in runs[e]) for e in ENGINES}
    full = sum(len(t) for t in tokens) * depth
    not_pruned = sum(len(t) for t in tokens) - sum(k[0] for k in kept)
    pruned = sum(token_layers(k, drops, depth) for k in kept) + not_pruned * depth
    return {
        "input_len": round(statistics.mean(len(t) for t in tokens)),
        "target_len": length,
        "concurrency": concurrency,
        "requests": len(base),
        **{f"ttft_median_{e}": med[e] for e in ENGINES},
        **{f"ttft_p90_{e}": percentile([r.ttft for r in runs[e]], 0.9) for e in ENGINES},
        "speedup": med["baseline"] / med["uniprefill"],
        "ideal_speedup": full / pruned,
        **{f"decode_tps_{e}": decode_tps(runs[e]) for e in ENGINES},
        "accuracy_baseline": f"{sum(r.correct for r in base)}/{len(base)}",
        "accuracy_uniprefill": f"{sum(r.correct for r in uni)}/{len(uni)}",
        "kept_per_stage": [round(statistics.mean(s)) for s in zip(*kept, strict=True)]
        if kept
        else [],
    }


def print_table(rows: list[dict]) -> None:
    head = ("len", "conc", "TTFT base med/p90 s", "TTFT uni med/p90 s", "speedup", "ideal",
            "decode tok/s base/uni", "passkey base/uni")  # fmt: skip
    print(" | ".join(head))
    for r in rows:
        print(f"{r['input_len']} | {r['concurrency']} | "
              f"{r['ttft_median_baseline']:.2f}/{r['ttft_p90_baseline']:.2f} | "
              f"{r['ttft_median_uniprefill']:.2f}/{r['ttft_p90_uniprefill']:.2f} | "
              f"{r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
              f"{r['decode_tps_baseline']:.1f}/{r['decode_tps_uniprefill']:.1f} | "
              f"{r['accuracy_baseline']} / {r['accuracy_uniprefill']}", flush=True)  # fmt: skip


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for conc in sorted({r["concurrency"] for r in rows}):
        sub = [r for r in rows if r["concurrency"] == conc]
        lens = [r["input_len"] for r in sub]
        line = ax_ttft.plot(lens, [r["ttft_median_baseline"] for r in sub], "o--",
                            label=f"baseline c={conc}")  # fmt: skip
        ax_ttft.plot(lens, [r["ttft_median_uniprefill"] for r in sub], "o-",
                     color=line[0].get_color(), label=f"UniPrefill c={conc}")  # fmt: skip
        line = ax_speed.plot(lens, [r["speedup"] for r in sub], "o-", label=f"measured c={conc}")
        ax_speed.plot(lens, [r["ideal_speedup"] for r in sub], "x:",
                      color=line[0].get_color(), label=f"ideal c={conc}")  # fmt: skip
    ax_ttft.set(xlabel="input tokens", ylabel="median TTFT (s)", title=title)
    ax_speed.set(xlabel="input tokens", ylabel="TTFT speedup (x)", title="speedup vs ideal")
    ax_speed.axhline(1.0, color="grey", lw=0.5)
    for ax in (ax_ttft, ax_speed):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@contextmanager
def engines(args, path: str, engine_args: dict, uniprefill: dict):
    with ExitStack() as stack:
        made = {}
        for name in ENGINES:
            settings = uniprefill if name == "uniprefill" else None
            if args.mode == "offline":
                made[name] = OfflineEngine(path, engine_args, settings)
            else:
                log = Path(args.server_logs) / f"{name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                made[name] = ServedEngine(path, engine_args, settings, log)
            stack.callback(made[name].close)
        yield made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--input-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, help="per setting (default: the concurrency)")
    parser.add_argument("--mode", choices=["offline", "serve"], default="offline")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--uniprefill", default="{}", help="UniPrefill settings, JSON")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="per engine")
    parser.add_argument("--server-logs", default=str(RESULTS / "ttft-servers"))
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="write a PNG plot here")
    args = parser.parse_args()

    os.environ.update(serve.serve_env(args.kv_cache_gib))  # offline engines read the same
    path = str(models.prepare(args.model))
    from transformers import AutoConfig, AutoTokenizer

    from uniprefill.families import layer_types

    tokenizer = AutoTokenizer.from_pretrained(path)
    model_config = AutoConfig.from_pretrained(path)
    text_config = getattr(model_config, "text_config", model_config)
    settings = UniPrefillConfig.from_dict(json.loads(args.uniprefill))
    resolved = settings.resolve(layer_types(text_config))
    depth = text_config.num_hidden_layers
    max_len = max(args.input_lens) + args.output_len + 256  # prompts land within ~2%
    # No prefix caching in either engine: settings reuse prompts, and a cached prompt would time
    # only its last block in the baseline (UniPrefill never reads the cache for pruned prompts).
    engine_args = dict(dtype=args.dtype, max_model_len=max_len, max_num_batched_tokens=max_len,
                       enforce_eager=True, enable_prefix_caching=False, seed=0)  # fmt: skip
    print(f"# {args.model}, {args.mode}, UniPrefill {resolved.to_dict()}", flush=True)
    print(f"# {machine()}, vLLM platform {vllm_platform()}", flush=True)
    rows = []
    with engines(args, path, engine_args, resolved.to_dict()) as made:
        for length in args.input_lens:
            for concurrency in args.concurrency:
                count = args.requests or concurrency
                prompts, answers = make_prompts(tokenizer, length, count)
                before = len(made["uniprefill"].kept_counts())
                runs = {e: made[e].run(prompts, answers, concurrency, args.output_len)
                        for e in ENGINES}  # fmt: skip
                kept = made["uniprefill"].kept_counts()[before:]
                rows.append(summarize(length, concurrency, runs, kept, list(resolved.drop_layers),
                                      depth, prompts))  # fmt: skip
                print_table(rows[-1:])
    print()
    print_table(rows)
    if args.json:
        meta = {"model": args.model, "mode": args.mode, "uniprefill": resolved.to_dict(),
                "engine_args": engine_args, "argv": sys.argv, "machine": machine(),
                "vllm_platform": vllm_platform()}  # fmt: skip
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, args.plot, f"{args.model} ({args.mode})")


def vllm_platform() -> str:
    """The platform class vLLM runs on here (CpuPlatform, or ZenCpuPlatform on AMD Zen)."""
    from vllm.platforms import current_platform

    return type(current_platform).__name__


if __name__ == "__main__":
    main()
