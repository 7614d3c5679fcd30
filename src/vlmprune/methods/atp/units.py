"""ATP on samples whose visual tokens lie on several grids ("units"): pure tensor helpers.

A *unit* is one grid of visual tokens of a sample (LLaVA-1.5: the image's 24 x 24 patches;
LLaVA-NeXT: the base image and the unpadded crop mosaic; Qwen2-VL: the merged grid of an
image). Visual slots that lie on no grid (LLaVA-NeXT's ``image_newline`` tokens) are *off grid*.
``ATPPruner`` (``pruner.py``) uses these helpers; ``UnitSlots`` holds where a batch's slots lie.

Shapes: ``B`` samples, ``V`` alive visual slots per sample (padded; ``valid`` [B, V] bool),
``U`` units of the batch (global index, in batch order), ``G`` judging groups (a group shares
one pair of thresholds and one max-rescaling: a unit, or a whole sample). ``unit`` [B, V] long
is the unit of each slot (-1 off grid or padding), ``patch`` [B, V] long its raster index in
that unit's grid (read only where ``unit >= 0``), ``grids`` the (h, w) of every unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["THRESHOLD_UNITS", "OFF_GRID", "RESAMPLE", "UnitSlots", "judge_groups", "group_rescale", "slot_lookup",
           "unit_maps", "group_maps", "group_range", "sample_mean"]

#: ``thresholds`` option: one threshold pair per unit, or one per sample.
THRESHOLD_UNITS = ("unit", "sample")
#: ``off_grid`` option: off-grid visual tokens are always kept, or judged by S_r alone.
OFF_GRID = ("keep", "score")
#: How a unit's score map is brought onto the module's grid.
RESAMPLE = ("area", "bilinear")


@dataclass
class UnitSlots:
    """Where a batch's alive visual slots lie, for ``ATPPruner.units``.

    ``unit`` [B, V] long: global unit of each grid slot (-1 off grid / padding); ``patch`` [B, V]
    long: raster index in its unit's grid; ``grids``: (h, w) of each unit; ``unit_sample`` [U]
    long: the sample of each unit; ``group`` [B, V] long: the judging group of each slot (-1: not
    judged, always kept); ``group_sample`` [G] long; ``initial`` [B] long: judged slots of each
    sample before the first module (fixed-ratio counts are fractions of it).
    """

    unit: Tensor
    patch: Tensor
    grids: tuple[tuple[int, int], ...]
    unit_sample: Tensor
    group: Tensor
    group_sample: Tensor
    initial: list[int]
    per_sample: bool = False  # group b holds exactly sample b's judged slots (G = B)

    @property
    def num_groups(self) -> int:
        return int(self.group_sample.numel())


def judge_groups(unit: Tensor, valid: Tensor, unit_sample: Tensor, *, per: str = "unit",
                 off_grid: str = "keep") -> tuple[Tensor, Tensor]:
    """The judging group of every slot -> (group [B, V] long, -1 = not judged (always kept /
    padding); group_sample [G] long, the sample of each group).

    ``per="unit"``: the groups are the units (G = U); ``per="sample"``: one group per sample
    (G = B). Off-grid slots are not judged with ``off_grid="keep"``; with ``"score"`` they join
    the group of the nearest grid slot before them in the sample (after them when there is none).
    """
    bsz, vlen = unit.shape
    grid = valid & (unit >= 0)
    if per == "sample":
        rows = torch.arange(bsz, device=unit.device)[:, None].expand(bsz, vlen)
        judged = grid | (valid & (off_grid == "score"))
        return torch.where(judged, rows, torch.full_like(rows, -1)), torch.arange(bsz, device=unit.device)
    group = torch.where(grid, unit, torch.full_like(unit, -1))
    if off_grid == "score":
        slots = torch.arange(vlen, device=unit.device).expand(bsz, vlen)
        before = torch.where(grid, slots, torch.full_like(slots, -1)).cummax(1).values  # last grid slot <= v
        after = torch.where(grid, slots, torch.full_like(slots, vlen)).flip(1).cummin(1).values.flip(1)
        src = torch.where(before >= 0, before, after.clamp(max=vlen - 1))
        fill = unit.gather(1, src)
        group = torch.where(valid & ~grid, fill, group)
    return group, unit_sample


def group_rescale(s: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Divide each slot's score by the max over its group's slots ([B, V] -> [B, V] in [0, 1]);
    0 where ``group < 0`` or the group's max is 0."""
    judged = group >= 0
    s = s.masked_fill(~judged, 0.0)
    g = group.clamp(min=0)
    top = torch.zeros(num_groups, dtype=s.dtype, device=s.device).scatter_reduce(
        0, g.flatten(), s.flatten(), reduce="amax", include_self=True)[g]  # [B, V] max of each slot's group
    out = torch.where(top > 0, s / top.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    return out * judged


def slot_lookup(tables: Sequence[Tensor], unit: Tensor, patch: Tensor) -> Tensor:
    """Per-unit tables (unit u's [h_u * w_u] values) -> [B, V] the value at each slot's patch; 0 off grid."""
    offsets = [0]
    for t in tables:
        offsets.append(offsets[-1] + t.numel())
    flat = torch.cat([t.reshape(-1) for t in tables] + [torch.zeros(1, dtype=tables[0].dtype,
                                                                     device=tables[0].device)])
    start = torch.tensor(offsets[:-1], dtype=torch.long, device=unit.device)
    on = unit >= 0
    idx = torch.where(on, start[unit.clamp(min=0)] + patch.clamp(min=0), torch.full_like(unit, offsets[-1]))
    return flat.to(unit.device)[idx]


def unit_maps(values: Tensor, unit: Tensor, patch: Tensor, grids: Sequence[tuple[int, int]],
              out_grid: tuple[int, int], resample: str = "area") -> Tensor:
    """Scatter each unit's slot values onto its own grid and resample it to ``out_grid`` -> [U, H*W].

    ``values`` [B, V] (zero where a slot should not count); cells without a slot are 0. A unit
    already on ``out_grid`` is copied as it is; other grids are resampled with
    ``adaptive_avg_pool2d`` (``"area"``: each output cell is the mean of the input cells it
    covers, which averages when shrinking and repeats cells when growing) or bilinear
    interpolation (``"bilinear"``, align_corners=False).
    """
    h_out, w_out = out_grid
    n_out = h_out * w_out
    on = (unit >= 0).flatten()
    u_slot, p_slot, v_slot = unit.flatten().clamp(min=0), patch.flatten(), values.flatten().float()
    out = torch.zeros(len(grids), n_out, device=values.device)
    for shape in sorted(set(grids)):
        members = [u for u, g in enumerate(grids) if g == shape]
        h, w = shape
        size = len(members) * h * w
        row = torch.full((len(grids),), -1, dtype=torch.long, device=values.device)
        row[torch.tensor(members, device=values.device)] = torch.arange(len(members), device=values.device)
        r = torch.where(on, row[u_slot], -1)
        cell = torch.where(r >= 0, r * (h * w) + p_slot, size)  # slots off these grids -> a dump cell
        flat = torch.zeros(size + 1, device=values.device).scatter_add(0, cell, v_slot)[:size].view(len(members), h * w)
        if (h, w) != (h_out, w_out):
            img = flat.view(len(members), 1, h, w)
            if resample == "area":
                img = F.adaptive_avg_pool2d(img, (h_out, w_out))
            else:
                img = F.interpolate(img, size=(h_out, w_out), mode="bilinear", align_corners=False)
            flat = img.reshape(len(members), n_out)
        out[torch.tensor(members, device=values.device)] = flat
    return out


def group_maps(maps: Tensor, unit_sample: Tensor, per: str, batch: int) -> Tensor:
    """Unit maps [U, X] -> one row per judging group: the maps themselves (``per="unit"``), or each
    sample's mean over its units (``per="sample"``, [B, X])."""
    if per == "unit":
        return maps
    return sample_mean(maps, unit_sample, batch)


def sample_mean(rows: Tensor, sample: Tensor, batch: int) -> Tensor:
    """Rows [R, ...] of samples ``sample`` [R] long -> [B, ...] each sample's mean row (0 for a
    sample with no row)."""
    total = rows.new_zeros((batch, *rows.shape[1:])).index_add(0, sample, rows)
    count = rows.new_zeros(batch).index_add(0, sample, torch.ones(sample.shape[0], dtype=rows.dtype,
                                                                  device=rows.device))
    return total / count.clamp_min(1.0).view(batch, *([1] * (rows.ndim - 1)))


def group_range(s: Tensor, group: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """(min, max) [G] of the scores ``s`` [B, V] over each group's slots (+inf / -inf for an empty group)."""
    judged = group >= 0
    g = group.clamp(min=0).flatten()
    s = s.float()
    lo = torch.full((num_groups,), float("inf"), device=s.device).scatter_reduce(
        0, g, s.masked_fill(~judged, float("inf")).flatten(), reduce="amin", include_self=True)
    hi = torch.full((num_groups,), float("-inf"), device=s.device).scatter_reduce(
        0, g, s.masked_fill(~judged, float("-inf")).flatten(), reduce="amax", include_self=True)
    return lo, hi
