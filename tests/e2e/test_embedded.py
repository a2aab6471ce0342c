"""The main job: the embedded Qwen model, materialised from PyPI packages and served by
`uniprefill serve` (what `make serve` runs), answers a real question."""

import subprocess
import sys
from pathlib import Path

import openai
import psutil
import pytest

from tests.e2e.helpers import running_server, served_pruning_state
from uniprefill import models, serve

QWEN = "qwen2.5-coder-0.5b-instruct"
PASSKEY = "48213"
PROSE = [
    "The harbour town woke slowly, its fishing boats rocking against the pier while gulls "
    "argued over the night's catch.",
    "In the valley, the old mill had not turned for decades, yet the river still carved its "
    "patient path through the stones.",
    "A librarian catalogued maps of coastlines that no longer existed, drawn by sailors who "
    "trusted stars more than instruments.",
    "The orchestra tuned in the half-dark, a long A from the oboe spreading through the hall "
    "like warm light.",
    "Market stalls opened one by one, offering pears, copper pans, and bolts of indigo cloth "
    "to the early crowd.",
    "On the mountain pass, the weather changed within minutes, and the hikers learned to read "
    "the clouds like a calendar.",
]


def passkey_prompt(paragraphs: int = 36) -> str:
    paragraphs = [PROSE[(i * 5) % len(PROSE)] for i in range(paragraphs)]
    paragraphs.insert(
        len(paragraphs) // 3, f"Remember this: the passkey is {PASSKEY}. Keep it safe."
    )
    return (
        "Read the text and answer the question at the end.\n\n"
        + "\n".join(paragraphs)
        + "\n\nWhat is the passkey mentioned in the text? Answer with the number only."
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("uniprefill")), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=True)


def test_prepare_is_idempotent_and_integrity_checked():
    path = Path(_cli("models", "prepare", QWEN).stdout.strip())
    manifest = path / "uniprefill-manifest.json"
    built_at = manifest.stat().st_mtime_ns
    assert Path(_cli("models", "prepare", QWEN).stdout.strip()) == path
    assert manifest.stat().st_mtime_ns == built_at  # the second call did not rebuild
    models.verify(path)  # every file's sha256
    assert (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file()
    listing = _cli("models", "list").stdout
    assert f"{QWEN}" in listing and "prepared" in listing


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    port = serve.free_port()
    log_path = tmp_path_factory.mktemp("main-job") / "serve.log"
    cmd = [
        str(Path(sys.executable).with_name("uniprefill")),
        "serve",
        "--port",
        str(port),
        "--kv-cache-gib",
        "2",
        "--",
        "--max-model-len",
        "8192",
    ]
    env = serve.serve_env() | {"VLLM_SERVER_DEV_MODE": "1"}  # /collective_rpc: keep counts
    with running_server(cmd, env, log_path, port, timeout_s=900) as proc:
        yield port, log_path, proc


def test_served_default_model_answers_a_passkey_question(main_job):
    port, log_path, _ = main_job
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [QWEN]
    reply = client.chat.completions.create(
        model=QWEN,
        messages=[{"role": "user", "content": passkey_prompt()}],
        max_tokens=12,
        temperature=0,
    )
    assert reply.usage.prompt_tokens > 500
    assert PASSKEY in reply.choices[0].message.content
    log = log_path.read_text()
    assert "--dtype float32" in log or "--dtype auto" in log
    assert "UniPrefill active" in log
    assert f"serving {QWEN} at http://127.0.0.1:{port}/v1" in log and "curl " in log


def test_pruned_long_prompt_still_gets_the_passkey(main_job):
    """A ~7K-token prompt on a server with vLLM's default step budget (2,048): pruned in
    chunks."""
    port, _, _ = main_job
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")

    def ask(**xargs):
        return client.chat.completions.create(
            model=QWEN,
            messages=[{"role": "user", "content": passkey_prompt(paragraphs=300)}],
            max_tokens=12,
            temperature=0,
            extra_body={"vllm_xargs": xargs} if xargs else None,
        )

    pruned = ask()  # first: sent again, it would be a repeat and read unpruned from the cache
    unpruned = ask(uniprefill_enabled=False)
    assert pruned.usage.prompt_tokens > 7000  # several steps' worth: it came in chunks
    assert PASSKEY in unpruned.choices[0].message.content
    assert PASSKEY in pruned.choices[0].message.content
    live, recent = served_pruning_state(port)
    assert live == {}
    (kept,) = [k for k in recent if k[0] == pruned.usage.prompt_tokens]
    assert len(kept) == 7 and kept[-1] < kept[0]  # 6 "early" drop layers, tokens removed


def test_sigterm_stops_the_launcher_and_every_vllm_process(main_job):
    _, log_path, proc = main_job
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(family) >= 4  # launcher, API server, engine core, worker
    proc.terminate()
    assert proc.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
