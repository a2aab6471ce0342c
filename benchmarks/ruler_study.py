"""Accuracy and prefill speed of UniPrefill settings on RULER-style tasks (reference path, HF).

Baseline (no pruning) and every setting see the same prompts, greedy. Per setting it reports the
accuracy per task, how often the answer tokens survive each drop stage, the kept tokens per
stage, the ideal speedup (baseline token-layers / pruned token-layers) and the measured prefill
speedup of the reference path, all from one run.

    python benchmarks/ruler_study.py --lengths 2048 4096 8192 --p 0.9 0.95 0.99 \\
        --drop-sets 6,10,14,18 3,7,11,15,19 --last-q 16 64 128 --json study.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections import defaultdict

import torch
from ruler_tasks import TASKS, Sample, make_sample
from transformers import AutoModelForCausalLM, AutoTokenizer

from uniprefill import models
from uniprefill.config import UniPrefillConfig
from uniprefill.families import layer_types
from uniprefill.reference import generate

WORDS_PER_TOKEN = 0.75  # English prose with this tokenizer, to size the haystack


def encode(tokenizer, sample: Sample) -> tuple[torch.Tensor, list[int]]:
    """Prompt ids and the token positions of every answer string inside the needles."""
    text = tokenizer.apply_chat_template(
        sample.messages, tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    spans = []
    for needle in sample.needles:
        at = text.find(needle)
        for answer in sample.answers:
            if (rel := needle.find(answer)) >= 0:
                spans.append((at + rel, at + rel + len(answer)))
    answer_tokens = [
        i
        for i, (lo, hi) in enumerate(enc["offset_mapping"])
        if any(lo < e and s < hi for s, e in spans)
    ]
    return torch.tensor(enc["input_ids"]), answer_tokens


def run_sample(model, tokenizer, ids, answer_tokens, sample, config) -> dict:
    result = generate(model, ids, config=config, max_new_tokens=24)
    reply = tokenizer.decode(result.tokens, skip_special_tokens=True)
    answers = set(answer_tokens)
    return {
        "correct": all(a in reply for a in sample.answers),
        "answer_survives": [answers <= set(p.tolist()) for p in result.kept_positions],
        "kept": result.kept_per_stage,
        "token_layers": sum(result.layer_tokens),
        "prefill_s": result.prefill_seconds,
        "reply": reply,
    }


NORMALIZE = {"all": "all_blocks", "unforced": "unforced_blocks"}


def parse_setting(spec: str, kinds: list[str]) -> UniPrefillConfig:
    """`DROPS/P/LAST_Q/all|unforced`, e.g. `6,10,14,18/0.99/128/all` (the paper's rule), or a
    JSON object of UniPrefill settings as an engine takes them, e.g. `{"preset": "fast"}`."""
    if spec.startswith("{"):
        config = UniPrefillConfig.from_dict({"min_prompt_len": 0, **json.loads(spec)})
        return config.resolve(kinds)
    drops, p, last_q, norm = spec.split("/")
    layers = tuple(int(x) for x in drops.split(","))
    return UniPrefillConfig(
        p=float(p),
        last_q=int(last_q),
        drop_layers=layers,
        normalize_over=NORMALIZE[norm],
        min_prompt_len=0,
    )


def settings(args, kinds: list[str]) -> dict[str, UniPrefillConfig | None]:
    specs = args.settings or [
        "/".join(map(str, combo))
        for combo in itertools.product(args.drop_sets, args.p, args.last_q, args.normalize_over)
    ]
    return {"baseline": None} | {spec: parse_setting(spec, kinds) for spec in specs}


def summarize(name: str, runs: list[dict], baseline: list[dict]) -> dict:
    by_task = defaultdict(list)
    for run in runs:
        by_task[run["task"]].append(run["correct"])
    stages = len(runs[0]["kept"])
    return {
        "setting": name,
        "accuracy": {t: f"{sum(v)}/{len(v)}" for t, v in by_task.items()},
        "answer_survives": [
            statistics.mean(r["answer_survives"][s] for r in runs) for s in range(stages - 1)
        ],
        "kept_mean": [statistics.mean(r["kept"][s] for r in runs) for s in range(stages)],
        "ideal_speedup": statistics.mean(
            b["token_layers"] / r["token_layers"] for r, b in zip(runs, baseline, strict=True)
        ),
        "measured_speedup": statistics.mean(
            b["prefill_s"] / r["prefill_s"] for r, b in zip(runs, baseline, strict=True)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--samples", type=int, default=1, help="seeds per task/length/depth")
    parser.add_argument("--p", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument("--drop-sets", nargs="+", default=["6,10,14,18", "3,7,11,15,19"])
    parser.add_argument("--last-q", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--normalize-over", nargs="+", default=["all"], choices=list(NORMALIZE))
    parser.add_argument(
        "--settings",
        nargs="+",
        help="explicit DROPS/P/LAST_Q/all|unforced or JSON settings list (overrides the grid)",
    )
    parser.add_argument("--json", help="write every run and the summary here")
    args = parser.parse_args()

    path = models.prepare(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    grid = settings(args, layer_types(model.config))
    runs: dict[str, list[dict]] = defaultdict(list)
    cases = itertools.product(args.tasks, args.lengths, args.depths, range(args.samples))
    for task, length, depth, seed in cases:
        sample = make_sample(task, seed, int(length * WORDS_PER_TOKEN), depth)
        ids, answer_tokens = encode(tokenizer, sample)
        for name, config in grid.items():
            run = run_sample(model, tokenizer, ids, answer_tokens, sample, config)
            run.update(task=task, tokens=len(ids), depth=depth, seed=seed)
            runs[name].append(run)
            print(f"{name:32} {task:10} {len(ids):6} d={depth} ok={run['correct']} "
                  f"kept={run['kept']} {run['prefill_s']:.1f}s {run['reply'][:40]!r}",
                  flush=True)  # fmt: skip
    summary = [summarize(name, rs, runs["baseline"]) for name, rs in runs.items()]
    print("\nsetting | accuracy per task | answer survives per stage | kept per stage | "
          "ideal x | measured x")  # fmt: skip
    for row in summary:
        print(f"{row['setting']} | {row['accuracy']} | "
              f"{[round(x, 2) for x in row['answer_survives']]} | "
              f"{[round(x) for x in row['kept_mean']]} | {row['ideal_speedup']:.2f} | "
              f"{row['measured_speedup']:.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
