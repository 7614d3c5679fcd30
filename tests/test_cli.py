"""The long-running commands: inputs validated before any work, finished work kept, self-describing results.

In-process runs use typer's CliRunner (stderr apart); the SIGINT test runs ``python -m vlmprune.cli``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest
from typer.main import get_command
from typer.testing import CliRunner

import vlmprune.eval.harness as harness
from vlmprune.cli import app
from vlmprune.runinfo import RESULTS_SCHEMA, RUN_FIELDS

SRC = os.path.join(os.path.dirname(__file__), os.pardir, "src")


def _run(*args):
    argv = [str(a) for a in args]
    with mock.patch.object(sys, "argv", ["vlmprune", *argv]):  # what the console script sees
        return CliRunner().invoke(app, argv)


def _first_err(result) -> str:
    return (result.stderr.strip().splitlines() or [""])[0]


@pytest.fixture
def no_eval(monkeypatch):
    """Counts calls of the evaluation harness (the tests that use it must fail before any)."""
    calls = []
    monkeypatch.setattr(harness, "evaluate", lambda *a, **k: calls.append(k) or pytest.fail("evaluation ran"))
    return calls


def _eval(tiny_dir, out, *args):
    return _run("eval", "-M", tiny_dir, "--families", "count", "--n", 1, "--max-new-tokens", 1, "--no-progress",
                "--out", out, *args)


# ------------------------------------------------------------------------------------------ item 1: validate first


def test_eval_typo_in_second_method_fails_before_any_work(tiny_dir, tmp_path, no_eval):
    r = _eval(tiny_dir, tmp_path / "o", "-m", "random", "-m", "prumerge+:kepp=3")
    assert r.exit_code == 2
    assert _first_err(r).startswith("error: method 'prumerge+' has no option(s) kepp")
    assert not no_eval and not (tmp_path / "o").exists()
    # the same as a real process: the error is stderr's first line (no loading bars before it)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "vlmprune.cli", "eval", "-M", str(tiny_dir), "--n", "1",
                        "-m", "fastv:k=10", "--out", str(tmp_path / "p")], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr.splitlines()[0].startswith("error: fastv: k=10 must be smaller than")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "error: --max-new-tokens must be >= 1, got 0"),
    (["--n", "0"], "error: --n must be >= 1, got 0"),
    (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["--split", "dev"], "error: --split must be train, val or test"),
    (["-m", "fastv:k=10"], "error: fastv: k=10 must be smaller than the decoder's 2 layers"),
    (["--dtype", "int8"], "error: --dtype must be auto (the saved dtype), fp32, bf16 or fp16, got 'int8'"),
])
def test_eval_bad_options_fail_before_any_work(tiny_dir, tmp_path, no_eval, args, message):
    r = _eval(tiny_dir, tmp_path / "o", *args)
    assert r.exit_code == 2 and _first_err(r).startswith(message), r.stderr
    assert not no_eval and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["demo", "--n", "0"], "error: --n must be >= 1, got 0"),
    (["demo", "--n", "-1"], "error: --n must be >= 1, got -1"),
    (["demo", "--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["tables", "budgets", "--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["tables", "speed"], "error: unknown table 'speed'"),
])
def test_demo_and_tables_bad_options(no_eval, args, message):
    r = _run(*args)
    assert r.exit_code == 2 and _first_err(r).startswith(message), r.stderr


def test_tables_dry_run_every_method_before_the_baseline(tiny_dir, tmp_path, no_eval):
    # the tiny model has 2 decoder layers: the order table's FastV K=3 cannot run on it
    r = _run("tables", "order", "-M", tiny_dir, "--n", 1, "--out", tmp_path / "t")
    assert r.exit_code == 2 and _first_err(r).startswith("error: fastv: k=2 must be smaller"), r.stderr
    assert not no_eval


@pytest.mark.parametrize("spec, message", [
    ("random:keep=10000", "error: random: keep=10000 is more than the 576 visual tokens per image"),
    ("fastv:k=1,count=10000", "error: fastv: count=10000 is more than the 576 visual tokens per image"),
    ("sparsevlm:schedule=[1000,500,10]", "error: sparsevlm: schedule counts are visual tokens kept out of 576"),
    ("fastv:k=1,budget=10000", "error: fastv: budget=10000 is more than the 576 visual tokens per image"),
    ("atp:fixed_target=10000", "error: atp: fixed_target=10000 is more than the 576 visual tokens per image"),
])
def test_budgets_beyond_the_model_name_the_method(tiny_dir, tmp_path, no_eval, spec, message):
    r = _eval(tiny_dir, tmp_path / "o", "-m", spec)
    assert r.exit_code == 2 and _first_err(r).startswith(message), r.stderr


# ------------------------------------------------------------------------------------------ item 5: no tracebacks


def test_atp_checkpoint_problems_are_one_error_line_naming_the_file(tiny_dir, tmp_path, no_eval):
    r = _eval(tiny_dir, tmp_path / "o", "-m", f"atp:checkpoint={tmp_path / 'missing'}")
    assert r.exit_code == 2 and _first_err(r).startswith("error: atp: checkpoint directory") and "missing" in r.stderr
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "atp_config.json").write_text("{not json")
    (ck / "atp_weights.safetensors").write_bytes(b"\x01\x00")
    r = _eval(tiny_dir, tmp_path / "o", "-m", f"atp:checkpoint={ck}")
    assert r.exit_code == 2 and _first_err(r).startswith(f"error: atp: {ck / 'atp_config.json'} is not valid JSON")
    (ck / "atp_config.json").write_text(json.dumps({"format": "x"}))
    from vlmprune.methods.atp import ATPConfig, ATPPruner

    ATPPruner(ATPConfig(num_layers=2, num_patches=576, hidden=32)).save(ck)
    (ck / "atp_weights.safetensors").write_bytes(b"\x01\x00")
    r = _eval(tiny_dir, tmp_path / "o", "-m", f"atp:checkpoint={ck}")
    assert r.exit_code == 2
    assert _first_err(r).startswith(f"error: atp: {ck / 'atp_weights.safetensors'} is not a readable safetensors")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    r = _eval(tiny_dir, tmp_path / "o", "-m", "atp")
    assert r.exit_code == 2 and _first_err(r).startswith("error: atp needs checkpoint=DIR")


def test_corrupt_jsonl_image_and_json_name_the_file_and_line(tiny_dir, tmp_path, no_eval):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": "ok.png", "question": "q", "answer": "a"}) + "\n"
                    + json.dumps({"image": "bad.png", "question": "q", "answer": "a"}) + "\n")
    jsonl = ("eval", "-M", tiny_dir, "--max-new-tokens", 1, "--no-progress", "--out", tmp_path / "o", "--data", data)
    r = _run(*jsonl)
    assert r.exit_code == 2 and _first_err(r).startswith(f"error: {data}:2: cannot read image {tmp_path / 'bad.png'}")
    data.write_text('{"image": "ok.png", "question": "q", "answer": "a"}\n{oops\n')
    r = _run(*jsonl)
    assert r.exit_code == 2 and _first_err(r).startswith(f"error: {data}:2: not valid JSON")


def test_corrupt_model_weights_are_one_error_line(tiny_dir, tmp_path):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(tiny_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x01\x00")
    r = _eval(bad, tmp_path / "o")
    assert r.exit_code == 2 and _first_err(r).startswith(f"error: could not load model {bad}"), r.stderr


# ------------------------------------------------------------------------------------------ items 2 and 3


def test_results_json_describes_the_run(tiny_dir, tmp_path):
    out = tmp_path / "o"
    r = _eval(tiny_dir, out, "-m", "random:keep=8", "-m", "sparsevlm:schedule=[100,50,20],layers=[0]")
    assert r.exit_code == 2 and "1 layers but 3 schedule counts" in r.stderr  # (validated first)
    r = _eval(tiny_dir, out, "-m", "random:keep=8", "-m", "fastv:k=1,count=4")
    assert r.exit_code == 0, r.output + r.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == RESULTS_SCHEMA and set(doc) == {"schema", "run", "results"}
    run = doc["run"]
    assert set(RUN_FIELDS) <= set(run) and run["kind"] == "eval" and run["status"] == "complete"
    assert run["started"] <= run["finished"]
    assert run["argv"][:3] == ["eval", "-M", str(tiny_dir)] and run["command"].startswith("vlmprune eval -M ")
    sha = hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
    assert run["model"]["weights_files"] == {"model.safetensors": sha}
    assert run["model"]["weights_sha256"] == hashlib.sha256(sha.encode()).hexdigest()
    assert run["data"] == {**run["data"], "source": "shapesvqa", "split": "test", "families": ["count"], "n": 1,
                           "blank": False}
    assert run["generation"] == {**run["generation"], "max_new_tokens": 1, "do_sample": False, "batch_size": 16}
    assert [m["label"] for m in run["methods"]] == ["unpruned", "random keep=8", "fastv k=1,count=4"]
    assert run["methods"][1]["resolved"] == {"keep": 8, "seed": 0, "lora": None}
    assert run["methods"][2]["options"] == {"k": 1, "count": 4}
    assert run["methods"][2]["resolved"] == {"k": 1, "drop_ratio": None, "count": 4, "budget": None, "score": "last"}
    assert {"python", "torch", "transformers", "vlmprune"} <= set(run["versions"])
    assert {"cpu_model", "cores_logical", "platform"} <= set(run["machine"])
    assert [x["label"] for x in doc["results"]] == ["unpruned", "random keep=8", "fastv k=1,count=4"]
    md = (out / "results.md").read_text()
    assert md.startswith("- command: `vlmprune eval -M ") and f"weights sha256 {run['model']['weights_sha256'][:16]}" in md
    assert run["model"]["dtype"] == "float32"


def test_eval_loads_the_weights_in_the_dtype_asked(tiny_dir, tmp_path):
    out = tmp_path / "o"
    r = _eval(tiny_dir, out, "--dtype", "bf16", "-m", "prumerge+")
    assert r.exit_code == 0, r.output + r.stderr
    run = json.loads((out / "results.json").read_text())["run"]
    assert run["model"]["dtype"] == "bfloat16" and run["argv"][-4:-2] == ["--dtype", "bf16"]


def test_out_reuse_never_overwrites(tiny_dir, tmp_path):
    out = tmp_path / "o"
    assert _eval(tiny_dir, out).exit_code == 0
    first = (out / "results.json").read_text()
    r = _eval(tiny_dir, out)
    assert r.exit_code == 0 and _first_err(r).startswith(f"note: {out} already holds results.json; writing this run "
                                                         f"to {tmp_path / 'o-2'}")
    assert (out / "results.json").read_text() == first and (tmp_path / "o-2" / "results.json").is_file()
    r = _eval(tiny_dir, out, "--overwrite")
    assert r.exit_code == 0 and json.loads((out / "results.json").read_text())["run"]["argv"][-1] == "--overwrite"
    (tmp_path / "file").write_text("x")
    r = _eval(tiny_dir, tmp_path / "file")
    assert r.exit_code == 2 and _first_err(r).startswith("error: --out")


def test_interrupt_in_process_keeps_the_finished_methods(tiny_dir, tmp_path, monkeypatch):
    real = harness.evaluate
    calls = []

    def interrupted_second(*a, **k):
        calls.append(k["method"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(harness, "evaluate", interrupted_second)
    r = _eval(tiny_dir, tmp_path / "o", "-m", "random:keep=8", "-m", "spatial:keep=8")
    assert r.exit_code == 130 and calls == [None, "random"]
    js = tmp_path / "o" / "results.json"
    assert _first_err(r).startswith(f"interrupted: the 1 finished methods are in {js}")
    doc = json.loads(js.read_text())
    assert doc["run"]["status"] == "interrupted" and [x["label"] for x in doc["results"]] == ["unpruned"]


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so Python installs its handler even
    when this test runs as a background job (which starts with SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_eval_leaves_a_readable_partial_results_file(tiny_dir, tmp_path):
    js = tmp_path / "o" / "results.json"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    specs = [a for s in range(40) for a in ("-m", f"random:keep=8,seed={s}")]  # long enough to interrupt
    p = subprocess.Popen([sys.executable, "-m", "vlmprune.cli", "eval", "-M", str(tiny_dir), "--families", "count",
                          "--n", "8", "--batch-size", "1", "--max-new-tokens", "4", "--no-progress", "--out",
                          str(tmp_path / "o"), *specs], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while not js.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert js.exists(), "no results after the baseline"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.splitlines()[0].startswith("interrupted: the ") and str(js) in err.splitlines()[0]
    doc = json.loads(js.read_text())
    assert doc["run"]["status"] == "interrupted" and doc["results"][0]["label"] == "unpruned"
    assert 1 <= len(doc["results"]) < 41 and len(doc["run"]["methods"]) == len(doc["results"])


# ------------------------------------------------------------------------------------------ items 4 and 8


def test_methods_help_documents_the_spec_grammar():
    r = _run("methods", "--help")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "schedule=[100,50,20]" in text and "true / false" in text and "checkpoint=runs/atp" in text


def _commands(cmd, path=()):
    """Every command and group (a group's own options too, e.g. bench's) with its path."""
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, path + (name,))


def test_every_option_has_help_and_no_rst_markup():
    for path, cmd in _commands(get_command(app)):
        assert "``" not in (cmd.help or ""), path
        for p in cmd.params:
            if p.param_type_name == "option" and p.name != "help":
                assert p.help, f"{' '.join(path)} {p.opts[0]} has no help text"
                assert "``" not in p.help, (path, p.opts)


def test_flags_are_consistent_across_commands():
    for path, cmd in _commands(get_command(app)):
        for p in cmd.params:
            if p.param_type_name != "option":
                continue
            if "--model" in p.opts:
                assert "-M" in p.opts and "-m" not in p.opts, path
            if "--method" in p.opts:
                assert "-m" in p.opts, path
            if p.name in ("batch", "batch_size"):
                assert "--batch-size" in p.opts, path
            if p.name == "dtype":
                assert "fp32" in p.help and "float32" not in p.help, path


@pytest.mark.parametrize("spec, expected", [
    ("sparsevlm:schedule=[100,50,20]", ("sparsevlm", {"schedule": [100, 50, 20]})),
    ("atp:layers=[1,2],checkpoint=runs/atp-144", ("atp", {"layers": [1, 2], "checkpoint": "runs/atp-144"})),
    ("random:keep=0.25,seed=none", ("random", {"keep": 0.25, "seed": None})),
    ("prumerge+:extra_token=true,merge='average'", ("prumerge+", {"extra_token": True, "merge": "average"})),
    ("fastv:k=2,budget=1e2", ("fastv", {"k": 2, "budget": 100.0})),
    ("x:nested=[[1,2],(3,4)],s=\"a,b\"", ("x", {"nested": [[1, 2], [3, 4]], "s": "a,b"})),
    ("none", (None, {})),
])
def test_spec_grammar(spec, expected):
    from vlmprune.registry import format_value, parse_method_spec

    assert parse_method_spec(spec) == expected
    name, opts = expected
    if name:  # written back in the grammar, a spec parses to the same options
        again = f"{name}:" + ",".join(f"{k}={format_value(v)}" for k, v in opts.items())
        assert parse_method_spec(again) == expected


@pytest.mark.parametrize("spec, message", [
    ("sparsevlm:schedule=[100,50", "unclosed [ in method spec"),
    ("random:keep", "bad option 'keep'"),
    ("random:keep=1,keep=2", "option 'keep' given twice"),
    ("none:keep=3", "options given without a method"),
])
def test_spec_grammar_errors(spec, message):
    from vlmprune.registry import parse_method_spec

    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        parse_method_spec(spec)


def test_apply_takes_the_same_spec_string(tiny_llava):
    import vlmprune

    with vlmprune.pruned(tiny_llava, "sparsevlm:schedule=[300,200,110],layers=[0,1,2]") as h:
        assert h.method_obj.schedule == (300, 200, 110) and h.method_obj.layers == (0, 1, 2)
    with vlmprune.pruned(tiny_llava, "random:keep=4", seed=3) as h:  # keywords add to the spec's options
        assert h.method_obj.options == {"keep": 4, "seed": 3}


def test_train_atp_corrupt_state_and_model_are_one_error_line(tiny_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_state.pt").write_bytes(b"garbage")
    r = _run("train", "atp", "-M", tiny_dir, "--out", run, "--steps", 1, "--no-progress")
    assert r.exit_code == 2 and _first_err(r).startswith(f"error: {run / 'train_state.pt'} is not a readable "
                                                         "training state"), r.stderr
    r = _run("train", "atp", "-M", tmp_path / "nowhere", "--out", tmp_path / "r2", "--steps", 1, "--no-progress")
    assert r.exit_code == 2 and _first_err(r).startswith(f"error: could not load model {tmp_path / 'nowhere'}")
    r = _run("train", "atp", "--dtype", "float64", "--out", tmp_path / "r3")
    assert r.exit_code == 2 and _first_err(r).startswith("error: --dtype must be fp32, bf16 or fp16")


def _interrupt_at(monkeypatch, call: int) -> list:
    """Make the ``call``-th evaluation raise KeyboardInterrupt (the earlier ones run for real)."""
    real, calls = harness.evaluate, []

    def evaluate(*a, **k):
        calls.append(k.get("method"))
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(harness, "evaluate", evaluate)
    return calls


def test_tables_write_each_method_and_keep_them_on_interrupt(tiny_dir, tmp_path, monkeypatch):
    calls = _interrupt_at(monkeypatch, 3)
    r = _run("tables", "vision", "-M", tiny_dir, "--n", 1, "--batch-size", 7, "--no-progress", "--out", tmp_path)
    assert r.exit_code == 130 and calls == [None, "prumerge", "prumerge+"]
    doc = json.loads((tmp_path / "vision.json").read_text())
    assert doc["schema"] == RESULTS_SCHEMA and doc["run"]["kind"] == "tables vision"
    assert doc["run"]["status"] == "interrupted" and [x["label"] for x in doc["results"]] == ["unpruned", "prumerge"]
    assert doc["run"]["methods"][1]["resolved"]["k_neighbors"] == 32  # defaults filled in


def test_demo_writes_the_shared_schema(tmp_path, monkeypatch):
    _interrupt_at(monkeypatch, 2)
    r = _run("demo", "--n", 1, "--batch-size", 7, "--no-progress", "--out", tmp_path)
    assert r.exit_code == 130
    doc = json.loads((tmp_path / "demo.json").read_text())
    assert set(RUN_FIELDS) <= set(doc["run"]) and doc["run"]["kind"] == "demo"
    assert doc["run"]["model"]["weights_sha256"] and doc["run"]["data"]["n"] == 1
    assert [x["label"] for x in doc["results"]] == ["unpruned"]


@pytest.mark.parametrize("args, message", [
    (["eval", "--n", "abc"], "error: Invalid value for '--n'"),
    (["eval", "--bogus"], "error: No such option: --bogus"),
    (["tables"], "error: Missing argument 'which'; see `vlmprune tables --help`"),
])
def test_usage_errors_of_the_console_script_are_one_line(args, message):
    env = {**os.environ, "PYTHONPATH": SRC}
    p = subprocess.run([sys.executable, "-m", "vlmprune.cli", *args], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr.splitlines()[0].startswith(message) and len(p.stderr.splitlines()) == 1


def test_notices_print_as_one_line_each_time_and_other_warnings_pass_through(capsys):
    import warnings

    import typer

    from vlmprune.clitools import fail, notices_as_lines
    from vlmprune.integrations.compat import ImagesOnlyProcessorWarning

    shown = warnings.showwarning
    with notices_as_lines():
        for _ in range(2):  # the same call site twice: shown twice (a CLI run in a test process loads again)
            warnings.warn("loaded for images only", ImagesOnlyProcessorWarning)
        with pytest.warns(DeprecationWarning, match="other"):
            warnings.warn("other", DeprecationWarning)
    assert warnings.showwarning is shown
    assert capsys.readouterr().err.splitlines() == ["warning: loaded for images only"] * 2
    with pytest.raises(typer.Exit) as exit_info:
        fail("a [bracketed] message")  # no markup: printed as given
    assert exit_info.value.exit_code == 2 and capsys.readouterr().err == "error: a [bracketed] message\n"
    with pytest.raises(typer.Exit):
        fail("a library's message\n  on two lines\n")  # one line whatever the message
    assert capsys.readouterr().err == "error: a library's message on two lines\n"


def test_a_model_that_is_no_local_folder_is_said_to_be_looked_up_on_the_hub(monkeypatch, tmp_path):
    from vlmprune.testbed.model import hub_lookup_note

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub_lookup_note("org/no-such-model").startswith("org/no-such-model is not a local folder: looking it up")
    # the testbed, a local folder, a local path that does not exist (refused at once): nothing to say
    assert all(hub_lookup_note(m) is None for m in (None, str(tmp_path), str(tmp_path / "nowhere"), "./x"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the cache only, at once
    assert hub_lookup_note("org/no-such-model") is None
