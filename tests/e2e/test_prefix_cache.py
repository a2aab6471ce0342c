"""Prefix caching with UniPrefill, in real vLLM engines (CPU backend, tiny-llama, float32).

Conversations: each turn's prompt is the previous turn's prompt, that turn's answer and a new
question (token ids, so the history repeats exactly). Cache hits are vLLM's own per-request
count (`RequestOutput.num_cached_tokens`), pruning is the worker's record of the prompts it
pruned, tokens are compared with stock vLLM's (UniPrefill not enabled) on the same prompts.
"""

import pytest
from vllm import SamplingParams

from tests.e2e.helpers import (
    TINY_SETTINGS,
    check_against_reference,
    offline_llm,
    pruning_state,
    random_prompts,
)

MAX_TOKENS = 8
QUESTION = 60  # tokens of each follow-up question
BLOCK = 32  # tokens per KV block (the CPU attention backend takes multiples of 32)
KV_BLOCKS = 100  # one conversation fits; four more long prompts evict it


def greedy(**extra_args) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra_args or None
    )


def _llm(prepared, settings: dict | None):
    extra = {"additional_config": {"uniprefill": settings}} if settings is not None else {}
    return offline_llm(
        model=str(prepared("tiny-llama")),
        dtype="float32",
        max_model_len=2048,
        seed=0,
        block_size=BLOCK,
        num_gpu_blocks_override=KV_BLOCKS,
        **extra,
    )


@pytest.fixture(scope="module")
def stock(prepared):
    with _llm(prepared, None) as llm:
        yield llm


@pytest.fixture(scope="module")
def engine(prepared):
    """UniPrefill with its default prefix-cache settings (repeated_prefix "fill")."""
    with _llm(prepared, TINY_SETTINGS) as llm:
        yield llm


class Conversation:
    """One engine's turns over one history; `turn` sends the next one."""

    def __init__(self, llm, first: list[int], seed: int):
        self.llm, self.prompt, self.seed = llm, list(first), seed
        self.answer: list[int] = []

    def turn(self, question: int = QUESTION, **controls) -> tuple[list[int], int, list[int] | None]:
        """(tokens, vLLM's cached prompt tokens, the worker's keep counts or None: unpruned);
        after the first turn, the prompt gains the last answer and a `question`-token question."""
        if self.answer:
            self.seed += 1
            self.prompt += self.answer + random_prompts((question,), seed=self.seed)[0]
        (out,) = self.llm.generate([{"prompt_token_ids": self.prompt}], greedy(**controls))
        self.answer = list(out.outputs[0].token_ids)
        (worker,) = self.llm.collective_rpc("uniprefill_requests")
        kept = pruning_state(worker)[1].get(out.request_id)
        return self.answer, out.num_cached_tokens, kept


def stock_tokens(stock, prompt: list[int]) -> list[int]:
    (out,) = stock.generate([{"prompt_token_ids": prompt}], greedy())
    return list(out.outputs[0].token_ids)


def evict_cache(llm) -> None:
    """Long prompts of their own (unpruned) take the cached blocks of anything earlier."""
    for prompt in random_prompts((1500,) * 4, seed=99):
        llm.generate([{"prompt_token_ids": prompt}], greedy(uniprefill_enabled=False))


@pytest.mark.parametrize(
    ("first_len", "question", "controls"),
    [(200, QUESTION, {}), (1000, QUESTION, {"uniprefill_enabled": False}), (224, 230, {})],
    ids=["short-first-turn", "first-turn-sent-unpruned", "short-uncached-rest"],
)  # fmt: skip
def test_next_turn_of_an_unpruned_turn_reads_the_cache(
    engine, stock, first_len, question, controls
):
    """Turn 2's history covers cached_share of it, or leaves fewer than min_prompt_len tokens
    uncached (224 cached of 462: 48%, 238 uncached): it is read from the cache, turn 2 is not
    pruned, and it says what stock vLLM says."""
    talk = Conversation(engine, random_prompts((first_len,), seed=10 + first_len)[0], seed=10)
    _, cached, kept = talk.turn(**controls)
    assert cached == 0 and kept is None
    tokens, cached, kept = talk.turn(question)
    assert len(talk.prompt) >= TINY_SETTINGS["min_prompt_len"]  # prunable without the cache
    assert cached >= first_len - BLOCK and kept is None
    assert tokens == stock_tokens(stock, talk.prompt)


def test_repeat_of_a_pruned_turn_is_filled_unpruned_then_read(engine, stock):
    """Default `repeated_prefix: "fill"`: the pruned first turn's blocks are never read; turn 2
    repeats it, reads no cache, is prefilled unpruned (stock's tokens) and fills the cache; turn
    3 reads turn 2's blocks. After the cache is evicted, turn 4 recomputes unpruned."""
    talk = Conversation(engine, random_prompts((1200,), seed=20)[0], seed=20)
    _, cached, kept = talk.turn()
    assert cached == 0 and kept is not None and kept[-1] < kept[0]  # pruned
    tokens, cached, kept = talk.turn()
    assert cached == 0 and kept is None
    assert tokens == stock_tokens(stock, talk.prompt)
    turn2_len = len(talk.prompt)
    tokens, cached, kept = talk.turn()
    assert cached >= turn2_len - BLOCK and kept is None
    assert tokens == stock_tokens(stock, talk.prompt)
    evict_cache(engine)
    tokens, cached, kept = talk.turn()
    assert cached == 0 and kept is None  # repeats the pruned turn 1: filled again
    assert tokens == stock_tokens(stock, talk.prompt)


def test_a_long_new_part_is_pruned_despite_a_short_cached_prefix(engine):
    """A cached prefix under cached_share of the prompt is ignored: the prompt is pruned whole."""
    shared, rest = random_prompts((200, 1000), seed=30)
    engine.generate([{"prompt_token_ids": shared}], greedy())
    talk = Conversation(engine, shared + rest, seed=30)
    _, cached, kept = talk.turn()
    assert cached == 0 and kept is not None and kept[-1] < kept[0]


def test_repeat_of_a_pruned_turn_is_pruned_again_under_prune(prepared):
    """`repeated_prefix: "prune"`: turn 2 is pruned as a fresh prompt (no cache read): its keep
    counts agree with the reference path's on turn 2's whole prompt drop by drop, and so do its
    tokens where the selection is determined (uniprefill/ops/select/margin.py)."""
    settings = {**TINY_SETTINGS, "repeated_prefix": "prune"}
    with _llm(prepared, settings) as llm:
        talk = Conversation(llm, random_prompts((1200,), seed=40)[0], seed=40)
        _, cached, kept = talk.turn()
        assert cached == 0 and kept[-1] < kept[0]
        tokens, cached, kept = talk.turn()
    assert cached == 0 and kept[-1] < kept[0]
    model_dir = prepared("tiny-llama")
    assert check_against_reference(model_dir, [talk.prompt], settings, [kept], [tokens]) == 1
