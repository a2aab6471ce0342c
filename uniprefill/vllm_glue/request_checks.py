"""Per-request UniPrefill fields, checked in the API server (or the `LLM(...)` process).

A bad value fails that one request: HTTP 400 naming the field, or a ValueError offline. The
engine and the other requests never see it.
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams

from uniprefill.requests import KEYS, RequestFieldError, parse_request_controls


class RequestControlError(VLLMValidationError, ValueError):
    """A bad UniPrefill request field: a 400 through vLLM's API, a ValueError offline."""


def check_request(params: Any) -> None:
    if not isinstance(params, SamplingParams):
        return
    try:
        parse_request_controls(params.extra_args)
    except RequestFieldError as error:
        raise RequestControlError(
            f"{error} (UniPrefill request fields go in vllm_xargs / extra_args: {', '.join(KEYS)})",
            parameter=error.field,
        ) from None


def wrap_validate_params(original: Any) -> Any:
    def _validate_params(self, params, *args, **kwargs):
        result = original(self, params, *args, **kwargs)
        check_request(params)
        return result

    return _validate_params
