# Two commands set everything up: `make demo` and `make test` create .venv and install pinned
# dependencies on first use (a stamp file skips the install on later runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: demo test test-all bench lint format clean browser-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[humaneval,dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cgrpo demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m '' $(ARGS)

bench: $(STAMP)
	$(BIN)/cgrpo bench $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Debian's Chromium for the human-evaluation browser test (skipped with a reason when it is missing).
browser-deps:
	@command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
