"""What one prefill computes and holds, counted rather than timed: the tokens each decoder layer
sees, the matmul FLOPs (``vlmprune.cost.analytic``) and the KV-cache bytes.

FLOPs follow the cost model's conventions: 2 per multiply-accumulate, matmuls only, dense
attention, ``lm_head`` on the last token. A prefill's FLOPs are the vision tower on every tower
pass (never pruned), the projector on the rows it receives and the decoder on each sample's own
per-layer token counts (no padding; ``padded`` gives what a padded batch computes).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .models import tower_patches

__all__ = ["bench_layout", "cache_bytes", "decoder_flops", "flop_config", "flop_config_from_card", "ideal_curve",
           "padded", "prefill_flops", "token_schedules", "two_level"]


def cache_bytes(cache: Any) -> int:
    """Bytes of every key/value tensor held by a transformers cache (or a legacy tuple cache)."""
    if cache is None:
        return 0
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
        return total
    for item in cache:  # legacy ((k, v), ...) per layer
        for t in item:
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


def bench_layout(model, inputs: dict[str, Tensor]):
    """The adapter's ``VisualLayout`` of the batch's images (tower passes, placeholders per image)."""
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    geometry = {k: inputs[k] for k in adapter.image_geometry if inputs.get(k) is not None}
    fields = (adapter.pixel_values_field, *adapter.pixel_values_aliases)  # e.g. Video-LLaVA's pixel_values_images
    pixels = next((inputs[f] for f in fields if inputs.get(f) is not None), None)
    if pixels is None:
        raise ValueError(f"the bench's inputs hold no images (none of {', '.join(fields)})")
    return adapter.image_layout(model, pixels, inputs.get("image_sizes"), **geometry)


def token_schedules(model, inputs: dict[str, Tensor], handle: Any,
                    projector_rows: int) -> tuple[list[list[int]], list[float], int]:
    """Per-sample per-layer token counts of the last prefill, per-sample visual tokens (all-layer
    average), and the projector rows (``projector_rows`` unpruned; a vision-stage method's kept
    tokens per tower pass, summed over the batch). ``handle`` is the pruning (None: unpruned)."""
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    layers = adapter.text_config(model).num_hidden_layers
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    valid = (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
    ph = (ids == adapter.image_token_id(model)).sum(1).tolist()  # image placeholders per sample
    if handle is None:
        return [[int(v)] * layers for v in valid], [float(p) for p in ph], projector_rows
    stats = handle.stats
    if handle.stage == "decoder":
        sched = [[int(x) for x in row] for row in stats.tokens_per_layer]
        return sched, [float(x) for x in stats.visual_tokens_per_sample()], projector_rows
    # vision stage: stats.last_kept lists the kept tokens of each image, in batch order (a prompt with
    # videos: the images', then the videos'; bench prompts hold images only)
    kept = list(stats.last_kept)
    unpruned = stats.unpruned_per_image[-len(kept):] if kept else []
    if len(unpruned) != len(kept):
        raise RuntimeError(f"{handle.method}: the handle recorded {len(unpruned)} unpruned counts for {len(kept)} images")
    red = getattr(handle, "last_reduction", None)
    rows = int(red.counts.sum()) if red is not None else int(sum(kept))
    out, vis, k = [], [], 0
    for v, p in zip(valid, ph):
        kept_b = seen = 0
        while seen < int(p) and k < len(kept):  # this sample's images: their placeholder runs add up to p
            seen, kept_b, k = seen + unpruned[k], kept_b + kept[k], k + 1
        out.append([int(v) - int(p) + int(kept_b)] * layers)
        vis.append(float(kept_b))
    return out, vis, rows


def _model_config(name: str, decoder: dict[str, Any], vision: dict[str, Any] | None = None,
                  projector_dims: Sequence[int] | None = None, **extra: Any):
    """A cost-model ``ModelConfig`` from the card's decoder fields (and, for the vision-side
    curves, a tower with one fixed-size pass per image)."""
    from ..cost.analytic import ModelConfig

    d = decoder
    kwargs: dict[str, Any] = dict(name=name, hidden_size=d["hidden"], num_layers=d["layers"], num_heads=d["heads"],
                                  num_kv_heads=d["kv_heads"], intermediate_size=d["intermediate"],
                                  vocab_size=d["vocab"], head_dim=d["head_dim"], **extra)
    if vision is not None:
        kwargs.update(vision=vision, projector={"dims": list(projector_dims)})
    return ModelConfig(**kwargs)


def _tower(image_size: int, patch_size: int, hidden: int, layers: int, intermediate: int, patches: int,
           has_cls: bool) -> dict[str, Any]:
    """The cost model's ``vision`` entry of a tower with one ``patches``-patch pass per image."""
    return {"image_size": image_size, "patch_size": patch_size, "hidden_size": hidden, "num_layers": layers,
            "intermediate_size": intermediate, "cls_token": has_cls, "tokens_per_image": patches + int(has_cls),
            "projector_rows_per_image": patches, "max_images_per_sample": 1}


def flop_config(model):
    """The analytic cost model's ``ModelConfig`` of a model: its decoder, and (families with one
    fixed-size tower pass per image, for the plot's curves) its tower and projector."""
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    t = adapter.text_config(model)
    decoder = {"hidden": t.hidden_size, "layers": t.num_hidden_layers, "heads": t.num_attention_heads,
               "kv_heads": t.num_key_value_heads, "intermediate": t.intermediate_size, "vocab": t.vocab_size,
               "head_dim": getattr(t, "head_dim", None)}
    tied = bool(getattr(t, "tie_word_embeddings", False))
    if adapter.fixed_image_tokens(model) is None:
        return _model_config("bench", decoder, tie_word_embeddings=tied)
    v = adapter.vision_config(model)
    patches, has_cls = tower_patches(model)
    tower = _tower(v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers, v.intermediate_size, patches,
                   has_cls)
    return _model_config("bench", decoder, tower, [v.hidden_size, t.hidden_size, t.hidden_size],
                         tie_word_embeddings=tied, default_visual_tokens=patches, max_visual_tokens=patches)


def flop_config_from_card(mcard: dict[str, Any], with_vision: bool = False):
    """The ``ModelConfig`` of a card's model entry: its ``config.decoder``; with ``with_vision``
    also its tower (one fixed-size pass of ``config.vision.patches`` patches + [CLS] per image)
    and projector, for the plot's curves."""
    c = mcard["config"]
    if not with_vision:
        return _model_config(mcard["name"], c["decoder"])
    v = c["vision"]
    tower = _tower(v["image_size"], v["patch_size"], v["hidden"], v["layers"], v["intermediate"], v["patches"], True)
    return _model_config(mcard["name"], c["decoder"], tower, c["projector"]["dims"])


_FLOPS_GPU = None


def decoder_flops(cfg, schedule: Sequence[int]) -> float:
    """Matmul FLOPs of one sample's decoder prefill (lm_head on the last token) for per-layer tokens."""
    from ..cost.analytic import GPUSpec, prefill_cost

    global _FLOPS_GPU
    if _FLOPS_GPU is None:  # prefill_cost wants a GPU for its roofline; only the FLOPs are used here
        _FLOPS_GPU = GPUSpec(name="flops-only", fp16_tflops=1.0, int8_tops=1.0, bandwidth_gbs=1.0)
    return prefill_cost(cfg, list(schedule), _FLOPS_GPU, "fp16", batch=1).matmul_flops  # FLOPs ignore precision


def prefill_flops(cfg, shape: dict[str, Any], units: list[tuple[int, int]], schedules: list[list[int]],
                  projector_rows: int) -> dict[str, float]:
    """FLOPs of one prefill: the tower on every pass ``units`` (adapter's ``unit_tokens``), the
    projector on ``projector_rows`` (when it runs after pruning), the decoder per sample."""
    from ..cost.analytic import vision_tower_flops

    vf = vision_tower_flops(shape, units, projector_rows)
    dec = sum(decoder_flops(cfg, s) for s in schedules)
    return {"vision_tower": vf["vision_tower"], "projector": vf["projector"], "decoder": dec,
            "total": vf["vision_tower"] + vf["projector"] + dec}


def padded(schedules: list[list[int]]) -> list[list[int]]:
    """Every sample at each layer's longest sample's count: what a padded batch computes."""
    longest = [max(col) for col in zip(*schedules)]
    return [list(longest) for _ in schedules]


def ideal_curve(cfg, text_tokens: int, points: Sequence[int], prefix: int = 0) -> list[float]:
    """End-to-end FLOP-ideal speed-ups (batch 1) at ``points`` visual tokens kept in layers >= ``prefix``."""
    from ..cost.analytic import vision_encoder_flops

    n = cfg.vision["projector_rows_per_image"]
    layers = cfg.num_layers
    vf = vision_encoder_flops(cfg, images=1)
    full = vf["vision_tower"] + vf["projector"] + decoder_flops(cfg, [text_tokens + n] * layers)
    out = []
    for k in points:
        if prefix:  # decoder stage: projector and the first layers see every token
            sched = [text_tokens + n] * prefix + [text_tokens + k] * (layers - prefix)
            pruned = vf["vision_tower"] + vf["projector"] + decoder_flops(cfg, sched)
        else:
            pruned = vf["vision_tower"] + vf["projector"] * k / n + decoder_flops(cfg, [text_tokens + k] * layers)
        out.append(full / pruned)
    return out


def two_level(sched: Sequence[int]) -> tuple[int, int] | None:
    """(prefix layers, tokens after) if a per-layer schedule is full-then-constant (FastV-like)."""
    first = sched[0]
    p = next((i for i, s in enumerate(sched) if s != first), None)
    if p is None or len(set(sched[p:])) != 1:
        return None
    return p, sched[p]
