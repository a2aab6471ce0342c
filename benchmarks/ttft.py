"""TTFT of baseline vLLM and UniPrefill, side by side in one run, on the same prompts.

Baselines (--baseline):
  stock (default): what users compare, `vllm serve MODEL --plugin uniprefill` against plain
    `vllm serve MODEL`. Both engines get only dtype, max_model_len and seed, so vLLM's defaults
    hold everywhere else (compiled graph, chunked prefill with vLLM's step budget, prefix
    caching); the UniPrefill engine adds its settings and adjusts what it needs itself (prefix
    caching off on linear-attention models). Results before chunked prefill with pruning
    (docs/benchmarks.md says which) ran UniPrefill with max_num_batched_tokens raised to
    max_model_len.
  matched: a mechanism view, not what users run. Both engines run eager, without prefix caching,
    with the whole prompt in one step (max_num_batched_tokens = max_model_len); only pruning
    differs.
The header and the JSON meta record the baseline mode, each engine's arguments and what it ended
up running with (compilation mode, chunked prefill, step budget, prefix caching), the machine and
vLLM's platform. Every request gets its own prompt (a running sample index over the whole run),
so a prefix cache only helps where the conversation scenario repeats history on purpose. Prompts
(--corpus) are passkey questions over varied prose (benchmarks/ruler_tasks.py; the answer is
checked), or Python standard-library source with a question about it (real text; no answer to
check), sized to within ~5% of the input length (a few hundred tokens at the least). Every fresh
row also counts the requests whose first 16 tokens UniPrefill and the baseline agree on. Before
the scenarios, each engine answers one prompt per length untimed, so first-call costs stay out
of the results (their TTFTs are printed).

Scenarios (--scenarios), each repeated --repeats times; a repeat runs both engines on that
repeat's fresh prompts, the baseline first in even repeats and UniPrefill first in odd ones:
  fresh: per input length x concurrency, --requests prompts with `concurrency` in flight. TTFT
    median and p90 over all repeats, the speedup (baseline / UniPrefill median TTFT per repeat),
    the ideal speedup (baseline token-layers / pruned token-layers, from the keep counts the
    workers report), decode tokens/s and passkey accuracy. Decode tokens/s counts the tokens
    produced after a repeat's last first token, when no prefill is left in the batch, over that
    window's length: decode steps alone, not decodes queued behind a long prefill.
  short: TTFT of one --short-len prompt (default 512, shorter than UniPrefill's default
    min_prompt_len, so nothing is pruned): what UniPrefill costs where it does not help.
  conversation: per input length, turn 1 is a fresh prompt answered with --output-len tokens;
    turn 2 is turn 1's prompt and that engine's answer (token ids) plus a new ~64-token
    question. TTFT of turn 2; stock vLLM serves the repeated history from its prefix cache.
  decode: tokens/s after the first token of one long (the first input length) and one
    --short-len request, each generating --decode-len tokens alone.
  growing: a conversation of --short-len turns (each a new prompt after the engine's answer to
    the last) until the history reaches the first input length; every turn's TTFT. Stock vLLM
    and UniPrefill both read the history from the prefix cache.
  document: a document of the first input length with three magic numbers in it (at 50%, 15%
    and 85% of its depth); a three-turn conversation asks for one per turn. Each turn's TTFT,
    their sum, and the answers that hold the number asked for. UniPrefill's setting
    repeated_prefix decides what its turns 2 and 3 do (--uniprefill '{"repeated_prefix": ...}').
  shared: the same document, with three separate requests, one per magic number.
  partial: per --cached-shares, a prompt of the first input length whose first part was sent
    just before (unpruned, so it is cached): TTFT of the whole prompt. Run with UniPrefill's
    cached_share at 1.0 it compares pruning the prompt against stock's cached path (the choice
    behind cached_share's default).
Each row's speedup is the median of the per-repeat ratios (baseline / UniPrefill TTFT;
UniPrefill / baseline tokens/s for decode), with their min and max: ratios near 1 need 10 or
more repeats before they mean anything.

    python benchmarks/ttft.py --model qwen2.5-coder-0.5b-instruct --input-lens 2048 4096 8192 \\
        --concurrency 1 4 --repeats 10 --json ttft.json --plot ttft.png
    python benchmarks/ttft.py --baseline matched --scenarios fresh --input-lens 4096 \\
        --concurrency 1  # the mechanism view: pruning alone

--mode serve drives two real `vllm serve ... [--plugin uniprefill]` servers over HTTP with
concurrent streaming clients (keep counts come from their /collective_rpc dev endpoint, engine
settings from /server_info).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import sysconfig
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from machine import machine
from ruler_tasks import DID, WHAT, WHEN, WHO, make_sample, prose

from uniprefill import models, serve
from uniprefill.accounting import token_layers
from uniprefill.config import UniPrefillConfig

ENGINES = ("baseline", "uniprefill")
QUESTION_TOKENS = 64  # the conversation's second user turn
NEEDLE_DEPTHS = (0.5, 0.15, 0.85)  # where a document's magic numbers sit, in the order asked
MAGIC_KEYS = ["amber", "cobalt", "olive", "crimson", "ivory", "teal", "saffron", "slate"]
AGREEMENT_TOKENS = 16  # UniPrefill agrees with the baseline if its first tokens are the same
RESULTS = Path(__file__).resolve().parent / "results"
# What an engine runs with once vLLM's defaults and the plugin's adjustments are in.
EFFECTIVE = {
    "compilation_mode": ("compilation_config", "mode"),
    "enforce_eager": ("model_config", "enforce_eager"),
    "chunked_prefill": ("scheduler_config", "enable_chunked_prefill"),
    "max_num_batched_tokens": ("scheduler_config", "max_num_batched_tokens"),
    "prefix_caching": ("cache_config", "enable_prefix_caching"),
}


@dataclass
class Request:
    ttft: float  # seconds from submission to the first token
    token_times: list[float]  # arrival time of each output token
    text: str
    token_ids: list[int]  # the output tokens


def decode_tps(requests: list[Request]) -> float:
    """Tokens/s of the decode-only window: after the last first token, until the last token."""
    start = max(r.token_times[0] for r in requests)
    end = max(r.token_times[-1] for r in requests)
    tokens = sum(t > start for r in requests for t in r.token_times)
    return tokens / (end - start) if end > start else float("nan")


class Prompts:
    """Prompts for a whole run: a running sample index, so no two requests share a prompt.

    corpus "passkey": a passkey question over varied prose (its answer is checked);
    corpus "code": Python standard-library source (real text, which keeps more tokens than a
    haystack does) and a question about it, with no answer to check.
    """

    def __init__(self, tokenizer: Any, corpus: str = "passkey") -> None:
        self.tokenizer = tokenizer
        self.corpus = corpus
        self.index = 0
        if corpus == "code":
            stdlib = Path(sysconfig.get_paths()["stdlib"])
            self.sources = [f.read_text(errors="replace") for f in sorted(stdlib.glob("*.py"))]
            # distinct starts (file, line): every file has at least this many lines
            self.starts = len(self.sources) * min(len(s.splitlines()) for s in self.sources)

    def take(self, length: int, count: int) -> tuple[list[list[int]], list[str | None]]:
        """`count` chat-formatted prompts of about `length` tokens, and their answers."""
        prompts, answers = [], []
        for _ in range(count):
            self.index += 1
            size = int(length * 0.7)  # words of prose, or characters / 3 of code
            for _ in range(4):  # rescale the text until the prompt is just under `length`
                messages, answer = self._sample(size)
                ids = _encode(self.tokenizer, messages)
                size = int(size * 0.995 * length / len(ids))
            prompts.append(list(ids))
            answers.append(answer)
        return prompts, answers

    def _sample(self, size: int) -> tuple[list[dict], str | None]:
        if self.corpus == "passkey":
            depth = (self.index % 5 + 0.5) / 5
            sample = make_sample("passkey", self.index, size, depth=depth)
            return sample.messages, sample.answers[0]
        question = "What does the last complete function in this code do? Answer in two sentences."
        return [
            {"role": "user", "content": f"```python\n{self._code(size)}\n```\n\n{question}"}
        ], None

    def _code(self, size: int) -> str:
        """Source files in order, cut to `size` * 3 characters, from a start that differs per
        index: index i starts at file i % n (of n files), `i // n` lines into it, so no two
        indices share a prompt (a repeated prompt would be read from stock vLLM's prefix cache)."""
        if self.index >= self.starts:
            raise ValueError(
                f"the code corpus has {self.starts} distinct prompt starts, and this run's "
                f"prompt {self.index} would repeat one: use fewer --requests, --repeats, lengths "
                "or scenarios"
            )
        skip, start = divmod(self.index, len(self.sources))
        text = "".join(self.sources[start].splitlines(keepends=True)[skip:])
        i = start + 1
        while len(text) < size * 3:
            text += self.sources[i % len(self.sources)]
            i += 1
        return text[: size * 3]

    def document(self, length: int) -> Document:
        """A document of about `length` tokens (prose, or code for the code corpus) with a magic
        number at each of NEEDLE_DEPTHS, and the questions that ask for them."""
        self.index += 1
        rng = random.Random(f"document/{self.index}")
        keys = rng.sample(MAGIC_KEYS, len(NEEDLE_DEPTHS))
        values = [str(rng.randint(10000, 99999)) for _ in keys]
        size = int(length * 0.7)
        for _ in range(4):  # rescale the text until the first turn is just under `length`
            if self.corpus == "code":
                lines = self._code(size).split("\n")
                needle = "# The special magic number for {} is {}."
            else:
                lines = prose(f"document/{self.index}", size).split("\n")
                needle = "The special magic number for {} is {}."
            for depth, key, value in sorted(
                zip(NEEDLE_DEPTHS, keys, values, strict=True), reverse=True
            ):
                lines.insert(round(depth * len(lines)), needle.format(key, value))
            doc = Document(self.tokenizer, "\n".join(lines), keys, values)
            size = int(size * 0.995 * length / len(doc.ask(0)))
        return doc

    def question(self) -> list[int]:
        """A new follow-up question of QUESTION_TOKENS tokens (plain text, no chat markup)."""
        self.index += 1
        rng = random.Random(f"question/{self.index}")
        pools = (WHEN, WHO, DID, WHAT)
        said = " ".join("{}, {} {} {}.".format(*map(rng.choice, pools)) for _ in range(6))
        text = f"\n\nThanks. Now, in these notes, who did what, and when? {said}"
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][:QUESTION_TOKENS]


@dataclass
class Document:
    """A long text with magic numbers in it: `ask(i)` is a fresh prompt asking for number i,
    `follow_up(i, ids, answer)` the next turn of a conversation asking for it."""

    tokenizer: Any
    text: str
    keys: list[str]
    values: list[str]

    def question(self, i: int) -> str:
        return f"What is the special magic number for {self.keys[i]}? Answer briefly."

    def ask(self, i: int) -> list[int]:
        content = f"Read the text below and answer the question after it.\n\n{self.text}"
        return _encode(
            self.tokenizer, [{"role": "user", "content": f"{content}\n\n{self.question(i)}"}]
        )

    def follow_up(self, i: int, ids: list[int], answer: list[int]) -> list[int]:
        """The conversation so far (`ids`, then `answer`'s tokens) and a user turn asking i."""
        if self.tokenizer.chat_template is None:
            text = f"\n\nQuestion: {self.question(i)}\nThe magic number is"
            return ids + answer + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        mark = "\x00ANSWER\x00"  # the template's text between an answer and the next prompt
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": mark},
             {"role": "user", "content": self.question(i)}],
            add_generation_prompt=True, tokenize=False,
        )  # fmt: skip
        turn = self.tokenizer(rendered.split(mark, 1)[1], add_special_tokens=False)["input_ids"]
        if answer and turn and answer[-1] == turn[0]:  # the answer ended with the end-of-turn
            turn = turn[1:]
        return ids + answer + turn


def _encode(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Chat-formatted ids; plain text (with the tokenizer's own special tokens) for base models
    without a chat template, such as Gemma-3-270M."""
    if tokenizer.chat_template is None:
        text = "\n\n".join(m["content"] for m in messages) + "\nThe passkey is"
        return tokenizer(text)["input_ids"]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def median_ttft(requests: list[Request]) -> float:
    return statistics.median(r.ttft for r in requests)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def effective(config: Any) -> dict[str, Any]:
    """EFFECTIVE's settings of a VllmConfig, or of its JSON form (from /server_info)."""
    from vllm.config import CompilationMode

    def get(obj: Any, key: str) -> Any:
        return obj[key] if isinstance(obj, dict) else getattr(obj, key)

    values = {name: get(get(config, part), key) for name, (part, key) in EFFECTIVE.items()}
    values["compilation_mode"] = CompilationMode(values["compilation_mode"]).name
    return values


# ---- engines: two LLM engines in this process, or two real vLLM servers ---------------------


class Engine(ABC):
    """One engine under test; `seen` holds the ids of pruned prefills already reported."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    @abstractmethod
    def run(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        concurrency: int = 1,
        ignore_eos: bool = False,
        extra_args: dict | None = None,
    ) -> list[Request]:
        """Greedy completions of `prompts`, `concurrency` in flight at a time, in prompt order;
        `extra_args`: per-request controls (vllm_xargs)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The EFFECTIVE settings this engine runs with."""

    @abstractmethod
    def recent_prunes(self) -> list[dict]:
        """The worker's most recent pruned prefills (uniprefill.accounting.pruned_prompt)."""

    @abstractmethod
    def close(self) -> None: ...

    def new_kept_counts(self) -> list[list[int]]:
        """Keep counts of the prefills pruned since the last call."""
        recent = self.recent_prunes()
        new = [r["kept"] for r in recent if r["req_id"] not in self.seen]
        self.seen.update(r["req_id"] for r in recent)
        return new


class OfflineEngine(Engine):
    def __init__(self, path: str, engine_args: dict) -> None:
        from vllm import LLM

        super().__init__()
        self.llm = LLM(model=path, **engine_args)
        self.count = 0

    def run(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        concurrency: int = 1,
        ignore_eos: bool = False,
        extra_args: dict | None = None,
    ) -> list[Request]:
        from vllm import SamplingParams

        core = self.llm.llm_engine
        params = SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos, extra_args=extra_args
        )
        pending = list(enumerate(prompts))
        submitted, times, done = {}, {}, {}
        while pending or core.has_unfinished_requests():
            while pending and len(submitted) - len(done) < concurrency:
                i, ids = pending.pop(0)
                self.count += 1
                req_id = f"r{self.count}"
                submitted[req_id] = (i, time.perf_counter())
                times[req_id] = []
                core.add_request(req_id, {"prompt_token_ids": ids}, params)
            for out in core.step():
                now = time.perf_counter()
                new = len(out.outputs[0].token_ids) - len(times[out.request_id])
                times[out.request_id] += [now] * new
                if out.finished:
                    done[out.request_id] = out.outputs[0]
        by_index = {
            i: Request(times[r][0] - t0, times[r], done[r].text, list(done[r].token_ids))
            for r, (i, t0) in submitted.items()
        }
        return [by_index[i] for i in range(len(prompts))]

    def config(self) -> dict[str, Any]:
        return effective(self.llm.llm_engine.vllm_config)

    def recent_prunes(self) -> list[dict]:
        state = self.llm.collective_rpc("uniprefill_requests")[0]  # every TP rank keeps alike
        return state["recent"]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def _cli_flag(key: str, value: Any) -> str:
    flag = key.replace("_", "-")
    if isinstance(value, bool):  # vLLM's boolean options: --flag / --no-flag
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag}={json.dumps(value) if isinstance(value, dict) else value}"


class ServedEngine(Engine):
    def __init__(self, path: str, engine_args: dict, log: Path) -> None:
        import httpx

        super().__init__()
        self.httpx = httpx
        self.port = serve.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = Path(path).name
        extra = [_cli_flag(k, v) for k, v in engine_args.items() if k != "dtype"]
        cmd = serve.serve_command(path, served_name=self.name, host="127.0.0.1", port=self.port,
                                  dtype=engine_args["dtype"], extra_args=extra,
                                  uniprefill="additional_config" in engine_args)  # fmt: skip
        env = serve.serve_env() | {"VLLM_SERVER_DEV_MODE": "1"}
        self.proc = serve.start(cmd, env, log)
        serve.wait_until_ready(self.proc, self.url, timeout_s=1800)

    def run(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        concurrency: int = 1,
        ignore_eos: bool = False,
        extra_args: dict | None = None,
    ) -> list[Request]:
        return asyncio.run(self._run(prompts, max_tokens, concurrency, ignore_eos, extra_args))

    async def _run(self, prompts, max_tokens, concurrency, ignore_eos, extra_args) -> list[Request]:
        import openai

        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="-")
        gate = asyncio.Semaphore(concurrency)

        async def one(ids: list[int]) -> Request:
            async with gate:
                t0 = time.perf_counter()
                stream = await client.completions.create(
                    model=self.name, prompt=ids, max_tokens=max_tokens, temperature=0,
                    stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": ignore_eos, "return_token_ids": True,
                                "vllm_xargs": extra_args},
                )  # fmt: skip
                text, times, out_ids = "", [], []
                async for chunk in stream:  # the usage chunk has no choices
                    if chunk.choices:
                        new = chunk.choices[0].token_ids or []
                        times += [time.perf_counter()] * len(new)
                        out_ids += new
                        text += chunk.choices[0].text
                return Request(times[0] - t0, times, text, out_ids)

        return await asyncio.gather(*(one(ids) for ids in prompts))

    def config(self) -> dict[str, Any]:
        # Slow: the server collects its system's environment for this reply too.
        query = {"config_format": "json"}
        info = self.httpx.get(f"{self.url}/server_info", params=query, timeout=300)
        return effective(info.json()["vllm_config"])

    def recent_prunes(self) -> list[dict]:
        url = f"{self.url}/collective_rpc"
        reply = self.httpx.post(url, json={"method": "uniprefill_requests"}, timeout=60)
        state = reply.json()["results"][0]  # every TP rank keeps alike
        return state["recent"]

    def close(self) -> None:
        serve.stop(self.proc)


def engine_args(
    baseline: str, dtype: str, max_len: int, settings: dict, tensor_parallel_size: int = 1
) -> dict[str, dict]:
    """Each engine's arguments: vLLM's defaults (stock), or eager, uncached, one step (matched)."""
    args: dict[str, Any] = dict(dtype=dtype, max_model_len=max_len, seed=0)
    if tensor_parallel_size > 1:
        args["tensor_parallel_size"] = tensor_parallel_size
    if baseline == "matched":
        args |= dict(
            enforce_eager=True, enable_prefix_caching=False, max_num_batched_tokens=max_len
        )
    return {"baseline": args, "uniprefill": args | {"additional_config": {"uniprefill": settings}}}


@contextmanager
def engines(mode: str, path: str, args: dict[str, dict], logs: Path) -> Iterator[dict]:
    with ExitStack() as stack:
        made: dict[str, Engine] = {}
        for name in ENGINES:
            if mode == "offline":
                made[name] = OfflineEngine(path, args[name])
            else:
                logs.mkdir(parents=True, exist_ok=True)
                made[name] = ServedEngine(path, args[name], logs / f"{name}.log")
            stack.callback(made[name].close)
        yield made


def interleaved(made: dict[str, Engine], repeat: int, job: Callable, *job_args: Any) -> dict:
    """`job(engine, *job_args)` on both engines: the baseline first in even repeats."""
    order = ENGINES if repeat % 2 == 0 else ENGINES[::-1]
    return {name: job(made[name], *job_args) for name in order}


# ---- scenarios ---------------------------------------------------------------------------------


@dataclass
class Bench:
    made: dict[str, Engine]
    prompts: Prompts
    args: argparse.Namespace
    drops: list[int]  # UniPrefill's drop layers
    depth: int  # the model's layer count


def warm_up(bench: Bench) -> dict[str, list[float]]:
    """A few tokens of one prompt per length (--warm-up-lens; default: every length of the run)
    on each engine, untimed by the scenarios, so that first-call costs (compilation, the first
    pruned prefill) stay out of them; their TTFTs."""
    lengths = bench.args.warm_up_lens or sorted({*bench.args.input_lens, bench.args.short_len})
    ids = [bench.prompts.take(length, 1)[0][0] for length in lengths]
    return {name: [r.ttft for r in engine.run(ids, 4)] for name, engine in bench.made.items()}


def spread(ratios: list[float]) -> dict[str, float]:
    return {
        "speedup": statistics.median(ratios),
        "speedup_min": min(ratios),
        "speedup_max": max(ratios),
    }


def batch(engine: Engine, ids: list[list[int]], output_len: int, concurrency: int) -> list:
    return engine.run(ids, output_len, concurrency)


def fresh(bench: Bench) -> list[dict]:
    args, uniprefill = bench.args, bench.made["uniprefill"]
    rows = []
    for length in args.input_lens:
        for concurrency in args.concurrency:
            count = args.requests or concurrency
            uniprefill.new_kept_counts()  # forget earlier prunes
            repeats, kept, tokens, answers = [], [], [], []
            for repeat in range(args.repeats):
                ids, truth = bench.prompts.take(length, count)
                repeats.append(
                    interleaved(bench.made, repeat, batch, ids, args.output_len, concurrency)
                )
                kept += uniprefill.new_kept_counts()
                tokens += ids
                answers += truth
            rows.append(fresh_row(bench, length, concurrency, repeats, answers, kept, tokens))
            print_fresh(rows[-1:])
    return rows


def fresh_row(
    bench: Bench,
    length: int,
    concurrency: int,
    repeats: list[dict[str, list[Request]]],
    answers: list[str],
    kept: list[list[int]],
    tokens: list[list[int]],
) -> dict:
    """A fresh setting's row from its repeats (each engine's requests, in prompt order)."""
    runs = {e: [r for rep in repeats for r in rep[e]] for e in ENGINES}
    med = {e: median_ttft(runs[e]) for e in ENGINES}
    ratios = [median_ttft(rep["baseline"]) / median_ttft(rep["uniprefill"]) for rep in repeats]
    full = sum(len(t) for t in tokens) * bench.depth
    not_pruned = sum(len(t) for t in tokens) - sum(k[0] for k in kept)
    pruned = sum(token_layers(k, bench.drops, bench.depth) for k in kept)
    checked = [a is not None for a in answers]
    correct = {
        e: sum(a is not None and a in r.text for r, a in zip(runs[e], answers, strict=True))
        for e in ENGINES
    }
    same = sum(
        u.token_ids[:AGREEMENT_TOKENS] == b.token_ids[:AGREEMENT_TOKENS]
        for u, b in zip(runs["uniprefill"], runs["baseline"], strict=True)
    )
    return {
        "scenario": "fresh",
        "input_len": round(statistics.mean(len(t) for t in tokens)),
        "target_len": length,
        "concurrency": concurrency,
        "requests": len(runs["baseline"]),
        "repeats": len(repeats),
        **{f"ttft_median_{e}": med[e] for e in ENGINES},
        **{f"ttft_p90_{e}": percentile([r.ttft for r in runs[e]], 0.9) for e in ENGINES},
        **spread(ratios),
        "ideal_speedup": full / (pruned + not_pruned * bench.depth),
        **{
            f"decode_tps_{e}": statistics.median(decode_tps(rep[e]) for rep in repeats)
            for e in ENGINES
        },
        **{f"accuracy_{e}": f"{correct[e]}/{sum(checked)}" for e in ENGINES},
        "same_first_tokens": f"{same}/{len(answers)}",
        "kept_per_stage": [round(statistics.mean(s)) for s in zip(*kept, strict=True)]
        if kept
        else [],
    }


def ratio_row(scenario: str, target: int, lengths: list[int], metric: str, values: dict) -> dict:
    """A row of per-repeat values of both engines: TTFT (lower is better) or decode tokens/s."""
    base, uni = values["baseline"], values["uniprefill"]
    pairs = zip(base, uni, strict=True)
    ratios = [b / u for b, u in pairs] if metric == "ttft" else [u / b for b, u in pairs]
    row = {
        "scenario": scenario,
        "input_len": round(statistics.mean(lengths)),
        "target_len": target,
        "repeats": len(base),
        **{f"{metric}_median_{e}": statistics.median(values[e]) for e in ENGINES},
        **spread(ratios),
        **{f"{metric}_{e}": values[e] for e in ENGINES},
    }
    print_ratios([row])
    return row


def first_token(engine: Engine, ids: list[int]) -> Request:
    (request,) = engine.run([ids], max_tokens=1)
    return request


def second_turn(engine: Engine, history: list[int], question: list[int], output_len: int) -> tuple:
    """Turn 1 on `history` (its answer exactly `output_len` tokens), then turn 2's first token."""
    (answer,) = engine.run([history], output_len, ignore_eos=True)
    ids = history + answer.token_ids + question
    return first_token(engine, ids), len(ids)


def decode_alone(engine: Engine, ids: list[int], decode_len: int) -> Request:
    (request,) = engine.run([ids], decode_len, ignore_eos=True)
    return request


def short(bench: Bench) -> list[dict]:
    ttft, lengths = {e: [] for e in ENGINES}, []
    for repeat in range(bench.args.repeats):
        (ids,), _ = bench.prompts.take(bench.args.short_len, 1)
        for name, request in interleaved(bench.made, repeat, first_token, ids).items():
            ttft[name].append(request.ttft)
        lengths.append(len(ids))
    return [ratio_row("short", bench.args.short_len, lengths, "ttft", ttft)]


def conversation(bench: Bench) -> list[dict]:
    args, rows = bench.args, []
    for length in args.input_lens:
        ttft, lengths = {e: [] for e in ENGINES}, []
        for repeat in range(args.repeats):
            (history,), _ = bench.prompts.take(length, 1)
            question = bench.prompts.question()
            turns = interleaved(bench.made, repeat, second_turn, history, question, args.output_len)
            for name, (request, turn_len) in turns.items():
                ttft[name].append(request.ttft)
                lengths.append(turn_len)
        rows.append(ratio_row("conversation", length, lengths, "ttft", ttft))
    return rows


def decode(bench: Bench) -> list[dict]:
    args, rows = bench.args, []
    for length in dict.fromkeys((args.input_lens[0], args.short_len)):
        tps, lengths = {e: [] for e in ENGINES}, []
        for repeat in range(args.repeats):
            (ids,), _ = bench.prompts.take(length, 1)
            runs = interleaved(bench.made, repeat, decode_alone, ids, args.decode_len)
            for name, request in runs.items():
                tps[name].append(decode_tps([request]))
            lengths.append(len(ids))
        rows.append(ratio_row("decode", length, lengths, "decode_tps", tps))
    return rows


def grow(engine: Engine, turns: list[list[int]], output_len: int) -> list[tuple[Request, int]]:
    """A conversation of `turns` (each a chat-formatted prompt added to the history so far,
    after the engine's answer to the previous one): every turn's answer and prompt length."""
    history, out = [], []
    for turn in turns:
        ids = history + turn
        (answer,) = engine.run([ids], output_len, ignore_eos=True)
        out.append((answer, len(ids)))
        history = ids + answer.token_ids
    return out


def growing(bench: Bench) -> list[dict]:
    """Turns of --short-len tokens, until the history reaches the first input length."""
    args = bench.args
    ttft, lengths = {e: [] for e in ENGINES}, []
    count = max(2, args.input_lens[0] // (args.short_len + args.output_len))
    for repeat in range(args.repeats):
        turns = [bench.prompts.take(args.short_len, 1)[0][0] for _ in range(count)]
        for name, answered in interleaved(bench.made, repeat, grow, turns, args.output_len).items():
            ttft[name] += [request.ttft for request, _ in answered]
            if name == "baseline":
                lengths += [turn_len for _, turn_len in answered]
    row = ratio_row("growing", args.input_lens[0], lengths, "ttft", ttft)
    row["turn_lens"] = lengths
    return [row]


def talk(engine: Engine, doc: Document, output_len: int) -> list[tuple[Request, int]]:
    """Turn i asks for the document's magic number i, in one conversation."""
    ids, answer, out = doc.ask(0), [], []
    for i in range(len(doc.keys)):
        if i:
            ids = doc.follow_up(i, ids, answer)
        (request,) = engine.run([ids], output_len)
        out.append((request, len(ids)))
        answer = request.token_ids
    return out


def ask_each(engine: Engine, doc: Document, output_len: int) -> list[tuple[Request, int]]:
    """A fresh request per magic number: the same document, a different question each."""
    asked = [doc.ask(i) for i in range(len(doc.keys))]
    return list(zip(engine.run(asked, output_len), map(len, asked), strict=True))


def document(bench: Bench) -> list[dict]:
    """A conversation of three turns over one document of the first input length."""
    return _document_rows(bench, "document", talk)


def shared(bench: Bench) -> list[dict]:
    """Three requests, one after another, on one document of the first input length."""
    return _document_rows(bench, "shared", ask_each)


def _document_rows(bench: Bench, scenario: str, job: Callable) -> list[dict]:
    """A row per turn (request) of `job`, and one of their summed TTFT; each with the share
    of answers that hold the magic number asked for."""
    args, turns = bench.args, len(NEEDLE_DEPTHS)
    ttft = [{e: [] for e in ENGINES} for _ in range(turns)]
    correct = [dict.fromkeys(ENGINES, 0) for _ in range(turns)]
    lengths = [[] for _ in range(turns)]
    for repeat in range(args.repeats):
        doc = bench.prompts.document(args.input_lens[0])
        for name, answered in interleaved(bench.made, repeat, job, doc, args.output_len).items():
            for i, (request, turn_len) in enumerate(answered):
                ttft[i][name].append(request.ttft)
                correct[i][name] += doc.values[i] in request.text
                lengths[i].append(turn_len)
    rows = []
    for i in range(turns):
        rows.append(ratio_row(f"{scenario} turn {i + 1}", args.input_lens[0], lengths[i], "ttft",
                              ttft[i]))  # fmt: skip
        rows[-1] |= {f"accuracy_{e}": f"{correct[i][e]}/{args.repeats}" for e in ENGINES}
    summed = {e: [sum(t[e][r] for t in ttft) for r in range(args.repeats)] for e in ENGINES}
    rows.append(ratio_row(f"{scenario} sum", args.input_lens[0], lengths[-1], "ttft", summed))
    return rows


def cached_part(engine: Engine, ids: list[int], share: float) -> Request:
    """The first `share` of `ids` answered unpruned (so it is cached), then `ids`' first token."""
    engine.run([ids[: int(share * len(ids))]], 1, extra_args={"uniprefill_enabled": False})
    return first_token(engine, ids)


def partial(bench: Bench) -> list[dict]:
    """Per --cached-shares: a prompt of the first input length whose first part is cached."""
    args, rows = bench.args, []
    for share in args.cached_shares:
        ttft, lengths = {e: [] for e in ENGINES}, []
        for repeat in range(args.repeats):
            (ids,), _ = bench.prompts.take(args.input_lens[0], 1)
            for name, request in interleaved(bench.made, repeat, cached_part, ids, share).items():
                ttft[name].append(request.ttft)
            lengths.append(len(ids))
        rows.append(ratio_row(f"partial {share:.2f} cached", args.input_lens[0], lengths, "ttft",
                              ttft))  # fmt: skip
    return rows


SCENARIOS = {
    "fresh": fresh,
    "short": short,
    "conversation": conversation,
    "decode": decode,
    "growing": growing,
    "document": document,
    "shared": shared,
    "partial": partial,
}


# ---- report ----------------------------------------------------------------------------------


def _speedup(r: dict) -> str:
    return f"{r['speedup']:.2f}x [{r['speedup_min']:.2f}-{r['speedup_max']:.2f}]"


def print_fresh(rows: list[dict]) -> None:
    head = ("len", "conc", "reqs", "TTFT base med/p90 s", "TTFT uni med/p90 s",
            "speedup [min-max]", "ideal", "decode tok/s base/uni", "passkey base/uni",
            f"same first {AGREEMENT_TOKENS} tokens")  # fmt: skip
    print(" | ".join(head))
    for r in rows:
        print(f"{r['input_len']} | {r['concurrency']} | {r['requests']} | "
              f"{r['ttft_median_baseline']:.2f}/{r['ttft_p90_baseline']:.2f} | "
              f"{r['ttft_median_uniprefill']:.2f}/{r['ttft_p90_uniprefill']:.2f} | "
              f"{_speedup(r)} | {r['ideal_speedup']:.2f}x | "
              f"{r['decode_tps_baseline']:.1f}/{r['decode_tps_uniprefill']:.1f} | "
              f"{r['accuracy_baseline']} / {r['accuracy_uniprefill']} | "
              f"{r['same_first_tokens']}", flush=True)  # fmt: skip


def print_ratios(rows: list[dict]) -> None:
    print("scenario | len | repeats | median base | median uni | speedup [min-max]")
    for r in rows:
        decode = r["scenario"] == "decode"
        metric, unit = ("decode_tps_median", " tok/s") if decode else ("ttft_median", "s TTFT")
        print(
            f"{r['scenario']} | {r['input_len']} | {r['repeats']} | "
            f"{r[f'{metric}_baseline']:.3f}{unit} | {r[f'{metric}_uniprefill']:.3f}{unit} | "
            f"{_speedup(r)}",
            flush=True,
        )


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for conc in sorted({r["concurrency"] for r in rows}):
        sub = [r for r in rows if r["concurrency"] == conc]
        lens = [r["target_len"] for r in sub]  # measured lengths differ a little per setting
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


BASELINES = {
    "stock": "vLLM's defaults in both engines (what users compare)",
    "matched": "both eager, no prefix caching, whole prompt in one step "
    "(a mechanism view, not what users run)",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--input-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--requests", type=int, help="per fresh setting and repeat (default: the concurrency)"
    )
    parser.add_argument("--mode", choices=["offline", "serve"], default="offline")
    parser.add_argument("--baseline", choices=list(BASELINES), default="stock")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved, per scenario")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--short-len", type=int, default=512)
    parser.add_argument("--decode-len", type=int, default=128)
    parser.add_argument("--warm-up-lens", type=int, nargs="+", help="default: every length")
    parser.add_argument("--cached-shares", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--corpus", choices=["passkey", "code"], default="passkey")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--uniprefill", default="{}", help="UniPrefill settings, JSON")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="per engine")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="both engines")
    parser.add_argument("--server-logs", default=str(RESULTS / "ttft-servers"))
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="write a PNG plot of the fresh rows here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tp = args.tensor_parallel_size  # offline engines read the same environment as servers
    os.environ.update(serve.serve_env(args.kv_cache_gib, tensor_parallel_size=tp))
    path = str(models.prepare(args.model))
    from transformers import AutoConfig, AutoTokenizer

    from uniprefill.families import layer_types

    tokenizer = AutoTokenizer.from_pretrained(path)
    model_config = AutoConfig.from_pretrained(path)
    text_config = getattr(model_config, "text_config", model_config)
    settings = UniPrefillConfig.from_dict(json.loads(args.uniprefill))
    resolved = settings.resolve(layer_types(text_config))
    longest = max(*args.input_lens, args.short_len) * 11 // 10  # prompts land within ~5%
    max_len = longest + max(args.output_len + QUESTION_TOKENS, args.decode_len)
    max_len = min(max_len, text_config.max_position_embeddings)  # 32K prompts on a 32K model
    per_engine = engine_args(args.baseline, args.dtype, max_len, resolved.to_dict(), tp)
    meta = {
        "model": args.model,
        "mode": args.mode,
        "baseline": args.baseline,
        "baseline_means": BASELINES[args.baseline],
        "dtype": args.dtype,
        "corpus": args.corpus,
        "uniprefill": resolved.to_dict(),
        "engine_args": per_engine,
        "argv": sys.argv,
        "machine": machine(),
        "vllm_platform": vllm_platform(),
    }
    rows = []
    with engines(args.mode, path, per_engine, Path(args.server_logs)) as made:
        meta["effective"] = {name: engine.config() for name, engine in made.items()}
        for key, value in meta.items():
            print(f"# {key}: {value}", flush=True)
        drops, depth = list(resolved.drop_layers), text_config.num_hidden_layers
        bench = Bench(made, Prompts(tokenizer, args.corpus), args, drops, depth)
        meta["warm_up_ttft"] = warm_up(bench)
        print(f"# warm-up TTFT s, one prompt per length: {meta['warm_up_ttft']}", flush=True)
        for name, scenario in SCENARIOS.items():
            if name in args.scenarios:
                rows += scenario(bench)
    fresh_rows = [r for r in rows if r["scenario"] == "fresh"]
    print()
    print(f"# {args.baseline} baseline: {BASELINES[args.baseline]}")
    if fresh_rows:
        print_fresh(fresh_rows)
    if len(fresh_rows) < len(rows):
        print_ratios([r for r in rows if r["scenario"] != "fresh"])
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.plot and fresh_rows:
        plot(fresh_rows, args.plot, f"{args.model} ({args.mode}, {args.baseline} baseline)")


def vllm_platform() -> str:
    """The platform class vLLM runs on here (CpuPlatform, or ZenCpuPlatform on AMD Zen)."""
    from vllm.platforms import current_platform

    return type(current_platform).__name__


if __name__ == "__main__":
    main()
