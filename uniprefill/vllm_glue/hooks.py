"""The pruned forward of a scoring step: module hooks on the loaded model, one mechanism for
every family. They act only while a step that scores or holds prompts runs, eagerly
(`ForwardContext.skip_compiled`):
- each drop layer's attention module hands over its rotated queries and keys;
- at the first drop layer, the rows of earlier chunks held there join their last chunk, and the
  rows of chunks that do not end their prompt leave the step and are held (request_state.Held);
- each drop layer's output (hidden states and residual) is cut to the kept rows, the next
  stage's `StageRows` is made, and every layer of that stage gets attention metadata and KV
  slots for the compacted rows (stage_metadata.py);
- every layer after the first drop is handed its stage's positions (original values: RoPE
  stays right).
vLLM traces the compiled graph once, when no step is active, so in compiled forwards the hooks
are no-ops.
"""

from __future__ import annotations

import inspect
import os
import time
from typing import Any

import torch
from vllm.distributed import get_tp_group
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention

from uniprefill.ops import select_tokens
from uniprefill.ops.select.rule import SelectionRule
from uniprefill.step_plan import StageRows, StepPlan, first_stage, joined_stage, next_stage
from uniprefill.vllm_glue.coupling import (
    ATTENTION_ATTRIBUTES,
    missing_attributes,
    raise_if_missing,
)
from uniprefill.vllm_glue.request_state import Held, RequestState
from uniprefill.vllm_glue.stage_metadata import install_stage_metadata, layers_by_stage

# Tests only. FAULT_ENV="selection" in a worker's environment makes its selection raise, so a
# real engine shows its fallback; RECORD_ENV set when an engine starts makes its workers keep
# every selection's inputs and kept positions (`StageHooks.selections`), so tests can recompute
# them with the oracle (tests/e2e/test_robustness.py, test_pruning.py).
FAULT_ENV = "UNIPREFILL_TEST_FAULT"
RECORD_ENV = "UNIPREFILL_TEST_RECORD_SELECTIONS"


class _AllRowsHeld(Exception):  # noqa: N818 (control flow, not an error)
    """Every row of the step was held at the first drop layer: the later layers have no rows,
    and the step samples nothing (only unfinished prompt chunks were in it)."""

    def __init__(self, like: torch.Tensor):
        self.like = like  # a [rows, hidden] output of the drop layer: the output's shape


class PrunedForward:
    """A scoring step's forward, as the hooks see it: its plan and the stages made so far."""

    def __init__(self, plan: StepPlan, positions: torch.Tensor):
        self.plan = plan
        self.stages: list[StageRows] = [first_stage(plan, positions)]
        self.drop_qk: tuple[torch.Tensor, torch.Tensor] | None = None  # the drop layer's q, k
        self.selection_s = 0.0  # time in the selection operator, all drop layers


class StageHooks:
    """The hooks on one model runner's model, and the scoring step they are active for."""

    def __init__(self, runner: Any, rule: SelectionRule, drops: tuple[int, ...],
                 state: RequestState):  # fmt: skip
        self.runner = runner
        self.rule = rule
        self.drops = drops
        self.state = state
        tp = runner.vllm_config.parallel_config.tensor_parallel_size
        self.reduce_block_scores = _summed_over_ranks if tp > 1 else None
        self.forward: PrunedForward | None = None
        self.layers = _decoder_layers(runner.model, runner.model_config)
        self.stage_layers = layers_by_stage(runner, drops)
        self.selections: list[dict] | None = [] if os.environ.get(RECORD_ENV) else None
        self._install()

    def run(
        self, plan: StepPlan, context: Any, forward: Any, input_ids: Any,
        positions: torch.Tensor, **kwargs: Any,
    ) -> tuple[torch.Tensor, PrunedForward]:  # fmt: skip
        """The step's forward with the hooks on, eager; its output (rows of the last stage) and
        the stages it made."""
        pruned = PrunedForward(plan, positions)
        skipping = context.skip_compiled
        context.skip_compiled = True
        self.forward = pruned
        try:
            hidden = forward(input_ids=input_ids, positions=positions, **kwargs)
        except _AllRowsHeld as held:
            hidden = held.like.new_zeros((0, *held.like.shape[1:]))
        finally:
            self.forward = None
            context.skip_compiled = skipping
        return hidden, pruned

    def _install(self) -> None:
        for d in self.drops:
            attention = [m for m in self.layers[d].modules() if isinstance(m, Attention)]
            if len(attention) != 1:
                raise RuntimeError(f"UniPrefill: layer {d} has {len(attention)} attention modules")
            missing = missing_attributes(attention[0], ATTENTION_ATTRIBUTES)
            raise_if_missing(missing, f"attention module of layer {d}")
            attention[0].register_forward_pre_hook(self._capture_qk)
            self.layers[d].register_forward_hook(self._make_drop_hook(attention[0]))
        for layer in self.layers[self.drops[0] + 1 :] if self.drops else ():
            where = _positions_argument(layer)
            layer.register_forward_pre_hook(self._make_positions_hook(where), with_kwargs=True)

    def _capture_qk(self, module: torch.nn.Module, args: tuple) -> None:
        if self.forward is not None:
            self.forward.drop_qk = (args[0], args[1])

    def _make_positions_hook(self, where: tuple[str, int]):
        name, index = where

        def hook(module, args, kwargs):
            if self.forward is None:
                return None
            positions = self.forward.stages[-1].positions
            if name in kwargs:
                kwargs[name] = positions
            else:
                args = (*args[:index], positions, *args[index + 1 :])
            return args, kwargs

        return hook

    def _make_drop_hook(self, attention: Attention):
        def hook(module, args, output):
            if self.forward is None:
                return None
            return self._drop(self.forward, attention, output)

        return hook

    def _drop(self, forward: PrunedForward, attention: Attention, output: Any) -> Any:
        """End a stage: score its rows, keep the selected ones, start the next stage."""
        stage = forward.stages[-1]
        q, k = forward.drop_qk
        forward.drop_qk = None
        rows = stage.num_rows
        q, k = q[:rows], k[:rows]
        if stage.stage == 0 and forward.plan.joins:
            stage, output, q, k = self._join(forward.plan, stage, output, q, k)
            forward.stages[-1] = stage
            rows = stage.num_rows
            if rows == 0:
                raise _AllRowsHeld(output[0])
        started = time.perf_counter()
        if os.environ.get(FAULT_ENV) == "selection":
            raise RuntimeError(f"UniPrefill test fault ({FAULT_ENV}=selection)")
        selection = select_tokens(
            q.view(rows, attention.num_heads, attention.head_size),
            k.view(rows, attention.num_kv_heads, attention.head_size),
            stage.query_start_loc.to(stage.positions.device),
            p=forward.plan.p.to(stage.positions.device),
            rule=self.rule,
            queries=forward.plan.queries,
            reduce_block_scores=self.reduce_block_scores,
        )
        kept = selection.kept_indices
        forward.selection_s += time.perf_counter() - started
        if self.selections is not None:
            self.selections.append(_selection_record(forward.plan, stage, q, k, kept, attention))
        if kept.numel() < rows:
            output = tuple(
                t[kept] if isinstance(t, torch.Tensor) and t.shape[0] == rows else t for t in output
            )
            following = next_stage(forward.plan, stage, kept, selection.cu_seqlens)
        else:
            following = next_stage(forward.plan, stage)
        forward.stages.append(following)
        if following.moves_kv:
            install_stage_metadata(self.runner, self.stage_layers, following, get_forward_context())
        return output

    def _join(self, plan: StepPlan, stage: StageRows, output: Any, q: torch.Tensor,
              k: torch.Tensor) -> tuple[StageRows, Any, torch.Tensor, torch.Tensor]:  # fmt: skip
        """At the first drop layer: hold the rows of deferred chunks, and put the held rows of
        scored requests in front of their last chunk's rows."""
        rows = stage.num_rows
        slots = [
            i for i, t in enumerate(output) if isinstance(t, torch.Tensor) and t.shape[0] == rows
        ]
        starts = stage.query_start_loc.tolist()
        for i in plan.deferred.nonzero().flatten().tolist():
            span = slice(starts[i], starts[i + 1])
            held = self.state.held.setdefault(plan.req_ids[i], Held())
            # copies: the step's positions and q/k live in buffers the next step reuses
            held.add([output[j][span].clone() for j in slots], stage.positions[span].clone(),
                     k[span].clone())  # fmt: skip
        joining = [self.state.held.pop(plan.req_ids[i]) for i in plan.held_rows.nonzero().flatten()]
        held_positions = torch.cat(
            [stage.positions[:0], *(p for h in joining for p in h.positions)]
        )
        joined = joined_stage(plan, stage, held_positions)
        order = joined.kept_rows

        def with_held(tensor: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([tensor, *parts])[order]

        output = list(output)
        for n, j in enumerate(slots):
            output[j] = with_held(output[j], [t for h in joining for t in h.outputs[n]])
        q = with_held(q, [q.new_zeros(h.num_rows, q.shape[1]) for h in joining])
        k = with_held(k, [t for h in joining for t in h.keys])
        return joined, tuple(output), q, k


def _summed_over_ranks(block_scores: torch.Tensor) -> torch.Tensor:
    """Under tensor parallelism each rank scores with its own heads: every rank's block scores,
    summed in rank order, so each rank computes the same float32 sum (an all-reduce may add in
    another order on each rank) and keeps the same tokens."""
    return get_tp_group().all_gather(block_scores.unsqueeze(0), dim=0).sum(0)


def _decoder_layers(model: torch.nn.Module, model_config: Any) -> torch.nn.ModuleList:
    depth = model_config.hf_text_config.num_hidden_layers
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, torch.nn.ModuleList):
            if len(module) == depth:
                return module
    raise RuntimeError(f"UniPrefill: no decoder layer list of length {depth} in {type(model)}")


def _positions_argument(layer: torch.nn.Module) -> tuple[str, int]:
    """Where a decoder layer takes its positions: the parameter name and positional index."""
    params = list(inspect.signature(layer.forward).parameters)
    if "positions" not in params:
        raise RuntimeError(f"UniPrefill: {type(layer).__name__}.forward takes no `positions`")
    return "positions", params.index("positions")


def _selection_record(plan: StepPlan, stage: StageRows, q: torch.Tensor, k: torch.Tensor,
                      kept: torch.Tensor, attention: Attention) -> dict:  # fmt: skip
    """What one drop layer's selection saw and kept, as plain lists (RECORD_ENV, tests)."""
    rows = stage.num_rows
    return {
        "req_ids": list(plan.req_ids),
        "stage": stage.stage,
        "dtype": str(q.dtype).removeprefix("torch."),
        "q": q.view(rows, attention.num_heads, attention.head_size).float().tolist(),
        "k": k.view(rows, attention.num_kv_heads, attention.head_size).float().tolist(),
        "cu_seqlens": stage.query_start_loc.tolist(),
        "p": plan.p.tolist(),
        "queries": plan.queries.tolist(),
        "positions": stage.positions.tolist(),
        "kept": kept.tolist(),
    }
