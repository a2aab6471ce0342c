"""Offline batches across a Ray cluster: one whole vLLM engine with UniPrefill per Ray actor.

vLLM's Ray executor (one engine spanning nodes) does not run on the CPU backend, so here a cluster
runs many engines side by side instead: `ClusterBatch` starts one `vllm.LLM` in a Ray actor on
each node (or several per node), deals each batch's prompts out to them, balanced by length, and
gathers the results in the prompts' order. Each engine loads the UniPrefill plugin from its own
installation (the node's environment must have uniprefill installed, as for any vLLM plugin).

    from uniprefill.cluster import ClusterBatch
    with ClusterBatch({"model": path, "additional_config": {"uniprefill": {}}}) as batch:
        outputs = batch.generate(prompts, SamplingParams(temperature=0, max_tokens=64))

Needs Ray (`pip install "uniprefill[ray]"`) and a running cluster (`ray start --head` on one
node, `ray start --address HEAD:6379` on the others; `ray.init()` in the driver joins it).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Any

try:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as err:  # an optional extra
    raise ImportError('uniprefill.cluster needs Ray: pip install "uniprefill[ray]"') from err


class _Engine:
    """One `vllm.LLM` in a Ray actor."""

    def __init__(self, llm_kwargs: dict[str, Any]) -> None:
        from vllm import LLM  # in the actor's process, after its environment is set

        self.llm = LLM(**llm_kwargs)

    def generate(self, prompts: list, params: Any) -> list:
        return self.llm.generate(prompts, params, use_tqdm=False)

    def chat(self, conversations: list, params: Any) -> list:
        return self.llm.chat(conversations, params, use_tqdm=False)

    def collective_rpc(self, method: str) -> list:
        return self.llm.collective_rpc(method)

    def shutdown(self) -> None:
        # On CPU the engine's worker process otherwise outlives the actor.
        self.llm.llm_engine.engine_core.shutdown()


def _size(prompt: Any) -> int:
    """How much prefill work a prompt or conversation is, roughly: characters or token ids."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, Mapping):
        return len(prompt.get("prompt_token_ids") or prompt.get("prompt") or "")
    return sum(len(str(message.get("content", ""))) for message in prompt)  # a conversation


def deal(sizes: Sequence[int], engines: int) -> list[list[int]]:
    """Prompt indices for each engine, largest first to the least loaded (greedy balancing);
    each engine's indices in ascending order."""
    loads = [(0, engine) for engine in range(engines)]
    shares: list[list[int]] = [[] for _ in range(engines)]
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        load, engine = heapq.heappop(loads)
        shares[engine].append(index)
        heapq.heappush(loads, (load + sizes[index], engine))
    return [sorted(share) for share in shares]


class ClusterBatch:
    """`engines_per_node` engines on every alive node with CPUs, each `vllm.LLM(**llm_kwargs)`.

    `env`: environment variables for every engine's actor (one mapping), or one mapping per
    engine (nodes in Ray's order, then engines within a node), e.g. VLLM_CPU_KVCACHE_SPACE or,
    for engines sharing a machine, their own VLLM_CPU_OMP_THREADS_BIND cores. `cpus_per_engine`
    is what each actor reserves in Ray's accounting.
    """

    def __init__(
        self,
        llm_kwargs: Mapping[str, Any],
        *,
        engines_per_node: int = 1,
        cpus_per_engine: float = 1,
        env: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
    ) -> None:
        if not ray.is_initialized():
            ray.init()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]
        placements = [node for node in nodes for _ in range(engines_per_node)]
        if not placements:
            raise RuntimeError("the Ray cluster has no alive node with CPUs")
        envs = [env or {}] * len(placements) if isinstance(env, Mapping | None) else list(env)
        if len(envs) != len(placements):
            raise ValueError(f"env has {len(envs)} mappings for {len(placements)} engines")
        actor = ray.remote(_Engine)
        self.engines: list = [
            actor.options(
                num_cpus=cpus_per_engine,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                runtime_env={"env_vars": dict(engine_env)},
            ).remote(dict(llm_kwargs))
            for node, engine_env in zip(placements, envs, strict=True)
        ]
        try:
            ray.get([engine.__ray_ready__.remote() for engine in self.engines])  # engines up
        except Exception:
            for engine in self.engines:  # those that did start would hold their memory
                ray.kill(engine)
            raise

    def _spread(self, method: str, prompts: list, params: Any) -> list:
        """Each engine's share of the prompts (with their own params where given one per
        prompt), then the outputs in the prompts' order."""
        per_prompt = isinstance(params, Sequence)
        shares = deal([_size(p) for p in prompts], len(self.engines))
        work = [(e, share) for e, share in zip(self.engines, shares, strict=True) if share]
        calls = [
            getattr(engine, method).remote(
                [prompts[i] for i in share], [params[i] for i in share] if per_prompt else params
            )
            for engine, share in work
        ]
        outputs: list = [None] * len(prompts)
        for (_, share), results in zip(work, ray.get(calls), strict=True):
            for index, result in zip(share, results, strict=True):
                outputs[index] = result
        return outputs

    def generate(self, prompts: Sequence[Any], params: Any = None) -> list:
        """`LLM.generate` over the cluster: one `RequestOutput` per prompt, in order. `params`:
        one SamplingParams for all, or one per prompt."""
        single = isinstance(prompts, str | Mapping)
        return self._spread("generate", [prompts] if single else list(prompts), params)

    def chat(self, conversations: Sequence[Any], params: Any = None) -> list:
        """`LLM.chat` over the cluster: one `RequestOutput` per conversation, in order."""
        conversations = list(conversations)
        single = bool(conversations) and isinstance(conversations[0], Mapping)  # one, as LLM
        return self._spread("chat", [conversations] if single else conversations, params)

    def collective_rpc(self, method: str) -> list[list]:
        """`LLM.collective_rpc(method)` on every engine, e.g. "uniprefill_requests"."""
        return ray.get([engine.collective_rpc.remote(method) for engine in self.engines])

    def shutdown(self) -> None:
        ray.get([engine.shutdown.remote() for engine in self.engines])
        for engine in self.engines:
            ray.kill(engine)
        self.engines = []

    def __enter__(self) -> ClusterBatch:
        return self

    def __exit__(self, *_: object) -> None:
        self.shutdown()
