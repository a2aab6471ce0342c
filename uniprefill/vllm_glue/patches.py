"""Apply and revert the class-attribute rebinds listed in `coupling.PATCHES`.

So an installed but disabled plugin changes nothing beyond the `--plugin` option. The logic lives
in ordinary modules; this file only rebinds names. `apply_patches(scope)` is explicit, idempotent,
and refuses to run when a target is missing from the installed vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uniprefill.vllm_glue.coupling import PATCHES, SCOPES, resolve

_originals: dict[str, Any] = {}  # target -> the raw class attribute (descriptor) we replaced


def _resolve(target: str) -> tuple[type, str]:
    owner_path, _, attr = target.rpartition(".")
    owner = resolve(owner_path)
    if attr not in vars(owner):
        raise RuntimeError(f"UniPrefill patch target {target} is missing from this vLLM")
    return owner, attr


def _rebind(raw: Any, wrap_path: str) -> Any:
    """Wrap the function inside `raw`, keeping its staticmethod/classmethod kind."""
    wrap: Callable[[Any], Any] = resolve(wrap_path)
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
