"""The README table commands: which methods run, at which budgets, in which order."""

from types import SimpleNamespace

import pytest

from vlmprune.eval.tables import BUDGETS, budget_specs, matched_specs, order_specs, run_tables
from vlmprune.registry import get_method


def test_matched_specs_use_each_adaptive_count():
    specs = matched_specs({"prumerge": 31.6, "prumerge+": 143.2})
    assert specs == [(b, {"keep": 32}) for b in ("cls-topk", "spatial", "sequential", "random")] + \
                    [(b, {"keep": 143}) for b in ("cls-topk", "spatial", "sequential", "random")]
    assert matched_specs({"prumerge": 0.2}) == [(b, {"keep": 1}) for b in ("cls-topk", "spatial", "sequential", "random")]


def test_every_table_spec_builds():
    for name, opts in budget_specs() + order_specs() + matched_specs({"prumerge": 40.0, "prumerge+": 150.0}):
        get_method(name).build(**opts)  # raises on an unknown option or a bad value
    assert [s for s in budget_specs() if s[0] == "fastv"] == [("fastv", {"k": 2, "count": b}) for b in BUDGETS]


def _fake_evaluate(calls, tokens):
    def evaluate(model, processor, items, *, method=None, method_options=None, baseline=None, **_):
        calls.append((method, dict(method_options or {}), baseline is not None))
        return SimpleNamespace(method=method, mean_visual_tokens=tokens.get(method, 576.0), retention=None)
    return evaluate


def test_vision_table_runs_baselines_at_the_measured_counts(tmp_path, monkeypatch):
    from vlmprune.eval import report

    monkeypatch.setattr(report, "print_table", lambda *a, **k: None)
    monkeypatch.setattr(report, "write", lambda results, out, name: (out / f"{name}.md", out / f"{name}.json"))
    calls = []
    res = run_tables("vision", None, None, [], out=tmp_path,
                     evaluate=_fake_evaluate(calls, {"prumerge": 37.4, "prumerge+": 140.6}))
    assert calls[0] == (None, {}, False)  # the unpruned run first, then everything against it
    assert calls[1:3] == [("prumerge", {}, True), ("prumerge+", {}, True)]
    assert calls[3:] == [(n, o, True) for n, o in matched_specs({"prumerge": 37.4, "prumerge+": 140.6})]
    assert res[0].retention == 1.0 and len(res) == len(calls)


def test_order_table_pairs_each_method_with_its_spatial_order(tmp_path, monkeypatch):
    from vlmprune.eval import report

    monkeypatch.setattr(report, "print_table", lambda *a, **k: None)
    monkeypatch.setattr(report, "write", lambda results, out, name: (out / f"{name}.md", out / f"{name}.json"))
    calls = []
    run_tables("order", None, None, [], out=tmp_path, evaluate=_fake_evaluate(calls, {}))
    assert calls[0] == (None, {}, False)
    vision = [(n, o) for n, o, _ in calls[1:] if n != "fastv"]
    # every vision-stage method appears exactly twice, once per order, with otherwise equal options
    for name, opts in vision:
        twin = {**opts, "order": "spatial" if opts["order"] == "attention" else "attention"}
        assert vision.count((name, twin)) == 1
    assert [(n, o) for n, o, _ in calls if n == "fastv"] == [("fastv", {"k": 2, "count": 192}),
                                                              ("fastv", {"k": 3, "count": 192})]


def test_unknown_table_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="vision"):
        run_tables("speed", None, None, [], out=tmp_path)


def test_cli_tables_rejects_bad_input():
    from typer.testing import CliRunner

    from vlmprune.cli import app

    r = CliRunner().invoke(app, ["tables", "speed"])
    assert r.exit_code == 2 and "vision" in r.output
    r = CliRunner().invoke(app, ["tables", "vision", "--n", "0"])
    assert r.exit_code == 2 and "--n" in r.output


def test_matched_baselines_keep_the_same_fraction_of_each_unit_on_other_families():
    """Images of several units or sizes: the baselines keep each unit's share, kept / unpruned of
    the adaptive method (4 decimals, within (0, 1])."""
    specs = matched_specs({"prumerge": 8.0, "prumerge+": 30.0}, unpruned=29.0)
    assert specs[:4] == [(b, {"keep": 0.2759}) for b in ("cls-topk", "spatial", "sequential", "random")]
    assert specs[4:] == [(b, {"keep": 1.0}) for b in ("cls-topk", "spatial", "sequential", "random")]
    assert matched_specs({"prumerge": 0.0}, unpruned=500.0)[0] == ("cls-topk", {"keep": 1e-4})


def test_cli_vision_table_on_llava_next_matches_counts_per_crop(tmp_path):
    """`vlmprune tables vision --model DIR` on LLaVA-NeXT (several crops per image): the matched
    baselines run (a per-sample count as a per-crop keep= exceeded the crop's 9 tokens) and feed about
    the adaptive method's tokens (each crop's floor, plus the newlines, which are always kept)."""
    import json

    from typer.testing import CliRunner

    from atp_helpers import make_tiny_next_folder
    from vlmprune.cli import app

    folder = make_tiny_next_folder(tmp_path / "next")
    r = CliRunner().invoke(app, ["tables", "vision", "--model", str(folder), "--n", "1", "--batch-size", "4",
                                 "--no-progress", "--out", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "t" / "vision.json").read_text())["results"]
    by = {row["label"]: row for row in rows}
    adaptive = by["prumerge"]["mean_visual_tokens"]
    matched = [row for row in rows if row["method"] == "spatial"]
    assert matched and matched[0]["mean_visual_tokens"] <= by["unpruned"]["mean_visual_tokens"]
    assert abs(matched[0]["mean_visual_tokens"] - adaptive) <= 0.5 * by["unpruned"]["mean_visual_tokens"]
