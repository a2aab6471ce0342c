"""Apply and revert the class-attribute rebinds listed in `coupling.PATCHES`, and the dataclass
fields listed in `coupling.EXTENSIONS` (with the plugin's scope).

So an installed but disabled plugin changes nothing beyond the `--plugin` option. The logic lives
in ordinary modules; this file only rebinds names. `apply_patches(scope)` is explicit, idempotent,
and refuses to run when a target is missing from the installed vLLM.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from uniprefill.vllm_glue.coupling import EXTENSIONS, PATCHES, SCOPES, resolve

_originals: dict[str, Any] = {}  # target -> the raw class attribute (descriptor) we replaced


@dataclasses.dataclass
class _Declared:  # the Field object every extension declares: `name: dict | None = None`
    name: dict[str, Any] | None = None


def _declare(target: str) -> None:
    """Declare a field (default None) on a vLLM dataclass: its instances keep their __init__
    (the field is set after construction) and msgspec encodes and decodes it."""
    owner_path, _, name = target.rpartition(".")
    owner = resolve(owner_path)
    if not dataclasses.is_dataclass(owner):
        raise RuntimeError(f"UniPrefill extension target {owner_path} is not a dataclass")
    if name in owner.__dataclass_fields__:
        return
    field = copy.copy(dataclasses.fields(_Declared)[0])
    field.name = name
    owner.__dataclass_fields__[name] = field
    owner.__annotations__[name] = field.type
    setattr(owner, name, None)


def _undeclare(target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = resolve(owner_path)
    if owner.__dataclass_fields__.pop(name, None) is not None:
        del owner.__annotations__[name]
        delattr(owner, name)


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
    if scope == "plugin":
        for extension in EXTENSIONS:
            _declare(extension.target)
    for patch, owner, attr in resolved:
        if patch.target in _originals:
            continue
        raw = vars(owner)[attr]
        _originals[patch.target] = raw
        setattr(owner, attr, _rebind(raw, patch.wrap))
    return len(_originals)


def revert_patches() -> None:
    """Restore every original and remove the extensions (for tests)."""
    for extension in EXTENSIONS:
        _undeclare(extension.target)
    for patch in PATCHES:
        if patch.target in _originals:
            owner, attr = _resolve(patch.target)
            setattr(owner, attr, _originals.pop(patch.target))


def applied_patches() -> list[str]:
    return sorted(_originals)
