"""Stage 2's data-dependent initialisation of the projector: standardised vision features."""

from __future__ import annotations

import torch

from ..scenes import make_scene, split_seed
from .config import TrainConfig
from .vision import pixel_values_of


@torch.no_grad()
def calibration_features(model, processor, cfg: TrainConfig, n_images: int = 64) -> torch.Tensor:
    """[n_images * 576, C] projector inputs (the vision feature layer's patch rows) of fixed training scenes."""
    vision = model.model.vision_tower
    layer = model.config.vision_feature_layer
    feats = []
    for start in range(0, n_images, 16):
        scenes = [make_scene(split_seed("train", 300_000_000 + cfg.seed * 7919 + start + i), text=i % 2 == 0)
                  for i in range(min(16, n_images - start))]
        hs = vision(pixel_values_of(processor, [sc.image for sc in scenes]), output_hidden_states=True).hidden_states
        feats.append(hs[layer][:, 1:].flatten(0, 1))
    return torch.cat(feats)


@torch.no_grad()
def standardize_projector(model, processor, cfg: TrainConfig, n_images: int = 64) -> dict:
    """Fold the projector inputs' mean and per-dimension std into its first layer (in place).

    Over ``n_images`` fixed training scenes (``calibration_features``): ``W' = W / std``,
    ``b' = b - W' mean``, so ``linear_1`` sees standardised features; the module stays a stock
    LLaVA projector. Returns the features' mean norm, the mean vector's norm and the mean std.
    """
    f = calibration_features(model, processor, cfg, n_images)
    mean, std = f.mean(0), f.std(0).clamp_min(1e-4)
    lin = model.model.multi_modal_projector.linear_1
    lin.weight.div_(std)
    lin.bias.sub_(lin.weight @ mean)
    return {"feature_norm": float(f.norm(dim=-1).mean()), "mean_norm": float(mean.norm()), "std_mean": float(std.mean())}
