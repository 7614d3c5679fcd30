"""Run the support-matrix suite (tests/test_matrix.py) and write what it measured.

    python scripts/support_matrix.py            # writes docs/support-matrix.md and the README's matrix block
    python scripts/support_matrix.py --check    # exits 1 if the README's block differs from this run's

Every cell of the README's method x family table is the outcome of that cell's tests: "yes" when
each guarantee the method has passed (keep-all == stock logits, ragged batch == single samples,
cached == uncached generation, remove() restores the stock model with sdpa on), "refused" when
the family's adapter refuses the method (the test checks the one-line error), "FAIL" otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- support-matrix:begin (scripts/support_matrix.py) -->", "<!-- support-matrix:end -->"
GUARANTEE_NAMES = {"keep_all": "keep-all", "batch": "batch", "cache": "cache", "remove": "remove"}
#: what a family column's suffix means (tests/test_matrix.py's FAMILIES)
COLUMN_KINDS = {"+multi": "samples holding 2, 1 and 3 images, batched",
                "+video": "the family's video inputs, batched with images"}


class Collect:
    """pytest plugin: outcome of every ``test_cell[family|method|guarantee]``."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str, str], tuple[str, str]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        rep = outcome.get_result()
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "family" not in params or rep.when not in ("setup", "call"):
            return
        key = (params["family"], params["method"], params["guarantee"])
        if rep.skipped:
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            self.cells[key] = ("refused", reason.removeprefix("Skipped: ").removeprefix("refused: "))
        elif rep.failed:
            self.cells[key] = ("fail", rep.nodeid)
        elif rep.when == "call":
            self.cells[key] = ("pass", "")


def run_suite(extra: list[str]) -> tuple[Collect, int]:
    plugin = Collect()
    code = pytest.main([str(ROOT / "tests" / "test_matrix.py"), "-q", "-p", "no:cacheprovider", *extra],
                       plugins=[plugin])
    return plugin, int(code)


def render(cells: dict, families: list[str], methods: list[str], na: dict) -> tuple[str, str]:
    """(README block, docs page) from the collected cells."""
    by_cell = defaultdict(dict)
    for (fam, meth, g), v in cells.items():
        by_cell[(fam, meth)][g] = v
    refusals: dict[str, str] = {}
    rows = ["| method | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for meth in methods:
        out = []
        for fam in families:
            got = by_cell.get((fam, meth), {})
            states = {s for s, _ in got.values()}
            if not got:
                out.append("not run")
            elif "fail" in states:
                out.append("**FAIL** (" + ", ".join(GUARANTEE_NAMES[g] for g, (s, _) in sorted(got.items())
                                                    if s == "fail") + ")")
            elif states == {"refused"}:
                reason = next(r for _, r in got.values())
                mark = refusals.setdefault(reason, f"r{len(refusals) + 1}")
                out.append(f"refused ({mark})")
            else:
                out.append("yes")
        rows.append(f"| `{meth}` | " + " | ".join(out) + " |")
    notes = ["yes: every guarantee passed (keep-all == stock logits, ragged batch == single samples, "
             "cached == uncached generate, remove() restores with sdpa on)"]
    kinds = [(suffix, what) for suffix, what in COLUMN_KINDS.items() if any(f.endswith(suffix) for f in families)]
    if kinds:
        notes.append("; ".join(f"`{suffix}`: {what}" for suffix, what in kinds))
    notes += [f"{mark}: {reason}" for reason, mark in refusals.items()]
    notes += [f"`{m}` has no {GUARANTEE_NAMES[g]} cell: {why}" for (m, g), why in na.items()]
    block = "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    page = ("# Support matrix\n\nEvery method on every model family, each cell the outcome of "
            "`tests/test_matrix.py` on a tiny random model of the family (written by "
            "`python scripts/support_matrix.py`). Guarantees: keep-all == stock logits; a ragged batch == "
            "single-sample runs (tokens, logits, visual counts); cached == uncached `generate()`; `remove()` "
            "restores the stock model, sdpa stays on.\n\n" + block + "\n## Every cell\n\n| family | method | "
            "guarantee | outcome |\n|---|---|---|---|\n"
            + "\n".join(f"| {f} | `{m}` | {GUARANTEE_NAMES[g]} | {s}{' (' + r + ')' if r and s != 'refused' else ''} |"
                        for (f, m, g), (s, r) in sorted(cells.items())) + "\n")
    return block, page


def replace_block(text: str, block: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block; add the two marker lines where the matrix goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + block + END + tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if README's block is stale")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw cells here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import test_matrix as tm

    plugin, code = run_suite([])
    block, page = render(plugin.cells, list(tm.FAMILIES), list(tm.METHODS), tm.NOT_APPLICABLE)
    readme = ROOT / "README.md"
    new = replace_block(readme.read_text(), block)
    if args.json:
        args.json.write_text(json.dumps({"|".join(k): v for k, v in plugin.cells.items()}, indent=1))
    if args.check:
        if new != readme.read_text():
            print("README.md's support matrix differs from this run; run python scripts/support_matrix.py")
            return 1
        return code
    readme.write_text(new)
    (ROOT / "docs" / "support-matrix.md").write_text(page)
    print(f"wrote README.md's matrix and docs/support-matrix.md (pytest exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
