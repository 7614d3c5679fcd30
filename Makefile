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

# The whole suite again in a venv with torchvision (fast image processors, video processors),
# torch and torchvision from the machine's wheels; see scripts/torchvision_check.sh.
torchvision-check:
	PY=$(PY) scripts/torchvision_check.sh

# Every measured figure in README / docs, in the order they depend on each other (a few hours on
# 2 CPU cores; run on an otherwise idle machine -- speed figures are ratios within one process).
testbed: install
	$(BIN)/vlmprune testbed train --install

ATP_EVAL = -m atp:checkpoint=testbed-144 -m atp:checkpoint=testbed-88 \
  -m fastv:k=1,budget=178.8 -m fastv:k=1,budget=127.3 -m prumerge+:keep=179 -m prumerge+:keep=127 \
  -m sparsevlm:budget=128 -m sparsevlm:budget=64

# The results files in docs/results/ (the committed testbed v14, its benchmarks included) and docs/bench/ (random-weight models), in the
# order they depend on each other. Wall time on 2 cores, one job at a time (measured step by step):
# ATP training ~20 min per checkpoint (7: two targets, five ablations), evaluations ~10-15 min per
# command (~2 h in all), the three v14 tables ~1 h 40 min, LoRA 2 x ~4 min of training, benchmarks
# ~45 min: about 6 hours.
ATP_ABLATIONS = fixed:--fixed-ratio noredundant:--no-redundant nospatial:--no-spatial self:--score=self cross:--score=cross

results: install
	$(BIN)/vlmprune train atp --out runs/atp-144
	$(BIN)/vlmprune train atp --out runs/atp-88 --paper-target 88
	for t in 144 88; do mkdir -p src/vlmprune/data/atp/testbed-$$t && \
	  cp runs/atp-$$t/atp_config.json runs/atp-$$t/atp_weights.safetensors src/vlmprune/data/atp/testbed-$$t/; done
	$(BIN)/vlmprune eval $(ATP_EVAL) --n 100 --overwrite --out docs/results/atp-v14
	$(BIN)/vlmprune eval -m fastv:k=1,budget=166.5 -m fastv:k=1,budget=137.9 -m prumerge+:keep=166 -m prumerge+:keep=138 \
	  --n 100 --overwrite --out docs/results/atp-v14-matched
	$(BIN)/vlmprune eval -m "sparsevlm:schedule=[244,88,29]" -m "sparsevlm:schedule=[144,52,17]" --no-baseline --n 100 \
	  --overwrite --out docs/results/atp-v14-matched-sparsevlm
	$(BIN)/vlmprune eval -m atp:checkpoint=testbed-144,positions=compact -m atp:checkpoint=testbed-88,positions=compact \
	  --n 100 --overwrite --out docs/results/atp-v14-positions
	for a in $(ATP_ABLATIONS); do $(BIN)/vlmprune train atp --out runs/atp-144-$${a%%:*} $${a#*:}; done
	$(BIN)/vlmprune eval $(foreach a,$(ATP_ABLATIONS),-m atp:checkpoint=runs/atp-144-$(firstword $(subst :, ,$(a)))) \
	  --no-baseline --n 100 --overwrite --out docs/results/atp-v14-ablations
	$(BIN)/python scripts/retention_ci.py docs/results/atp-v14-ablations/results.json \
	  docs/results/atp-v14-matched-sparsevlm/results.json --baseline docs/results/atp-v14/results.json
	OMP_NUM_THREADS=1 $(BIN)/vlmprune train lora --method prumerge --out runs/lora-prumerge --steps 48 --warmup 4 --lr 1e-3
	OMP_NUM_THREADS=1 $(BIN)/vlmprune train lora --method prumerge+ --out runs/lora-prumerge+ --steps 48 --warmup 4 --lr 1e-3
	OMP_NUM_THREADS=1 $(BIN)/vlmprune eval -m prumerge:lora=runs/lora-prumerge -m prumerge+:lora=runs/lora-prumerge+ \
	  -m prumerge -m prumerge+ --n 100 --overwrite --out docs/results/lora-v14
	OMP_NUM_THREADS=1 $(BIN)/vlmprune train lora --method sequential:keep=1.0 --out runs/lora-none --steps 48 --warmup 4 --lr 1e-3
	OMP_NUM_THREADS=1 $(BIN)/vlmprune eval -m "sequential:keep=1.0,lora=runs/lora-none" --no-baseline --n 100 --overwrite \
	  --out docs/results/lora-v14-control
	$(BIN)/python scripts/retention_ci.py docs/results/lora-v14-control/results.json --baseline docs/results/atp-v14/results.json
	for t in vision budgets order; do OMP_NUM_THREADS=1 $(BIN)/vlmprune tables $$t --n 100 --overwrite \
	  --out docs/results/tables-v14 || exit 1; done
	OMP_NUM_THREADS=1 $(BIN)/python scripts/why_losses.py --n 50 --out docs/results/why-v14
	OMP_NUM_THREADS=1 $(BIN)/vlmprune bench -M testbed -b 1 -b 8 --no-memory --overwrite --out docs/results/bench/testbed
	OMP_NUM_THREADS=1 $(BIN)/vlmprune bench -M testbed -b 8 -m atp:checkpoint=testbed-144 -m atp:checkpoint=testbed-88 \
	  -m fastv:k=1,budget=166.5 -m fastv:k=1,budget=137.9 -m prumerge+:keep=166 -m sparsevlm:budget=128 --no-memory \
	  --repeats 9 --overwrite --out docs/results/bench/testbed-v14-summary
	OMP_NUM_THREADS=1 $(BIN)/vlmprune bench -M scaled -b 1 -b 8 -m prumerge+ -m prumerge+:keep=144 -m fastv --no-memory \
	  --overwrite --out docs/bench/scaled
	for f in scaled-llava-next scaled-qwen2-vl scaled-qwen2.5-vl scaled-video-llava scaled-llava-onevision; do OMP_NUM_THREADS=1 $(BIN)/vlmprune bench -M $$f -b 1 -b 8 -m prumerge+ \
	  -m prumerge+:keep=0.25 -m fastv --dtype fp32 --no-memory --repeats 5 --new-tokens 4 --overwrite \
	  --out docs/bench/$$f || exit 1; done
	OMP_NUM_THREADS=1 $(BIN)/python scripts/gemm_scaling.py --out docs/bench/gemm_scaling.json

# The figures of docs/results.md's earlier tables and docs/atp.md (measured on testbed v11 / v4; not yet
# re-run on v14), written to out/ and runs/.
results-earlier: install
	$(BIN)/vlmprune testbed check --n 300 --blank-n 100 --out out/testbed-check
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

.PHONY: install demo test compat torchvision-check testbed results results-earlier
