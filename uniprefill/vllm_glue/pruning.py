"""Pruned prefill inside vLLM's V1 model runner (`GPUModelRunner`; the CPU runner inherits it).

One mechanism for every family, put on the loaded model as module hooks:
- each drop layer's attention module hands over its rotated queries and keys;
- each drop layer's output (hidden states and residual) is cut to the kept rows, with the
  step's positions; then every layer of the next stage gets attention metadata and a KV slot
  mapping rebuilt for the compacted rows by its own metadata builder, so the same code serves
  any attention backend;
- every layer after the first drop is handed the compacted positions (original values: RoPE
  stays right);
- the model's output is scattered back to the step's row count, so vLLM's logits indices (each
  request's last row, which is always kept) stay valid.

KV layout (docs/design/selection.md, section 3): for a pruned request, a layer of stage s holds
its kept_s prompt tokens at the front of the request's blocks, then the generated tokens. The
worker keeps each pruned request's per-stage offset (prompt_len - kept_s) until the request
finishes, is aborted or is preempted. A preempted request is recomputed by vLLM from scratch; it
is pruned again only if it had produced no token yet (then it is the same fresh prompt),
otherwise it runs unpruned.
"""

from __future__ import annotations

import inspect
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.worker.block_table import SlotMappingMode

from uniprefill.config import CONFIG_KEY, UniPrefillConfig
from uniprefill.ops import select_tokens
from uniprefill.requests import request_p
from uniprefill.vllm_glue.coupling import raise_if_missing, runner_missing_attributes
from uniprefill.vllm_glue.log import get_logger

logger = get_logger(__name__)
RECENT_PRUNES = 256  # per-request keep counts remembered for status/benchmarks (bounded)


@dataclass
class _Step:
    """Rows of one model step as they flow through the stages."""

    req_ids: list[str]
    fresh: torch.Tensor  # [R] bool: a whole fresh prompt, scored at the drop layers
    p: torch.Tensor  # [R] float32: top-p per request (1.0: kept whole)
    stored: torch.Tensor  # [S + 1, R] int64, host: offsets of requests pruned in earlier steps
    base_lens: torch.Tensor  # [R] int64, host: rows each request brought into the step
    query_start_loc: torch.Tensor  # [R + 1] int32, host: the current rows' offsets
    positions: torch.Tensor  # [rows] original positions of the current rows
    scores: bool  # some fresh prompt asks to be pruned: run the selection at drop layers
    rows: torch.Tensor | None = None  # [rows] index into the step's rows; None: all, in order
    captured: tuple[torch.Tensor, torch.Tensor] | None = None  # drop layer's (q, k)
    offsets: list[torch.Tensor] = field(default_factory=list)  # per stage, [R] int64, host


class Pruner:
    """UniPrefill on one model runner: hooks on its model, and per-request KV offsets."""

    def __init__(self, runner: Any, config: UniPrefillConfig):
        raise_if_missing(runner_missing_attributes(runner), "model runner")
        self.runner = runner
        self.config = config
        self.rule = config.rule
        self.drops = tuple(config.drop_layers)
        self.offsets: dict[str, list[int]] = {}  # live pruned requests -> offset per stage 1..S
        self.recent: deque[tuple[str, list[int]]] = deque(maxlen=RECENT_PRUNES)
        self.step: _Step | None = None
        self.layers = _decoder_layers(runner.model, runner.model_config)
        # Per KV-cache group, the layer names of each stage (a drop layer ends its stage).
        self.stage_layers: list[list[set[str]]] = []
        for group in runner.kv_cache_config.kv_cache_groups:
            by_stage: list[set[str]] = [set() for _ in range(len(self.drops) + 1)]
            for name in group.layer_names:
                by_stage[sum(d < extract_layer_index(name) for d in self.drops)].add(name)
            self.stage_layers.append(by_stage)
        self._install()
        logger.info("UniPrefill pruning installed on %d layers; drop layers %s", len(self.layers),
                    list(self.drops))  # fmt: skip

    # ---- model hooks -------------------------------------------------------------------------

    def _install(self) -> None:
        for d in self.drops:
            attention = [m for m in self.layers[d].modules() if isinstance(m, Attention)]
            if len(attention) != 1:
                raise RuntimeError(f"UniPrefill: layer {d} has {len(attention)} attention modules")
            attention[0].register_forward_pre_hook(self._capture_qk)
            self.layers[d].register_forward_hook(self._make_drop_hook(d, attention[0]))
        for layer in self.layers[self.drops[0] + 1 :] if self.drops else ():
            where = _positions_argument(layer)
            layer.register_forward_pre_hook(self._make_positions_hook(where), with_kwargs=True)

    def _capture_qk(self, module: torch.nn.Module, args: tuple) -> None:
        if self.step is not None:
            self.step.captured = (args[0], args[1])

    def _make_positions_hook(self, where: tuple[str, int]):
        name, index = where

        def hook(module, args, kwargs):
            if self.step is None:
                return None
            if name in kwargs:
                kwargs[name] = self.step.positions
            else:
                args = (*args[:index], self.step.positions, *args[index + 1 :])
            return args, kwargs

        return hook

    def _make_drop_hook(self, layer: int, attention: Attention):
        stage = self.drops.index(layer)  # this layer ends stage `stage`

        def hook(module, args, output):
            if self.step is None:
                return None
            return self._drop(stage, attention, output)

        return hook

    def _drop(self, stage: int, attention: Attention, output: Any) -> Any:
        step = self.step
        q, k = step.captured
        step.captured = None
        rows = step.positions.numel()
        compacted = False
        if step.scores:  # else only earlier-pruned requests (decodes): just switch the KV layout
            selection = select_tokens(
                q[:rows].view(rows, attention.num_heads, attention.head_size),
                k[:rows].view(rows, attention.num_kv_heads, attention.head_size),
                step.query_start_loc.to(step.positions.device),
                p=step.p,
                rule=self.rule,
            )
            kept = selection.kept_indices
            compacted = kept.numel() < rows
            if compacted:
                output = tuple(
                    t[kept] if isinstance(t, torch.Tensor) and t.shape[0] == rows else t
                    for t in output
                )
                step.positions = step.positions[kept]
                step.rows = kept if step.rows is None else step.rows[kept]
                step.query_start_loc = selection.cu_seqlens.cpu()
        lens = step.query_start_loc.diff().long()
        offsets = step.stored[stage + 1] + (step.base_lens - lens)
        step.offsets.append(offsets)
        if compacted or bool(offsets.any()):
            self._set_stage_metadata(stage + 1, offsets)
        return output

    # ---- stage metadata ----------------------------------------------------------------------

    def _set_stage_metadata(self, stage: int, offsets: torch.Tensor) -> None:
        """Attention metadata and KV slots, for the current rows, of every layer in `stage`."""
        runner, step = self.runner, self.step
        context = get_forward_context()
        num_reqs = len(step.req_ids)
        query_start_loc_cpu = step.query_start_loc
        lens = query_start_loc_cpu.diff()
        rows = int(query_start_loc_cpu[-1])
        device = step.positions.device
        offsets_dev = offsets.to(device)
        seq_lens_cpu = runner.optimistic_seq_lens_cpu[:num_reqs] - offsets
        lens_dev, start_dev = lens.to(device), query_start_loc_cpu[:-1].to(device)
        request_of_row = torch.repeat_interleave(
            torch.arange(num_reqs, device=device), lens_dev, output_size=rows
        )
        # A row's index in its request's KV at this stage: what the stage already holds, plus
        # its rank among the request's rows in this step (kept prompt tokens go to the front).
        already = (seq_lens_cpu.to(device) - lens_dev)[request_of_row]
        virtual = already + torch.arange(rows, device=device) - start_dev[request_of_row]
        batch = runner.input_batch
        common = dict(
            query_start_loc=query_start_loc_cpu.to(device),
            query_start_loc_cpu=query_start_loc_cpu,
            seq_lens=(runner.seq_lens[:num_reqs] - offsets_dev).to(runner.seq_lens.dtype),
            seq_lens_cpu_upper_bound=seq_lens_cpu.to(runner.optimistic_seq_lens_cpu.dtype),
            num_reqs=num_reqs,
            num_actual_tokens=rows,
            max_query_len=int(lens.max()),
            max_seq_len=int(seq_lens_cpu.max()),
            causal=True,
            is_prefilling=batch.num_computed_tokens_cpu_tensor[:num_reqs]
            < batch.num_prompt_tokens_cpu_tensor[:num_reqs],
            positions=step.positions,
        )
        for gid, by_stage in enumerate(self.stage_layers):
            names = by_stage[stage]
            if not names:
                continue
            table = batch.block_table[gid]
            block_table = table.get_device_tensor(num_reqs)
            if table.slot_mapping_mode == SlotMappingMode.TOKEN_TO_KV_SLOT:
                block = block_table[request_of_row, virtual // table.block_size].long()
                slots = block * table.block_size + virtual % table.block_size
            else:  # recurrent state groups address their state through the block table
                slots = context.slot_mapping.get(next(iter(names)))
            metadata = CommonAttentionMetadata(
                **common, block_table_tensor=block_table, slot_mapping=slots
            )
            for attn_group in runner.attn_groups[gid]:
                mine = names.intersection(attn_group.layer_names)
                if not mine:
                    continue
                built = attn_group.build_metadata(metadata)
                for name in mine:
                    context.attn_metadata[name] = built
                    if slots is not None:
                        context.slot_mapping[name] = slots

    # ---- per step ----------------------------------------------------------------------------

    def plan(self, positions: torch.Tensor) -> _Step | None:
        """This step's rows, or None when nothing in it is (or was) pruned."""
        runner = self.runner
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        query_start_loc = runner.query_start_loc.cpu[: num_reqs + 1].clone()
        lens = query_start_loc.diff().long()
        computed = batch.num_computed_tokens_cpu[:num_reqs]
        stages = len(self.drops) + 1
        p = torch.ones(num_reqs, dtype=torch.float32)
        fresh = torch.zeros(num_reqs, dtype=torch.bool)
        stored = torch.zeros(stages, num_reqs, dtype=torch.int64)
        for i, req_id in enumerate(req_ids):
            if req_id in self.offsets:
                stored[1:, i] = torch.tensor(self.offsets[req_id])
                continue
            state = runner.requests[req_id]
            if (
                computed[i] == 0
                and lens[i] == state.num_prompt_tokens
                and not state.output_token_ids
            ):
                fresh[i] = True
                p[i] = request_p(self.config, state.sampling_params)
        scores = bool((fresh & (p < 1.0)).any())
        if not stored.any() and not scores:
            return None
        return _Step(
            req_ids=list(req_ids),
            fresh=fresh,
            p=p.to(positions.device),
            stored=stored,
            base_lens=lens,
            query_start_loc=query_start_loc,
            positions=positions[: int(query_start_loc[-1])],
            scores=scores,
            offsets=[stored[0]],
        )

    def run(self, forward: Any, input_ids: Any, positions: torch.Tensor, **kwargs: Any) -> Any:
        """The model forward of one step, pruned where the step calls for it."""
        step = self.plan(positions)
        if step is None:
            return forward(input_ids=input_ids, positions=positions, **kwargs)
        self.step = step
        try:
            hidden = forward(input_ids=input_ids, positions=positions, **kwargs)
        finally:
            self.step = None
        if step.rows is not None:
            full = hidden.new_zeros((positions.shape[0], *hidden.shape[1:]))
            full[step.rows] = hidden
            hidden = full
        self._remember(step)
        return hidden

    def _remember(self, step: _Step) -> None:
        offsets = torch.stack(step.offsets[1:])  # [S, R]
        lens = step.base_lens
        for i in step.fresh.nonzero().flatten().tolist():
            if offsets[:, i].any():
                self.offsets[step.req_ids[i]] = offsets[:, i].tolist()
                kept = [int(lens[i])] + (lens[i] - offsets[:, i]).tolist()
                self.recent.append((step.req_ids[i], kept))

    def forget(self, req_ids: Any) -> None:
        for req_id in req_ids:
            self.offsets.pop(req_id, None)


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


def pruner_of(runner: Any) -> Pruner | None:
    """The runner's Pruner, made on first use; None when UniPrefill is off for this engine."""
    if "_uniprefill" not in runner.__dict__:
        raw = (runner.vllm_config.additional_config or {}).get(CONFIG_KEY)
        config = UniPrefillConfig.from_dict(raw) if raw is not None else None
        enabled = config is not None and config.enabled and bool(config.drop_layers)
        runner._uniprefill = Pruner(runner, config) if enabled else None
    return runner._uniprefill


def wrap_model_forward(original: Any) -> Any:
    def _model_forward(self, input_ids=None, positions=None, **kwargs):
        pruner = pruner_of(self)
        if pruner is None or positions is None:
            return original(self, input_ids=input_ids, positions=positions, **kwargs)
        return pruner.run(
            lambda **kw: original(self, **kw), input_ids=input_ids, positions=positions, **kwargs
        )

    return _model_forward


def wrap_update_states(original: Any) -> Any:
    def _update_states(self, scheduler_output: Any) -> Any:
        pruner = pruner_of(self)
        if pruner is not None:  # their KV is freed (finished) or recomputed from scratch
            pruner.forget(scheduler_output.finished_req_ids)
            pruner.forget(scheduler_output.preempted_req_ids or ())
            pruner.forget(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        return original(self, scheduler_output)

    return _update_states
