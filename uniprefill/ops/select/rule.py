"""The settings of the selection rule (docs/design/selection.md), checked once, here.

Messages start with the setting's name, so a caller can prefix where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

# What top-p normalises block scores over: every block (the paper's rule), or only the blocks
# that are not entirely forced (sink, last queries), which otherwise hold most of the mass.
NORMALIZE_OVER = ("all_blocks", "unforced_blocks")


# The smallest p the selection can take: p travels per request as float32, where any smaller
# positive number (1e-46, 1e-300) rounds to 0. Every p this small keeps the same blocks (the
# top block, then the forced tokens).
MIN_P = 2.0**-126  # float32's smallest normal number, about 1.2e-38


def p_error(p: object) -> str | None:
    """What is wrong with a top-p mass, or None: a number (not a bool) in [MIN_P, 1]."""
    if isinstance(p, bool) or not isinstance(p, int | float):
        return f"p must be a number in (0, 1], got {p!r}"
    if not MIN_P <= p <= 1.0:  # also refuses nan and inf
        return f"p must be in (0, 1] and at least {MIN_P:.3g} (float32), got {p!r}"
    return None


def check_p(p: object) -> None:
    """One top-p mass for every request (p_error): ValueError if it is not one."""
    error = p_error(p)
    if error:
        raise ValueError(error)


@dataclass(frozen=True, slots=True)
class SelectionRule:
    """Which tokens a drop layer keeps, apart from the top-p mass p (that one may vary per request).

    block_size: tokens per scored block (a power of two).
    sink: leading tokens always kept.
    last_q: number of trailing queries that score the prompt; those tokens are always kept.
    min_prompt_len: requests shorter than this are kept whole.
    normalize_over: "all_blocks" (the paper) or "unforced_blocks" (see NORMALIZE_OVER).
    """

    block_size: int
    sink: int
    last_q: int
    min_prompt_len: int = 0
    normalize_over: str = "all_blocks"

    def __post_init__(self) -> None:
        for name in ("block_size", "sink", "last_q", "min_prompt_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.block_size == 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two (e.g. 64), got {self.block_size}")
        if self.last_q == 0:
            raise ValueError("last_q must be at least 1 (the last token scores)")
        if self.normalize_over not in NORMALIZE_OVER:
            raise ValueError(
                f"normalize_over must be one of {list(NORMALIZE_OVER)}, got {self.normalize_over!r}"
            )
