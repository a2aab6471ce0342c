"""Selection policies on the real-text suite (`realtext_tasks.py`): which ones keep the answer,
and how much they prune. Reference path (transformers), embedded model, CPU.

Per prompt, once: the question alone (closed book; a prompt it answers right is dropped), then
the unpruned prompt, greedy, capturing every candidate drop layer's queries and keys (a prompt
it answers wrong is dropped). Every policy is then scored on those captures without running the
model again (the sweep): at each drop layer its scoring queries attend over the tokens the
policy still keeps (a softmax over a subset of keys is the full softmax renormalised, so this is
exact but for the kept tokens' hidden states, which pruning shifts slightly). Per policy and
prompt it records whether every evidence token survives each stage, the tokens kept per stage
and the token-layer ideal. `--finalists` then runs those configs pruned, for real, and checks
their answers: the paired loss.

Results go to a JSON-lines file, one line per prompt, so an interrupted run resumes:

    python policy_study.py --lengths 4096 --seeds 0-59 --out results/policy_4k.jsonl
    python policy_study.py --report results/policy_4k.jsonl --json results/policy_4k.json \\
        --plot results/policy_front.png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from machine import machine
from realtext_tasks import TASKS, locate, prompt_ids, sample_of_length
from transformers import AutoModelForCausalLM, AutoTokenizer

from uniprefill import models
from uniprefill.accounting import token_layers
from uniprefill.config import UniPrefillConfig
from uniprefill.ops.select.common import keep_from_block_scores
from uniprefill.ops.select.oracle import token_scores_oracle
from uniprefill.ops.select.rule import SelectionRule
from uniprefill.reference import generate
from uniprefill.requests import ParagraphBreaks, paragraph_breaks, scoring_queries

SINK = 128
FLOOR = 512  # a keep-share cap never keeps fewer tokens than this
MAX_NEW_TOKENS = {"methods": 48}  # other tasks: 16


@dataclass(frozen=True)
class Policy:
    """`d6,10,14,18/p0.99/q16/b64[/s0.6,0.4][/acc][/re]`: drop layers; top-p per stage (the last
    value repeats); scoring queries (the last N, or `qq`: the question's own tokens and what
    follows them); block size; optional cap on the kept share of the prompt per stage (floor
    FLOOR tokens); `acc`: scores summed over the drop layers so far; `re`: select once, then
    rerun every layer on the kept tokens (GemFilter's scheme; one drop layer)."""

    spec: str
    drops: tuple[int, ...]
    p: tuple[float, ...]
    queries: int | None  # None: the question's tokens
    block: int
    shares: tuple[float, ...] = ()
    accumulate: bool = False
    recompute: bool = False

    @classmethod
    def parse(cls, spec: str) -> Policy:
        fields = {part[0] if part[0] in "dpqbs" else part: part for part in spec.split("/")}
        nums = {k: [float(x) for x in v[1:].split(",")] for k, v in fields.items() if k in "dpbs"}
        policy = cls(
            spec=spec,
            drops=tuple(int(x) for x in nums["d"]),
            p=tuple(nums["p"]),
            queries=None if fields["q"] == "qq" else int(fields["q"][1:]),
            block=int(nums["b"][0]),
            shares=tuple(nums.get("s", ())),
            accumulate="acc" in fields,
            recompute="re" in fields,
        )
        if policy.recompute and len(policy.drops) != 1:
            raise ValueError(f"{spec}: select-then-recompute takes one drop layer")
        return policy

    def stage(self, values: tuple[float, ...], i: int) -> float | None:
        return values[min(i, len(values) - 1)] if values else None


def default_grid() -> list[str]:
    """The sweep: the current default and the paper's layers, earlier first drops with a gentle
    first cut, more drop layers, keep caps, question scoring, accumulation, smaller blocks and
    select-then-recompute."""
    drop_sets = {
        "auto": "6,10,14,18",
        "early4": "4,8,12,16,20",
        "early3": "3,6,9,12,15,18",
        "early2": "2,5,8,11,14,17,20",
    }
    grid = []
    for drops in drop_sets.values():
        for p in ("0.99", "0.98", "0.95", "0.999,0.99", "0.999,0.98", "0.995,0.95"):
            for q in ("q16", "qq"):
                grid.append(f"d{drops}/p{p}/{q}/b64")
        for shares in ("0.7,0.5,0.4,0.3", "0.6,0.4,0.3,0.2", "0.8,0.5,0.3,0.2,0.15"):
            for p in ("1", "0.99"):
                grid.append(f"d{drops}/p{p}/qq/b64/s{shares}")
        for extra in ("b32", "b16"):
            grid.append(f"d{drops}/p0.99/qq/{extra}")
        grid.append(f"d{drops}/p0.99/qq/b64/acc")
        grid.append(f"d{drops}/p0.98/qq/b64/acc")
    for layer in (2, 3, 4, 6):
        for p in ("0.95", "0.9", "0.8"):
            grid.append(f"d{layer}/p{p}/qq/b64/re")
        grid.append(f"d{layer}/p1/qq/b64/s0.3/re")
    return grid


def sweep(policy: Policy, captures, n: int, question: int, depth: int) -> dict:
    """One policy on one prompt's captures (`question`: its question's tokens, as the engine's
    `queries: "question"` counts them): kept positions per stage and the ideal."""
    tail = question if policy.queries is None else policy.queries
    rows = torch.arange(n - tail, n)
    rule = SelectionRule(block_size=policy.block, sink=SINK, last_q=tail)
    kept = torch.arange(n)
    summed = torch.zeros(n)
    stages = []
    for i, layer in enumerate(policy.drops):
        q, k = captures[layer]  # [1, H, n, d]; the scoring rows are kept, at the end
        scores = token_scores_oracle(q[0, :, rows].transpose(0, 1), k[0, :, kept].transpose(0, 1))
        if policy.accumulate:
            summed[kept] += scores
            scores = summed[kept]
        m = kept.numel()
        blocks = torch.nn.functional.pad(scores, (0, -m % policy.block))
        block_scores = blocks.view(1, -1, policy.block).sum(dim=-1)
        cu = torch.tensor([0, m])
        p = policy.stage(policy.p, i)
        keep = keep_from_block_scores(
            block_scores, cu, torch.tensor([True]), p=min(p, 1.0), rule=rule
        )
        share = policy.stage(policy.shares, i)
        if share is not None:
            keep = _cap(keep, block_scores[0], max(FLOOR, int(share * n)), rule, m)
        kept = kept[keep]
        stages.append(kept)
    sizes = [n] + [s.numel() for s in stages]
    if policy.recompute:
        ran = (policy.drops[0] + 1) * n + depth * sizes[1]
    else:
        ran = token_layers(sizes, policy.drops, depth)
    return {"stages": stages, "kept": sizes, "ideal": depth * n / ran}


def _cap(keep: torch.Tensor, block_scores, budget: int, rule: SelectionRule, m: int):
    """Keep within `budget` tokens: forced tokens, then the kept blocks with the highest scores."""
    if int(keep.sum()) <= budget:
        return keep
    pos = torch.arange(m)
    forced = (pos < rule.sink) | (pos >= m - rule.last_q)
    room = budget - int(forced.sum())
    block_of = pos // rule.block_size
    candidate = torch.zeros(block_scores.numel(), dtype=torch.bool)
    candidate[block_of[keep & ~forced]] = True
    order = torch.argsort(block_scores.masked_fill(~candidate, -1.0), descending=True, stable=True)
    sizes = torch.bincount(block_of[~forced], minlength=block_scores.numel())[order]
    chosen = order[(torch.cumsum(sizes, 0) <= room) & candidate[order]]
    chosen_mask = torch.zeros_like(candidate)
    chosen_mask[chosen] = True
    return forced | chosen_mask[block_of]


QUESTION = UniPrefillConfig(queries="question")  # how `qq` counts a prompt's question


def question_breaks(model) -> ParagraphBreaks:
    return paragraph_breaks(model.config._name_or_path, None, False)


def reply_of(tokenizer, result) -> str:
    """The reply up to its first special token (the end of the turn)."""
    special = set(tokenizer.all_special_ids)
    end = next((i for i, t in enumerate(result.tokens) if t in special), len(result.tokens))
    return tokenizer.decode(result.tokens[:end])


def measure_prompt(model, tokenizer, task: str, seed: int, length: int, policies) -> dict | None:
    sample = sample_of_length(tokenizer, task, seed, length)
    if sample is None:
        return None
    row = {"task": task, "seed": seed, "length": length, "corpus": sample.corpus}
    new = MAX_NEW_TOKENS.get(task, 16)
    closed = generate(
        model, torch.tensor(prompt_ids(tokenizer, sample.closed_book)), config=None,
        max_new_tokens=new,
    )  # fmt: skip
    row["closed_book_right"] = sample.correct(reply_of(tokenizer, closed))
    if row["closed_book_right"]:
        return row
    ids, evidence = locate(tokenizer, sample)
    question = scoring_queries(QUESTION, ids, question_breaks(model))
    layers = frozenset(d for p in policies for d in p.drops)
    start = time.perf_counter()
    full = generate(model, torch.tensor(ids), config=None, max_new_tokens=new, capture=layers)
    row.update(
        tokens=len(ids),
        depth=round(sample.depth, 3),
        question_tokens=question,
        unpruned_reply=reply_of(tokenizer, full),
        unpruned_right=sample.correct(reply_of(tokenizer, full)),
        unpruned_s=round(time.perf_counter() - start, 1),
    )
    if not row["unpruned_right"]:
        return row
    depth = model.config.num_hidden_layers
    needed = torch.tensor(evidence)
    row["policies"] = {}
    for policy in policies:
        out = sweep(policy, full.captured, len(ids), question, depth)
        row["policies"][policy.spec] = {
            "survives": [bool(torch.isin(needed, s).all()) for s in out["stages"]],
            "kept": out["kept"],
            "ideal": round(out["ideal"], 4),
        }
    return row


def run_finalist(model, tokenizer, row: dict, spec: str) -> dict:
    """The policy run for real (reference path, pruned), answer checked."""
    policy = Policy.parse(spec)
    if policy.shares or policy.accumulate or policy.recompute or len(set(policy.p)) > 1:
        raise ValueError(f"{spec}: not a setting the engine has yet")
    sample = sample_of_length(tokenizer, row["task"], row["seed"], row["length"])
    ids, evidence = locate(tokenizer, sample)
    queries = {"queries": "question"} if policy.queries is None else {"last_q": policy.queries}
    config = UniPrefillConfig(
        p=policy.p[0], block_size=policy.block, sink=SINK, drop_layers=policy.drops,
        min_prompt_len=0, **queries,
    )  # fmt: skip
    result = generate(
        model, torch.tensor(ids), config=config, max_new_tokens=MAX_NEW_TOKENS.get(row["task"], 16),
        breaks=question_breaks(model),
    )  # fmt: skip
    needed = torch.tensor(evidence)
    return {
        "right": sample.correct(reply_of(tokenizer, result)),
        "survives": [bool(torch.isin(needed, s).all()) for s in result.kept_positions],
        "kept": result.kept_per_stage,
        "ideal": len(result.layer_tokens) * len(ids) / sum(result.layer_tokens),
        "reply": reply_of(tokenizer, result),
    }


def parse_seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a rate k/n (Wilson score)."""
    if n == 0:
        return 0.0, 1.0
    phat = k / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def lost_by_task(valid: list[dict], spec: str) -> dict[str, list[int]]:
    """Per task: [answers lost, prompts answered] by a finalist."""
    out: dict[str, list[int]] = {}
    for r in valid:
        final = r.get("finalists", {}).get(spec)
        if final is not None:
            lost, n = out.get(r["task"], [0, 0])
            out[r["task"]] = [lost + (not final["right"]), n + 1]
    return out


def report(rows: list[dict]) -> dict:
    """Per length and policy: prompts, evidence lost at the last stage (with its interval), mean
    ideal, mean kept per stage; and the finalists' paired answer loss and the ideal of their
    pruned runs."""
    out = {}
    for length in sorted({r["length"] for r in rows}):
        valid = [r for r in rows if r["length"] == length and "policies" in r]
        if not valid:
            continue
        drawn = [r for r in rows if r["length"] == length]
        table = []
        for spec in valid[0]["policies"]:
            runs = [r["policies"][spec] for r in valid if spec in r["policies"]]
            lost = sum(not run["survives"][-1] for run in runs)
            entry = {
                "policy": spec,
                "prompts": len(runs),
                "evidence_lost": lost,
                "lost_ci95": wilson(lost, len(runs)),
                "ideal": statistics.mean(run["ideal"] for run in runs),
                "kept": [
                    round(statistics.mean(k)) for k in zip(*(r["kept"] for r in runs), strict=True)
                ],
            }
            pairs = [(r["policies"][spec], r["finalists"][spec]) for r in valid
                     if spec in r.get("finalists", {})]  # fmt: skip
            if pairs:
                wrong = sum(not real["right"] for _, real in pairs)
                entry.update(
                    answered=len(pairs),
                    answer_lost=wrong,
                    answer_lost_ci95=wilson(wrong, len(pairs)),
                    # the pruned run's own evidence survival, and how often the sweep said so
                    evidence_lost_pruned=sum(not real["survives"][-1] for _, real in pairs),
                    sweep_agrees=sum(
                        swept["survives"][-1] == real["survives"][-1] for swept, real in pairs
                    ),
                    lost_with_evidence=sum(
                        not real["right"] and real["survives"][-1] for _, real in pairs
                    ),
                    answer_lost_by_task=lost_by_task(valid, spec),
                    ideal_pruned=statistics.mean(real["ideal"] for _, real in pairs),
                )
            table.append(entry)
        swept, unswept = set(valid[0]["policies"]), []
        for spec in sorted({f for r in valid for f in r.get("finalists", {})} - swept):
            finals = [r["finalists"][spec] for r in valid if spec in r.get("finalists", {})]
            wrong = sum(not f["right"] for f in finals)
            unswept.append({  # not in the sweep: answers and the pruned runs' own figures only
                "policy": spec,
                "answered": len(finals),
                "answer_lost": wrong,
                "answer_lost_ci95": wilson(wrong, len(finals)),
                "evidence_lost_pruned": sum(not f["survives"][-1] for f in finals),
                "lost_with_evidence": sum(not f["right"] and f["survives"][-1] for f in finals),
                "answer_lost_by_task": lost_by_task(valid, spec),
                "ideal_pruned": statistics.mean(f["ideal"] for f in finals),
            })  # fmt: skip
        out[length] = {
            "drawn": len(drawn),
            "closed_book_right": sum(r["closed_book_right"] for r in drawn),
            "unpruned_wrong": sum(r.get("unpruned_right") is False for r in drawn),
            "valid": len(valid),
            "by_task": {t: sum(r["task"] == t for r in valid) for t in TASKS},
            "policies": sorted(table, key=lambda e: (e["evidence_lost"], -e["ideal"])),
            "unswept_finalists": unswept,
        }
    return out


def pareto(table: list[dict]) -> list[dict]:
    """Policies no other beats on both evidence kept and ideal."""
    front = []
    for e in sorted(table, key=lambda e: (-e["ideal"], e["evidence_lost"])):
        if not front or e["evidence_lost"] < front[-1]["evidence_lost"]:
            front.append(e)
    return front


def print_report(summary: dict) -> None:
    for length, s in summary.items():
        print(f"\n{length} tokens: {s['drawn']} drawn, {s['closed_book_right']} right "
              f"closed-book, {s['unpruned_wrong']} wrong unpruned, {s['valid']} valid "
              f"{s['by_task']}")  # fmt: skip
        print("policy | evidence lost (95% CI) | ideal | kept per stage")
        for e in pareto(s["policies"]):
            lo, hi = e["lost_ci95"]
            print(f"{e['policy']} | {e['evidence_lost']}/{e['prompts']} ({lo:.3f}-{hi:.3f}) | "
                  f"{e['ideal']:.2f} | {e['kept']}")  # fmt: skip
        print("finalist | answers lost (95% CI) | lost with evidence kept | evidence lost "
              "(pruned run) | sweep agrees | ideal (pruned runs) | lost by task")  # fmt: skip
        for e in [x for x in s["policies"] if "answered" in x] + s["unswept_finalists"]:
            lo, hi = e["answer_lost_ci95"]
            agrees = f"{e['sweep_agrees']}/{e['answered']}" if "sweep_agrees" in e else "-"
            print(f"{e['policy']} | {e['answer_lost']}/{e['answered']} ({lo:.3f}-{hi:.3f}) | "
                  f"{e['lost_with_evidence']} | {e['evidence_lost_pruned']} | {agrees} | "
                  f"{e['ideal_pruned']:.2f} | "
                  + ", ".join(f"{t} {k}/{n}" for t, (k, n) in e["answer_lost_by_task"].items())
                  )  # fmt: skip


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for length, s in summary.items():
        xs = [e["ideal"] for e in s["policies"]]
        ys = [e["evidence_lost"] / e["prompts"] for e in s["policies"]]
        (dots,) = ax.plot(xs, ys, ".", alpha=0.35)
        front = pareto(s["policies"])
        label = f"{length} tokens ({s['valid']} prompts)"
        ax.step([e["ideal"] for e in front], [e["evidence_lost"] / e["prompts"] for e in front],
                where="post", color=dots.get_color(), label=label)  # fmt: skip
        finals = [e for e in s["policies"] if "answered" in e] + s["unswept_finalists"]
        ax.plot([e["ideal_pruned"] for e in finals],
                [e["answer_lost"] / e["answered"] for e in finals],
                "x", color=dots.get_color(), markersize=9,
                label=f"{length} tokens: answers lost, finalists run pruned")  # fmt: skip
    ax.set_xlabel("token-layer ideal speedup")
    ax.set_ylabel("share of prompts (evidence pruned; x: answer lost)")
    ax.set_title("Selection policies on real text (Qwen2.5-Coder-0.5B)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--seeds", default="0-24", help="a range, e.g. 0-24 (per task)")
    parser.add_argument("--policies", nargs="+", help="policy specs (default: the grid)")
    parser.add_argument("--finalists", nargs="+", default=[], help="specs to run pruned for real")
    parser.add_argument("--out", help="JSON-lines file of per-prompt results (appended, resumed)")
    parser.add_argument("--report", help="summarise this JSON-lines file and exit")
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--plot", help="write the Pareto plot (PNG) here")
    args = parser.parse_args()

    if args.report:
        rows = [json.loads(line) for line in Path(args.report).read_text().splitlines()]
        summary = report(rows)
        print_report(summary)
        if args.json:
            meta = {"machine": machine(), "python": platform.python_version()}
            Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
        if args.plot:
            plot(summary, args.plot)
        return

    policies = [Policy.parse(s) for s in args.policies or default_grid()]
    path = models.prepare(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    out = Path(args.out)
    rows = {}
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            rows[(r["length"], r["task"], r["seed"])] = r
    for length in args.lengths:
        for seed in parse_seeds(args.seeds):
            for task in args.tasks:
                key = (length, task, seed)
                row = rows.get(key)
                if row is None:
                    row = measure_prompt(model, tokenizer, task, seed, length, policies)
                    if row is None:
                        continue
                    row.update(dtype=args.dtype, python=platform.python_version())
                if "policies" in row:
                    for spec in args.finalists:
                        row.setdefault("finalists", {})
                        if spec not in row["finalists"]:
                            row["finalists"][spec] = run_finalist(model, tokenizer, row, spec)
                rows[key] = row
                out.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
                lost = [s for s, v in row.get("policies", {}).items() if not v["survives"][-1]]
                reply = " ".join(row.get("unpruned_reply", "").split())[:40]
                print(f"{length} {task:8} seed {seed:3} closed={row['closed_book_right']} "
                      f"right={row.get('unpruned_right')} {row.get('unpruned_s', '-')}s "
                      f"lost by {len(lost)}/{len(policies)} "
                      f"{reply!r}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
