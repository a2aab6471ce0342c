"""The step plan: the scheduler's plan over the batch, built without an engine."""

import pytest
import torch

from uniprefill.step_plan import (
    PlanError,
    PromptPlan,
    ScheduledRequest,
    all_stages,
    first_stage,
    joined_stage,
    next_stage,
    plan_step,
    pruned_offsets,
)

STAGES = 3  # two drop layers
PLAN = PromptPlan(p=0.9, queries=16)  # the scheduler's plan for a pruned prompt


def fresh(req_id: str, prompt_len: int, plan: PromptPlan | None = PLAN) -> ScheduledRequest:
    return ScheduledRequest(req_id, prompt_len, 0, prompt_len, plan)


def decode(req_id: str, prompt_len: int, generated: int, offsets=None) -> ScheduledRequest:
    return ScheduledRequest(req_id, 1, prompt_len + generated - 1, prompt_len, None, offsets)


def test_a_step_with_nothing_pruned_is_a_stock_step():
    batch = [fresh("short", 40, None), fresh("off", 200, None), decode("d", 300, 5)]
    assert plan_step(batch, STAGES) is None


def test_a_mixed_batch_scores_only_the_prompts_the_scheduler_planned():
    batch = [
        fresh("long", 200),
        fresh("short", 40, None),  # not planned: stock
        decode("pruned", 300, 3, offsets=(100, 150)),
        decode("stock", 300, 3),
        ScheduledRequest("chunk", 100, 0, 200, PLAN),  # a first chunk: held
    ]
    plan = plan_step(batch, STAGES)
    assert plan.req_ids == ("long", "short", "pruned", "stock", "chunk")
    assert plan.scored.tolist() == [True, False, False, False, False]
    assert plan.deferred.tolist() == [False, False, False, False, True]
    assert plan.prunes and plan.joins
    assert plan.p.tolist() == pytest.approx([0.9, 1, 1, 1, 1])
    assert plan.num_rows.tolist() == [200, 40, 1, 1, 100]
    assert plan.earlier_offsets[:, 2].tolist() == [0, 100, 150]
    assert plan.earlier_offsets[:, [0, 1, 3, 4]].eq(0).all()


def test_decodes_of_pruned_requests_know_every_stage_before_the_forward():
    batch = [decode("a", 300, 1, offsets=(100, 150)), decode("b", 50, 2), decode("c", 80, 1,
             offsets=(16, 32))]  # fmt: skip
    plan = plan_step(batch, STAGES)
    assert not plan.prunes
    positions = torch.tensor([300, 51, 80])
    stages = all_stages(plan, positions)
    assert [s.stage for s in stages] == [0, 1, 2]
    assert [s.kv_offsets.tolist() for s in stages] == [[0, 0, 0], [100, 0, 16], [150, 0, 32]]
    assert [s.moves_kv for s in stages] == [False, True, True]
    for s in stages:
        assert s.kept_rows is None and torch.equal(s.positions, positions)
        assert s.query_start_loc.tolist() == [0, 1, 2, 3]


def test_stages_of_a_scoring_step_follow_each_drop():
    batch = [fresh("a", 100), decode("b", 300, 4, offsets=(20, 40)), fresh("c", 40)]
    plan = plan_step(batch, STAGES)
    positions = torch.cat(
        [torch.arange(100), torch.tensor([303]), torch.arange(40), torch.zeros(5)]
    )
    with pytest.raises(ValueError):
        all_stages(plan, positions)
    stage0 = first_stage(plan, positions)
    assert stage0.num_rows == 141  # padding rows past the batch are not the step's rows
    assert stage0.query_start_loc.tolist() == [0, 100, 101, 141]
    # the first drop keeps a's rows 0-31 and 70-99, and all of b and c
    kept = torch.cat([torch.arange(32), torch.arange(70, 141)])
    stage1 = next_stage(plan, stage0, kept, torch.tensor([0, 62, 63, 103]))
    assert stage1.stage == 1
    assert stage1.kv_offsets.tolist() == [38, 20, 0]
    assert torch.equal(stage1.positions, positions[kept])
    assert torch.equal(stage1.kept_rows, kept)
    # the second keeps a's first 20 kept rows and its last 30, and all of b and c
    kept2 = torch.cat([torch.arange(20), torch.arange(32, 103)])
    stage2 = next_stage(plan, stage1, kept2, torch.tensor([0, 50, 51, 91]))
    assert stage2.kv_offsets.tolist() == [50, 40, 0]
    assert torch.equal(stage2.kept_rows, kept[kept2])  # indices into the step's rows
    assert torch.equal(stage2.positions, positions[kept[kept2]])
    assert pruned_offsets(plan, [stage0, stage1, stage2]) == {"a": (38, 50)}


def test_a_drop_that_keeps_everything_prunes_nothing():
    plan = plan_step([fresh("a", 100)], STAGES)
    stages = [first_stage(plan, torch.arange(100))]
    stages += [next_stage(plan, stages[-1]), next_stage(plan, stages[-1])]
    assert not any(s.moves_kv for s in stages)
    assert pruned_offsets(plan, stages) == {}


def chunk(req_id: str, rows: int, computed: int, prompt_len: int) -> ScheduledRequest:
    return ScheduledRequest(req_id, rows, computed, prompt_len, PLAN, held_rows=computed)


def test_a_pruned_prompt_in_chunks_is_held_until_its_last_chunk_scores_it_whole():
    first, middle, last = chunk("a", 80, 0, 200), chunk("a", 80, 80, 200), chunk("a", 40, 160, 200)
    assert plan_step([first], STAGES).deferred.tolist() == [True]
    assert plan_step([middle], STAGES).deferred.tolist() == [True]
    plan = plan_step([last, decode("d", 300, 2)], STAGES)
    assert plan.scored.tolist() == [True, False] and not plan.deferred.any()
    assert plan.held_rows.tolist() == [160, 0]
    assert plan.joined_rows.tolist() == [200, 1]


def test_a_plan_the_workers_state_contradicts_is_a_plan_error():
    """What the worker's fallback catches: its held rows are not the computed tokens (a prompt
    recomputed from a cache hit), a last chunk without its queries, a prompt pruned twice."""
    with pytest.raises(PlanError, match="160 held"):
        plan_step([ScheduledRequest("a", 40, 120, 200, PLAN, held_rows=160)], STAGES)
    with pytest.raises(PlanError, match="fewer than its 16 scoring queries"):
        plan_step([chunk("a", 10, 190, 200)], STAGES)
    with pytest.raises(PlanError, match="pruned already"):
        plan_step([ScheduledRequest("a", 1, 200, 200, PLAN, kv_offsets=(50, 80))], STAGES)


def test_the_first_drop_sees_held_rows_join_their_last_chunk_and_earlier_chunks_leave():
    # a: last chunk (rows 0-39 of the step) of a 200-token prompt, 160 held; d: a decode;
    # b: a first chunk of 100 rows, held from the first drop on
    batch = [chunk("a", 40, 160, 200), decode("d", 300, 2), chunk("b", 100, 0, 400)]
    plan = plan_step(batch, STAGES)
    positions = torch.cat([torch.arange(160, 200), torch.tensor([301]), torch.arange(100)])
    stage0 = first_stage(plan, positions)
    joined = joined_stage(plan, stage0, held_positions=torch.arange(160))
    assert joined.query_start_loc.tolist() == [0, 200, 201, 201]
    # a's held rows (after the step's 141 rows), then its step rows, then d's row; b is gone
    expected = torch.cat([torch.arange(141, 301), torch.arange(40), torch.tensor([40])])
    assert torch.equal(joined.kept_rows, expected)
    assert torch.equal(joined.positions, torch.cat([torch.arange(200), torch.tensor([301])]))
    # the drop keeps a's first 64 and last 36 tokens: 100 of its 200 prompt tokens
    kept = torch.cat([torch.arange(64), torch.arange(164, 201)])
    stage1 = next_stage(plan, joined, kept, torch.tensor([0, 100, 101, 101]))
    assert stage1.kv_offsets.tolist() == [100, 0, 0]
    assert torch.equal(stage1.kept_rows, expected[kept])
    assert pruned_offsets(plan, [stage0, stage1]) == {"a": (100,)}
