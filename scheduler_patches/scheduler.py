"""UniPrefillScheduler: a subclass of vLLM's `Scheduler`, which vLLM's engine core uses in its
place when UniPrefill is enabled (`scheduler_cls`). The vLLM methods it overrides are listed in
`uniprefill/vllm_glue/coupling.py` (OVERRIDES).

Whether a prunable prompt (uniprefill.requests) is pruned is decided here, at its prefix-cache
lookup, when it is first scheduled:
- a prompt whose cached prefix covers at least `cached_share` of it, or leaves an uncached rest
  shorter than `min_prompt_len`, takes the cache and is not pruned;
- a prompt that repeats a recently pruned prompt by that share (a conversation's next turn over
  a pruned document) is not pruned either under `repeated_prefix: "fill"`: it is prefilled in
  full once, fills the cache, and later turns read it; under "prune" it is pruned again;
- any other prunable prompt ignores its (short) cache hit and is pruned.
A prompt decided "not pruned" gets `uniprefill_enabled: false` in its own request controls, which
travel with it to the workers: they prune exactly the prompts the scheduler marked.

Three duties for a prompt that will be pruned:
- it is chunked as vLLM chunks any prompt, except that its last chunk holds at least `last_q`
  tokens (the queries that score it). The workers hold each earlier chunk's rows at the first
  drop layer until the last chunk comes, up to `max_held_tokens` prompt tokens at once: a
  prompt that would pass that is prefilled unpruned;
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
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.request import Request

from uniprefill.accounting import describe
from uniprefill.config import CONFIG_KEY, UniPrefillConfig
from uniprefill.requests import (
    keep_unpruned,
    question_breaks,
    request_p,
    scoring_queries,
    will_prune,
)
from uniprefill.vllm_glue.coupling import (
    SCHEDULER_ATTRIBUTES,
    missing_attributes,
    raise_if_missing,
)
from uniprefill.vllm_glue.log import get_logger
from uniprefill.vllm_glue.metrics import REPORT_ATTRIBUTE, STATS_FIELD, new_report
from uniprefill.vllm_glue.patches import applied_patches

logger = get_logger(__name__)
RECENTLY_PRUNED = 64  # prompts whose block hashes `repeated_prefix: "fill"` compares against


class UniPrefillScheduler(Scheduler):
    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        raise_if_missing(missing_attributes(self, SCHEDULER_ATTRIBUTES), "Scheduler")
        self.uniprefill = UniPrefillConfig.from_dict(vllm_config.additional_config[CONFIG_KEY])
        self.pruned_req_ids: set[str] = set()  # pruned: no prefix cache
        self.held_tokens: dict[str, int] = {}  # pruned prompts in chunks -> prompt tokens
        self.breaks = question_breaks(self.uniprefill, vllm_config.model_config)
        # The workers' reports (pruned prompts, selection times) since the last stats.
        self.unreported = new_report()
        # Block hashes of recently pruned prompts, oldest first (they never enter the cache);
        # kept only where a repeat of one is filled into the cache.
        self.recently_pruned: OrderedDict[str, frozenset[Any]] = OrderedDict()
        self.fills_repeats = (
            self.uniprefill.repeated_prefix == "fill" and self.kv_cache_manager.enable_caching
        )
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
            "stays on: a prompt mostly in the cache is read from it, not pruned; pruned prompts "
            "neither read nor fill it"
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

    def _get_local_prefix_cache_hit(self, request: Request) -> tuple[Any, int, int, bool]:
        hit = super()._get_local_prefix_cache_hit(request)
        self.pruned_req_ids.discard(request.request_id)
        p = request_p(self.uniprefill, request.sampling_params)
        if request.num_output_tokens > 0 or not will_prune(
            self.uniprefill, p, request.num_prompt_tokens, self._queries(request)
        ):
            return hit  # the workers prune only fresh prompts: nothing to decide
        if self._served_from_cache(request, hit[1]):
            keep_unpruned(request.sampling_params)
            return hit
        self.pruned_req_ids.add(request.request_id)
        self._remember_pruned(request)
        return self.kv_cache_manager.empty_kv_cache_blocks, 0, 0, False

    def _served_from_cache(self, request: Request, cached: int) -> bool:
        """Whether a prunable prompt with `cached` tokens in the prefix cache is computed over it
        instead of pruned: the cache covers `cached_share` of it, or the uncached rest is
        shorter than `min_prompt_len` (too short to gain from pruning, as a prompt would be);
        `repeated_prefix: "fill"` counts a recently pruned prompt it repeats as cached."""
        prompt_len, config = request.num_prompt_tokens, self.uniprefill
        cached = max(cached, self._repeated_tokens(request))
        return cached >= config.cached_share * prompt_len or (
            prompt_len - cached < config.min_prompt_len
        )

    def _repeated_tokens(self, request: Request) -> int:
        """Prompt tokens (whole blocks) `request` repeats from a recently pruned prompt, under
        `repeated_prefix: "fill"` with prefix caching on (else 0)."""
        if not self.fills_repeats:
            return 0
        hashes, longest = request.block_hashes, 0
        for req_id, pruned in self.recently_pruned.items():
            if req_id != request.request_id and hashes and hashes[0] in pruned:
                # Chained hashes: a block matches only if every block before it does.
                same = next((i for i, h in enumerate(hashes) if h not in pruned), len(hashes))
                longest = max(longest, same)
        return longest * self.hash_block_size

    def _remember_pruned(self, request: Request) -> None:
        """Once per request: a pruned prompt waiting for room is looked up again every step."""
        if not self.fills_repeats or request.request_id in self.recently_pruned:
            return
        self.recently_pruned[request.request_id] = frozenset(request.block_hashes)
        while len(self.recently_pruned) > RECENTLY_PRUNED:
            self.recently_pruned.popitem(last=False)

    def _reserve_prefill_lookahead(
        self, request: Request, num_computed_tokens: int, num_new_tokens: int
    ) -> int:
        num_new_tokens = super()._reserve_prefill_lookahead(
            request, num_computed_tokens, num_new_tokens
        )
        req_id = request.request_id
        if req_id not in self.pruned_req_ids or request.num_output_tokens > 0:
            return num_new_tokens
        rest = request.num_tokens - num_computed_tokens
        if num_new_tokens >= rest:  # the last chunk (or the whole prompt): nothing held after
            self.held_tokens.pop(req_id, None)
            return num_new_tokens
        if num_computed_tokens == 0 and not self._may_hold(request):
            return num_new_tokens
        self.held_tokens[req_id] = request.num_tokens
        # Leave the last chunk the queries that score the prompt (0: wait for more room).
        return max(0, min(num_new_tokens, rest - self._queries(request)))

    def _queries(self, request: Request) -> int:
        return scoring_queries(self.uniprefill, request.prompt_token_ids, self.breaks)

    def _may_hold(self, request: Request) -> bool:
        """Whether a pruned prompt starting in chunks fits under `max_held_tokens`; if not, it
        is prefilled unpruned from here on (it takes no cache hit: it was looked up as pruned)."""
        held = sum(n for r, n in self.held_tokens.items() if r != request.request_id)
        if held + request.num_tokens <= self.uniprefill.max_held_tokens:
            return True
        logger.info(
            "UniPrefill: request %s (%d prompt tokens) is prefilled unpruned: in chunks it "
            "would hold %d prompt tokens at the first drop layer with the others "
            "(max_held_tokens %d)",
            request.request_id,
            request.num_tokens,
            held + request.num_tokens,
            self.uniprefill.max_held_tokens,
        )
        keep_unpruned(request.sampling_params)
        self.pruned_req_ids.discard(request.request_id)
        self.recently_pruned.pop(request.request_id, None)
        return False

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        """Logs each pruned prompt the workers report (one line per request) and keeps the
        report for the next stats (with stats on)."""
        report = getattr(model_runner_output, REPORT_ATTRIBUTE, None)
        if report is not None:
            for record in report["prompts"]:
                logger.info("UniPrefill pruned %s", describe(record, self.uniprefill.drop_layers))
            if self.log_stats:
                for key, values in report.items():
                    self.unreported[key].extend(values)
        return super().update_from_output(scheduler_output, model_runner_output)

    def make_stats(self, *args: Any, **kwargs: Any) -> Any:
        """vLLM's stats, with what pruning did since the last ones in their UniPrefill field."""
        stats = super().make_stats(*args, **kwargs)
        if stats is not None and any(self.unreported.values()):
            setattr(stats, STATS_FIELD, self.unreported)
            self.unreported = new_report()
        return stats

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        self.pruned_req_ids.discard(request.request_id)
        self.held_tokens.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)
