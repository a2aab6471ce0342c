"""The catalog of models UniPrefill can prepare: real embedded ones and tiny random ones."""

from __future__ import annotations

from pathlib import Path

from uniprefill.models import store
from uniprefill.models.embedded import EMBEDDED
from uniprefill.models.spec import ModelSpec
from uniprefill.models.tiny import TINY


def _all_specs() -> dict[str, ModelSpec]:
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
