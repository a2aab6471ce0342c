"""Pruned prefill inside vLLM's V1 model runner (`GPUModelRunner`; the CPU runner inherits it):
the step, as the scheduler planned it.

Each step, before the forward, the scheduler's plan for the step (step_plan.StepPruning, sent
on the SchedulerOutput) and the batch become a `StepPlan`; then one of three things happens:
- no request in the step is or was pruned: vLLM's own forward, compiled or eager as configured;
- only requests pruned in earlier steps (their decodes): every stage's rows are known, so each
  stage's attention metadata is written into the forward context before the forward, which then
  runs as vLLM's (compiled) graph, unchanged: each attention op reads its layer's entry;
- some prompt is scored or held: the stage sizes depend on the scores, so the step runs eager
  with the stage hooks on (hooks.py); the model's output is scattered back to the step's row
  count, so vLLM's logits indices (each request's last row, which is always kept) stay valid.

A failure in any of it falls back: the step runs again as vLLM's own forward, every token kept,
and the requests it pruned, held or had pruned earlier are reported; the scheduler drops their
token and has them recomputed unpruned (scheduler_patches/scheduler.py).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from vllm.config import CUDAGraphMode
from vllm.forward_context import get_forward_context

from uniprefill.config import UniPrefillConfig
from uniprefill.step_plan import ScheduledRequest, StepPlan, StepPruning, all_stages, plan_step
from uniprefill.vllm_glue.coupling import raise_if_missing, runner_missing_attributes
from uniprefill.vllm_glue.hooks import StageHooks
from uniprefill.vllm_glue.log import get_logger
from uniprefill.vllm_glue.request_state import RequestState
from uniprefill.vllm_glue.stage_metadata import install_stage_metadata

logger = get_logger(__name__)


class Pruner:
    """UniPrefill on one model runner: the step orchestration over its stage hooks and its
    pruned requests' state."""

    def __init__(self, runner: Any, config: UniPrefillConfig):
        raise_if_missing(runner_missing_attributes(runner), "model runner")
        self.runner = runner
        drops = tuple(config.drop_layers)
        self.num_stages = len(drops) + 1
        depth = runner.model_config.hf_text_config.num_hidden_layers
        self.state = RequestState(drops, depth)
        self.hooks = StageHooks(runner, config.rule, drops, self.state)
        self.step_pruning: StepPruning = {}  # the scheduler's plan for the coming step
        self.eager_steps = 0  # steps that scored or held prompts, run outside the compiled graph
        logger.info("UniPrefill pruning installed on %d layers; drop layers %s",
                    len(self.hooks.layers), list(drops))  # fmt: skip

    def plan(self, step: StepPruning) -> StepPlan | None:
        """This step's plan: the scheduler's (`step`), over the runner's batch and the pruned
        requests' state here."""
        runner, state = self.runner, self.state
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        lens = runner.query_start_loc.cpu[: num_reqs + 1].diff().tolist()
        computed = batch.num_computed_tokens_cpu[:num_reqs].tolist()
        scheduled = [
            ScheduledRequest(
                req_id=req_id,
                num_rows=lens[i],
                num_computed=computed[i],
                prompt_len=runner.requests[req_id].num_prompt_tokens,
                pruning=step.get(req_id),
                kv_offsets=state.kv_offsets.get(req_id),
                held_rows=state.held[req_id].num_rows if req_id in state.held else 0,
            )
            for i, req_id in enumerate(batch.req_ids[:num_reqs])
        ]
        return plan_step(scheduled, self.num_stages)

    def run(self, forward: Any, input_ids: Any, positions: torch.Tensor, **kwargs: Any) -> Any:
        """The model forward of one step, pruned where the scheduler's plan says; a failure in
        any of it (plan, selection, held rows, stage metadata) falls back (module docstring)."""
        step, self.step_pruning = self.step_pruning, {}
        try:
            plan = self.plan(step)
        except Exception:
            self._fall_back(step)
            plan = None
        if plan is None:  # vLLM's own step: its failures are vLLM's, not caught here
            return forward(input_ids=input_ids, positions=positions, **kwargs)
        context = get_forward_context()
        metadata = _forward_metadata(context)
        try:
            return self._run_planned(plan, context, forward, input_ids, positions, **kwargs)
        except Exception:
            self._fall_back(step)
            _restore_forward_metadata(context, metadata)
            return forward(input_ids=input_ids, positions=positions, **kwargs)

    def _fall_back(self, step: StepPruning) -> None:
        """After a failure in this step's pruning (the exception being handled): the requests
        whose pruning state it leaves invalid are logged, forgotten and reported."""
        batch, state = self.runner.input_batch, self.state
        concerned = [
            req_id
            for req_id in batch.req_ids[: batch.num_reqs]
            if req_id in step or req_id in state.kv_offsets or req_id in state.held
        ]
        logger.warning(
            "UniPrefill: pruning failed in a step of requests %s; they are recomputed "
            "unpruned, the step's other requests are unaffected",
            concerned,
            exc_info=True,
        )
        state.fell_back(concerned)

    def _run_planned(self, plan: StepPlan, context: Any, forward: Any, input_ids: Any,
                     positions: torch.Tensor, **kwargs: Any) -> Any:  # fmt: skip
        # A full CUDA graph replays one attention metadata for all layers; stages need their
        # own, which attention ops read from the forward context only outside a full graph.
        graphs = context.cudagraph_runtime_mode
        if graphs == CUDAGraphMode.FULL:
            context.cudagraph_runtime_mode = CUDAGraphMode.NONE
        try:
            if not plan.prunes:  # decodes of pruned requests: the stock graph, other metadata
                for stage in all_stages(plan, positions)[1:]:
                    if stage.moves_kv:
                        install_stage_metadata(self.runner, self.hooks.stage_layers, stage,
                                               context)  # fmt: skip
                return forward(input_ids=input_ids, positions=positions, **kwargs)
            return self._run_scoring(plan, context, forward, input_ids, positions, **kwargs)
        finally:
            context.cudagraph_runtime_mode = graphs

    def _run_scoring(self, plan: StepPlan, context: Any, forward: Any, input_ids: Any,
                     positions: torch.Tensor, **kwargs: Any) -> Any:  # fmt: skip
        """A step whose stage sizes depend on the scores: eager, with the hooks on."""
        hidden, pruned = self.hooks.run(plan, context, forward, input_ids, positions, **kwargs)
        self.eager_steps += 1
        if pruned.selection_s:  # not a step that only held chunks
            self.state.unreported["selection_s"].append(pruned.selection_s)
        kept_rows = pruned.stages[-1].kept_rows
        if kept_rows is not None:  # back to the step's rows; held rows have none
            full = hidden.new_zeros((positions.shape[0], *hidden.shape[1:]))
            in_step = kept_rows < full.shape[0]
            full[kept_rows[in_step]] = hidden[in_step]
            hidden = full
        self.state.remember(plan, pruned.stages)
        return hidden


def _forward_metadata(context: Any) -> tuple[Any, Any]:
    """Copies of the forward context's per-layer metadata and slots, which stages overwrite."""
    return tuple(copy.copy(getattr(context, name)) for name in ("attn_metadata", "slot_mapping"))


def _restore_forward_metadata(context: Any, saved: tuple[Any, Any]) -> None:
    context.attn_metadata, context.slot_mapping = saved
