"""What pruning saves: the record of one pruned prompt, as the worker reports it (the scheduler's
log line, the status RPC, the metrics on /metrics) and as the benchmarks compute it. No vLLM
import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def token_layers(kept: Sequence[int], drops: Sequence[int], depth: int) -> int:
    """Tokens x layers of one prefill: stage s (up to and including drop layer s) runs kept[s]
    tokens through its layers; the last stage runs to the model's last layer."""
    bounds = [-1, *drops, depth - 1]
    return sum(k * (hi - lo) for k, lo, hi in zip(kept, bounds[:-1], bounds[1:], strict=True))


def pruned_prompt(req_id: str, kept: Sequence[int], drops: Sequence[int], depth: int) -> dict:
    """One pruned prefill: `kept` is its prompt tokens, then the tokens kept after each drop
    layer. `saved` is the token-layers it skipped; `ideal` the speedup if time followed
    token-layers (unpruned token-layers / pruned ones)."""
    full, ran = kept[0] * depth, token_layers(kept, drops, depth)
    return {
        "req_id": req_id,
        "kept": list(kept),
        "token_layers": full,
        "saved": full - ran,
        "ideal": round(full / ran, 3),
    }


def describe(record: dict[str, Any], drops: Sequence[int]) -> str:
    """A pruned prompt in one line, for the log."""
    kept = record["kept"]
    stages = ", ".join(f"{n} after layer {d}" for n, d in zip(kept[1:], drops, strict=True))
    return (
        f"request {record['req_id']}: {kept[0]} prompt tokens, kept {stages}; "
        f"token-layer ideal {record['ideal']:.2f}x"
    )
