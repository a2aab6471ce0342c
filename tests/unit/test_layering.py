"""The core package imports no vLLM; the version gate names the one supported release."""

import subprocess
import sys

import pytest

from uniprefill.vllm_glue.version import SUPPORTED_VLLM, check_vllm_version


def test_core_modules_import_without_vllm():
    code = (
        "import sys, uniprefill, uniprefill.config, uniprefill.families, uniprefill.models, "
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
