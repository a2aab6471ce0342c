"""UniPrefillScheduler: a subclass of vLLM's `Scheduler`, which vLLM's engine core uses in its
place when UniPrefill is enabled (`scheduler_cls`). The vLLM methods it overrides are listed in
`uniprefill/vllm_glue/coupling.py` (OVERRIDES).

It is the one place that decides what is pruned; the workers execute its plan. Whether a
prunable prompt (uniprefill.requests) is pruned is decided at its prefix-cache lookup, each time
it is scheduled from the waiting queue (first, and again after a preemption):
- a prompt whose cached prefix covers at least `cached_share` of it, or leaves an uncached rest
  shorter than `min_prompt_len`, takes the cache and is not pruned;
- a prompt that repeats a recently pruned prompt by that share (a conversation's next turn over
  a pruned document) is not pruned either under `repeated_prefix: "fill"`: it is prefilled in
  full once, fills the cache, and later turns read it; under "prune" it is pruned again;
- a prompt that has produced tokens (recomputed after a preemption) or whose pruned prefill
  failed is not pruned;
- any other prunable prompt ignores its (short) cache hit and is pruned.
Each step then carries a `PromptPlan` (p, scoring queries) for every pruned prompt it schedules
tokens of, in the field STEP_FIELD of vLLM's `SchedulerOutput`: the workers prune exactly those.

Three duties for a prompt that will be pruned:
- it is chunked as vLLM chunks any prompt, except that its last chunk holds at least its scoring
  queries (in a step where that chunk would pass `long_prefill_token_threshold`, the threshold
  rises to it). The workers hold each earlier chunk's rows at the first drop layer until the last
  chunk comes, up to `max_held_tokens` prompt tokens at once: a prompt that would pass that is
  prefilled unpruned;
- its KV blocks never enter or come from the prefix cache: after a drop layer they hold the
  compacted layout, which another request with the same prefix must not reuse. Other requests
  keep prefix caching;
- its sliding-window blocks are never freed while it runs: vLLM frees the blocks before a
  window over the full prompt, but after a drop layer the window is over the compacted KV,
  which sits at the front of those blocks. Such a request holds its sliding-window blocks as a
  full-attention layer would (a KV-memory cost for pruned requests only).

A pruned prefill that fails in a worker (the workers report it with the step's output) is
recomputed unpruned: the token that step sampled for it is dropped, the request is preempted
(vLLM frees its blocks and tells the workers) and, scheduled again, runs as stock vLLM runs it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.request import Request, RequestStatus

from uniprefill.accounting import describe
from uniprefill.config import CONFIG_KEY, UniPrefillConfig
from uniprefill.requests import prompt_plan, question_breaks, request_p, scoring_queries
from uniprefill.step_plan import PromptPlan
from uniprefill.vllm_glue.coupling import (
    SCHEDULER_ATTRIBUTES,
    missing_attributes,
    raise_if_missing,
)
from uniprefill.vllm_glue.log import get_logger
from uniprefill.vllm_glue.metrics import REPORT_ATTRIBUTE, STATS_FIELD, STEP_FIELD, new_report
from uniprefill.vllm_glue.patches import applied_patches

logger = get_logger(__name__)
RECENTLY_PRUNED = 64  # prompts whose block hashes `repeated_prefix: "fill"` compares against


class UniPrefillScheduler(Scheduler):
    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        raise_if_missing(missing_attributes(self, SCHEDULER_ATTRIBUTES), "Scheduler")
        self.uniprefill = UniPrefillConfig.from_dict(vllm_config.additional_config[CONFIG_KEY])
        # Pruned requests, while they run, and how: no prefix cache for them.
        self.pruned: dict[str, PromptPlan] = {}
        self.held_tokens: dict[str, int] = {}  # pruned prompts in chunks -> prompt tokens
        self.failed: set[str] = set()  # pruned prefills that failed: recomputed unpruned
        self.breaks = question_breaks(self.uniprefill, vllm_config.model_config)
        # The workers' reports (pruned prompts, selection times, fallbacks) since the last stats.
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
            if request_id_of(first) not in self.pruned:
                method(first, *args, **kwargs)

        return call

    # ---- the decision, at the prefix-cache lookup ----------------------------------------------

    def _get_local_prefix_cache_hit(self, request: Request) -> tuple[Any, int, int, bool]:
        hit = super()._get_local_prefix_cache_hit(request)
        req_id = request.request_id
        self.pruned.pop(req_id, None)
        try:
            plan = self._decide(request, hit[1])
        except Exception:  # a request the rule cannot read is served unpruned, never fatal
            logger.warning("UniPrefill: deciding request %s failed; it runs unpruned", req_id,
                           exc_info=True)  # fmt: skip
            if self.log_stats:
                self.unreported["fallbacks"].append(req_id)
            plan = None
        if plan is None:
            return hit
        self.pruned[req_id] = plan
        self._remember_pruned(request)
        return self.kv_cache_manager.empty_kv_cache_blocks, 0, 0, False

    def _decide(self, request: Request, cached: int) -> PromptPlan | None:
        """The plan of a prompt looked up with `cached` tokens in the prefix cache, or None."""
        if request.num_output_tokens > 0 or request.request_id in self.failed:
            return None  # recomputed after output or after a failure: as stock vLLM would
        p = request_p(self.uniprefill, request.sampling_params)
        if p >= 1.0:
            return None
        return prompt_plan(
            self.uniprefill,
            p=p,
            prompt_len=request.num_prompt_tokens,
            queries=scoring_queries(self.uniprefill, request.prompt_token_ids, self.breaks),
            cached=max(cached, self._repeated_tokens(request)),
        )

    def _repeated_tokens(self, request: Request) -> int:
        """Prompt tokens (whole blocks) `request` repeats from a recently pruned prompt, under
        `repeated_prefix: "fill"` with prefix caching on (else 0): counted as cached."""
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

    # ---- chunks ----------------------------------------------------------------------------------

    def _reserve_prefill_lookahead(
        self, request: Request, num_computed_tokens: int, num_new_tokens: int
    ) -> int:
        num_new_tokens = super()._reserve_prefill_lookahead(
            request, num_computed_tokens, num_new_tokens
        )
        req_id = request.request_id
        plan = self.pruned.get(req_id)
        if plan is None or request.num_output_tokens > 0:
            return num_new_tokens
        rest = request.num_tokens - num_computed_tokens
        if num_new_tokens >= rest:  # the last chunk (or the whole prompt): nothing held after
            self.held_tokens.pop(req_id, None)
            return num_new_tokens
        if num_computed_tokens == 0 and not self._may_hold(request):
            return num_new_tokens
        self.held_tokens[req_id] = request.num_tokens
        # Leave the last chunk the queries that score the prompt (0: wait for more room).
        return max(0, min(num_new_tokens, rest - plan.queries))

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
        self.pruned.pop(request.request_id)
        self.recently_pruned.pop(request.request_id, None)
        return False

    def _waiting_last_chunk(self) -> int:
        """The longest last chunk a pruned prompt in chunks waits to run: its earlier chunks
        are done and what is left is its scoring queries, which must come in one step."""
        waiting = 0
        for req_id in self.held_tokens:
            request, plan = self.requests.get(req_id), self.pruned.get(req_id)
            if request is not None and plan is not None and request.num_computed_tokens > 0:
                rest = request.num_tokens - request.num_computed_tokens
                if rest <= plan.queries:
                    waiting = max(waiting, rest)
        return waiting

    # ---- each step -----------------------------------------------------------------------------

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        """vLLM's step, with the plan for the pruned prompts it schedules (STEP_FIELD).

        A pruned prompt's last chunk holds its scoring queries; where that is more than
        `long_prefill_token_threshold`, the threshold rises to it for the step, or the prompt
        would never finish while other requests run (vLLM caps every chunk at the threshold)."""
        config = self.scheduler_config
        threshold = config.long_prefill_token_threshold
        waiting = self._waiting_last_chunk() if threshold > 0 else 0
        if waiting > threshold:
            config.long_prefill_token_threshold = waiting
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            config.long_prefill_token_threshold = threshold
        step = {
            req_id: plan
            for req_id in output.num_scheduled_tokens
            if (plan := self.pruned.get(req_id)) is not None
            and self.requests[req_id].num_output_tokens == 0
        }
        setattr(output, STEP_FIELD, step or None)
        return output

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        """Logs each pruned prompt the workers report (one line per request) and keeps the
        report for the next stats (with stats on); recomputes unpruned the requests whose pruned
        prefill failed (the step's token for them is dropped)."""
        report = getattr(model_runner_output, REPORT_ATTRIBUTE, None)
        fallbacks = report["fallbacks"] if report is not None else []
        if fallbacks:
            model_runner_output = _without_tokens(model_runner_output, fallbacks)
        if report is not None:
            for record in report["prompts"]:
                logger.info("UniPrefill pruned %s", describe(record, self.uniprefill.drop_layers))
            if self.log_stats:  # before vLLM's update, which makes this step's stats
                for key, values in report.items():
                    self.unreported[key].extend(values)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id in fallbacks:
            self._recompute_unpruned(req_id)
        return outputs

    def _recompute_unpruned(self, req_id: str) -> None:
        """A request whose pruned prefill failed: back to the waiting queue, to be computed
        from scratch, unpruned (its compacted KV is not valid for an unpruned request)."""
        self.failed.add(req_id)
        self.held_tokens.pop(req_id, None)
        request = self.requests.get(req_id)
        if request is None or request.status != RequestStatus.RUNNING:
            return  # finished or aborted in the meantime
        self.running.remove(request)
        self._preempt_request(request, time.monotonic())

    def make_stats(self, *args: Any, **kwargs: Any) -> Any:
        """vLLM's stats, with what pruning did since the last ones in their UniPrefill field."""
        stats = super().make_stats(*args, **kwargs)
        if stats is not None and any(self.unreported.values()):
            setattr(stats, STATS_FIELD, self.unreported)
            self.unreported = new_report()
        return stats

    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        self.pruned.pop(request.request_id, None)
        self.held_tokens.pop(request.request_id, None)
        self.failed.discard(request.request_id)
        return super()._free_request(request, *args, **kwargs)


def _without_tokens(output: Any, req_ids: list[str]) -> Any:
    """A copy of a step's ModelRunnerOutput in which `req_ids` sampled nothing."""
    sampled = list(output.sampled_token_ids)
    for req_id in req_ids:
        index = output.req_id_to_index.get(req_id)
        if index is not None and index < len(sampled):
            sampled[index] = sampled[index][:0]
    return dataclasses.replace(output, sampled_token_ids=sampled)
