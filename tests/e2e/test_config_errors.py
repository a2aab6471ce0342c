"""Settings checked against the real model when vLLM builds its engine config."""

import json
import os
import shutil

import pytest
from vllm import LLM
from vllm.config import CompilationMode, KVTransferConfig
from vllm.engine.arg_utils import EngineArgs

from uniprefill import plugin

plugin.register()  # as vLLM's plugin loader does in every process


def _engine_config(model_dir, settings, **engine_args):
    engine_args = {"max_model_len": 4096} | engine_args
    args = EngineArgs(
        model=str(model_dir),
        dtype="float32",
        additional_config={"uniprefill": settings},
        **engine_args,
    )
    return args.create_engine_config()


def _layer_kinds(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    return config["layer_types"]


def test_resolved_settings_reach_the_engine_config(prepared):
    vllm_config = _engine_config(prepared("tiny-qwen2"), {"p": 0.95, "drop_layers": [3, 5]})
    assert vllm_config.additional_config["uniprefill"]["drop_layers"] == [3, 5]
    assert vllm_config.additional_config["uniprefill"]["p"] == 0.95
    assert vllm_config.scheduler_config.scheduler_cls.endswith("UniPrefillScheduler")
    assert vllm_config.parallel_config.worker_extension_cls.endswith("UniPrefillWorkerExtension")


def test_an_enabled_engine_allows_long_steps_unless_the_user_chose(prepared, monkeypatch):
    """`vllm serve --plugin uniprefill` as much as `uniprefill serve`: vLLM's 300 s step limit
    would kill the engine in a long pruned prompt's scoring step on a slow CPU."""
    monkeypatch.delenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", raising=False)
    _engine_config(prepared("tiny-llama"), {})
    assert os.environ["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "3600"
    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "60")
    _engine_config(prepared("tiny-llama"), {})
    assert os.environ["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "60"


def test_drop_layer_outside_the_model(prepared):
    with pytest.raises(ValueError, match=r"layer 40 is outside the model's \d+ layers"):
        _engine_config(prepared("tiny-llama"), {"drop_layers": [2, 40]})


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-qwen3-next"])
def test_drop_layer_that_is_not_full_attention(prepared, name):
    model = prepared(name)
    kinds = _layer_kinds(model)
    other = next(i for i, kind in enumerate(kinds) if kind != "full_attention")
    with pytest.raises(ValueError, match=f"layer {other} is a {kinds[other]} layer"):
        _engine_config(model, {"drop_layers": [other]})


def test_default_drop_layers_are_full_attention(prepared):
    for name in ("tiny-gemma3", "tiny-qwen3-next"):
        model = prepared(name)
        resolved = _engine_config(model, {}).additional_config["uniprefill"]["drop_layers"]
        assert resolved and all(_layer_kinds(model)[i] == "full_attention" for i in resolved)


def test_unsupported_architecture_names_the_supported_ones(prepared, tmp_path):
    model = tmp_path / "mistral"
    shutil.copytree(prepared("tiny-llama"), model)
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not support .*MistralForCausalLM.*supported: Llama"):
        _engine_config(model, {})


def test_user_scheduler_class_conflict_is_explained(prepared):
    args = EngineArgs(
        model=str(prepared("tiny-llama")),
        scheduler_cls="my.Scheduler",
        additional_config={"uniprefill": {}},
    )
    with pytest.raises(ValueError, match="UniPrefill needs scheduler_cls="):
        args.create_engine_config()


def test_llm_constructor_raises_before_starting_an_engine(prepared):
    with pytest.raises(ValueError, match="unknown uniprefill setting"):
        LLM(model=str(prepared("tiny-llama")), additional_config={"uniprefill": {"q": 1}})


def test_vllm_keeps_its_step_budget_and_its_compiled_graph(prepared):
    stock = _engine_config(prepared("tiny-llama"), {"enabled": False}, max_model_len=8192)
    vllm_config = _engine_config(prepared("tiny-llama"), {}, max_model_len=8192)
    budget = vllm_config.scheduler_config.max_num_batched_tokens
    assert budget == stock.scheduler_config.max_num_batched_tokens < 8192
    assert vllm_config.scheduler_config.enable_chunked_prefill
    assert not vllm_config.model_config.enforce_eager
    assert vllm_config.compilation_config.mode != CompilationMode.NONE
    assert not vllm_config.use_v2_model_runner
    assert vllm_config.scheduler_config.async_scheduling is False


def test_async_scheduling_is_refused_with_what_to_change(prepared):
    with pytest.raises(ValueError, match="remove --async-scheduling or disable UniPrefill"):
        _engine_config(prepared("tiny-llama"), {}, async_scheduling=True)


def test_any_step_budget_and_long_prefill_threshold_are_taken(prepared):
    vllm_config = _engine_config(
        prepared("tiny-llama"), {}, max_num_batched_tokens=256, long_prefill_token_threshold=128
    )
    assert vllm_config.scheduler_config.max_num_batched_tokens == 256
    assert vllm_config.scheduler_config.long_prefill_token_threshold == 128


def test_step_budget_below_the_scoring_queries_is_refused_with_what_to_change(prepared):
    with pytest.raises(ValueError, match="raise --max-num-batched-tokens or lower last_q"):
        _engine_config(
            prepared("tiny-llama"), {"last_q": 64, "queries": "last_q"}, max_num_batched_tokens=32
        )
    with pytest.raises(ValueError, match="raise --max-num-batched-tokens or lower max_queries"):
        _engine_config(prepared("tiny-llama"), {"queries": "question"}, max_num_batched_tokens=128)


def test_linear_attention_model_runs_without_prefix_caching(prepared):
    model = prepared("tiny-qwen3-next")
    assert not _engine_config(model, {}).cache_config.enable_prefix_caching
    assert _engine_config(model, {"enabled": False}).cache_config.enable_prefix_caching
    with pytest.raises(ValueError, match="remove --enable-prefix-caching"):
        _engine_config(model, {}, enable_prefix_caching=True)


LMCACHE = KVTransferConfig(kv_connector="LMCacheConnectorV1", kv_role="kv_both")
PREFILL_NODE = KVTransferConfig(kv_connector="NixlConnector", kv_role="kv_producer")


@pytest.mark.parametrize(
    ("engine_args", "named"),
    [
        ({"kv_transfer_config": LMCACHE}, "a KV connector"),
        ({"kv_transfer_config": PREFILL_NODE}, "disaggregation"),
        ({"kv_offloading_size": 1.0}, "KV offloading"),
        ({"enable_lora": True}, "LoRA adapters"),
        ({"runner": "pooling"}, "the pooling runner"),
    ],
    ids=["lmcache", "pd-disaggregation", "kv-offloading", "lora", "pooling"],
)
def test_engine_features_uniprefill_cannot_serve_are_refused(prepared, engine_args, named):
    with pytest.raises(ValueError, match=f"UniPrefill cannot run with .*{named}") as refused:
        _engine_config(prepared("tiny-llama"), {}, **engine_args)
    assert "disable UniPrefill" in str(refused.value)
    _engine_config(prepared("tiny-llama"), {"enabled": False}, **engine_args)  # vLLM's alone


@pytest.mark.parametrize("settings", [5, "on", [1]])
def test_settings_that_are_not_an_object_name_the_fix(prepared, settings):
    with pytest.raises(
        ValueError, match=r'additional_config\["uniprefill"\] must be a JSON object'
    ):
        _engine_config(prepared("tiny-llama"), settings)


def test_ray_executor_on_cpu_is_refused_with_what_to_use(prepared):
    with pytest.raises(ValueError, match="Ray executor .* does not run on the CPU backend; drop"):
        _engine_config(prepared("tiny-llama"), {}, distributed_executor_backend="ray")
