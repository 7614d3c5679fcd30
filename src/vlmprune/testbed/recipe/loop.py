"""The training loop: builds the model, resumes, runs the three stages, checkpoints, saves the result.

Read top to bottom: ``train`` sets up a ``Run`` (model, heads, optimiser, position), then runs
stage 1 (vision tower), stage 2 (projector + decoder) and stage 3 (the [CLS] pathway) through one
optimiser loop, ``run_stage``, each with its own step loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .auxiliary import grounding_loss
from .batch import llm_batch
from .config import TrainConfig, resume_config
from .dropout import sparse_image_batch
from .guide import AttentionGuide
from .projector import standardize_projector
from .vision import VisionHeads, cls_loss, load_vision, mimetic_attention, sincos_positions, vision_batch, vision_loss


class Interrupted(Exception):
    """Raised by ``Run.tick`` once ``stop_after`` optimiser steps are done."""


@dataclass
class Run:
    """A training run in progress: what the stages share and the checkpoint holds.

    ``state`` is the position (``{"stage": 1 | 2 | 3, "step": steps done in that stage}``);
    ``history`` the losses logged since the last checkpoint.
    """

    cfg: TrainConfig
    out: Path
    model: torch.nn.Module
    heads: VisionHeads
    processor: object
    opt: torch.optim.Optimizer
    log: Callable
    stop_after: int | None
    state: dict = field(default_factory=lambda: {"stage": 1, "step": 0})
    history: list = field(default_factory=list)
    steps_done: int = 0

    @property
    def checkpoint(self) -> Path:
        return self.out / "train_state.pt"

    def save(self) -> None:
        """Append ``history`` to ``history.jsonl``, log its recent mean loss, write the checkpoint atomically."""
        with open(self.out / "history.jsonl", "a") as f:
            for h in self.history:
                f.write(json.dumps(h) + "\n")
        if self.history:
            recent = self.history[-20:]
            self.log(f"stage {self.state['stage']} step {self.state['step']}: "
                     f"loss {sum(h['loss'] for h in recent) / len(recent):.4f}")
        self.history.clear()
        tmp = Path(str(self.checkpoint) + ".tmp")
        torch.save({"config": asdict(self.cfg), "model": self.model.state_dict(), "heads": self.heads.state_dict(),
                    "opt": self.opt.state_dict(), "state": self.state}, str(tmp))
        tmp.replace(self.checkpoint)

    def tick(self) -> None:
        """Count one optimiser step; raise ``Interrupted`` after ``stop_after`` of them."""
        self.steps_done += 1
        if self.stop_after is not None and self.steps_done >= self.stop_after:
            raise Interrupted


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``base`` to ``0.1 * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def stage1_optimizer(model, heads: VisionHeads, cfg: TrainConfig):
    """The vision tower and the stage-1 heads train in stage 1."""
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    return torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.01)


def stage2_optimizer(model, cfg: TrainConfig):
    """Everything but the (frozen) vision tower trains in stage 2: projector and decoder."""
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    return torch.optim.AdamW(params, lr=cfg.llm_lr, weight_decay=0.01)


def stage3_optimizer(model, heads: VisionHeads, cfg: TrainConfig):
    """Only the last vision layer, the post-layernorm and the [CLS] head train in stage 3."""
    vision = model.model.vision_tower
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(vision.encoder.layers[-1].parameters()) + list(vision.post_layernorm.parameters()) + \
        list(heads.cls.parameters())
    for p in params:
        p.requires_grad_(True)
    return torch.optim.AdamW(params, lr=cfg.cls_lr, weight_decay=0.01)


def run_stage(run: Run, bar, stage: int, name: str, total: int, base_lr: float, seed_offset: int, step_loss,
              clip: list | None = None) -> None:
    """Optimiser steps from ``run.state["step"]`` to ``total``; ``step_loss(step)`` -> (loss, logged parts).

    Each step sets the learning rate (``lr_at``) and the torch seed from the step index, so a
    resumed run repeats the same steps; gradients are clipped to norm 1 over ``clip`` when given.
    """
    cfg = run.cfg
    task = bar.add_task(name, total=total, completed=run.state["step"], info="")
    while run.state["step"] < total:
        step = run.state["step"]
        for g in run.opt.param_groups:
            g["lr"] = lr_at(step, total, base_lr, cfg.warmup)
        torch.manual_seed(cfg.seed * 100003 + seed_offset + step)
        loss, parts = step_loss(step)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        run.opt.step()
        run.state["step"] += 1
        run.history.append({"stage": stage, "step": step, "loss": float(loss.detach()), **parts})
        info = parts or {"loss": float(loss.detach())}
        bar.update(task, advance=1, info=" ".join(f"{k}={v:.3f}" for k, v in info.items()))
        if run.state["step"] % cfg.checkpoint_every == 0 or run.state["step"] == total:
            run.save()
        run.tick()


def vision_step(run: Run, step: int):
    """Stage 1: the vision loss on the ``step``-th vision batch."""
    pixels, targets = vision_batch(run.cfg, step, run.processor)
    return vision_loss(run.model.model.vision_tower, run.heads, pixels, targets, object_loss=run.cfg.vision_object_loss)


def llm_step(run: Run, guide: AttentionGuide | None, step: int):
    """Stage 2: the answer loss on the ``step``-th conversation batch plus the auxiliaries ``cfg`` turns on."""
    cfg, model = run.cfg, run.model
    batch = llm_batch(cfg, step, run.processor)
    guide_in = batch.pop("guide", None)
    words = batch.pop("patch_words", None)
    ground = batch.pop("ground_words", None)
    keep = batch.pop("keep_image", None)
    if keep is not None:  # background dropout: only the kept image tokens reach the decoder
        batch, words, guide_in = sparse_image_batch(model, batch, keep, words, guide_in)
    projected = []
    hook = (model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: projected.append(o))
            if ground is not None else None)
    try:
        out = model(**batch)
    finally:
        if hook is not None:
            hook.remove()
    loss, parts = out.loss, {}
    if ground is not None:
        gl = grounding_loss(projected[0].reshape(*ground.shape[:2], -1), ground, model.get_input_embeddings().weight)
        loss = loss + cfg.ground_words * gl
        parts["ground"] = float(gl.detach())
    if words is not None:
        pw = F.cross_entropy(out.logits.flatten(0, 1).float(), words.flatten(), ignore_index=-100)
        loss = loss + cfg.patch_words * pw
        parts["patch_words"] = float(pw.detach())
    if guide_in is not None:
        g = guide.loss(**guide_in)
        loss = loss + cfg.guide_weight * g
        parts["guide"] = float(g.detach())
    if keep is not None:
        parts["seq"] = float(batch["attention_mask"].shape[1])
    if parts:
        parts = {"lm": float(out.loss.detach()), **parts}
    return loss, parts


def cls_step(run: Run, step: int):
    """Stage 3: the [CLS] loss on the ``step``-th stage-3 batch (its own range of vision batches)."""
    pixels, targets = vision_batch(run.cfg, 1_000_000 + step, run.processor, batch=run.cfg.cls_batch)
    return cls_loss(run.model.model.vision_tower, run.heads, pixels, targets, run.cfg.cls_attention_weight), {}


def _tokenizer(out: Path):
    """The run folder's tokenizer, built and saved there on the first call."""
    from transformers import PreTrainedTokenizerFast

    from ..model import build_tokenizer

    if (out / "tokenizer").exists():
        return PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    return tokenizer


def start_run(cfg: TrainConfig, log, stop_after: int | None) -> Run:
    """A fresh run (model from ``cfg.seed``, vision initialisations), or the one ``cfg.out`` holds resumed."""
    from ..model import build_model, build_processor

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(out)
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed=cfg.seed, vision=cfg.vision_overrides, text=cfg.text_overrides)
    heads = VisionHeads(model.config.vision_config.hidden_size)
    vision = model.model.vision_tower
    if cfg.vision_pos_init == "sincos":
        sincos_positions(vision)
    if cfg.vision_attn_init == "mimetic":
        mimetic_attention(vision, seed=cfg.seed)
    run = Run(cfg, out, model, heads, processor, stage1_optimizer(model, heads, cfg), log, stop_after)
    if run.checkpoint.exists():
        saved = torch.load(run.checkpoint, weights_only=False)
        run.cfg = resume_config(TrainConfig(**saved["config"]), cfg, saved["state"], log)
        model.load_state_dict(saved["model"])
        heads.load_state_dict(saved["heads"])
        run.state = saved["state"]
        if run.state["stage"] == 2:
            run.opt = stage2_optimizer(model, run.cfg)
        elif run.state["stage"] == 3:
            run.opt = stage3_optimizer(model, heads, run.cfg)
        run.opt.load_state_dict(saved["opt"])
        log(f"resumed from {run.checkpoint} at stage {run.state['stage']} step {run.state['step']}")
    elif cfg.vision_from:
        load_vision(model, heads, cfg.vision_from)
        run.state = {"stage": 1, "step": cfg.vision_steps}  # stage 1 counts as done
        log(f"vision tower taken from {cfg.vision_from}; stage 1 skipped")
    return run


def train(cfg: TrainConfig, *, progress: bool = True, log=print, stop_after: int | None = None):
    """Run (or resume) the three stages; returns the output directory holding the final model.

    ``stop_after`` ends the call after that many optimiser steps, as an interruption would (the
    state of the last checkpoint is what a resume continues from); it then returns None.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = start_run(cfg, log, stop_after)
    cfg, model, vision = run.cfg, run.model, run.model.model.vision_tower
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    try:
        with Progress(*columns, disable=not progress) as bar:
            if run.state["stage"] == 1:  # ---- stage 1: the vision tower, from scratch
                model.train()
                run_stage(run, bar, 1, "stage 1 vision", cfg.vision_steps, cfg.vision_lr, 0,
                          lambda step: vision_step(run, step), clip=list(vision.parameters()))
                run.state = {"stage": 2, "step": 0}
                if cfg.projector_init == "standardize":
                    vision.eval()
                    log(f"projector init: {standardize_projector(model, run.processor, cfg)}")
                run.opt = stage2_optimizer(model, cfg)
                run.save()
            if run.state["stage"] == 2:  # ---- stage 2: projector + decoder, vision tower frozen
                guide_layers = (tuple(cfg.guide_layers) + tuple(cfg.guide_read_layers or ())
                                + (tuple(cfg.guide_position_layers) if cfg.guide_position else ()))
                guide = (AttentionGuide(model, guide_layers, cfg.guide_heads, cfg.guide_target)
                         if cfg.guide_weight else None)
                for p in vision.parameters():
                    p.requires_grad_(False)
                model.train()
                vision.eval()
                run_stage(run, bar, 2, "stage 2 llm", cfg.llm_steps, cfg.llm_lr, 50_000,
                          lambda step: llm_step(run, guide, step),
                          clip=[p for p in model.parameters() if p.requires_grad])
                if guide is not None:
                    guide.remove()
                run.state = {"stage": 3, "step": 0}
                run.opt = stage3_optimizer(model, run.heads, cfg)
                run.save()
            # ---- stage 3: the [CLS] pathway PruMerge reads (last vision layer, post-layernorm, [CLS] head)
            run_stage(run, bar, 3, "stage 3 [CLS]", cfg.cls_steps, cfg.cls_lr, 90_000, lambda step: cls_step(run, step))
    except Interrupted:
        return None
    model.eval()
    final = run.out / "final"
    model.save_pretrained(final)
    processor = run.processor
    processor.save_pretrained(final)
    for folder in (run.out, final):  # the model folder carries its recipe (installed with it)
        (folder / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return final
