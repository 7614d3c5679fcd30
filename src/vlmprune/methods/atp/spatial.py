"""ATP's spatial score S_s: nested uniform grids on a unit's H x W patch map.

A patch on a sparse grid gets a high score (``1 - 3 R``, R = the grid's share of the map's
tokens), so the spatial rule can keep a uniform skeleton of the image whatever the attention
says. Maps are flattened in raster order (index = row * W + col).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..common import is_int

__all__ = ["default_strides", "check_strides", "spatial_grids", "spatial_scores"]


def default_strides(height: int, width: int) -> tuple[int, ...]:
    """Strides of the nested grids for an H x W map: (4f, 2f, f), f = max(1, round(sqrt(HW) / 12)).

    24 x 24 (LLaVA-1.5) -> (8, 4, 2): 3, 6, 12 points per side, 9 / 36 / 144 tokens. The strides
    scale with the side, so a 48 x 48 map gets (16, 8, 4) and the same 3 / 6 / 12 points per side
    (lower sampling rates, hence higher scores); small maps bottom out at stride 1 (16 x 16 and
    4 x 4 -> (4, 2, 1)). A grid whose rate R >= 1/3 has score 1 - 3R <= 0 and is ignored.
    """
    f = max(1, int(math.floor(math.sqrt(height * width) / 12 + 0.5)))
    return (4 * f, 2 * f, f)


def check_strides(strides: object) -> tuple[int, ...]:
    """Validate nested strides (decreasing, each a multiple of the next) -> a tuple of ints."""
    if not (isinstance(strides, (tuple, list)) and len(strides) >= 1 and all(is_int(s) and s >= 1 for s in strides)):
        raise ValueError(f"spatial strides must be a non-empty sequence of positive ints, got {strides!r}")
    s = tuple(int(x) for x in strides)
    for a, b in zip(s, s[1:]):
        if not (a > b and a % b == 0):
            raise ValueError(f"spatial strides {s} must be decreasing, each a multiple of the next "
                             "(so the grids are nested), e.g. (8, 4, 2)")
    return s


def _axis_offset(length: int, strides: tuple[int, ...]) -> int:
    """Common offset o: the grid of stride s on this axis is {p : p = o (mod s)}, nested by construction.

    o minimises the left/right margin imbalance of the coarsest grid, then of the next, ...; ties go
    to the smaller o. Exactly centred nested grids do not exist (the centre of a 2-block falls
    between its sub-blocks); on 24: o = 3 -> stride 8 at {3, 11, 19}, 4 at {3, 7, ..., 23}, 2 at
    {1, 3, ..., 23}.
    """
    best, best_cost = 0, None
    for o in range(min(strides[0], length)):
        cost = []
        for s in strides:
            first = o % s
            last = first + ((length - 1 - first) // s) * s
            cost.append(abs(first - (length - 1 - last)))
        if best_cost is None or cost < best_cost:
            best, best_cost = o, cost
    return best


def spatial_grids(height: int, width: int, strides: Sequence[int] | None = None) -> list[Tensor]:
    """Nested uniform grids on an H x W map, coarsest first: a list of [H*W] bool masks (raster order)."""
    strides = default_strides(height, width) if strides is None else check_strides(strides)
    oh, ow = _axis_offset(height, strides), _axis_offset(width, strides)
    rows, cols = torch.arange(height), torch.arange(width)
    out = []
    for s in strides:
        m = ((rows % s) == (oh % s))[:, None] & ((cols % s) == (ow % s))[None, :]  # [H, W]
        out.append(m.reshape(-1))
    return out


def spatial_scores(height: int, width: int, strides: Sequence[int] | None = None) -> Tensor:
    """[H*W] float32 S_s: max over grids containing the patch of 1 - 3 R (R = grid tokens / N); 0 off-grid.

    24 x 24, strides (8, 4, 2): 9 tokens -> 1 - 3/64 = 0.953125, 36 -> 1 - 3/16 = 0.8125,
    144 -> 1 - 3/4 = 0.25, all other 432 tokens 0. Grids with R >= 1/3 contribute 0.
    """
    n = height * width
    score = torch.zeros(n)
    for g in spatial_grids(height, width, strides):
        value = max(0.0, 1.0 - 3.0 * float(g.sum()) / n)
        score = torch.where(g, torch.clamp(score, min=value), score)
    return score
