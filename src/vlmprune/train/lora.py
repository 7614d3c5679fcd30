"""``vlmprune train lora``: fine-tune LoRA adapters on the LLM with a vision-stage method applied.

The counterpart of the PruMerge paper's Table 6 (PruMerge + one epoch of LoRA fine-tuning). One
step:

1. a batch of ShapesVQA training conversations (``train/data.py``: train-split scenes from
   step-indexed seeds; the processor's chat template when it has one, any family, else the
   testbed's LLaVA-1.5 template; loss on the answer tokens, right padding);
2. the model's forward with the method (``--method``, any vision-stage spec, e.g.
   ``prumerge+:keep=144``) attached through ``vlmprune.apply``: the LLM sees only the method's
   tokens, and the vision stage rewrites ``labels`` with the sequence;
3. the model's own next-token loss, backward into the LoRA adapters only (``integrations/lora.py``:
   peft LoRA on the family adapter's ``lora_targets``, the decoder layers' attention and MLP
   projections; vision tower, projector and the base LLM weights frozen), gradient-norm clipping,
   AdamW with linear warm-up and a cosine schedule to 0 (LLaVA's recipe).

Single process. Every ``checkpoint_every`` steps (and at the end) the run folder gets the
adapters (peft format: ``adapter_config.json`` + ``adapter_model.safetensors``),
``train_state.pt`` (the LoRA tensors, the optimizer, the step, the training
seconds) and ``history.jsonl``; rerunning the same command resumes where it stopped, and the data
stream and dropout continue exactly (seeded per step), so an interrupted run ends bit-identical to
an uninterrupted one. ``summary.json`` is written when the run finishes. Evaluate with the method
and the adapters: ``vlmprune eval -m prumerge:lora=OUT``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch

from .data import to_model, training_batch, training_style
from .loop import append_history, load_model, lr_factor, progress, read_state, write_state

__all__ = ["LoraTrainConfig", "train_lora"]

# fields that may change when a run is resumed (the rest must match the checkpoint)
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "out", "stop_after")


def _opt(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class LoraTrainConfig:
    """Options of ``vlmprune train lora`` (validated on construction, the method spec included)."""

    method: str = _opt("prumerge", "vision-stage method spec applied while training, e.g. prumerge, "
                                   "prumerge+:keep=144, sequential:keep=1.0 (= no pruning)")
    out: str = _opt("runs/lora", "run folder: adapters, checkpoint, history, summary (resumes if present)")
    model: str | None = _opt(None, "local path of a LLaVA model; None = the testbed")
    steps: int = _opt(250, "optimizer steps")
    batch_size: int = _opt(8, "samples per step")
    lr: float = _opt(2e-4, "peak learning rate (LLaVA's LoRA recipe: 2e-4)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (LLaVA: 0)")
    warmup: int = _opt(8, "linear warm-up steps (LLaVA: 3% of the steps), then cosine to 0")
    max_grad_norm: float = _opt(1.0, "gradient-norm clipping (LLaVA / HF Trainer: 1.0; 0 = off)")
    lora_r: int = _opt(16, "LoRA rank (LLaVA: 128 on a 4096-wide LLM; the testbed's LLM is 256 wide)")
    lora_alpha: float = _opt(32.0, "LoRA alpha (LLaVA: 2 r)")
    lora_dropout: float = _opt(0.05, "LoRA dropout (LLaVA: 0.05)")
    lora_targets: tuple[str, ...] | None = _opt(None, "paths inside a decoder layer; None = the model family's "
                                                      "(attention + MLP projections)")
    turns: int = _opt(1, "question-answer turns per image")
    text_prob: float = _opt(0.5, "probability that a training scene carries a text code")
    seed: int = _opt(0, "seed of the data stream, the LoRA initialisation and dropout")
    checkpoint_every: int = _opt(25, "save adapters + a resumable checkpoint every N steps")
    dtype: str = _opt("float32", "model weights: float32 | bfloat16 | float16 (LoRA tensors follow the model)")
    stop_after: int | None = _opt(None, "stop this invocation after N steps (checkpointed; rerun to resume)")

    def __post_init__(self) -> None:
        from ..integrations.lora import LoraOptions
        from ..registry import check_method_spec, get_method

        if self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
            (self.turns >= 1, f"turns must be >= 1, got {self.turns}"),
            (0.0 <= self.text_prob <= 1.0, f"text_prob must be in [0, 1], got {self.text_prob}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.stop_after is None or self.stop_after >= 1, f"stop_after must be >= 1, got {self.stop_after}"),
            (self.dtype in ("float32", "bfloat16", "float16"), f"dtype must be float32, bfloat16 or float16, "
                                                             f"got {self.dtype!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        LoraOptions(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets)  # raises on bad values
        if not isinstance(self.method, str) or not self.method.strip():
            raise ValueError("method must be a vision-stage method spec, e.g. prumerge or prumerge+:keep=144")
        name, options, _obj = check_method_spec(self.method)
        if name is None:
            raise ValueError(f"method {self.method!r} prunes nothing; for the no-pruning control pass "
                             "sequential:keep=1.0 (keeps every token)")
        if get_method(name).stage != "vision":
            raise ValueError(f"train lora needs a vision-stage method (random, sequential, spatial, cls-topk, "
                             f"prumerge, prumerge+); {name!r} acts in the decoder")
        if "lora" in options:
            raise ValueError(f"method {self.method!r} already names LoRA adapters; train lora writes new ones to --out")

    @classmethod
    def from_dict(cls, data: dict) -> "LoraTrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def lora_options(self):
        from ..integrations.lora import LoraOptions

        return LoraOptions(self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_targets)


def train_lora(cfg: LoraTrainConfig, *, progress_bar: bool = True, log: Callable[[str], None] = print) -> Path:
    """Train (or resume) LoRA adapters per ``cfg``; returns the run folder (the adapters' folder)."""
    import vlmprune

    from ..integrations import lora as L
    from ..integrations.base import get_adapter

    out = Path(cfg.out)
    saved = read_state(out, LoraTrainConfig, cfg, RESUMABLE_CHANGES)
    model, processor = load_model(cfg.model, cfg.dtype)
    adapter = get_adapter(model)
    num_tokens = adapter.tokens_per_image(model)
    fixed = adapter.fixed_image_tokens(model)
    chat = training_style(processor, fixed, adapter.family)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # no dropout in the frozen model; only the LoRA dropouts train
    handle = vlmprune.apply(model, cfg.method)
    injection = L.inject(model, cfg.lora_options(), seed=cfg.seed + 1)
    injection.lora_dropout_train(cfg.lora_dropout > 0)
    params = injection.parameters()
    log(f"LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha:g}, dropout={cfg.lora_dropout:g} on {len(injection.names)} "
        f"linears ({', '.join(injection.options.targets or adapter.lora_targets)}), "
        f"{sum(p.numel() for p in params.values())} trainable parameters; method {cfg.method}")
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "seconds": 0.0}
    if saved is not None:
        injection.load_state_dict(saved["lora"])
        opt.load_state_dict(saved["opt"])
        state = {"step": int(saved["step"]), "seconds": float(saved["seconds"])}
        log(f"resumed from {out / 'train_state.pt'} at step {state['step']}")
    out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    t0 = time.time()

    def elapsed() -> float:  # training seconds, including the invocations this run resumed from
        return round(state["seconds"] + time.time() - t0, 1)

    def info() -> dict[str, Any]:
        return {"method": cfg.method, "model": cfg.model or "(testbed)", "steps": state["step"],
                "batch_size": cfg.batch_size, "seed": cfg.seed}

    def save_checkpoint() -> None:
        append_history(out, history)
        if history:
            recent = history[-10:]
            log(f"step {state['step']}: loss {sum(h['loss'] for h in recent) / len(recent):.4f}, "
                f"visual tokens {sum(h['visual_tokens'] for h in recent) / len(recent):.1f} per image"
                + (f" of {num_tokens}" if fixed is not None else ""))
        history.clear()
        L.save(injection, out, info())
        write_state(out, {"config": asdict(cfg), "step": state["step"], "seconds": elapsed(),
                          "lora": injection.state_dict(), "opt": opt.state_dict()})

    image_token_id = adapter.image_token_id(model)
    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, state["step"] + cfg.stop_after)
    try:
        with progress(progress_bar) as bar:
            task = bar.add_task("train lora", total=cfg.steps, completed=state["step"], info="")
            while state["step"] < stop:
                step = state["step"]
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup, floor=0.0)
                torch.manual_seed(cfg.seed * 100003 + step)  # dropout of this step
                start = step * cfg.batch_size
                batch = training_batch(processor, list(range(start, start + cfg.batch_size)), chat=chat,
                                       image_token_id=image_token_id, num_image_tokens=num_tokens, turns=cfg.turns,
                                       text_prob=cfg.text_prob)
                batch.pop("instruction")
                batch = to_model(batch, model.device, model.dtype)
                loss = model(**batch, use_cache=False).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm))
                else:
                    grad_norm = float(torch.linalg.vector_norm(
                        torch.stack([p.grad.norm() for p in params.values() if p.grad is not None])))
                opt.step()
                state["step"] += 1
                kept = handle.stats.last_kept
                rec = {"step": step, "loss": float(loss.detach()), "grad_norm": grad_norm,
                       "lr": opt.param_groups[0]["lr"], "visual_tokens": sum(kept) / max(1, len(kept)),
                       "time": round(time.time() - t0, 2)}
                history.append(rec)
                bar.update(task, advance=1, info=f"loss={rec['loss']:.3f} tokens={rec['visual_tokens']:.0f}")
                if state["step"] % cfg.checkpoint_every == 0 or state["step"] in (cfg.steps, stop):
                    save_checkpoint()
        if state["step"] < cfg.steps:
            log(f"stopped after step {state['step']} of {cfg.steps} (--stop-after); run the same command to resume")
            return out
        hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()] \
            if (out / "history.jsonl").exists() else []
        last = hist[-max(1, min(25, len(hist))):] if hist else []
        summary = {"config": asdict(cfg), "steps": state["step"], "seconds": elapsed(),
                   "trainable_parameters": sum(p.numel() for p in params.values()),
                   "adapted_modules": len(injection.names),
                   "loss_first_25": _mean([h["loss"] for h in hist[:25]]), "loss_last_25": _mean([h["loss"] for h in last]),
                   "mean_visual_tokens": _mean([h["visual_tokens"] for h in hist]), "tokens_per_image": num_tokens,
                   "eval": f"vlmprune eval -m {cfg.method}{',' if ':' in cfg.method else ':'}lora={out}"}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log(f"LoRA adapters written to {out} (evaluate with -m {summary['eval'].split(' -m ')[1]})")
        return out
    finally:
        injection.remove()
        handle.remove()


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
