"""Tiny random-weight models, one per architecture family UniPrefill targets, for tests.

Each model is a few MB, generated locally from a fixed seed (same bytes on every build), and
small enough that vLLM on CPU loads it in seconds and prefills thousands of tokens quickly.
Each family is only a config entry; `_build` does the rest.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from uniprefill.models import tokenizer as tok
from uniprefill.models.spec import ModelSpec

# Bump whenever `_build` (or anything it relies on) would write different files.
GENERATOR_VERSION = 1
SEED = 1234
# Weight init std. At 0.02-0.05 the next-token distribution is nearly flat and greedy decoding of
# Llama/Qwen2 soon repeats one token; 0.2 gives varied tokens and larger top-1 margins, so greedy
# output is less sensitive to small numeric differences between backends.
INIT_STD = 0.2

# Shared by every family: the tokenizer's ids, a long context (tests prune prompts of thousands
# of tokens), a separate lm_head tensor (the general checkpoint layout) and GQA attention.
_COMMON: dict[str, Any] = {
    "vocab_size": tok.VOCAB_SIZE,
    "bos_token_id": tok.SPECIAL_TOKENS.index(tok.BOS),
    "eos_token_id": tok.SPECIAL_TOKENS.index(tok.EOS),
    "pad_token_id": tok.SPECIAL_TOKENS.index(tok.PAD),
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "initializer_range": INIT_STD,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
}


def _build(architecture: str, config: dict[str, Any], out_dir: Path) -> None:
    """Seed, build the config, initialise random weights, save model and tokenizer."""
    import torch
    import transformers

    tok.build_tokenizer(out_dir)
    hf_config = transformers.AutoConfig.for_model(**_COMMON, **config)
    torch.manual_seed(SEED)
    model_cls = getattr(transformers, architecture)
    model = model_cls._from_config(hf_config, dtype=torch.float32)
    model.save_pretrained(str(out_dir))  # model.safetensors + config.json + generation_config


def _spec(name: str, architecture: str, description: str, **config: Any) -> ModelSpec:
    # The recipe hashes the config and the tokenizer's data, so editing either stales caches;
    # code changes are covered by GENERATOR_VERSION.
    tokenizer_data = [tok.SPECIAL_TOKENS, tok.SPLIT_REGEX, tok.CHAT_TEMPLATE, tok.CORPUS]
    fingerprint = json.dumps([architecture, _COMMON, config, tokenizer_data], sort_keys=True)
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return ModelSpec(
        name=name,
        architecture=architecture,
        description=description,
        recipe=f"tiny-random/v{GENERATOR_VERSION}/{digest}",
        build=functools.partial(_build, architecture, config),
    )


_GEMMA3_LAYERS = ["sliding_attention", "sliding_attention", "full_attention"] * 4
# Every 2nd layer full attention (the real model has every 4th): on vLLM CPU a GDN layer costs far
# more than a full-attention one at this size (BF16 conv fallback), so fewer keep prefill fast.
_QWEN3_NEXT_LAYERS = ["linear_attention", "full_attention"] * 4
_QWEN3_NEXT: dict[str, Any] = {
    "model_type": "qwen3_next",
    "num_hidden_layers": len(_QWEN3_NEXT_LAYERS),
    "layer_types": _QWEN3_NEXT_LAYERS,
    # Two value heads share each key head, as in the real model (16 key / 32 value heads);
    # few heads because the GDN kernel dominates prefill time on CPU.
    "linear_num_key_heads": 1,
    "linear_num_value_heads": 2,
    # vLLM's CPU GDN kernel needs key dim == value dim, 64 or 128 (and runs only in bfloat16).
    "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
    "linear_conv_kernel_dim": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
}

TINY: tuple[ModelSpec, ...] = (
    _spec(
        "tiny-llama",
        "LlamaForCausalLM",
        "Random Llama: 8 layers, full attention, GQA 4q/2kv heads",
        model_type="llama",
        num_hidden_layers=8,
    ),
    _spec(
        "tiny-qwen2",
        "Qwen2ForCausalLM",
        "Random Qwen2: 8 layers, full attention with qkv bias, GQA 4q/2kv heads",
        model_type="qwen2",
        num_hidden_layers=8,
    ),
    _spec(
        "tiny-gemma3",
        "Gemma3ForCausalLM",
        "Random Gemma 3 (text): 12 layers, sliding window 128 with every 3rd layer global",
        model_type="gemma3_text",
        num_hidden_layers=len(_GEMMA3_LAYERS),
        layer_types=_GEMMA3_LAYERS,
        sliding_window_pattern=3,  # only a legacy field; keeps config.json self-consistent
        sliding_window=128,  # far below test prompt lengths, so the window really matters
        query_pre_attn_scalar=32,  # = head_dim, as in the real models
    ),
    _spec(
        "tiny-qwen3-next",
        "Qwen3NextForCausalLM",
        "Random Qwen3-Next: 8 layers alternating Gated DeltaNet and full attention, "
        "MoE with 4 experts (top-2) plus a shared expert",
        **_QWEN3_NEXT,
    ),
    _spec(
        "tiny-qwen3-next-2kh",
        "Qwen3NextForCausalLM",
        "tiny-qwen3-next with 2 linear-attention key heads (4 value heads): tensor parallelism "
        "splits them over 2 ranks",
        **{**_QWEN3_NEXT, "linear_num_key_heads": 2, "linear_num_value_heads": 4},
    ),
)
