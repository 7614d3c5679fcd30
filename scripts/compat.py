"""Run the equivalence tests against the transformers releases at the edges of the declared range.

    python scripts/compat.py [--dir .venv-compat] [--versions 5.20.0 5.24.0] [--out out/compat.json]

For each release: a fresh venv (CPU torch from the Makefile's pin, then this package with that
transformers; the other packages from constraints.txt where they fit), then the equivalence tests.
Gating: the floor of ``transformers`` in pyproject.toml and the newest release inside the range.
Reported only: the newest release above the range, when one exists (if it passes, widen the range).
Exit status 1 when a gating release fails. Standard library only (runs before any venv exists).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENCE_TESTS = ["tests/test_compat.py", "tests/test_decoder.py", "tests/test_integration_vision.py",
                     "tests/test_atp_integration.py", "tests/test_sparsevlm.py"]


def _version_key(v: str) -> tuple:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:3])


def declared_range() -> tuple[str, str]:
    """(floor, exclusive upper bound) of transformers in pyproject.toml, e.g. ("5.20", "5.25")."""
    m = re.search(r'^\s*"(transformers[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M)
    spec = m.group(1) if m else None
    lo = re.search(r">=\s*([\d.]+)", spec or "")
    hi = re.search(r"<\s*([\d.]+)", spec or "")
    if not (lo and hi):
        sys.exit(f"compat: pyproject.toml must declare transformers as '>=FLOOR,<UPPER', got {spec!r}")
    return lo.group(1), hi.group(1)


def released_versions(python: str) -> list[str]:
    """Final releases of transformers on the package index, oldest first."""
    out = subprocess.run([python, "-m", "pip", "index", "versions", "transformers"], capture_output=True, text=True)
    m = re.search(r"Available versions:\s*(.+)", out.stdout)
    if out.returncode != 0 or not m:
        sys.exit(f"compat: cannot list transformers releases (pip index versions failed): {out.stderr.strip()[-300:]}")
    versions = [v.strip() for v in m.group(1).split(",") if re.fullmatch(r"\d+\.\d+\.\d+", v.strip())]
    return sorted(versions, key=_version_key)


def torch_pin() -> str:
    m = re.search(r"^TORCH \?= (\S+)", (ROOT / "Makefile").read_text(), re.M)
    return m.group(1) if m else "torch==2.13.0"


def constraints_without_transformers(dest: Path) -> Path:
    lines = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines()
             if not re.match(r"(transformers|huggingface[-_]hub|tokenizers|safetensors)==", ln)]
    dest.write_text("\n".join(lines) + "\n")
    return dest


def run(cmd: list[str], log, **kw) -> int:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, **kw).returncode


def check(version: str, base: Path, above_range: bool = False) -> dict:
    """Fresh venv with ``transformers==version``; returns the result row. A release above the
    declared range cannot be installed together with this package (its own bound excludes it), so
    there the package goes in first (with a release from the range) and the release over it."""
    venv = base / f"transformers-{version}"
    shutil.rmtree(venv, ignore_errors=True)
    base.mkdir(parents=True, exist_ok=True)
    log_path = base / f"transformers-{version}.log"
    start = time.monotonic()
    row = {"transformers": version, "log": str(log_path)}
    with open(log_path, "w") as log:
        py = str(venv / "bin" / "python")
        cons = constraints_without_transformers(base / "constraints-no-transformers.txt")
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [py, "-m", "pip", "install", "-q", torch_pin()],
                 [py, "-m", "pip", "install", "-q", "-c", str(cons), "-e", ".[dev]", f"transformers=={version}"]]
        if above_range:  # pip installs it over the package's bound, reporting the conflict (exit status 0)
            steps[-1:] = [[py, "-m", "pip", "install", "-q", "-c", str(cons), "-e", ".[dev]"],
                          [py, "-m", "pip", "install", "-q", "-c", str(cons), f"transformers=={version}"]]
        for cmd in steps:
            if run(cmd, log) != 0:
                row.update(status="install failed", seconds=round(time.monotonic() - start, 1))
                return row
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
        rc = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *EQUIVALENCE_TESTS], log, env=env)
    tail = log_path.read_text().strip().splitlines()[-1:] or [""]
    row.update(status="passed" if rc == 0 else "failed", summary=tail[0], seconds=round(time.monotonic() - start, 1))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=os.environ.get("COMPAT_DIR", ".venv-compat"), help="where the venvs go")
    ap.add_argument("--versions", nargs="*", help="check exactly these releases (all gating) instead")
    ap.add_argument("--out", default="out/compat.json", help="results file (JSON)")
    args = ap.parse_args()
    base = (ROOT / args.dir).resolve()

    floor, upper = declared_range()
    plan: list[tuple[str, str]] = []
    if args.versions:
        plan = [(v, "gating") for v in args.versions]
    else:
        released = released_versions(sys.executable)
        inside = [v for v in released if _version_key(floor) <= _version_key(v) < _version_key(upper)]
        above = [v for v in released if _version_key(v) >= _version_key(upper)]
        if not inside:
            sys.exit(f"compat: no transformers release in [{floor}, {upper})")
        plan = [(inside[0], "gating: floor"), (inside[-1], "gating: newest in range")]
        if above:
            plan.append((above[-1], "report only: newer than the range"))
        else:
            print(f"compat: no transformers release newer than the declared range (<{upper})", flush=True)
        plan = list(dict.fromkeys(plan))

    rows = []
    for version, role in plan:
        print(f"compat: transformers {version} ({role}) ...", flush=True)
        row = check(version, base, above_range=_version_key(version) >= _version_key(upper))
        row["role"] = role
        rows.append(row)
        print(f"compat: transformers {version}: {row['status']} {row.get('summary', '')} "
              f"[{row['seconds']} s; log {row['log']}]", flush=True)

    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"declared": f">={floor},<{upper}", "tests": EQUIVALENCE_TESTS, "results": rows,
                               "command": " ".join([Path(sys.executable).name, *sys.argv]),
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2))
    print(f"\n{'transformers':<14}{'role':<38}{'result':<16}summary")
    for r in rows:
        print(f"{r['transformers']:<14}{r['role']:<38}{r['status']:<16}{r.get('summary', '')}")
    for r in rows:
        if r["role"].startswith("report") and r["status"] == "passed":
            print(f"compat: {r['transformers']} passes: widen the range in pyproject.toml (and test it in full)")
    failed = [r for r in rows if r["role"].startswith("gating") and r["status"] != "passed"]
    if failed:
        print(f"compat: FAILED on {', '.join(r['transformers'] for r in failed)} (logs above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
