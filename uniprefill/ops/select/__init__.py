"""`select_tokens`: which tokens a drop layer keeps, for a whole varlen batch.

Backends compute block scores ("oracle" is the plain loop and does everything itself);
"auto" picks the fastest one available for the inputs' device. The rule's settings come as one
`SelectionRule`, checked when it is built; p comes apart, as it may differ per request.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from uniprefill.ops.select.common import (
    Selection,
    keep_from_block_scores,
    prunable_mask,
    selection_from_keep,
)
from uniprefill.ops.select.oracle import select_tokens_oracle
from uniprefill.ops.select.rule import SelectionRule, check_p
from uniprefill.ops.select.torch_scores import block_scores_torch

BlockScoreFn = Callable[..., torch.Tensor]
BLOCK_SCORE_BACKENDS: dict[str, BlockScoreFn] = {"torch": block_scores_torch}
try:
    from uniprefill.ops.select.triton_scores import block_scores_triton

    BLOCK_SCORE_BACKENDS["triton"] = block_scores_triton
except ImportError:  # no triton: the torch backend serves every device
    pass
BACKENDS = ("oracle", *BLOCK_SCORE_BACKENDS)


def available_backends() -> tuple[str, ...]:
    return BACKENDS


def _check_inputs(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [T, H, d]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on tokens T and head dim d"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key heads ({k.shape[1]})"
        )
    if not (q.is_floating_point() and k.is_floating_point()):
        raise ValueError(f"q and k must be floating point; got {q.dtype} and {k.dtype}")
    if q.device != k.device or cu_seqlens.device != q.device:
        raise ValueError("q, k and cu_seqlens must be on one device")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [B + 1]; got {cu_seqlens}")
    ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == q.shape[0]) & (cu_seqlens.diff() >= 0).all()
    if not bool(ok):  # the op's one host sync before the output sizes
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at the token count "
            f"{q.shape[0]}; got {cu_seqlens.tolist()}"
        )


def _check_p(p: float | torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if not isinstance(p, torch.Tensor):
        check_p(p)
        return
    if (
        p.shape != (cu_seqlens.numel() - 1,)
        or p.dtype != torch.float32
        or p.device != cu_seqlens.device
    ):
        raise ValueError(
            f"per-request p must be float32 [B] = [{cu_seqlens.numel() - 1}]; "
            f"on the inputs' device; got {p.dtype} {tuple(p.shape)} on {p.device}"
        )
    if p.numel() and not bool(((p > 0) & (p <= 1)).all()):
        raise ValueError(f"every p must be in (0, 1]; got {p.tolist()}")


def _query_counts(
    queries: torch.Tensor | None, rule: SelectionRule, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """[B] int64 scoring queries per request on the inputs' device."""
    num_reqs = cu_seqlens.numel() - 1
    if queries is None:
        return torch.full((num_reqs,), rule.last_q, dtype=torch.int64, device=cu_seqlens.device)
    if queries.shape != (num_reqs,) or queries.is_floating_point():
        raise ValueError(f"queries must be an integer tensor [B] = [{num_reqs}]; got {queries}")
    if num_reqs and int(queries.min()) < 1:
        raise ValueError(f"every request needs at least one scoring query; got {queries.tolist()}")
    return queries.to(device=cu_seqlens.device, dtype=torch.int64)


def select_tokens(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    p: float | torch.Tensor,
    rule: SelectionRule,
    reduce_block_scores: Callable[[torch.Tensor], torch.Tensor] | None = None,
    backend: str = "auto",
    queries: torch.Tensor | None = None,
) -> Selection:
    """Select the tokens to keep at a drop layer (docs/design/selection.md), for B requests of T
    tokens.

    q: [T, Hq, d] rotated queries; k: [T, Hk, d] rotated keys (Hq a multiple of Hk); any float
    dtype. cu_seqlens: [B + 1] integer offsets of each request's tokens. Requests of length
    <= rule.sink + rule.last_q or < rule.min_prompt_len (decode rows among them) are kept whole;
    p = 1 keeps all.
    p: one value for every request, or a [B] float32 tensor (per-request p; 1.0 = keep whole).
    reduce_block_scores: called once with the float32 [B, max_blocks] block scores of this
    rank's heads; must return their sum over the tensor-parallel group (e.g. an all-reduce), so
    every rank keeps the same tokens.
    queries: [B] integer tensor, how many of each request's last tokens score it (and are kept);
    default rule.last_q for every request (e.g. a request's question instead of a fixed count).
    """
    _check_p(p, cu_seqlens)
    _check_inputs(q, k, cu_seqlens)
    queries = _query_counts(queries, rule, cu_seqlens)
    if backend == "oracle":
        return select_tokens_oracle(
            q, k, cu_seqlens, p=p, rule=rule, queries=queries,
            reduce_block_scores=reduce_block_scores,
        )  # fmt: skip
    if backend == "auto":  # Triton on GPUs; on CPU it would run interpreted, so vectorised torch
        backend = "triton" if q.is_cuda and "triton" in BLOCK_SCORE_BACKENDS else "torch"
    if backend not in BLOCK_SCORE_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: auto, {', '.join(BACKENDS)}")
    prunable = prunable_mask(cu_seqlens.long().diff(), p=p, rule=rule, queries=queries)
    block_scores = BLOCK_SCORE_BACKENDS[backend](
        q, k, cu_seqlens, prunable, block_size=rule.block_size, queries=queries
    )
    if reduce_block_scores is not None:
        block_scores = reduce_block_scores(block_scores)
    keep = keep_from_block_scores(
        block_scores, cu_seqlens, prunable, p=p, rule=rule, queries=queries
    )
    return selection_from_keep(keep, cu_seqlens, block_scores)


__all__ = ["BACKENDS", "Selection", "SelectionRule", "available_backends", "select_tokens"]
