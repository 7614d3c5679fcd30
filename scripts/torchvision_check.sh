#!/usr/bin/env bash
# The whole test suite in a second venv that has torchvision, as most users' installs do: there
# transformers' AutoProcessor picks the fast (torchvision) image processors and builds the video
# processors, which the main venv (torch 2.13.0 CPU, no torchvision) never exercises.
# torch + torchvision: the pair this machine kind keeps on disk for Python 3.11 by architecture
# (x86_64: torch 2.14.1 + torchvision 0.29.1; aarch64: torch 2.9.1 + torchvision 0.24.1); the
# other packages pinned by constraints.txt. Usage: scripts/torchvision_check.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-torchvision}"
py="${PY:-python3}"
case "$(uname -m)" in
  x86_64) pins=(torch==2.14.1 torchvision==0.29.1) ;;
  aarch64) pins=(torch==2.9.1 torchvision==0.24.1) ;;
  *) echo "torchvision-check: no known torch + torchvision pair for $(uname -m)" >&2; exit 2 ;;
esac
if [ ! -f "$venv/.installed" ]; then
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q "${pins[@]}"
  grep -v '^torch==' constraints.txt > "$venv/constraints-no-torch.txt"
  "$venv/bin/pip" install -q -c "$venv/constraints-no-torch.txt" -e ".[dev]"
  touch "$venv/.installed"
fi
"$venv/bin/python" -c "import torch, torchvision, transformers; print('torchvision-check: torch', torch.__version__, '+ torchvision', torchvision.__version__, '+ transformers', transformers.__version__)"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$venv/bin/python" -m pytest -q -p no:cacheprovider
