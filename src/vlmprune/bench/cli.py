"""``vlmprune bench``: measured efficiency of pruning methods, with a JSON efficiency card and a plot.

Mounted by the main CLI as ``app.add_typer(bench_app, name="bench")``; also runnable as
``python -m vlmprune.bench.cli``. The measurement is ``vlmprune.bench.measure.run_bench``; its
fields are defined in ``docs/efficiency.md``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console

from ..clitools import fail, notices_as_lines

app = typer.Typer(name="bench", add_completion=False,
                  help="Measured efficiency (CPU): prefill, overhead, decode, memory, KV cache; JSON card + plot.")


_fail = fail


@app.callback(invoke_without_command=True)
def bench(
    model: list[str] = typer.Option(["testbed", "scaled"], "--model", "-M",
                                    help="testbed (the committed checkpoint), scaled (LLaVA-1.5-shaped, random "
                                         "weights), scaled-llava-next / scaled-qwen2-vl / scaled-qwen2.5-vl / "
                                         "scaled-video-llava / scaled-llava-onevision (each family's 7B shape, "
                                         "random weights; "
                                         "docs/efficiency.md), tiny (plumbing "
                                         "check) or a saved model folder of any supported family (with a processor: "
                                         "ShapesVQA questions; without: synthetic prompts of a 336x336 image); "
                                         "repeat for several"),
    method: list[str] = typer.Option(["prumerge+", "fastv"], "--method", "-m",
                                     help="method spec NAME[:key=value,...] (see `vlmprune methods`); repeat for "
                                          "several; the unpruned model is always measured"),
    batch: list[int] = typer.Option([1, 8], "--batch-size", "--batch", "-b", help="batch size; repeat for several"),
    dtype: list[str] = typer.Option(["auto"], "--dtype",
                                    help="fp32, bf16 or auto (default: bf16 and fp32 side by side when this CPU "
                                         "accelerates bf16, as measured at the start; else fp32); repeat for several"),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda / cuda:N where a GPU exists"),
    repeats: int = typer.Option(5, "--repeats", help="timed rounds (median reported)"),
    warmup: int = typer.Option(1, "--warmup", help="untimed rounds first"),
    new_tokens: int = typer.Option(16, "--new-tokens", help="tokens generated per run (decode steps = this - 1)"),
    threads: int = typer.Option(1, "--threads", help="torch threads (the machine is shared: default 1)"),
    memory: bool = typer.Option(True, "--memory/--no-memory",
                                help="peak memory, one fresh subprocess per (model, batch, variant)"),
    seed: int = typer.Option(0, "--seed", help="prompt / pixel seed"),
    scaled_hidden: int = typer.Option(512, "--scaled-hidden", help="scaled model: decoder width (7B: 4096)"),
    scaled_layers: int = typer.Option(32, "--scaled-layers", help="scaled model: decoder layers (7B: 32)"),
    scaled_vision_hidden: int = typer.Option(256, "--scaled-vision-hidden",
                                             help="scaled model: vision width (CLIP-L: 1024)"),
    scaled_vision_layers: int = typer.Option(6, "--scaled-vision-layers",
                                             help="scaled model: vision layers (CLIP-L: 24)"),
    out: Path = typer.Option(Path("out/bench"), "--out", "-o", help="folder for card.json and speedup.png"),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="replace a card already in --out (default: write to a new folder OUT-2, ...)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
) -> None:
    """Time a method against the unpruned model (same process, interleaved rounds) and write the card."""
    from .measure import BenchInterrupted, run_bench
    from .models import ScaledConfig, check_model_name
    from .report import print_card
    from .spec import BenchError, check_batches, check_device, parse_dtypes, parse_methods

    from ..eval.report import run_folder

    console = Console(width=max(Console().width, 170))
    try:  # the cheap checks first, so that a bad option creates no folder
        parse_methods(method), parse_dtypes(dtype), check_device(device), check_batches(list(batch))
        [check_model_name(m) for m in model]
        existed = Path(out).exists()
        out, note = run_folder(out, "card", overwrite)
    except (BenchError, ValueError) as e:
        _fail(str(e))
        return
    if note:
        Console(stderr=True).print(f"note: {note}", markup=False)
    try:
        scaled = ScaledConfig(hidden=scaled_hidden, layers=scaled_layers, vision_hidden=scaled_vision_hidden,
                              vision_layers=scaled_vision_layers)
        with notices_as_lines():  # a model folder's images-only processor: one warning line
            card = run_bench(models=model, methods=method, batches=batch, dtype=dtype, device=device,
                             repeats=repeats, warmup=warmup, new_tokens=new_tokens, threads=threads, memory=memory,
                             seed=seed, scaled=scaled, out=out,
                             command="vlmprune bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
                             if len(sys.argv) > 1 and sys.argv[1] == "bench" else "vlmprune bench",
                             log=None if quiet else (lambda msg: console.log(msg, markup=False)))
    except BenchError as e:  # found before anything was measured: leave no empty folder behind
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        _fail(str(e))
        return
    except BenchInterrupted as e:
        where = (f"the {e.finished} finished (model, dtype, batch) blocks are in {e.path}" if e.path else
                 "no (model, dtype, batch) block had finished: nothing was written")
        typer.secho(f"interrupted: {where}", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(130)
    print_card(card, console)
    console.print(f"wrote {out / 'card.json'} and {card['plot']}")


if __name__ == "__main__":  # pragma: no cover
    app()
