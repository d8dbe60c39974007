# Two commands matter: `make demo` (set up, then run the main job on an embedded default)
# and `make test` (set up, then run the tests). Both need only Python 3.11 and make.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-cluster bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rece demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not cluster"

# Multi-node Ray, `ray job submit` and fault tests (tests/test_cluster.py): real Ray processes, a few minutes.
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster

bench: $(STAMP)
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_quantile.py --sizes 1e5,1e6
	$(BIN)/python bench/bench_synth.py
	$(BIN)/python bench/bench_ingest.py

clean:
	rm -rf $(VENV) demo-store demo-artifacts .pytest_cache
