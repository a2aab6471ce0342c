"""The models UniPrefill ships: tiny random ones per family, and the embedded Gemma 3."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import TINY_MODELS
from tests.e2e.helpers import VLLM_DTYPE, run_offline, vllm_dtype
from uniprefill import models
from uniprefill.models import store

# What each family must exercise: its HF architecture and the attention kinds of its layers.
EXPECTED = {
    "tiny-llama": ("LlamaForCausalLM", {"full_attention"}),
    "tiny-qwen2": ("Qwen2ForCausalLM", {"full_attention"}),
    "tiny-gemma3": ("Gemma3ForCausalLM", {"sliding_attention", "full_attention"}),
    "tiny-qwen3-next": ("Qwen3NextForCausalLM", {"linear_attention", "full_attention"}),
}
SHORT = "The quick brown fox jumps over the lazy dog"


def _hf_greedy(model_dir, prompt: str, n: int = 8) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_is_deterministic_and_of_its_family(prepared, name, tmp_path, monkeypatch):
    path = prepared(name)
    config = json.loads((path / "config.json").read_text())
    architecture, kinds = EXPECTED[name]
    assert config["architectures"] == [architecture]
    assert set(config.get("layer_types", ["full_attention"])) == kinds
    assert config["max_position_embeddings"] >= 8192
    monkeypatch.setenv(store.CACHE_ENV, str(tmp_path))  # a second, independent build
    rebuilt = models.prepare(name)
    assert rebuilt != path
    assert store.read_manifest(rebuilt)["files"] == store.read_manifest(path)["files"]
    tokens = _hf_greedy(path, SHORT)
    assert len(set(tokens)) > 1  # random but not degenerate


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_model_runs_in_vllm(prepared, name):
    path = prepared(name)
    long_prompt = " ".join([SHORT] * 300)  # ~3K tokens: several sliding windows and blocks
    result, _ = run_offline(path, "plain", [SHORT, long_prompt], vllm_dtype(name))
    short_tokens, long_tokens = result["tokens"]
    assert len(short_tokens) == len(long_tokens) == 16
    if name not in VLLM_DTYPE:  # float32 on both sides: vLLM equals transformers
        expected = _hf_greedy(path, SHORT)  # stops early at EOS; vLLM ignores EOS here
        assert short_tokens[: len(expected)] == expected


def test_embedded_gemma3_materialises_and_continues_text(prepared):
    path = prepared("gemma-3-270m")
    models.verify(path)
    config = json.loads((path / "config.json").read_text())
    assert {"sliding_attention", "full_attention"} <= set(config["layer_types"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("hi").input_ids[0] == tokenizer.bos_token_id  # Gemma needs its <bos>
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenizer("Monday, Tuesday, Wednesday,", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).strip().startswith("Thursday")
