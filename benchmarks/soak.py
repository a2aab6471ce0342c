"""Soak: a UniPrefill server on loopback under a long mixed load, then checked for leaks.

The load, from `--concurrency` clients at once: long prompts (pruned), long prompts with their
own `uniprefill_p` or with pruning off, short prompts, streaming clients that disconnect
mid-stream, requests the client aborts (cancels) after a random wait, and bad requests (400s).
Prompts are random token ids, each new. A tiny model with a lowered `min_prompt_len` makes a
thousand requests take minutes on a CPU; `--model qwen2.5-coder-0.5b-instruct` runs the same on
real weights (use fewer requests).

At the end it checks, and exits non-zero if any fails:
- no 5xx and no unexpected answer (a good request that got a 400, a bad one that did not);
- no lost request: every request completed, was rejected, or was aborted by its client; the
  server has none running or waiting, and counted at least every completed one as finished;
- the server still answers, and no pruning state is left in the worker (its status RPC);
- memory: each server process's RSS grew, from after the warm-up (the first tenth of the
  requests) to the end, by less than `--max-growth-mib` plus `--max-growth-kib-per-request` for
  each request after the warm-up: a bound in proportion to the run, so a leak of more than that
  per request fails however long the run. The server runs with glibc told to return large
  freed blocks (GLIBC_RETURN, as docs/benchmarks.md advises for a long-running CPU server;
  `--glibc-default` leaves glibc as it is), so RSS follows live memory, not what the heap keeps;
- a fixed long prompt, pruned, gives the same greedy tokens before and after.

    python benchmarks/soak.py --requests 1000 --json results/soak.json --plot soak.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from machine import machine
from prometheus_client.parser import text_string_to_metric_families

from uniprefill import models, serve

KINDS = {  # kind -> share of the requests
    "long": 0.30,
    "long_p": 0.10,
    "long_off": 0.10,
    "short": 0.25,
    "disconnect": 0.10,
    "abort": 0.05,
    "bad": 0.10,
}
VLLM_BAD_FIELDS = [{"max_tokens": -1}, {"temperature": -1}]
BAD_FIELDS = [
    {"vllm_xargs": {"uniprefill_p": 1.5}},
    {"vllm_xargs": {"uniprefill_p": "half"}},
    {"vllm_xargs": {"uniprefill_enabled": "maybe"}},
    {"vllm_xargs": {"uniprefill_level": 3}},
    *VLLM_BAD_FIELDS,
]
MAX_TOKENS = 8
PROBE_TOKENS = 16
VOCAB = (10, 1000)  # token ids drawn from this range (every tiny model's vocabulary has them)


class Soak:
    def __init__(self, port: int, model: str, seed: int, stock: bool):
        self.url = f"http://127.0.0.1:{port}"
        self.bad_fields = VLLM_BAD_FIELDS if stock else BAD_FIELDS  # stock ignores uniprefill_*
        self.model = model
        self.rng = random.Random(seed)
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (kind, outcome)
        self.failures: list[str] = []

    def prompt(self, lo: int, hi: int) -> list[int]:
        return [self.rng.randint(*VOCAB) for _ in range(self.rng.randint(lo, hi))]

    def body(self, kind: str) -> dict:
        long = kind != "short"
        body = {
            "model": self.model,
            "prompt": self.prompt(600, 1500) if long else self.prompt(20, 200),
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        if kind == "long_p":
            body["vllm_xargs"] = {"uniprefill_p": round(self.rng.uniform(0.5, 0.99), 3)}
        elif kind == "long_off":
            body["vllm_xargs"] = {"uniprefill_enabled": False}
        elif kind == "bad":
            body.update(self.rng.choice(self.bad_fields))
        elif kind == "disconnect":
            body.update(stream=True, max_tokens=64)
        return body

    async def one(self, client: httpx.AsyncClient, kind: str) -> None:
        body = self.body(kind)
        try:
            if kind == "disconnect":
                outcome = await self._disconnect(client, body)
            elif kind == "abort":
                task = asyncio.ensure_future(client.post(f"{self.url}/v1/completions", json=body))
                await asyncio.sleep(self.rng.uniform(0.0, 0.5))
                task.cancel()
                try:
                    outcome = self._judge(kind, body, await task)
                except asyncio.CancelledError:
                    outcome = "aborted"
            else:
                reply = await client.post(f"{self.url}/v1/completions", json=body)
                outcome = self._judge(kind, body, reply)
        except httpx.HTTPError as error:
            outcome = f"client error {type(error).__name__}"
            self.failures.append(f"{kind}: {error!r}")
        self.outcomes[kind, outcome] += 1

    async def _disconnect(self, client: httpx.AsyncClient, body: dict) -> str:
        async with client.stream("POST", f"{self.url}/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                return self._judge("disconnect", body, reply)
            chunks = 0
            async for line in reply.aiter_lines():
                chunks += line.startswith("data:")
                if chunks == 2:
                    return "disconnected"  # leaving the block closes the connection
        return "completed"

    def _judge(self, kind: str, body: dict, reply: httpx.Response) -> str:
        status = reply.status_code
        if status >= 500:
            self.failures.append(f"{kind}: HTTP {status} {reply.text[:200]}")
            return f"HTTP {status}"
        if kind == "bad":
            if status != 400:
                self.failures.append(f"bad request {body} answered {status}")
            return "rejected" if status == 400 else f"HTTP {status}"
        if status != 200:
            self.failures.append(f"{kind}: HTTP {status} {reply.text[:200]}")
            return f"HTTP {status}"
        usage = reply.json()["usage"]
        if usage["completion_tokens"] != body["max_tokens"]:
            self.failures.append(f"{kind}: {usage['completion_tokens']} tokens, not {MAX_TOKENS}")
        return "completed"

    async def run(self, kinds: list[str], concurrency: int) -> None:
        queue: asyncio.Queue[str] = asyncio.Queue()
        for kind in kinds:
            queue.put_nowait(kind)
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:

            async def client_loop() -> None:
                while not queue.empty():
                    await self.one(client, queue.get_nowait())

            await asyncio.gather(*(client_loop() for _ in range(concurrency)))

    def probe(self, salt: str) -> list[int] | str:
        """The fixed probe's greedy tokens (pruned; a salt of its own keeps it a new prompt)."""
        prompt = random.Random(1234).choices(range(*VOCAB), k=1200)
        body = {"model": self.model, "prompt": prompt, "max_tokens": PROBE_TOKENS,
                "temperature": 0, "ignore_eos": True, "cache_salt": salt,
                "return_token_ids": True}  # fmt: skip
        reply = httpx.post(f"{self.url}/v1/completions", json=body, timeout=600)
        if reply.status_code != 200:
            return f"HTTP {reply.status_code}"
        choice = reply.json()["choices"][0]
        return choice.get("token_ids") or choice["text"]


def kinds_for(requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return rng.choices(list(KINDS), weights=list(KINDS.values()), k=requests)


def process_rss(proc: psutil.Process) -> dict[str, float]:
    """RSS (MiB) of the server and each of its engine processes, by role."""
    out = {"api_server": proc.memory_info().rss / 2**20}
    for child in proc.children(recursive=True):
        try:
            name = child.name()
            if "resource_tracker" in " ".join(child.cmdline()):
                continue
            out[name] = out.get(name, 0.0) + child.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    return out


def server_metrics(url: str) -> dict[str, float]:
    """vLLM's request counters and gauges, summed over engines."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if key == "vllm:request_success_total":
                key += f"@{sample.labels['finished_reason']}"
            elif key not in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                             "vllm:uniprefill_pruned_requests_total"):  # fmt: skip
                continue
            out[key] = out.get(key, 0.0) + sample.value
    return out


# glibc hands freed blocks of at least 1 MiB back to the system and trims its heap above 16 MiB
# free: pruned steps allocate tensors of many sizes, which its defaults keep (docs/benchmarks.md).
GLIBC_RETURN = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "16777216"}


def soak(args: argparse.Namespace) -> dict:
    model_dir = models.prepare(args.model)
    port = serve.free_port()
    extra = ["--max-model-len", "4096", *shlex.split(args.vllm_args)]
    if not args.stock:
        settings = {"uniprefill": {"min_prompt_len": args.min_prompt_len}}
        extra += ["--additional-config", json.dumps(settings)]
    cmd = serve.serve_command(
        str(model_dir), served_name=args.model, host="127.0.0.1", port=port, dtype=args.dtype,
        extra_args=extra, uniprefill=not args.stock,
    )  # fmt: skip
    env = serve.serve_env(kv_cache_gib=args.kv_cache_gib) | {"VLLM_SERVER_DEV_MODE": "1"}
    if not args.glibc_default:
        env |= GLIBC_RETURN
    log = Path(args.log or tempfile.mkstemp(prefix="soak-", suffix=".log")[1])
    proc = serve.start(cmd, env, log)
    try:
        serve.wait_until_ready(proc, f"http://127.0.0.1:{port}")
        load = Soak(port, args.model, args.seed, args.stock)
        return drive(args, proc, load) | {"log": str(log)}
    finally:
        serve.stop(proc)


def drive(args: argparse.Namespace, proc, load: Soak) -> dict:
    server = psutil.Process(proc.pid)
    kinds = kinds_for(args.requests, args.seed)
    warmup = max(1, len(kinds) // 10)
    probe_before = load.probe("before")
    started = time.monotonic()
    asyncio.run(load.run(kinds[:warmup], args.concurrency))
    baseline = process_rss(server)
    timeline = [(time.monotonic() - started, baseline)]
    rest, step = kinds[warmup:], max(1, len(kinds) // 20)
    for i in range(0, len(rest), step):
        asyncio.run(load.run(rest[i : i + step], args.concurrency))
        timeline.append((time.monotonic() - started, process_rss(server)))
    duration = time.monotonic() - started
    bound = args.max_growth_mib + args.max_growth_kib_per_request * len(rest) / 1024
    time.sleep(2)  # let the engine retire aborted requests
    end = process_rss(server)
    metrics = server_metrics(load.url)
    probe_after = load.probe("after")

    failures = list(load.failures)
    outcomes = {f"{k}:{o}": n for (k, o), n in sorted(load.outcomes.items())}
    counted = sum(load.outcomes.values())
    if counted != len(kinds):
        failures.append(f"{len(kinds) - counted} requests have no outcome")
    completed = sum(n for (k, o), n in load.outcomes.items() if o == "completed")
    finished = sum(v for k, v in metrics.items() if k.startswith("vllm:request_success_total@"))
    if finished < completed:
        failures.append(
            f"the server counted {finished:.0f} finished requests, {completed} completed"
        )
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        if metrics.get(gauge, 0) != 0:
            failures.append(f"{gauge} = {metrics[gauge]:.0f} after the load")
    if not args.stock:
        rpc = {"method": "uniprefill_requests"}
        reply = httpx.post(f"{load.url}/collective_rpc", json=rpc, timeout=60)
        (worker,) = reply.json()["results"]
        if worker["live"] or worker["held"]:
            failures.append(f"pruning state left in the worker: {worker['live']} {worker['held']}")
    growth = {name: end.get(name, 0.0) - mib for name, mib in baseline.items()}
    for name, mib in growth.items():
        if mib > bound:
            failures.append(f"{name} grew {mib:.0f} MiB after warm-up (> {bound:.0f})")
    if probe_before != probe_after or isinstance(probe_before, str):
        failures.append(f"probe before {probe_before} != after {probe_after}")
    pruned = metrics.get("vllm:uniprefill_pruned_requests_total", 0)
    if pruned < 1 and not args.stock:
        failures.append("nothing was pruned")
    return {
        "machine": machine(),
        "model": args.model,
        "dtype": args.dtype,
        "server": "stock vLLM" if args.stock else "UniPrefill",
        "requests": len(kinds),
        "concurrency": args.concurrency,
        "duration_s": round(duration, 1),
        "outcomes": outcomes,
        "server_finished": {k.split("@")[1]: v for k, v in metrics.items() if "@" in k},
        "pruned_requests": pruned,
        "rss_after_warmup_mib": {k: round(v) for k, v in baseline.items()},
        "rss_end_mib": {k: round(v) for k, v in end.items()},
        "rss_growth_mib": {k: round(v) for k, v in growth.items()},
        "max_growth_mib": round(bound, 1),
        "probe_same": probe_before == probe_after,
        "timeline": [(round(t, 1), {k: round(v) for k, v in rss.items()}) for t, rss in timeline],
        "failures": failures,
    }


def print_report(report: dict) -> None:
    print(f"{report['server']}: {report['requests']} requests in {report['duration_s']} s, "
          f"concurrency {report['concurrency']}, {report['model']} ({report['dtype']}), "
          f"{report['machine']['cpu']}")  # fmt: skip
    print("\noutcome (kind:outcome) | requests")
    for key, n in report["outcomes"].items():
        print(f"{key} | {n}")
    print(f"\nserver finished by reason: {report['server_finished']}")
    print(f"pruned requests (server metric): {report['pruned_requests']:.0f}")
    print("\nprocess | RSS after warm-up (MiB) | at end | growth")
    for name, mib in report["rss_after_warmup_mib"].items():
        print(f"{name} | {mib} | {report['rss_end_mib'].get(name)} | "
              f"{report['rss_growth_mib'][name]}")  # fmt: skip
    print(f"\nprobe same before and after: {report['probe_same']}")
    print("PASS" if not report["failures"] else "FAIL:\n  " + "\n  ".join(report["failures"]))


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in report["rss_after_warmup_mib"]:
        ax.plot([t for t, _ in report["timeline"]],
                [rss.get(name, 0) for _, rss in report["timeline"]], label=name)  # fmt: skip
    ax.set_xlabel("seconds into the soak")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"soak: {report['requests']} requests, {report['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--min-prompt-len", type=int, default=256)
    parser.add_argument("--max-growth-mib", type=float, default=48.0,
                        help="RSS growth allowed whatever the run's length")  # fmt: skip
    parser.add_argument("--max-growth-kib-per-request", type=float, default=16.0,
                        help="RSS growth allowed per request after the warm-up")  # fmt: skip
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's malloc settings as they are in the server")  # fmt: skip
    parser.add_argument("--kv-cache-gib", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    stock = "the same load on stock vLLM (no plugin): its own memory growth"
    parser.add_argument("--stock", action="store_true", help=stock)
    parser.add_argument("--vllm-args", default="", help="more `vllm serve` arguments, quoted")
    parser.add_argument("--log", help="the server's log file (default: a temporary file)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--plot", help="write the memory timeline (PNG) here")
    args = parser.parse_args()
    report = soak(args)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
