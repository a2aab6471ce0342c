"""UniPrefill in plain PyTorch on Hugging Face models (batch size 1): the oracle for the vLLM path.

One generic loop over the model's own decoder layers serves every family (Llama, Qwen2, Gemma 3,
Qwen3-Next): after each drop layer, hidden states and position ids are cut to the kept tokens,
so every later layer (full, sliding-window or linear attention, MLP, MoE) runs on those only. A
transformers `DynamicCache` gives each layer exactly the KV (or recurrent state) of the tokens
that reached it, so greedy decoding afterwards attends to what each layer holds. Sliding-window
layers apply their window over the compacted sequence, as vLLM's compacted KV cache will.

The drop layers' rotated queries and keys are taken from inside attention, through an attention
function registered with transformers (`uniprefill_sdpa`, SDPA plus a capture).
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from uniprefill.config import UniPrefillConfig
from uniprefill.families import layer_types
from uniprefill.ops import select_tokens
from uniprefill.requests import ParagraphBreaks, paragraph_breaks, scoring_queries

ATTENTION = "uniprefill_sdpa"
_captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (query, key) of prefill
_capture_layers: frozenset[int] = frozenset()


def _sdpa_with_capture(module, query, key, value, attention_mask, **kwargs):
    if module.layer_idx in _capture_layers and query.shape[2] > 1:
        _captured[module.layer_idx] = (query, key)  # [1, H, n, d], rotated (and normed)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, _sdpa_with_capture)


@contextmanager
def _capturing(layers: frozenset[int]):
    global _capture_layers
    _capture_layers = layers
    try:
        yield _captured
    finally:
        _capture_layers = frozenset()
        _captured.clear()


@dataclass
class ReferenceResult:
    tokens: list[int]  # greedy tokens, the first one from the (pruned) prefill
    kept_per_stage: list[int]  # tokens entering stage 0 (the prompt), then after each drop
    first_logits: torch.Tensor  # [vocab] float32 logits of the first generated token
    prefill_seconds: float
    layer_tokens: list[int] = field(default_factory=list)  # tokens each layer processed
    kept_positions: list[torch.Tensor] = field(default_factory=list)  # prompt positions per drop
    block_scores: list[torch.Tensor] = field(default_factory=list)  # per drop, what top-p ran on
    # per layer asked for in `capture`: its prefill's rotated (query, key), [1, H, n, d] each
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class _Runner:
    """The pieces of one HF causal LM that the layer loop needs, found by attribute."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.inner = model.model
        self.config = model.config
        self.kinds = layer_types(self.config)
        rotary_params = inspect.signature(self.inner.rotary_emb.forward).parameters
        self.rotary_per_kind = "layer_type" in rotary_params
        self.window = getattr(self.config, "sliding_window", None)

    def stage_inputs(self, hidden: torch.Tensor, positions: torch.Tensor, prefill: bool):
        """Per layer kind, the RoPE embeddings and attention mask for the current tokens.

        They change only when tokens are dropped, so each stage builds them once. Mask None means
        causal (SDPA), no mask (linear layers), or, in decode, the layer's whole cache (a
        sliding cache holds its window); sliding layers in prefill get their window over the
        current, compacted token order.
        """
        if self.rotary_per_kind:  # Gemma 3: local and global RoPE
            embeddings = {k: self.inner.rotary_emb(hidden, positions, k) for k in set(self.kinds)}
        else:
            shared = self.inner.rotary_emb(hidden, positions)
            embeddings = {k: shared for k in set(self.kinds)}
        masks = dict.fromkeys(self.kinds)
        if prefill and "sliding_attention" in masks:
            i = torch.arange(hidden.shape[1], device=hidden.device)
            visible = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
            masks["sliding_attention"] = visible[None, None]
        return embeddings, masks

    def run_layers(self, hidden, positions, cache, prefill: bool, on_layer=None):
        embeddings, masks = self.stage_inputs(hidden, positions, prefill)
        for i, layer in enumerate(self.inner.layers):
            kind = self.kinds[i]
            hidden = layer(
                hidden,
                attention_mask=masks[kind],
                position_embeddings=embeddings[kind],
                position_ids=positions,
                past_key_values=cache,
            )
            if on_layer is not None:
                hidden, positions, changed = on_layer(i, hidden, positions)
                if changed:
                    embeddings, masks = self.stage_inputs(hidden, positions, prefill)
        return hidden

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.inner.norm(hidden_last)).float()
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    config: UniPrefillConfig | None,
    max_new_tokens: int,
    backend: str = "auto",
    keep_positions: list[torch.Tensor] | None = None,
    capture: frozenset[int] = frozenset(),
    breaks: ParagraphBreaks | None = None,
) -> ReferenceResult:
    """Greedy generation with a UniPrefill prefill; `config=None` runs the unmodified model.

    input_ids: [n] int64 prompt. `config` must be resolved (explicit drop_layers).
    keep_positions: per drop layer, the prompt positions to keep instead of selecting. An
    earlier prefill's `kept_positions` plus every position after its prompt is what reusing
    that prefill's compacted KV as this prompt's prefix would compute.
    capture: layers whose prefill queries and keys the result returns (what a study scores
    policies on without rerunning the model).
    breaks: paragraph-break token ids for `queries: "question"` (default: from the tokenizer
    saved with the model).
    """
    if config is not None and config.queries == "question" and breaks is None:
        breaks = paragraph_breaks(model.config._name_or_path, None, False)
    runner = _Runner(model)
    previous_attention = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    try:
        return _generate(
            runner, input_ids, config, max_new_tokens, backend, keep_positions, capture, breaks
        )
    finally:
        model.set_attn_implementation(previous_attention)


def _generate(
    runner: _Runner, input_ids, config, max_new_tokens, backend, keep_positions, capture, breaks
) -> ReferenceResult:
    if config is not None and isinstance(config.drop_layers, str):
        raise ValueError("resolve the config first: config.resolve(layer_types(model.config))")
    drop_layers = frozenset(config.drop_layers) if config and config.enabled else frozenset()
    device = runner.model.device
    ids = input_ids.to(device)
    cache = DynamicCache(config=runner.config)
    kept, layer_tokens, kept_positions, block_scores = [ids.numel()], [], [], []
    if config is not None:
        queries = torch.tensor([scoring_queries(config, input_ids.tolist(), breaks)])

    def prune(i, hidden, positions):
        layer_tokens.append(hidden.shape[1])
        if i not in drop_layers:
            return hidden, positions, False
        query, key = captured[i] if i in capture else captured.pop(i)
        if keep_positions is not None:
            wanted = keep_positions[len(kept) - 1].to(device)
            kept_indices = torch.isin(positions[0], wanted).nonzero()[:, 0]
        else:
            selection = select_tokens(
                query[0].transpose(0, 1),
                key[0].transpose(0, 1),
                torch.tensor([0, hidden.shape[1]], dtype=torch.int32, device=device),
                p=config.p,
                rule=config.rule,
                backend=backend,
                queries=queries,
            )
            kept_indices = selection.kept_indices
            block_scores.append(selection.block_scores[0].cpu())
        kept.append(kept_indices.numel())
        positions = positions[:, kept_indices]
        kept_positions.append(positions[0].cpu())
        return hidden[:, kept_indices], positions, True

    start = time.perf_counter()
    with _capturing(drop_layers | capture) as captured:
        hidden = runner.inner.embed_tokens(ids[None])
        positions = torch.arange(ids.numel(), device=device)[None]
        hidden = runner.run_layers(hidden, positions, cache, prefill=True, on_layer=prune)
        kept_captures = {i: captured[i] for i in capture}
    logits = runner.logits(hidden[0, -1])
    prefill_seconds = time.perf_counter() - start

    first_logits, tokens = logits, [int(logits.argmax())]
    for step in range(max_new_tokens - 1):
        hidden = runner.inner.embed_tokens(torch.tensor([[tokens[-1]]], device=device))
        positions = torch.tensor([[ids.numel() + step]], device=device)
        hidden = runner.run_layers(hidden, positions, cache, prefill=False)
        tokens.append(int(runner.logits(hidden[0, -1]).argmax()))
    return ReferenceResult(
        tokens,
        kept,
        first_logits,
        prefill_seconds,
        layer_tokens,
        kept_positions,
        block_scores,
        kept_captures,
    )
