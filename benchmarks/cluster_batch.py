"""Cluster batch throughput: one node against two, UniPrefill engines on a local Ray cluster.

A local Ray cluster on this machine: a head node and, for the second run, a worker node, each
standing for a machine of `--cores-per-node` cores (its engine is bound to its own cores with
VLLM_CPU_OMP_THREADS_BIND). Both runs send the same batch of real-text prompts (standard-library
code and docs with a question, benchmarks/realtext_tasks.py) through `uniprefill.cluster
.ClusterBatch`; the time is the batch's wall time after the engines are up (engine start-up is
reported apart). Both runs must give the same answers.

    python benchmarks/cluster_batch.py --prompts 16 --tokens 2048 --json results/cluster.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import ray
from machine import machine
from ray.cluster_utils import Cluster
from realtext_tasks import TASKS, sample_of_length
from transformers import AutoTokenizer
from vllm import SamplingParams

from uniprefill import models, serve
from uniprefill.cluster import ClusterBatch

NODE = {"object_store_memory": 100 * 2**20}


def samples(model_dir: Path, count: int, tokens: int) -> list:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    found, seed = [], 0
    while len(found) < count:
        for task in TASKS:
            sample = sample_of_length(tokenizer, task, seed, tokens)
            if sample is not None and len(found) < count:
                found.append(sample)
        seed += 1
    return found


def run(nodes: int, args: argparse.Namespace, llm_kwargs: dict, batch: list) -> dict:
    cores = args.cores_per_node
    cluster = Cluster(
        initialize_head=True, head_node_args={**NODE, "num_cpus": cores, "include_dashboard": False}
    )
    for _ in range(nodes - 1):
        cluster.add_node(**NODE, num_cpus=cores)
    ray.init(address=cluster.address)
    env = [{"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": f"{n * cores}-{(n + 1) * cores - 1}"}
           for n in range(nodes)]  # fmt: skip
    try:
        start = time.perf_counter()
        with ClusterBatch(llm_kwargs, cpus_per_engine=cores, env=env) as engines:
            started = time.perf_counter() - start
            params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
            start = time.perf_counter()
            outputs = engines.chat([s.messages for s in batch], params)
            seconds = time.perf_counter() - start
            pruned = [r for (w, *_) in engines.collective_rpc("uniprefill_requests")
                      for r in w["recent"]]  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()
    replies = [out.outputs[0].text for out in outputs]
    prompt_tokens = sum(len(out.prompt_token_ids) for out in outputs)
    return {
        "nodes": nodes,
        "engine_start_s": round(started, 1),
        "batch_s": round(seconds, 2),
        "prompts_per_s": round(len(batch) / seconds, 4),
        "prompt_tokens_per_s": round(prompt_tokens / seconds, 1),
        "pruned": len(pruned),
        "correct": sum(s.correct(r) for s, r in zip(batch, replies, strict=True)),
        "replies": replies,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--dtype", help="default: auto, float32 where the CPU has no native bf16")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048, help="each prompt's length")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cores-per-node", type=int, default=1)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a bar chart (PNG) here")
    args = parser.parse_args()
    if 2 * args.cores_per_node > (os.cpu_count() or 1):
        parser.error("two nodes need 2 x --cores-per-node cores on this machine")

    model_dir = models.prepare(args.model)
    dtype = args.dtype or serve.default_dtype()
    batch = samples(model_dir, args.prompts, args.tokens)
    llm_kwargs = {"model": str(model_dir), "dtype": dtype, "max_model_len": args.tokens + 256,
                  "seed": 0, "additional_config": {"uniprefill": {}}}  # fmt: skip
    rows = [run(nodes, args, llm_kwargs, batch) for nodes in (1, 2)]
    report = {
        "machine": machine(),
        "model": args.model,
        "dtype": dtype,
        "prompts": args.prompts,
        "tokens": args.tokens,
        "max_tokens": args.max_tokens,
        "cores_per_node": args.cores_per_node,
        "rows": rows,
        "speedup": round(rows[0]["batch_s"] / rows[1]["batch_s"], 2),
        "same_replies": rows[0]["replies"] == rows[1]["replies"],
    }
    print(f"{report['machine']['cpu']} {report['machine']['isa']}, {args.model} {dtype}, "
          f"{args.prompts} prompts of ~{args.tokens} tokens, "
          f"{args.cores_per_node} core(s) a node")  # fmt: skip
    print("nodes | engine start (s) | batch (s) | prompts/s | prompt tokens/s | pruned | correct")
    for row in rows:
        print(f"{row['nodes']} | {row['engine_start_s']} | {row['batch_s']} | "
              f"{row['prompts_per_s']} | {row['prompt_tokens_per_s']} | {row['pruned']} | "
              f"{row['correct']}/{args.prompts}")  # fmt: skip
    print(f"two nodes / one: {report['speedup']}x; same replies: {report['same_replies']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)
    return 0 if report["same_replies"] else 1


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    rows = report["rows"]
    ax.bar([f"{r['nodes']} node(s)" for r in rows], [r["prompt_tokens_per_s"] for r in rows])
    ax.set_ylabel("prompt tokens / s")
    ax.set_title(f"cluster batch, {report['model']}: {report['speedup']}x")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
