"""What the end-to-end tests share: the tiny families' dtypes, engines and servers that clean up
after themselves, what vLLM's child processes logged, and the workers' pruning state."""

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import torch

from uniprefill import serve

# vLLM's CPU Gated DeltaNet kernels run only in bfloat16; the other tiny families run in float32,
# where vLLM and transformers agree token for token.
VLLM_DTYPE = {"tiny-qwen3-next": "bfloat16", "tiny-qwen3-next-2kh": "bfloat16"}


# Small blocks and sinks so prompts of a few hundred tokens are pruned on the tiny models; a
# prompt is scored by its question (the tokens after its last blank line, 32 to 64 of them) or
# by its last 32 tokens if it has none.
TINY_SETTINGS = {
    "p": 0.9,
    "min_prompt_len": 256,
    "sink": 64,
    "last_q": 32,
    "block_size": 16,
    "queries": "question",
    "max_queries": 64,
}
NEWLINE = 204  # the tiny models' tokenizer's "\n" (uniprefill/models/tokenizer.py)


def with_question(prompt: list[int], question: int) -> list[int]:
    """The prompt, same length, with a blank line before its last `question` tokens."""
    return [*prompt[: -question - 2], NEWLINE, NEWLINE, *prompt[-question:]]


def random_prompts(lengths=(1500, 40, 900, 300), seed=0) -> list[list[int]]:
    """Token-id prompts; with TINY_SETTINGS all but the 40-token one (below min_prompt_len) are
    pruned."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 1000, (n,), generator=gen).tolist() for n in lengths]


def vllm_dtype(model: str) -> str:
    return VLLM_DTYPE.get(model, "float32")


def check_against_reference(
    model_dir: Path,
    prompts: list[list[int]],
    settings: dict,
    kept: list[list[int] | None],
    tokens: list[list[int]],
) -> int:
    """An engine's keep counts per prompt (prompt, then after each drop layer; None: not pruned)
    agree with the reference path's drop by drop, within the kernels' rounding margin; where
    every drop's kept set is determined, its greedy tokens equal the reference's too (float32
    only: in bfloat16, vLLM's and transformers' Gated DeltaNet kernels part within a token or
    two even unpruned). Returns how many prompts were determined."""
    from transformers import AutoModelForCausalLM

    from uniprefill.config import UniPrefillConfig
    from uniprefill.families import layer_types
    from uniprefill.ops.select.margin import MASS_TOLERANCE, assert_keep_counts_agree
    from uniprefill.reference import generate
    from uniprefill.requests import paragraph_breaks, scoring_queries

    dtype = vllm_dtype(model_dir.name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    config = UniPrefillConfig.from_dict(settings).resolve(layer_types(model.config))
    breaks = paragraph_breaks(str(model_dir), None, False)
    determined = 0
    for prompt, engine_kept, engine_tokens in zip(prompts, kept, tokens, strict=True):
        ref = generate(
            model, torch.tensor(prompt), config=config, max_new_tokens=len(engine_tokens)
        )
        if assert_keep_counts_agree(
            engine_kept or [len(prompt)] * (len(config.drop_layers) + 1),
            ref.kept_per_stage,
            ref.block_scores,
            p=config.p,
            rule=config.rule,
            tolerance=MASS_TOLERANCE[dtype],
            queries=scoring_queries(config, prompt, breaks),
        ):
            determined += 1
            if dtype == "float32":
                assert engine_tokens == ref.tokens, len(prompt)
    return determined


def assert_selections_are_the_oracles(by_rank: list[list[dict]], settings: dict) -> int:
    """Every selection an engine ran (each rank's `uniprefill_selections` records, in step
    order) kept exactly the rows the oracle keeps on the queries and keys that selection saw,
    with the engine's own p and query counts; under tensor parallelism the ranks' oracle block
    scores are summed, as the engine sums them. Returns how many selections pruned rows."""
    from uniprefill.config import UniPrefillConfig
    from uniprefill.ops import select_tokens

    rule = UniPrefillConfig.from_dict(settings).rule
    assert by_rank and all(len(r) == len(by_rank[0]) for r in by_rank)
    pruned = 0
    for records in zip(*by_rank, strict=True):
        inputs = [
            dict(
                q=torch.tensor(r["q"]),
                k=torch.tensor(r["k"]),
                cu_seqlens=torch.tensor(r["cu_seqlens"], dtype=torch.int32),
                p=torch.tensor(r["p"], dtype=torch.float32),
                queries=torch.tensor(r["queries"]),
            )
            for r in records
        ]
        # each rank's own block scores, then the oracle again with their sum (the engine's)
        own = [select_tokens(**args, rule=rule, backend="oracle").block_scores for args in inputs]
        summed = _replaced_by(torch.stack(own).sum(0))
        for record, args in zip(records, inputs, strict=True):
            oracle = select_tokens(**args, rule=rule, backend="oracle", reduce_block_scores=summed)
            assert oracle.kept_indices.tolist() == record["kept"], (record["stage"], rule)
        rows = len(records[0]["positions"])
        pruned += len(records[0]["kept"]) < rows
    return pruned


def _replaced_by(total: torch.Tensor):
    return lambda _own: total


def pruning_state(worker: dict) -> tuple[dict, dict]:
    """A worker's `uniprefill_requests` answer as (live, recent), keyed by request ids as the
    caller gave them (the engine appends a random suffix to each)."""
    return (
        {k.rsplit("-", 1)[0]: v for k, v in worker["live"].items()},
        {r["req_id"].rsplit("-", 1)[0]: r["kept"] for r in worker["recent"]},
    )


def worker_rpc(port: int, method: str) -> dict:
    """A server's one worker's answer to `method` (uniprefill_requests, uniprefill_status), over
    vLLM's dev-mode /collective_rpc (the server must run with VLLM_SERVER_DEV_MODE=1)."""
    url = f"http://127.0.0.1:{port}/collective_rpc"
    (worker,) = httpx.post(url, json={"method": method}).json()["results"]
    return worker


def served_pruning_state(port: int) -> tuple[dict, list]:
    """(live, recent keep counts) of a server's one worker."""
    worker = worker_rpc(port, "uniprefill_requests")
    return worker["live"], [r["kept"] for r in worker["recent"]]


# vLLM prefixes every line a child process logs with "(EngineCore pid=N)", "(VllmWorker-0 pid=N)".
_PREFIX = re.compile(r"^\((?P<proc>[\w-]+) pid=(?P<pid>\d+)\)")


def lines_from(log: str, process_prefix: str, needle: str) -> list[tuple[str, int]]:
    """(name, pid) of each line logged by a process named process_prefix* containing needle."""
    found = []
    for line in log.splitlines():
        match = _PREFIX.match(line)
        if match and match["proc"].startswith(process_prefix) and needle in line:
            found.append((match["proc"], int(match["pid"])))
    return found


def engine_children() -> list[psutil.Process]:
    """This process's descendants, less multiprocessing's resource tracker (it lives as long as
    this process, by design)."""

    def is_tracker(proc: psutil.Process) -> bool:
        try:
            return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
        except psutil.Error:  # a zombie has no command line
            return False

    return [p for p in psutil.Process().children(recursive=True) if not is_tracker(p)]


@contextmanager
def offline_llm(**kwargs) -> Iterator:
    """An in-process `vllm.LLM`; on exit its engine is shut down and its processes have exited."""
    from vllm import LLM

    before = {p.pid for p in engine_children()}
    llm = LLM(**kwargs)
    mine = [p for p in engine_children() if p.pid not in before]
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        _, alive = psutil.wait_procs(mine, timeout=60)
        assert not alive, f"engine processes still running after shutdown: {alive}"


def run_offline(
    model_dir: Path,
    mode: str,
    prompts: list,
    dtype: str = "float32",
    env: dict | None = None,
    settings: dict | None = None,
) -> tuple[dict, str]:
    """Run tests/e2e/offline_run.py in a fresh process; return its RESULT and its whole log."""
    script = Path(__file__).with_name("offline_run.py")
    args = [str(model_dir), mode, json.dumps(prompts), dtype, json.dumps(settings or {})]
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    result = next(line for line in log.splitlines() if line.startswith("RESULT "))
    return json.loads(result.removeprefix("RESULT ")), log


@contextmanager
def running_server(
    cmd: list[str], env: dict, log_path: Path, port: int, timeout_s: float = 600
) -> Iterator[subprocess.Popen]:
    """A server process that answers /health on port; stopped on exit. A server that never
    becomes ready fails the test with the tail of its log."""
    proc = serve.start(cmd, env, log_path)
    try:
        try:
            serve.wait_until_ready(proc, f"http://127.0.0.1:{port}", timeout_s=timeout_s)
        except Exception:
            raise AssertionError(log_path.read_text()[-4000:]) from None
        yield proc
    finally:
        serve.stop(proc)


@contextmanager
def tiny_llama_server(
    model_dir: Path, log_path: Path, args: list[str], env: dict | None = None
) -> Iterator[tuple[subprocess.Popen, int]]:
    """`vllm serve` of tiny-llama (float32) with UniPrefill on loopback, with these arguments
    and extra environment (each tensor-parallel rank gets its cores); yields (process, port)."""
    port = serve.free_port()
    cmd = serve.serve_command(str(model_dir), served_name="tiny-llama", host="127.0.0.1",
                              port=port, dtype="float32", extra_args=args)  # fmt: skip
    tp = serve.tensor_parallel_size(args)
    env = serve.serve_env(kv_cache_gib=1, tensor_parallel_size=tp) | (env or {})
    with running_server(cmd, env, log_path, port) as proc:
        yield proc, port


# ---- UniPrefill's metrics (uniprefill/vllm_glue/metrics.py) -----------------------------------

PREFIX = "vllm:uniprefill_"


def metric_totals(samples: Iterator[tuple[str, dict, float]]) -> dict[str, float]:
    """UniPrefill's counters and histogram counts from (name, labels, value) samples, summed over
    engines: "pruned_requests", "kept_tokens@6" (by drop layer), "kept_share_count", ..."""
    totals: dict[str, float] = {}
    for name, labels, value in samples:
        if not name.startswith(PREFIX) or name.endswith(("_bucket", "_sum", "_created")):
            continue
        key = name.removeprefix(PREFIX).removesuffix("_total")
        if "drop_layer" in labels:
            key += f"@{labels['drop_layer']}"
        totals[key] = totals.get(key, 0) + value
    return totals


def offline_metrics(llm) -> dict[str, float]:
    """metric_totals of `LLM.get_metrics()` (an engine made with disable_log_stats=False)."""
    from vllm.v1.metrics.reader import Histogram

    return metric_totals(
        (m.name + "_count", m.labels, m.count) if isinstance(m, Histogram)
        else (m.name, m.labels, m.value)
        for m in llm.get_metrics()
    )  # fmt: skip


def served_metrics(port: int) -> dict[str, float]:
    """metric_totals of a server's /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return metric_totals(
        (s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
    )


def metrics_of(records: list[dict], drops: list[int]) -> dict[str, float]:
    """What the metrics must count for these pruned prompts (the worker's records), none of
    which fell back."""
    expected = {
        "fallbacks": 0,
        "pruned_requests": len(records),
        "pruned_prompt_tokens": sum(r["kept"][0] for r in records),
        "token_layers": sum(r["token_layers"] for r in records),
        "token_layers_saved": sum(r["saved"] for r in records),
        "kept_share_count": len(records),
    }
    for stage, layer in enumerate(drops, start=1):
        expected[f"kept_tokens@{layer}"] = sum(r["kept"][stage] for r in records)
    return expected


def metrics_added(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items()}
