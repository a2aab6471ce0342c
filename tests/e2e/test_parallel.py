"""Parallel engines on the CPU backend (one core a rank).

Tensor parallelism (TP=2): each rank scores with its own heads, the block scores of all heads
are summed over the group before the cut, so every rank keeps the same tokens, and the same as
TP=1. Data parallelism (DP=2): two engines, each with its own scheduler and worker, prune the
requests vLLM balances onto them.

Qwen3-Next runs as tiny-qwen3-next-2kh: tiny-qwen3-next's single linear-attention key head
cannot be split over two ranks (stock vLLM fails there the same way).
"""

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs

from tests.e2e.helpers import (
    TINY_SETTINGS,
    assert_selections_are_the_oracles,
    check_against_reference,
    offline_llm,
    random_prompts,
    served_metrics,
    tiny_llama_server,
    vllm_dtype,
)
from uniprefill import plugin, serve
from uniprefill.vllm_glue.hooks import RECORD_ENV

STEP_BUDGET = 256  # prompts come in chunks


def _run(model_dir, dtype: str, tp: int, monkeypatch) -> tuple[list, dict, list]:
    """Greedy tokens of random_prompts(), each rank's keep counts by request index, and each
    prompt's first-token logprobs (top 20 and the chosen one). Every selection each rank ran
    is checked against the oracle on what it saw (exact)."""
    monkeypatch.setenv(RECORD_ENV, "1")
    if tp > 1:
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", serve.cpu_threads_bind(tp, tp))
    settings = {"additional_config": {"uniprefill": TINY_SETTINGS}}
    with offline_llm(model=str(model_dir), dtype=dtype, max_model_len=4096, seed=0,
                     tensor_parallel_size=tp, max_num_batched_tokens=STEP_BUDGET,
                     **settings) as llm:  # fmt: skip
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=20)
        outputs = llm.generate([{"prompt_token_ids": p} for p in random_prompts()], params)
        ranks = llm.collective_rpc("uniprefill_requests")
        selections = llm.collective_rpc("uniprefill_selections")
    assert len(selections) == tp
    assert assert_selections_are_the_oracles(selections, TINY_SETTINGS) >= 1
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    kept = [{r["req_id"].split("-")[0]: r["kept"] for r in rank["recent"]} for rank in ranks]
    first = [{t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()} for out in outputs]
    return tokens, kept, first


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-qwen3-next-2kh"])
def test_tp2_keeps_and_says_what_tp1_does(prepared, monkeypatch, name):
    dtype = vllm_dtype(name)
    tokens1, (kept1,), first1 = _run(prepared(name), dtype, 1, monkeypatch)
    tokens2, ranks, first2 = _run(prepared(name), dtype, 2, monkeypatch)
    assert len(ranks) == 2 and ranks[0] == ranks[1]  # every rank kept the same tokens
    assert len(kept1) == 3 and any(k[-1] < k[0] for k in kept1.values())  # it does prune
    if dtype == "float32":
        assert ranks[0] == kept1 and tokens2 == tokens1
        return
    # bfloat16 (Qwen3-Next): TP=2 adds the ranks' partial sums in another order, which moves
    # logprobs by up to ~0.2 and changes greedy tokens even unpruned (measured). So: each TP
    # size's keep counts agree with the reference path's within the rounding margin, and TP=2's
    # first token is about as likely as at TP=1 (garbage would put it near log(1/vocab) = -7).
    prompts = random_prompts()
    for kept, tokens in ((kept1, tokens1), (ranks[0], tokens2)):
        by_prompt = [kept.get(str(i)) for i in range(len(prompts))]
        check_against_reference(prepared(name), prompts, TINY_SETTINGS, by_prompt, tokens)
    for one, two, chosen in zip(first1, first2, tokens1, strict=True):
        assert abs(two.get(chosen[0], -99.0) - one[chosen[0]]) < 0.5, (one, two)


def test_tensor_parallel_size_the_heads_do_not_divide_fails_at_start(prepared):
    plugin.register()
    args = EngineArgs(model=str(prepared("tiny-llama")), tensor_parallel_size=3,
                      additional_config={"uniprefill": {}})  # fmt: skip
    with pytest.raises(ValueError, match=r"attention heads \(4\) must be divisible by tensor"):
        args.create_engine_config()


def test_served_tp2_per_request_controls_and_400s(prepared, tmp_path):
    args = ["--max-model-len", "4096", "--tensor-parallel-size", "2"]
    with tiny_llama_server(prepared("tiny-llama"), tmp_path / "server.log", args) as (_, port):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")

        def complete(prompt, **xargs):
            body = {"vllm_xargs": xargs}
            return client.completions.create(
                model="tiny-llama", prompt=prompt, max_tokens=6, temperature=0, extra_body=body
            )

        with pytest.raises(openai.BadRequestError, match="uniprefill_p"):
            complete("The quick brown fox", uniprefill_p=1.5)
        prompt = [(7 * i) % 900 + 10 for i in range(1500)]
        pruned = complete(prompt, uniprefill_p=0.2).choices[0].text
        off = complete(prompt, uniprefill_enabled=False).choices[0].text
        assert pruned != off
        assert served_metrics(port)["pruned_requests"] == 1
        log = (tmp_path / "server.log").read_text()
        assert log.count("UniPrefill pruned request") == 1, log[-2000:]


def test_served_dp2_prunes_on_both_engines_alike(prepared, tmp_path):
    settings = json.dumps({"uniprefill": {"min_prompt_len": 256}})
    args = ["--max-model-len", "4096", "--data-parallel-size", "2", "--additional-config", settings]
    with tiny_llama_server(prepared("tiny-llama"), tmp_path / "server.log", args) as (_, port):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        prompt = [(7 * i) % 900 + 10 for i in range(1500)]

        def complete(salt: str) -> str:  # the same prompt, new to the cache each time
            body = {"vllm_xargs": {"uniprefill_p": 0.5}, "cache_salt": salt}
            reply = client.completions.create(
                model="tiny-llama", prompt=prompt, max_tokens=6, temperature=0, extra_body=body
            )
            return reply.choices[0].text

        with ThreadPoolExecutor(4) as pool:  # at once: vLLM spreads them over the engines
            texts = list(pool.map(complete, "abcd"))
        log = (tmp_path / "server.log").read_text()
    assert len(set(texts)) == 1
    lines = log.splitlines()
    pruned_by = [line.split()[0] for line in lines if "UniPrefill pruned request" in line]
    assert len(pruned_by) == 4 and len(set(pruned_by)) == 2, pruned_by  # both engines pruned
