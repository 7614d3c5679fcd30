"""The ``vlmprune`` command."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any, Optional

import typer

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


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def parse_method_spec(spec: str) -> tuple[str | None, dict[str, Any]]:
    """``"prumerge+"`` / ``"random:keep=32,seed=1"`` / ``"none"`` -> (name, options)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    options: dict[str, Any] = {}
    if rest.strip():
        for part in rest.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"bad option {part!r} in method spec {spec!r}; write NAME:key=value,key=value")
            try:
                options[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                options[key.strip()] = value.strip()
    if name in ("", "none", "unpruned"):
        if options:
            raise ValueError(f"options given without a method in {spec!r}")
        return None, {}
    return name, options


def _load(model: Optional[str]):
    from .testbed.model import load

    try:
        return load(model)
    except (OSError, ValueError, FileNotFoundError) as e:
        _fail(f"could not load model {model or '(testbed)'}: {e}")


def _items(data: str, split: str, families: str, n: int, blank: bool):
    from .eval.data import jsonl_items, shapesvqa_items

    if data == "shapesvqa":
        return shapesvqa_items(split, families, n, blank=blank)
    return jsonl_items(data)


@app.command("methods")
def methods_cmd(json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table")):
    """List the pruning methods with their stage and options."""
    import vlmprune

    ms = vlmprune.list_methods()
    if json_out:
        typer.echo(json.dumps(ms, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="vlmprune methods")
    for c in ("name", "stage", "summary", "options"):
        t.add_column(c)
    for m in ms:
        t.add_row(m["name"], m["stage"], m["summary"], ", ".join(f"{k}={v}" for k, v in m["options"].items()))
    Console().print(t)


@app.command("eval")
def eval_cmd(
    method: list[str] = typer.Option(["none"], "--method", "-m",
                                     help="method spec NAME[:key=value,...]; repeat to compare several; 'none' = unpruned"),
    model: Optional[str] = typer.Option(None, help="local path or hub id of a LLaVA model (default: the testbed)"),
    data: str = typer.Option("shapesvqa", help="'shapesvqa' or a JSONL file of {image, question, answer} records"),
    families: str = typer.Option("all", help="ShapesVQA families, comma-separated, or 'all'"),
    split: str = typer.Option("test", help="ShapesVQA split: train / val / test"),
    n: int = typer.Option(300, help="questions per ShapesVQA family"),
    batch_size: int = typer.Option(16, help="prompts per generate() call"),
    max_new_tokens: int = typer.Option(8),
    blank: bool = typer.Option(False, help="replace every image by a blank background (image-dependence check)"),
    baseline: bool = typer.Option(True, help="also run the unpruned model first, for retention"),
    out: Path = typer.Option(Path("out/eval"), help="output folder for results.md / results.json"),
    progress: bool = typer.Option(True),
):
    """Evaluate the model (unpruned and/or pruned) and write per-family accuracy tables."""
    from .eval import report
    from .eval.distributed import finish, is_main_process
    from .eval.harness import evaluate
    from .registry import get_method

    try:
        specs = [parse_method_spec(s) for s in method]
        for name, _ in specs:
            if name is not None:
                get_method(name)
        items = _items(data, split, families, n, blank)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if n < 1:
        _fail(f"--n must be >= 1, got {n}")
    m, processor = _load(model)
    results = []
    base = None
    if baseline and (None, {}) not in specs:
        specs = [(None, {})] + specs
    for name, opts in specs:
        try:
            r = evaluate(m, processor, items, method=name, method_options=opts, baseline=base,
                         batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress and is_main_process())
        except ValueError as e:
            _fail(str(e))
        if name is None and base is None:
            base = r
            r.retention = 1.0
        results.append(r)
    if is_main_process():
        report.print_table(results, title=f"{data} ({split})" + (" — blank images" if blank else ""))
        md, js = report.write(results, out)
        typer.echo(f"wrote {md} and {js}")
    finish()


@app.command("tables")
def tables_cmd(
    which: str = typer.Argument(..., help="'vision' (PruMerge / PruMerge+ and baselines at their mean counts) or "
                                          "'budgets' (FastV, SparseVLM and vision-stage methods at 192 / 128 / 64) or "
                                          "'order' (token order and pruning layer: where reading and counting are lost)"),
    model: Optional[str] = typer.Option(None, help="local path or hub id of a LLaVA model (default: the testbed)"),
    n: int = typer.Option(100, help="questions per ShapesVQA family"),
    split: str = typer.Option("test"),
    batch_size: int = typer.Option(16),
    out: Path = typer.Option(Path("out/tables"), help="writes WHICH.md and WHICH.json here"),
    progress: bool = typer.Option(True),
):
    """The README's accuracy tables, one command each (see src/vlmprune/eval/tables.py)."""
    from .eval.distributed import finish
    from .eval.tables import TABLES, run_tables

    if which not in TABLES:
        _fail(f"unknown table {which!r}: choose one of {', '.join(TABLES)}")
    if n < 1:
        _fail(f"--n must be >= 1, got {n}")
    try:
        items = _items("shapesvqa", split, "all", n, False)
    except ValueError as e:
        _fail(str(e))
    m, processor = _load(model)
    run_tables(which, m, processor, items, out=out, batch_size=batch_size, progress=progress)
    finish()


@app.command("demo")
def demo_cmd(
    n: int = typer.Option(50, help="questions per family"),
    out: Path = typer.Option(Path("out/demo")),
    batch_size: int = typer.Option(16),
):
    """The main job: evaluate the testbed unpruned and with every method at its default budget."""
    from .demo import run_demo

    run_demo(n=n, out=out, batch_size=batch_size)


@testbed_app.command("train")
def testbed_train(
    out: Path = typer.Option(Path("runs/testbed"), help="run folder (checkpoints; resumes if present)"),
    seed: int = typer.Option(0),
    vision_steps: int = typer.Option(None, help="stage-1 steps (default: the recipe's, TrainConfig.vision_steps)"),
    llm_steps: int = typer.Option(None, help="stage-2 steps (default: the recipe's, TrainConfig.llm_steps)"),
    install: bool = typer.Option(False, help="copy the final model into the package (the committed testbed)"),
    set_: list[str] = typer.Option([], "--set", help="override any TrainConfig field: --set key=value (repeatable), "
                                   "e.g. --set guide_weight=0.1 --set 'guide_layers=[3]'"),
):
    """Train the testbed LLaVA from scratch (resumable; an estimated ~2.0 h on 2 otherwise idle CPU cores)."""
    from .testbed.train import TrainConfig, train

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
    out: Path = typer.Option(Path("out/testbed-check")),
    batch_size: int = typer.Option(16),
    model: Optional[str] = typer.Option(None, help="a saved model folder to check (default: the committed testbed)"),
):
    """The testbed's acceptance checks: unpruned / blank-image / random-32 accuracy, [CLS] attention share."""
    from .testbed.check import run_check

    if n < 1 or blank_n < 1:
        _fail("--n and --blank-n must be >= 1")
    loaded, processor = _load(model)
    run_check(n=n, out=out, batch_size=batch_size, blank_n=blank_n, model=loaded, processor=processor)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
