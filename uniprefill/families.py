"""Which model families UniPrefill supports, and how to read each layer's attention kind.

Works on a Hugging Face text config (duck-typed); imports neither vLLM nor transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from uniprefill.config import FULL_ATTENTION

# Hugging Face architecture name -> family.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
    "Qwen3NextForCausalLM": "qwen3_next",
}


def family_of(architectures: Sequence[str]) -> str:
    """The family of a model from its `architectures` list; ValueError if unsupported."""
    for arch in architectures:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    raise ValueError(
        f"UniPrefill does not support the model architecture {list(architectures)}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}. "
        "Serve this model without --plugin uniprefill, or set "
        '--additional-config \'{"uniprefill": {"enabled": false}}\'.'
    )


def layer_types(text_config: Any) -> list[str]:
    """Per-layer attention kind ("full_attention", "sliding_attention", "linear_attention").

    Configs without `layer_types` (Llama) are all full attention.
    """
    depth = text_config.num_hidden_layers
    kinds = getattr(text_config, "layer_types", None)
    if kinds is None:
        return [FULL_ATTENTION] * depth
    if len(kinds) != depth:
        raise ValueError(f"config has {len(kinds)} layer_types for {depth} layers")
    return list(kinds)
