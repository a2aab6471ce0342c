"""What the catalog knows of a model: its name, architecture and how to build its files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str  # the Hugging Face architecture name vLLM will load
    description: str
    recipe: str  # changes whenever `build` would produce different files
    build: Callable[[Path], None]  # writes a complete HF model directory into an empty dir
