# tunelens: `make report` runs the whole default pipeline, `make test` runs the tests.
# Both create .venv on first use (python3 -m venv + pip install -e '.[dev]').
# `make report-text` installs the text extra and runs the text preset (MiniLM) into artifacts-text.

VENV ?= .venv
PYTHON ?= python3
OUT ?= artifacts
OUT_TEXT ?= artifacts-text
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunelens-installed

.PHONY: report report-text test test-fast bench venv clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

report: $(STAMP)
	@$(BIN)/tunelens run --out $(OUT)

report-text: $(STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev,text]'
	@$(BIN)/tunelens run --preset text --out $(OUT_TEXT)

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
	rm -rf $(OUT) $(OUT_TEXT)
