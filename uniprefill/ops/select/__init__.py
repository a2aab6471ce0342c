"""`select_tokens`: which tokens a drop layer keeps, for a whole varlen batch.

Backends compute block scores ("reference" is the plain oracle and does everything itself);
"auto" picks the fastest one available for the inputs' device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from uniprefill.config import UniPrefillConfig
from uniprefill.ops.select.common import (
    Selection,
    keep_from_block_scores,
    prunable_mask,
    selection_from_keep,
)
from uniprefill.ops.select.reference import select_tokens_reference
from uniprefill.ops.select.torch_scores import block_scores_torch

BlockScoreFn = Callable[..., torch.Tensor]
BLOCK_SCORE_BACKENDS: dict[str, BlockScoreFn] = {"torch": block_scores_torch}
try:
    from uniprefill.ops.select.triton_scores import block_scores_triton

    BLOCK_SCORE_BACKENDS["triton"] = block_scores_triton
except ImportError:  # no triton: the torch backend serves every device
    pass
BACKENDS = ("reference", *BLOCK_SCORE_BACKENDS)


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


def _check_p(p: float | torch.Tensor, cu_seqlens: torch.Tensor) -> float:
    """Check a per-request p tensor here; return a scalar for UniPrefillConfig's shared checks."""
    if not isinstance(p, torch.Tensor):
        return p
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
    return 1.0


def select_tokens(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    p: float | torch.Tensor,
    block_size: int,
    sink: int,
    last_q: int,
    min_prompt_len: int = 0,
    reduce_block_scores: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalize_over: str = "all_blocks",
    backend: str = "auto",
) -> Selection:
    """Select the tokens to keep at a drop layer (DESIGN.md 1.1), for B requests of T tokens.

    q: [T, Hq, d] rotated queries; k: [T, Hk, d] rotated keys (Hq a multiple of Hk); any float
    dtype. cu_seqlens: [B + 1] integer offsets of each request's tokens. Requests of length
    <= sink + last_q or < min_prompt_len (decode rows among them) are kept whole; p = 1 keeps all.
    p: one value for every request, or a [B] float32 tensor (per-request p; 1.0 = keep whole).
    reduce_block_scores: called once with the float32 [B, max_blocks] block scores of this
    rank's heads; must return their sum over the tensor-parallel group (e.g. an all-reduce), so
    every rank keeps the same tokens.
    normalize_over: "all_blocks" (the paper's rule) or "unforced_blocks" (top-p mass counted
    only over blocks not wholly inside the sink or the last queries).
    """
    UniPrefillConfig(
        p=_check_p(p, cu_seqlens),
        block_size=block_size,
        sink=sink,
        last_q=last_q,
        min_prompt_len=min_prompt_len,
        normalize_over=normalize_over,
    )
    _check_inputs(q, k, cu_seqlens)
    settings = dict(
        p=p, block_size=block_size, sink=sink, last_q=last_q, normalize_over=normalize_over
    )
    if backend == "reference":
        return select_tokens_reference(
            q,
            k,
            cu_seqlens,
            **settings,
            min_prompt_len=min_prompt_len,
            reduce_block_scores=reduce_block_scores,
        )
    if backend == "auto":  # Triton on GPUs; on CPU it would run interpreted, so vectorised torch
        backend = "triton" if q.is_cuda and "triton" in BLOCK_SCORE_BACKENDS else "torch"
    if backend not in BLOCK_SCORE_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: auto, {', '.join(BACKENDS)}")
    prunable = prunable_mask(
        cu_seqlens.long().diff(), p=p, sink=sink, last_q=last_q, min_prompt_len=min_prompt_len
    )
    block_scores = BLOCK_SCORE_BACKENDS[backend](
        q, k, cu_seqlens, prunable, block_size=block_size, last_q=last_q
    )
    if reduce_block_scores is not None:
        block_scores = reduce_block_scores(block_scores)
    keep = keep_from_block_scores(block_scores, cu_seqlens, prunable, **settings)
    return selection_from_keep(keep, cu_seqlens)


__all__ = ["BACKENDS", "Selection", "available_backends", "select_tokens"]
