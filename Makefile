# Two entry points for a fresh clone: `make demo` and `make test` (both create .venv with pip).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lrpscale demo

test: $(STAMP)
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "could not install chromium: the report's browser test will skip"
	$(BIN)/python -m pytest -q

# the unit tests: no Ray, no end-to-end runs (under two minutes on 2 cores)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check lrpscale jobs tests benchmarks scripts
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/lrp_throughput.py

clean:
	rm -rf $(VENV) lrpscale-demo
