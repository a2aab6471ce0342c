"""The selection rule (docs/design/selection.md), written plainly: the oracle every backend is
tested against.

One request at a time, float32, the full (last_q x n) probability matrix per head. Slow on purpose.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from uniprefill.ops.select.common import Selection, prunable_mask, selection_from_keep
from uniprefill.ops.select.rule import SelectionRule


def token_scores_oracle(q_last: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """How much the last queries attend to each key, summed over queries and heads.

    q_last: [last_q, Hq, d], the request's last queries; k: [n, Hk, d], all its keys.
    Query i sits at position n - last_q + i and sees keys 0..n - last_q + i (causal); query head
    h uses key head h // (Hq // Hk). Returns [n] float32.
    """
    last_q, num_q_heads, head_dim = q_last.shape
    n, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    query_pos = torch.arange(n - last_q, n).unsqueeze(1)
    hidden = torch.arange(n).unsqueeze(0) > query_pos  # [last_q, n]: keys after the query
    scores = torch.zeros(n, dtype=torch.float32)
    for h in range(num_q_heads):
        logits = q_last[:, h].float() @ k[:, h // group].float().T / math.sqrt(head_dim)
        probs = torch.softmax(logits.masked_fill(hidden, -math.inf), dim=-1)
        scores += probs.sum(dim=0)
    return scores


def top_p_blocks_oracle(block_scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep blocks by descending score while the normalised mass before them is <= p.

    Ties go to the lower block index. The top block is always kept. Returns a [nb] bool mask.
    """
    mass = (block_scores / block_scores.sum()).tolist()
    order = sorted(range(len(mass)), key=lambda b: (-mass[b], b))
    keep = torch.zeros(len(mass), dtype=torch.bool)
    before = 0.0
    for b in order:
        if before > p:
            break
        keep[b] = True
        before += mass[b]
    return keep


def select_tokens_oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    p: float | torch.Tensor,
    rule: SelectionRule,
    queries: torch.Tensor,
    reduce_block_scores: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Selection:
    """p: one value, or [B] float32 per request; queries: [B] scoring queries per request."""
    block_size, sink = rule.block_size, rule.sink
    bounds = cu_seqlens.tolist()
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    counts = queries.tolist()
    max_blocks = max((math.ceil((e - s) / block_size) for s, e in spans), default=0)
    block_scores = torch.zeros(len(spans), max_blocks)
    lens = cu_seqlens.long().diff()
    prunable = prunable_mask(lens, p=p, rule=rule, queries=queries).tolist()
    pruned = []
    for r, (start, end) in enumerate(spans):
        n, last_q = end - start, counts[r]
        if prunable[r]:
            scores = token_scores_oracle(q[end - last_q : end], k[start:end])
            for b in range(math.ceil(n / block_size)):
                block_scores[r, b] = scores[b * block_size : (b + 1) * block_size].sum()
            pruned.append(r)
    if reduce_block_scores is not None:  # tensor parallelism: every rank's heads count
        block_scores = reduce_block_scores(block_scores)

    keep = torch.ones(q.shape[0], dtype=torch.bool)
    for r in pruned:
        start, end = spans[r]
        n, last_q = end - start, counts[r]
        scores = block_scores[r, : math.ceil(n / block_size)].clone()
        if rule.normalize_over == "unforced_blocks":  # blocks wholly inside sink or tail drop out
            for b in range(len(scores)):
                if (b + 1) * block_size <= sink or b * block_size >= n - last_q:
                    scores[b] = 0.0
        kept_blocks = top_p_blocks_oracle(scores, float(p[r]) if torch.is_tensor(p) else p)
        request_keep = kept_blocks.repeat_interleave(block_size)[:n]
        request_keep[:sink] = True
        request_keep[n - last_q :] = True
        keep[start:end] = request_keep
    return selection_from_keep(keep, cu_seqlens, block_scores)
