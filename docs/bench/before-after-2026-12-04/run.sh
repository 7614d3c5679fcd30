#!/usr/bin/env bash
# Before / after the neighbour-search kernel and the bf16 key similarity (2026-12-04), same machine,
# alternating: OLD_SRC = src/ of a checkout of commit 0a913b4 (before), NEW_SRC = src/ of this
# repository (after). Produced the card.json files beside this script (AMD EPYC with AVX-512 BF16,
# no AMX; 1 thread, bf16, testbed, batch 1 and 8).
set -euo pipefail
OLD_SRC=${OLD_SRC:?set OLD_SRC to the src/ folder of a checkout of 0a913b4}
NEW_SRC=${NEW_SRC:-$(cd "$(dirname "$0")/../../../src" && pwd)}
for round in 1 2 3; do
  for ver in old new; do
    if [ "$ver" = old ]; then SRC=$OLD_SRC; else SRC=$NEW_SRC; fi
    OMP_NUM_THREADS=1 PYTHONPATH=$SRC python -c "from vlmprune.cli import app; app()" bench -M testbed -b 1 -b 8 \
      --dtype bf16 --no-memory --out "$(dirname "$0")/$ver-$round"
  done
done
