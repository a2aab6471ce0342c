"""The scheduler vLLM's engine core uses when UniPrefill is enabled (via `scheduler_cls`)."""

from __future__ import annotations

import os
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from uniprefill.config import CONFIG_KEY, UniPrefillConfig
from uniprefill.vllm_glue.log import get_logger

logger = get_logger(__name__)


class UniPrefillScheduler(Scheduler):
    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        from uniprefill import plugin

        self.uniprefill = UniPrefillConfig.from_dict(vllm_config.additional_config[CONFIG_KEY])
        logger.info(
            "UniPrefill scheduler active (pid %d, plugin registered here: %s): %s",
            os.getpid(),
            plugin.is_registered(),
            self.uniprefill.to_dict(),
        )
