# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install everything on a fresh machine (CPU torch first, so pip does not
# pull a CUDA build).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/vlmprune demo

test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest -q

# Every measured figure in README / docs, in the order they depend on each other (a few hours on
# 2 CPU cores; run on an otherwise idle machine -- speed figures are ratios within one process).
testbed: install
	$(BIN)/vlmprune testbed train --install

results: install
	$(BIN)/vlmprune testbed check --n 300 --blank-n 100 --out out/testbed-check
	$(BIN)/vlmprune tables vision --n 100 --out out/tables
	$(BIN)/vlmprune tables budgets --n 100 --out out/tables
	$(BIN)/vlmprune train atp --out runs/atp-144
	$(BIN)/vlmprune train atp --out runs/atp-88 --paper-target 88
	$(BIN)/vlmprune eval -m atp:checkpoint=runs/atp-144 -m atp:checkpoint=runs/atp-88 --n 100 --out out/atp
	OMP_NUM_THREADS=1 $(BIN)/python -m vlmprune.bench.reduction --out out/bench/reduction.json
	OMP_NUM_THREADS=1 $(BIN)/python -m vlmprune.bench.decoder --out out/bench/decoder.json
	OMP_NUM_THREADS=1 $(BIN)/vlmprune bench -M scaled -b 1 --out out/bench

.PHONY: install demo test testbed results
