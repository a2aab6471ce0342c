"""The ledger: every vLLM symbol UniPrefill depends on, in one place, as data.

vLLM makes no promise about any of these; they are what ties UniPrefill to one vLLM release.
- PATCHES: class attributes UniPrefill rebinds (applied by `patches.py`);
- EXTENSIONS: dataclass fields UniPrefill declares on vLLM's classes (applied there too);
- OVERRIDES: vLLM methods UniPrefill's scheduler overrides or rebinds on an instance;
- IMPORTS: vLLM internals imported by name (signatures for the callables called);
- FIELDS: dataclass fields read or written;
- ENVIRONMENT: vLLM environment variables UniPrefill sets;
- CONFIG_ATTRIBUTES, RUNNER_ATTRIBUTES, SCHEDULER_ATTRIBUTES, REQUEST_ATTRIBUTES,
  ATTENTION_ATTRIBUTES, ...: attributes read on live objects, some of which exist only once an
  engine is built; the scheduler and the pruner check theirs when they start
  (`raise_if_missing`);
- ATTRIBUTES_SET: attributes UniPrefill sets on instances of vLLM classes without declaring
  them (they travel with the instance's __dict__ in pickle).

Why the workers' reports ride on `ModelRunnerOutput` rather than vLLM's KV-connector route
(`build_connector_worker_meta` to the scheduler, `get_kv_connector_stats` and
`build_prom_metrics` to /metrics): that route exists only for an engine configured with a KV
connector (`kv_transfer_config`), which UniPrefill refuses at start (its compacted KV is not what
a connector may store or send) and which would claim the one connector slot users need for
LMCache or NIXL.

A signature is the parameter names the code was written for. `tests/unit/test_vllm_coupling.py`
checks every entry against the installed vLLM, and that the code uses nothing unlisted, so a
vLLM change fails one named test instead of an engine. Code that couples to more of vLLM adds
its symbols here.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from uniprefill.vllm_glue.version import SUPPORTED_VLLM

SCOPES = ("plugin", "frontend", "worker")


@dataclass(frozen=True)
class Patch:
    """A class attribute rebound to `wrap(original)`.

    scope: which processes rebind it. "plugin": every vLLM process, when the plugin loads (inert
    unless UniPrefill is enabled); "frontend": the process that builds the engine config, once it
    has enabled UniPrefill; "worker": worker processes of an engine with UniPrefill enabled.
    """

    target: str  # "module:Class.attribute"
    wrap: str  # "module:function" taking the original and returning its replacement
    signature: tuple[str, ...]  # the original's parameters
    why: str
    scope: str = "plugin"
    remove_when: str = "never: no upstream hook exists"


@dataclass(frozen=True)
class Extension:
    """A field (default None) declared on a vLLM dataclass, in every process (the plugin's
    scope), so vLLM's msgspec transport carries it: it sends a dataclass's declared fields only.
    """

    target: str  # "module:Class.field"
    why: str


@dataclass(frozen=True)
class Override:
    """A vLLM method UniPrefill replaces in a subclass or on an instance."""

    target: str  # "module:Class.method"
    signature: tuple[str, ...]
    where: str  # the code that overrides it
    why: str


PATCHES: tuple[Patch, ...] = (
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.add_cli_args",
        wrap="uniprefill.vllm_glue.engine_args:wrap_add_cli_args",
        signature=("parser",),
        why="adds `--plugin NAME` so `vllm serve MODEL --plugin uniprefill` enables UniPrefill",
        remove_when="vLLM grows a way for general plugins to add CLI options",
    ),
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.from_cli_args",
        wrap="uniprefill.vllm_glue.engine_args:wrap_from_cli_args",
        signature=("cls", "args"),
        why="turns `--plugin uniprefill` into additional_config['uniprefill'] (not a dataclass "
        "field, so vLLM drops it)",
        remove_when="vLLM grows a way for general plugins to add CLI options",
    ),
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.create_engine_config",
        wrap="uniprefill.vllm_glue.engine_args:wrap_create_engine_config",
        signature=("self", "usage_context", "headless"),
        why="validates UniPrefill settings against the model before any engine starts, resolves "
        "drop layers, and selects the UniPrefill scheduler and worker extension",
    ),
    Patch(
        target="vllm.v1.engine.input_processor:InputProcessor._validate_params",
        wrap="uniprefill.vllm_glue.request_checks:wrap_validate_params",
        signature=("self", "params", "supported_tasks"),
        why="rejects bad per-request UniPrefill fields (vllm_xargs / extra_args) with a 400 "
        "naming the field, before the request reaches the engine; a preset is checked against "
        "the engine's settings, read from the processor's vllm_config",
        scope="frontend",
        remove_when="vLLM lets general plugins validate extra_args",
    ),
    Patch(
        target="vllm.v1.worker.gpu_model_runner:GPUModelRunner._model_forward",
        wrap="uniprefill.vllm_glue.runner_patches:wrap_model_forward",
        signature=(
            "self",
            "input_ids",
            "positions",
            "intermediate_tensors",
            "inputs_embeds",
            "model_kwargs",
        ),
        why="runs each step's forward with pruning (documented override point for runners)",
        scope="worker",
    ),
    Patch(
        target="vllm.v1.worker.gpu_model_runner:GPUModelRunner.profile_run",
        wrap="uniprefill.vllm_glue.runner_patches:wrap_profile_run",
        signature=("self", "randomize_inputs"),
        why="after vLLM's warm-up, one small dummy step through the model's plain forward "
        "compiles the ops vLLM compiles on their own for that path (scoring steps run it), so "
        "the first pruned prompt does not pay for it",
        scope="worker",
    ),
    Patch(
        target="vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens",
        wrap="uniprefill.vllm_glue.runner_patches:wrap_sample_tokens",
        signature=("self", "grammar_output"),
        why="puts what pruning did (keep counts, selection time) on the step's ModelRunnerOutput, "
        "the one object every worker's step sends to the scheduler (metrics.py)",
        scope="worker",
        remove_when="vLLM lets a runner report plugin stats to the scheduler",
    ),
    Patch(
        target="vllm.v1.metrics.loggers:StatLoggerManager.__init__",
        wrap="uniprefill.vllm_glue.metrics:wrap_stat_logger_manager_init",
        signature=(
            "self",
            "vllm_config",
            "engine_idxs",
            "custom_stat_loggers",
            "enable_default_loggers",
            "aggregate_engine_logging",
            "client_count",
        ),
        why="engines with UniPrefill on get vLLM's Prometheus logger with UniPrefill's metrics "
        "added (vllm.stat_logger_plugins would load for every AsyncLLM and never offline)",
        scope="frontend",
    ),
    Patch(
        target="vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states",
        wrap="uniprefill.vllm_glue.runner_patches:wrap_update_states",
        signature=("self", "scheduler_output"),
        why="drops a request's per-stage KV offsets when it finishes, is aborted or preempted",
        scope="worker",
    ),
)

EXTENSIONS: tuple[Extension, ...] = (
    Extension(
        target="vllm.v1.core.sched.output:SchedulerOutput.uniprefill",
        why="carries the scheduler's plan for the step (which prompts are pruned, with which p "
        "and scoring queries) to every worker: the scheduler is the one place that decides",
    ),
    Extension(
        target="vllm.v1.metrics.stats:SchedulerStats.uniprefill",
        why="carries the workers' pruning reports from the engine core to the front end's "
        "metrics (metrics.py)",
    ),
)

_SCHEDULER = "vllm.v1.core.sched.scheduler:Scheduler"
_COORDINATOR = "vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator"
_OURS = "scheduler_patches/scheduler.py"

OVERRIDES: tuple[Override, ...] = (
    Override(
        f"{_SCHEDULER}.__init__",
        (
            "self",
            "vllm_config",
            "kv_cache_config",
            "structured_output_manager",
            "block_size",
            "hash_block_size",
            "mm_registry",
            "include_finished_set",
            "log_stats",
        ),
        _OURS,
        "reads UniPrefill's settings and rebinds two coordinator methods (below)",
    ),
    Override(
        f"{_SCHEDULER}._get_local_prefix_cache_hit",
        ("self", "request"),
        _OURS,
        "decides at the lookup whether a prunable prompt is pruned (then it ignores its hit) or "
        "served from the prefix cache",
    ),
    Override(
        f"{_SCHEDULER}._reserve_prefill_lookahead",
        ("self", "request", "num_computed_tokens", "num_new_tokens"),
        _OURS,
        "a pruned prompt's last chunk keeps its scoring queries; the tokens held between chunks "
        "are counted against max_held_tokens (the one place that sees every chunk's size)",
    ),
    Override(
        f"{_SCHEDULER}.schedule",
        ("self", "throttle_prefills"),
        _OURS,
        "puts the step's plan for pruned prompts on the SchedulerOutput; raises "
        "long_prefill_token_threshold for a step where a pruned prompt's last chunk (its scoring "
        "queries) waits for more than it",
    ),
    Override(
        f"{_SCHEDULER}.update_from_output",
        ("self", "scheduler_output", "model_runner_output"),
        _OURS,
        "logs each pruned prompt the workers report and keeps the report for the next stats; "
        "drops the token of a request whose pruning failed and preempts it (`_preempt_request`, "
        "called) so it is recomputed unpruned",
    ),
    Override(
        f"{_SCHEDULER}.make_stats",
        (
            "self",
            "spec_decoding_stats",
            "kv_connector_stats",
            "cudagraph_stats",
            "perf_stats",
            "ec_connector_stats",
        ),
        _OURS,
        "adds the workers' pruning reports to vLLM's scheduler stats",
    ),
    Override(
        f"{_SCHEDULER}._free_request",
        ("self", "request", "delay_free_blocks"),
        _OURS,
        "forgets a finished pruned request and its held tokens",
    ),
    Override(
        f"{_COORDINATOR}.cache_blocks",
        ("self", "request", "num_computed_tokens"),
        _OURS + " (on the instance)",
        "pruned requests' compacted blocks never enter the prefix cache",
    ),
    Override(
        f"{_COORDINATOR}.remove_skipped_blocks",
        ("self", "request_id", "processed_computed_tokens", "num_prompt_tokens"),
        _OURS + " (on the instance)",
        "pruned requests keep their sliding-window blocks (the window is over compacted KV)",
    ),
)

# Internals imported by name, with the parameters of those the code calls (None: a class or
# enum used for isinstance checks, construction by keyword (FIELDS), or a member).
IMPORTS: dict[str, tuple[str, ...] | None] = {
    "vllm.forward_context:get_forward_context": (),
    "vllm.config:CUDAGraphMode": None,
    "vllm.platforms:current_platform": None,
    "vllm.distributed:get_tp_group": (),
    "vllm.distributed.parallel_state:GroupCoordinator.all_gather": ("self", "input_", "dim"),
    "vllm.model_executor.layers.attention:Attention": None,
    "vllm.model_executor.models.utils:extract_layer_index": ("layer_name", "num_attn_module"),
    "vllm.v1.attention.backend:CommonAttentionMetadata": None,
    "vllm.v1.worker.block_table:SlotMappingMode": None,
    "vllm.v1.core.sched.scheduler:Scheduler": None,
    "vllm.v1.core.single_type_kv_cache_manager:SlidingWindowManager": None,
    "vllm.v1.request:Request": None,
    "vllm.v1.request:RequestStatus": None,
    "vllm.v1.core.sched.scheduler:Scheduler._preempt_request": (
        "self",
        "request",
        "timestamp",
        "drop_stale_output",
    ),
    "vllm.exceptions:VLLMValidationError.__init__": ("self", "message", "parameter", "value"),
    "vllm.sampling_params:SamplingParams": None,
    "vllm.v1.outputs:ModelRunnerOutput": None,
    "vllm.v1.metrics.loggers:PrometheusStatLogger.__init__": (
        "self",
        "vllm_config",
        "engine_indexes",
    ),
    "vllm.v1.metrics.loggers:PrometheusStatLogger.record": (
        "self",
        "scheduler_stats",
        "iteration_stats",
        "mm_cache_stats",
        "engine_idx",
    ),
    "vllm.v1.metrics.utils:create_metric_per_engine": ("metric", "per_engine_labelvalues"),
    # uniprefill.cluster: one public LLM per Ray actor, called as users call it
    "vllm:LLM": None,
}

FIELDS: dict[str, tuple[str, ...]] = {
    # set or read by engine_args.wrap_create_engine_config
    "vllm.engine.arg_utils:EngineArgs": (
        "additional_config",
        "scheduler_cls",
        "worker_extension_cls",
        "enable_prefix_caching",
        "async_scheduling",
        "distributed_executor_backend",
    ),
    # set for one step by pruner.Pruner.run and hooks.StageHooks.run (scoring steps run eager)
    "vllm.forward_context:ForwardContext": (
        "skip_compiled",
        "cudagraph_runtime_mode",
        "attn_metadata",
        "slot_mapping",
    ),
    # built for each stage by stage_metadata.install_stage_metadata
    "vllm.v1.attention.backend:CommonAttentionMetadata": (
        "query_start_loc",
        "query_start_loc_cpu",
        "seq_lens",
        "seq_lens_cpu_upper_bound",
        "num_reqs",
        "num_actual_tokens",
        "max_query_len",
        "max_seq_len",
        "causal",
        "is_prefilling",
        "positions",
        "block_table_tensor",
        "slot_mapping",
    ),
    "vllm.v1.core.sched.output:SchedulerOutput": (
        "finished_req_ids",
        "preempted_req_ids",
        "scheduled_cached_reqs",
        "num_scheduled_tokens",
    ),
    # the scheduler drops the sampled token of a request whose pruning failed
    "vllm.v1.outputs:ModelRunnerOutput": ("req_id_to_index", "sampled_token_ids"),
    # stage_metadata.layers_by_stage: each KV-cache group's layers
    "vllm.v1.kv_cache_interface:KVCacheGroupSpec": ("layer_names",),
    # raised by the scheduler for a step where a pruned prompt's last chunk waits for more
    "vllm.config:SchedulerConfig": ("long_prefill_token_threshold",),
    "vllm.v1.core.sched.output:CachedRequestData": ("resumed_req_ids",),
}

# Dotted paths from a built VllmConfig (read at start-up by engine_args and the scheduler).
CONFIG_ATTRIBUTES: tuple[str, ...] = (
    "additional_config",
    "model_config.model",
    "model_config.architectures",
    "model_config.max_model_len",
    "model_config.hf_text_config",
    "model_config.tokenizer",  # question_breaks (the scheduler's)
    "model_config.tokenizer_revision",
    "model_config.trust_remote_code",
    "cache_config.enable_prefix_caching",
    "scheduler_config.max_num_batched_tokens",
    "parallel_config.tensor_parallel_size",
    "parallel_config.pipeline_parallel_size",
    "speculative_config",
    "use_v2_model_runner",
    "kv_transfer_config",
    "lora_config",
    "model_config.runner_type",
)
# Set by engine_args (_choose_runner_and_scheduling, _allow_long_steps) when the user left them
# unset.
ENVIRONMENT: tuple[str, ...] = ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS")
# Dotted paths from the model runner (`GPUModelRunner`; the CPU runner inherits it).
RUNNER_ATTRIBUTES: tuple[str, ...] = (
    "model",
    "model_config.hf_text_config",
    "kv_cache_config.kv_cache_groups",
    "attn_groups",
    "requests",
    "query_start_loc.cpu",
    "seq_lens",
    "optimistic_seq_lens_cpu",
    "vllm_config.additional_config",
    "vllm_config.parallel_config.tensor_parallel_size",
    "max_num_tokens",
    "_dummy_run",
    "input_batch.num_reqs",
    "input_batch.req_ids",
    "input_batch.num_computed_tokens_cpu",
    "input_batch.num_computed_tokens_cpu_tensor",
    "input_batch.num_prompt_tokens_cpu_tensor",
    "input_batch.block_table",
)
# Set on instances, not declared: the worker's report on the step's output (metrics.py). Not an
# Extension: a declared field would break the `dataclasses.replace` copies made of the output.
ATTRIBUTES_SET: dict[str, tuple[str, ...]] = {
    "vllm.v1.outputs:ModelRunnerOutput": ("uniprefill",),
}
# Set by CachedRequestState.__post_init__ (the runner's `requests` values), read by the pruner.
REQUEST_STATE_ATTRIBUTES: tuple[str, ...] = ("num_prompt_tokens",)
# On the model's modules that vLLM's @support_torch_compile made (False: it runs compiled).
COMPILED_MODULE_ATTRIBUTES: tuple[str, ...] = ("do_not_compile",)
# On the drop layers' `Attention` modules (hooks.StageHooks reads their shapes), set in __init__.
ATTENTION_ATTRIBUTES: tuple[str, ...] = ("num_heads", "num_kv_heads", "head_size")
# Per KV-cache group: runner.input_batch.block_table[gid] and runner.attn_groups[gid][i].
BLOCK_TABLE_ATTRIBUTES: tuple[str, ...] = ("get_device_tensor", "slot_mapping_mode", "block_size")
ATTENTION_GROUP_ATTRIBUTES: tuple[str, ...] = ("build_metadata", "layer_names")
# Read on UniPrefillPrometheusLogger, set by PrometheusStatLogger (metrics.py).
STAT_LOGGER_ATTRIBUTES: tuple[str, ...] = (
    "per_engine_labelvalues",
    "_counter_cls",
    "_histogram_cls",
)
SCHEDULER_ATTRIBUTES: tuple[str, ...] = (
    "log_stats",
    "requests",
    "running",
    "scheduler_config.long_prefill_token_threshold",
    "hash_block_size",
    "kv_cache_manager.empty_kv_cache_blocks",
    "kv_cache_manager.enable_caching",
    "kv_cache_manager.coordinator.single_type_managers",
    "kv_cache_manager.coordinator.cache_blocks",
    "kv_cache_manager.coordinator.remove_skipped_blocks",
)
REQUEST_ATTRIBUTES: tuple[str, ...] = (
    "request_id",
    "sampling_params",
    "num_prompt_tokens",
    "num_output_tokens",
    "num_tokens",
    "num_computed_tokens",
    "status",
    "block_hashes",
    "prompt_token_ids",
)


def resolve(target: str) -> Any:
    """The object named "module:Qualified.name" (AttributeError/ImportError if vLLM lacks it)."""
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def missing_attributes(obj: Any, paths: Iterable[str]) -> list[str]:
    """The dotted attribute paths that `obj` lacks."""
    missing = []
    for path in paths:
        value = obj
        for part in path.split("."):
            if not hasattr(value, part):
                missing.append(path)
                break
            value = getattr(value, part)
    return missing


def raise_if_missing(missing: list[str], what: str) -> None:
    """A RuntimeError naming what vLLM's `what` lacks of the ledger, if anything."""
    if missing:
        raise RuntimeError(
            f"UniPrefill was written for vLLM {SUPPORTED_VLLM}, and this vLLM's {what} lacks "
            f"{', '.join(missing)} (uniprefill/vllm_glue/coupling.py lists what it relies on)"
        )


def runner_missing_attributes(runner: Any) -> list[str]:
    """What a built model runner lacks of the ledger, including per KV-cache group objects."""
    missing = missing_attributes(runner, RUNNER_ATTRIBUTES)
    if missing:
        return missing
    for gid, groups in enumerate(runner.attn_groups):
        table = runner.input_batch.block_table[gid]
        for name in missing_attributes(table, BLOCK_TABLE_ATTRIBUTES):
            missing.append(f"input_batch.block_table[{gid}].{name}")
        for group in groups:
            for name in missing_attributes(group, ATTENTION_GROUP_ATTRIBUTES):
                missing.append(f"attn_groups[{gid}][].{name}")
    return sorted(set(missing))
