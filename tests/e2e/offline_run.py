"""Run one offline vLLM engine in this (fresh) process and print its results as one JSON line.

usage: python offline_run.py MODEL_DIR MODE PROMPTS_JSON [DTYPE]
MODE: "plain" (no UniPrefill settings) or "enabled" (additional_config={"uniprefill": {}}).
DTYPE defaults to float32 (Qwen3-Next needs bfloat16: vLLM's CPU GDN kernels require it).
Whether the plugin is loaded at all is the caller's choice, through VLLM_PLUGINS.
"""

import json
import os
import sys

from vllm import LLM, SamplingParams

if __name__ == "__main__":
    model, mode, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    dtype = sys.argv[4] if len(sys.argv) > 4 else "float32"
    extra = {"additional_config": {"uniprefill": {}}} if mode == "enabled" else {}
    llm = LLM(model=model, dtype=dtype, max_model_len=4096, enforce_eager=True, **extra)
    try:
        greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        outputs = llm.generate(prompts, greedy)
        result = {
            "main_pid": os.getpid(),
            "plugin_imported_in_main": "uniprefill.plugin" in sys.modules,
            "tokens": [list(out.outputs[0].token_ids) for out in outputs],
        }
        if mode == "enabled":
            result["workers"] = llm.collective_rpc("uniprefill_status")
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()
