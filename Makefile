# mcp-authz: `make run` starts the demo stack, `make test` runs every test.
# Both create the virtualenv and install pinned dependencies (Envoy included) on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv run test protos clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $@

venv: $(STAMP)

run: venv
	$(BIN)/python examples/run_demo.py

# Strict type checking of the package first (pyproject.toml [tool.mypy]), then every test. The console's browser
# tests drive Debian's chromium (with an emoji font for its status indicators), installed when missing.
test: venv
	@[ -x /usr/bin/chromium ] && [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO apt-get install -y chromium fonts-noto-color-emoji; }
	$(BIN)/mypy
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The admin API's Python stubs and Envoy's inline descriptor set (envoy/*.yaml), from protos/ (checked in; a test
# regenerates them into a temporary directory and fails if they differ).
protos: venv
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) .run .pytest_cache

# Benchmarks (issue 5): `make bench` (~12 min) or `BENCH_QUICK=1 make bench` (~3 min); writes
# benchmarks/RESULTS.md. Needs wrk and h2load (Debian: wrk, nghttp2-client), installed when missing.
.PHONY: bench
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	@touch $@

bench: $(BENCH_STAMP)
	@command -v wrk >/dev/null && command -v h2load >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO apt-get install -y wrk nghttp2-client; }
	$(BIN)/python -m benchmarks.run $(if $(filter-out 0,$(BENCH_QUICK)),--quick)
