"""The patch registry against the installed vLLM, and the `--plugin` option on vLLM's own parser."""

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

from uniprefill import plugin
from uniprefill.vllm_glue import patches


@pytest.fixture(autouse=True)
def registered():
    plugin.register()
    yield
    patches.revert_patches()
    patches.apply_patches()  # leave the process as vLLM's plugin loader left it


def _apply_all() -> int:
    for scope in patches.SCOPES:
        count = patches.apply_patches(scope)
    return count


def _raw_attributes():
    out = {}
    for patch in patches.PATCHES:
        owner, attr = patches._resolve(patch.target)  # raises if vLLM lacks the target
        out[patch.target] = vars(owner)[attr]
    return out


def test_every_target_exists_and_apply_is_idempotent_and_revertible():
    patches.revert_patches()
    originals = _raw_attributes()
    plugin_scope = [p.target for p in patches.PATCHES if p.scope == "plugin"]
    assert patches.apply_patches() == len(plugin_scope)  # the plugin applies its scope only
    assert patches.applied_patches() == sorted(plugin_scope)
    assert _apply_all() == len(patches.PATCHES)
    wrapped = _raw_attributes()
    assert all(wrapped[t] is not originals[t] for t in originals)
    assert _apply_all() == len(patches.PATCHES)
    assert all(_raw_attributes()[t] is wrapped[t] for t in originals)  # no double wrapping
    assert isinstance(vars(EngineArgs)["add_cli_args"], staticmethod)
    assert isinstance(vars(EngineArgs)["from_cli_args"], classmethod)
    patches.revert_patches()
    assert patches.applied_patches() == []
    assert all(_raw_attributes()[t] is originals[t] for t in originals)
    assert all(p.why for p in patches.PATCHES)
    assert {p.scope for p in patches.PATCHES} == set(patches.SCOPES)
    with pytest.raises(ValueError, match="unknown patch scope 'gpu'"):
        patches.apply_patches("gpu")


def _serve_args(argv):
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    return AsyncEngineArgs.from_cli_args(parser.parse_args(argv))


def test_plugin_option_enables_uniprefill_on_the_real_serve_parser():
    engine_args = _serve_args(["/some/model", "--plugin", "uniprefill"])
    assert engine_args.additional_config == {"uniprefill": {"enabled": True}}


def test_plugin_option_keeps_the_users_settings():
    engine_args = _serve_args(
        ["m", "--plugin", "uniprefill", "--additional-config", '{"uniprefill": {"p": 0.9}}']
    )
    assert engine_args.additional_config == {"uniprefill": {"p": 0.9, "enabled": True}}


def test_without_the_option_nothing_is_added():
    assert _serve_args(["m"]).additional_config == {}


def test_unknown_plugin_name_fails_with_a_clear_message(capsys):
    with pytest.raises(SystemExit):
        _serve_args(["m", "--plugin", "speedup"])
    err = capsys.readouterr().err
    assert "unknown plugin 'speedup'; --plugin can enable: uniprefill" in err


@pytest.mark.parametrize("spelling", [["--plugin=uniprefill"], ["--plugin", "uniprefill"] * 2])
def test_plugin_option_spellings(spelling):
    assert _serve_args(["m", *spelling]).additional_config == {"uniprefill": {"enabled": True}}


def test_malformed_additional_config_json_names_the_fix(capsys):
    with pytest.raises(SystemExit):
        _serve_args(["m", "--plugin", "uniprefill", "--additional-config", "{uniprefill: {}}"])
    err = capsys.readouterr().err
    assert "argument --additional-config: not valid JSON (Expecting property name" in err
    assert """e.g. --additional-config '{"uniprefill": {"p": 0.99}}'""" in err
    # valid JSON parses as vLLM parses it
    parsed = _serve_args(["m", "--additional-config", '{"other": [1, 2]}'])
    assert parsed.additional_config == {"other": [1, 2]}


def test_additional_config_that_is_not_an_object_names_the_fix():
    with pytest.raises(ValueError, match="--additional-config must be a JSON object, got 'p=0.9'"):
        _serve_args(["m", "--plugin", "uniprefill", "--additional-config", "p=0.9"])


def test_extension_fields_travel_in_vllms_transports_and_revert():
    """The field the plugin declares on SchedulerStats survives vLLM's own msgspec transport
    (engine core -> front end), and the one on SchedulerOutput its pickle transport (engine core
    -> workers); without the plugin, vLLM's classes have no such fields."""
    import dataclasses
    import pickle

    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from uniprefill.step_plan import PromptPlan
    from uniprefill.vllm_glue.metrics import STATS_FIELD, STEP_FIELD

    assert {e.target.rsplit(":", 1)[1] for e in patches.EXTENSIONS} == {
        f"SchedulerStats.{STATS_FIELD}",
        f"SchedulerOutput.{STEP_FIELD}",
    }
    assert all(e.why for e in patches.EXTENSIONS)
    stats = SchedulerStats(num_running_reqs=2)
    report = {"prompts": [{"req_id": "r", "kept": [4096, 3000]}], "selection_s": [0.01]}
    setattr(stats, STATS_FIELD, report)
    wire = MsgpackEncoder().encode(EngineCoreOutputs(scheduler_stats=stats))
    received = MsgpackDecoder(EngineCoreOutputs).decode(wire).scheduler_stats
    assert getattr(received, STATS_FIELD) == report and received.num_running_reqs == 2
    assert getattr(SchedulerStats(), STATS_FIELD) is None
    step = SchedulerOutput.make_empty()
    assert getattr(step, STEP_FIELD) is None
    setattr(step, STEP_FIELD, {"r": PromptPlan(p=0.9, queries=32)})
    assert getattr(pickle.loads(pickle.dumps(step)), STEP_FIELD) == {"r": PromptPlan(0.9, 32)}
    patches.revert_patches()
    assert STATS_FIELD not in {f.name for f in dataclasses.fields(SchedulerStats)}
    assert not hasattr(SchedulerStats(), STATS_FIELD)
    assert not hasattr(SchedulerOutput.make_empty(), STEP_FIELD)
