"""Shared fixtures: prepared models, engine-friendly environment, and no leftover engines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Engines started by tests (in this process or in children) reserve this much KV cache (GiB).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# On vLLM's CUDA build, importing its GPU model runner starts two background JIT builds
# (humming-kernels), which the leftover-process guard below would report.
os.environ.setdefault("HUMMING_DISABLE_PARALLEL_BUILD", "1")

TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-qwen3-next")


@pytest.fixture(scope="session")
def prepared():
    """prepared(name) -> directory of that catalog model, materialised once per cache."""
    from uniprefill import models

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = models.prepare(name)
        return cache[name]

    return get


@pytest.fixture(scope="session", autouse=True)
def no_engine_left_behind():
    """An engine process that outlives its test holds GBs of memory: kill it, and fail loudly."""
    yield
    from tests.e2e.helpers import engine_children

    leftovers = engine_children()
    for child in leftovers:
        child.kill()
    assert not leftovers, f"tests left processes behind: {[c.pid for c in leftovers]}"
