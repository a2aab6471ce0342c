"""Per-request UniPrefill controls, carried in vLLM's request extra args.

HTTP: `"vllm_xargs": {"uniprefill_p": 0.9}` or `{"uniprefill_enabled": false}`;
offline: `SamplingParams(extra_args={"uniprefill_p": 0.9})`.

`parse_request_controls` is strict (the API server turns its ValueError into HTTP 400);
`request_p` is what the engine core and the workers use: they must agree on every request and
never fail on one, so anything unparseable there means "not pruned". No vLLM import here.
A request's KV layout depends on this decision, so it is made from the request alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from uniprefill.config import UniPrefillConfig
from uniprefill.ops.select.common import prunable_mask

ENABLED_KEY = "uniprefill_enabled"
P_KEY = "uniprefill_p"
KEYS = (ENABLED_KEY, P_KEY)
_TRUE, _FALSE = (True, 1, "true", "1"), (False, 0, "false", "0")


class RequestFieldError(ValueError):
    """A bad UniPrefill request field; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def parse_request_controls(extra_args: Mapping[str, Any] | None) -> float | None:
    """The p a request asks for (1.0 turns pruning off), or None for the server's setting.

    Raises RequestFieldError (a ValueError) naming the offending field.
    """
    args = extra_args or {}
    unknown = sorted(k for k in args if k.startswith("uniprefill") and k not in KEYS)
    if unknown:
        raise RequestFieldError(
            unknown[0], f"unknown UniPrefill request field(s) {unknown}; valid: {', '.join(KEYS)}"
        )
    p = None
    if ENABLED_KEY in args:
        value = args[ENABLED_KEY]
        norm = value.lower() if isinstance(value, str) else value
        if norm not in _TRUE + _FALSE or isinstance(value, float):
            raise RequestFieldError(
                ENABLED_KEY, f"{ENABLED_KEY} must be true or false, got {value!r}"
            )
        if norm in _FALSE:
            p = 1.0
    if P_KEY in args:
        value = args[P_KEY]
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not 0.0 < number <= 1.0:
            raise RequestFieldError(P_KEY, f"{P_KEY} must be a number in (0, 1], got {value!r}")
        if p is None:  # an explicit "off" wins over a p
            p = number
    return p


def keep_unpruned(sampling_params: Any) -> None:
    """Turn pruning off for one request, as `uniprefill_enabled: false` does: the scheduler's
    way of telling the workers it serves this prompt unpruned (from the prefix cache)."""
    sampling_params.extra_args = {**(sampling_params.extra_args or {}), ENABLED_KEY: False}


def request_p(config: UniPrefillConfig, sampling_params: Any) -> float:
    """The top-p mass a request is pruned with; 1.0 means it is not pruned.

    Requests asking for prompt logprobs are never pruned: those need every prompt position.
    """
    if not config.enabled or not config.drop_layers:
        return 1.0
    if sampling_params is None or getattr(sampling_params, "prompt_logprobs", None) is not None:
        return 1.0
    try:
        asked = parse_request_controls(getattr(sampling_params, "extra_args", None))
    except ValueError:  # the API server rejects these; a direct engine caller gets no pruning
        return 1.0
    return config.p if asked is None else asked


def will_prune(config: UniPrefillConfig, p: float, prompt_len: int) -> bool:
    """Whether a fresh prompt of `prompt_len` tokens, asking for `p`, is scored at drop layers."""
    return bool(config.drop_layers) and prunable_mask(prompt_len, p=p, rule=config.rule)
