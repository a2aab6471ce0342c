"""Per-request controls: strict parsing for the API server; the scheduler's tolerant p and its
decision for each prompt."""

import dataclasses
from types import SimpleNamespace

import pytest

from uniprefill.config import UniPrefillConfig
from uniprefill.requests import (
    ParagraphBreaks,
    parse_request_controls,
    prompt_plan,
    request_p,
    scoring_queries,
    will_prune,
)
from uniprefill.step_plan import PromptPlan

CONFIG = UniPrefillConfig(
    p=0.95, drop_layers=(2, 4), sink=16, last_q=16, min_prompt_len=100, queries="last_q"
)


@pytest.mark.parametrize(
    ("extra_args", "p"),
    [
        (None, None),
        ({"other_plugin": 1}, None),
        ({"uniprefill_p": 0.5}, 0.5),
        ({"uniprefill_p": "0.7"}, 0.7),
        ({"uniprefill_p": 1}, 1.0),
        ({"uniprefill_enabled": False}, 1.0),
        ({"uniprefill_enabled": "false"}, 1.0),
        ({"uniprefill_enabled": 0}, 1.0),
        ({"uniprefill_enabled": True}, None),
        ({"uniprefill_enabled": "true", "uniprefill_p": 0.8}, 0.8),
        ({"uniprefill_enabled": False, "uniprefill_p": 0.8}, 1.0),  # off wins
        ({"uniprefill_preset": "fast"}, 0.99),
        ({"uniprefill_preset": "default"}, UniPrefillConfig().p),
        ({"uniprefill_preset": "fast", "uniprefill_p": 0.5}, 0.5),  # an explicit p wins
        ({"uniprefill_preset": "fast", "uniprefill_enabled": False}, 1.0),
    ],
)
def test_valid_controls(extra_args, p):
    assert parse_request_controls(extra_args) == p


@pytest.mark.parametrize(
    ("extra_args", "message"),
    [
        ({"uniprefill_p": 0}, r"uniprefill_p must be a number in \(0, 1\], .* got 0"),
        # each of these once passed `0 < p <= 1` and became 0.0 in the float32 plan
        ({"uniprefill_p": 1e-300}, "at least 1.18e-38 .float32., got 1e-300"),
        ({"uniprefill_p": 1e-46}, "uniprefill_p must be"),
        ({"uniprefill_p": "1e-50"}, "uniprefill_p must be"),
        ({"uniprefill_p": 5e-324}, "uniprefill_p must be"),
        ({"uniprefill_p": -0.0}, "uniprefill_p must be"),
        ({"uniprefill_p": "inf"}, "uniprefill_p must be"),
        ({"uniprefill_p": "nan"}, "uniprefill_p must be"),
        ({"uniprefill_p": "1e400"}, "uniprefill_p must be"),
        ({"uniprefill_p": {"p": 0.5}}, "uniprefill_p must be"),
        ({"uniprefill_p": None}, "uniprefill_p must be"),
        ({"uniprefill_p": "9" * 100_000}, r"\.\.\. \(100002 characters\)"),  # cut short
        ({"uniprefill_p": 1.01}, "uniprefill_p must be"),
        ({"uniprefill_p": "x"}, "uniprefill_p must be"),
        ({"uniprefill_p": True}, "uniprefill_p must be"),
        ({"uniprefill_p": [0.5]}, "uniprefill_p must be"),
        ({"uniprefill_enabled": "yes"}, "uniprefill_enabled must be true or false"),
        ({"uniprefill_enabled": 0.0}, "uniprefill_enabled must be true or false"),
        ({"uniprefill_P": 0.5}, r"unknown UniPrefill request field\(s\) \['uniprefill_P'\]"),
        ({"uniprefill_preset": "quick"}, r"uniprefill_preset must be one of \['default', 'paper'"),
        ({"uniprefill_preset": None}, "uniprefill_preset must be one of"),
    ],
)
def test_invalid_controls_name_the_field(extra_args, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_request_controls(extra_args)
    assert error.value.field in extra_args  # what the 400 names as the parameter


def params(extra_args=None, prompt_logprobs=None):
    return SimpleNamespace(extra_args=extra_args, prompt_logprobs=prompt_logprobs)


def test_request_p_defaults_overrides_and_never_fails():
    assert request_p(CONFIG, params()) == 0.95
    assert request_p(CONFIG, params({"uniprefill_p": 0.5})) == 0.5
    assert request_p(CONFIG, params({"uniprefill_p": 7})) == 1.0  # invalid: not pruned
    assert request_p(CONFIG, params({"uniprefill_preset": "paper"})) == 0.99
    assert request_p(CONFIG, params({"uniprefill_preset": "quick"})) == 1.0
    assert request_p(CONFIG, params(prompt_logprobs=1)) == 1.0  # needs every prompt row
    assert request_p(UniPrefillConfig(enabled=False, drop_layers=(2,)), params()) == 1.0
    assert request_p(UniPrefillConfig(drop_layers=()), params()) == 1.0


def test_will_prune_follows_the_operators_length_rule():
    assert will_prune(CONFIG, 0.9, 100, 16)
    assert not will_prune(CONFIG, 0.9, 99, 16)  # below min_prompt_len
    assert not will_prune(CONFIG, 1.0, 5000, 16)
    assert not will_prune(UniPrefillConfig(sink=64, last_q=64, min_prompt_len=0), 0.9, 128, 64)
    # a prompt scored by its 100-token question needs sink + 100 tokens before anything can go
    assert not will_prune(CONFIG, 0.9, 116, 100) and will_prune(CONFIG, 0.9, 117, 100)


BREAK = 7  # a blank-line token id in these prompts
NEWLINE = 8  # a lone newline: two in a row make a blank line too
BREAKS = ParagraphBreaks(inside=frozenset([BREAK]), ends={NEWLINE}, starts={NEWLINE})


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ([BREAK, *range(20, 60)], 40),  # the 40 tokens after the last blank line
        ([BREAK, 1, 2, BREAK, *range(20, 30)], 16),  # a short last paragraph: at least last_q
        ([BREAK, *range(20, 120)], 100),  # exactly max_queries
        ([BREAK, *range(20, 121)], 16),  # longer than max_queries: no question found
        (list(range(20, 220)), 16),  # no blank line near the end (a raw completion prompt)
        ([BREAK, 1, NEWLINE, NEWLINE, *range(20, 50)], 30),  # a blank line of two tokens
        ([BREAK, 1, NEWLINE, 2, *range(20, 50)], 33),  # one newline is no blank line
    ],
)
def test_question_queries_are_the_tokens_after_the_last_blank_line(tail, expected):
    config = UniPrefillConfig(queries="question", last_q=16, max_queries=100)
    prompt = [BREAK, *range(100, 400), *tail]
    assert scoring_queries(config, prompt, BREAKS) == expected
    assert scoring_queries(CONFIG, prompt, BREAKS) == 16  # queries="last_q"
    assert scoring_queries(config, None, BREAKS) == 16  # prompt embeddings


def test_the_smallest_p_accepted_runs_in_float32():
    import torch

    from uniprefill.ops.select.rule import MIN_P

    assert parse_request_controls({"uniprefill_p": MIN_P}) == MIN_P
    assert torch.tensor([MIN_P], dtype=torch.float32).item() > 0


def test_the_scheduler_prunes_a_long_prompt_unless_the_cache_mostly_holds_it():
    """prompt_plan: cached_share 0.5 and min_prompt_len 100 (CONFIG)."""
    plan = dict(p=0.9, prompt_len=1000, queries=16)
    assert prompt_plan(CONFIG, **plan, cached=0) == PromptPlan(p=0.9, queries=16)
    assert prompt_plan(CONFIG, **plan, cached=499) == PromptPlan(p=0.9, queries=16)
    assert prompt_plan(CONFIG, **plan, cached=500) is None  # half of it cached
    assert prompt_plan(CONFIG, **{**plan, "p": 1.0}, cached=0) is None  # pruning off
    assert prompt_plan(CONFIG, **{**plan, "prompt_len": 99}, cached=0) is None  # too short
    # a cached prefix leaving fewer than min_prompt_len tokens to compute: read from the cache
    long = dict(p=0.9, prompt_len=10_000, queries=16)
    assert prompt_plan(CONFIG, **long, cached=4_000) is not None
    assert prompt_plan(dataclasses.replace(CONFIG, cached_share=1.0), **long, cached=9_950) is None
