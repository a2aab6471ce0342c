"""The rounding margin the engine-vs-reference comparison allows (uniprefill/ops/select/margin.py):
exact where the scores decide, wider only around blocks within the tolerance of a flip, and a
planted flip outside the margin still fails."""

import pytest
import torch

from uniprefill.ops.select.common import keep_from_block_scores
from uniprefill.ops.select.margin import assert_keep_counts_agree, keep_count_bounds
from uniprefill.ops.select.rule import SelectionRule

RULE = SelectionRule(block_size=16, sink=64, last_q=32, min_prompt_len=256)
# Block masses of tiny-qwen3-next's 300-token test prompt at its first drop layer (bfloat16,
# reference path): block 16 (12 unforced tokens) and block 2 (in the sink) differ by 0.5%, and
# the kept/dropped boundary runs between them. On CPUs with AVX-512 BF16, vLLM dropped block 16.
QWEN3_NEXT_FIRST_DROP = torch.tensor(
    [0.05440, 0.05844, 0.05365, 0.05663, 0.05624, 0.05711, 0.05566, 0.05644, 0.05603, 0.05679,
     0.05791, 0.05760, 0.05711, 0.05509, 0.05577, 0.05831, 0.05392, 0.03572, 0.00719]
)  # fmt: skip


def rule_keeps(scores: torch.Tensor, n: int, p: float, rule: SelectionRule = RULE) -> int:
    """Tokens the operator's own top-p step keeps for these block scores."""
    cu = torch.tensor([0, n])
    keep = keep_from_block_scores(scores[None].float(), cu, torch.tensor([True]), p=p, rule=rule)
    return int(keep.sum())


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("normalize_over", ["all_blocks", "unforced_blocks"])
def test_without_tolerance_the_bounds_are_what_the_rule_keeps(seed, normalize_over):
    rule = SelectionRule(16, 64, 32, 256, normalize_over)
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(300, 2000, (1,), generator=gen))
    scores = torch.rand(-(-n // 16), generator=gen, dtype=torch.float64) ** 4  # few heavy blocks
    exact = rule_keeps(scores, n, 0.9, rule)
    assert keep_count_bounds(scores, n, p=0.9, rule=rule, tolerance=0.0) == (exact, exact)
    fewest, most = keep_count_bounds(scores, n, p=0.9, rule=rule, tolerance=0.05)
    assert fewest <= exact <= most


def test_a_flip_within_rounding_is_allowed_and_one_outside_is_not():
    assert rule_keeps(QWEN3_NEXT_FIRST_DROP, 300, 0.9) == 300  # the reference path's count
    assert keep_count_bounds(QWEN3_NEXT_FIRST_DROP, 300, p=0.9, rule=RULE, tolerance=1e-4) == (
        300,
        300,
    )
    # Within 1% rounding either block may go: the AVX-512 engine's 288 is a flip.
    assert keep_count_bounds(QWEN3_NEXT_FIRST_DROP, 300, p=0.9, rule=RULE, tolerance=1e-2) == (
        288,
        300,
    )
    # Planted: an engine that also dropped block 6 (mass 0.0557, 3% above the boundary).
    with pytest.raises(AssertionError, match="drop 0: the engine kept 272 of 300"):
        assert_keep_counts_agree(
            [300, 272], [300, 300], [QWEN3_NEXT_FIRST_DROP], p=0.9, rule=RULE, tolerance=1e-2
        )


def test_later_drops_are_compared_only_while_the_kept_set_is_determined():
    heavy_first = torch.linspace(1.0, 0.1, 19)
    decided = keep_count_bounds(heavy_first, 300, p=0.9, rule=RULE, tolerance=1e-3)
    assert decided[0] == decided[1] < 300
    kept = [300, decided[0], decided[0]]
    scores = [heavy_first, heavy_first]  # the second drop sees what the first one kept
    second = keep_count_bounds(heavy_first, decided[0], p=0.9, rule=RULE, tolerance=1e-3)
    assert second[0] == second[1]
    kept[2] = second[0]
    assert assert_keep_counts_agree(kept, kept, scores, p=0.9, rule=RULE, tolerance=1e-3)
    with pytest.raises(AssertionError, match="drop 1"):  # a wrong count at the second drop
        assert_keep_counts_agree(
            [300, kept[1], kept[2] - 16], kept, scores, p=0.9, rule=RULE, tolerance=1e-3
        )
    # After a drop that may have gone either way, later counts are not compared.
    assert not assert_keep_counts_agree(
        [300, 288, 1], [300, 300, 284], [QWEN3_NEXT_FIRST_DROP] * 2, p=0.9, rule=RULE,
        tolerance=1e-2,
    )  # fmt: skip
