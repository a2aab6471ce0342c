"""Block scores in vectorised PyTorch: the fast CPU backend (and a GPU fallback).

All prunable requests at once, keys padded to the longest one and taken in chunks, two passes:
the first finds each query's softmax max and normaliser (online), the second sums probabilities
into blocks. Memory stays at one [B, Hq, last_q, chunk] tile, never [B, Hq, last_q, n].
"""

from __future__ import annotations

import math

import torch

TILE_ELEMENTS = 1 << 24  # logits per chunk tile (64 MB in float32)


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
    last_q: int,
) -> torch.Tensor:
    """[B, max_blocks] float32 block scores; rows of requests that are not prunable are zero."""
    cu = cu_seqlens.long()
    lens = cu.diff()
    num_reqs = lens.numel()
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    group = q.shape[1] // num_kv_heads
    max_blocks = int((lens.max() + block_size - 1) // block_size) if num_reqs else 0
    out = torch.zeros(num_reqs, max_blocks, dtype=torch.float32, device=q.device)
    chosen = prunable.nonzero().squeeze(1)
    if chosen.numel() == 0:
        return out
    starts, n = cu[chosen], lens[chosen]
    width = int(n.max())
    # [R, last_q, Hk, group, d]: each request's last queries, grouped by their key head.
    q_last = q[(starts + n - last_q)[:, None] + torch.arange(last_q, device=q.device)]
    q_last = q_last.float().view(len(chosen), last_q, num_kv_heads, group, head_dim)
    q_last = q_last * (1.0 / math.sqrt(head_dim))
    query_pos = (n[:, None] - last_q + torch.arange(last_q, device=q.device))[
        :, :, None, None, None
    ]
    chunk = max(block_size, TILE_ELEMENTS // (len(chosen) * q.shape[1] * last_q))
    chunk = chunk // block_size * block_size

    def logits(lo: int) -> torch.Tensor:  # [R, last_q, Hk, group, c], hidden keys at -inf
        hi = min(lo + chunk, width)
        keys = _rows(k, starts, n, lo, hi).float()
        tile = torch.einsum("rqhgd,rkhd->rqhgk", q_last, keys)
        key_pos = torch.arange(lo, hi, device=q.device)
        return tile.masked_fill(key_pos > query_pos, -math.inf)

    row_max = torch.full(q_last.shape[:-1], -math.inf, device=q.device)
    row_sum = torch.zeros(q_last.shape[:-1], device=q.device)
    for lo in range(0, width, chunk):
        tile = logits(lo)
        new_max = torch.maximum(row_max, tile.amax(dim=-1))
        row_sum = row_sum * torch.exp(row_max - new_max) + torch.exp(tile - new_max[..., None]).sum(
            dim=-1
        )
        row_max = new_max
    for lo in range(0, width, chunk):
        probs = torch.exp(logits(lo) - row_max[..., None]) / row_sum[..., None]
        token_scores = probs.sum(dim=(1, 2, 3))  # [R, c]
        c = token_scores.shape[1]
        padded = torch.nn.functional.pad(token_scores, (0, -c % block_size))
        out[chosen, lo // block_size : lo // block_size + padded.shape[1] // block_size] = (
            padded.view(len(chosen), -1, block_size).sum(dim=2)
        )
    return out
