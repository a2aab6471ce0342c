"""Attention metadata and KV slots for the layers of one stage, from its `StageRows`.

Each layer's attention op reads its metadata and slot mapping from vLLM's forward context by
layer name when it runs, in eager and compiled forwards alike, so writing a stage's entries
there is all it takes to move that stage's layers onto the stage's rows and KV layout. Every
KV-cache group's own metadata builder makes them, so any attention backend is served.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.worker.block_table import SlotMappingMode

from uniprefill.step_plan import StageRows


def layers_by_stage(runner: Any, drops: tuple[int, ...]) -> list[list[set[str]]]:
    """Per KV-cache group, the attention layer names of each stage (a drop layer ends its
    stage)."""
    groups = []
    for group in runner.kv_cache_config.kv_cache_groups:
        by_stage: list[set[str]] = [set() for _ in range(len(drops) + 1)]
        for name in group.layer_names:
            by_stage[sum(d < extract_layer_index(name) for d in drops)].add(name)
        groups.append(by_stage)
    return groups


def install_stage_metadata(
    runner: Any, stage_layers: list[list[set[str]]], rows: StageRows, context: Any
) -> None:
    """Point every attention layer of `rows.stage` at metadata and KV slots for its rows.

    Requests with no rows at this stage (chunks held at the first drop layer) are left out of
    its metadata, as vLLM leaves out requests it did not schedule."""
    batch = runner.input_batch
    lens = rows.query_start_loc.diff()
    total = lens.numel()
    active = torch.nonzero(lens).flatten()  # requests with rows at this stage, in step order
    lens = lens[active]
    num_reqs = active.numel()
    query_start_loc_cpu = torch.zeros(num_reqs + 1, dtype=torch.int32)
    torch.cumsum(lens, 0, out=query_start_loc_cpu[1:])
    num_rows = rows.num_rows
    device = rows.positions.device
    offsets = rows.kv_offsets[active]
    seq_lens_cpu = runner.optimistic_seq_lens_cpu[:total][active] - offsets
    lens_dev, start_dev = lens.to(device), query_start_loc_cpu[:-1].to(device)
    request_of_row = torch.repeat_interleave(
        torch.arange(num_reqs, device=device), lens_dev, output_size=num_rows
    )
    # A row's index in its request's KV at this stage: what the stage already holds, plus
    # its rank among the request's rows in this step (kept prompt tokens go to the front).
    already = (seq_lens_cpu.to(device) - lens_dev)[request_of_row]
    kv_index = already + torch.arange(num_rows, device=device) - start_dev[request_of_row]
    active_dev = active.to(device)
    prefilling = (
        batch.num_computed_tokens_cpu_tensor[:total] < batch.num_prompt_tokens_cpu_tensor[:total]
    )
    common = dict(
        query_start_loc=query_start_loc_cpu.to(device),
        query_start_loc_cpu=query_start_loc_cpu,
        seq_lens=(runner.seq_lens[:total][active_dev] - offsets.to(device)).to(
            runner.seq_lens.dtype
        ),
        seq_lens_cpu_upper_bound=seq_lens_cpu.to(runner.optimistic_seq_lens_cpu.dtype),
        num_reqs=num_reqs,
        num_actual_tokens=num_rows,
        max_query_len=int(lens.max()),
        max_seq_len=int(seq_lens_cpu.max()),
        causal=True,
        is_prefilling=prefilling[active],
        positions=rows.positions,
    )
    for gid, by_stage in enumerate(stage_layers):
        names = by_stage[rows.stage]
        if not names:
            continue
        table = batch.block_table[gid]
        block_table = table.get_device_tensor(total)[active_dev]
        if table.slot_mapping_mode == SlotMappingMode.TOKEN_TO_KV_SLOT:
            block = block_table[request_of_row, kv_index // table.block_size].long()
            slots = block * table.block_size + kv_index % table.block_size
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
