"""UniPrefill settings: one strict, frozen object built from `additional_config["uniprefill"]`.

This module imports no vLLM; model facts (depth, layer kinds) come in as plain values so
validation is testable without an engine. The selection rule's own settings are checked by the
operator's `SelectionRule` (importing it loads torch).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from uniprefill.ops.select.rule import SelectionRule, check_p

CONFIG_KEY = "uniprefill"  # the key of vLLM's additional_config that carries these settings
FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"
REPEATED_PREFIX = ("fill", "prune")  # UniPrefillConfig.repeated_prefix
QUERIES = ("last_q", "question")  # UniPrefillConfig.queries
# Drop layers chosen from the model's depth: (first drop at depth // a, spacing depth // b).
DROP_LAYER_RULES = {"auto": (4, 6), "early": (8, 8)}
# Named settings; keys given next to a preset override it. "paper": the paper's rule with its
# defaults. "fast": the defaults at p 0.99, a larger token-layer ideal on real text for more lost
# answers (docs/benchmarks.md, "Selection policies on real text"). "default": the built-in
# defaults (a request on a server started with another preset may ask for them).
PRESETS = {
    "default": {},
    "paper": {
        "drop_layers": "auto",
        "queries": "last_q",
        "p": 0.99,
        "block_size": 64,
        "sink": 128,
        "last_q": 128,
        "normalize_over": "all_blocks",
    },
    "fast": {"drop_layers": "early", "queries": "question", "block_size": 16, "p": 0.99},
}
# The settings that shape a prompt's stages for the whole engine: a request may not change them.
ENGINE_WIDE_POLICY = (
    "drop_layers",
    "block_size",
    "sink",
    "last_q",
    "queries",
    "max_queries",
    "normalize_over",
)


@dataclass(frozen=True, slots=True)
class UniPrefillConfig:
    """Settings of the selection rule (docs/design/selection.md) and of where it runs.

    enabled: master switch; `additional_config={"uniprefill": {}}` alone turns UniPrefill on.
    p: top-p mass of block scores to keep, in (0, 1]; 1.0 keeps every token.
    block_size: tokens per scored block (a power of two).
    sink: leading tokens always kept.
    last_q: number of trailing queries that score the prompt; those tokens are always kept.
    queries: which of a prompt's last tokens score it (and are kept): "last_q", its last last_q
        tokens; "question", the tokens after its last paragraph break (a blank line: where a
        chat or document prompt's question starts) within its last max_queries tokens, at least
        last_q; a prompt with no such break is scored by its last last_q (uniprefill.requests).
    max_queries: the most tokens "question" scores with (a longer last paragraph: last_q).
    drop_layers: "early" (chosen from the model's layer kinds: from an eighth of the depth,
        every eighth: auto_drop_layers), "auto" (from a quarter, every sixth) or explicit layer
        indices; each must be a full-attention layer.
    min_prompt_len: prompts shorter than this are never pruned.
    normalize_over: "all_blocks" (the paper) or "unforced_blocks" (see ops/select/rule.py).
    cached_share: a prompt whose prefix-cache hit covers at least this share of it (or leaves
        fewer than min_prompt_len tokens uncached) is served from the cache and not pruned, in
        (0, 1] (docs/benchmarks.md, prefix caching).
    repeated_prefix: a prompt that repeats a recently pruned prompt as much as the cache rule
        above asks of a hit (a conversation's next turn over a pruned document): "fill"
        prefills it unpruned once, so it fills the prefix cache and later turns read it (with
        prefix caching on); "prune" prunes it again.
    max_held_tokens: prompt tokens that pruned prompts prefilled in chunks may have held at the
        first drop layer at once (hidden state, residual and keys per token, until the prompt's
        last chunk); a prompt that would pass it is prefilled unpruned (a positive integer).
    """

    enabled: bool = True
    # Defaults: the policy that lost the fewest answers for its speed on real text
    # (docs/benchmarks.md, "Selection policies on real text"); last_q 16: the RULER study.
    p: float = 0.995
    block_size: int = 16
    sink: int = 128
    last_q: int = 16
    queries: str = "question"
    max_queries: int = 256
    drop_layers: str | tuple[int, ...] = "early"
    min_prompt_len: int = 1024
    normalize_over: str = "all_blocks"
    cached_share: float = 0.5
    repeated_prefix: str = "fill"
    max_held_tokens: int = 65536

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"uniprefill.enabled must be true or false, got {self.enabled!r}")
        try:  # the operator checks its own settings; prefix them as the user wrote them
            check_p(self.p)
            _ = self.rule
        except ValueError as e:
            raise ValueError(f"uniprefill.{e}") from None
        _check_drop_layers(self.drop_layers)
        share = self.cached_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise ValueError(f"uniprefill.cached_share must be a number in (0, 1], got {share!r}")
        held = self.max_held_tokens
        if isinstance(held, bool) or not isinstance(held, int) or held < 1:
            raise ValueError(f"uniprefill.max_held_tokens must be a positive integer, got {held!r}")
        if self.queries not in QUERIES:
            raise ValueError(
                f"uniprefill.queries must be one of {list(QUERIES)}, got {self.queries!r}"
            )
        most = self.max_queries
        if isinstance(most, bool) or not isinstance(most, int) or most < self.last_q:
            raise ValueError(
                f"uniprefill.max_queries must be an integer of at least last_q ({self.last_q}), "
                f"got {most!r}"
            )
        if self.repeated_prefix not in REPEATED_PREFIX:
            raise ValueError(
                f"uniprefill.repeated_prefix must be one of {list(REPEATED_PREFIX)}, "
                f"got {self.repeated_prefix!r}"
            )

    @property
    def most_queries(self) -> int:
        """The most scoring queries a prompt can have: its last chunk must hold them."""
        return self.max_queries if self.queries == "question" else self.last_q

    @property
    def rule(self) -> SelectionRule:
        """These settings as the selection operator takes them (p is passed per call)."""
        return SelectionRule(
            block_size=self.block_size,
            sink=self.sink,
            last_q=self.last_q,
            min_prompt_len=self.min_prompt_len,
            normalize_over=self.normalize_over,
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> UniPrefillConfig:
        """Build from the user's dict; unknown keys are an error that lists the valid ones."""
        if raw is not None and not isinstance(raw, Mapping):
            raise ValueError(
                f'additional_config["{CONFIG_KEY}"] must be a JSON object of settings, e.g. '
                f'{{"{CONFIG_KEY}": {{"p": 0.99}}}}, got {raw!r}'
            )
        raw = dict(raw or {})
        if "preset" in raw:
            preset = raw.pop("preset")
            if preset not in PRESETS:
                raise ValueError(f"unknown uniprefill preset {preset!r}; presets: {list(PRESETS)}")
            raw = {**PRESETS[preset], **raw}
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown uniprefill setting(s) {unknown}; valid settings: preset, "
                f"{', '.join(valid)}"
            )
        if isinstance(raw.get("drop_layers"), list):
            raw["drop_layers"] = tuple(raw["drop_layers"])
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(self.drop_layers, tuple):
            out["drop_layers"] = list(self.drop_layers)
        return out

    def resolve(self, layer_types: Sequence[str]) -> UniPrefillConfig:
        """Fix drop_layers for a model whose layer i has kind `layer_types[i]`.

        Raises ValueError when an explicit layer is out of range or not full attention.
        """
        if isinstance(self.drop_layers, str):
            chosen = auto_drop_layers(layer_types, self.drop_layers)
            return dataclasses.replace(self, drop_layers=chosen)
        depth = len(layer_types)
        for layer in self.drop_layers:
            if layer >= depth:
                raise ValueError(
                    f"uniprefill.drop_layers: layer {layer} is outside the model's "
                    f"{depth} layers (valid: 0..{depth - 1})"
                )
            if layer_types[layer] != FULL_ATTENTION:
                full = [i for i, kind in enumerate(layer_types) if kind == FULL_ATTENTION]
                raise ValueError(
                    f"uniprefill.drop_layers: layer {layer} is a {layer_types[layer]} layer; "
                    f"tokens are scored only at full-attention layers: {full}"
                )
        return self

    def preset_mismatch(self, preset: str, layer_types: Sequence[str]) -> list[str]:
        """How preset `preset` differs from these (resolved) settings in what applies to the
        whole engine (`ENGINE_WIDE_POLICY`); a request may ask for it only when nothing does."""
        wanted = UniPrefillConfig.from_dict({"preset": preset}).resolve(layer_types)
        return [
            f"{name} {_as_json(getattr(wanted, name))} "
            f"(this server: {_as_json(getattr(self, name))})"
            for name in ENGINE_WIDE_POLICY
            if getattr(wanted, name) != getattr(self, name)
        ]


def _as_json(value: object) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _check_drop_layers(drop_layers: object) -> None:
    if drop_layers in DROP_LAYER_RULES:
        return
    if not isinstance(drop_layers, tuple) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in drop_layers
    ):
        raise ValueError(
            f"uniprefill.drop_layers must be one of {list(DROP_LAYER_RULES)} or a list of layer "
            f"indices, got {drop_layers!r}"
        )
    if any(x < 0 for x in drop_layers):
        raise ValueError(f"uniprefill.drop_layers must be non-negative, got {list(drop_layers)}")
    if list(drop_layers) != sorted(set(drop_layers)):
        raise ValueError(
            f"uniprefill.drop_layers must be strictly increasing, got {list(drop_layers)}"
        )


def auto_drop_layers(layer_types: Sequence[str], rule: str = "auto") -> tuple[int, ...]:
    """ "auto": full-attention layers from a quarter of the depth on, spaced about a sixth of it
    apart, leaving the last eighth alone (e.g. 24 layers -> 6, 10, 14, 18; 32 -> 8, 13, 18, 23).
    "early": from an eighth of the depth, an eighth apart (24 -> 3, 6, 9, 12, 15, 18).

    A drop layer also needs a full-attention layer before it: the scoring queries must already
    have seen the whole prompt. Gemma-3-270M's first global layer (5) follows only sliding
    layers; dropping there lost the passkey on every prompt tried (docs/benchmarks.md).
    """
    depth = len(layer_types)
    first_div, spacing_div = DROP_LAYER_RULES[rule]
    first, spacing, end = depth // first_div, max(2, depth // spacing_div), depth - depth // 8
    chosen: list[int] = []
    seen_full = FULL_ATTENTION in layer_types[:first]
    for layer in range(first, end):
        if layer_types[layer] != FULL_ATTENTION:
            continue
        if seen_full and (not chosen or layer - chosen[-1] >= spacing):
            chosen.append(layer)
        seen_full = True
    return tuple(chosen)


def settings_in(additional_config: Mapping[str, Any] | None) -> UniPrefillConfig | None:
    """The UniPrefill settings an engine's `additional_config` carries, or None where UniPrefill
    is off for it (no "uniprefill" key, or `enabled: false`): the one test of "enabled" for every
    process. Bad settings raise ValueError."""
    raw = (additional_config or {}).get(CONFIG_KEY)
    config = UniPrefillConfig.from_dict(raw) if raw is not None else None
    return config if config is not None and config.enabled else None
