"""Offline batch with UniPrefill on the embedded Qwen2.5-Coder-0.5B-Instruct (CPU or GPU).

python examples/offline_inference.py

A long prompt (a whole Python module plus a question) is pruned; short ones are not (below
min_prompt_len). The same long prompt is also asked with pruning turned off for that request.
"""

import inspect
import json.decoder
import os

from vllm import LLM, SamplingParams

from uniprefill import models, serve

if __name__ == "__main__":  # vLLM starts processes
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    llm = LLM(
        model=str(models.prepare("qwen2.5-coder-0.5b-instruct")),
        dtype=serve.default_dtype(),  # float32 on CPUs without native bf16
        max_model_len=8192,
        additional_config={"uniprefill": {}},  # the defaults; e.g. {"p": 0.99, "last_q": 16}
    )
    try:
        source = inspect.getsource(json.decoder)
        long_question = (
            f"```python\n{source}\n```\nWhich exception does `JSONDecoder.decode` raise "
        )
        long_question += "when there is extra data after the document? Answer in one sentence."
        conversations = [
            [{"role": "user", "content": long_question}],
            [{"role": "user", "content": "What does `git rebase -i` do? One sentence."}],
        ]
        params = SamplingParams(temperature=0, max_tokens=64)
        for output in llm.chat(conversations, params):
            print(f"--- {len(output.prompt_token_ids)} prompt tokens\n{output.outputs[0].text}")
        (worker,) = llm.collective_rpc("uniprefill_requests")
        for pruned in worker["recent"]:
            print(f"pruned {pruned['req_id']}: tokens entering each stage {pruned['kept']}, "
                  f"token-layer ideal {pruned['ideal']}x")  # fmt: skip

        unpruned = SamplingParams(
            temperature=0, max_tokens=64, extra_args={"uniprefill_enabled": False}
        )
        (output,) = llm.chat([conversations[0]], unpruned)
        print(f"--- same long prompt, pruning off for this request\n{output.outputs[0].text}")
    finally:
        llm.llm_engine.engine_core.shutdown()  # on CPU a worker process otherwise outlives us
