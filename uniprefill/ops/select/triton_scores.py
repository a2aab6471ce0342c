"""Block scores in Triton: GPUs, or CPU tensors under TRITON_INTERPRET=1 (tests, CI).

Two passes over the keys, never materialising the (last_q x n x heads) probabilities:
1. `_softmax_stats_kernel`: for each request, query head and tile of its last queries, the
   softmax max and normaliser over the visible keys (online, as in flash attention).
2. `_block_scores_kernel`: for each request and key block, the sum over heads and last queries of
   exp(logit - max) / normaliser, i.e. that block's score.
Dot products run in float32 (ieee): exact enough that top-p matches the oracle; whether bf16
tensor-core dots keep the same blocks is to be measured on a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_stats_kernel(
    q_ptr, k_ptr, starts_ptr, lens_ptr, queries_ptr, max_ptr, sum_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, scale,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, LAST_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    r, h, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, n = tl.load(starts_ptr + r), tl.load(lens_ptr + r)
    qi = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    # rows of LAST_Q below this request's own count pad it: clamped to its tokens, and
    # left out of the block scores
    q_pos = tl.maximum(n - LAST_Q + qi, 0)
    own = (qi < LAST_Q) & (qi >= LAST_Q - tl.load(queries_ptr + r))
    d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + (start + q_pos)[:, None] * stride_qt + h * stride_qh + d[None, :],
        mask=own[:, None] & (d < HEAD_DIM)[None, :],
        other=0.0,
    ).to(tl.float32)
    row_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_Q], tl.float32)
    for lo in range(0, n, BLOCK_N):
        k_pos = lo + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_ptr + (start + k_pos)[:, None] * stride_kt + (h // GROUP) * stride_kh + d[None, :],
            mask=(k_pos < n)[:, None] & (d < HEAD_DIM)[None, :],
            other=0.0,
        ).to(tl.float32)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        logits = tl.where(k_pos[None, :] <= q_pos[:, None], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
        row_max = new_max
    out = (r * NUM_Q_HEADS + h) * LAST_Q + qi
    tl.store(max_ptr + out, row_max, mask=qi < LAST_Q)
    tl.store(sum_ptr + out, row_sum, mask=qi < LAST_Q)


@triton.jit
def _block_scores_kernel(
    q_ptr, k_ptr, starts_ptr, lens_ptr, queries_ptr, rows_ptr, max_ptr, sum_ptr, out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_out, scale,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, LAST_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    r, b = tl.program_id(0), tl.program_id(1)
    start, n = tl.load(starts_ptr + r), tl.load(lens_ptr + r)
    first_own = LAST_Q - tl.load(queries_ptr + r)
    d = tl.arange(0, BLOCK_D)
    k_pos = b * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    acc = tl.zeros([BLOCK_SIZE], tl.float32)
    for h in range(NUM_Q_HEADS):
        k = tl.load(
            k_ptr + (start + k_pos)[:, None] * stride_kt + (h // GROUP) * stride_kh + d[None, :],
            mask=(k_pos < n)[:, None] & (d < HEAD_DIM)[None, :],
            other=0.0,
        ).to(tl.float32)
        for q_lo in range(0, LAST_Q, BLOCK_Q):
            qi = q_lo + tl.arange(0, BLOCK_Q)
            q_pos = tl.maximum(n - LAST_Q + qi, 0)
            own = (qi < LAST_Q) & (qi >= first_own)
            q = tl.load(
                q_ptr + (start + q_pos)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=own[:, None] & (d < HEAD_DIM)[None, :],
                other=0.0,
            ).to(tl.float32)
            stats = (r * NUM_Q_HEADS + h) * LAST_Q + qi
            row_max = tl.load(max_ptr + stats, mask=own, other=0.0)
            row_sum = tl.load(sum_ptr + stats, mask=own, other=1.0)
            logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            probs = tl.exp(logits - row_max[:, None]) / row_sum[:, None]
            visible = (k_pos[None, :] <= q_pos[:, None]) & own[:, None]
            acc += tl.sum(tl.where(visible, probs, 0.0), 0)
    tl.store(out_ptr + tl.load(rows_ptr + r) * stride_out + b, tl.sum(acc, 0))


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1 before import)."""
    return bool(triton.knobs.runtime.interpret)


def block_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prunable: torch.Tensor,
    *,
    block_size: int,
    queries: torch.Tensor,
) -> torch.Tensor:
    """[B, max_blocks] float32 block scores; rows of requests that are not prunable are zero.

    queries: [B] int64, each request's scoring queries (its last ones)."""
    if q.device.type == "cpu" and not interpreting():
        raise ValueError(
            "the triton backend runs CPU tensors only under TRITON_INTERPRET=1 (set before "
            "triton is imported); use backend='torch' on CPU"
        )
    if block_size < 16:
        raise ValueError(f"the triton backend needs block_size >= 16, got {block_size}")
    q, k = (x if x.stride(2) == 1 else x.contiguous() for x in (q, k))  # kernels step d by 1
    cu = cu_seqlens.long()
    lens = cu.diff()
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    max_blocks = int((lens.max() + block_size - 1) // block_size) if lens.numel() else 0
    out = torch.zeros(lens.numel(), max_blocks, dtype=torch.float32, device=q.device)
    rows = prunable.nonzero().squeeze(1)
    if rows.numel() == 0:
        return out
    starts, n = cu[rows].contiguous(), lens[rows].contiguous()
    counts = queries[rows].contiguous()
    last_q = int(counts.max())
    row_max = torch.empty(rows.numel(), num_q_heads, last_q, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    block_q = min(64, max(16, triton.next_power_of_2(last_q)))
    shape = dict(
        NUM_Q_HEADS=num_q_heads,
        GROUP=num_q_heads // k.shape[1],
        LAST_Q=last_q,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_Q=block_q,
    )
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1))
    scale = 1.0 / math.sqrt(head_dim)
    stats_grid = (rows.numel(), num_q_heads, triton.cdiv(last_q, block_q))
    _softmax_stats_kernel[stats_grid](
        q, k, starts, n, counts, row_max, row_sum, *strides, scale, **shape, BLOCK_N=64
    )
    _block_scores_kernel[(rows.numel(), max_blocks)](
        q, k, starts, n, counts, rows, row_max, row_sum, out, *strides, out.stride(0), scale,
        **shape, BLOCK_SIZE=block_size,
    )  # fmt: skip
    return out
