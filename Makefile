# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install everything on a fresh machine (CPU torch first, so pip does not
# pull a CUDA build), pinned by constraints.txt to the set .ci/run tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(CONSTRAINTS) $(TORCH)
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/vlmprune demo

test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest -q

# The equivalence tests on the floor and the newest transformers release of the declared range, each
# in a fresh venv (gating), and on a newer release when one exists (reported only); see README.
compat:
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) scripts/compat.py

# Every measured figure in README / docs, in the order they depend on each other (a few hours on
# 2 CPU cores; run on an otherwise idle machine -- speed figures are ratios within one process).
testbed: install
	$(BIN)/vlmprune testbed train --install

results: install
	$(BIN)/vlmprune testbed check --n 300 --blank-n 100 --out out/testbed-check
	$(BIN)/vlmprune tables vision --n 100 --out out/tables
	$(BIN)/vlmprune tables budgets --n 100 --out out/tables
	$(BIN)/vlmprune tables order --n 100 --out out/tables
	$(BIN)/vlmprune train atp --out runs/atp-144
	$(BIN)/vlmprune train atp --out runs/atp-88 --paper-target 88
	$(BIN)/vlmprune train atp --out runs/atp-144-fixed --fixed-ratio
	$(BIN)/vlmprune train atp --out runs/atp-144-noredundant --no-redundant
	$(BIN)/vlmprune train atp --out runs/atp-144-nospatial --no-spatial
	$(BIN)/vlmprune train atp --out runs/atp-144-self --score self
	$(BIN)/vlmprune train atp --out runs/atp-144-cross --score cross
	$(BIN)/vlmprune eval -m atp:checkpoint=runs/atp-144 -m atp:checkpoint=runs/atp-88 -m atp:checkpoint=runs/atp-144-fixed \
	  -m atp:checkpoint=runs/atp-144-noredundant -m atp:checkpoint=runs/atp-144-nospatial \
	  -m atp:checkpoint=runs/atp-144-self -m atp:checkpoint=runs/atp-144-cross --n 100 --out out/atp-table1
	$(BIN)/vlmprune train atp-viz runs/atp-144 --out out/atp-viz/144
	$(BIN)/vlmprune train atp-viz runs/atp-88 --out out/atp-viz/88
	OMP_NUM_THREADS=1 $(BIN)/python -m vlmprune.bench.reduction --out out/bench/reduction.json
	OMP_NUM_THREADS=2 $(BIN)/python -m vlmprune.bench.reduction --out out/bench/reduction-2threads.json
	OMP_NUM_THREADS=1 $(BIN)/python -m vlmprune.bench.decoder --out out/bench/decoder.json
	OMP_NUM_THREADS=1 $(BIN)/vlmprune bench -M scaled -b 1 --out out/bench
	OMP_NUM_THREADS=1 $(BIN)/vlmprune bench -M scaled -b 1 -m prumerge+:keep=144 -m prumerge:keep=144 --out out/bench/keep144
	OMP_NUM_THREADS=1 $(BIN)/vlmprune bench -M testbed -b 1 -b 8 --out out/bench/testbed
	OMP_NUM_THREADS=1 $(BIN)/vlmprune bench -M scaled -b 8 --out out/bench/scaled-b8

.PHONY: install demo test compat testbed results
