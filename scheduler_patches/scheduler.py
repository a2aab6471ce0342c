"""UniPrefillScheduler: a subclass of vLLM's `Scheduler`, which vLLM's engine core uses in its
place when UniPrefill is enabled (`scheduler_cls`). The vLLM methods it overrides are listed in
`uniprefill/vllm_glue/coupling.py` (OVERRIDES).

Three duties for a request that will be pruned (decided from the request alone, as the worker
decides it; see uniprefill.requests):
- its prompt is prefilled in one step, never in chunks: the selection needs the prompt's last
  queries over all of its keys. It waits for a step with room instead;
- its KV blocks never enter or come from the prefix cache: after a drop layer they hold the
  compacted layout, which another request with the same prefix must not reuse. Other requests
  keep prefix caching;
- its sliding-window blocks are never freed while it runs: vLLM frees the blocks before a
  window over the full prompt, but after a drop layer the window is over the compacted KV,
  which sits at the front of those blocks. Such a request holds its sliding-window blocks as a
  full-attention layer would (a KV-memory cost for pruned requests only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.request import Request

from uniprefill.config import CONFIG_KEY, UniPrefillConfig
from uniprefill.requests import request_p, will_prune
from uniprefill.vllm_glue.coupling import (
    SCHEDULER_ATTRIBUTES,
    missing_attributes,
    raise_if_missing,
)
from uniprefill.vllm_glue.log import get_logger
from uniprefill.vllm_glue.patches import applied_patches

logger = get_logger(__name__)


class UniPrefillScheduler(Scheduler):
    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        raise_if_missing(missing_attributes(self, SCHEDULER_ATTRIBUTES), "Scheduler")
        self.uniprefill = UniPrefillConfig.from_dict(vllm_config.additional_config[CONFIG_KEY])
        self.pruned_req_ids: set[str] = set()  # may be pruned: no prefix cache, no chunking
        # Two KV-cache coordinator operations that pruned requests skip: filling the prefix
        # cache, and freeing blocks outside a sliding window.
        coordinator = self.kv_cache_manager.coordinator
        coordinator.cache_blocks = self._unless_pruned(
            coordinator.cache_blocks, lambda request: request.request_id
        )
        coordinator.remove_skipped_blocks = self._unless_pruned(
            coordinator.remove_skipped_blocks, lambda request_id: request_id
        )
        if any(isinstance(m, SlidingWindowManager) for m in coordinator.single_type_managers):
            logger.info(
                "UniPrefill: pruned requests keep their sliding-window KV blocks until they "
                "finish (after a drop layer the window is over the compacted KV at the front of "
                "those blocks); unpruned requests free them as usual"
            )
        logger.info(
            "UniPrefill scheduler active (pid %d, %d vLLM patches applied here): %s; prefix "
            "caching %s",
            os.getpid(),
            len(applied_patches()),
            self.uniprefill.to_dict(),
            "stays on for unpruned requests; pruned requests neither read nor fill it"
            if self.kv_cache_manager.enable_caching
            else "is off",
        )

    def _unless_pruned(
        self, method: Callable[..., None], request_id_of: Callable[[Any], str]
    ) -> Callable[..., None]:
        """`method`, but a no-op for pruned requests (identified from its first argument)."""

        def call(first: Any, *args: Any, **kwargs: Any) -> None:
            if request_id_of(first) not in self.pruned_req_ids:
                method(first, *args, **kwargs)

        return call

    def add_request(self, request: Request) -> None:
        p = request_p(self.uniprefill, request.sampling_params)
        if will_prune(self.uniprefill, p, request.num_prompt_tokens):
            self.pruned_req_ids.add(request.request_id)
            request.skip_reading_prefix_cache = True
        super().add_request(request)

    def _reserve_prefill_lookahead(
        self, request: Request, num_computed_tokens: int, num_new_tokens: int
    ) -> int:
        num_new_tokens = super()._reserve_prefill_lookahead(
            request, num_computed_tokens, num_new_tokens
        )
        fresh_prompt = num_computed_tokens == 0 and request.num_output_tokens == 0
        if (
            fresh_prompt
            and request.request_id in self.pruned_req_ids
            and num_new_tokens < request.num_tokens
        ):
            return 0  # not this step: wait until the whole prompt fits
        return num_new_tokens

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        self.pruned_req_ids.discard(request.request_id)
        return super()._free_request(request, *args, **kwargs)
