"""What a worker keeps per pruned request, and what it reports.

- each pruned request's KV offsets at stages 1..S (step_plan.py, "KV layout"), until it
  finishes, is aborted or is preempted (a preempted request is recomputed from scratch);
- a chunked pruned prompt's rows held at the first drop layer until its last chunk (`Held`);
- the most recent pruned prompts, for the status RPC and benchmarks (bounded);
- the report for the scheduler (metrics.new_report): pruned prompts with their keep counts, the
  selection's time, and fallbacks. It rides on the step's `ModelRunnerOutput` to the scheduler,
  which logs it and adds it to vLLM's scheduler stats: the route to /metrics (metrics.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from uniprefill.accounting import pruned_prompt
from uniprefill.step_plan import StageRows, StepPlan, pruned_offsets
from uniprefill.vllm_glue.metrics import new_report

RECENT_PRUNES = 256  # pruned prompts remembered for the status RPC and benchmarks (bounded)


@dataclass
class Held:
    """A chunked pruned prompt's rows that left steps at the first drop layer, chunk by chunk:
    what that layer passes on (its output tensors with a row per token), their positions and the
    layer's keys, which the selection needs at the prompt's last chunk."""

    outputs: list[list[torch.Tensor]] = field(default_factory=list)  # per output slot
    positions: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(p.shape[0] for p in self.positions)

    @property
    def nbytes(self) -> int:
        tensors = [*self.positions, *self.keys, *(t for slot in self.outputs for t in slot)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def add(self, outputs: list[torch.Tensor], positions: torch.Tensor, keys: torch.Tensor) -> None:
        if not self.outputs:
            self.outputs = [[] for _ in outputs]
        for slot, tensor in zip(self.outputs, outputs, strict=True):
            slot.append(tensor)
        self.positions.append(positions)
        self.keys.append(keys)


class RequestState:
    """One worker's pruned requests: their KV offsets, held rows, recent records and report."""

    def __init__(self, drops: Sequence[int], depth: int):
        self.drops = tuple(drops)
        self.depth = depth
        self.kv_offsets: dict[str, tuple[int, ...]] = {}  # live pruned requests -> stages 1..S
        self.held: dict[str, Held] = {}  # chunked pruned prompts whose last chunk is to come
        self.recent: deque[dict] = deque(maxlen=RECENT_PRUNES)  # accounting.pruned_prompt
        self.unreported = new_report()  # not yet sent to the scheduler

    def remember(self, plan: StepPlan, stages: Sequence[StageRows]) -> None:
        """After a step that scored prompts: each pruned prompt's offsets and record."""
        for req_id, offsets in pruned_offsets(plan, stages).items():
            self.kv_offsets[req_id] = offsets
            prompt_len = int(plan.joined_rows[plan.req_ids.index(req_id)])
            kept = [prompt_len] + [prompt_len - o for o in offsets]
            record = pruned_prompt(req_id, kept, self.drops, self.depth)
            self.recent.append(record)
            self.unreported["prompts"].append(record)

    def fell_back(self, req_ids: list[str]) -> None:
        """Requests whose pruning failed: their state is dropped, the scheduler told."""
        self.forget(req_ids)
        self.unreported["fallbacks"].extend(req_ids)

    def take_report(self) -> dict | None:
        """What pruning did since the last report (metrics.new_report), or None if nothing."""
        if not any(self.unreported.values()):
            return None
        report, self.unreported = self.unreported, new_report()
        return report

    def forget(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            self.kv_offsets.pop(req_id, None)
            self.held.pop(req_id, None)
