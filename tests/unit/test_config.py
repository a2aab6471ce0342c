"""UniPrefillConfig: strict parsing, range checks, drop-layer resolution."""

import pytest

from uniprefill.config import UniPrefillConfig, auto_drop_layers
from uniprefill.ops import SelectionRule

FULL, SLIDING, LINEAR = "full_attention", "sliding_attention", "linear_attention"


def test_defaults_are_the_fast_preset_at_a_higher_p():
    config = UniPrefillConfig.from_dict({})
    assert (config.p, config.block_size, config.sink, config.last_q) == (0.995, 16, 128, 16)
    assert config.enabled and config.drop_layers == "early" and config.queries == "question"
    fast = UniPrefillConfig.from_dict({"preset": "fast"})
    assert fast == UniPrefillConfig(p=0.99)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"p": 0.0}, r"^uniprefill\.p must be in \(0, 1\]"),
        ({"p": 1.5}, r"p must be in \(0, 1\]"),
        ({"p": "high"}, "p must be a number"),
        ({"block_size": 48}, r"^uniprefill\.block_size must be a power of two"),
        ({"block_size": 0}, "block_size must be a power of two"),
        ({"sink": -1}, "sink must be a non-negative integer"),
        ({"last_q": -5}, "last_q must be a non-negative integer"),
        ({"last_q": 0}, "last_q must be at least 1"),
        ({"min_prompt_len": -1}, "min_prompt_len must be a non-negative integer"),
        ({"drop_layers": "some"}, r"drop_layers must be one of \['auto', 'early'\] or a list"),
        ({"drop_layers": [-1]}, "drop_layers must be non-negative"),
        ({"drop_layers": [5, 3]}, "strictly increasing"),
        ({"enabled": "yes"}, "enabled must be true or false"),
        ({"normalize_over": "some"}, r"normalize_over must be one of \['all_blocks'"),
        ({"cached_share": 0}, r"^uniprefill\.cached_share must be a number in \(0, 1\]"),
        ({"cached_share": 1.2}, r"cached_share must be a number in \(0, 1\], got 1.2"),
        ({"cached_share": True}, "cached_share must be a number"),
        ({"repeated_prefix": "reuse"}, r"repeated_prefix must be one of \['fill', 'prune'\]"),
        ({"queries": "last"}, r"^uniprefill\.queries must be one of \['last_q', 'question'\]"),
        ({"max_queries": 8}, r"max_queries must be an integer of at least last_q \(16\), got 8"),
        ({"max_queries": "many"}, "max_queries must be an integer"),
        (
            {"top_p": 0.9},
            r"unknown uniprefill setting\(s\) \['top_p'\]; valid settings: preset, enabled",
        ),
    ],
    ids=lambda x: str(x) if isinstance(x, dict) else None,
)
def test_bad_settings_are_rejected_with_what_to_fix(raw, message):
    with pytest.raises(ValueError, match=message):
        UniPrefillConfig.from_dict(raw)


def test_rule_is_what_the_operator_takes():
    config = UniPrefillConfig(
        block_size=32, sink=8, last_q=4, min_prompt_len=10, normalize_over="unforced_blocks"
    )
    assert config.rule == SelectionRule(
        block_size=32, sink=8, last_q=4, min_prompt_len=10, normalize_over="unforced_blocks"
    )


def test_round_trip_through_dict():
    config = UniPrefillConfig.from_dict({"p": 0.95, "drop_layers": [3, 7]})
    assert config.drop_layers == (3, 7)
    assert UniPrefillConfig.from_dict(config.to_dict()) == config


def test_resolve_rejects_layers_outside_the_model():
    config = UniPrefillConfig.from_dict({"drop_layers": [2, 8]})
    with pytest.raises(ValueError, match=r"layer 8 is outside the model.s 8 layers \(valid: 0"):
        config.resolve([FULL] * 8)


def test_resolve_rejects_non_full_attention_layers():
    kinds = [SLIDING, SLIDING, FULL] * 4
    config = UniPrefillConfig.from_dict({"drop_layers": [2, 3]})
    with pytest.raises(ValueError, match=r"layer 3 is a sliding_attention layer.*\[2, 5, 8, 11\]"):
        config.resolve(kinds)
    valid = UniPrefillConfig.from_dict({"drop_layers": [2, 8]})
    assert valid.resolve(kinds).drop_layers == (2, 8)


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        ([FULL] * 24, (6, 10, 14, 18)),  # Qwen2.5-0.5B
        ([FULL] * 32, (8, 13, 18, 23)),  # Llama-3.1-8B
        ([FULL] * 8, (2, 4, 6)),  # tiny models
        # Gemma-3-270M: not 5, the first global layer (only sliding layers before it)
        ([FULL if i % 6 == 5 else SLIDING for i in range(18)], (11,)),
        ([FULL if i % 6 == 5 else SLIDING for i in range(62)], (17, 29, 41, 53)),  # Gemma-3-27B
        ([FULL if i % 4 == 3 else LINEAR for i in range(48)], (15, 23, 31, 39)),  # Qwen3-Next
    ],
    ids=["qwen2.5-24", "llama-32", "tiny-8", "gemma3-18", "gemma3-62", "qwen3next-48"],
)
def test_auto_drop_layers_pick_full_attention_after_the_first_quarter(kinds, expected):
    assert auto_drop_layers(kinds) == expected
    assert UniPrefillConfig(drop_layers="auto").resolve(kinds).drop_layers == expected


def test_paper_preset_is_the_papers_rule_and_explicit_keys_win():
    paper = UniPrefillConfig.from_dict({"preset": "paper"})
    assert (paper.p, paper.block_size, paper.sink, paper.last_q) == (0.99, 64, 128, 128)
    assert (paper.normalize_over, paper.drop_layers, paper.queries) == (
        "all_blocks",
        "auto",
        "last_q",
    )
    assert UniPrefillConfig.from_dict({"preset": "paper", "p": 0.95}).p == 0.95
    with pytest.raises(
        ValueError,
        match="unknown uniprefill preset 'quick'; presets: \\['default', 'paper', 'fast'\\]",
    ):
        UniPrefillConfig.from_dict({"preset": "quick"})


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        ([FULL] * 24, (3, 6, 9, 12, 15, 18)),  # Qwen2.5-0.5B
        ([FULL] * 32, (4, 8, 12, 16, 20, 24)),  # Llama-3.1-8B
        ([FULL if i % 6 == 5 else SLIDING for i in range(18)], (11,)),  # Gemma-3-270M
        ([FULL if i % 4 == 3 else LINEAR for i in range(48)], (7, 15, 23, 31, 39)),  # Qwen3-Next
    ],
    ids=["qwen2.5-24", "llama-32", "gemma3-18", "qwen3next-48"],
)
def test_default_and_fast_drop_from_an_eighth_of_the_depth_by_the_question(kinds, expected):
    assert UniPrefillConfig().resolve(kinds).drop_layers == expected
    fast = UniPrefillConfig.from_dict({"preset": "fast"}).resolve(kinds)
    assert fast.drop_layers == expected == auto_drop_layers(kinds, "early")
    assert (fast.queries, fast.block_size, fast.p) == ("question", 16, 0.99)
    assert UniPrefillConfig.from_dict({"preset": "fast", "p": 0.995}).p == 0.995


def test_a_preset_matches_an_engine_only_in_its_engine_wide_settings():
    kinds = [FULL] * 24
    default = UniPrefillConfig().resolve(kinds)
    fast = UniPrefillConfig.from_dict({"preset": "fast"}).resolve(kinds)
    assert default.preset_mismatch("default", kinds) == []
    assert fast.preset_mismatch("fast", kinds) == []
    # p is per request, and so are the settings no preset touches
    assert (
        UniPrefillConfig(p=0.5, min_prompt_len=10).resolve(kinds).preset_mismatch("default", kinds)
        == []
    )
    assert default.preset_mismatch("fast", kinds) == []  # they differ only in p
    assert fast.preset_mismatch("paper", kinds) == [
        "drop_layers [6, 10, 14, 18] (this server: [3, 6, 9, 12, 15, 18])",
        "block_size 64 (this server: 16)",
        "last_q 128 (this server: 16)",
        'queries "last_q" (this server: "question")',
    ]
