"""The scheduler's decisions without a model: vLLM's real `Scheduler` (UniPrefill's subclass)
over a small KV cache, driven step by step as the engine core drives it, with the model runner's
outputs written by hand (as vLLM's own scheduler tests do). What each step tells the workers to
prune is the plan on its `SchedulerOutput`.
"""

import pytest
import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from uniprefill.step_plan import PromptPlan
from uniprefill.vllm_glue.metrics import REPORT_ATTRIBUTE, STEP_FIELD, new_report
from uniprefill.vllm_glue.patches import apply_patches, revert_patches

BLOCK = 16
SETTINGS = {"p": 0.9, "drop_layers": [1], "min_prompt_len": 256, "sink": 32, "last_q": 32}


@pytest.fixture(scope="module", autouse=True)
def declared_fields():
    apply_patches("plugin")  # SchedulerOutput.uniprefill, as the plugin declares it
    yield
    revert_patches()


def make_scheduler(model_dir, blocks=64, budget=256, threshold=0, settings=None):
    from scheduler_patches.scheduler import UniPrefillScheduler

    model = ModelConfig(model=str(model_dir), dtype="float32", max_model_len=1024)
    config = VllmConfig(
        model_config=model,
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
        scheduler_config=SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=16,
            max_model_len=1024,
            long_prefill_token_threshold=threshold,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
        ),
        additional_config={"uniprefill": settings or SETTINGS},
    )
    config.cache_config.num_gpu_blocks = blocks  # what the engine sets once it has measured
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=16, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=blocks, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])  # fmt: skip
    return UniPrefillScheduler(
        vllm_config=config,
        kv_cache_config=kv,
        structured_output_manager=StructuredOutputManager(config),
        block_size=BLOCK,
        log_stats=True,
    )


@pytest.fixture
def scheduler(prepared):
    return lambda **kwargs: make_scheduler(prepared("tiny-llama"), **kwargs)


init_none_hash(sha256)
HASHER = get_request_block_hasher(BLOCK, sha256)


def request(req_id: str, length: int, seed: int = 0, **extra_args) -> Request:
    ids = torch.randint(10, 1000, (length,), generator=torch.Generator().manual_seed(seed))
    params = SamplingParams(max_tokens=4, extra_args=extra_args or None)
    return Request(req_id, ids.tolist(), params, None, block_hasher=HASHER)


def run_step(scheduler, fallbacks=()) -> tuple:
    """One engine-core step: schedule, then every scheduled request that reached the end of its
    prompt samples token 7; `fallbacks` are reported as failed pruning by the workers. Returns
    the step's SchedulerOutput, its plan, and the stats vLLM made after it."""
    out = scheduler.schedule()
    ids = list(out.num_scheduled_tokens)
    sampled = [
        [7] if scheduler.requests[r].num_computed_tokens >= scheduler.requests[r].num_tokens else []
        for r in ids
    ]
    runner = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                               sampled_token_ids=sampled)  # fmt: skip
    if fallbacks:
        report = new_report()
        report["fallbacks"] = list(fallbacks)
        setattr(runner, REPORT_ATTRIBUTE, report)
    outputs = scheduler.update_from_output(out, runner)
    stats = next((o.scheduler_stats for o in outputs.values() if o.scheduler_stats), None)
    return out, getattr(out, STEP_FIELD), stats


def test_a_long_prompt_is_planned_with_each_chunk_and_a_short_one_never(scheduler):
    sched = scheduler()
    sched.add_request(request("long", 600))
    sched.add_request(request("short", 100))
    sched.add_request(request("off", 600, seed=1, uniprefill_enabled=False))
    plans = []
    while sched.requests["long"].num_output_tokens == 0:
        out, plan, _ = run_step(sched)
        plans.append((dict(out.num_scheduled_tokens), plan))
    assert all(plan == {"long": PromptPlan(0.9, 32)} for _, plan in plans)
    # chunks of the step budget; the last holds at least the 32 scoring queries
    chunks = [tokens["long"] for tokens, _ in plans]
    assert sum(chunks) == 600 and chunks[-1] >= 32
    _, plan, _ = run_step(sched)  # its decode: nothing to plan
    assert plan is None or "long" not in plan


def test_a_prompt_preempted_then_mostly_cached_is_taken_off_the_plan(scheduler):
    """The case that once killed engines: planned as pruned, preempted before its first token,
    and looked up again once another request has put most of it in the prefix cache: from then
    on it is not pruned, and no step plans it."""
    sched = scheduler(blocks=48, threshold=16)
    sched.add_request(request("stock", 512, seed=2, uniprefill_enabled=False))
    sched.add_request(request("pruned", 512, seed=2))
    out, plan, _ = run_step(sched)
    assert plan == {"pruned": PromptPlan(0.9, 32)}
    preempted = False
    while sched.requests["pruned"].num_output_tokens == 0:
        out, plan, _ = run_step(sched)
        preempted |= "pruned" in out.preempted_req_ids
        if preempted and "pruned" in out.num_scheduled_tokens:
            assert plan is None or "pruned" not in plan
    assert preempted
    assert "pruned" not in sched.pruned


def test_a_threshold_below_the_scoring_queries_lets_the_last_chunk_through(scheduler):
    sched = scheduler(threshold=16)
    sched.add_request(request("a", 400, seed=3))
    sched.add_request(request("b", 400, seed=4))
    for _ in range(200):
        run_step(sched)
        if all(sched.requests[r].num_output_tokens for r in ("a", "b")):
            break
    else:
        pytest.fail("a pruned prompt's last chunk never ran")
    assert sched.scheduler_config.long_prefill_token_threshold == 16  # restored after each step


def test_a_reported_fallback_drops_the_token_and_recomputes_the_prompt_unpruned(scheduler):
    sched = scheduler(budget=512)
    sched.add_request(request("a", 300, seed=5))
    sched.add_request(request("b", 100, seed=6))
    out, plan, stats = run_step(sched, fallbacks=["a"])  # both whole in one step; "a" failed
    assert plan == {"a": PromptPlan(0.9, 32)}
    assert stats.uniprefill["fallbacks"] == ["a"]  # counted on /metrics
    a = sched.requests["a"]
    assert a.num_output_tokens == 0 and a.status == RequestStatus.PREEMPTED
    assert sched.requests["b"].num_output_tokens == 1  # the other request is untouched
    out, plan, _ = run_step(sched)
    assert "a" in out.preempted_req_ids and plan is None  # recomputed, not planned
    assert a.num_output_tokens == 1


def test_a_prompt_that_would_pass_the_held_token_budget_is_prefilled_unpruned(scheduler):
    """max_held_tokens 700: the first 600-token prompt is held in chunks and pruned; the second,
    starting while the first is held, would hold 1,200: it runs unpruned, in no step's plan."""
    sched = scheduler(threshold=128, settings={**SETTINGS, "max_held_tokens": 700})
    sched.add_request(request("first", 600, seed=8))
    sched.add_request(request("second", 600, seed=9))
    planned = set()
    while any(sched.requests[r].num_output_tokens == 0 for r in ("first", "second")
              if r in sched.requests):  # fmt: skip
        _, plan, _ = run_step(sched)
        planned |= set(plan or ())
    assert planned == {"first"}
    assert "second" not in sched.pruned and sched.held_tokens == {}
