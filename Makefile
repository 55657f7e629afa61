# Set-up and everyday targets. `make run` and `make test` are the two commands the README starts with.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.toml
# On a machine with no NVIDIA driver, install the CPU build of torch first so that the plain `torch`
# requirement is already satisfied and pip does not pull several GB of CUDA packages.
TORCH_VERSION ?= 2.13.0

.PHONY: venv run test test-all reliability bench lint clean

$(BIN)/embedtune: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "GPU found: installing torch with CUDA"; $(BIN)/pip install -q torch; \
	else \
	  echo "no GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(BIN)/pip install -q torch==$(TORCH_VERSION) || \
	  $(BIN)/pip install -q torch==$(TORCH_VERSION) --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/embedtune

run: venv
	$(BIN)/embedtune --config $(CONFIG) run

# CI runs this through .ci/run: lint first (ruff check and ruff format --check), then the suite.
test: venv lint
	$(BIN)/python -m pytest -q

test-all: venv
	$(BIN)/python -m pytest -q -m ''

# All reliability campaigns; EMBEDTUNE_CAMPAIGN=full runs the full-size ones as well.
reliability: venv
	$(BIN)/python -m pytest -q -s -m '' tests/reliability

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
