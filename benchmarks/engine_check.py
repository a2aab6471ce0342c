"""The vLLM engine against the reference path on the real-text suite's prompts: does the engine
keep what `uniprefill.reference` keeps, stage by stage, on the embedded model and real text?

One UniPrefill engine (offline `LLM`, vLLM's defaults otherwise: compiled, chunked, prefix
cache) with the default settings; each prompt is sent once per preset (`uniprefill_preset` per
request: the presets that differ from the defaults only in p) and run through the reference path
with the same settings. At each drop layer the engine's keep count must lie within the rounding
margin of the reference's block masses (`uniprefill.ops.select.margin`); once a drop may have
gone either way, later drops score other tokens and are compared by their relative difference
only.

    python engine_check.py --lengths 4096 8192 --seeds 0-4 --json results/engine_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from machine import machine
from policy_study import parse_seeds
from realtext_tasks import TASKS, locate, sample_of_length
from transformers import AutoModelForCausalLM, AutoTokenizer
from ttft import OfflineEngine
from vllm import SamplingParams

from uniprefill import models
from uniprefill.config import UniPrefillConfig
from uniprefill.families import layer_types
from uniprefill.ops.select.margin import MASS_TOLERANCE, drop_bounds
from uniprefill.reference import generate
from uniprefill.requests import paragraph_breaks, scoring_queries


def compare(engine_kept: list[int], ref, config: UniPrefillConfig, queries: int, tol: float):
    """Identical counts? Inside the margin's bounds at every drop it compares (margin.drop_bounds)?
    And the largest relative difference overall."""
    bounds = drop_bounds(
        engine_kept, ref.kept_per_stage, ref.block_scores,
        p=config.p, rule=config.rule, tolerance=tol, queries=queries,
    )  # fmt: skip
    diff = max(abs(e - r) / r for e, r in zip(engine_kept, ref.kept_per_stage, strict=True))
    return {
        "identical": engine_kept == ref.kept_per_stage,
        "drops_checked": len(bounds),
        "within_margin": all(fewest <= kept <= most for fewest, most, kept in bounds),
        "max_rel_diff": round(diff, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtype", default="float32", choices=sorted(MASS_TOLERANCE))
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--seeds", default="0-2", help="a range, e.g. 0-4 (per task)")
    parser.add_argument("--presets", nargs="+", default=["default", "fast"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    path = models.prepare(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = []
    for length in args.lengths:
        for seed in parse_seeds(args.seeds):
            for task in args.tasks:
                sample = sample_of_length(tokenizer, task, seed, length)
                if sample is not None:
                    prompts.append((f"{length} {task} {seed}", locate(tokenizer, sample)[0]))

    dtype = args.dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    types = layer_types(model.config)
    configs = {p: UniPrefillConfig.from_dict({"preset": p}).resolve(types) for p in args.presets}
    breaks = paragraph_breaks(str(path), None, False)
    engine = OfflineEngine(
        str(path),
        dict(dtype=dtype, max_model_len=max(len(ids) for _, ids in prompts) + 16, seed=0,
             additional_config={"uniprefill": {}}),
    )  # fmt: skip
    rows = []
    try:
        for name, ids in prompts:
            for preset, config in configs.items():
                engine.new_kept_counts()
                params = SamplingParams(max_tokens=1, extra_args={"uniprefill_preset": preset})
                # a salt per preset: a repeated prompt would read the prefix cache, not prune
                prompt = {"prompt_token_ids": ids, "cache_salt": preset}
                engine.llm.generate([prompt], params, use_tqdm=False)
                (engine_kept,) = engine.new_kept_counts()
                ref = generate(
                    model, torch.tensor(ids), config=config, max_new_tokens=1, breaks=breaks
                )
                queries = scoring_queries(config, ids, breaks)
                row = {"prompt": name, "preset": preset, "engine_kept": engine_kept,
                       "reference_kept": ref.kept_per_stage}  # fmt: skip
                row |= compare(engine_kept, ref, config, queries, MASS_TOLERANCE[dtype])
                rows.append(row)
                print(f"{name:16} {preset:8} identical={row['identical']} "
                      f"inside={row['within_margin']} "
                      f"checked={row['drops_checked']} diff={row['max_rel_diff']:.3f}  "
                      f"engine {engine_kept} reference {ref.kept_per_stage}",
                      flush=True)  # fmt: skip
    finally:
        engine.close()
    inside, same = (sum(r[k] for r in rows) for k in ("within_margin", "identical"))
    print(f"{len(rows)} runs: {same} identical at every stage, {inside} within the margin at "
          f"every drop checked; largest relative difference "
          f"{max(r['max_rel_diff'] for r in rows):.3f}")  # fmt: skip
    if args.json:
        meta = {"machine": machine(), "python": platform.python_version(), "dtype": dtype,
                "argv": vars(args)}  # fmt: skip
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
