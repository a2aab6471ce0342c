"""Pruned prefill inside real vLLM engines (CPU backend), one tiny model per family: full
attention (Llama, Qwen2), sliding-window/full (Gemma 3), linear/full (Qwen3-Next).

The UniPrefill engines run vLLM's default compiled graph and chunked prefill, with a step budget
(STEP_BUDGET) below most prompts here, so pruned prompts come in chunks, and score a prompt by
its question where it has one (TINY_SETTINGS), so a batch mixes query counts. Against the PyTorch
reference path (same model, same prompts: the same keep counts per stage, within the kernels'
rounding margin, and then the same greedy tokens), against stock vLLM (pruning off: the same
tokens), and inside continuous batching (a pruned prefill in the same steps as other requests'
decodes gives each request its solo tokens, and only the steps that hold or score prompts leave
the compiled graph).
"""

import os
import time

import pytest
from transformers import AutoConfig
from vllm import LLM, SamplingParams

from tests.conftest import TINY_MODELS
from tests.e2e.helpers import (
    TINY_SETTINGS,
    assert_selections_are_the_oracles,
    check_against_reference,
    metrics_added,
    metrics_of,
    offline_llm,
    offline_metrics,
    pruning_state,
    random_prompts,
    vllm_dtype,
    with_question,
)
from uniprefill.config import UniPrefillConfig, auto_drop_layers
from uniprefill.families import layer_types
from uniprefill.requests import paragraph_breaks, scoring_queries
from uniprefill.vllm_glue.hooks import RECORD_ENV
from uniprefill.vllm_glue.runner_patches import pruner_of

MAX_TOKENS = 8
STEP_BUDGET = 256  # tokens a step: prompts of 300-1,500 tokens are prefilled in chunks


def greedy(**extra_args) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra_args or None
    )


def alone(prompt: list[int]) -> dict:
    """`prompt` under a cache salt of its own: sent again later without it, it is a new prompt
    to the scheduler, which prunes it again rather than treat it as a repeat of a pruned one."""
    return {"prompt_token_ids": prompt, "cache_salt": "alone"}


def asking() -> list[list[int]]:
    """random_prompts(), two of them ending in a question after a blank line."""
    batch = random_prompts()
    return [with_question(batch[0], 48), batch[1], with_question(batch[2], 40), batch[3]]


def tokens_of(outputs) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in outputs]


def _llm(model_dir, **extra):
    dtype = vllm_dtype(model_dir.name)
    return offline_llm(model=str(model_dir), dtype=dtype, max_model_len=4096, seed=0, **extra)


@pytest.fixture(scope="module", params=TINY_MODELS)
def family(request, prepared):
    return request.param, prepared(request.param)


@pytest.fixture(scope="module")
def engine(family):
    # collective_rpc with a function of the test's (python_forwards) pickles it
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ[RECORD_ENV] = "1"  # its workers keep each selection's inputs (test builds only)
    try:
        settings = {"additional_config": {"uniprefill": TINY_SETTINGS}}
        with _llm(family[1], max_num_batched_tokens=STEP_BUDGET, disable_log_stats=False,
                  **settings) as llm:  # fmt: skip
            yield llm
    finally:
        del os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"], os.environ[RECORD_ENV]


def count_python_forwards(worker) -> None:
    """In the worker: count forwards that run the decoder layers as Python code. A compiled
    graph runs its layers without calling module hooks added after it was traced."""
    runner = worker.model_runner
    if "_python_forwards" not in runner.__dict__:

        def count(*_):
            runner._python_forwards += 1

        pruner_of(runner).hooks.layers[0].register_forward_pre_hook(count)
    runner._python_forwards = 0


def python_forwards(worker) -> int:
    return worker.model_runner._python_forwards


@pytest.fixture(scope="module")
def baseline_tokens(family):
    """Greedy tokens of stock vLLM (UniPrefill not enabled, its compiled graph) on
    random_prompts(), with the UniPrefill engine's step budget and without prefix caching (which
    UniPrefill turns off for tiny-qwen3-next): in bfloat16, prefills split elsewhere (other
    chunks; prefix caching's block-aligned linear-attention states) give other tokens."""
    with _llm(family[1], max_num_batched_tokens=STEP_BUDGET, enable_prefix_caching=False) as llm:
        return tokens_of(llm.generate([{"prompt_token_ids": p} for p in asking()], greedy()))


def live_and_recent(llm: LLM) -> tuple[dict, dict]:
    """The worker's pruned requests still holding state, and recent keep counts."""
    (worker,) = llm.collective_rpc("uniprefill_requests")
    return pruning_state(worker)


def held(llm: LLM) -> dict:
    """Pruned prompts in chunks whose rows the worker holds: request id -> rows."""
    (worker,) = llm.collective_rpc("uniprefill_requests")
    return {k.rsplit("-", 1)[0]: rows for k, (rows, _) in worker["held"].items()}


def wait_until_held(llm: LLM, timeout_s: float = 120) -> dict:
    """Ask the worker (between the steps the engine core runs on its own) until it holds some
    prompt's chunks; fails, rather than hangs, if it never does."""
    deadline = time.monotonic() + timeout_s
    while not (seen := held(llm)):
        assert time.monotonic() < deadline, "no pruned prompt's chunks were ever held"
    return seen


def test_runner_has_every_attribute_uniprefill_reads(engine):
    (status,) = engine.collective_rpc("uniprefill_status")
    assert status["runner_missing_attributes"] == []


def test_every_selection_keeps_what_the_oracle_keeps_on_what_it_saw(engine, family):
    """Exact, in every family and dtype: each drop layer's kept rows are the oracle's on the
    very queries and keys the engine's selection saw (recorded in the worker), with chunked
    prompts joined, questions of several lengths and a short prompt in the same steps."""
    engine.collective_rpc("uniprefill_selections")  # only this batch's
    batch = [{"prompt_token_ids": p, "cache_salt": "exact"} for p in asking()]
    engine.generate(batch, greedy())
    (records,) = engine.collective_rpc("uniprefill_selections")
    drops = engine.llm_engine.vllm_config.additional_config["uniprefill"]["drop_layers"]
    assert len(records) >= len(drops)  # a scoring step selects at every drop layer
    assert assert_selections_are_the_oracles([records], TINY_SETTINGS) >= len(drops)


def test_pruned_requests_keep_what_the_reference_keeps_and_say_the_same(engine, family):
    """Keep counts agree drop by drop, up to blocks within rounding of the rule's threshold
    (uniprefill/ops/select/margin.py); where every drop's kept set is determined, so are the
    tokens."""
    name, model_dir = family
    batch = asking()
    breaks = paragraph_breaks(str(model_dir), None, False)
    config = UniPrefillConfig.from_dict(TINY_SETTINGS)
    # scored by their questions, by the last 32 tokens (no blank line), or not at all (short)
    assert [scoring_queries(config, p, breaks) for p in batch] == [48, 32, 40, 32]
    outputs = engine.generate([{"prompt_token_ids": p} for p in batch], greedy())
    live, recent = live_and_recent(engine)
    assert live == {} and held(engine) == {}  # every request finished: nothing left behind
    kept = [recent.get(out.request_id) for out in outputs]  # the worker lists pruned ones
    determined = check_against_reference(model_dir, batch, TINY_SETTINGS, kept, tokens_of(outputs))
    assert sum(k is not None and k[-1] < k[0] for k in kept) >= 2  # the engine does prune
    if vllm_dtype(name) == "float32":  # the comparison is exact there, not vacuous: a random
        # model attends almost evenly, so a prompt may have blocks within rounding of the
        # threshold (tiny-qwen2 has one here); the others' tokens are compared exactly
        assert determined >= len(batch) - 1


def test_auto_drop_layers_and_last_queries_in_the_engine_keep_what_the_reference_keeps(family):
    """The settings the defaults moved away from (the `paper` preset's): "auto" drop layers (from
    a quarter of the depth; on tiny-gemma3 the same as "early"), the last last_q tokens as
    scoring queries, 64-token blocks, in the engine against the reference path, for each family
    (TINY_SETTINGS' values for the rest)."""
    name, model_dir = family
    settings = {**TINY_SETTINGS, "drop_layers": "auto", "queries": "last_q", "block_size": 64}
    batch = asking()
    with _llm(model_dir, max_num_batched_tokens=STEP_BUDGET,
              additional_config={"uniprefill": settings}) as llm:  # fmt: skip
        resolved = llm.llm_engine.vllm_config.additional_config["uniprefill"]["drop_layers"]
        outputs = llm.generate([{"prompt_token_ids": p} for p in batch], greedy())
        _, recent = live_and_recent(llm)
    kinds = layer_types(AutoConfig.from_pretrained(model_dir))
    assert resolved == list(auto_drop_layers(kinds, "auto"))
    assert resolved[0] >= UniPrefillConfig().resolve(kinds).drop_layers[0]
    kept = [recent.get(out.request_id) for out in outputs]
    assert all(len(k) == len(resolved) + 1 for k in kept if k is not None)
    assert sum(k is not None and k[-1] < k[0] for k in kept) >= 2
    determined = check_against_reference(model_dir, batch, settings, kept, tokens_of(outputs))
    if vllm_dtype(name) == "float32":  # in bfloat16 the margin leaves most drops undetermined:
        assert determined >= len(batch) - 1  # there the exact oracle check above is the one


def test_metrics_count_what_the_worker_pruned(engine):
    """Offline, `LLM.get_metrics()` carries UniPrefill's metrics (stats on): what a batch adds
    equals the worker's own records of the prompts it pruned, which rode from the worker process
    to the engine core and on to this process in vLLM's outputs and stats."""
    before = offline_metrics(engine)
    batch = [{"prompt_token_ids": p, "cache_salt": "metrics"} for p in asking()]
    ids = {out.request_id for out in engine.generate(batch, greedy())}
    (worker,) = engine.collective_rpc("uniprefill_requests")
    records = [r for r in worker["recent"] if r["req_id"].rsplit("-", 1)[0] in ids]
    assert len(records) >= 2
    added = metrics_added(before, offline_metrics(engine))
    assert added.pop("selection_seconds_count") >= 1
    drops = engine.llm_engine.vllm_config.additional_config["uniprefill"]["drop_layers"]
    assert added == metrics_of(records, drops)


@pytest.mark.parametrize(
    "controls", [{"uniprefill_enabled": False}, {"uniprefill_p": 1.0}], ids=["off", "p1"]
)
def test_pruning_off_for_a_request_gives_baseline_tokens(engine, baseline_tokens, controls):
    """The prompts the first test prunes (and the reference shows pruning changes their tokens),
    sent with pruning off: unpruned, stock's tokens."""
    batch = [{"prompt_token_ids": p} for p in asking()]
    outputs = engine.generate(batch, greedy(**controls))
    assert tokens_of(outputs) == baseline_tokens
    _, recent = live_and_recent(engine)
    assert not {out.request_id for out in outputs} & set(recent)


def test_pruned_prefill_alongside_decodes_gives_each_request_its_solo_tokens(engine, family):
    """In float32 every request's tokens are its solo ones. In bfloat16 (tiny-qwen3-next) they
    cannot be, unpruned either: the long prompts' chunks start at other tokens than solo (the
    shorts share the step budget), and chunked attention and linear-attention states round
    differently per split; the shorts decode partly in eager steps (those holding the long
    prompts' chunks), whose elementwise ops round to bfloat16 where the compiled graph fuses
    them in float32 (the same batch run all eager gives the shorts their solo tokens). There,
    the shorts must agree up to the long prompts' arrival, and the long prompts' keep counts
    with the reference path's (within the rounding margin)."""
    batch = random_prompts((700, 30, 1200, 50, 600), seed=1)
    batch[2] = with_question(batch[2], 56)
    solo = [tokens_of(engine.generate([alone(p)], greedy()))[0] for p in batch]

    core = engine.llm_engine
    engine.collective_rpc(count_python_forwards)
    (eager_before,) = engine.collective_rpc("uniprefill_requests")
    for i in (1, 3):  # short requests start first and are decoding ...
        core.add_request(f"short-{i}", {"prompt_token_ids": batch[i]}, greedy())
    core.step()
    core.step()
    for i in (0, 2, 4):  # ... when the long, pruned prompts arrive
        core.add_request(f"long-{i}", {"prompt_token_ids": batch[i]}, greedy())
    done, steps = {}, 2
    while core.has_unfinished_requests():
        steps += 1
        for out in core.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    exact = vllm_dtype(family[0]) == "float32"
    for i, tokens in enumerate(solo):
        if i in (1, 3):
            agree = len(tokens) if exact else 2
            assert done[f"short-{i}"][:agree] == tokens[:agree], i
        elif exact:
            assert done[f"long-{i}"] == tokens, i
    (worker,) = engine.collective_rpc("uniprefill_requests")
    live, recent = pruning_state(worker)
    assert live == {} and worker["held"] == {} and {"long-0", "long-2", "long-4"} <= set(recent)
    if not exact:
        longs = [f"long-{i}" for i in (0, 2, 4)]
        check_against_reference(family[1], [batch[i] for i in (0, 2, 4)], TINY_SETTINGS,
                                [recent[r] for r in longs], [done[r] for r in longs])  # fmt: skip
    # Only the steps that held or scored chunks of the long prompts ran the layers as Python
    # (2,500 prompt tokens: at least 2,500 / STEP_BUDGET steps); every other step, the pruned
    # requests' decodes among them, ran vLLM's compiled graph.
    chunk_steps = worker["eager_steps"] - eager_before["eager_steps"]
    assert chunk_steps >= sum(len(batch[i]) for i in (0, 2, 4)) // STEP_BUDGET
    assert engine.collective_rpc(python_forwards) == [chunk_steps]
    assert steps >= chunk_steps + MAX_TOKENS


def test_aborted_request_leaves_no_state_behind(engine, family):
    core = engine.llm_engine
    core.add_request("to-abort", {"prompt_token_ids": random_prompts((1000,), seed=2)[0]}, greedy())
    while not any(out.outputs[0].token_ids for out in core.step()):
        pass  # the prompt's chunks, until its first token: it is pruned
    live, _ = live_and_recent(engine)
    text_config = AutoConfig.from_pretrained(family[1])
    drops = UniPrefillConfig.from_dict(TINY_SETTINGS).resolve(layer_types(text_config)).drop_layers
    assert list(live) == ["to-abort"] and len(live["to-abort"]) == len(drops)  # offset per stage
    assert held(engine) == {}
    core.abort_request(["to-abort"])
    # An idle engine core runs no step; the worker hears of the abort with the next one.
    engine.generate([{"prompt_token_ids": [5, 6, 7]}], greedy())
    assert live_and_recent(engine)[0] == {}


def test_request_preempted_mid_prompt_is_pruned_again_from_its_first_chunk(engine):
    """Once the worker holds a long prompt's first chunks, vLLM preempts every running request
    (`reset_prefix_cache(reset_running_requests=True)`, which succeeds only once their blocks
    are freed). The worker drops the held rows, and the prompt, with no output yet, is pruned
    again from its first chunk: its solo tokens, one pruned prefill, nothing left."""
    prompt = random_prompts((3500,), seed=6)[0]
    solo = tokens_of(engine.generate([alone(prompt)], greedy()))[0]
    core = engine.llm_engine
    core.add_request("preempted", {"prompt_token_ids": prompt}, greedy())
    wait_until_held(engine)
    assert engine.reset_prefix_cache(reset_running_requests=True)
    tokens = None
    while core.has_unfinished_requests():
        for out in core.step():
            if out.finished:
                tokens = list(out.outputs[0].token_ids)
    assert tokens == solo
    assert held(engine) == {} and live_and_recent(engine)[0] == {}
    assert prunes_of(engine, "preempted") == 1


def test_request_aborted_mid_prompt_leaves_no_held_rows(engine):
    """The engine core steps on its own while the test asks the worker (between steps) until
    the prompt's first chunks are held, then aborts it."""
    core = engine.llm_engine
    core.add_request("mid", {"prompt_token_ids": random_prompts((3500,), seed=4)[0]}, greedy())
    seen = wait_until_held(engine)
    assert list(seen) == ["mid"] and seen["mid"] % STEP_BUDGET == 0
    core.abort_request(["mid"])
    engine.generate([{"prompt_token_ids": [5, 6, 7]}], greedy())
    assert held(engine) == {} and live_and_recent(engine)[0] == {}


def test_prompts_past_the_held_token_limit_run_unpruned(prepared):
    """A limit below the longest prompt: that one is prefilled unpruned (the tokens it gives
    with pruning off), the others pruned as usual."""
    settings = {**TINY_SETTINGS, "max_held_tokens": 1000}
    batch = [{"prompt_token_ids": p} for p in random_prompts()]
    with _llm(prepared("tiny-llama"), max_num_batched_tokens=STEP_BUDGET,
              additional_config={"uniprefill": settings}) as llm:  # fmt: skip
        unpruned = tokens_of(llm.generate(batch[:1], greedy(uniprefill_enabled=False)))
        outputs = llm.generate(batch, greedy())
        _, recent = live_and_recent(llm)
    assert tokens_of(outputs)[0] == unpruned[0]  # 1,500 tokens: over the limit
    assert outputs[0].request_id not in recent
    assert outputs[2].request_id in recent  # 900 tokens: pruned


@pytest.mark.parametrize(
    ("extra_args", "field"),
    [
        ({"uniprefill_p": 1.5}, "uniprefill_p"),
        ({"uniprefill_p": "lots"}, "uniprefill_p"),
        ({"uniprefill_enabled": "maybe"}, "uniprefill_enabled"),
        ({"uniprefill_mode": "fast"}, "uniprefill_mode"),
    ],
)
def test_bad_request_field_is_a_value_error_and_the_engine_carries_on(engine, extra_args, field):
    with pytest.raises(ValueError, match=field):
        engine.generate([{"prompt_token_ids": random_prompts((300,))[0]}], greedy(**extra_args))
    assert len(tokens_of(engine.generate([{"prompt_token_ids": [5, 6, 7]}], greedy()))[0]) == 8


@pytest.fixture(scope="module")
def small_cache(prepared):
    """tiny-llama with a 44-block KV cache (1,408 tokens) and a 256-token step budget: two
    long requests outgrow it, and vLLM preempts the second."""
    engine_args = dict(block_size=32, num_gpu_blocks_override=44, disable_log_stats=False)
    with offline_llm(
        model=str(prepared("tiny-llama")),
        dtype="float32",
        max_model_len=1024,
        max_num_batched_tokens=STEP_BUDGET,
        additional_config={"uniprefill": TINY_SETTINGS},
        **engine_args,
    ) as llm:
        yield llm


def prunes_of(llm: LLM, request_id: str) -> int:
    """How many pruned prefills the worker recorded for a request (recomputes included)."""
    (worker,) = llm.collective_rpc("uniprefill_requests")
    return sum(r["req_id"].rsplit("-", 1)[0] == request_id for r in worker["recent"])


def preemptions(llm: LLM) -> int:
    (counter,) = [m for m in llm.get_metrics() if m.name == "vllm:num_preemptions"]
    return int(counter.value)


def solo_then_together(llm: LLM, batch: list[list[int]], max_tokens: int) -> tuple:
    """Each prompt's solo tokens, then the batch's outputs run together and how many
    preemptions that took."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    solo = [tokens_of(llm.generate([alone(p)], params))[0] for p in batch]
    before = preemptions(llm)
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params)
    return solo, outputs, preemptions(llm) - before


def test_preempted_request_is_recomputed_unpruned_and_leaves_no_state(small_cache):
    """Two pruned requests outgrow the cache while decoding: vLLM preempts the second and
    recomputes prompt + outputs. Policy: a request with outputs is recomputed unpruned
    (docs/design/vllm-integration.md, section 10), so it is not pruned a second time, the first
    request is untouched, and no per-request state is left."""
    llm = small_cache
    solo, outputs, preempted = solo_then_together(llm, random_prompts((600, 600), seed=3), 300)
    live, _ = live_and_recent(llm)
    assert preempted > 0
    together = tokens_of(outputs)
    assert together[0] == solo[0]
    assert len(together[1]) == 300
    diverge = next(i for i, (a, b) in enumerate(zip(together[1], solo[1], strict=True)) if a != b)
    assert diverge > 0  # identical until the preemption, then decoded over the full KV
    assert live == {} and held(llm) == {}
    assert [prunes_of(llm, out.request_id) for out in outputs] == [1, 1]  # recompute unpruned
