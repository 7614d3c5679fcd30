"""The ``vlmprune`` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from .clitools import dtype_option, fail, note, notices_as_lines
from .registry import SPEC_GRAMMAR

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Adaptive visual-token pruning and merging for vision-language models.")
testbed_app = typer.Typer(no_args_is_help=True, help="The embedded testbed: ShapesVQA and the tiny trained LLaVA.")
app.add_typer(testbed_app, name="testbed")
from .train.cli import app as train_app  # noqa: E402  (light: heavy imports happen inside the commands)
app.add_typer(train_app, name="train")

try:  # the analytic cost model mounts itself when present
    from .cost.cli import app as _cost_app

    app.add_typer(_cost_app, name="cost", help="Analytic FLOPs / memory / roofline cost model.")
    from .bench.cli import app as _bench_app; app.add_typer(_bench_app, name="bench")  # noqa: E702 (measured benchmark)
except ImportError:  # pragma: no cover
    pass


_fail = fail


_note = note


def _at_least(**values: tuple[int, int]) -> None:
    """``--name`` options as ``name=(value, lowest allowed)``; the first one too small fails."""
    for name, (value, low) in values.items():
        if value < low:
            _fail(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


MODEL_HELP = "local folder or hub id of a model of a supported family (default: the committed testbed)"
OVERWRITE_HELP = "replace results already in --out (default: write this run to a new folder OUT-2, OUT-3, ...)"
PROGRESS_HELP = "show a progress bar per method"


def _specs(method: list[str]) -> list[tuple[str, str | None, dict[str, Any]]]:
    """Every ``-m`` spec parsed and built (options validated) -> (label, name, options), or fail."""
    from .eval.harness import label_for
    from .registry import check_method_spec, parse_method_spec

    out = []
    for spec in method:
        try:
            name, opts = parse_method_spec(spec)
            if name == "atp" and not {"checkpoint", "fixed_ratio", "fixed_target"} & set(opts):
                raise ValueError(f"atp needs checkpoint=DIR (from `vlmprune train atp --out DIR`) in {spec!r}: "
                                 "untrained ATP modules keep every token (or pass fixed_ratio= / fixed_target= for "
                                 "the fixed-ratio ablation)")
            check_method_spec(spec)
        except ValueError as e:
            _fail(str(e))
        out.append((label_for(name, opts), name, opts))
    return out


def _dry_run(model, specs) -> None:
    """Apply and remove each method on the loaded model: model-dependent checks (layers, budgets) fail here."""
    import warnings

    import vlmprune

    for label, name, opts in specs:
        if name is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vlmprune.apply(model, name, **opts).remove()
        except (ValueError, TypeError) as e:
            _fail(f"{e} (method {label!r} on this model)")


def _dtype(name: str):
    """``--dtype`` (any case) -> a torch dtype, or None for the saved one (``auto``); an ``error:`` otherwise."""
    import torch

    key = dtype_option(str(name).strip().lower(), auto=True)
    return None if key is None else getattr(torch, key)


def _load(model: Optional[str], dtype=None):
    from .integrations.compat import quiet_loading
    from .testbed.model import hub_lookup_note, load

    quiet_loading()
    if hub := hub_lookup_note(model):
        _note(hub)
    try:
        with notices_as_lines():
            return load(model, dtype=dtype)
    except Exception as e:  # noqa: BLE001 -- any load failure is the user's path / files: say which and why
        _fail(f"could not load model {model or '(testbed)'}: {e}")


def _model_info(model: Optional[str], loaded) -> dict[str, Any]:
    from .runinfo import model_info
    from .testbed.model import CHECKPOINT_DIR

    return model_info(model or CHECKPOINT_DIR, getattr(loaded, "dtype", None))


def _items(data: str, split: str, families: str, n: int, blank: bool):
    """-> (items, the results' ``data`` block); ``ValueError`` / ``FileNotFoundError`` on bad input."""
    from .eval.data import jsonl_items, parse_families, shapesvqa_items
    from .runinfo import jsonl_data, shapesvqa_data

    if data == "shapesvqa":
        if split not in ("train", "val", "test"):
            raise ValueError(f"--split must be train, val or test, got {split!r}")
        return shapesvqa_items(split, families, n, blank=blank), shapesvqa_data(split, parse_families(families), n,
                                                                                blank)
    if families != "all" or split != "test" or n != 300 or blank:
        given = [f for f, on in (("--families", families != "all"), ("--split", split != "test"), ("--n", n != 300),
                                 ("--blank", blank)) if on]
        raise ValueError(f"{', '.join(given)} choose{'s' if len(given) == 1 else ''} ShapesVQA questions; a JSONL "
                         "file (--data) is evaluated whole: drop them")
    items = jsonl_items(data)
    return items, jsonl_data(data, len(items))


def _run_all(writer, work: Callable[[], Any], describe: str = "methods") -> list:
    """Run ``work()``, which hands each finished result to ``writer.add`` (it is written at once).
    Ctrl-C keeps the finished ones (status "interrupted", exit 130, says where); a ``ValueError``
    keeps them too (status "failed") and is a one-line error."""
    try:
        work()
    except KeyboardInterrupt:
        if writer is None:
            typer.secho(f"interrupted before any of the {describe} finished: nothing was written", err=True,
                        fg=typer.colors.YELLOW)
            raise typer.Exit(130)
        md, js = writer.write("interrupted")
        typer.secho(f"interrupted: the {len(writer.results)} finished {describe} are in {js} and {md}", err=True,
                    fg=typer.colors.YELLOW)
        raise typer.Exit(130)
    except ValueError as e:
        if writer is not None and writer.results:
            writer.write("failed")
            _fail(f"{e} (the {len(writer.results)} finished {describe} are in {writer.paths[1]})")
        _fail(str(e))
    except Exception:  # a bug, not a user error: keep the traceback, but mark what was written as failed
        if writer is not None and writer.results:
            writer.write("failed")
        raise
    if writer is None:
        return []
    md, js = writer.write("complete")
    typer.echo(f"wrote {md} and {js}")
    return writer.results


def _add_each(writer, steps) -> Callable[[], None]:
    """The work of ``_run_all`` for an iterable of (EvalResult, methods entry) pairs."""
    def work() -> None:
        for result, entry in steps:
            if writer is not None:
                writer.add(result, entry)
    return work


def _writer(out: Path, name: str, overwrite: bool, run: dict[str, Any]):
    from .eval.distributed import is_main_process
    from .eval.report import RunWriter, run_folder

    if not is_main_process():
        return None
    try:
        folder, note = run_folder(out, name, overwrite)
    except ValueError as e:
        _fail(str(e))
    if note:
        _note(note)
    return RunWriter(folder, name, run)


def _evaluate_specs(m, processor, items, specs, *, batch_size, max_new_tokens, progress, base=None):
    """Yield (EvalResult, methods entry) per spec; the first unpruned one is the baseline for the rest."""
    from .eval.harness import evaluate
    from .runinfo import method_entry

    for label, name, opts in specs:
        r = evaluate(m, processor, items, method=name, method_options=opts, baseline=base, label=label,
                     batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
        if name is None and base is None:
            base = r
            r.retention = 1.0
        yield r, method_entry(label, name, opts)


@app.command("methods", help="List the pruning methods with their stage and options.\n\n"
             + SPEC_GRAMMAR.replace("\n", " "))
def methods_cmd(json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table")):
    import vlmprune

    ms = vlmprune.list_methods()
    if json_out:
        typer.echo(json.dumps(ms, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="vlmprune methods")
    for c in ("name", "stage", "summary", "options", "families"):
        t.add_column(c)
    for m in ms:
        t.add_row(m["name"], m["stage"], m["summary"], ", ".join(f"{k}={v}" for k, v in m["options"].items()),
                  ", ".join(f for f, ok in m["families"].items() if ok == "yes"))
    Console().print(t)


@app.command("eval", help="Evaluate the model (unpruned and/or pruned) and write per-family accuracy tables.\n\n"
             "Every input is checked (and each method applied once to the model) before the first question; "
             "results.json / results.md are rewritten after each method; Ctrl-C keeps the finished ones.")
def eval_cmd(
    method: list[str] = typer.Option(["none"], "--method", "-m",
                                     help="method spec NAME[:key=value,...] (grammar: `vlmprune methods --help`); "
                                          "repeat to compare several; 'none' = unpruned"),
    model: Optional[str] = typer.Option(None, "--model", "-M", help=MODEL_HELP),
    data: str = typer.Option("shapesvqa", help="'shapesvqa' or a JSONL file of {image, question, answer} records "
                                               "(image: a file, or a list of files for several images; or "
                                               "{video: [frame files], ...}: models with video inputs)"),
    families: str = typer.Option("all", help="ShapesVQA families, comma-separated, or 'all'"),
    split: str = typer.Option("test", help="ShapesVQA split: train / val / test"),
    n: int = typer.Option(300, help="questions per ShapesVQA family (>= 1)"),
    batch_size: int = typer.Option(16, "--batch-size", help="prompts per generate() call (>= 1)"),
    max_new_tokens: int = typer.Option(8, help="tokens generated per answer (greedy, >= 1)"),
    blank: bool = typer.Option(False, help="replace every image by a blank background (image-dependence check)"),
    baseline: bool = typer.Option(True, help="also run the unpruned model first, for retention"),
    dtype: str = typer.Option("auto", "--dtype", help="weights' dtype: auto (as saved), fp32, bf16 or fp16"),
    out: Path = typer.Option(Path("out/eval"), "--out", "-o", help="output folder for results.md / results.json"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    progress: bool = typer.Option(True, help=PROGRESS_HELP),
):
    from .eval import report
    from .eval.distributed import finish, is_main_process
    from .runinfo import new_run

    _at_least(n=(n, 1), batch_size=(batch_size, 1), max_new_tokens=(max_new_tokens, 1))
    torch_dtype = _dtype(dtype)
    specs = _specs(method)
    try:
        items, data_info = _items(data, split, families, n, blank)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    m, processor = _load(model, torch_dtype)
    _dry_run(m, specs)
    from .eval.harness import check_items

    try:
        check_items(m, processor, items)
    except ValueError as e:
        _fail(str(e))
    if baseline and not any(name is None for _, name, _ in specs):
        specs = [("unpruned", None, {})] + specs
    run = new_run("eval", model=_model_info(model, m), data=data_info,
                  generation={"max_new_tokens": max_new_tokens, "do_sample": False, "batch_size": batch_size,
                              "prompt_template": _prompt_template(processor, items)})
    writer = _writer(out, "results", overwrite, run)
    results = _run_all(writer, _add_each(writer, _evaluate_specs(m, processor, items, specs, batch_size=batch_size,
                                                                 max_new_tokens=max_new_tokens,
                                                                 progress=progress and is_main_process())))
    if is_main_process() and results:
        report.print_table(results, title=f"{data} ({split})" + (" — blank images" if blank else ""))
    finish()


def _prompt_template(processor=None, items=()) -> str:
    """How eval builds prompts: the processor's chat template when it has one, else ShapesVQA's
    (with the rule for ``items`` of several images, when there are any)."""
    from .eval.prompts import prompt_style
    from .testbed.prompt import PROMPT_TEMPLATE

    style = None if processor is None else prompt_style(processor)
    text = PROMPT_TEMPLATE if style is None else style.description
    if any(it.num_images > 1 for it in items) and not (style is not None and style.chat):
        text += " (a record of several images: one <image> line each)"
    return text


@app.command("tables")
def tables_cmd(
    which: str = typer.Argument(..., help="'vision' (PruMerge / PruMerge+ and baselines at their mean counts) or "
                                          "'budgets' (FastV, SparseVLM and vision-stage methods at 192 / 128 / 64) or "
                                          "'order' (token order and pruning layer: where reading and counting are lost)"),
    model: Optional[str] = typer.Option(None, "--model", "-M", help=MODEL_HELP),
    n: int = typer.Option(100, help="questions per ShapesVQA family (>= 1)"),
    split: str = typer.Option("test", help="ShapesVQA split: train / val / test"),
    batch_size: int = typer.Option(16, "--batch-size", help="prompts per generate() call (>= 1)"),
    out: Path = typer.Option(Path("out/tables"), "--out", "-o", help="writes WHICH.md and WHICH.json here"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    progress: bool = typer.Option(True, help=PROGRESS_HELP),
):
    """The README's accuracy tables, one command each (see src/vlmprune/eval/tables.py); written after each method."""
    from .eval.distributed import finish
    from .eval.harness import evaluate
    from .eval.tables import TABLES, run_tables, table_checks
    from .runinfo import method_entry, new_run

    if which not in TABLES:
        _fail(f"unknown table {which!r}: choose one of {', '.join(TABLES)}")
    _at_least(n=(n, 1), batch_size=(batch_size, 1))
    try:
        items, data_info = _items("shapesvqa", split, "all", n, False)
    except ValueError as e:
        _fail(str(e))
    m, processor = _load(model)
    _dry_run(m, [(f"{name}", name, opts) for name, opts in table_checks(which)])
    run = new_run(f"tables {which}", model=_model_info(model, m), data=data_info,
                  generation={"max_new_tokens": 8, "do_sample": False, "batch_size": batch_size,
                              "prompt_template": _prompt_template()})
    writer = _writer(out, which, overwrite, run)

    def recording(*args, method=None, method_options=None, **kwargs):
        r = evaluate(*args, method=method, method_options=method_options, **kwargs)
        if writer is not None:
            writer.add(r, method_entry(r.label, method, method_options or {}))
        return r

    _run_all(writer, lambda: run_tables(which, m, processor, items, out=None, batch_size=batch_size,
                                        progress=progress, evaluate=recording))
    finish()


@app.command("demo")
def demo_cmd(
    n: int = typer.Option(50, help="questions per family (>= 1)"),
    out: Path = typer.Option(Path("out/demo"), "--out", "-o", help="output folder for demo.md / demo.json"),
    batch_size: int = typer.Option(16, "--batch-size", help="prompts per generate() call (>= 1)"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    progress: bool = typer.Option(True, help=PROGRESS_HELP),
):
    """The main job: evaluate the testbed unpruned and with every method at its default budget."""
    from .demo import demo_specs
    from .eval import report
    from .runinfo import new_run

    _at_least(n=(n, 1), batch_size=(batch_size, 1))
    specs = [("unpruned", None, {})] + demo_specs()
    items, data_info = _items("shapesvqa", "test", "all", n, False)
    m, processor = _load(None)
    _dry_run(m, specs)
    run = new_run("demo", model=_model_info(None, m), data=data_info,
                  generation={"max_new_tokens": 8, "do_sample": False, "batch_size": batch_size,
                              "prompt_template": _prompt_template()})
    writer = _writer(out, "demo", overwrite, run)
    results = _run_all(writer, _add_each(writer, _evaluate_specs(m, processor, items, specs, batch_size=batch_size,
                                                                 max_new_tokens=8, progress=progress)))
    if results:
        report.print_table(results, title=f"ShapesVQA test, {n} questions per family")


@testbed_app.command("train")
def testbed_train(
    out: Path = typer.Option(Path("runs/testbed"), help="run folder (checkpoints; resumes if present)"),
    seed: int = typer.Option(0, help="seed of the weights' initialisation and of the data order"),
    vision_steps: int = typer.Option(None, help="stage-1 steps (default: the recipe's, TrainConfig.vision_steps)"),
    llm_steps: int = typer.Option(None, help="stage-2 steps (default: the recipe's, TrainConfig.llm_steps)"),
    install: bool = typer.Option(False, help="copy the final model into the package (the committed testbed)"),
    set_: list[str] = typer.Option([], "--set", help="override any TrainConfig field: --set key=value (repeatable), "
                                   "e.g. --set guide_weight=0.1 --set 'guide_layers=[3]'"),
):
    """Train the testbed LLaVA from scratch (resumable)."""
    from .testbed.recipe import TrainConfig, train

    if (vision_steps is not None and vision_steps < 1) or (llm_steps is not None and llm_steps < 1):
        _fail("--vision-steps and --llm-steps must be >= 1")
    steps = {k: v for k, v in (("vision_steps", vision_steps), ("llm_steps", llm_steps)) if v is not None}
    try:
        cfg = TrainConfig(out=str(out), seed=seed, **steps).with_overrides(set_)
    except (ValueError, TypeError) as e:
        _fail(str(e))
    final = train(cfg)
    typer.echo(f"model written to {final}")
    if install:
        from .testbed.model import CHECKPOINT_DIR, install_checkpoint

        install_checkpoint(final)
        typer.echo(f"installed into {CHECKPOINT_DIR}")


@testbed_app.command("check")
def testbed_check(
    n: int = typer.Option(300, help="questions per family (unpruned and random-32 runs)"),
    blank_n: int = typer.Option(100, help="questions per family for the blank-image run"),
    out: Path = typer.Option(Path("out/testbed-check"), "--out", "-o", help="output folder for check.md / check.json"),
    batch_size: int = typer.Option(16, "--batch-size", help="prompts per generate() call (>= 1)"),
    model: Optional[str] = typer.Option(None, "--model", "-M",
                                        help="a saved model folder to check (default: the committed testbed)"),
):
    """The testbed's acceptance checks: unpruned / blank-image / random-32 accuracy, [CLS] attention share."""
    from .eval.testbed_check import run_check

    from .integrations.base import get_adapter

    _at_least(n=(n, 1), blank_n=(blank_n, 1), batch_size=(batch_size, 1))
    loaded, processor = _load(model)
    adapter = get_adapter(loaded)
    tokens = adapter.fixed_image_tokens(loaded)
    if adapter.family != "llava" or tokens is None or tokens < 32:  # the checks are the testbed's: LLaVA-1.5 shape
        _fail(f"testbed check runs on LLaVA-1.5 models with at least 32 visual tokens per image (its random-32 run "
              f"and the [CLS] attention of the testbed's tower); this is a {adapter.family} model"
              + (f" with {tokens} tokens per image" if tokens is not None and adapter.family == "llava" else "")
              + ": evaluate it with `vlmprune eval --model DIR`")
    _dry_run(loaded, [("random keep=32", "random", {"keep": 32})])
    run_check(n=n, out=out, batch_size=batch_size, blank_n=blank_n, model=loaded, processor=processor)


def main(argv: Optional[list[str]] = None) -> None:
    """The ``vlmprune`` console script: ``app``, with a wrong flag or value (a usage error) as one
    line ``error: ...`` like every other user error (exit 2)."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="vlmprune", standalone_mode=False)
    except typer.Abort:
        code = 130
    except typer.TyperException as e:
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":
            typer.echo(ctx.get_help() if ctx else str(e))
            code = 0
        else:
            where = f"`{ctx.command_path} --help`" if ctx else "`vlmprune --help`"
            typer.secho(f"error: {e.format_message().rstrip('.')}; see {where}", fg=typer.colors.RED, err=True)
            code = getattr(e, "exit_code", 2)
    raise SystemExit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
