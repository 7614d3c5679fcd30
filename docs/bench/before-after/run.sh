#!/usr/bin/env bash
# Before / after the overhead work of issue 21, same machine, same conditions, alternating:
# OLD_SRC = src/ of a checkout of commit b3d5abc (before), NEW_SRC = src/ of this repository (after).
# Produced the four card.json files beside this script (Intel Xeon with AMX, 1 thread, bf16).
set -euo pipefail
OLD_SRC=${OLD_SRC:?set OLD_SRC to the src/ folder of a checkout of b3d5abc}
NEW_SRC=${NEW_SRC:-$(cd "$(dirname "$0")/../../../../src" && pwd)}
for round in 1 2; do
  for ver in old new; do
    if [ "$ver" = old ]; then SRC=$OLD_SRC; else SRC=$NEW_SRC; fi
    OMP_NUM_THREADS=1 PYTHONPATH=$SRC python -c "from vlmprune.cli import app; app()" bench -M testbed -b 1 -b 8 \
      --dtype bf16 --no-memory --out "$(dirname "$0")/$ver-$round"
  done
done
