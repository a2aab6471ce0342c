"""Opt-in check of UniPrefill's vLLM ledger against a CUDA build of vLLM (not part of `make test`).

python3.11 tools/cuda_ledger_check.py VENV_DIR [--vllm VERSION] [--keep-pip-config]

Creates the virtual environment VENV_DIR (outside the repository; reused if it exists) and
installs there, from PyPI: `vllm==VERSION` (default: the supported one, version.py), the
`cuda` extra's other packages, pytest, and this project (editable, without its
dependencies, so that a vLLM needing another torch still installs and `pip check` names the
clash). Then it checks, and prints one line each:
  - torch: the installed torch is a CUDA build;
  - requirements: `pip check` finds none of the project's requirements broken;
  - imports: `uniprefill.plugin.register()` and every uniprefill.vllm_glue module import;
  - ledger: tests/unit/test_vllm_coupling.py passes.
Exits 1 if any check fails. Expect about 4.5 GB of downloads and 9 GB on disk (vLLM 0.32.0 and
0.33.0 measured). Needs no GPU; no NVIDIA driver is needed either, except by the one test that
builds an engine config (vLLM's CUDA platform loads libcuda.so.1): without a driver it is
deselected and the summary says so.

Why:
- pip runs without the machine's pip configuration and PIP_FIND_LINKS / PIP_CONSTRAINT
  (--keep-pip-config keeps them): a local `torch-X+cpu` wheel outranks PyPI's CUDA `torch-X`.
- For a VERSION other than the supported one, UNIPREFILL_SKIP_VLLM_VERSION_CHECK=1 is set in the
  checks' processes (version.py refuses it otherwise).
- HUMMING_DISABLE_PARALLEL_BUILD=1: vLLM's humming-kernels starts two background JIT builds when
  imported, which tests/conftest.py's no-leftover-process guard reports as an error.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEDGER_TEST = "tests/unit/test_vllm_coupling.py"
NEEDS_DRIVER = f"{LEDGER_TEST}::test_engine_config_has_the_attributes_used"
LEFT_OUT = ("vllm",)  # of the cuda extra: vllm is pinned by --vllm
IMPORTS = """
import importlib, torch, vllm, uniprefill.plugin
uniprefill.plugin.register()
for name in ("coupling", "patches", "runner_patches", "pruner", "hooks", "metrics",
             "engine_args", "request_checks", "stage_metadata", "request_state", "worker"):
    importlib.import_module("uniprefill.vllm_glue." + name)
import uniprefill.scheduler_patches.scheduler
print(f"vllm {vllm.__version__}, torch {torch.__version__}")
"""


def supported_vllm() -> str:
    text = (ROOT / "uniprefill" / "vllm_glue" / "version.py").read_text()
    return re.search(r'^SUPPORTED_VLLM = "([^"]+)"', text, re.MULTILINE).group(1)


def requirements(vllm: str) -> list[str]:
    """vllm==VERSION, the cuda extra less LEFT_OUT, and the test extra's pytest."""
    with open(ROOT / "pyproject.toml", "rb") as file:
        extras = tomllib.load(file)["project"]["optional-dependencies"]
    name = re.compile(r"^[A-Za-z0-9._-]+")
    cuda = [r for r in extras["cuda"] if name.match(r).group(0) not in LEFT_OUT]
    pytest = [r for r in extras["test"] if name.match(r).group(0) == "pytest"]
    return [f"vllm=={vllm}", *cuda, *pytest]


def has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def run(command: list[str], log: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        return subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def ledger_failures(junit: Path) -> tuple[int, list[str]]:
    """(tests passed, 'name: message' of each failure or error) from pytest's JUnit XML."""
    passed, failures = 0, []
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = [e for e in case if e.tag in ("failure", "error")]
        if bad:
            message = (bad[0].get("message") or "").splitlines()[:1]
            failures.append(f"{case.get('name')} [{bad[0].tag}]: {''.join(message)[:300]}")
        elif case.find("skipped") is None:
            passed += 1
    return passed, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path, help="virtual environment to create or reuse")
    parser.add_argument("--vllm", default=supported_vllm(), help="vLLM version from PyPI")
    parser.add_argument("--keep-pip-config", action="store_true")
    args = parser.parse_args()
    venv = args.venv.resolve()
    if venv == ROOT or ROOT in venv.parents:
        parser.error("put VENV_DIR outside the repository (it holds about 9 GB)")
    python, log = venv / "bin" / "python", venv / "cuda-ledger-check.log"

    pip_env = dict(os.environ)
    if not args.keep_pip_config:
        pip_env["PIP_CONFIG_FILE"] = os.devnull
        for name in ("PIP_FIND_LINKS", "PIP_CONSTRAINT"):
            pip_env.pop(name, None)
    check_env = dict(os.environ, HUMMING_DISABLE_PARALLEL_BUILD="1", PYTHONDONTWRITEBYTECODE="1")
    check_env["UNIPREFILL_CACHE"] = str(venv / "uniprefill-cache")
    if args.vllm != supported_vllm():
        check_env["UNIPREFILL_SKIP_VLLM_VERSION_CHECK"] = "1"

    results: list[tuple[str, bool, str]] = []
    started = time.monotonic()
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    installed = (
        run([*pip, *requirements(args.vllm)], log, pip_env).returncode == 0
        and run([*pip, "--no-deps", "-e", str(ROOT)], log, pip_env).returncode == 0
    )
    results.append(("install", installed, f"{time.monotonic() - started:.0f} s, log {log}"))
    if not installed:
        return report(args.vllm, results)

    torch = subprocess.run(
        [str(python), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
        capture_output=True,
        text=True,
    ).stdout.split()
    cuda_build = len(torch) == 2 and torch[1] != "None"
    results.append(("torch", cuda_build, " ".join(torch) or "does not import"))

    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
    broken = [line for line in check.stdout.splitlines() if line.startswith("uniprefill ")]
    results.append(("requirements", not broken, "; ".join(broken) or "satisfied"))

    imports = subprocess.run(
        [str(python), "-c", IMPORTS], env=check_env, capture_output=True, text=True
    )
    lines = (imports.stdout if imports.returncode == 0 else imports.stderr).strip().splitlines()
    results.append(("imports", imports.returncode == 0, lines[-1] if lines else ""))

    junit = venv / "cuda-ledger-junit.xml"
    deselect = [] if has_driver() else ["--deselect", NEEDS_DRIVER]
    pytest = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    run([*pytest, *deselect, LEDGER_TEST], log, check_env)
    passed, failures = ledger_failures(junit) if junit.exists() else (0, ["pytest did not run"])
    detail = f"{passed} passed, {len(failures)} failed"
    if deselect:
        detail += f"; not run without an NVIDIA driver: {NEEDS_DRIVER.rsplit('::', 1)[1]}"
    results.append(("ledger", not failures, "\n    ".join([detail, *failures])))
    return report(args.vllm, results)


def report(vllm: str, results: list[tuple[str, bool, str]]) -> int:
    print(f"UniPrefill ledger against the CUDA build of vLLM {vllm}:")
    for name, ok, detail in results:
        print(f"  {'PASS' if ok else 'FAIL'} {name}: {detail}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
