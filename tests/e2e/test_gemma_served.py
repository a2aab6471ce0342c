"""The embedded Gemma-3-270M (sliding-window/full hybrid) served by `vllm serve ... --plugin
uniprefill`: a long prompt is pruned at its global layers and the model still answers, through
the `openai` client."""

import openai
import pytest

from tests.e2e.helpers import running_server, served_pruning_state
from tests.e2e.test_embedded import PROSE
from uniprefill import serve

GEMMA = "gemma-3-270m"
# A base model: it continues text. The long prose before the list (~2700 tokens) is what gets
# pruned.
PROMPT = "\n".join(PROSE[(i * 5) % len(PROSE)] for i in range(110)) + (
    "\n\nThe days of the week: Monday, Tuesday, Wednesday,"
)


@pytest.fixture(scope="module")
def server(prepared, tmp_path_factory):
    port = serve.free_port()
    log_path = tmp_path_factory.mktemp("gemma") / "server.log"
    cmd = serve.serve_command(
        str(prepared(GEMMA)),
        served_name=GEMMA,
        host="127.0.0.1",
        port=port,
        dtype="float32",
        extra_args=["--max-model-len", "4096"],
    )
    env = serve.serve_env(kv_cache_gib=1) | {"VLLM_SERVER_DEV_MODE": "1"}  # /collective_rpc
    with running_server(cmd, env, log_path, port, timeout_s=900):
        yield port, log_path


def test_pruned_long_prompt_is_continued_like_the_unpruned_one(server):
    port, log_path = server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")

    def complete(**xargs):
        return client.completions.create(
            model=GEMMA,
            prompt=PROMPT,
            max_tokens=3,
            temperature=0,
            extra_body={"vllm_xargs": xargs} if xargs else None,
        )

    pruned, unpruned = complete(), complete(uniprefill_enabled=False)  # pruned first: uncached
    assert pruned.usage.prompt_tokens > 1500  # above the default min_prompt_len (1024)
    assert unpruned.choices[0].text.strip().startswith("Thursday")
    assert pruned.choices[0].text.strip().startswith("Thursday")

    live, recent = served_pruning_state(port)
    assert live == {}
    (kept,) = [k for k in recent if k[0] == pruned.usage.prompt_tokens]
    assert len(kept) == 2 and kept[-1] < kept[0]  # one drop, at global layer 11 of 18
    log = log_path.read_text()
    assert "[gemma3]" in log and "keep their sliding-window KV blocks" in log
