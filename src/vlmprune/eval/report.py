"""Result tables: Markdown and JSON files, and a rich table for the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .harness import EvalResult


def _families(results: Sequence[EvalResult]) -> list[str]:
    seen: list[str] = []
    for r in results:
        for f in r.families:
            if f.family not in seen:
                seen.append(f.family)
    return seen


def _cell(r: EvalResult, fam: str) -> str:
    for f in r.families:
        if f.family == fam:
            return f"{100 * f.accuracy:.1f} [{100 * f.ci_low:.0f}-{100 * f.ci_high:.0f}]"
    return "-"


def rows(results: Sequence[EvalResult]) -> tuple[list[str], list[list[str]]]:
    fams = _families(results)
    header = ["method", "tokens"] + [f"{f} (n={_n(results, f)})" for f in fams] + ["mean", "retention", "q/s"]
    body = []
    for r in results:
        body.append([r.label, f"{r.mean_visual_tokens:.1f}"] + [_cell(r, f) for f in fams] +
                    [f"{100 * r.mean_accuracy:.1f}", "-" if r.retention is None else f"{100 * r.retention:.1f}%",
                     f"{r.questions_per_s:.2f}"])
    return header, body


def _n(results: Sequence[EvalResult], fam: str) -> int:
    return max((f.n for r in results for f in r.families if f.family == fam), default=0)


def markdown(results: Sequence[EvalResult]) -> str:
    header, body = rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    note = ("\nAccuracy % per family with a 95% Wilson interval in brackets; mean = unweighted mean over "
            "families; tokens = mean visual tokens fed to the LLM (all-layer average for decoder-stage "
            "methods); retention = mean accuracy relative to the unpruned run; q/s = questions per second "
            "(this machine, this run).")
    return "\n".join(lines) + "\n" + note + "\n"


def print_table(results: Sequence[EvalResult], title: str = "ShapesVQA") -> None:
    from rich.console import Console
    from rich.table import Table

    header, body = rows(results)
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right" if h != "method" else "left")
    for row in body:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # pipes and logs: do not squeeze the table to 80 columns
        console = Console(width=240)
    console.print(table)


def write(results: Sequence[EvalResult], out_dir: str | Path, name: str = "results") -> tuple[Path, Path]:
    """Write ``{name}.md`` and ``{name}.json`` (with per-item predictions) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{name}.md"
    js = out / f"{name}.json"
    md.write_text(markdown(results))
    js.write_text(json.dumps([r.to_json() for r in results], indent=1))
    return md, js
