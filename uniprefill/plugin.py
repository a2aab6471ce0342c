"""vLLM general-plugin entry point (`vllm.general_plugins` group).

vLLM calls `register()` in every process it starts (front end, engine core, workers), possibly
more than once. It checks the vLLM version and applies the patch registry; the patched code does
nothing unless `additional_config["uniprefill"]` enables UniPrefill.
"""

from __future__ import annotations

import os

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    import vllm

    from uniprefill.vllm_glue.log import get_logger
    from uniprefill.vllm_glue.patches import apply_patches
    from uniprefill.vllm_glue.version import check_vllm_version

    check_vllm_version(vllm.__version__)
    count = apply_patches()
    _registered = True
    get_logger(__name__).info(
        "UniPrefill plugin loaded (pid %d): %d vLLM patches applied; inert unless enabled",
        os.getpid(),
        count,
    )
