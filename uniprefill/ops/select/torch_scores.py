"""Block scores in vectorised PyTorch: the fast CPU backend (and a GPU fallback).

All prunable requests at once, keys padded to the longest one, in one pass over cache-sized key
chunks. Logits of a chunk are one batched matmul laid out [requests x key heads, group x last_q,
keys]. Each chunk leaves, per query, its own max and exp-sum and per-block sums of
exp(logit - chunk max); once every chunk is seen, each chunk's block sums are rescaled by
exp(chunk max - final max) / final exp-sum. The logits are computed once and never held whole.
"""

from __future__ import annotations

import math

import torch

TILE_ELEMENTS = 1 << 20  # logits per chunk (4 MB in float32: stays in cache; measured faster)


def _rows(x: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, lo: int, hi: int):
    """Positions lo..hi-1 of each request ([R, hi - lo, ...]). Positions past a request's end
    repeat its last row; they lie after every query, so the causal mask hides them."""
    positions = torch.arange(lo, hi, device=x.device)
    return x[starts[:, None] + torch.minimum(positions[None, :], lens[:, None] - 1)]


def block_scores_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prunable: torch.Tensor,
    *,
    block_size: int,
    queries: torch.Tensor,
) -> torch.Tensor:
    """[B, max_blocks] float32 block scores; rows of requests that are not prunable are zero.

    queries: [B] int64, each request's scoring queries (its last ones). Every request gets the
    largest count's rows; the extra leading rows of requests with fewer count for nothing.
    """
    cu = cu_seqlens.long()
    lens = cu.diff()
    num_reqs, (num_q_heads, head_dim), num_kv_heads = lens.numel(), q.shape[1:], k.shape[1]
    group = num_q_heads // num_kv_heads
    max_blocks = int((lens.max() + block_size - 1) // block_size) if num_reqs else 0
    out = torch.zeros(num_reqs, max_blocks, dtype=torch.float32, device=q.device)
    chosen = prunable.nonzero().squeeze(1)
    if chosen.numel() == 0:
        return out
    reqs, starts, n = chosen.numel(), cu[chosen], lens[chosen]
    last_q = int(queries[chosen].max())
    # [R, 1, group * last_q]: 1 for a request's own scoring queries, 0 for padding rows
    own = torch.arange(last_q, device=q.device) >= (last_q - queries[chosen])[:, None]
    own = own.repeat(1, group)[:, None, :].float()
    width = int(n.max())
    # Queries as [R * Hk, group * last_q, d], scaled; row j is query j % last_q of its group.
    # Padding rows of a short request may lie before its start: clamped to its first token.
    query_at = (n[:, None] - last_q + torch.arange(last_q, device=q.device)).clamp_min(0)
    rows = starts[:, None] + query_at
    q_last = q[rows].float().view(reqs, last_q, num_kv_heads, group, head_dim)
    q_last = (q_last * (1.0 / math.sqrt(head_dim))).permute(0, 2, 3, 1, 4)
    q_last = q_last.reshape(reqs * num_kv_heads, group * last_q, head_dim)
    query_pos = query_at.repeat(1, group)
    chunk = max(block_size, TILE_ELEMENTS // (reqs * num_q_heads * last_q))
    chunk = chunk // block_size * block_size
    key_pos = torch.arange(width, device=q.device)

    chunk_max, chunk_sum, block_sums = [], [], []
    for lo in range(0, width, chunk):
        hi = min(lo + chunk, width)
        keys = _rows(k, starts, n, lo, hi).float()  # [R, c, Hk, d]
        keys = keys.permute(0, 2, 3, 1).reshape(reqs * num_kv_heads, head_dim, hi - lo)
        logits = torch.bmm(q_last, keys).view(reqs, num_kv_heads, group * last_q, hi - lo)
        hidden = key_pos[lo:hi] > query_pos[:, :, None]  # [R, group * last_q, c]
        logits.masked_fill_(hidden[:, None], -math.inf)
        # Key 0 is in the first chunk and visible to every query, so the final max is finite;
        # a later chunk whose keys are all hidden has max -inf and is zeroed by its scale below.
        top = logits.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        probs = torch.exp(logits.sub_(top))
        chunk_max.append(top.squeeze(-1))
        chunk_sum.append(probs.sum(dim=-1))
        probs = torch.nn.functional.pad(probs, (0, -(hi - lo) % block_size))
        block_sums.append(probs.view(*probs.shape[:-1], -1, block_size).sum(dim=-1))

    maxes = torch.stack(chunk_max)  # [chunks, R, Hk, group * last_q]
    final_max = maxes.amax(dim=0)
    rescale = torch.exp(maxes - final_max)
    total = (torch.stack(chunk_sum) * rescale).sum(dim=0)
    scale = rescale / total * own  # each chunk's block sums into probabilities
    blocks = torch.cat(
        [(sums * scale[i, ..., None]).sum(dim=(1, 2)) for i, sums in enumerate(block_sums)], dim=1
    )  # [R, ceil(width / block_size)]
    out[chosen, : blocks.shape[1]] = blocks
    return out
