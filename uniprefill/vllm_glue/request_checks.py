"""Per-request UniPrefill fields, checked in the API server (or the `LLM(...)` process).

A bad value fails that one request: HTTP 400 naming the field, or a ValueError offline. The
engine and the other requests never see it. A request's preset must match the engine's
settings in all but p (uniprefill/requests.py).
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams

from uniprefill.config import CONFIG_KEY, settings_in
from uniprefill.families import layer_types
from uniprefill.requests import KEYS, PRESET_KEY, RequestFieldError, parse_request_controls


class RequestControlError(VLLMValidationError, ValueError):
    """A bad UniPrefill request field: a 400 through vLLM's API, a ValueError offline."""


def check_request(params: Any, vllm_config: Any) -> None:
    if not isinstance(params, SamplingParams):
        return
    try:
        parse_request_controls(params.extra_args)
    except RequestFieldError as error:
        raise RequestControlError(
            f"{error} (UniPrefill request fields go in vllm_xargs / extra_args: {', '.join(KEYS)})",
            parameter=error.field,
        ) from None
    preset = (params.extra_args or {}).get(PRESET_KEY)
    config = settings_in(vllm_config.additional_config)
    if preset is None or config is None:
        return
    kinds = layer_types(vllm_config.model_config.hf_text_config)
    mismatch = config.preset_mismatch(preset, kinds)
    if mismatch:
        raise RequestControlError(
            f"{PRESET_KEY} {preset!r} needs {'; '.join(mismatch)}: those settings apply to the "
            f"whole engine, a request's preset sets only p. Start the server with "
            f'--additional-config \'{{"{CONFIG_KEY}": {{"preset": "{preset}"}}}}\' to use it, '
            f"or send uniprefill_p",
            parameter=PRESET_KEY,
        )


def wrap_validate_params(original: Any) -> Any:
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        check_request(params, self.vllm_config)
        return result

    return _validate_params
