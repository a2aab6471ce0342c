"""KV blocks one request holds while it decodes, unpruned and pruned, per KV-cache group.

On sliding-window hybrids (Gemma 3) vLLM frees the blocks a window no longer reaches; a pruned
request keeps them (its later stages' windows are over the compacted KV at the front of its
blocks, see docs/design/vllm-integration.md section 11). This measures that cost.

    python benchmarks/kv_blocks.py --model gemma-3-270m --input-lens 4096 8192 --json kv.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from uniprefill import models

ENGINE_ARGS = dict(dtype="float32", enforce_eager=True, enable_prefix_caching=False, seed=0)


def blocks_while_decoding(llm, prompt: list[int], pruned: bool) -> list[int]:
    """Real (non-null) blocks per KV-cache group after the prefill step and one decode step."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler  # in-process engine core
    extra = None if pruned else {"uniprefill_enabled": False}
    params = SamplingParams(max_tokens=4, ignore_eos=True, extra_args=extra)
    engine.add_request("measured", {"prompt_token_ids": prompt}, params)
    engine.step()
    engine.step()
    (req_id,) = scheduler.requests
    groups = scheduler.kv_cache_manager.coordinator.get_blocks(req_id)
    held = [sum(not block.is_null for block in blocks) for blocks in groups]
    while engine.has_unfinished_requests():
        engine.step()
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--input-lens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler lives in this process
    from vllm import LLM

    max_len = max(args.input_lens) + 64
    llm = LLM(model=str(models.prepare(args.model)), max_model_len=max_len,
              additional_config={"uniprefill": {}}, **ENGINE_ARGS)  # fmt: skip
    rows = []
    print("tokens | blocks per group unpruned | pruned | total unpruned / pruned")
    for length in args.input_lens:
        prompt = [100 + i % 5000 for i in range(length)]
        unpruned = blocks_while_decoding(llm, prompt, pruned=False)
        pruned = blocks_while_decoding(llm, prompt, pruned=True)
        rows.append({"input_len": length, "unpruned": unpruned, "pruned": pruned})
        print(f"{length} | {unpruned} | {pruned} | {sum(unpruned)} / {sum(pruned)} "
              f"({sum(pruned) / sum(unpruned):.1f}x)", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
