"""Pruning metrics on vLLM's own /metrics, counted where pruning happens (the workers).

The route, across processes and TP ranks:
1. each worker's pruner adds what it did since its last report (pruned prompts with their keep
   counts, the selection's time per scoring step, fallbacks) to the step's `ModelRunnerOutput`,
   as the attribute REPORT_ATTRIBUTE (runner_patches.wrap_sample_tokens; coupling.ATTRIBUTES_SET).
   The output reaches the scheduler as an object (one process) or pickled (multiprocess
   executors); with TP it is the output rank's, and every rank keeps the same tokens;
2. the scheduler logs each pruned prompt and, with stats on, puts the reports into its next
   `SchedulerStats`, in the field STATS_FIELD (scheduler_patches.UniPrefillScheduler.make_stats).
   vLLM sends those stats to the front end with msgspec, which carries a dataclass's declared
   fields only: the plugin declares this one on `SchedulerStats` in every process
   (coupling.EXTENSIONS), default None, so stats without it mean nothing happened;
3. in the front end, `UniPrefillPrometheusLogger` (vLLM's Prometheus logger plus these metrics)
   takes the place of vLLM's, for engines with UniPrefill on (wrap_stat_logger_manager_init).

`vllm.stat_logger_plugins` loggers were the other way in: they load for every AsyncLLM once
installed (turning stats on even when UniPrefill is off) and never for `LLM(...)`. With this
one, `LLM(..., disable_log_stats=False).get_metrics()` carries the same numbers offline: their
names start with "vllm:", the prefix `get_metrics()` reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm.v1.metrics.loggers import PrometheusStatLogger
from vllm.v1.metrics.utils import create_metric_per_engine

from uniprefill.config import CONFIG_KEY, settings_in
from uniprefill.vllm_glue.log import get_logger

logger = get_logger(__name__)

REPORT_ATTRIBUTE = "uniprefill"  # on a ModelRunnerOutput: a worker's RequestState.take_report()
STATS_FIELD = "uniprefill"  # on SchedulerStats: the reports since the last stats
STEP_FIELD = "uniprefill"  # on SchedulerOutput: the step's plan (step_plan.StepPruning) or None
KEPT_SHARE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SELECTION_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def new_report() -> dict[str, list]:
    """An empty report: pruned prompts (accounting.pruned_prompt records), the selection's
    seconds per scoring step, and the ids of requests whose pruning failed and fell back to an
    unpruned prefill. Workers fill one per step, the scheduler gathers them for stats."""
    return {"prompts": [], "selection_s": [], "fallbacks": []}


class UniPrefillPrometheusLogger(PrometheusStatLogger):
    """vLLM's Prometheus metrics, and UniPrefill's:

    vllm:uniprefill_pruned_requests_total: prompts pruned (a scored prompt that kept every
        token is not counted);
    vllm:uniprefill_pruned_prompt_tokens_total: their prompt tokens;
    vllm:uniprefill_kept_tokens_total{drop_layer}: tokens they kept after each drop layer;
    vllm:uniprefill_token_layers_total, ..._token_layers_saved_total: token-layers their
        prefills would have run unpruned, and those pruning skipped (ideal speedup:
        total / (total - saved));
    vllm:uniprefill_kept_share: histogram of the share of a prompt kept after the last drop;
    vllm:uniprefill_selection_seconds: histogram of the selection's time per scoring step;
    vllm:uniprefill_fallbacks_total: requests whose pruning failed inside UniPrefill and that
        were computed unpruned instead (logged with their ids as warnings).
    """

    def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None):
        super().__init__(vllm_config, engine_indexes)  # unregisters earlier vllm: metrics
        self.drop_layers = list(vllm_config.additional_config[CONFIG_KEY]["drop_layers"])
        labels = ["model_name", "engine"]
        engines = self.per_engine_labelvalues

        def counter(name: str, doc: str) -> dict[int, Any]:
            metric = self._counter_cls(name=f"vllm:uniprefill_{name}", documentation=doc,
                                       labelnames=labels)  # fmt: skip
            return create_metric_per_engine(metric, engines)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> dict[int, Any]:
            metric = self._histogram_cls(name=f"vllm:uniprefill_{name}", documentation=doc,
                                         labelnames=labels, buckets=list(buckets))  # fmt: skip
            return create_metric_per_engine(metric, engines)

        self.pruned_requests = counter("pruned_requests", "Prompts pruned by UniPrefill.")
        self.pruned_prompt_tokens = counter(
            "pruned_prompt_tokens", "Prompt tokens of the prompts UniPrefill pruned."
        )
        kept = self._counter_cls(
            name="vllm:uniprefill_kept_tokens",
            documentation="Tokens pruned prompts kept after each drop layer.",
            labelnames=[*labels, "drop_layer"],
        )
        self.kept_tokens = {
            idx: [kept.labels(*values, str(layer)) for layer in self.drop_layers]
            for idx, values in engines.items()
        }
        self.token_layers = counter(
            "token_layers", "Token-layers the pruned prompts' prefills would have run unpruned."
        )
        self.token_layers_saved = counter(
            "token_layers_saved", "Token-layers pruning skipped in the pruned prompts' prefills."
        )
        self.kept_share = histogram(
            "kept_share",
            "Share of a pruned prompt's tokens kept after the last drop layer.",
            KEPT_SHARE_BUCKETS,
        )
        self.fallbacks = counter(
            "fallbacks",
            "Requests whose pruning failed inside UniPrefill and that were computed unpruned.",
        )
        self.selection_seconds = histogram(
            "selection_seconds",
            "Time in UniPrefill's token selection per scoring step (all drop layers).",
            SELECTION_SECONDS_BUCKETS,
        )

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        super().record(scheduler_stats, iteration_stats, mm_cache_stats, engine_idx)
        report = getattr(scheduler_stats, STATS_FIELD, None)
        if report is None or engine_idx not in self.pruned_requests:
            return
        for record in report["prompts"]:
            kept = record["kept"]
            self.pruned_requests[engine_idx].inc()
            self.pruned_prompt_tokens[engine_idx].inc(kept[0])
            for child, n in zip(self.kept_tokens[engine_idx], kept[1:], strict=True):
                child.inc(n)
            self.token_layers[engine_idx].inc(record["token_layers"])
            self.token_layers_saved[engine_idx].inc(record["saved"])
            self.kept_share[engine_idx].observe(kept[-1] / kept[0])
        for seconds in report["selection_s"]:
            self.selection_seconds[engine_idx].observe(seconds)
        if report["fallbacks"]:
            self.fallbacks[engine_idx].inc(len(report["fallbacks"]))


def wrap_stat_logger_manager_init(original: Callable[..., Any]) -> Callable[..., Any]:
    def __init__(self, vllm_config: Any, engine_idxs: Any = None,
                 custom_stat_loggers: Any = None, *args: Any, **kwargs: Any) -> None:  # fmt: skip
        loggers = list(custom_stat_loggers or [])
        user_prometheus = any(
            isinstance(f, type) and issubclass(f, PrometheusStatLogger) for f in loggers
        )
        if settings_in(vllm_config.additional_config) is not None:
            if user_prometheus:
                logger.warning("UniPrefill: a custom Prometheus stat logger was given; "
                               "UniPrefill's metrics are left out of /metrics")  # fmt: skip
            else:
                loggers.append(UniPrefillPrometheusLogger)
        original(self, vllm_config, engine_idxs, loggers or custom_stat_loggers, *args, **kwargs)

    return __init__
