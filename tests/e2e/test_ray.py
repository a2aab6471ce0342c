"""UniPrefill on Ray, on a real local two-node cluster (a head and a worker node on loopback).

- vLLM's Ray executor starts each worker as a `RayWorkerWrapper` actor; its `init_worker` runs
  vLLM's plugin loader. On CPU that executor refuses to start (no Ray device), so the actor is
  driven here the way the executor drives it, up to a loaded model, and asked what it sees.
- `uniprefill.cluster.ClusterBatch` runs one engine per node and must give the tokens one local
  engine gives.
"""

import cloudpickle
import pytest
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.network_utils import get_distributed_init_method, get_open_port

from tests.e2e.helpers import TINY_SETTINGS, offline_llm, random_prompts
from uniprefill import plugin

ray = pytest.importorskip("ray", reason='needs the ray extra: pip install "uniprefill[ray]"')
from ray.cluster_utils import Cluster  # noqa: E402

from uniprefill.cluster import ClusterBatch, deal  # noqa: E402

NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
# Eager engines: start in seconds; float32: the same tokens on every engine.
ENGINE = {"dtype": "float32", "max_model_len": 4096, "seed": 0, "enforce_eager": True,
          "additional_config": {"uniprefill": TINY_SETTINGS}}  # fmt: skip


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    cluster.add_node(**NODE)
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _plugin_view(wrapper) -> dict:
    """Runs in the Ray worker: did vLLM's plugin loader register UniPrefill in this process?"""
    from uniprefill import plugin

    worker = vars(wrapper).get("worker")  # unset until init_worker
    status = worker.uniprefill_status() if worker is not None else None
    return {"registered": plugin._registered, "status": status}


def test_vllm_ray_worker_loads_the_plugin_and_its_worker_extension(cluster, prepared):
    from vllm.v1.executor.ray_utils import RayWorkerWrapper

    plugin.register()  # as `vllm serve` does in the front end, before building the config
    config = EngineArgs(model=str(prepared("tiny-llama")), **ENGINE).create_engine_config()
    wrapper = ray.remote(num_cpus=1)(RayWorkerWrapper).remote(rpc_rank=0)
    probe = cloudpickle.dumps(_plugin_view)
    try:
        before = ray.get(wrapper.execute_method.remote(probe))
        init_method = get_distributed_init_method("127.0.0.1", get_open_port())
        worker_kwargs = {
            "vllm_config": config,
            "local_rank": 0,
            "rank": 0,
            "distributed_init_method": init_method,
            "is_driver_worker": True,
        }
        ray.get(wrapper.init_worker.remote([worker_kwargs]))
        ray.get(wrapper.init_device.remote())
        ray.get(wrapper.execute_method.remote("load_model"))
        after = ray.get(wrapper.execute_method.remote(probe))
    finally:
        ray.get(wrapper.execute_method.remote("shutdown"))
        ray.kill(wrapper)
    assert before == {"registered": False, "status": None}
    assert after["registered"]
    status = after["status"]
    assert status["config"] == config.additional_config["uniprefill"]
    assert status["config"]["p"] == TINY_SETTINGS["p"]
    assert "vllm.v1.worker.gpu_model_runner:GPUModelRunner._model_forward" in status["patches"]
    # What the runner has before its KV cache exists is all UniPrefill reads but that cache.
    assert status["runner_missing_attributes"] == ["kv_cache_config.kv_cache_groups"]


def test_deal_balances_by_size_and_keeps_every_prompt_once():
    shares = deal([100, 10, 60, 50, 5], 2)
    assert sorted(i for share in shares for i in share) == [0, 1, 2, 3, 4]
    assert shares == [[0, 1, 4], [2, 3]]  # loads 115 and 110
    assert deal([3], 3) == [[0], [], []]


def test_cluster_batch_one_engine_a_node_gives_one_local_engines_tokens(cluster, prepared):
    model = str(prepared("tiny-llama"))
    prompts = [{"prompt_token_ids": p} for p in random_prompts(lengths=(1500, 40, 900, 300, 1200))]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    off = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                         extra_args={"uniprefill_enabled": False})  # fmt: skip
    params = [greedy, greedy, off, greedy, greedy]  # per prompt: the 900-token one unpruned
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    with ClusterBatch({"model": model, **ENGINE}, env=env) as batch:
        outputs = batch.generate(prompts, params)
        engines = batch.collective_rpc("uniprefill_requests")
    with offline_llm(model=model, **ENGINE) as llm:
        local = llm.generate(prompts, params)
        (local_worker,) = llm.collective_rpc("uniprefill_requests")

    assert len(engines) == 2  # one engine on each node
    assert [out.prompt_token_ids for out in outputs] == [p["prompt_token_ids"] for p in prompts]
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in local]
    kept = sorted(r["kept"] for (worker,) in engines for r in worker["recent"])
    assert all(worker["recent"] for (worker,) in engines)  # both engines pruned
    assert kept == sorted(r["kept"] for r in local_worker["recent"])
    # all but the 40-token prompt and the one sent with pruning off
    assert [k[0] for k in kept] == [300, 1200, 1500] and all(k[-1] < k[0] for k in kept)
