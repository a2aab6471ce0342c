"""Decode step time of one request, pruning off vs on, and what UniPrefill's worker adds to it.

One UniPrefill engine, in this process; the same prompt is run with pruning off for the request
(`uniprefill_enabled: false`), then pruned. After the prefill step, every step is a decode step:
this reports their mean wall time, and the time spent in the worker's per-step planning and in
rebuilding each stage's attention metadata (timed by wrapping `Pruner.plan` and
`install_stage_metadata`). The engine runs vLLM's default compiled graph unless --eager.

    python benchmarks/decode_step.py --model qwen2.5-coder-0.5b-instruct --input-len 2048
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

from machine import machine

from uniprefill import models


def timed(spent: dict[str, float], key: str, method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--input-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--uniprefill", default="{}", help="UniPrefill settings, JSON")
    parser.add_argument("--eager", action="store_true", help="enforce_eager=True")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker runs in this process
    from vllm import LLM, SamplingParams

    from uniprefill.vllm_glue import pruner

    spent = {"plan": 0.0, "metadata": 0.0}
    pruner.Pruner.plan = timed(spent, "plan", pruner.Pruner.plan)
    pruner.install_stage_metadata = timed(spent, "metadata", pruner.install_stage_metadata)
    llm = LLM(model=str(models.prepare(args.model)), dtype=args.dtype, enforce_eager=args.eager,
              max_model_len=args.input_len + args.steps + 8, enable_prefix_caching=False,
              additional_config={"uniprefill": json.loads(args.uniprefill)})  # fmt: skip
    engine = llm.llm_engine
    prompt = [100 + (i * 7) % 5000 for i in range(args.input_len)]
    rows = []
    print("pruning | ms/step | worker planning ms/step | stage metadata ms/step")
    for pruned in (False, True):
        extra = None if pruned else {"uniprefill_enabled": False}
        params = SamplingParams(max_tokens=args.steps + 1, ignore_eos=True, extra_args=extra)
        engine.add_request(f"pruned-{pruned}", {"prompt_token_ids": prompt}, params)
        engine.step()  # the prefill
        spent.update(plan=0.0, metadata=0.0)
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        row = {"pruned": pruned, "step_ms": (time.perf_counter() - start) / steps * 1e3,
               **{f"{k}_ms": v / steps * 1e3 for k, v in spent.items()}}  # fmt: skip
        rows.append(row)
        print(f"{'on' if pruned else 'off'} | {row['step_ms']:.1f} | {row['plan_ms']:.2f} | "
              f"{row['metadata_ms']:.2f}", flush=True)  # fmt: skip
    if args.json:
        meta = {"model": args.model, "input_len": args.input_len, "uniprefill": args.uniprefill,
                "eager": args.eager, "dtype": args.dtype, "machine": machine()}  # fmt: skip
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
