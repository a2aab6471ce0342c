"""Drift guard: the installed vLLM still has every symbol in the ledger (coupling.py) with the
signature the code was written for, and the code uses nothing of vLLM that the ledger omits.

The runner's attributes exist only on a built engine: tests/e2e/test_pruning.py checks them
on one real engine per family (`runner_missing_attributes`).
"""

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
from uniprefill.scheduler_patches.scheduler import UniPrefillScheduler
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.request import Request

from uniprefill.vllm_glue import coupling, patches

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_FILES = sorted(
    [*(ROOT / "uniprefill").rglob("*.py"), *(ROOT / "scheduler_patches").glob("*.py")]
)


def _parameters(function) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def _unwrapped(raw):
    return raw.__func__ if isinstance(raw, staticmethod | classmethod) else raw


@pytest.mark.parametrize("patch", coupling.PATCHES, ids=lambda p: p.target)
def test_patch_target_has_its_signature(patch):
    owner, attr = patches._resolve(patch.target)
    original = patches._originals.get(patch.target, vars(owner)[attr])  # even when applied
    assert _parameters(_unwrapped(original)) == patch.signature


@pytest.mark.parametrize("override", coupling.OVERRIDES, ids=lambda o: o.target)
def test_overridden_method_has_its_signature(override):
    assert _parameters(coupling.resolve(override.target)) == override.signature


@pytest.mark.parametrize("target", coupling.IMPORTS, ids=str)
def test_imported_symbol_exists_with_its_signature(target):
    obj = coupling.resolve(target)
    if coupling.IMPORTS[target] is not None:
        assert _parameters(obj) == coupling.IMPORTS[target]


@pytest.mark.parametrize("target", coupling.FIELDS, ids=str)
def test_dataclass_has_the_fields_used(target):
    names = {field.name for field in dataclasses.fields(coupling.resolve(target))}
    assert set(coupling.FIELDS[target]) <= names, set(coupling.FIELDS[target]) - names


def test_environment_variables_set_are_vllms():
    import vllm.envs

    assert set(coupling.ENVIRONMENT) <= set(vllm.envs.environment_variables)
    source = (ROOT / "uniprefill" / "vllm_glue" / "engine_args.py").read_text()
    assert set(re.findall(r"\b(VLLM_\w+)\b", source)) <= set(coupling.ENVIRONMENT)


def test_compiled_modules_carry_the_attributes_used():
    import inspect

    import vllm.compilation.decorators as decorators

    source = inspect.getsource(decorators)
    for name in coupling.COMPILED_MODULE_ATTRIBUTES:
        assert f"self.{name} = " in source and f"if self.{name}" in source


def test_attention_sets_the_shapes_read():
    from vllm.model_executor.layers.attention import Attention

    source = inspect.getsource(Attention.__init__)
    for name in coupling.ATTENTION_ATTRIBUTES:
        assert f"self.{name} = " in source, name


@pytest.mark.parametrize("target", coupling.ATTRIBUTES_SET, ids=str)
def test_attributes_set_on_instances_are_free_and_travel(target):
    """Set on a dataclass without __slots__ and not among its fields: pickle carries them."""
    import dataclasses

    owner = coupling.resolve(target)
    assert "__slots__" not in vars(owner)
    assert not set(coupling.ATTRIBUTES_SET[target]) & {f.name for f in dataclasses.fields(owner)}


def test_request_state_sets_the_attributes_used():
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    source = inspect.getsource(CachedRequestState.__post_init__)
    for name in coupling.REQUEST_STATE_ATTRIBUTES:
        assert f"self.{name} = " in source, name


def test_request_has_the_attributes_used():
    request = Request("r", [1, 2, 3], SamplingParams(), None)
    assert coupling.missing_attributes(request, coupling.REQUEST_ATTRIBUTES) == []


def test_engine_config_has_the_attributes_used(prepared):
    config = EngineArgs(model=str(prepared("tiny-llama")), max_model_len=512).create_engine_config()
    assert coupling.missing_attributes(config, coupling.CONFIG_ATTRIBUTES) == []


def test_missing_attributes_are_named():
    with pytest.raises(RuntimeError, match=r"lacks seq_lens, input_batch\.req_ids \("):
        coupling.raise_if_missing(
            coupling.missing_attributes(
                type("Runner", (), {"input_batch": object()}), ["seq_lens", "input_batch.req_ids"]
            ),
            "model runner",
        )


# ---- the ledger covers the code ------------------------------------------------------------


def test_every_vllm_import_is_in_the_ledger():
    ledger = {target.split(".__init__")[0] for target in coupling.IMPORTS}
    imported = set()
    for path in PRODUCT_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm"):
                imported |= {f"{node.module}:{alias.name}" for alias in node.names}
    assert imported - ledger == set()


def test_every_scheduler_override_is_in_the_ledger():
    scheduler = coupling.resolve("vllm.v1.core.sched.scheduler:Scheduler")
    ours = {
        name
        for name, value in vars(UniPrefillScheduler).items()
        if inspect.isfunction(value) and hasattr(scheduler, name)
    }
    listed = {o.target.rsplit(".", 1)[1] for o in coupling.OVERRIDES if "Scheduler." in o.target}
    assert ours == listed
    source = (ROOT / "scheduler_patches" / "scheduler.py").read_text()
    rebound = set(re.findall(r"coordinator\.(\w+) = ", source))
    listed = {o.target.rsplit(".", 1)[1] for o in coupling.OVERRIDES if "Coordinator." in o.target}
    assert rebound == listed


def test_every_runner_attribute_the_pruner_reads_is_in_the_ledger():
    glue = ROOT / "uniprefill" / "vllm_glue"
    source = "".join(
        (glue / name).read_text() for name in ("pruner.py", "hooks.py", "stage_metadata.py")
    )
    read = set(re.findall(r"\brunner\.(\w+)", source)) - {"__dict__", "_uniprefill"}  # ours
    read |= {f"input_batch.{name}" for name in re.findall(r"\bbatch\.(\w+)", source)}
    listed = {path.split(".")[0] for path in coupling.RUNNER_ATTRIBUTES}
    listed |= {
        path.rsplit(".", 1)[0] if path.count(".") > 1 else path
        for path in coupling.RUNNER_ATTRIBUTES
        if path.startswith("input_batch.")
    }
    assert read - listed == set()


def test_prometheus_logger_has_the_attributes_used():
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    source = inspect.getsource(PrometheusStatLogger.__init__)
    for name in coupling.STAT_LOGGER_ATTRIBUTES:
        assert hasattr(PrometheusStatLogger, name) or re.search(rf"self\.{name}\b[^=\n]*=", source)


@pytest.mark.parametrize("extension", coupling.EXTENSIONS, ids=lambda e: e.target)
def test_extended_dataclass_exists_without_the_field(extension):
    owner_path, _, name = extension.target.rpartition(".")
    owner = coupling.resolve(owner_path)
    assert dataclasses.is_dataclass(owner)
    source = inspect.getsource(owner)  # vLLM's own definition: the name must stay free
    assert not re.search(rf"^\s+{name}\s*:", source, re.MULTILINE)
