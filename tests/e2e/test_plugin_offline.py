"""The plugin in real offline engines: where it loads, and that loading it changes nothing."""

import os
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.e2e.helpers import lines_from, run_offline
from uniprefill.vllm_glue.patches import PATCHES

PROMPTS = ["The quick brown fox", "Once upon a time there was a", "1 2 3 4 5 6"]


def _run(model_dir: Path, mode: str, with_plugin: bool) -> tuple[dict, str]:
    env = dict(os.environ)
    if not with_plugin:  # as if uniprefill were not installed: every other plugin still loads
        others = [ep.name for ep in entry_points(group="vllm.general_plugins")]
        env["VLLM_PLUGINS"] = ",".join(n for n in others if n != "uniprefill")
    return run_offline(model_dir, mode, PROMPTS, env=env)


@pytest.fixture(scope="module")
def runs(prepared):
    model = prepared("tiny-llama")
    return {
        "without": _run(model, "plain", with_plugin=False),
        "installed": _run(model, "plain", with_plugin=True),
        "enabled": _run(model, "enabled", with_plugin=True),
    }


def test_installed_but_not_enabled_changes_nothing(runs):
    (without, without_log), (installed, installed_log) = runs["without"], runs["installed"]
    assert not without["plugin_imported_in_main"] and "UniPrefill" not in without_log
    assert installed["plugin_imported_in_main"]
    assert installed["tokens"] == without["tokens"]
    assert "UniPrefill active" not in installed_log
    assert "UniPrefill scheduler active" not in installed_log


def test_plugin_loads_in_engine_core_and_worker_processes(runs):
    result, log = runs["enabled"]
    main_pid = result["main_pid"]
    (worker,) = result["workers"]  # answered from inside the worker process
    assert worker["pid"] != main_pid
    worker_scoped = {p.target for p in PATCHES if p.scope in ("plugin", "worker")}
    assert set(worker["patches"]) == worker_scoped  # no front-end patch in a worker
    assert worker["config"]["drop_layers"] == [1, 3, 5]  # "early" for 8 full-attention layers

    core = lines_from(log, "EngineCore", "UniPrefill scheduler active")
    assert len(core) == 1, log[-4000:]
    core_pid = core[0][1]
    assert core_pid not in (main_pid, worker["pid"])
    plugin_scoped = sum(p.scope == "plugin" for p in PATCHES)
    assert f"(pid {core_pid}, {plugin_scoped} vLLM patches applied here)" in log
    assert lines_from(log, "EngineCore", "UniPrefill plugin loaded")
    assert lines_from(log, "VllmWorker", "UniPrefill plugin loaded")


def test_enabling_logs_resolved_settings_and_keeps_outputs(runs):
    result, log = runs["enabled"]
    assert "UniPrefill active" in log and "'drop_layers': [1, 3, 5]" in log
    # Short prompts are never pruned: same greedy tokens as without the plugin.
    assert result["tokens"] == runs["without"][0]["tokens"]
