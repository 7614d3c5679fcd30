"""``vlmprune train atp``: train ATP-LLaVA's threshold modules inside a model of any supported family, with ``accelerate``.

What one step does (the paper's training objective; machinery: ``integrations/atp.py``):

1. build a batch of ShapesVQA training conversations (scenes generated from step-indexed seeds;
   the processor's chat template when it has one, any family, else the testbed's LLaVA-1.5
   template; loss on the answer tokens only; right padding; ``train/data.py``), together with
   each sample's instruction rows T: the first turn's tokens after the image, up to its
   generation prompt ("ASSISTANT:") — the rows inference scores with, never the system prompt or
   an answer;
2. run the model's forward with the ATP modules attached in *soft* mode: nothing is dropped, each
   module's cumulative soft mask enters every later layer's attention as ``log(M + 1e-6)`` on the
   visual keys (a float sdpa mask; the model is never switched to eager attention);
3. ``loss = task + lambda_atp * L_atp + lambda_target * L_target`` on the all-layer average
   token count (straight-through hard count by default, ``ATPPruner.straight_through``); tau is
   annealed from ``tau`` to ``tau_final``;
4. update the ATP modules (``--train llm-frozen``, the default) or also LoRA adapters on the LLM's
   attention and MLP projections (``--train lora``, ``peft``).

Runs on one CPU, one GPU or many processes (``accelerate launch``): each process draws its own
samples (global sample index = step x global batch + rank x batch + i), gradients are averaged
by DDP over a wrapper module holding the model and the pruner. Checkpoints every
``checkpoint_every`` steps hold only the trainable tensors and the optimizer
(``train_state.pt``), plus the ATP weights themselves, so a run resumes exactly where it
stopped and a half-trained run is already loadable by ``vlmprune.apply(model, "atp",
checkpoint=OUT)``. At the end the ATP weights are written to ``OUT``, LoRA adapters to
``OUT/lora`` and, with LoRA, the merged model to ``OUT/model``; ``summary.json`` reports the
evaluated (hard-pruned) average token count on held-out scenes.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..methods import atp as A
from ..eval.prompts import prompt_style
from .data import (SCENE_BASE, chat_segments, encode_atp_conversation, make_batch,  # noqa: F401 (re-exported)
                   make_chat_batch, sample_conversation, to_model, training_batch, training_style, video_view)
from .loop import STATE_NAME, append_history, load_model, lr_factor, read_state, world_size_from_env, write_state

TRAIN_MODES = ("llm-frozen", "lora")
# fields that may change when a run is resumed (the rest must match the checkpoint)
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "eval_n", "out", "stop_after")


def _opt(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ATPTrainConfig:
    """Options of ``vlmprune train atp`` (validated on construction)."""

    out: str = _opt("runs/atp", "run folder: checkpoints, final ATP weights, summary (resumes if present)")
    model: str | None = _opt(None, "local path or hub id of a model of any supported family (a chat template, or LLaVA-1.5); None = the testbed")
    paper_target: float | None = _opt(144.0, "target as the paper states it (all-layer average of a 32-layer "
                                            "LLaVA-1.5 with modules after 2,8,14,20,26), translated to this "
                                            "model by equivalent_target(); ignored when target is set")
    target: float | None = _opt(None, "target all-layer average visual tokens on this model, literally")
    layers: tuple[int, ...] | None = _opt(None, "decoder layers the modules follow; None = scale_layers()")
    steps: int = _opt(300, "optimizer steps")
    batch_size: int = _opt(8, "samples per process per step")
    lr: float = _opt(3e-4, "learning rate of the ATP modules (AdamW); faster rates overshoot the target "
                           "and can saturate the thresholds")
    lora_lr: float = _opt(2e-4, "learning rate of the LoRA adapters")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_beta2: float = _opt(0.95, "AdamW beta2: a short second-moment memory, because a threshold's gradient "
                                   "shrinks by orders of magnitude when it leaves the score range (sigmoid "
                                   "saturation) and 0.999 would then freeze it for hundreds of steps")
    warmup: int = _opt(10, "linear warm-up steps, then cosine to 10%")
    train: str = _opt("llm-frozen", "llm-frozen (only ATP modules) | lora (also LoRA adapters on the LLM)")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: int = _opt(16, "LoRA alpha")
    fixed_ratio: bool = _opt(False, "ablation: one fixed keep ratio per module, solved for the target")
    score: str = _opt("both", "redundancy score: both | self | cross")
    redundant: bool = _opt(True, "redundant-pruning branch (theta_r)")
    spatial: bool = _opt(True, "spatial-pruning branch (theta_s)")
    hidden: int = _opt(256, "threshold MLP width")
    tau: float = _opt(0.1, "soft-mask temperature at the start")
    tau_final: float | None = _opt(0.02, "temperature at the end (exp annealing); None = constant")
    lambda_atp: float = _opt(0.05, "weight of L_atp")
    lambda_target: float = _opt(1.0, "weight of L_target")
    budget_count: str = _opt("st", "count in the budget loss: st (hard value, soft gradient) | soft")
    target_control: str = _opt("dual", "dual: add mu * (Nbar - target) / N with mu adapted by dual ascent "
                                       "on the measured average (lands on the target whatever the task "
                                       "loss pulls); fixed: only the lambda_target * |.| term")
    lambda_range: float = _opt(1.0, "weight of the hinge keeping each threshold within 2 tau of its scores' "
                                    "range, where its soft mask still has a gradient (0 = off)")
    dual_lr: float = _opt(0.05, "dual ascent rate: mu += dual_lr * (batch average - target) / target per step, "
                                "from the first step whose average reaches the target on (anti-windup)")
    turns: int = _opt(1, "question-answer turns per image (T is always the first turn's question)")
    text_prob: float = _opt(0.5, "probability that a training scene carries a text code")
    videos: int = _opt(0, "train on videos: each scene a still video of this many frames (families with video "
                          "inputs, through the processor's chat template and video processor); 0 = images")
    seed: int = _opt(0, "seed of the data stream and of the module initialisation")
    checkpoint_every: int = _opt(50, "save a resumable checkpoint every N steps")
    eval_n: int = _opt(96, "held-out val prompts for the final hard-pruning token count (0 = skip)")
    dtype: str = _opt("float32", "model weights: float32 | bfloat16 | float16 (ATP modules stay float32)")
    save_merged: bool = _opt(True, "with LoRA: also write the merged model to OUT/model")
    stop_after: int | None = _opt(None, "stop this invocation after N steps (checkpointed; rerun to resume), "
                                        "e.g. to time-box a session; None = run to the end")

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and self.lora_lr > 0, "learning rates must be > 0"),
            (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (0.0 < self.adam_beta2 < 1.0, f"adam_beta2 must be in (0, 1), got {self.adam_beta2}"),
            (self.train in TRAIN_MODES, f"train must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}"),
            (self.score in A.SCORE_MODES, f"score must be one of {', '.join(A.SCORE_MODES)}, got {self.score!r}"),
            (self.redundant or self.spatial, "redundant and spatial cannot both be disabled"),
            (self.budget_count in ("st", "soft"), f"budget_count must be st or soft, got {self.budget_count!r}"),
            (self.target_control in ("dual", "fixed"), f"target_control must be dual or fixed, "
                                                       f"got {self.target_control!r}"),
            (self.dual_lr >= 0, f"dual_lr must be >= 0, got {self.dual_lr}"),
            (self.lambda_range >= 0, f"lambda_range must be >= 0, got {self.lambda_range}"),
            (self.turns >= 1, f"turns must be >= 1, got {self.turns}"),
            (0.0 <= self.text_prob <= 1.0, f"text_prob must be in [0, 1], got {self.text_prob}"),
            (isinstance(self.videos, int) and self.videos >= 0, f"videos must be a frame count >= 0, got {self.videos!r}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.eval_n >= 0, f"eval_n must be >= 0, got {self.eval_n}"),
            (self.stop_after is None or self.stop_after >= 1, f"stop_after must be >= 1, got {self.stop_after}"),
            (self.dtype in ("float32", "bfloat16", "float16"), f"dtype must be float32, bfloat16 or float16, "
                                                             f"got {self.dtype!r}"),
            (self.target is not None or self.paper_target is not None or not self.fixed_ratio,
             "the fixed-ratio ablation needs a target (the ratio is solved for it)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        for name in ("target", "paper_target"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a token count > 0, got {v!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "ATPTrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ================================================================================ setup


def resolve_target(cfg: ATPTrainConfig, layers: tuple[int, ...], num_layers: int, num_patches: int) -> float:
    """The all-layer average target on this model (``target``, or ``paper_target`` translated)."""
    if cfg.target is not None:
        return float(cfg.target)
    # the paper's count is out of 576 patches: keep the same fraction on other grids
    scaled = cfg.paper_target * num_patches / 576
    return A.equivalent_target(scaled, to_layers=layers, to_num_layers=num_layers, num_patches=num_patches)


def build_pruner(cfg: ATPTrainConfig, num_layers: int, num_patches: int, grid: tuple[int, int]) -> A.ATPPruner:
    layers = A.check_layers(cfg.layers if cfg.layers is not None else A.scale_layers(num_layers), num_layers)
    target = resolve_target(cfg, layers, num_layers, num_patches)
    if cfg.target is not None:  # the user's own count: its error names the option
        try:
            A.check_target(target, layers, num_layers, num_patches)
        except ValueError as e:
            raise ValueError(f"--target {cfg.target:g}: {e}") from None
    ratio = A.fixed_ratio_for_target(target, layers, num_layers, num_patches) if cfg.fixed_ratio else None
    config = A.ATPConfig(num_layers=num_layers, layers=tuple(layers), num_patches=num_patches, grid=tuple(grid),
                         hidden=cfg.hidden, tau=cfg.tau, tau_final=cfg.tau_final, lambda_atp=cfg.lambda_atp,
                         lambda_target=cfg.lambda_target, target=target, score=cfg.score,
                         redundant=cfg.redundant, spatial=cfg.spatial, fixed_ratio=ratio)
    torch.manual_seed(cfg.seed)
    return A.ATPPruner(config)


# ================================================================================ the step module


class ATPTrainStep(nn.Module):
    """One training forward: the model with ATP attached in soft mode -> (loss, parts).

    A module so that ``accelerate`` / DDP can wrap it: it owns the model (frozen, or with LoRA)
    and the pruner (the trainable ATP modules), whose gradients DDP averages. ``images``: the
    image keywords of the model's forward (``pixel_values``, or Video-LLaVA's
    ``pixel_values_images``; LLaVA-NeXT ``image_sizes``, Qwen2-VL ``image_grid_thw`` and
    ``mm_token_type_ids``), passed through. With samples of different
    visual counts (other families) the budget counts each sample against its own initial count
    (``ATPContext.initial``), and ``parts`` (task loss, L_atp, L_target, average, soft average,
    per-module counts) give the averages and counts in the reference grid's units: each sample's
    fraction of its own visual tokens times N, the units of the target.
    """

    def __init__(self, model: nn.Module, pruner: A.ATPPruner, handle: Any, lambda_range: float = 0.0) -> None:
        super().__init__()
        self.lambda_range = lambda_range
        self.model = model
        self.pruner = pruner
        self._handle = handle  # plain attribute: the ATPHandle (hooks on the model's modules)

    def forward(self, input_ids, attention_mask, labels, instruction, mu: float = 0.0, **images):
        method = self._handle.method_obj
        with method.instruction_rows(instruction):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False,
                             **images)
        ctx = self._handle.state.context
        budget = self.pruner.budget_loss(ctx.counts, ctx.initial)
        loss = out.loss + budget.total
        c = self.pruner.config
        if self.lambda_range and ctx.range_terms:
            loss = loss + self.lambda_range * torch.stack(ctx.range_terms, dim=1).sum(1).mean()
        if mu and c.target is not None:  # Lagrangian term of the constraint Nbar = target (mu from dual ascent)
            if ctx.initial is None:
                loss = loss + mu * (budget.average.mean() - c.target) / c.num_patches
            else:
                loss = loss + mu * (budget.fraction.mean() - c.target / c.num_patches)
        with torch.no_grad():
            # samples with their own visual counts: averages and counts in the reference grid's units
            # (fraction of the sample's own tokens x N), the units of the target
            scale = 1.0 if ctx.initial is None else (c.num_patches / ctx.initial)[:, None]  # [B, 1]
            soft_avg = self.pruner.average_tokens([c.detach() for c in ctx.soft_counts], ctx.initial)[:, None]
            counts = torch.stack([c.detach().float() for c in ctx.counts], dim=1)  # [B, K]
            average = budget.average.detach()[:, None]
            soft_avg, counts, average = ((x * scale).mean(0) for x in (soft_avg, counts, average))
        parts = torch.cat([torch.stack([out.loss.detach(), budget.l_atp.detach(), budget.l_target.detach()]),
                           average, soft_avg, counts])
        return loss, parts


# ================================================================================ training


def _trainable(named: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in named if p.requires_grad}


def train_atp(cfg: ATPTrainConfig, *, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train (or resume) ATP modules per ``cfg``; returns the output folder with the final weights."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs
    from ..integrations.atp import attach_atp
    from ..integrations.base import get_adapter

    # several processes on a machine without CUDA (`accelerate launch --multi_gpu` / torchrun / mpirun
    # on CPUs): tell accelerate to use its multi-CPU (gloo) mode, which it only picks with cpu=True
    multi_cpu = not torch.cuda.is_available() and world_size_from_env() > 1
    accelerator = Accelerator(cpu=multi_cpu,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main = accelerator.is_main_process
    say = log if main else (lambda _msg: None)
    out = Path(cfg.out)
    state_path = out / STATE_NAME
    saved = read_state(out, ATPTrainConfig, cfg, RESUMABLE_CHANGES)
    if saved is not None:
        if saved["world_size"] != accelerator.num_processes:
            say(f"note: the checkpoint was written by {saved['world_size']} process(es), resuming on "
                f"{accelerator.num_processes}: the data stream continues from the same sample index")

    model, processor = load_model(cfg.model, cfg.dtype)
    adapter = get_adapter(model)
    num_layers = len(adapter.get_decoder_layers(model))
    grid = adapter.patch_grid(model)  # the reference grid (any-res / dynamic families: images have their own)
    num_patches = grid[0] * grid[1]
    fixed = adapter.fixed_image_tokens(model)  # LLaVA-1.5: every image gets the same count
    if fixed is not None and fixed != num_patches:
        raise ValueError(f"the model feeds {fixed} tokens per image on a {grid[0]} x {grid[1]} grid; ATP "
                         "needs the patch tokens only (vision_feature_select_strategy='default')")
    chat = training_style(processor, fixed, adapter.family)
    image_token_id = adapter.image_token_id(model)
    if cfg.videos:  # the videos' placeholders; the family and its processor must take videos
        if not chat:
            raise ValueError(f"--videos {cfg.videos} needs a processor with a chat template")
        image_token_id = video_view(model, processor, cfg.videos).image_token_id(model)
    pruner = build_pruner(cfg, num_layers, num_patches, grid)
    c = pruner.config
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # frozen parts: no dropout
    peft_model = None
    inner = model
    if cfg.train == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                          target_modules=adapter.lora_target_modules(model))
        torch.manual_seed(cfg.seed + 1)
        peft_model = get_peft_model(model, lcfg)
        inner = peft_model.get_base_model()  # LoRA layers replace the projections in place: attach after
    handle = attach_atp(inner, pruner, mode="soft", tau=cfg.tau, budget_count=cfg.budget_count)
    step_module = ATPTrainStep(peft_model if peft_model is not None else model, pruner, handle, cfg.lambda_range)
    method = handle.method_obj

    lora_params = _trainable(peft_model.named_parameters()) if peft_model is not None else {}
    groups = []
    if list(pruner.parameters()):
        groups.append({"params": list(pruner.parameters()), "lr": cfg.lr, "base_lr": cfg.lr})
    if lora_params:
        groups.append({"params": list(lora_params.values()), "lr": cfg.lora_lr, "base_lr": cfg.lora_lr})
    say(f"ATP: modules after layers {list(c.layers)} of {num_layers}, N = {num_patches} ({grid[0]}x{grid[1]}), "
        f"target all-layer average {c.target:.2f} (minimum reachable "
        f"{A.min_average_tokens(c.layers, num_layers, num_patches):.2f}"
        + ("" if fixed is not None else f"; images have their own token counts: the target is "
           f"{100 * c.target / num_patches:.1f}% of each image's own, averages are shown in units of N") + "), "
        + (f"fixed ratio {c.fixed_ratio:.4f} -> counts {pruner.fixed_counts}" if not c.learned else
           f"score={c.score}, redundant={c.redundant}, spatial={c.spatial}")
        + f"; trainable: {sum(p.numel() for g in groups for p in g['params'])} parameters ({cfg.train})")

    out.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "mu": 0.0, "dual_on": False, "seconds": 0.0}  # seconds: training time over all invocations
    history: list[dict] = []
    if not groups:  # fixed ratio with a frozen LLM: nothing to learn
        say("nothing to train (fixed-ratio modules and a frozen LLM); writing the modules as they are")
        state["step"] = cfg.steps
        opt = None
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.adam_beta2))
        if saved is not None:
            pruner.load_state_dict(saved["pruner"])
            if lora_params:
                peft_model.load_state_dict(saved["lora"], strict=False)
            opt.load_state_dict(saved["opt"])
            state["step"] = int(saved["step"])
            state["mu"] = float(saved.get("mu", 0.0))
            state["dual_on"] = bool(saved.get("dual_on", False))
            state["seconds"] = float(saved.get("seconds", 0.0))
            say(f"resumed from {state_path} at step {state['step']}")
        step_module, opt = accelerator.prepare(step_module, opt)

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        if not main:
            history.clear()
            return
        append_history(out, history)
        if history:
            recent = history[-10:]
            say(f"step {state['step']}: loss {sum(h['loss'] for h in recent) / len(recent):.4f}, "
                f"task {sum(h['task'] for h in recent) / len(recent):.4f}, "
                f"avg tokens {sum(h['avg'] for h in recent) / len(recent):.1f} (target {c.target:.1f})")
        history.clear()
        pruner.save(out)
        payload = {"config": asdict(cfg), "step": state["step"], "mu": state["mu"], "dual_on": state["dual_on"],
                   "seconds": elapsed(),
                   "pruner": pruner.state_dict(),
                   "lora": {n: p.detach().cpu() for n, p in lora_params.items()} if lora_params else None,
                   "opt": opt.state_dict() if opt is not None else None, "world_size": accelerator.num_processes}
        write_state(out, payload)
        if peft_model is not None:
            peft_model.save_pretrained(out / "lora")

    t0 = time.time()

    def elapsed() -> float:  # training seconds, including the invocations this run resumed from
        return round(state["seconds"] + time.time() - t0, 1)

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.batch_size * world
    from .loop import progress as progress_bar

    with progress_bar(progress and main) as bar:
        task = bar.add_task("train atp", total=cfg.steps, completed=state["step"], info="")
        stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, state["step"] + cfg.stop_after)
        while state["step"] < stop:
            step = state["step"]
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, cfg.steps, cfg.warmup)
            method.tau = pruner.tau_at(step, cfg.steps)
            torch.manual_seed(cfg.seed * 100003 + step)
            start = step * global_batch + rank * cfg.batch_size
            batch = training_batch(processor, list(range(start, start + cfg.batch_size)), chat=chat,
                                   image_token_id=image_token_id, num_image_tokens=num_patches, turns=cfg.turns,
                                   text_prob=cfg.text_prob, video_frames=cfg.videos)
            batch = to_model(batch, accelerator.device, model.dtype)
            loss, parts = step_module(**batch, mu=state["mu"])
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            opt.step()
            parts = accelerator.reduce(torch.cat([loss.detach()[None], parts]), reduction="mean").tolist()
            mu = state["mu"]
            if cfg.target_control == "dual" and c.target is not None and c.learned:
                # dual ascent on the measured (all-process) batch average, identical on every process; it
                # starts once the average first reaches the target (no wind-up while the thresholds warm up)
                state["dual_on"] = state["dual_on"] or parts[4] <= c.target
                if state["dual_on"]:
                    state["mu"] = mu + cfg.dual_lr * (parts[4] - c.target) / c.target
            state["step"] += 1
            rec = {"step": step, "loss": parts[0], "task": parts[1], "l_atp": parts[2], "l_target": parts[3],
                   "avg": parts[4], "soft_avg": parts[5], "module_counts": parts[6:], "tau": method.tau,
                   "lr": opt.param_groups[0]["lr"], "mu": mu, "time": round(time.time() - t0, 2)}
            history.append(rec)
            bar.update(task, advance=1, info=f"loss={parts[0]:.3f} task={parts[1]:.3f} avg={parts[4]:.1f}")
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] in (cfg.steps, stop):
                save_checkpoint()
    if opt is None:
        save_checkpoint()
    if state["step"] < cfg.steps:
        say(f"stopped after step {state['step']} of {cfg.steps} (--stop-after); run the same command to resume")
        handle.remove()
        accelerator.wait_for_everyone()
        return out

    # ---- evaluated (hard) token count on held-out prompts, then the artefacts
    summary: dict[str, Any] = {"config": asdict(cfg), "atp_config": c.to_dict(), "target": c.target,
                               "steps": state["step"], "world_size": world, "seconds": elapsed()}
    accelerator.wait_for_everyone()
    if main:
        method.mode = "hard"
        if cfg.eval_n:
            summary["eval"] = hard_token_count(inner, processor, handle, cfg.eval_n, video_frames=cfg.videos)
            e = summary["eval"]
            say(f"held-out hard pruning ({cfg.eval_n} val prompts): all-layer average {e['average']:.2f} "
                f"(target {c.target:.2f}, {100 * (e['average'] / c.target - 1):+.1f}%), per module "
                f"{[round(x, 1) for x in e['module_counts']]}")
        handle.remove()
        pruner.save(out)
        if peft_model is not None:
            peft_model.save_pretrained(out / "lora")
            if cfg.save_merged:
                merged = peft_model.merge_and_unload()
                merged.save_pretrained(out / "model")
                processor.save_pretrained(out / "model")
                summary["merged_model"] = str(out / "model")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        say(f"ATP weights written to {out} (load with vlmprune.apply(model, 'atp', checkpoint={str(out)!r}))")
    else:
        handle.remove()
    accelerator.wait_for_everyone()
    return out


def hard_token_count(model: Any, processor: Any, handle: Any, n: int, *, batch_size: int = 16,
                     split: str = "val", start: int = 500_000, video_frames: int = 0) -> dict[str, Any]:
    """Prefill ``n`` held-out single-turn prompts with hard pruning; average kept counts
    (``video_frames`` > 0: each scene a still video of that many frames, through the chat template)."""
    from ..testbed.scenes import make_scene, split_seed

    tok = processor.tokenizer
    tok.padding_side = "left"
    style = prompt_style(processor)  # the chat template when the processor has one, else the testbed's
    handle.stats.reset()
    for s in range(0, n, batch_size):
        images, prompts = [], []
        for i in range(s, min(n, s + batch_size)):
            seed = split_seed(split, start + i)
            rnd = random.Random(seed)
            scene = make_scene(seed, text=rnd.random() < 0.5)
            (q, _a), = sample_conversation(scene, rnd, 1)
            images.append(scene.image)
            prompts.append(chat_segments(processor, [(q, "")], "video")[0] if video_frames else style.build(q))
        pixels = {"videos": [[im] * video_frames for im in images]} if video_frames else {"images": images}
        inputs = processor(**pixels, text=prompts, padding=True, add_special_tokens=style.add_special_tokens,
                           return_tensors="pt")
        inputs = to_model(dict(inputs), model.device, model.dtype)
        with torch.no_grad():
            model(**inputs, use_cache=False)
    st = handle.stats
    # "average" in the target's units: each image's all-layer average as a fraction of its own visual
    # tokens, times N (equal to the plain average when every image has N tokens, LLaVA-1.5)
    n_ref = handle.method_obj.pruner.config.num_patches
    n0s = st.initial_per_image
    ref = [a / n0 * n_ref for a, n0 in zip(st.atp_average_per_image, n0s)]
    per_module = [[c / n0 * n_ref for c in row] for row, n0 in zip(st.module_counts_per_image, n0s)]
    out = {"n": n, "average": sum(ref) / len(ref),
           "module_counts": [sum(r[k] for r in per_module) / len(per_module) for k in range(len(per_module[0]))],
           "min": min(ref), "max": max(ref)}
    if any(n0 != n_ref for n0 in n0s):
        out.update(visual_tokens=sum(n0s) / len(n0s), kept_average=st.mean_atp_average,
                   kept_module_counts=st.mean_module_counts,
                   units=f"average / min / max / module_counts: fractions of each image's own visual tokens x N = "
                         f"{n_ref}; kept_*: tokens")
    return out
