"""Pruned prefill inside vLLM's V1 model runner (`GPUModelRunner`; the CPU runner inherits it).

Each step, before the forward, the batch becomes a `StepPlan` (step_plan.py); then one of three
things happens:
- no request in the step is or was pruned: vLLM's own forward, compiled or eager as configured;
- only requests pruned in earlier steps (their decodes): every stage's rows are known, so each
  stage's attention metadata is written into the forward context before the forward, which then
  runs as vLLM's (compiled) graph, unchanged: each attention op reads its layer's entry;
- some prompt is scored: the stage sizes depend on the scores, so this step runs eager
  (`ForwardContext.skip_compiled`), with module hooks on the loaded model, one mechanism for
  every family:
  - each drop layer's attention module hands over its rotated queries and keys;
  - each drop layer's output (hidden states and residual) is cut to the kept rows, the next
    stage's `StageRows` is made, and every layer of that stage gets attention metadata and KV
    slots for the compacted rows (stage_metadata.py);
  - every layer after the first drop is handed its stage's positions (original values: RoPE
    stays right);
  - the model's output is scattered back to the step's row count, so vLLM's logits indices
    (each request's last row, which is always kept) stay valid.
Hooks run only in the eager forward: vLLM traces the compiled graph once, when no step is
active, so there they are no-ops.

A pruned prompt may come in chunks (vLLM's chunked prefill): a chunk that does not end the
prompt runs stage 0, and at the first drop layer its rows leave the step and are held here
(`Held`); at the chunk that ends the prompt they join it, and the selection runs over the whole
prompt (step_plan.py).

Each pruned prompt's keep counts (and the selection's time) ride on the step's
`ModelRunnerOutput` to the scheduler, which logs them and adds them to vLLM's scheduler stats:
the route to /metrics (metrics.py).

The worker keeps each pruned request's per-stage KV offsets until the request finishes, is
aborted or is preempted; held rows until their last chunk, or the same. A preempted request is
recomputed by vLLM from scratch; it is pruned again only if it had produced no token yet (then
it is the same fresh prompt), otherwise it runs unpruned.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.config import CUDAGraphMode
from vllm.distributed import get_tp_group
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.v1.outputs import ModelRunnerOutput

from uniprefill.accounting import pruned_prompt
from uniprefill.config import CONFIG_KEY, UniPrefillConfig
from uniprefill.ops import select_tokens
from uniprefill.step_plan import (
    ScheduledRequest,
    StageRows,
    StepPlan,
    StepPruning,
    all_stages,
    first_stage,
    joined_stage,
    next_stage,
    plan_step,
    pruned_offsets,
)
from uniprefill.vllm_glue.coupling import (
    COMPILED_MODULE_ATTRIBUTES,
    raise_if_missing,
    runner_missing_attributes,
)
from uniprefill.vllm_glue.log import get_logger
from uniprefill.vllm_glue.metrics import REPORT_ATTRIBUTE, STEP_FIELD, new_report
from uniprefill.vllm_glue.stage_metadata import install_stage_metadata, layers_by_stage

logger = get_logger(__name__)
RECENT_PRUNES = 256  # pruned prompts remembered for the status RPC and benchmarks (bounded)
# Tests only: with this set to "selection" in a worker's environment, its selection raises, so
# a real engine shows its fallback (tests/e2e/test_robustness.py).
FAULT_ENV = "UNIPREFILL_TEST_FAULT"
EAGER_WARM_UP_TOKENS = 256  # rows of the start-up step that warms the eager path up


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


class _AllRowsHeld(Exception):  # noqa: N818 (control flow, not an error)
    """Every row of the step was held at the first drop layer: the later layers have no rows,
    and the step samples nothing (only unfinished prompt chunks were in it)."""

    def __init__(self, like: torch.Tensor):
        self.like = like  # a [rows, hidden] output of the drop layer: the output's shape


class _PrunedForward:
    """A scoring step's forward, as the hooks see it: its plan and the stages made so far."""

    def __init__(self, plan: StepPlan, positions: torch.Tensor):
        self.plan = plan
        self.stages: list[StageRows] = [first_stage(plan, positions)]
        self.drop_qk: tuple[torch.Tensor, torch.Tensor] | None = None  # the drop layer's q, k
        self.selection_s = 0.0  # time in the selection operator, all drop layers


class Pruner:
    """UniPrefill on one model runner: hooks on its model, and per-request KV offsets."""

    def __init__(self, runner: Any, config: UniPrefillConfig):
        raise_if_missing(runner_missing_attributes(runner), "model runner")
        self.runner = runner
        self.config = config
        self.rule = config.rule
        self.drops = tuple(config.drop_layers)
        self.step_pruning: StepPruning = {}  # the scheduler's plan for the coming step
        tp = runner.vllm_config.parallel_config.tensor_parallel_size
        self.reduce_block_scores = _summed_over_ranks if tp > 1 else None
        self.kv_offsets: dict[str, tuple[int, ...]] = {}  # live pruned requests -> stages 1..S
        self.held: dict[str, Held] = {}  # chunked pruned prompts whose last chunk is to come
        self.depth = runner.model_config.hf_text_config.num_hidden_layers
        self.recent: deque[dict] = deque(maxlen=RECENT_PRUNES)  # accounting.pruned_prompt
        self.unreported = new_report()  # not yet sent to the scheduler
        self.eager_steps = 0  # steps that scored or held prompts, run outside the compiled graph
        self.forward: _PrunedForward | None = None
        self.layers = _decoder_layers(runner.model, runner.model_config)
        self.stage_layers = layers_by_stage(runner, self.drops)
        self._install()
        logger.info("UniPrefill pruning installed on %d layers; drop layers %s", len(self.layers),
                    list(self.drops))  # fmt: skip

    # ---- model hooks (eager forwards of scoring steps) ---------------------------------------

    def _install(self) -> None:
        for d in self.drops:
            attention = [m for m in self.layers[d].modules() if isinstance(m, Attention)]
            if len(attention) != 1:
                raise RuntimeError(f"UniPrefill: layer {d} has {len(attention)} attention modules")
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

    def _drop(self, forward: _PrunedForward, attention: Attention, output: Any) -> Any:
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
            held = self.held.setdefault(plan.req_ids[i], Held())
            # copies: the step's positions and q/k live in buffers the next step reuses
            held.add([output[j][span].clone() for j in slots], stage.positions[span].clone(),
                     k[span].clone())  # fmt: skip
        joining = [self.held.pop(plan.req_ids[i]) for i in plan.held_rows.nonzero().flatten()]
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

    # ---- per step ----------------------------------------------------------------------------

    def plan(self, step: StepPruning) -> StepPlan | None:
        """This step's plan: the scheduler's (`step`), over the runner's batch and the pruned
        requests' state here."""
        runner = self.runner
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
                kv_offsets=self.kv_offsets.get(req_id),
                held_rows=self.held[req_id].num_rows if req_id in self.held else 0,
            )
            for i, req_id in enumerate(batch.req_ids[:num_reqs])
        ]
        return plan_step(scheduled, len(self.drops) + 1)

    def run(self, forward: Any, input_ids: Any, positions: torch.Tensor, **kwargs: Any) -> Any:
        """The model forward of one step, pruned where the scheduler's plan says.

        A failure in any of it (plan, selection, held rows, stage metadata) does not end the
        engine: the step runs again as vLLM's own forward, every token kept, and the requests
        it pruned or held are reported as fallbacks; the scheduler drops their token and has
        them recomputed unpruned."""
        step, self.step_pruning = self.step_pruning, {}
        context = get_forward_context()
        metadata = _forward_metadata(context)
        try:
            return self._run_planned(step, context, forward, input_ids, positions, **kwargs)
        except Exception:
            concerned = self._concerned(step)
            logger.warning(
                "UniPrefill: pruning failed in a step of requests %s; they are recomputed "
                "unpruned, the step's other requests are unaffected",
                concerned,
                exc_info=True,
            )
            self.forget(concerned)
            self.unreported["fallbacks"].extend(concerned)
            _restore_forward_metadata(context, metadata)
            return forward(input_ids=input_ids, positions=positions, **kwargs)

    def _concerned(self, step: StepPruning) -> list[str]:
        """The requests of this step whose pruning state a failed step leaves invalid."""
        batch = self.runner.input_batch
        return [
            req_id
            for req_id in batch.req_ids[: batch.num_reqs]
            if req_id in step or req_id in self.kv_offsets or req_id in self.held
        ]

    def _run_planned(self, step: StepPruning, context: Any, forward: Any, input_ids: Any,
                     positions: torch.Tensor, **kwargs: Any) -> Any:  # fmt: skip
        plan = self.plan(step)
        if plan is None:
            return forward(input_ids=input_ids, positions=positions, **kwargs)
        # A full CUDA graph replays one attention metadata for all layers; stages need their
        # own, which attention ops read from the forward context only outside a full graph.
        graphs = context.cudagraph_runtime_mode
        if graphs == CUDAGraphMode.FULL:
            context.cudagraph_runtime_mode = CUDAGraphMode.NONE
        try:
            if not plan.prunes:  # decodes of pruned requests: the stock graph, other metadata
                for stage in all_stages(plan, positions)[1:]:
                    if stage.moves_kv:
                        install_stage_metadata(self.runner, self.stage_layers, stage, context)
                return forward(input_ids=input_ids, positions=positions, **kwargs)
            return self._run_scoring(plan, context, forward, input_ids, positions, **kwargs)
        finally:
            context.cudagraph_runtime_mode = graphs

    def _run_scoring(self, plan: StepPlan, context: Any, forward: Any, input_ids: Any,
                     positions: torch.Tensor, **kwargs: Any) -> Any:  # fmt: skip
        """A step whose stage sizes depend on the scores: eager, with the hooks on."""
        pruned = _PrunedForward(plan, positions)
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
        self.eager_steps += 1
        if pruned.selection_s:  # not a step that only held chunks
            self.unreported["selection_s"].append(pruned.selection_s)
        kept_rows = pruned.stages[-1].kept_rows
        if kept_rows is not None:  # back to the step's rows; held rows have none
            full = hidden.new_zeros((positions.shape[0], *hidden.shape[1:]))
            in_step = kept_rows < full.shape[0]
            full[kept_rows[in_step]] = hidden[in_step]
            hidden = full
        self._remember(plan, pruned.stages)
        return hidden

    def _remember(self, plan: StepPlan, stages: list[StageRows]) -> None:
        for req_id, offsets in pruned_offsets(plan, stages).items():
            self.kv_offsets[req_id] = offsets
            prompt_len = int(plan.joined_rows[plan.req_ids.index(req_id)])
            kept = [prompt_len] + [prompt_len - o for o in offsets]
            record = pruned_prompt(req_id, kept, self.drops, self.depth)
            self.recent.append(record)
            self.unreported["prompts"].append(record)

    def take_report(self) -> dict | None:
        """What pruning did since the last report (metrics.new_report), or None if nothing."""
        if not any(self.unreported.values()):
            return None
        report, self.unreported = self.unreported, new_report()
        return report

    def forget(self, req_ids: Any) -> None:
        for req_id in req_ids:
            self.kv_offsets.pop(req_id, None)
            self.held.pop(req_id, None)


def _forward_metadata(context: Any) -> tuple[Any, Any]:
    """Copies of the forward context's per-layer metadata and slots, which stages overwrite."""
    return tuple(copy.copy(getattr(context, name)) for name in ("attn_metadata", "slot_mapping"))


def _restore_forward_metadata(context: Any, saved: tuple[Any, Any]) -> None:
    context.attn_metadata, context.slot_mapping = saved


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


def _config_of(runner: Any) -> UniPrefillConfig | None:
    """The engine's UniPrefill settings; None when it prunes nothing."""
    raw = (runner.vllm_config.additional_config or {}).get(CONFIG_KEY)
    config = UniPrefillConfig.from_dict(raw) if raw is not None else None
    return config if config is not None and config.enabled and config.drop_layers else None


def pruner_of(runner: Any) -> Pruner | None:
    """The runner's Pruner, made on first use; None when UniPrefill is off for this engine."""
    if "_uniprefill" not in runner.__dict__:
        config = _config_of(runner)
        runner._uniprefill = Pruner(runner, config) if config is not None else None
    return runner._uniprefill


def wrap_profile_run(original: Any) -> Any:
    def profile_run(self, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if _config_of(self) is not None:
            _warm_up_eager_forward(self)
        return result

    return profile_run


def _warm_up_eager_forward(runner: Any) -> None:
    """One small dummy step through the model's plain forward, as scoring steps run it.

    In a compiled engine vLLM compiles some ops on their own for that path (activation-and-mul
    ops wrap `forward_native` in torch.compile); this compiles them at start-up instead of in
    the first pruned prompt's step.
    """
    (flag,) = COMPILED_MODULE_ATTRIBUTES
    graphs = [m for m in runner.model.modules() if getattr(m, flag, True) is False]
    if not graphs:  # eager engine
        return
    for module in graphs:
        setattr(module, flag, True)
    try:
        runner._dummy_run(min(EAGER_WARM_UP_TOKENS, runner.max_num_tokens))
    finally:
        for module in graphs:
            setattr(module, flag, False)


def wrap_model_forward(original: Any) -> Any:
    def _model_forward(self, input_ids=None, positions=None, **kwargs):
        pruner = pruner_of(self)
        if pruner is None or positions is None:
            return original(self, input_ids=input_ids, positions=positions, **kwargs)
        return pruner.run(
            lambda **kw: original(self, **kw), input_ids=input_ids, positions=positions, **kwargs
        )

    return _model_forward


def wrap_sample_tokens(original: Any) -> Any:
    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        pruner = pruner_of(self)
        if pruner is None or not isinstance(output, ModelRunnerOutput):
            return output
        report = pruner.take_report()
        if report is not None:
            output = dataclasses.replace(output)  # never annotate an object vLLM shares
            setattr(output, REPORT_ATTRIBUTE, report)
        return output

    return sample_tokens


def wrap_update_states(original: Any) -> Any:
    def _update_states(self, scheduler_output: Any) -> Any:
        pruner = pruner_of(self)
        if pruner is not None:  # their KV is freed (finished) or recomputed from scratch
            pruner.forget(scheduler_output.finished_req_ids)
            pruner.forget(scheduler_output.preempted_req_ids or ())
            pruner.forget(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
            pruner.step_pruning = getattr(scheduler_output, STEP_FIELD, None) or {}
        return original(self, scheduler_output)

    return _update_states
