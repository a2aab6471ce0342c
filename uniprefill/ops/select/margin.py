"""How many tokens a drop layer may keep when its block masses carry rounding error.

vLLM's CPU kernels and the Hugging Face reference path compute the same model with different
kernels (and vLLM picks other kernels on other CPUs), so their block masses at a drop layer agree
only to rounding. Where two blocks' masses are that close, or the mass before a block is that
close to p, either engine may keep either block: a flip, not a bug. `keep_count_bounds` gives
the fewest and the most tokens the rule keeps when every block's normalised mass may be off by a
relative `tolerance`; a count outside them is a real disagreement.
"""

from __future__ import annotations

import torch

from uniprefill.ops.select.common import forced_blocks, prunable_mask
from uniprefill.ops.select.rule import SelectionRule

# Relative error of a block's mass between vLLM's CPU kernels and the reference path's, by dtype.
# bfloat16: tiny-qwen3-next's masses in bf16 and float32 on the reference path differ by up to
# 1.3%, and vLLM's bf16 kernels differ by CPU (AVX-512 BF16 and AMX CPUs run other matmul, conv
# and Gated DeltaNet kernels). Loose on a random model, which attends almost evenly: many blocks
# sit within 3% of the threshold.
MASS_TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2}


def keep_count_bounds(
    block_scores: torch.Tensor,
    n: int,
    *,
    p: float,
    rule: SelectionRule,
    tolerance: float,
    queries: int | None = None,
) -> tuple[int, int]:
    """(fewest, most) tokens of an n-token request kept by the rule, over every perturbation of
    its block masses by a factor within [1 - tolerance, 1 + tolerance].

    block_scores: [num_blocks] the request's block scores at the drop layer (any scale).
    queries: the request's scoring queries (default rule.last_q).
    """
    queries = rule.last_q if queries is None else queries
    if not prunable_mask(n, p=p, rule=rule, queries=queries):
        return n, n
    num_blocks = -(-n // rule.block_size)
    scores = block_scores[:num_blocks].double()
    block = torch.arange(num_blocks)
    starts, ends = block * rule.block_size, torch.clamp((block + 1) * rule.block_size, max=n)
    if rule.normalize_over == "unforced_blocks":  # as the operator's top-p step does
        scores = scores.masked_fill(forced_blocks(block, torch.tensor([n]), rule, queries)[0], 0.0)
    mass = scores / scores.sum()
    low, high = mass * (1 - tolerance), mass * (1 + tolerance)
    others = ~torch.eye(num_blocks, dtype=torch.bool)  # [b, c]: c is another block than b
    # The mass ahead of block b in the descending order: at least the blocks surely heavier,
    # at most every block that may be heavier.
    surely_ahead = ((low[None, :] > high[:, None]) & others).double() @ low
    maybe_ahead = ((high[None, :] >= low[:, None]) & others).double() @ high
    surely_kept = maybe_ahead <= p
    maybe_kept = surely_ahead <= p

    # Tokens kept whatever the scores: the sink and the scoring queries.
    unforced = (
        torch.minimum(ends, torch.tensor(n - queries)) - torch.clamp(starts, min=rule.sink)
    ).clamp(min=0)
    forced = n - int(unforced.sum())
    return forced + int(unforced[surely_kept].sum()), forced + int(unforced[maybe_kept].sum())


def drop_bounds(
    engine_kept: list[int],
    reference_kept: list[int],
    reference_scores: list[torch.Tensor],
    *,
    p: float,
    rule: SelectionRule,
    tolerance: float,
    queries: int | None = None,
) -> list[tuple[int, int, int]]:
    """(fewest, most, the engine's count) per drop layer, in order, while the engine ran on the
    reference's tokens: up to and including the first drop the margin leaves undecided or whose
    engine count falls outside it (later drops then score other tokens, so they are not
    compared). Keep counts: the prompt, then after each drop layer."""
    bounds = []
    for drop, scores in enumerate(reference_scores):
        fewest, most = keep_count_bounds(
            scores, reference_kept[drop], p=p, rule=rule, tolerance=tolerance, queries=queries
        )
        kept = engine_kept[drop + 1]
        bounds.append((fewest, most, kept))
        if fewest != most or not fewest <= kept <= most:
            break
    return bounds


def assert_keep_counts_agree(
    engine_kept: list[int],
    reference_kept: list[int],
    reference_scores: list[torch.Tensor],
    *,
    p: float,
    rule: SelectionRule,
    tolerance: float,
    queries: int | None = None,
) -> bool:
    """Check an engine's keep counts (prompt, then after each drop layer) against the reference
    path's, drop by drop, within the rounding margin. True when every drop's kept set was
    determined by the reference's scores (so the engine ran on the same tokens throughout and
    its output can be compared exactly); False once a drop may have gone either way."""
    assert engine_kept[0] == reference_kept[0]
    bounds = drop_bounds(
        engine_kept, reference_kept, reference_scores,
        p=p, rule=rule, tolerance=tolerance, queries=queries,
    )  # fmt: skip
    for drop, (fewest, most, kept) in enumerate(bounds):
        assert fewest <= kept <= most, (
            f"drop {drop}: the engine kept {kept} of {reference_kept[drop]} tokens, the rule "
            f"keeps {fewest}..{most} within a relative mass tolerance of {tolerance}"
        )
    return all(fewest == most for fewest, most, _ in bounds)
