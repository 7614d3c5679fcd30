"""Image geometry for the cost model, asked of the model family's adapter (no weights).

A shipped config's ``hf_config`` block holds the transformers config fields of its family; from it
``family_config`` builds the transformers config and ``image_geometry`` asks the family's adapter
(``vlmprune.integrations``: ``size_layout`` / ``image_layout``, ``unit_tokens``, ``vision_shape``)
what an image becomes: its tower passes (LLaVA-NeXT: base image + mosaic crops; Qwen2-VL: one
pass of t*h*w patches), its placeholders in the LLM sequence (NeXT: newlines included; Qwen2-VL:
the merged tokens) and the vision tower's / projector's FLOPs. The arithmetic stays in
``vision.vision_tower_flops``; nothing here knows a family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .specs import CostModelError, ModelConfig
from .vision import vision_tower_flops

__all__ = ["ImageGeometry", "family_config", "image_geometry", "parse_image_size", "parse_grid_thw"]


@dataclass(frozen=True)
class ImageGeometry:
    """What one image becomes in a model (see the module docstring).

    Attributes:
        family: the adapter's family name.
        image_size: (H, W) px asked for, or None (given as a grid).
        passes: tower passes of the image (one per entry of ``adapter.unit_tokens``: crops, frames).
        grids: (h, w) tokens of each pass's grid as the pruning methods see it.
        tower_tokens: tokens in each pass's tower sequence ([CLS] included).
        projector_rows: rows each pass gives the projector, unpruned.
        visual_tokens: the image's placeholders in the LLM sequence (newlines included).
        vision_flops: {"vision_tower", "projector"} matmul FLOPs of the image, unpruned.
    """

    family: str
    image_size: tuple[int, int] | None
    passes: int
    grids: tuple[tuple[int, int], ...]
    tower_tokens: tuple[int, ...]
    projector_rows: tuple[int, ...]
    visual_tokens: int
    vision_flops: dict[str, float]


def family_config(cfg: ModelConfig) -> Any:
    """The transformers config of ``cfg``'s ``hf_config`` block (``CostModelError`` without one)."""
    from ..integrations.compat import config_for

    if not cfg.hf_config or "model_type" not in cfg.hf_config:
        raise CostModelError(f"model config {cfg.name!r} has no hf_config block (the family's config fields), so "
                             "its image geometry is unknown; pass --tokens instead")
    fields = dict(cfg.hf_config)
    return config_for(fields.pop("model_type"), **fields)


def parse_image_size(text: str) -> tuple[int, int]:
    """``"672x672"`` (H x W px) -> (672, 672)."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise CostModelError(f"cannot parse image size {text!r}; use HEIGHTxWIDTH in pixels, e.g. 672x672") from None
    if h < 1 or w < 1:
        raise CostModelError(f"image size must be positive, got {text!r}")
    return h, w


def parse_grid_thw(text: str) -> tuple[int, int, int]:
    """``"1,32,32"`` (t, h, w patches, as ``image_grid_thw``) -> (1, 32, 32)."""
    try:
        t, h, w = (int(p) for p in str(text).split(","))
    except ValueError:
        raise CostModelError(f"cannot parse grid {text!r}; use T,H,W patches, e.g. 1,32,32") from None
    if min(t, h, w) < 1:
        raise CostModelError(f"grid entries must be positive, got {text!r}")
    return t, h, w


def image_geometry(cfg: ModelConfig, image_size: Sequence[int] | None = None,
                   grid_thw: Sequence[int] | None = None) -> ImageGeometry:
    """One image of ``image_size`` (H, W) px, or of patch grid ``grid_thw`` (families whose
    geometry keyword is ``image_grid_thw``), in the model of ``cfg`` (see the module docstring)."""
    from ..integrations.base import UnsupportedModelError, get_adapter

    if (image_size is None) == (grid_thw is None):
        raise CostModelError("give an image size or a grid (exactly one)")
    config = family_config(cfg)
    try:
        adapter = get_adapter(config)
    except UnsupportedModelError as e:
        raise CostModelError(str(e)) from None
    if grid_thw is not None:
        if "image_grid_thw" not in adapter.image_geometry:
            raise CostModelError(f"{cfg.name} ({adapter.family}) takes no patch grid; give --image-size instead")
        import torch

        layout = adapter.image_layout(config, None, image_grid_thw=torch.tensor([list(map(int, grid_thw))]))
    else:
        layout = adapter.size_layout(config, tuple(int(x) for x in image_size))
    units = adapter.unit_tokens(config, layout)
    return ImageGeometry(
        family=adapter.family, image_size=None if image_size is None else (int(image_size[0]), int(image_size[1])),
        passes=len(units), grids=tuple(u.grid for u in layout.units),
        tower_tokens=tuple(n for n, _ in units), projector_rows=tuple(r for _, r in units),
        visual_tokens=int(sum(layout.tokens_per_image)),
        vision_flops=vision_tower_flops(adapter.vision_shape(config), units))
