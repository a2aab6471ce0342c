"""Offline batch over a Ray cluster with UniPrefill: one engine on each node, answers in order.

On a cluster (uniprefill[ray] and the model on every node):
    ray start --head                      # on the first node
    ray start --address HEAD_IP:6379      # on each other node
    python examples/ray_batch.py --address auto
Without --address it starts a one-node Ray instance on this machine.

Each prompt is a Python standard-library module with a question after it; long ones are pruned.
"""

import argparse
import fnmatch
import inspect
import json.decoder
import shlex
import textwrap

import ray
from vllm import SamplingParams

from uniprefill import models, serve
from uniprefill.cluster import ClusterBatch

if __name__ == "__main__":  # vLLM starts processes
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", help="a running cluster's address (e.g. auto)")
    args = parser.parse_args()
    ray.init(address=args.address)

    modules = [json.decoder, textwrap, shlex, fnmatch]
    conversations = [
        [{"role": "user", "content": f"```python\n{inspect.getsource(module)}\n```\n"
                                     "List the module's public names. One line."}]
        for module in modules
    ]  # fmt: skip
    llm_kwargs = {
        "model": str(models.prepare("qwen2.5-coder-0.5b-instruct")),
        "dtype": serve.default_dtype(),  # float32 on CPUs without native bf16
        "max_model_len": 8192,
        "additional_config": {"uniprefill": {}},  # the defaults
    }
    with ClusterBatch(llm_kwargs, env={"VLLM_CPU_KVCACHE_SPACE": "4"}) as batch:
        outputs = batch.chat(conversations, SamplingParams(temperature=0, max_tokens=48))
        for module, output in zip(modules, outputs, strict=True):
            print(f"--- {module.__name__}: {len(output.prompt_token_ids)} prompt tokens\n"
                  f"{output.outputs[0].text}")  # fmt: skip
        for (worker,) in batch.collective_rpc("uniprefill_requests"):
            for pruned in worker["recent"]:
                print(f"pruned: tokens entering each stage {pruned['kept']}, "
                      f"token-layer ideal {pruned['ideal']}x")  # fmt: skip
