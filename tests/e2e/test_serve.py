"""`vllm serve MODEL --plugin uniprefill` as a real server on loopback, used through `openai`."""

import json
import subprocess

import openai
import psutil
import pytest

from tests.e2e.helpers import (
    lines_from,
    metrics_added,
    metrics_of,
    random_prompts,
    served_metrics,
    tiny_llama_server,
    worker_rpc,
)
from uniprefill import serve

ENGINE_ARGS = ["--max-model-len", "4096", "--enforce-eager"]


@pytest.fixture(scope="module")
def server(prepared, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    dev_mode = {"VLLM_SERVER_DEV_MODE": "1"}  # the status RPC
    with tiny_llama_server(prepared("tiny-llama"), log_path, ENGINE_ARGS, dev_mode) as (proc, port):
        yield proc, port, log_path


def test_answers_through_the_openai_client(server):
    _, port, log_path = server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    completion = client.completions.create(
        model="tiny-llama", prompt="The quick brown fox", max_tokens=8, temperature=0
    )
    assert completion.usage.completion_tokens == 8
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens > 0
    log = log_path.read_text()
    assert "UniPrefill active" in log
    assert lines_from(log, "EngineCore", "UniPrefill scheduler active")
    assert lines_from(log, "VllmWorker", "UniPrefill plugin loaded")


def _complete(port: int, prompt, **xargs):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    return client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        extra_body={"vllm_xargs": xargs} if xargs else None,
    )


@pytest.mark.parametrize(
    ("xargs", "field"),
    [
        ({"uniprefill_p": 1.5}, "uniprefill_p"),
        ({"uniprefill_p": "half"}, "uniprefill_p"),
        ({"uniprefill_enabled": "sometimes"}, "uniprefill_enabled"),
        ({"uniprefill_level": 3}, "uniprefill_level"),
        ({"uniprefill_preset": "quick"}, "uniprefill_preset must be one of"),
        # engine-wide settings (drop layers, ...) differ: start the server with the preset
        ({"uniprefill_preset": "paper"}, "uniprefill_preset 'paper' needs drop_layers .2, 4, 6."),
    ],
)
def test_bad_request_field_is_a_400_naming_it_and_the_server_carries_on(server, xargs, field):
    _, port, _ = server
    with pytest.raises(openai.BadRequestError, match=field):
        _complete(port, "The quick brown fox", **xargs)
    assert _complete(port, "The quick brown fox").usage.completion_tokens == 6


# Past the default min_prompt_len (pruned), and shares no prefix with the other tests' prompts
# (a prefix this file's tests repeat ends up in the prefix cache and is read from there).
LONG = random_prompts((1200,), seed=99)[0]


@pytest.mark.parametrize(
    "p",
    # each of the first three once passed the check, became 0.0 in the float32 plan and killed
    # the engine; their neighbours
    [
        1e-300,
        1e-46,
        "1e-50",
        5e-324,
        1e-39,
        -0.0,
        0,
        "inf",
        "nan",
        "1e400",
        "9" * 20_000,
        "0x1p-3",
        [0.5],
        {"p": 0.5},
        None,
    ],  # fmt: skip
    ids=repr,
)
def test_every_p_the_server_refuses_is_a_400_and_it_serves_on(server, p):
    _, port, _ = server
    with pytest.raises(openai.BadRequestError, match="uniprefill_p"):
        _complete(port, LONG, uniprefill_p=p)
    assert _complete(port, LONG).usage.completion_tokens == 6


@pytest.mark.parametrize(
    ("seed", "p"), enumerate([1.1754943508222875e-38, 1e-30, "0.5", 0.9, 1, True]), ids=repr
)
def test_every_p_the_server_accepts_runs(server, seed, p):
    """The smallest p accepted (float32's smallest normal number) and its neighbours: a long
    prompt of its own (the prefix cache would serve a repeat) pruned with each, unless p is 1.
    (JSON `true` reaches the engine as 1: vLLM's API types vllm_xargs values as str, int or
    float, and reads a bool as an int.)"""
    _, port, _ = server
    prompt = random_prompts((1200,), seed=100 + seed)[0]
    before = served_metrics(port).get("pruned_requests", 0)
    assert _complete(port, prompt, uniprefill_p=p).usage.completion_tokens == 6
    pruned = served_metrics(port).get("pruned_requests", 0) - before
    assert pruned == (0 if float(p) == 1 else 1)


def test_per_request_controls_reach_the_engine(server):
    _, port, _ = server
    prompt = [(7 * i) % 900 + 10 for i in range(1500)]  # token ids: long enough to prune
    pruned = _complete(port, prompt, uniprefill_p=0.2).choices[0].text  # first: not cached yet
    off = _complete(port, prompt, uniprefill_enabled=False).choices[0].text
    assert _complete(port, prompt, uniprefill_p=1.0).choices[0].text == off
    assert pruned != off
    # `fast` differs from the default server only in p: a request may ask for it
    assert _complete(port, prompt[:-1], uniprefill_preset="fast").usage.completion_tokens == 6


def test_metrics_count_what_the_worker_pruned_and_each_prune_is_logged(server):
    """/metrics gains what the worker's own records of its pruned prompts add up to; the log has
    one line per pruned request."""
    _, port, log_path = server
    recent = worker_rpc(port, "uniprefill_requests")["recent"]
    before, seen = served_metrics(port), {r["req_id"] for r in recent}
    for seed in (1, 2):  # new prompts, pruned
        _complete(port, [(seed * 13 + 7 * i) % 900 + 10 for i in range(1500)], uniprefill_p=0.5)
    recent = worker_rpc(port, "uniprefill_requests")["recent"]
    records = [r for r in recent if r["req_id"] not in seen]
    assert len(records) == 2
    added = metrics_added(before, served_metrics(port))
    assert added.pop("selection_seconds_count") >= 1
    drops = worker_rpc(port, "uniprefill_status")["config"]["drop_layers"]
    assert added == metrics_of(records, drops)
    log = log_path.read_text()
    for r in records:
        expected = f"UniPrefill pruned request {r['req_id']}: {r['kept'][0]} prompt tokens, kept "
        assert len(lines_from(log, "EngineCore", expected)) == 1


def test_vllms_own_benchmark_client_runs_unchanged(server, prepared, tmp_path):
    """`vllm bench serve` (random dataset, long inputs, p per request through its --extra-body)
    against the server: every request succeeds, and the long prompts are pruned. Its ready check
    sends the first prompt once more, first: pruned then, that prompt's second send repeats a
    pruned prompt and is prefilled unpruned (repeated_prefix "fill"), the other three pruned."""
    _, port, _ = server
    before = served_metrics(port).get("pruned_requests", 0)
    cmd = [serve.vllm_executable(), "bench", "serve", "--backend", "vllm",
           "--base-url", f"http://127.0.0.1:{port}", "--model", "tiny-llama",
           "--tokenizer", str(prepared("tiny-llama")), "--dataset-name", "random",
           "--random-input-len", "1500", "--random-output-len", "4", "--num-prompts", "4",
           "--max-concurrency", "2", "--ignore-eos", "--disable-tqdm", "--save-result",
           "--extra-body", json.dumps({"vllm_xargs": {"uniprefill_p": 0.5}}),
           "--result-dir", str(tmp_path), "--result-filename", "bench.json"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["completed"] == 4 and result["failed"] == 0
    assert served_metrics(port)["pruned_requests"] - before == 4


def test_shuts_down_cleanly(server):
    proc, _, log_path = server
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(family) >= 3  # API server, engine core, worker (+ multiprocessing helpers)
    serve.stop(proc)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    # Helpers such as multiprocessing's resource tracker finish cleaning up just after.
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def _serve_fails(args: list[str]) -> str:
    cmd = [serve.vllm_executable(), "serve", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_unknown_plugin_name_is_refused(prepared):
    output = _serve_fails([str(prepared("tiny-llama")), "--plugin", "turbo"])
    assert "unknown plugin 'turbo'; --plugin can enable: uniprefill" in output


def test_bad_setting_stops_the_server_with_what_to_fix(prepared):
    output = _serve_fails(
        [
            str(prepared("tiny-llama")),
            "--plugin",
            "uniprefill",
            "--additional-config",
            '{"uniprefill": {"block_size": 100}}',
        ]
    )
    assert "uniprefill.block_size must be a power of two (e.g. 64), got 100" in output
