"""Nothing a request does takes the engine down: a real vLLM engine (tiny-llama, CPU) whose
scheduler is the one place that decides what is pruned, and whose workers fall back to an
unpruned prefill when pruning fails.

One engine with a small KV cache (vLLM preempts a request when two long prompts outgrow it) and
`long_prefill_token_threshold` 16, below every prompt's scoring queries (32 and more).
"""

import os

import pytest

from tests.e2e.helpers import (
    TINY_SETTINGS,
    metrics_added,
    offline_llm,
    offline_metrics,
    random_prompts,
)
from tests.e2e.test_pruning import (
    alone,
    greedy,
    held,
    live_and_recent,
    preemptions,
    prunes_of,
    tokens_of,
)
from uniprefill.vllm_glue.hooks import FAULT_ENV

THRESHOLD = 16  # long_prefill_token_threshold: below the 32 scoring queries of these prompts


@pytest.fixture(scope="module")
def engine(prepared):
    # collective_rpc with a function of the test's (plant_fault) pickles it
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    try:
        with offline_llm(
            model=str(prepared("tiny-llama")),
            dtype="float32",
            max_model_len=1280,
            block_size=32,
            num_gpu_blocks_override=48,  # 1,536 tokens: two 1,024-token prompts outgrow it
            max_num_batched_tokens=256,
            long_prefill_token_threshold=THRESHOLD,
            disable_log_stats=False,
            additional_config={"uniprefill": TINY_SETTINGS},
        ) as llm:
            yield llm
    finally:
        del os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"]


def plant_fault(worker, point) -> None:
    """In the worker: make UniPrefill's selection raise (point "selection"), or stop (None)."""
    if point is None:
        os.environ.pop(FAULT_ENV, None)
    else:
        os.environ[FAULT_ENV] = point


def test_prompt_preempted_before_its_first_token_and_then_cached_runs_unpruned(engine):
    """The same prompt twice: the first unpruned, the second pruned, prefilled side by side 16
    tokens a step. The cache fills up and vLLM preempts the second; looked up again, most of it
    is now in the prefix cache (the first's blocks), so the scheduler serves it from there,
    unpruned. The workers must follow that decision: once they decided for themselves from the
    request and went on pruning it (the engine died on a plan invariant)."""
    prompt = random_prompts((1024,), seed=11)[0]
    before = preemptions(engine)
    outputs = engine.generate(
        [{"prompt_token_ids": prompt}, {"prompt_token_ids": prompt}],
        [greedy(uniprefill_enabled=False), greedy()],
    )
    stock, second = tokens_of(outputs)
    assert preemptions(engine) > before
    assert second == stock
    assert prunes_of(engine, outputs[1].request_id) == 0
    assert live_and_recent(engine)[0] == {} and held(engine) == {}


def test_threshold_below_the_scoring_queries_still_finishes_a_mixed_load(engine):
    """Pruned prompts chunked 16 tokens a step keep their last 32 (the queries) for one chunk,
    which the threshold would never allow while other requests run: the scheduler raises the
    threshold for the steps where such a chunk waits. Every request finishes, the long ones
    pruned, each with its solo tokens."""
    longs = random_prompts((600, 700, 800), seed=13)
    shorts = random_prompts((40, 60), seed=14)
    solo = [tokens_of(engine.generate([alone(p)], greedy()))[0] for p in longs]
    core = engine.llm_engine
    for i, prompt in enumerate(longs + shorts):
        core.add_request(f"mixed-{i}", {"prompt_token_ids": prompt}, greedy())
    finished, steps = {}, 0
    while core.has_unfinished_requests():
        steps += 1
        assert steps < 2000, f"stuck: finished {sorted(finished)} after {steps} steps"
        for out in core.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
    assert len(finished) == 5
    assert [finished[f"mixed-{i}"] for i in range(3)] == solo
    assert [prunes_of(engine, f"mixed-{i}") for i in range(5)] == [1, 1, 1, 0, 0]


def test_a_failure_inside_pruning_falls_back_and_the_engine_keeps_serving(engine):
    """A planted failure in the selection, in steps that also run an unpruned long prompt and
    a short one: the pruned prompt is recomputed unpruned (its unpruned tokens), the others get
    theirs, the failure is counted, nothing is left behind, and the engine serves on."""
    pruned, off, short = random_prompts((900, 700, 40), seed=15)
    batch = [pruned, off, short]
    unpruned = [
        tokens_of(engine.generate([alone(p)], greedy(uniprefill_enabled=False)))[0] for p in batch
    ]
    params = [greedy(), greedy(uniprefill_enabled=False), greedy()]
    before = offline_metrics(engine)
    engine.collective_rpc(plant_fault, args=("selection",))
    try:
        outputs = engine.generate([{"prompt_token_ids": p} for p in batch], params)
    finally:
        engine.collective_rpc(plant_fault, args=(None,))
    assert tokens_of(outputs) == unpruned
    added = metrics_added(before, offline_metrics(engine))
    assert added["fallbacks"] == 1
    assert added.get("pruned_requests", 0) == 0
    assert prunes_of(engine, outputs[0].request_id) == 0
    assert live_and_recent(engine)[0] == {} and held(engine) == {}
    # the engine is alive and prunes again
    again = engine.generate([{"prompt_token_ids": random_prompts((900,), seed=16)[0]}], greedy())
    assert prunes_of(engine, again[0].request_id) == 1
