"""What every selection backend shares: the result type, which requests are pruned, and the
vectorised step from block scores to kept tokens (top-p per request, forced tokens, offsets).

Backends differ only in how they compute block scores, the expensive part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uniprefill.ops.select.rule import SelectionRule


@dataclass(frozen=True)
class Selection:
    """The tokens a drop layer keeps, over a varlen batch of B requests and T tokens.

    keep: [T] bool, token t survives. kept_indices: [T_kept] int64, ascending.
    lens: [B] int32, survivors per request. cu_seqlens: [B + 1] int32, their cumulative offsets.
    block_scores: [B, max_blocks] float32, the scores top-p ran on (zero for requests not pruned).
    """

    keep: torch.Tensor
    kept_indices: torch.Tensor
    lens: torch.Tensor
    cu_seqlens: torch.Tensor
    block_scores: torch.Tensor


QueryCounts = int | torch.Tensor  # scoring queries: one count, or [B] int64 per request


def prunable_mask(
    lens: torch.Tensor | int,
    *,
    p: float | torch.Tensor,
    rule: SelectionRule,
    queries: QueryCounts | None = None,
) -> torch.Tensor | bool:
    """[B] bool: a request is pruned only if something can go (decode rows never can).

    p: one value for all requests, or [B] float32 per request. queries: each request's scoring
    queries (default rule.last_q). Plain numbers in give a plain bool (how the engine core
    decides before any tensor exists).
    """
    queries = rule.last_q if queries is None else queries
    return (lens > rule.sink + queries) & (lens >= rule.min_prompt_len) & (p < 1.0)


def forced_blocks(
    block: torch.Tensor, lens: torch.Tensor, rule: SelectionRule, queries: QueryCounts | None = None
) -> torch.Tensor:
    """[B, len(block)] bool: block lies entirely in the sink or in the scoring queries."""
    queries = rule.last_q if queries is None else queries
    in_sink = (block + 1) * rule.block_size <= rule.sink
    in_tail = block * rule.block_size >= (lens - queries)[:, None]
    return in_sink[None, :] | in_tail


def selection_from_keep(
    keep: torch.Tensor, cu_seqlens: torch.Tensor, block_scores: torch.Tensor
) -> Selection:
    kept_before = torch.zeros(keep.numel() + 1, dtype=torch.int64, device=keep.device)
    torch.cumsum(keep, dim=0, out=kept_before[1:])
    new_cu = kept_before[cu_seqlens.long()].to(torch.int32)
    return Selection(
        keep=keep,
        kept_indices=keep.nonzero().squeeze(1),
        lens=new_cu.diff(),
        cu_seqlens=new_cu,
        block_scores=block_scores,
    )


def keep_from_block_scores(
    block_scores: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prunable: torch.Tensor,
    *,
    p: float | torch.Tensor,
    rule: SelectionRule,
    queries: QueryCounts | None = None,
) -> torch.Tensor:
    """Top-p over each request's blocks, then forced tokens. Returns keep: [T] bool.

    block_scores: [B, max_blocks] float32, zero past each request's last block.
    p: one value, or [B] float32 per request. queries: as in prunable_mask.
    """
    cu = cu_seqlens.long()
    lens = cu.diff()
    queries = rule.last_q if queries is None else queries
    num_blocks = (lens + rule.block_size - 1) // rule.block_size
    block = torch.arange(block_scores.shape[1], device=cu.device)
    real_block = block < num_blocks[:, None]
    if rule.normalize_over == "unforced_blocks":
        block_scores = block_scores.masked_fill(forced_blocks(block, lens, rule, queries), 0.0)
    mass = block_scores / block_scores.sum(dim=1, keepdim=True).clamp_min(1e-30)
    # Stable descending sort: equal scores keep block order, so ties go to the earlier block.
    sorted_mass, order = torch.sort(mass, dim=1, descending=True, stable=True)
    before = torch.cumsum(sorted_mass, dim=1) - sorted_mass
    p = p[:, None] if isinstance(p, torch.Tensor) else p
    block_keep = torch.zeros_like(real_block).scatter_(1, order, before <= p) & real_block

    tokens = torch.arange(int(cu[-1]), device=cu.device)
    request = torch.searchsorted(cu[1:], tokens, right=True)
    pos = tokens - cu[request]
    tail = queries[request] if isinstance(queries, torch.Tensor) else queries
    forced = (pos < rule.sink) | (pos >= lens[request] - tail) | ~prunable[request]
    return forced | block_keep[request, pos // rule.block_size]
