"""Background dropout: early in stage 2 the decoder sees every object/text patch but only a share of
the background ones, fed with their original positions."""

from __future__ import annotations

import torch

from .config import TrainConfig


def background_keep(cfg: TrainConfig, step: int) -> float:
    """Share of background image tokens the decoder sees at stage-2 ``step`` (``bg_keep`` ramped to 1).

    ``bg_keep`` until the fraction ``bg_ramp[0]`` of stage 2, linearly up to 1 at ``bg_ramp[1]``,
    then 1 (every image token, as at evaluation).
    """
    if cfg.bg_keep >= 1:
        return 1.0
    start, end = cfg.bg_ramp
    frac = step / max(1, cfg.llm_steps)
    if frac >= end:
        return 1.0
    t = 0.0 if frac <= start else (frac - start) / (end - start)
    return cfg.bg_keep + (1 - cfg.bg_keep) * t


def background_sample(foreground: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """[N] bool keep mask: every foreground patch plus round(share * #background) random background ones."""
    background = (~foreground).nonzero()[:, 0]
    n = round(share * len(background))
    picked = background[torch.randperm(len(background), generator=torch.Generator().manual_seed(seed))[:n]]
    return foreground.clone().index_fill_(0, picked, True)


def sparse_image_batch(model, batch: dict, keep: torch.Tensor, extra: torch.Tensor | None = None,
                       guide: dict | None = None):
    """A stage-2 batch with only the kept image tokens, fed as ``inputs_embeds`` with original positions.

    ``batch`` holds right-padded ``input_ids``, ``attention_mask``, ``labels``, ``pixel_values`` with
    every image expanded to N placeholders; ``keep`` [B, N] says which patches each sample keeps.
    Returns ``(batch', extra', guide')``: ``inputs_embeds`` with the dropped image tokens taken out (the
    rest in order, right-padded), their original ``position_ids`` (so RoPE sees the full image's
    geometry, as under pruning), mask and labels gathered alike; ``extra`` (a [B, L] per-token
    target such as the patch words) gathered the same way, and ``guide`` (the attention-guide
    rows / targets, with ``allowed`` rebuilt for the new mask) when given. With every patch kept,
    the model's output equals the ordinary forward's (tested).
    """
    cfg = model.config
    ids = batch["input_ids"]
    image = ids == cfg.image_token_id
    feats = model.model.get_image_features(
        pixel_values=batch["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
    feats = torch.stack(list(feats))  # [B, N, D]
    embeds = model.get_input_embeddings()(ids.masked_fill(image, 0))
    embeds = embeds.masked_scatter(image[..., None], feats.to(embeds.dtype))
    seq_keep = ~image
    seq_keep[image] = keep.reshape(-1)  # image positions in row-major order = patches 0..N-1 of each sample
    seq_keep &= batch["attention_mask"].bool()
    counts = seq_keep.sum(1)
    width = int(counts.max())
    order = torch.argsort((~seq_keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept positions, in order
    valid = torch.arange(width)[None, :] < counts[:, None]

    def take(x, fill):
        return torch.where(valid, x.gather(1, order), fill)

    positions = torch.arange(ids.shape[1]).expand_as(ids)
    out = dict(inputs_embeds=embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1])),
               attention_mask=valid.long(), position_ids=take(positions, 0), labels=take(batch["labels"], -100))

    def take_pairs(t):  # [B, *, L, L] (row, key) targets -> [B, *, width, width]
        lead = t.shape[1:-2]
        t = t.reshape(t.shape[0], -1, *t.shape[-2:])
        H = t.shape[1]
        t = t.gather(2, order[:, None, :, None].expand(-1, H, -1, t.shape[-1]))
        t = t.gather(3, order[:, None, None, :].expand(-1, H, width, -1)) & valid[:, None, None, :]
        return t.reshape(t.shape[0], *lead, width, width)

    if guide is not None:
        targets = guide["targets"]
        targets = take(targets, False) if targets.dim() == 2 else take_pairs(targets)
        allowed = torch.ones(width, width, dtype=torch.bool).tril()[None] & valid[:, None, :]
        gathered = dict(rows=take(guide["rows"], False), targets=targets, allowed=allowed)
        if "layer_rows" in guide:
            gathered["layer_rows"] = {layer: take(r, False) for layer, r in guide["layer_rows"].items()}
        if "uniform" in guide:
            gathered["uniform"] = take(guide["uniform"], False)
        if "extra" in guide:  # per-head targets [B, H, L, L]
            gathered["extra"] = [dict(group, rows=take(group["rows"], False), targets=take_pairs(group["targets"]))
                                 for group in guide["extra"]]
        guide = gathered
    return out, (None if extra is None else take(extra, -100)), guide
