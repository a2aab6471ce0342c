"""One model step's pruning plan: records built from the batch, without vLLM.

The scheduler alone decides which prompts are pruned, with which p and how many scoring queries
(uniprefill.requests.prompt_plan): each step carries a `PromptPlan` for every pruned prompt whose
tokens it schedules (`StepPruning`). A worker executes it: `plan_step` turns what the scheduler
put in the step (`ScheduledRequest`s) and the requests' pruning state into a `StepPlan`, once,
before the forward. The rows each stage's layers run on are a `StageRows` record per stage,
numbered from 0 (the embedding and the layers up to and including the first drop layer):
`first_stage` before the forward, `next_stage` at each drop layer, from the previous stage and
the drop's selection. When no prompt in the step is scored, every stage's rows are known before
the forward (`all_stages`).

A pruned prompt may come in chunks, one per step (vLLM's chunked prefill). A chunk that does
not end the prompt is `deferred`: its rows run stage 0 and then leave the step; the worker holds
what the first drop layer would have passed on (its rows' outputs, positions and keys). The chunk
that ends the prompt is `scored`: at the first drop layer the held rows join it (`joined_stage`),
so the selection and every later layer see the whole prompt, as if it had come in one step.

KV layout (docs/design/selection.md, section 3): for a pruned request, a layer of stage s holds
its kept prompt tokens at the front of the request's blocks, then the generated tokens; its
KV offset at stage s is the number of prompt tokens that stage dropped (prompt_len - kept_s).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptPlan:
    """How the scheduler has one prompt pruned: its top-p mass and its scoring queries (its
    last tokens, which the last chunk must hold)."""

    p: float
    queries: int


# What the scheduler sends with a step: request id -> its plan, for every pruned prompt with
# tokens in the step (prompt chunks only; a pruned request's decodes need none).
StepPruning = Mapping[str, PromptPlan]


class PlanError(RuntimeError):
    """A step plan that cannot run (a broken invariant between scheduler and worker): the
    worker falls back to an unpruned prefill for the requests concerned."""


@dataclass(frozen=True)
class ScheduledRequest:
    """One request as the scheduler put it into a step."""

    req_id: str
    num_rows: int  # tokens scheduled for it in this step
    num_computed: int  # its tokens already in the KV cache
    prompt_len: int
    pruning: PromptPlan | None = None  # the scheduler's plan, if this is a pruned prompt chunk
    kv_offsets: tuple[int, ...] | None = None  # pruned earlier: its offset at stages 1..S
    held_rows: int = 0  # rows of its earlier chunks that the worker holds for the first drop


@dataclass(frozen=True)
class StepPlan:
    """What pruning does in one step (R requests, S drop layers)."""

    req_ids: tuple[str, ...]
    num_rows: torch.Tensor  # [R] int64: rows each request brings into the step
    scored: torch.Tensor  # [R] bool: a pruned prompt's last chunk, scored at every drop layer
    p: torch.Tensor  # [R] float32: each request's top-p (1.0 where it is not scored)
    queries: torch.Tensor  # [R] int64: each request's scoring queries
    earlier_offsets: torch.Tensor  # [S + 1, R] int64: KV offsets of requests pruned earlier
    deferred: torch.Tensor  # [R] bool: a pruned prompt's earlier chunk, held at the first drop
    held_rows: torch.Tensor  # [R] int64: held rows that join a scored chunk at the first drop

    @property
    def joined_rows(self) -> torch.Tensor:
        """[R] int64: each request's rows entering the first drop layer's selection."""
        return torch.where(self.deferred, 0, self.num_rows + self.held_rows)

    @property
    def num_stages(self) -> int:
        return self.earlier_offsets.shape[0]

    @property
    def prunes(self) -> bool:
        """Some prompt is scored or held, so stage sizes are known only at the drop layers."""
        return bool(self.scored.any() or self.deferred.any())

    @property
    def joins(self) -> bool:
        """Rows leave or join the step at the first drop layer."""
        return bool(self.deferred.any() or self.held_rows.any())


@dataclass(frozen=True)
class StageRows:
    """The rows one stage's layers run on, and where they sit in each request's KV."""

    stage: int
    query_start_loc: torch.Tensor  # [R + 1] int32, host: each request's rows in this stage
    positions: torch.Tensor  # [rows]: original positions (RoPE stays right)
    kept_rows: torch.Tensor | None  # [rows]: index into the step's rows, then the held rows
    # (joined_stage); None: all the step's rows, in order
    kv_offsets: torch.Tensor  # [R] int64, host: prompt tokens missing from this stage's KV

    @property
    def num_rows(self) -> int:
        return self.positions.shape[0]

    @property
    def moves_kv(self) -> bool:
        """This stage's layers need their own attention metadata and KV slots."""
        return self.kept_rows is not None or bool(self.kv_offsets.any())


def plan_step(requests: Sequence[ScheduledRequest], num_stages: int) -> StepPlan | None:
    """The step's plan, or None when no request in it is (or was) pruned: a stock step.

    Raises PlanError where the scheduler's plan and the worker's state disagree."""
    count = len(requests)
    num_rows = torch.tensor([r.num_rows for r in requests], dtype=torch.int64)
    scored = torch.zeros(count, dtype=torch.bool)
    p = torch.ones(count, dtype=torch.float32)
    queries = torch.tensor([r.pruning.queries if r.pruning else 1 for r in requests],
                           dtype=torch.int64)  # fmt: skip
    earlier = torch.zeros(num_stages, count, dtype=torch.int64)
    deferred = torch.zeros(count, dtype=torch.bool)
    held = torch.zeros(count, dtype=torch.int64)
    for i, request in enumerate(requests):
        if request.kv_offsets is not None:
            if request.pruning is not None:
                raise PlanError(f"request {request.req_id} is planned as a prompt to prune, "
                                "but it was pruned already")  # fmt: skip
            earlier[1:, i] = torch.tensor(request.kv_offsets, dtype=torch.int64)
        elif request.pruning is not None:
            if request.held_rows != request.num_computed:
                raise PlanError(
                    f"request {request.req_id} has {request.num_computed} prompt tokens "
                    f"computed but {request.held_rows} held for its first drop layer"
                )
            if request.num_computed + request.num_rows < request.prompt_len:
                deferred[i] = True
            elif request.num_rows < queries[i]:
                raise PlanError(
                    f"the last chunk of request {request.req_id} has {request.num_rows} "
                    f"tokens, fewer than its {int(queries[i])} scoring queries"
                )
            else:
                scored[i] = True
                p[i] = request.pruning.p
                held[i] = request.held_rows
    if not scored.any() and not deferred.any() and not earlier.any():
        return None
    return StepPlan(
        req_ids=tuple(r.req_id for r in requests),
        num_rows=num_rows,
        scored=scored,
        p=p,
        queries=queries,
        earlier_offsets=earlier,
        deferred=deferred,
        held_rows=held,
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


def joined_stage(plan: StepPlan, stage: StageRows, held_positions: torch.Tensor) -> StageRows:
    """Stage 0 as the first drop layer's selection sees it: deferred requests' rows gone, and
    each scored request's held rows (`held_positions`, all requests' in step order) in front of
    its rows in this step. `kept_rows` indexes the step's rows followed by the held rows."""
    step_starts = stage.query_start_loc[:-1].long()
    held_starts = stage.num_rows + torch.cumsum(plan.held_rows, 0) - plan.held_rows
    parts = []
    for i in torch.nonzero(~plan.deferred).flatten().tolist():
        held, step = int(plan.held_rows[i]), int(plan.num_rows[i])
        parts.append(torch.arange(int(held_starts[i]), int(held_starts[i]) + held))
        parts.append(torch.arange(int(step_starts[i]), int(step_starts[i]) + step))
    order = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    query_start_loc = torch.zeros(len(plan.req_ids) + 1, dtype=torch.int32)
    torch.cumsum(plan.joined_rows, 0, out=query_start_loc[1:])
    positions = torch.cat([stage.positions, held_positions.to(stage.positions)])
    order = order.to(stage.positions.device)
    return StageRows(
        stage=0,
        query_start_loc=query_start_loc,
        positions=positions[order],
        kept_rows=order,
        kv_offsets=stage.kv_offsets,
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
    dropped_now = plan.joined_rows - query_start_loc.diff().long()
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
