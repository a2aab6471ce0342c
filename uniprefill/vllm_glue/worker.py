"""Worker extension (vLLM mixes it into the worker class): UniPrefill's view from a worker.

Selected through `worker_extension_cls` when UniPrefill is enabled; callable from the front end
with `llm.collective_rpc("uniprefill_status")`.
"""

from __future__ import annotations

import os
from typing import Any

from uniprefill.config import CONFIG_KEY
from uniprefill.vllm_glue.patches import applied_patches


class UniPrefillWorkerExtension:
    vllm_config: Any  # provided by the worker class this is mixed into

    def uniprefill_status(self) -> dict[str, Any]:
        """What this worker process sees: its pid, whether the plugin loaded here, settings."""
        from uniprefill import plugin

        return {
            "pid": os.getpid(),
            "plugin_registered": plugin.is_registered(),
            "patches": applied_patches(),
            "config": self.vllm_config.additional_config.get(CONFIG_KEY),
        }
