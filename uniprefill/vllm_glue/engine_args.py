"""Replacements for three EngineArgs methods (see patches.py): `--plugin`, and start-up checks.

Everything here runs in the process that builds the engine config (the API server, or the
process that calls `LLM(...)`), so a bad setting fails there with a plain ValueError before any
engine process starts.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from uniprefill.config import CONFIG_KEY, LINEAR_ATTENTION, UniPrefillConfig, settings_in
from uniprefill.families import family_of, layer_types
from uniprefill.vllm_glue.log import get_logger
from uniprefill.vllm_glue.patches import apply_patches

logger = get_logger(__name__)

PLUGIN_NAME = "uniprefill"
SCHEDULER_CLS = "uniprefill.scheduler_patches.scheduler.UniPrefillScheduler"
WORKER_EXTENSION_CLS = "uniprefill.vllm_glue.worker.UniPrefillWorkerExtension"


def _plugin_name(value: str) -> str:
    if value != PLUGIN_NAME:
        raise argparse.ArgumentTypeError(
            f"unknown plugin {value!r}; --plugin can enable: {PLUGIN_NAME}"
        )
    return value


JSON_EXAMPLE = """--additional-config '{"uniprefill": {"p": 0.99}}'"""


def _explained(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """vLLM's parser for --additional-config, whose error names the fix (vLLM's says only that
    the value "cannot be converted to <function loads>")."""

    def parse_additional_config(value: str) -> Any:
        try:
            return parse(value)
        except (ValueError, argparse.ArgumentTypeError) as error:
            cause = error.__cause__ or error
            raise argparse.ArgumentTypeError(
                f"not valid JSON ({cause}); it takes a JSON object with keys and strings in "
                f"double quotes, e.g. {JSON_EXAMPLE}"
            ) from None

    return parse_additional_config


def wrap_add_cli_args(original: Callable[..., Any]) -> Callable[..., Any]:
    def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
        parser = original(parser, *args, **kwargs)
        options = parser._option_string_actions
        if "--plugin" not in options:  # once per parser
            additional = options.get("--additional-config")
            if additional is not None and additional.type is not None:
                additional.type = _explained(additional.type)
            parser.add_argument(
                "--plugin",
                action="append",
                type=_plugin_name,
                metavar="NAME",
                help="Enable a plugin by name: `--plugin uniprefill` turns on UniPrefill prompt "
                "pruning; its settings go in --additional-config '{\"uniprefill\": {...}}'.",
            )
        return parser

    return add_cli_args


def enable_in(additional_config: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of `additional_config` that turns UniPrefill on (an explicit `enabled` wins)."""
    if additional_config is not None and not isinstance(additional_config, dict):
        raise ValueError(
            f"--additional-config must be a JSON object, got {additional_config!r}; "
            f"e.g. {JSON_EXAMPLE}"
        )
    merged = dict(additional_config or {})
    settings = merged.get(CONFIG_KEY) or {}
    if isinstance(settings, dict):  # anything else: UniPrefillConfig.from_dict says what is wrong
        merged[CONFIG_KEY] = {"enabled": True, **settings}
    return merged


def wrap_from_cli_args(original: Callable[..., Any]) -> Callable[..., Any]:
    def from_cli_args(cls: type, args: argparse.Namespace) -> Any:
        engine_args = original(cls, args)
        if PLUGIN_NAME in (getattr(args, "plugin", None) or []):
            engine_args.additional_config = enable_in(engine_args.additional_config)
        return engine_args

    return from_cli_args


def _claim(engine_args: Any, field: str, ours: str, unset: object) -> None:
    current = getattr(engine_args, field)
    if current not in (unset, ours):
        raise ValueError(
            f"UniPrefill needs {field}={ours}, but {field}={current} was set; "
            f"remove that setting or disable UniPrefill"
        )
    setattr(engine_args, field, ours)


def _check_engine_features(vllm_config: Any) -> None:
    """Refuse the engine features UniPrefill cannot serve correctly (yet)."""
    parallel = vllm_config.parallel_config
    unsupported = {
        "pipeline_parallel_size > 1": parallel.pipeline_parallel_size > 1,
        "a KV connector (--kv-transfer-config or --kv-offloading-size: LMCache, NIXL, "
        "prefill/decode disaggregation, KV offloading), which would store or ship a pruned "
        "prompt's compacted KV as the whole prompt's": vllm_config.kv_transfer_config is not None,
        "LoRA adapters (--enable-lora)": vllm_config.lora_config is not None,
        f"the {vllm_config.model_config.runner_type} runner (pooling needs every prompt token)": (
            vllm_config.model_config.runner_type != "generate"
        ),
        "speculative decoding": vllm_config.speculative_config is not None,
        "Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1, or a vLLM feature that needs it, such as "
        "HiSparse or watermarking)": vllm_config.use_v2_model_runner,
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(
            f"UniPrefill cannot run with {'; '.join(found)} (not supported yet); run without it "
            '(or disable UniPrefill: --additional-config \'{"uniprefill": {"enabled": false}}\')'
        )


def _check_executor(engine_args: Any) -> None:
    """vLLM's Ray executor does not run on the CPU backend (its platform names no Ray device);
    say so before vLLM fails on it (or on Ray missing) deeper in its config checks."""
    from vllm.platforms import current_platform  # resolving the platform: only once enabled

    if engine_args.distributed_executor_backend == "ray" and current_platform.is_cpu():
        raise ValueError(
            "vLLM's Ray executor (--distributed-executor-backend ray) does not run on the CPU "
            "backend; drop that option: vLLM's default multiprocessing executor runs "
            "--tensor-parallel-size and --data-parallel-size on one machine"
        )


def _choose_runner_and_scheduling(engine_args: Any) -> None:
    """UniPrefill runs in the V1 model runner, with a synchronous scheduler.

    vLLM picks Model Runner V2 wherever Triton has a GPU driver unless VLLM_USE_V2_MODEL_RUNNER
    says otherwise; the pruning hooks live in V1's model forward, so an unset variable becomes 0
    (this process's engine config reads it, and engine processes inherit it). GPU engines
    default to async scheduling, which needs an AsyncScheduler; UniPrefill's scheduler extends
    the synchronous one, so an unset --async-scheduling becomes off.
    """
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("UniPrefill: using vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0); "
                    "pruning runs in its model forward")  # fmt: skip
    if engine_args.async_scheduling:
        raise ValueError(
            "UniPrefill's scheduler is synchronous and cannot run with --async-scheduling; "
            "remove --async-scheduling or disable UniPrefill"
        )
    if engine_args.async_scheduling is None:
        engine_args.async_scheduling = False
        logger.info("UniPrefill: async scheduling off (its scheduler is synchronous)")


# vLLM gives up on a model step after VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (300 s by default) and
# kills the engine. A pruned prompt's last chunk carries the layers after the first drop for all
# its kept tokens: a whole 8K-token prompt step took longer than 300 s on a busy 2-core CPU here.
STEP_TIMEOUT_S = 3600


def _allow_long_steps() -> None:
    """An unset step timeout becomes STEP_TIMEOUT_S (engine processes inherit it)."""
    if os.environ.get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS") is None:
        os.environ["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] = str(STEP_TIMEOUT_S)
        logger.info("UniPrefill: model steps may take up to %d s "
                    "(VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS; a pruned prompt's scoring step runs "
                    "its later layers for every kept token)", STEP_TIMEOUT_S)  # fmt: skip


def _check_step_budget(vllm_config: Any, config: UniPrefillConfig) -> None:
    """A pruned prompt's last chunk holds its scoring queries: a step must fit them."""
    budget = vllm_config.scheduler_config.max_num_batched_tokens
    if config.drop_layers and budget < config.most_queries:
        name = "max_queries" if config.queries == "question" else "last_q"
        raise ValueError(
            f"--max-num-batched-tokens ({budget}) is below uniprefill.{name} "
            f"({config.most_queries}): a pruned prompt's last chunk must hold the queries that "
            f"score it; raise --max-num-batched-tokens or lower {name}"
        )


ADJUSTED = ("enable_prefix_caching",)  # EngineArgs fields: None = unset


def _adjust(engine_args: Any, vllm_config: Any, user_set: dict[str, Any]) -> bool:
    """Change what UniPrefill needs and the user left unset; True if anything changed."""
    changed = False
    kinds = layer_types(vllm_config.model_config.hf_text_config)
    if LINEAR_ATTENTION in kinds and vllm_config.cache_config.enable_prefix_caching:
        # With prefix caching, vLLM keeps recurrent states per block of tokens and splits
        # prefills at block boundaries; a pruned layer's state covers fewer tokens than its block.
        if user_set["enable_prefix_caching"]:
            raise ValueError(
                "UniPrefill cannot prune a model with linear-attention layers while prefix "
                "caching is on (its recurrent states are stored per block of prompt tokens); "
                "remove --enable-prefix-caching or disable UniPrefill"
            )
        logger.info(
            "UniPrefill: prefix caching off for this model: its linear-attention states are "
            "cached per block of prompt tokens, which pruning does not keep"
        )
        engine_args.enable_prefix_caching = False
        changed = True
    return changed


def wrap_create_engine_config(original: Callable[..., Any]) -> Callable[..., Any]:
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = settings_in(self.additional_config)  # fails before the model is looked at
        if config is None:
            return original(self, *args, **kwargs)
        _claim(self, "scheduler_cls", SCHEDULER_CLS, unset=None)
        _claim(self, "worker_extension_cls", WORKER_EXTENSION_CLS, unset="")
        _check_executor(self)
        _choose_runner_and_scheduling(self)
        _allow_long_steps()
        # vLLM fills its defaults into these fields: note what the user set first.
        user_set = {name: getattr(self, name) for name in ADJUSTED}
        vllm_config = original(self, *args, **kwargs)
        if _adjust(self, vllm_config, user_set):
            vllm_config = original(self, *args, **kwargs)
        _check_engine_features(vllm_config)

        model_config = vllm_config.model_config
        family = family_of(model_config.architectures)
        resolved = config.resolve(layer_types(model_config.hf_text_config))
        _check_step_budget(vllm_config, resolved)
        # Every process reads the resolved settings from here (it travels inside VllmConfig).
        vllm_config.additional_config = {
            **vllm_config.additional_config,
            CONFIG_KEY: resolved.to_dict(),
        }
        apply_patches("frontend")
        logger.info(
            "UniPrefill active (pid %d) for %s [%s], settings: %s",
            os.getpid(),
            model_config.model,
            family,
            resolved.to_dict(),
        )
        if not resolved.drop_layers:
            logger.warning("UniPrefill: the model has no eligible drop layer; nothing is pruned")
        return vllm_config

    return create_engine_config
