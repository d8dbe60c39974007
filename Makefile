# Two commands matter: `make demo` (set up, then run the main job on an embedded default)
# and `make test` (set up, then run the tests). Both need only Python 3.11 and make.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rece demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_quantile.py --sizes 1e5,1e6
	$(BIN)/python bench/bench_synth.py
	$(BIN)/python bench/bench_ingest.py

clean:
	rm -rf $(VENV) demo-store demo-artifacts .pytest_cache
