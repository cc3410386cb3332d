# streamconv: `make demo` and `make test` work on a fresh clone (they create .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: install demo test fuzz lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/streamconv synth $(DEMO_DIR)/inner
	$(BIN)/streamconv convert $(DEMO_DIR)/inner $(DEMO_DIR)/outer
	$(BIN)/streamconv verify $(DEMO_DIR)/inner $(DEMO_DIR)/outer
	@echo "demo: inner checkpoint in $(DEMO_DIR)/inner, converted outer checkpoint in $(DEMO_DIR)/outer"

test: $(STAMP)
	$(BIN)/python -m pytest -q

fuzz: $(STAMP)
	STREAMCONV_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest -q -m fuzz

lint: $(STAMP)
	$(BIN)/ruff check streamconv tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(DEMO_DIR) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
