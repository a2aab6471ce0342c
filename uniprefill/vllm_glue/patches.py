"""Registry of every vLLM symbol UniPrefill rebinds, as data, plus apply/revert.

Each entry names its target, the vLLM version it was written against, why it exists, when it
can go, and its scope: which processes rebind it.
- "plugin": every vLLM process, when the plugin loads (inert unless UniPrefill is enabled);
- "frontend": the process that builds the engine config, once it has enabled UniPrefill;
- "worker": worker processes of an engine with UniPrefill enabled (applied when vLLM imports the
  worker extension there).
So an installed but disabled plugin changes nothing beyond the `--plugin` option. The logic lives
in ordinary modules; this file only rebinds names. `apply_patches(scope)` is explicit, idempotent,
and refuses to run when a target is missing from the installed vLLM.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uniprefill.vllm_glue.version import SUPPORTED_VLLM

SCOPES = ("plugin", "frontend", "worker")


@dataclass(frozen=True)
class Patch:
    target: str  # "module:Class.attribute"
    wrap: str  # "module:function" taking the original and returning its replacement
    why: str
    scope: str = "plugin"
    upstream: str = "none"
    remove_when: str = "never: no upstream hook exists"
    written_for: str = SUPPORTED_VLLM


PATCHES: tuple[Patch, ...] = (
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.add_cli_args",
        wrap="uniprefill.vllm_glue.engine_args:wrap_add_cli_args",
        why="adds `--plugin NAME` so `vllm serve MODEL --plugin uniprefill` enables UniPrefill",
        remove_when="vLLM grows a way for general plugins to add CLI options",
    ),
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.from_cli_args",
        wrap="uniprefill.vllm_glue.engine_args:wrap_from_cli_args",
        why="turns `--plugin uniprefill` into additional_config['uniprefill'] (not a dataclass "
        "field, so vLLM drops it)",
        remove_when="vLLM grows a way for general plugins to add CLI options",
    ),
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.create_engine_config",
        wrap="uniprefill.vllm_glue.engine_args:wrap_create_engine_config",
        why="validates UniPrefill settings against the model before any engine starts, resolves "
        "drop layers, and selects the UniPrefill scheduler and worker extension",
    ),
    Patch(
        target="vllm.v1.engine.input_processor:InputProcessor._validate_params",
        wrap="uniprefill.vllm_glue.request_checks:wrap_validate_params",
        why="rejects bad per-request UniPrefill fields (vllm_xargs / extra_args) with a 400 "
        "naming the field, before the request reaches the engine",
        scope="frontend",
        remove_when="vLLM lets general plugins validate extra_args",
    ),
    Patch(
        target="vllm.v1.worker.gpu_model_runner:GPUModelRunner._model_forward",
        wrap="uniprefill.vllm_glue.pruning:wrap_model_forward",
        why="runs each step's forward with pruning (documented override point for runners)",
        scope="worker",
    ),
    Patch(
        target="vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states",
        wrap="uniprefill.vllm_glue.pruning:wrap_update_states",
        why="drops a request's per-stage KV offsets when it finishes, is aborted or preempted",
        scope="worker",
    ),
)

_originals: dict[str, Any] = {}  # target -> the raw class attribute (descriptor) we replaced


def _resolve(target: str) -> tuple[type, str]:
    module_name, _, qualname = target.partition(":")
    owner_path, _, attr = qualname.rpartition(".")
    owner: Any = importlib.import_module(module_name)
    for part in owner_path.split("."):
        owner = getattr(owner, part)
    if attr not in vars(owner):
        raise RuntimeError(f"UniPrefill patch target {target} is missing from this vLLM")
    return owner, attr


def _rebind(raw: Any, wrap_path: str) -> Any:
    """Wrap the function inside `raw`, keeping its staticmethod/classmethod kind."""
    module_name, _, name = wrap_path.partition(":")
    wrap: Callable[[Any], Any] = getattr(importlib.import_module(module_name), name)
    for kind in (staticmethod, classmethod):
        if isinstance(raw, kind):
            return kind(wrap(raw.__func__))
    return wrap(raw)


def apply_patches(scope: str = "plugin") -> int:
    """Apply every patch of `scope` once; returns how many patches are in place in all."""
    if scope not in SCOPES:
        raise ValueError(f"unknown patch scope {scope!r}; scopes: {SCOPES}")
    chosen = [patch for patch in PATCHES if patch.scope == scope]
    resolved = [(patch, *_resolve(patch.target)) for patch in chosen]  # all-or-nothing
    for patch, owner, attr in resolved:
        if patch.target in _originals:
            continue
        raw = vars(owner)[attr]
        _originals[patch.target] = raw
        setattr(owner, attr, _rebind(raw, patch.wrap))
    return len(_originals)


def revert_patches() -> None:
    """Restore every original (for tests)."""
    for patch in PATCHES:
        if patch.target in _originals:
            owner, attr = _resolve(patch.target)
            setattr(owner, attr, _originals.pop(patch.target))


def applied_patches() -> list[str]:
    return sorted(_originals)
