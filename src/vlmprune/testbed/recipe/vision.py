"""The vision stages: stage 1 trains the CLIP tower from scratch on per-patch and [CLS] labels,
stage 3 refines the [CLS] pathway PruMerge reads. Tower initialisations, auxiliary heads, data, losses."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...methods.prumerge import cls_attention as cls_attention_from_qk
from ..scenes import CODE_ALPHABET, COLOR_NAMES, SHAPES, make_scene, patch_labels, split_seed
from .config import TrainConfig


class VisionHeads(nn.Module):
    """Linear heads on the vision tower used by stages 1 and 3 only (not part of the saved LLaVA model).

    ``cls`` reads the pooled [CLS] output ([B, C] -> [B, shapes * colours] multi-label logits); the
    others read each patch ([B, N, C]): ``color`` / ``shape`` / ``char`` (class 0 = none),
    ``center`` (one logit: an object's centre patch) and ``pos`` (the patch's normalised row, column).
    """

    def __init__(self, width: int):
        super().__init__()
        self.cls = nn.Linear(width, len(SHAPES) * len(COLOR_NAMES))
        self.color = nn.Linear(width, 1 + len(COLOR_NAMES))
        self.shape = nn.Linear(width, 1 + len(SHAPES))
        self.center = nn.Linear(width, 1)
        self.char = nn.Linear(width, 1 + len(CODE_ALPHABET))
        self.pos = nn.Linear(width, 2)


@torch.no_grad()
def sincos_positions(vision_tower) -> None:
    """Set a CLIP vision tower's position embeddings to a 2-D sine-cosine table ([CLS] row: zeros).

    Half the channels encode the patch row, half the column, each with sines and cosines at
    geometric frequencies (MAE's table; here it stays trainable). Needs a square patch grid and a
    width divisible by 4.
    """
    emb = vision_tower.embeddings.position_embedding.weight  # [1 + G*G, C]
    n, width = emb.shape[0] - 1, emb.shape[1]
    grid = math.isqrt(n)
    if grid * grid != n or width % 4:
        raise ValueError(f"sincos_positions needs a square patch grid and width divisible by 4, got {n} patches, width {width}")
    freqs = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    idx = torch.arange(n)
    parts = []
    for coord in (idx // grid, idx % grid):
        angles = coord[:, None].float() * freqs[None]
        parts += [angles.sin(), angles.cos()]
    emb[0] = 0
    emb[1:] = torch.cat(parts, 1)


@torch.no_grad()
def mimetic_attention(vision_tower, seed: int = 0, self_logit: float = 4.0) -> None:
    """Initialise every vision layer's key projection equal to its query projection (biases zero).

    The query-key part of "mimetic initialisation" (Trockman & Kolter, 2023): each head then scores
    a token pair by a random projection of their similarity. The shared weights are drawn from
    ``seed`` (its own generator), scaled so that a token's expected logit against itself is
    ``self_logit``.
    """
    gen = torch.Generator().manual_seed(seed + 4242)
    for layer in vision_tower.encoder.layers:
        attn = layer.self_attn
        width = attn.q_proj.weight.shape[1]
        std = (self_logit / (width * attn.head_dim ** 0.5)) ** 0.5
        w = torch.randn(attn.q_proj.weight.shape, generator=gen) * std
        attn.q_proj.weight.copy_(w)
        attn.k_proj.weight.copy_(w)
        attn.q_proj.bias.zero_()
        attn.k_proj.bias.zero_()


def pixel_values_of(processor, images) -> torch.Tensor:
    """[B, 3, H, W] pixel values of PIL ``images`` through the processor's image processor."""
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


def vision_batch(cfg: TrainConfig, step: int, processor, batch: int | None = None):
    """``(pixel_values [B, 3, H, W], targets)`` of the ``step``-th vision batch (``batch`` scenes,
    default ``cfg.vision_batch``), drawn from step-indexed train-split seeds.

    ``targets`` holds the ``PatchLabels`` fields stacked over the batch: ``color`` / ``shape`` /
    ``center`` / ``char`` / ``object_or_text`` [B, N] and ``present`` [B, shapes * colours].
    """
    batch = batch or cfg.vision_batch
    scenes = []
    for i in range(batch):
        seed = split_seed("train", (cfg.seed * 7919 + step * batch + i) % 400_000_000)
        rnd = random.Random(seed)
        text = rnd.random() < cfg.text_prob
        dense = cfg.vision_dense and rnd.random() < cfg.vision_dense
        scenes.append(make_scene(seed, text=text, n_objects=rnd.randint(12, 24) if dense else None))
    labels = [patch_labels(s) for s in scenes]
    stack = lambda name: torch.as_tensor(np.stack([getattr(lab, name) for lab in labels]))  # noqa: E731
    targets = {k: stack(k) for k in ("color", "shape", "center", "char", "present", "object_or_text")}
    return pixel_values_of(processor, [s.image for s in scenes]), targets


def patch_ce(logits: torch.Tensor, target: torch.Tensor, object_only: bool) -> torch.Tensor:
    """Cross-entropy of ``logits`` [B, N, K] against ``target`` [B, N] over all patches, plus (with
    ``object_only``) the cross-entropy over the labelled patches only (target > 0; zero when none)."""
    flat, t = logits.flatten(0, 1), target.flatten()
    loss = F.cross_entropy(flat, t)
    if object_only:
        labelled = t > 0
        loss = loss + (F.cross_entropy(flat[labelled], t[labelled]) if labelled.any() else flat.sum() * 0)
    return loss


def vision_loss(vision_tower, heads: VisionHeads, pixel_values, targets,
                object_loss: bool = False) -> tuple[torch.Tensor, dict]:
    """Stage 1's loss and its parts (floats): the heads on the [CLS] output and on the penultimate
    layer's patch rows (what LLaVA feeds its projector), against ``vision_batch``'s targets.

    total = 4 * cls (multi-label BCE) + colour + shape + char (``patch_ce``) + centre (BCE, positive
    weight 20) + pos (MSE to the patch's row, column / (grid - 1)).
    """
    out = vision_tower(pixel_values, output_hidden_states=True)
    patches = out.hidden_states[-2][:, 1:]  # [B, 576, C]: what LLaVA feeds the projector
    n = patches.shape[1]
    grid = int(math.isqrt(n))
    rows = torch.arange(n) // grid
    cols = torch.arange(n) % grid
    pos_t = torch.stack([rows, cols], -1).float().div(grid - 1).expand(patches.shape[0], -1, -1)
    losses = {
        "cls": F.binary_cross_entropy_with_logits(heads.cls(out.pooler_output), targets["present"]),
        "color": patch_ce(heads.color(patches), targets["color"], object_loss),
        "shape": patch_ce(heads.shape(patches), targets["shape"], object_loss),
        "center": F.binary_cross_entropy_with_logits(heads.center(patches).squeeze(-1), targets["center"].float(),
                                                     pos_weight=torch.tensor(20.0)),
        "char": patch_ce(heads.char(patches), targets["char"], object_loss),
        "pos": F.mse_loss(heads.pos(patches), pos_t),
    }
    total = 4 * losses["cls"] + losses["color"] + losses["shape"] + losses["center"] + losses["char"] + losses["pos"]
    return total, {k: float(v.detach()) for k, v in losses.items()}


def cls_attention(vision_tower, hidden: torch.Tensor) -> torch.Tensor:
    """[B, N] [CLS] attention over the patches as PruMerge reads it.

    ``hidden`` [B, N + 1, C] is the input of the last vision layer (``hidden_states[-2]``); one
    softmax over the concatenated-head logits of the [CLS] query against all keys (the method's
    own ``cls_attention``), [CLS] column dropped.
    """
    layer = vision_tower.encoder.layers[-1]
    x = layer.layer_norm1(hidden)
    q = layer.self_attn.q_proj(x[:, :1])  # [B, 1, C]: only the [CLS] query is needed
    k = layer.self_attn.k_proj(x)  # [B, N+1, C]
    return cls_attention_from_qk(q.expand_as(k), k)  # the method's own formula (reads row 0 of q)


def cls_loss(vision_tower, heads: VisionHeads, pixel_values, targets, attention_weight: float) -> torch.Tensor:
    """Stage 3's loss: multi-label colour-shape BCE from [CLS], plus ``attention_weight`` times
    ``-log`` of the share of the [CLS] attention (``cls_attention``) on object/text patches."""
    out = vision_tower(pixel_values, output_hidden_states=True)
    bce = F.binary_cross_entropy_with_logits(heads.cls(out.pooler_output), targets["present"])
    if attention_weight == 0:
        return bce
    a = cls_attention(vision_tower, out.hidden_states[-2])
    mass = (a * targets["object_or_text"].float()).sum(-1) / a.sum(-1)
    return bce + attention_weight * -(mass + 1e-6).log().mean()


def load_vision(model, heads: VisionHeads, source: str | Path) -> None:
    """Copy a trained vision tower (and the stage-1 heads, if ``source`` is a train_state.pt) into ``model``."""
    source = Path(source)
    if source.is_dir():
        if not (source / "config.json").exists():
            raise FileNotFoundError(f"vision_from={source}: no saved model there (config.json missing)")
        from transformers import AutoModelForImageTextToText

        weights, head_weights = AutoModelForImageTextToText.from_pretrained(source).state_dict(), None
    elif source.is_file():
        saved = torch.load(source, weights_only=False)
        if not isinstance(saved, dict) or "model" not in saved:
            raise ValueError(f"vision_from={source}: not a testbed train_state.pt")
        weights, head_weights = saved["model"], saved.get("heads")
    else:
        raise FileNotFoundError(f"vision_from={source}: no such file or folder")
    vision = {k: v for k, v in weights.items() if k.startswith("model.vision_tower.")}
    if not vision:
        raise ValueError(f"vision_from={source}: holds no vision tower weights")
    try:
        model.load_state_dict(vision, strict=False)
        if head_weights is not None:
            heads.load_state_dict(head_weights)
    except RuntimeError as e:
        raise ValueError(f"vision_from={source}: its vision tower does not match this architecture ({e})") from e
