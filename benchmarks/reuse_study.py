"""Would reusing a pruned first turn's compacted KV answer a follow-up about another part of the
document? Reference path (HF), on ttft.py's documents: code with a magic number at each of
NEEDLE_DEPTHS; turn 1 asks for the first, each follow-up (a second turn after turn 1's answer)
for another.

Per document: turn 1 pruned (what the default settings keep); per follow-up, whether the asked
number's tokens survive every drop of turn 1 (the cheap proxy), and the follow-up's answer when
  unpruned: the "fill" option's second turn (stock vLLM's answer),
  reused: turn 1's kept tokens plus everything after its prompt, i.e. the follow-up computed
    over turn 1's compacted KV (`reference.generate(keep_positions=...)`),
  pruned: the "prune" option's second turn (a fresh selection for the new question).

    python benchmarks/reuse_study.py --length 8192 --documents 4 --json reuse.json
"""

from __future__ import annotations

import argparse
import json

import torch
from machine import machine
from transformers import AutoModelForCausalLM, AutoTokenizer
from ttft import NEEDLE_DEPTHS, Prompts

from uniprefill import models
from uniprefill.config import UniPrefillConfig
from uniprefill.families import layer_types
from uniprefill.reference import generate

MODES = ("unpruned", "reused", "pruned")


def positions_of(ids: list[int], part: list[int]) -> list[int]:
    """The positions of `part`'s only occurrence in `ids`."""
    starts = [i for i in range(len(ids) - len(part) + 1) if ids[i : i + len(part)] == part]
    if len(starts) != 1:
        raise ValueError(f"{len(starts)} occurrences of the value's tokens in the prompt")
    return list(range(starts[0], starts[0] + len(part)))


def study(model, tokenizer, doc, config, output_len: int, modes: list[str]) -> list[dict]:
    """One row per follow-up of `doc`."""
    first_ids = doc.ask(0)
    first = generate(model, torch.tensor(first_ids), config=config, max_new_tokens=output_len)
    answer = first.tokens
    rows = []
    for i in range(1, len(doc.keys)):
        value = tokenizer(doc.values[i], add_special_tokens=False)["input_ids"]
        where = set(positions_of(first_ids, value))
        ids = doc.follow_up(i, first_ids, answer)
        after = torch.arange(len(first_ids), len(ids))
        reused = [torch.cat([kept, after]) for kept in first.kept_positions]
        options = {"unpruned": dict(config=None), "reused": dict(config=config,
                   keep_positions=reused), "pruned": dict(config=config)}  # fmt: skip
        row = {
            "asked_depth": NEEDLE_DEPTHS[i],
            "turn1_kept": first.kept_per_stage,
            "turn1_correct": doc.values[0] in tokenizer.decode(answer),
            "survives": [where <= set(kept.tolist()) for kept in first.kept_positions],
            "tokens": len(ids),
        }
        for mode in modes:
            result = generate(model, torch.tensor(ids), max_new_tokens=output_len, **options[mode])
            reply = tokenizer.decode(result.tokens, skip_special_tokens=True)
            row[mode] = {
                "correct": doc.values[i] in reply,
                "reply": reply,
                "kept": result.kept_per_stage,
                "prefill_s": result.prefill_seconds,
            }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=24)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--json", help="write every row and the summary here")
    args = parser.parse_args()

    path = models.prepare(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = UniPrefillConfig().resolve(layer_types(model.config))
    prompts = Prompts(tokenizer, corpus="code")
    rows = []
    for _ in range(args.documents):
        rows += study(model, tokenizer, prompts.document(args.length), config, args.output_len,
                      args.modes)  # fmt: skip
    summary = {
        "follow_ups": len(rows),
        "turn1_correct": sum(r["turn1_correct"] for r in rows) // (len(NEEDLE_DEPTHS) - 1),
        "survives_per_drop": [
            sum(r["survives"][d] for r in rows) for d in range(len(config.drop_layers))
        ],  # fmt: skip
        "correct": {mode: sum(r[mode]["correct"] for r in rows) for mode in args.modes},
    }
    print(f"\n{len(rows)} follow-ups over {args.documents} documents of ~{args.length} tokens")
    print(f"asked number survives each drop of turn 1: {summary['survives_per_drop']}")
    for mode in args.modes:
        print(f"{mode:9} correct {summary['correct'][mode]}/{len(rows)}")
    if args.json:
        with open(args.json, "w") as f:
            meta = {"args": vars(args), "machine": machine(), "config": str(config)}
            json.dump({"meta": meta, "summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
