"""The retention interval (paired bootstrap over the questions) and its backfill script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vlmprune.eval.harness import ItemResult, retention_interval, summarize
from vlmprune.eval.report import load, markdown, write

ROOT = Path(__file__).resolve().parents[1]


def _items(pattern: dict[str, list[int]]) -> list[ItemResult]:
    return [ItemResult(id=f"{fam}-{i}", family=fam, answer="a", prediction="a" if c else "b", correct=bool(c),
                       visual_tokens=1.0) for fam, cs in pattern.items() for i, c in enumerate(cs)]


def test_identical_runs_have_a_point_interval():
    base = _items({"x": [1, 0, 1, 1], "y": [1, 1, 0, 1]})
    assert retention_interval(base, base) == [1.0, 1.0]


def test_interval_brackets_the_retention_and_is_paired():
    base = _items({"x": [1] * 20, "y": [1] * 10 + [0] * 10})
    # the method loses exactly the first 5 questions of x: in every draw it is below the baseline
    meth = _items({"x": [0] * 5 + [1] * 15, "y": [1] * 10 + [0] * 10})
    lo, hi = retention_interval(meth, base)
    ret = ((15 / 20 + 10 / 20) / 2) / ((20 / 20 + 10 / 20) / 2)  # 0.8333
    assert lo <= ret <= hi and hi <= 1.0 and lo > 0.6
    assert retention_interval(meth, base, seed=1) != [lo, hi]  # a different draw, same data


def test_runs_on_different_questions_have_no_interval():
    base = _items({"x": [1, 1]})
    other = [ItemResult(id="z", family="x", answer="a", prediction="a", correct=True, visual_tokens=1.0)] * 2
    assert retention_interval(other, base) is None


def test_summarize_and_markdown_show_the_interval(tmp_path):
    base = summarize("unpruned", None, {}, _items({"x": [1, 1, 0, 1]}), 1.0)
    base.retention = 1.0
    meth = summarize("m", "random", {"keep": 1}, _items({"x": [1, 0, 0, 1]}), 1.0, baseline=base)
    assert meth.retention == 2 / 3 and meth.retention_ci is not None
    text = markdown([base, meth])
    assert f"66.7% [{100 * meth.retention_ci[0]:.1f}-{100 * meth.retention_ci[1]:.1f}]" in text
    assert "| unpruned |" in text and "100.0% |" in text


def test_backfill_script_fills_a_file_without_intervals(tmp_path):
    base = summarize("unpruned", None, {}, _items({"x": [1, 1, 0, 1], "y": [1, 0]}), 1.0)
    base.retention = 1.0
    meth = summarize("m", "random", {"keep": 1}, _items({"x": [1, 0, 0, 1], "y": [1, 1]}), 1.0, baseline=base)
    meth.retention_ci = None  # as files written before the interval existed
    run = {"command": "vlmprune eval ...", "status": "complete", "started": "t0", "finished": "t1",
           "model": {"path": "m", "weights_sha256": "ab" * 32}, "data": {"split": "test", "families": ["x", "y"],
           "n": 4}, "generation": {}, "methods": [], "versions": {}, "machine": {"cpu_model": "c", "cores_logical": 2}}
    write([base, meth], tmp_path, "results", run)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "retention_ci.py"), str(tmp_path / "results.json")],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr
    run2, results = load(tmp_path / "results.json")
    assert results[1].retention_ci == retention_interval(meth.items, base.items)
    assert len(run2["derived"]) == 1 and "retention_ci.py" in run2["derived"][0]
    assert "derived later:" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["results"][1]["items"]  # the records stay
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "retention_ci.py"), str(tmp_path / "nope.json")],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src")})
    assert bad.returncode != 0 and "is not a file" in bad.stderr
