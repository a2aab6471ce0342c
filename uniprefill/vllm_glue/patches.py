"""Registry of every vLLM symbol UniPrefill rebinds, as data, plus apply/revert.

Each entry names its target, the vLLM version it was written against, why it exists, and when
it can go. The replacement logic lives in ordinary modules (engine_args.py); this file only
rebinds names. `apply_patches()` is explicit (called by the plugin), idempotent, and refuses to
run when a target is missing from the installed vLLM.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uniprefill.vllm_glue import engine_args
from uniprefill.vllm_glue.version import SUPPORTED_VLLM


@dataclass(frozen=True)
class Patch:
    target: str  # "module:Class.attribute"
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]]  # original -> replacement
    why: str
    upstream: str = "none"
    remove_when: str = "never: no upstream hook exists"
    written_for: str = SUPPORTED_VLLM


PATCHES: tuple[Patch, ...] = (
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.add_cli_args",
        wrap=engine_args.wrap_add_cli_args,
        why="adds `--plugin NAME` so `vllm serve MODEL --plugin uniprefill` enables UniPrefill",
        remove_when="vLLM grows a way for general plugins to add CLI options",
    ),
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.from_cli_args",
        wrap=engine_args.wrap_from_cli_args,
        why="turns `--plugin uniprefill` into additional_config['uniprefill'] (not a dataclass "
        "field, so vLLM drops it)",
        remove_when="vLLM grows a way for general plugins to add CLI options",
    ),
    Patch(
        target="vllm.engine.arg_utils:EngineArgs.create_engine_config",
        wrap=engine_args.wrap_create_engine_config,
        why="validates UniPrefill settings against the model before any engine starts, resolves "
        "drop layers, and selects the UniPrefill scheduler and worker extension",
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


def _rebind(raw: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
    """Wrap the function inside `raw`, keeping its staticmethod/classmethod kind."""
    for kind in (staticmethod, classmethod):
        if isinstance(raw, kind):
            return kind(wrap(raw.__func__))
    return wrap(raw)


def apply_patches() -> int:
    """Apply every patch once; returns how many are in place."""
    resolved = [(patch, *_resolve(patch.target)) for patch in PATCHES]  # all-or-nothing
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
