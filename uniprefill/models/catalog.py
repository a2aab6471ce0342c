"""The catalog of models UniPrefill can prepare: real embedded ones and tiny random ones."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from uniprefill.models import store


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str  # the Hugging Face architecture name vLLM will load
    description: str
    recipe: str  # changes whenever `build` would produce different files
    build: Callable[[Path], None]  # writes a complete HF model directory into an empty dir


def _all_specs() -> dict[str, ModelSpec]:
    from uniprefill.models.embedded import EMBEDDED
    from uniprefill.models.tiny import TINY

    return {spec.name: spec for spec in (*EMBEDDED, *TINY)}


def list_models() -> list[ModelSpec]:
    return list(_all_specs().values())


def get_spec(name: str) -> ModelSpec:
    specs = _all_specs()
    if name not in specs:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(specs))}")
    return specs[name]


def prepare(name: str) -> Path:
    """Materialise model `name` once into the cache and return its directory (idempotent)."""
    spec = get_spec(name)
    return store.materialize(spec.name, spec.recipe, spec.build)


def is_prepared(name: str) -> bool:
    spec = get_spec(name)
    return store.is_complete(store.model_dir(spec.name), spec.recipe)
