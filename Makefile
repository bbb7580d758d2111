# tunelens: `make report` runs the whole default pipeline, `make test` runs the tests.
# Both create .venv on first use (python3 -m venv + pip install -e '.[dev]').

VENV ?= .venv
PYTHON ?= python3
OUT ?= artifacts
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunelens-installed

.PHONY: report test test-fast bench venv clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

report: $(STAMP)
	@$(BIN)/tunelens run --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev,bench]'
	$(BIN)/python bench/similarity.py
	$(BIN)/python bench/attribution.py
	$(BIN)/python bench/scale.py

clean:
	rm -rf $(OUT)
