"""Training recipe of the testbed LLaVA (two stages, as LLaVA itself is built).

Stage 1 trains the CLIP vision tower from scratch on dense, synthetic supervision:
  * the [CLS] output (``pooler_output``) predicts which colour-shape pairs are present
    (multi-label) -- the LLM never reads [CLS], so this objective is what makes its attention
    meaningful for PruMerge-style methods;
  * the penultimate-layer patch features (the ones LLaVA feeds to the LLM) predict the colour,
    shape, "object centre here" and text character of each patch, and its normalised position.
Stage 2 freezes the vision tower and trains the projector and the Llama decoder on multi-turn
ShapesVQA conversations (several question-answer turns per image amortise the 576 visual tokens;
loss on answer tokens only).
Stage 3 (optional, ``cls_steps``; off in the shipped recipe) refines the [CLS] pathway: only the
*last* vision layer, the post-layernorm and the [CLS] head train, on the multi-label objective. LLaVA reads ``hidden_states[-2]``, the input of that
last layer, so this stage cannot change what the LLM sees (it is independent of stage 2). In the
shipped run the stage-1 [CLS] multi-label loss stays near its prior (conjunctions of colour and
shape are hard to read from one pooled vector), yet the [CLS] attention PruMerge reads already
puts ~99% of its mass on object/text patches (``vlmprune testbed check`` reports it), so the
stage is not needed there; it is kept, tested, for recipes that need a stronger [CLS] output.

All data are generated on the fly from step-indexed seeds, so a run is reproducible from its seed
and resumes exactly from a checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .questions import FAMILIES, ask, format_prompt
from .scenes import CODE_ALPHABET, COLOR_NAMES, SHAPES, make_scene, patch_labels, split_seed


@dataclass
class TrainConfig:
    out: str = "runs/testbed"
    seed: int = 0
    vision_steps: int = 250
    vision_batch: int = 16
    vision_lr: float = 1e-3
    llm_steps: int = 650
    llm_batch: int = 8
    llm_lr: float = 1e-3
    warmup: int = 60
    turns: int = 10
    text_prob: float = 0.5
    cls_steps: int = 0  # optional stage 3 (off: stage 1 already makes [CLS] attention land on objects)
    cls_batch: int = 16
    cls_lr: float = 2e-3
    cls_attention_weight: float = 0.2
    checkpoint_every: int = 100
    threads: int = 0  # 0 = torch default
    families: tuple[str, ...] | None = None  # stage-2 question families (None: all; for curricula / probes)
    max_objects: int | None = None  # stage-2 scenes with at most this many objects (None: 1-9)
    vision_overrides: dict | None = None  # architecture overrides (tests train tiny models)
    text_overrides: dict | None = None


class VisionHeads(nn.Module):
    """Auxiliary heads used only in stage 1 (not part of the saved LLaVA model)."""

    def __init__(self, width: int):
        super().__init__()
        self.cls = nn.Linear(width, len(SHAPES) * len(COLOR_NAMES))
        self.color = nn.Linear(width, 1 + len(COLOR_NAMES))
        self.shape = nn.Linear(width, 1 + len(SHAPES))
        self.center = nn.Linear(width, 1)
        self.char = nn.Linear(width, 1 + len(CODE_ALPHABET))
        self.pos = nn.Linear(width, 2)


def _pixel_values(processor, images) -> torch.Tensor:
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def _vision_batch(cfg: TrainConfig, step: int, processor, batch: int | None = None):
    batch = batch or cfg.vision_batch
    scenes = []
    for i in range(batch):
        seed = split_seed("train", (cfg.seed * 7919 + step * batch + i) % 400_000_000)
        rnd = random.Random(seed)
        scenes.append(make_scene(seed, text=rnd.random() < cfg.text_prob))
    labels = [patch_labels(s) for s in scenes]
    stack = lambda name: torch.as_tensor(np.stack([getattr(lab, name) for lab in labels]))  # noqa: E731
    targets = {k: stack(k) for k in ("color", "shape", "center", "char", "present")}
    targets["object"] = (targets["color"] > 0) | (targets["char"] > 0)  # patches showing an object or text
    return _pixel_values(processor, [s.image for s in scenes]), targets


def vision_loss(vision_tower, heads: VisionHeads, pixel_values, targets) -> tuple[torch.Tensor, dict]:
    out = vision_tower(pixel_values, output_hidden_states=True)
    patches = out.hidden_states[-2][:, 1:]  # [B, 576, C]: what LLaVA feeds the projector
    n = patches.shape[1]
    grid = int(math.isqrt(n))
    rows = torch.arange(n) // grid
    cols = torch.arange(n) % grid
    pos_t = torch.stack([rows, cols], -1).float().div(grid - 1).expand(patches.shape[0], -1, -1)
    losses = {
        "cls": F.binary_cross_entropy_with_logits(heads.cls(out.pooler_output), targets["present"]),
        "color": F.cross_entropy(heads.color(patches).flatten(0, 1), targets["color"].flatten()),
        "shape": F.cross_entropy(heads.shape(patches).flatten(0, 1), targets["shape"].flatten()),
        "center": F.binary_cross_entropy_with_logits(heads.center(patches).squeeze(-1), targets["center"].float(),
                                                     pos_weight=torch.tensor(20.0)),
        "char": F.cross_entropy(heads.char(patches).flatten(0, 1), targets["char"].flatten()),
        "pos": F.mse_loss(heads.pos(patches), pos_t),
    }
    total = 4 * losses["cls"] + losses["color"] + losses["shape"] + losses["center"] + losses["char"] + losses["pos"]
    return total, {k: float(v.detach()) for k, v in losses.items()}


def cls_attention(vision_tower, hidden: torch.Tensor) -> torch.Tensor:
    """[B, N] [CLS] attention over patches as PruMerge reads it (prumerge.md section 1).

    ``hidden`` is the input of the last vision layer (``hidden_states[-2]``); one softmax over the
    concatenated-head logits of the [CLS] query against all keys, [CLS] column dropped.
    """
    layer = vision_tower.encoder.layers[-1]
    x = layer.layer_norm1(hidden)
    q = layer.self_attn.q_proj(x[:, :1])  # [B, 1, C]
    k = layer.self_attn.k_proj(x)  # [B, N+1, C]
    return torch.softmax((q @ k.transpose(1, 2)).squeeze(1) / q.shape[-1] ** 0.5, -1)[:, 1:]


def cls_loss(vision_tower, heads: VisionHeads, pixel_values, targets, attention_weight: float) -> torch.Tensor:
    """Stage 3: multi-label colour-shape prediction from [CLS], guided to look at object patches.

    The guidance term is ``-log`` of the [CLS] attention mass (PruMerge's formula) on patches that
    show an object or text; without it the [CLS] query stays near uniform over the 576 patches and
    the multi-label loss does not leave its prior within the training budget.
    """
    out = vision_tower(pixel_values, output_hidden_states=True)
    bce = F.binary_cross_entropy_with_logits(heads.cls(out.pooler_output), targets["present"])
    if attention_weight == 0:
        return bce
    a = cls_attention(vision_tower, out.hidden_states[-2])
    mass = (a * targets["object"].float()).sum(-1) / a.sum(-1)
    return bce + attention_weight * -(mass + 1e-6).log().mean()


def conversation(scene, rnd: random.Random, turns: int,
                 families: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """Question-answer turns about one scene, every supported family at least once when possible."""
    qa = []
    if families:
        fams = [rnd.choice(families) for _ in range(4 * turns)]
    else:
        fams = list(FAMILIES) + [rnd.choice(("exist", "count", "position", "color", "shape")) for _ in range(turns)]
    for fam in fams:
        q = ask(scene, fam, rnd)
        if q is not None and all(q.question != prev for prev, _ in qa):
            qa.append((q.question, q.answer))
        if len(qa) >= turns:
            break
    rnd.shuffle(qa)
    return qa


def encode_turns(tokenizer, qa: list[tuple[str, str]], image_token_id: int,
                 num_image_tokens: int = 576) -> tuple[list[int], list[int], list[bool]]:
    """Token ids, labels (-100 except answers and their </s>) and instruction mask of a conversation.

    The first turn is tokenised exactly as the evaluation prompt (the testbed's template with the
    image placeholder expanded to ``num_image_tokens``); the instruction rows are that turn's
    tokens after the last image token (the question and "ASSISTANT:"), never an answer.
    """
    prompt = format_prompt(qa[0][0]).replace("<image>", "<image>" * num_image_tokens)
    ids = list(tokenizer(prompt)["input_ids"])
    img = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(img) != num_image_tokens:
        raise ValueError(f"the prompt tokenised to {len(img)} image tokens, expected {num_image_tokens}; does the "
                         f"tokenizer know '<image>' as token {image_token_id}?")
    instruction = [i > img[-1] for i in range(len(ids))]
    labels = [-100] * len(ids)
    for k, (q, a) in enumerate(qa):
        if k > 0:
            turn = tokenizer(f"USER: {q} Answer with one word. ASSISTANT:", add_special_tokens=False)["input_ids"]
            ids += turn
            labels += [-100] * len(turn)
            instruction += [False] * len(turn)
        ans = list(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        ids += ans
        labels += ans
        instruction += [False] * len(ans)
    return ids, labels, instruction


def encode_conversation(processor, qa: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a multi-turn conversation about one 576-token image (see ``encode_turns``)."""
    tok = processor.tokenizer
    ids, labels, _ = encode_turns(tok, qa, tok.convert_tokens_to_ids("<image>"))
    return ids, labels


def _llm_batch(cfg: TrainConfig, step: int, processor):
    tok = processor.tokenizer
    images, seqs = [], []
    for i in range(cfg.llm_batch):
        seed = split_seed("train", (400_000_000 + cfg.seed * 7919 + step * cfg.llm_batch + i) % 800_000_000)
        rnd = random.Random(seed)
        n_objects = rnd.randint(1, cfg.max_objects) if cfg.max_objects else None
        scene = make_scene(seed, text=rnd.random() < cfg.text_prob, n_objects=n_objects)
        images.append(scene.image)
        qa = conversation(scene, rnd, cfg.turns, cfg.families)
        if not qa:  # e.g. only "read" asked of a scene without text: fall back to an existence question
            qa = conversation(scene, rnd, 1, ("exist",))
        seqs.append(encode_conversation(processor, qa))
    width = max(len(s[0]) for s in seqs)
    input_ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (ids, lab) in enumerate(seqs):  # right padding for training
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(ids)] = 1
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=_pixel_values(processor, images))


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


class _Interrupted(Exception):
    pass


def train(cfg: TrainConfig, *, progress: bool = True, log=print, stop_after: int | None = None):
    """Run (or resume) the three stages; returns the output directory holding the final model.

    ``stop_after`` ends the call after that many optimiser steps, as an interruption would (the
    state of the last checkpoint is what a resume continues from); it then returns None.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .model import build_model, build_processor, build_tokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "train_state.pt"
    if (out / "tokenizer").exists():
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    else:
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(out / "tokenizer")
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed=cfg.seed, vision=cfg.vision_overrides, text=cfg.text_overrides)
    heads = VisionHeads(model.config.vision_config.hidden_size)
    vision = model.model.vision_tower
    state = {"stage": 1, "step": 0}
    opt = torch.optim.AdamW(list(vision.parameters()) + list(heads.parameters()), lr=cfg.vision_lr, weight_decay=0.01)
    if ckpt_path.exists():
        saved = torch.load(ckpt_path, weights_only=False)
        if saved["config"] != asdict(cfg):
            log(f"note: resuming {ckpt_path} written with a different config; keeping the saved one")
            cfg = TrainConfig(**saved["config"])
        model.load_state_dict(saved["model"])
        heads.load_state_dict(saved["heads"])
        state = saved["state"]
        if state["stage"] == 2:
            opt = _stage2_optimizer(model, cfg)
        elif state["stage"] == 3:
            opt = _stage3_optimizer(model, heads, cfg)
        opt.load_state_dict(saved["opt"])
        log(f"resumed from {ckpt_path} at stage {state['stage']} step {state['step']}")

    def save():
        with open(out / "history.jsonl", "a") as f:  # losses since the previous save
            for h in history:
                f.write(json.dumps(h) + "\n")
        if history:
            recent = history[-20:]
            log(f"stage {state['stage']} step {state['step']}: loss {sum(h['loss'] for h in recent) / len(recent):.4f}")
        history.clear()
        torch.save({"config": asdict(cfg), "model": model.state_dict(), "heads": heads.state_dict(),
                    "opt": opt.state_dict(), "state": state}, str(ckpt_path) + ".tmp")
        Path(str(ckpt_path) + ".tmp").replace(ckpt_path)

    history = []
    done = [0]

    def tick():
        done[0] += 1
        if stop_after is not None and done[0] >= stop_after:
            raise _Interrupted

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn()]
    try:
        with Progress(*cols, disable=not progress) as bar:

            def run_steps(stage: int, name: str, total: int, base_lr: float, seed_offset: int, step_loss,
                          clip: list | None = None) -> None:
                """The optimiser loop all stages share; ``step_loss(step)`` -> (loss, logged parts)."""
                task = bar.add_task(name, total=total, completed=state["step"], info="")
                while state["step"] < total:
                    step = state["step"]
                    for g in opt.param_groups:
                        g["lr"] = _lr(step, total, base_lr, cfg.warmup)
                    torch.manual_seed(cfg.seed * 100003 + seed_offset + step)
                    loss, parts = step_loss(step)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if clip is not None:
                        torch.nn.utils.clip_grad_norm_(clip, 1.0)
                    opt.step()
                    state["step"] += 1
                    history.append({"stage": stage, "step": step, "loss": float(loss.detach()), **parts})
                    info = parts or {"loss": float(loss.detach())}
                    bar.update(task, advance=1, info=" ".join(f"{k}={v:.3f}" for k, v in info.items()))
                    if state["step"] % cfg.checkpoint_every == 0 or state["step"] == total:
                        save()
                    tick()

            def vision_step(step):
                return vision_loss(vision, heads, *_vision_batch(cfg, step, processor))

            def llm_step(step):
                return model(**_llm_batch(cfg, step, processor)).loss, {}

            def cls_step(step):
                pv, targets = _vision_batch(cfg, 1_000_000 + step, processor, batch=cfg.cls_batch)
                return cls_loss(vision, heads, pv, targets, cfg.cls_attention_weight), {}

            if state["stage"] == 1:
                model.train()
                run_steps(1, "stage 1 vision", cfg.vision_steps, cfg.vision_lr, 0, vision_step,
                          clip=list(vision.parameters()))
                state = {"stage": 2, "step": 0}
                opt = _stage2_optimizer(model, cfg)
                save()
            if state["stage"] == 2:
                for p in vision.parameters():
                    p.requires_grad_(False)
                model.train()
                vision.eval()
                run_steps(2, "stage 2 llm", cfg.llm_steps, cfg.llm_lr, 50_000, llm_step,
                          clip=[p for p in model.parameters() if p.requires_grad])
                state = {"stage": 3, "step": 0}
                opt = _stage3_optimizer(model, heads, cfg)
                save()
            run_steps(3, "stage 3 [CLS]", cfg.cls_steps, cfg.cls_lr, 90_000, cls_step)
    except _Interrupted:
        return None
    model.eval()
    final = out / "final"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return final


def _stage3_optimizer(model, heads: VisionHeads, cfg: TrainConfig):
    """Only the last vision layer, the post-layernorm and the [CLS] head train in stage 3."""
    vision = model.model.vision_tower
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(vision.encoder.layers[-1].parameters()) + list(vision.post_layernorm.parameters()) + \
        list(heads.cls.parameters())
    for p in params:
        p.requires_grad_(True)
    return torch.optim.AdamW(params, lr=cfg.cls_lr, weight_decay=0.01)


def _stage2_optimizer(model, cfg: TrainConfig):
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    return torch.optim.AdamW(params, lr=cfg.llm_lr, weight_decay=0.01)


if __name__ == "__main__":  # pragma: no cover
    t = time.time()
    train(TrainConfig())
    print(f"done in {time.time() - t:.0f}s")
