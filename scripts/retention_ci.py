"""Add the 95% retention interval to results files written before it was computed.

    python scripts/retention_ci.py docs/results/atp-v14/results.json ...
    python scripts/retention_ci.py docs/results/atp-v14-ablations/results.json --baseline docs/results/atp-v14/results.json

For every pruned row of each file: the paired-bootstrap interval of its retention
(``vlmprune.eval.harness.retention_interval``) against the file's unpruned row, or, for a file run
with ``--no-baseline``, against the unpruned row of ``--baseline`` (same model and questions,
checked by the weights sha256, the data block and the question ids); the retention itself is
filled in from that row when the file has none. The per-question records are already in each file,
so nothing is re-evaluated. The file's Markdown is written again, its header saying what was derived.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlmprune.eval.harness import retention_interval
from vlmprune.eval.report import load, write
from vlmprune.runinfo import now


def _unpruned(results):
    return next((r for r in results if r.method is None), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="results.json files")
    ap.add_argument("--baseline", type=Path, help="results.json holding the unpruned row, for files without one")
    args = ap.parse_args(argv)
    for f in args.files:
        if not f.is_file():
            sys.exit(f"error: {f} is not a file; pass results.json files written by vlmprune eval / tables")
    ref = None
    if args.baseline is not None:
        if not args.baseline.is_file():
            sys.exit(f"error: --baseline {args.baseline} is not a file")
        ref_run, ref_results = load(args.baseline)
        ref = _unpruned(ref_results)
        if ref is None:
            sys.exit(f"error: --baseline {args.baseline} has no unpruned row")
    for f in args.files:
        run, results = load(f)
        base, source = _unpruned(results), "its unpruned row"
        if base is None:
            if ref is None:
                sys.exit(f"error: {f} has no unpruned row; pass --baseline FILE")
            if (run["model"].get("weights_sha256") != ref_run["model"].get("weights_sha256")
                    or run.get("data") != ref_run.get("data")):
                sys.exit(f"error: {f} and --baseline {args.baseline} differ in model weights or data")
            base, source = ref, f"the unpruned row of {args.baseline}"
        filled = 0
        for r in results:
            if r is base:
                continue
            ci = retention_interval(r.items, base.items)
            if ci is None:
                sys.exit(f"error: {f}: row {r.label!r} does not share its questions with {source} "
                         "(or that baseline answers almost nothing); pass the matching --baseline")
            if r.retention is None:
                r.retention = r.mean_accuracy / base.mean_accuracy
            r.retention_ci = ci
            filled += 1
        run.setdefault("derived", []).append(
            f"retention and its 95% interval (paired bootstrap, 4000 draws, seed 0) against {source}, by "
            f"`python scripts/retention_ci.py` on {now()}")
        write(results, f.parent, f.stem, run)
        print(f"{f}: {filled} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
