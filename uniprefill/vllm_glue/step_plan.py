"""One model step's pruning plan: records built from the batch, without vLLM.

`plan_step` turns what the scheduler put in a step (`ScheduledRequest`s) and the requests'
pruning state into a `StepPlan`, once, before the forward. The rows each stage's layers run on
are a `StageRows` record per stage, numbered from 0 (the embedding and the layers up to and
including the first drop layer): `first_stage` before the forward, `next_stage` at each drop
layer, from the previous stage and the drop's selection. When no prompt in the step is scored,
every stage's rows are known before the forward (`all_stages`).

KV layout (docs/design/selection.md, section 3): for a pruned request, a layer of stage s holds
its kept prompt tokens at the front of the request's blocks, then the generated tokens; its
KV offset at stage s is the number of prompt tokens that stage dropped (prompt_len - kept_s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from uniprefill.ops.select.common import prunable_mask
from uniprefill.ops.select.rule import SelectionRule


@dataclass(frozen=True)
class ScheduledRequest:
    """One request as the scheduler put it into a step."""

    req_id: str
    num_rows: int  # tokens scheduled for it in this step
    num_computed: int  # its tokens already in the KV cache
    prompt_len: int
    num_generated: int  # output tokens it has produced so far
    p: float  # top-p mass it asks for (1.0: not pruned)
    kv_offsets: tuple[int, ...] | None = None  # pruned earlier: its offset at stages 1..S


@dataclass(frozen=True)
class StepPlan:
    """What pruning does in one step (R requests, S drop layers)."""

    req_ids: tuple[str, ...]
    num_rows: torch.Tensor  # [R] int64: rows each request brings into the step
    scored: torch.Tensor  # [R] bool: a whole fresh prompt, scored at every drop layer
    p: torch.Tensor  # [R] float32: each request's top-p (1.0 where it is not scored)
    earlier_offsets: torch.Tensor  # [S + 1, R] int64: KV offsets of requests pruned earlier

    @property
    def num_stages(self) -> int:
        return self.earlier_offsets.shape[0]

    @property
    def prunes(self) -> bool:
        """Some prompt is scored, so stage sizes are known only at the drop layers."""
        return bool(self.scored.any())


@dataclass(frozen=True)
class StageRows:
    """The rows one stage's layers run on, and where they sit in each request's KV."""

    stage: int
    query_start_loc: torch.Tensor  # [R + 1] int32, host: each request's rows in this stage
    positions: torch.Tensor  # [rows]: original positions (RoPE stays right)
    kept_rows: torch.Tensor | None  # [rows]: index into the step's rows; None: all, in order
    kv_offsets: torch.Tensor  # [R] int64, host: prompt tokens missing from this stage's KV

    @property
    def num_rows(self) -> int:
        return self.positions.shape[0]

    @property
    def moves_kv(self) -> bool:
        """This stage's layers need their own attention metadata and KV slots."""
        return self.kept_rows is not None or bool(self.kv_offsets.any())


def plan_step(
    requests: Sequence[ScheduledRequest], num_stages: int, rule: SelectionRule
) -> StepPlan | None:
    """The step's plan, or None when no request in it is (or was) pruned: a stock step."""
    count = len(requests)
    num_rows = torch.tensor([r.num_rows for r in requests], dtype=torch.int64)
    scored = torch.zeros(count, dtype=torch.bool)
    p = torch.ones(count, dtype=torch.float32)
    earlier = torch.zeros(num_stages, count, dtype=torch.int64)
    for i, request in enumerate(requests):
        if request.kv_offsets is not None:
            earlier[1:, i] = torch.tensor(request.kv_offsets, dtype=torch.int64)
        elif (
            request.num_computed == 0
            and request.num_rows == request.prompt_len
            and request.num_generated == 0
            and bool(prunable_mask(request.prompt_len, p=request.p, rule=rule))
        ):
            scored[i] = True
            p[i] = request.p
    if not scored.any() and not earlier.any():
        return None
    return StepPlan(
        req_ids=tuple(r.req_id for r in requests),
        num_rows=num_rows,
        scored=scored,
        p=p,
        earlier_offsets=earlier,
    )


def first_stage(plan: StepPlan, positions: torch.Tensor) -> StageRows:
    """Stage 0: every scheduled row, in the step's order."""
    query_start_loc = torch.zeros(len(plan.req_ids) + 1, dtype=torch.int32)
    torch.cumsum(plan.num_rows, 0, out=query_start_loc[1:])
    return StageRows(
        stage=0,
        query_start_loc=query_start_loc,
        positions=positions[: int(query_start_loc[-1])],
        kept_rows=None,
        kv_offsets=plan.earlier_offsets[0],
    )


def next_stage(
    plan: StepPlan,
    previous: StageRows,
    kept: torch.Tensor | None = None,
    query_start_loc: torch.Tensor | None = None,
) -> StageRows:
    """The stage after `previous`'s drop layer, which kept rows `kept` (indices into the
    previous stage's rows, grouped per request as `query_start_loc`); None: it kept them all."""
    if kept is None:
        positions, kept_rows, query_start_loc = (
            previous.positions,
            previous.kept_rows,
            previous.query_start_loc,
        )
    else:
        positions = previous.positions[kept]
        kept_rows = kept if previous.kept_rows is None else previous.kept_rows[kept]
        query_start_loc = query_start_loc.to(device="cpu", dtype=torch.int32)
    stage = previous.stage + 1
    dropped_now = plan.num_rows - query_start_loc.diff().long()
    return StageRows(
        stage=stage,
        query_start_loc=query_start_loc,
        positions=positions,
        kept_rows=kept_rows,
        kv_offsets=plan.earlier_offsets[stage] + dropped_now,
    )


def all_stages(plan: StepPlan, positions: torch.Tensor) -> list[StageRows]:
    """Every stage's rows of a step that scores nothing (only requests pruned earlier move)."""
    if plan.prunes:
        raise ValueError("a step that scores prompts knows its stages only at the drop layers")
    stages = [first_stage(plan, positions)]
    while len(stages) < plan.num_stages:
        stages.append(next_stage(plan, stages[-1]))
    return stages


def pruned_offsets(plan: StepPlan, stages: Sequence[StageRows]) -> dict[str, tuple[int, ...]]:
    """After a step that scored prompts: the KV offsets (stages 1..S) of each prompt it pruned."""
    if len(stages) < 2:
        return {}
    offsets = torch.stack([s.kv_offsets for s in stages[1:]])
    return {
        plan.req_ids[i]: tuple(offsets[:, i].tolist())
        for i in plan.scored.nonzero().flatten().tolist()
        if offsets[:, i].any()
    }
