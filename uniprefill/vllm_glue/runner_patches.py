"""The model runner's patched methods (coupling.PATCHES, scope "worker"): each finds the
runner's `Pruner` (made on first use; none when UniPrefill is off for the engine) and hands it
its part of the step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm.v1.outputs import ModelRunnerOutput

from uniprefill.config import UniPrefillConfig, settings_in
from uniprefill.vllm_glue.coupling import COMPILED_MODULE_ATTRIBUTES
from uniprefill.vllm_glue.metrics import REPORT_ATTRIBUTE, STEP_FIELD
from uniprefill.vllm_glue.pruner import Pruner

EAGER_WARM_UP_TOKENS = 256  # rows of the start-up step that warms the eager path up


def _config_of(runner: Any) -> UniPrefillConfig | None:
    """The engine's UniPrefill settings; None when it prunes nothing."""
    config = settings_in(runner.vllm_config.additional_config)
    return config if config is not None and config.drop_layers else None


def pruner_of(runner: Any) -> Pruner | None:
    """The runner's Pruner, made on first use; None when UniPrefill is off for this engine."""
    if "_uniprefill" not in runner.__dict__:
        config = _config_of(runner)
        runner._uniprefill = Pruner(runner, config) if config is not None else None
    return runner._uniprefill


def wrap_profile_run(original: Any) -> Any:
    def profile_run(self, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if _config_of(self) is not None:
            _warm_up_eager_forward(self)
        return result

    return profile_run


def _warm_up_eager_forward(runner: Any) -> None:
    """One small dummy step through the model's plain forward, as scoring steps run it.

    In a compiled engine vLLM compiles some ops on their own for that path (activation-and-mul
    ops wrap `forward_native` in torch.compile); this compiles them at start-up instead of in
    the first pruned prompt's step.
    """
    (flag,) = COMPILED_MODULE_ATTRIBUTES
    graphs = [m for m in runner.model.modules() if getattr(m, flag, True) is False]
    if not graphs:  # eager engine
        return
    for module in graphs:
        setattr(module, flag, True)
    try:
        runner._dummy_run(min(EAGER_WARM_UP_TOKENS, runner.max_num_tokens))
    finally:
        for module in graphs:
            setattr(module, flag, False)


def wrap_model_forward(original: Any) -> Any:
    def _model_forward(self, input_ids=None, positions=None, **kwargs):
        pruner = pruner_of(self)
        if pruner is None or positions is None:
            return original(self, input_ids=input_ids, positions=positions, **kwargs)
        return pruner.run(
            lambda **kw: original(self, **kw), input_ids=input_ids, positions=positions, **kwargs
        )

    return _model_forward


def wrap_sample_tokens(original: Any) -> Any:
    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        pruner = pruner_of(self)
        if pruner is None or not isinstance(output, ModelRunnerOutput):
            return output
        report = pruner.state.take_report()
        if report is not None:
            output = dataclasses.replace(output)  # never annotate an object vLLM shares
            setattr(output, REPORT_ATTRIBUTE, report)
        return output

    return sample_tokens


def wrap_update_states(original: Any) -> Any:
    def _update_states(self, scheduler_output: Any) -> Any:
        pruner = pruner_of(self)
        if pruner is not None:  # their KV is freed (finished) or recomputed from scratch
            pruner.state.forget(scheduler_output.finished_req_ids)
            pruner.state.forget(scheduler_output.preempted_req_ids or ())
            pruner.state.forget(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
            pruner.step_pruning = getattr(scheduler_output, STEP_FIELD, None) or {}
        return original(self, scheduler_output)

    return _update_states
