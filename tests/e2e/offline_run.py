"""Run one offline vLLM engine in this (fresh) process and print its results as one JSON line.

usage: python offline_run.py MODEL_DIR MODE PROMPTS_JSON [DTYPE [SETTINGS_JSON]]
MODE: "plain" (no UniPrefill settings) or "enabled" (additional_config={"uniprefill": SETTINGS},
default {}). PROMPTS_JSON: a list of prompts as `LLM.generate` takes them (strings, or
{"prompt_token_ids": [...]}). DTYPE defaults to float32 (Qwen3-Next needs bfloat16: vLLM's CPU
GDN kernels require it). Whether the plugin is loaded at all is the caller's choice, through
VLLM_PLUGINS. With UniPrefill enabled the result also holds each prompt's keep counts (prompt,
then after each drop layer; null when it was not pruned).
"""

import json
import os
import sys

from helpers import pruning_state  # this script's folder, tests/e2e/, is on sys.path
from vllm import LLM, SamplingParams
from vllm.platforms import current_platform

if __name__ == "__main__":
    model, mode, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    dtype = sys.argv[4] if len(sys.argv) > 4 else "float32"
    settings = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    extra = {"additional_config": {"uniprefill": settings}} if mode == "enabled" else {}
    llm = LLM(model=model, dtype=dtype, max_model_len=4096, enforce_eager=True, **extra)
    try:
        greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        outputs = llm.generate(prompts, greedy)
        result = {
            "main_pid": os.getpid(),
            "plugin_imported_in_main": "uniprefill.plugin" in sys.modules,
            "platform": type(current_platform).__name__,
            "tokens": [list(out.outputs[0].token_ids) for out in outputs],
        }
        if mode == "enabled":
            result["workers"] = llm.collective_rpc("uniprefill_status")
            _, recent = pruning_state(*llm.collective_rpc("uniprefill_requests"))
            result["kept"] = [recent.get(out.request_id) for out in outputs]
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()
