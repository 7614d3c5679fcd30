"""``vlmprune train ...``: training commands for learnable methods (a typer sub-app, mounted by ``vlmprune.cli``).

Also runnable on its own, which is how ``accelerate launch`` starts it on several processes::

    accelerate launch --num_processes 2 -m vlmprune.train.cli atp --out runs/atp-144
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from ..clitools import dtype_option, fail, note, notices_as_lines

app = typer.Typer(no_args_is_help=True, help="Train learnable pruning methods (ATP-LLaVA, with accelerate) and LoRA adapters for a method.")


_fail = fail


def _train(make_config: Callable[[], Any], train: Callable[[Any], Path], model: Optional[str] = None) -> None:
    """Build the config and train (on ``model``: a folder or hub id, None for the testbed); a
    ``ValueError`` / ``FileNotFoundError`` of either is a CLI error."""
    from ..integrations.compat import quiet_loading

    from ..testbed.model import hub_lookup_note

    quiet_loading()  # no loading bars: an error is the first line on stderr
    if hub := hub_lookup_note(model):
        note(hub)
    try:
        with notices_as_lines():
            final = train(make_config())
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"done: {final}")


def _layers(spec: Optional[str]) -> Optional[tuple[int, ...]]:
    if spec is None or spec.strip() in ("", "auto"):
        return None
    try:
        return tuple(int(x) for x in spec.replace(" ", "").split(","))
    except ValueError:
        _fail(f"--layers must be comma-separated layer indices, e.g. 0,1,2,3,4; got {spec!r}")


@app.command("atp")
def atp_cmd(
    out: Path = typer.Option(Path("runs/atp"), help="run folder (checkpoints, ATP weights; resumes if present)"),
    model: Optional[str] = typer.Option(None, "--model", "-M",
                                        help="local folder or hub id of a model of any supported family whose processor has a chat template, or of a LLaVA-1.5 model (ShapesVQA template; default: the testbed)"),
    target: Optional[float] = typer.Option(None, help="target all-layer average visual tokens on THIS model"),
    paper_target: float = typer.Option(144.0, help="target as in the paper (32-layer LLaVA-1.5), translated to this "
                                                   "model (testbed: 144 -> 178.8, 88 -> 127.3); unused with --target"),
    layers: Optional[str] = typer.Option(None, help="decoder layers the modules follow, e.g. 0,1,2,3,4 "
                                                    "(default: 2,8,14,20,26 of 32 scaled to the model)"),
    steps: int = typer.Option(300, help="optimizer steps"),
    batch_size: int = typer.Option(8, "--batch-size", help="samples per process per step"),
    lr: float = typer.Option(3e-4, help="learning rate of the ATP modules"),
    train: str = typer.Option("llm-frozen", help="llm-frozen (ATP modules only) | lora (also LoRA on the LLM)"),
    lora: bool = typer.Option(False, "--lora", help="shorthand for --train lora"),
    lora_r: int = typer.Option(8, help="LoRA rank"),
    lora_lr: float = typer.Option(2e-4, help="LoRA learning rate"),
    fixed_ratio: bool = typer.Option(False, "--fixed-ratio", help="ablation: one fixed keep ratio per module "
                                                                   "(solved for the target), no thresholds"),
    score: str = typer.Option("both", help="redundancy score: both | self | cross (ablations)"),
    redundant: bool = typer.Option(True, "--redundant/--no-redundant", help="redundant-pruning branch"),
    spatial: bool = typer.Option(True, "--spatial/--no-spatial", help="spatial-pruning branch"),
    tau: float = typer.Option(0.1, help="soft-mask temperature at the start"),
    tau_final: float = typer.Option(0.02, help="temperature at the end (exp annealing); 0 = keep tau constant"),
    lambda_atp: float = typer.Option(0.05, help="weight of L_atp"),
    lambda_target: float = typer.Option(1.0, help="weight of L_target"),
    budget_count: str = typer.Option("st", help="count in the budget loss: st (hard value, soft gradient) | soft"),
    target_control: str = typer.Option("dual", help="dual: adapt a multiplier on (average - target) until the "
                                                    "measured average sits on the target | fixed: the budget loss only"),
    dual_lr: float = typer.Option(0.05, help="dual ascent rate of that multiplier"),
    lambda_range: float = typer.Option(1.0, help="weight of the hinge keeping thresholds near their scores "
                                                 "(against saturated, frozen thresholds; 0 = off)"),
    turns: int = typer.Option(1, help="question-answer turns per training image"),
    videos: int = typer.Option(0, help="train on videos: each scene a still video of N frames (Qwen2-VL / "
                                       "Qwen2.5-VL, Video-LLaVA, LLaVA-OneVision; needs the processor's video "
                                       "processor, i.e. torchvision); 0 = images"),
    seed: int = typer.Option(0, help="seed of the modules' initialisation and of the data order"),
    checkpoint_every: int = typer.Option(50, help="save a resumable checkpoint every N steps"),
    eval_n: int = typer.Option(96, help="held-out prompts for the final hard-pruning token count (0 = skip)"),
    dtype: str = typer.Option("fp32", help="model weights: fp32 | bf16 | fp16 (ATP modules stay fp32)"),
    save_merged: bool = typer.Option(True, "--save-merged/--no-save-merged",
                                     help="with LoRA: also write the merged model to OUT/model"),
    stop_after: Optional[int] = typer.Option(None, help="stop after N steps in this invocation (checkpointed; "
                                                        "rerun the same command to resume)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
):
    """Train ATP modules (soft masks + budget loss) inside a model of any supported family; write weights loadable by
    vlmprune.apply(model, "atp", checkpoint=OUT) or `-m atp:checkpoint=OUT`. Resumes from OUT/train_state.pt."""
    from .atp import ATPTrainConfig, train_atp

    dtype = dtype_option(dtype)
    if lora:
        if train not in ("llm-frozen", "lora"):
            _fail(f"--lora conflicts with --train {train}")
        train = "lora"
    _train(lambda: ATPTrainConfig(
        out=str(out), model=model, paper_target=paper_target, target=target, layers=_layers(layers), steps=steps,
        batch_size=batch_size, lr=lr, train=train, lora_r=lora_r, lora_alpha=2 * lora_r, lora_lr=lora_lr,
        fixed_ratio=fixed_ratio, score=score, redundant=redundant, spatial=spatial, tau=tau,
        tau_final=tau_final if tau_final > 0 else None, lambda_atp=lambda_atp, lambda_target=lambda_target,
        budget_count=budget_count, target_control=target_control, dual_lr=dual_lr, lambda_range=lambda_range,
        turns=turns, videos=videos, seed=seed, checkpoint_every=checkpoint_every, eval_n=eval_n, dtype=dtype,
        save_merged=save_merged, stop_after=stop_after), lambda cfg: train_atp(cfg, progress=progress), model)


@app.command("lora")
def lora_cmd(
    method: str = typer.Option("prumerge", "--method", "-m",
                               help="vision-stage method spec applied while training: prumerge, prumerge+, "
                                    "prumerge+:keep=144, ... (sequential:keep=1.0 = the no-pruning control)"),
    out: Path = typer.Option(Path("runs/lora"), help="run folder (adapters, checkpoint; resumes if present)"),
    model: Optional[str] = typer.Option(None, "--model", "-M", help="local model folder of any supported family whose processor has a chat template, or a LLaVA-1.5 one (default: the testbed)"),
    steps: int = typer.Option(250, help="optimizer steps"),
    batch_size: int = typer.Option(8, "--batch-size", help="samples per step"),
    lr: float = typer.Option(2e-4, help="peak learning rate (warm-up, then cosine to 0)"),
    warmup: int = typer.Option(8, help="linear warm-up steps"),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay"),
    max_grad_norm: float = typer.Option(1.0, help="gradient-norm clipping (0 = off)"),
    lora_r: int = typer.Option(16, help="LoRA rank"),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA alpha (default: 2 x rank, LLaVA's recipe)"),
    lora_dropout: float = typer.Option(0.05, help="LoRA dropout"),
    targets: Optional[str] = typer.Option(None, help="comma-separated paths inside a decoder layer, e.g. "
                                                     "self_attn.q_proj,self_attn.v_proj (default: the model "
                                                     "family's attention + MLP projections)"),
    turns: int = typer.Option(1, help="question-answer turns per training image"),
    seed: int = typer.Option(0, help="seed of the data order, LoRA initialisation and dropout"),
    checkpoint_every: int = typer.Option(25, help="save adapters + a resumable checkpoint every N steps"),
    dtype: str = typer.Option("fp32", help="model weights: fp32 | bf16 | fp16"),
    stop_after: Optional[int] = typer.Option(None, help="stop after N steps in this invocation (checkpointed; "
                                                        "rerun the same command to resume)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
):
    """Fine-tune LoRA adapters on the LLM with a vision-stage method applied (the PruMerge paper's Table 6);
    write adapters loadable with the method: `-m prumerge:lora=OUT`. Resumes from OUT/train_state.pt."""
    from ..integrations.compat import quiet_loading
    from .lora import LoraTrainConfig, train_lora

    quiet_loading()
    dtype = dtype_option(dtype)
    target_paths = None
    if targets is not None:
        target_paths = tuple(t.strip() for t in targets.split(",") if t.strip())
        if not target_paths:
            _fail(f"--targets must name module paths, e.g. self_attn.q_proj,self_attn.v_proj; got {targets!r}")
    _train(lambda: LoraTrainConfig(
        method=method, out=str(out), model=model, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, lora_r=lora_r,
        lora_alpha=float(2 * lora_r if lora_alpha is None else lora_alpha), lora_dropout=lora_dropout,
        lora_targets=target_paths, turns=turns, seed=seed, checkpoint_every=checkpoint_every, dtype=dtype,
        stop_after=stop_after), lambda cfg: train_lora(cfg, progress_bar=progress), model)


@app.command("atp-viz")
def atp_viz_cmd(
    checkpoint: Path = typer.Argument(..., help="ATP run folder (atp_config.json + atp_weights.safetensors)"),
    model: Optional[str] = typer.Option(None, "--model", "-M",
                                        help="LLaVA model (default: the testbed; a LoRA run: CHECKPOINT/model)"),
    out: Path = typer.Option(Path("out/atp-viz"), help="output folder for the figures and JSON"),
    seeds: List[int] = typer.Option([0, 1, 2, 3], "--seed", help="scene seeds (test split) for the overlay figure"),
    n: int = typer.Option(240, help="scenes for the kept-count vs complexity plot"),
    batch_size: int = typer.Option(16, "--batch-size", help="images per forward (>= 1)"),
):
    """Figure-4 style overlays (kept tokens at each module, easy vs cluttered scenes) and the kept-count
    vs scene-complexity plot."""
    from ..viz.atp import run_viz

    try:
        paths = run_viz(checkpoint, model=model, out=out, seeds=seeds, n=n, batch_size=batch_size)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    for p in paths:
        typer.echo(f"wrote {p}")


if __name__ == "__main__":  # pragma: no cover
    app()
