"""Result tables: Markdown and JSON files, and a rich table for the terminal."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

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
                    [f"{100 * r.mean_accuracy:.1f}", _retention(r), f"{r.questions_per_s:.2f}"])
    return header, body


def _retention(r: EvalResult) -> str:
    if r.retention is None:
        return "-"
    if not r.retention_ci:  # e.g. the unpruned row, or no baseline to compare with
        return f"{100 * r.retention:.1f}%"
    lo, hi = r.retention_ci
    return f"{100 * r.retention:.1f}% [{100 * lo:.1f}-{100 * hi:.1f}]"


def _n(results: Sequence[EvalResult], fam: str) -> int:
    return max((f.n for r in results for f in r.families if f.family == fam), default=0)


def markdown(results: Sequence[EvalResult]) -> str:
    header, body = rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    note = ("\nAccuracy % per family with a 95% Wilson interval in brackets; mean = unweighted mean over "
            "families; tokens = mean visual tokens fed to the LLM (all-layer average for decoder-stage "
            "methods); retention = mean accuracy relative to the unpruned run, with a 95% paired-bootstrap "
            "interval over the questions; q/s = questions per second "
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


def header(run: dict[str, Any]) -> str:
    """The Markdown header of a results file: what produced it (see ``vlmprune.runinfo``)."""
    m, d, g = run.get("model") or {}, run.get("data") or {}, run.get("generation") or {}
    if d.get("source") == "jsonl":
        data = f"{d['file']} (sha256 {d['sha256'][:16]}..., {d['records']} records)"
    elif d:
        data = (f"ShapesVQA {d['split']}, families {','.join(d['families'])}, n={d['n']} per family"
                + (", blank images" if d.get("blank") else ""))
    else:
        data = "-"
    sha = m.get("weights_sha256")
    methods = "; ".join(f"{e['label']}: " + (", ".join(f"{k}={v}" for k, v in e["resolved"].items()) or "-")
                        for e in run.get("methods", []) if e["method"] is not None) or "-"
    v = run.get("versions", {})
    lines = [f"- command: `{run['command']}`",
             f"- status: {run['status']}; started {run['started']}, finished {run.get('finished') or '-'}",
             f"- model: {m.get('path', '-')} (weights sha256 {sha[:16] + '...' if sha else 'unknown'})",
             f"- data: {data}",
             f"- generation: " + ", ".join(f"{k}={g[k]}" for k in sorted(g) if k != "prompt_template"),
             f"- methods (resolved options): {methods}",
             f"- versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]),
             f"- machine: {run['machine']['cpu_model']}, {run['machine']['cores_logical']} logical cores"]
    lines += [f"- derived later: {d}" for d in run.get("derived", [])]
    return "\n".join(lines) + "\n\n"


def load(path: str | Path) -> tuple[dict[str, Any], list[EvalResult]]:
    """A ``results.json`` written by ``write`` -> (its run block, its results)."""
    from .harness import FamilyScore, ItemResult

    payload = json.loads(Path(path).read_text())
    results = []
    for d in payload["results"]:
        d = dict(d)
        d["families"] = [FamilyScore(**f) for f in d["families"]]
        d["items"] = [ItemResult(**i) for i in d.get("items", [])]
        results.append(EvalResult(**d))
    return payload["run"], results


def write(results: Sequence[EvalResult], out_dir: str | Path, name: str = "results",
          run: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``{name}.md`` and ``{name}.json`` (with per-item predictions) under ``out_dir``.

    The JSON is ``{"schema", "run", "results": [EvalResult.to_json()]}`` (``vlmprune.runinfo``);
    ``run`` (None: a minimal block for this process) heads the Markdown too. Each file is written
    to a temporary name and renamed, so a reader never sees half a file.
    """
    from ..runinfo import RESULTS_SCHEMA, new_run

    run = run if run is not None else {**new_run(name), "status": "complete"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{name}.md"
    js = out / f"{name}.json"
    payload = {"schema": RESULTS_SCHEMA, "run": run, "results": [r.to_json() for r in results]}
    for path, text in ((md, header(run) + markdown(results)), (js, json.dumps(payload, indent=1))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return md, js


def run_folder(out: str | Path, name: str, overwrite: bool = False) -> tuple[Path, str | None]:
    """The folder a run writes ``{name}.md/json`` to, checked before any work: ``out`` itself when it
    holds no such files yet (or ``overwrite``), else the first free ``OUT-2``, ``OUT-3``, ...;
    -> (folder, a note for the user or None). ``ValueError`` when ``out`` is a file or not writable."""
    out = Path(out)

    def taken(p: Path) -> bool:
        if p.exists() and not p.is_dir():
            raise ValueError(f"--out {p} is a file, not a folder; pass a folder path")
        return p.is_dir() and any((p / f"{name}{ext}").exists() for ext in (".json", ".md"))

    folder = out
    if taken(out) and not overwrite:
        k = 2
        while taken(folder := out.with_name(f"{out.name}-{k}")):
            k += 1
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{name}.write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to {folder}: {e.strerror or e}; pass another --out") from None
    note = None if folder == out else (f"{out} already holds {name}.json; writing this run to {folder} "
                                       "(pass --overwrite to replace the old results)")
    return folder, note


class RunWriter:
    """Writes ``{name}.md/json`` again after every finished method, with the run's status, so that
    finished work survives an interrupt or a later failure."""

    def __init__(self, folder: Path, name: str, run: dict[str, Any]) -> None:
        self.folder, self.name, self.run = Path(folder), name, run
        self.results: list[EvalResult] = []
        self.paths: tuple[Path, Path] | None = None

    def add(self, result: EvalResult, entry: dict[str, Any]) -> None:
        self.results.append(result)
        self.run["methods"].append(entry)
        self.write()

    def write(self, status: str | None = None) -> tuple[Path, Path]:
        from ..runinfo import now

        if status is not None:
            self.run["status"], self.run["finished"] = status, now()
        self.paths = write(self.results, self.folder, self.name, self.run)
        return self.paths
