# Two commands matter: `make demo` (set up, then run the main job on an embedded default)
# and `make test` (set up, then run the tests). Both need only Python 3.11 and make.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-cluster bench lock clean

# constraints.txt pins every package to the versions the suites last passed with: a release
# upstream (moto 5.2.6 checks HEAD against a non-existent s3:HeadObject action) cannot break a
# fresh clone. `make lock` re-resolves from pyproject.toml alone; run both suites after it.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
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

lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet -e '.[test]'
	{ sed -n '1,2p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .lock-venv $(STAMP)

clean:
	rm -rf $(VENV) demo-store demo-artifacts .pytest_cache
