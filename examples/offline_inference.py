"""Offline batch with UniPrefill on the embedded Qwen2.5-Coder-0.5B-Instruct (CPU or GPU).

python examples/offline_inference.py
"""

import os

from vllm import LLM, SamplingParams

from uniprefill import models, serve

if __name__ == "__main__":  # vLLM starts processes
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    llm = LLM(
        model=str(models.prepare("qwen2.5-coder-0.5b-instruct")),
        dtype=serve.default_dtype(),  # float32 on CPUs without native bf16
        max_model_len=8192,
        additional_config={"uniprefill": {"p": 0.99}},
    )
    try:
        conversations = [
            [{"role": "user", "content": "Write a Python function that checks for palindromes."}],
            [{"role": "user", "content": "What does `git rebase -i` do? One sentence."}],
        ]
        params = SamplingParams(temperature=0, max_tokens=96)
        for output in llm.chat(conversations, params):
            print("-" * 60)
            print(output.outputs[0].text)
    finally:
        llm.llm_engine.engine_core.shutdown()  # on CPU a worker process otherwise outlives us
