"""The per-sample visual layout of one prefill, as a value the family adapter produces.

Both stages read their family facts from here instead of from model constants:

* ``VisualUnit``: one pass of the vision tower — a whole image (LLaVA-1.5), the base image /
  one crop of an any-res image (LLaVA-NeXT), or one frame / temporal slice of a video
  (``frame``). It says which image it belongs to, its crop and frame index, its patch grid
  ``(h, w)`` (the tower's output tokens, [CLS] excluded) and whether the tower's sequence
  carries a [CLS] token (at ``cls_index``).
* ``VisualLayout``: the units of a batch's images in tower order, each image's unpruned
  placeholder count in the LLM sequence, and — once the prompt is known (``with_sequence``) — per
  sample and column: whether the column is a visual placeholder, which image it belongs to and
  its rank inside that image's run, the positions in the family's form (``[B, L]`` for Llama-style
  rope) and the family's rotary function ``rotary(hidden, position_ids) -> (cos, sin)``.
* Its grids (``with_grids``, for decoder-stage methods that read each visual token's place on a
  grid, ATP): ``grid_unit`` / ``grid_patch`` per column say on which unit's grid a placeholder
  lies and where (raster index); a placeholder on no grid (LLaVA-NeXT's ``image_newline``) has
  ``grid_unit = -1``. There a unit is one grid of placeholders in the LLM sequence (LLaVA-NeXT's
  unpadded crop mosaic is one unit), built by the adapter's ``grid_layout``.

``placeholder_runs`` is the shared step that maps placeholder columns to images: image ``i`` owns
the ``tokens_per_image[i]`` placeholders that follow image ``i - 1``'s, in (batch, sequence) order
(the order in which transformers scatters image features into the placeholders).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["VisualUnit", "VisualLayout", "placeholder_runs", "interleave_runs"]


@dataclass(frozen=True)
class VisualUnit:
    """One pass of the vision tower: ``image`` index (batch order; a video counts as one image),
    ``crop`` (0 = the whole / base image, 1.. = any-res crops in raster order), ``frame`` (the
    video frame or temporal slice, 0 for images), ``grid`` (h, w) of its patch tokens, ``has_cls``
    (the tower's sequence has a [CLS] token at ``cls_index``, before the patches)."""

    image: int
    grid: tuple[int, int]
    has_cls: bool
    crop: int = 0
    cls_index: int = 0
    #: Frame (temporal slice) of a video this pass belongs to (0 for images).
    frame: int = 0

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class VisualLayout:
    """The visual layout of one prefill (see the module docstring).

    Attributes:
        units: every tower pass of the batch's images, in the order the tower runs them.
        tokens_per_image: [I] unpruned placeholder count of each image in the LLM sequence.
        visual: [B, L] bool, placeholder columns (None until ``with_sequence``).
        image: [B, L] long, the image each placeholder column belongs to (clamped to [0, I-1] off
            placeholders; read it where ``visual``).
        rank: [B, L] long, each placeholder's index inside its image's run (meaningful where
            ``visual``).
        positions: [B, L] long position ids in the family's form, or None (the model derives them).
        rotary: the language model's rotary function ``(hidden, position_ids) -> (cos, sin)``.
        family_data: what the adapter needs to pack this batch's units again (its own type, e.g.
            LLaVA-NeXT's per-image mosaics); the stages never read it.
        grid_unit: [B, L] long, the index in ``units`` of the grid each placeholder lies on, -1 for
            placeholders on no grid and off placeholders (None until ``with_grids``).
        grid_patch: [B, L] long, the placeholder's raster index in that unit's grid (-1 elsewhere).
    """

    units: tuple[VisualUnit, ...] = ()
    tokens_per_image: tuple[int, ...] = ()
    visual: Tensor | None = None
    image: Tensor | None = None
    rank: Tensor | None = None
    positions: Tensor | None = None
    rotary: Callable[..., Any] | None = None
    family_data: Any = None
    grid_unit: Tensor | None = None
    grid_patch: Tensor | None = None

    @property
    def num_images(self) -> int:
        return len(self.tokens_per_image)

    def grids(self) -> list[tuple[int, int]]:
        """(h, w) of every unit, in tower order."""
        return [u.grid for u in self.units]

    def with_sequence(self, visual: Tensor, position_ids: Tensor | None = None,
                      rotary: Callable[..., Any] | None = None) -> "VisualLayout":
        """This layout with its per-column part filled from the placeholder columns ``visual`` [B, L]."""
        visual, image, rank = placeholder_runs(visual, self.tokens_per_image)
        return replace(self, visual=visual, image=image, rank=rank, positions=position_ids, rotary=rotary)

    def with_runs(self, tokens_per_image: tuple[int, ...] | list[int]) -> "VisualLayout":
        """This layout (``visual`` filled) with the placeholder runs ``tokens_per_image`` (one per image
        or video, in (batch, sequence) order) and the per-column part recomputed from them."""
        return replace(self, tokens_per_image=tuple(tokens_per_image)).with_sequence(self.visual, self.positions,
                                                                                    self.rotary)

    def with_grids(self, units: tuple[VisualUnit, ...], unit_of: Tensor, patch_of: Tensor) -> "VisualLayout":
        """This layout (``visual`` filled) with its grids: ``unit_of`` / ``patch_of`` [P] long give
        the unit (index into ``units``, -1 = on no grid) and raster patch of every placeholder, in
        (batch, sequence) order, P = ``sum(tokens_per_image)``. No host read: a prompt with another
        number of placeholders gets arbitrary grids (``check_placeholders`` says so)."""
        dev = self.visual.device
        unit = torch.full(self.visual.shape, -1, dtype=torch.long, device=dev)
        patch = torch.full_like(unit, -1)
        if unit_of.numel():
            # each placeholder's index in (batch, sequence) order
            order = (self.visual.flatten().long().cumsum(0) - 1).clamp(0, unit_of.numel() - 1).view_as(unit)
            unit = torch.where(self.visual, unit_of.to(dev)[order], unit)
            patch = torch.where(self.visual, patch_of.to(dev)[order], patch)
        return replace(self, units=tuple(units), grid_unit=unit, grid_patch=patch)

    def check_placeholders(self, total: int) -> None:
        """Raise ValueError unless ``total``, the prompt's placeholder count (read on the host by the
        caller), is what the images give (``sum(tokens_per_image)``)."""
        if total != sum(self.tokens_per_image):
            raise ValueError(f"vlmprune: the prompt holds {total} image placeholders but its images give "
                             f"{sum(self.tokens_per_image)} tokens ({list(self.tokens_per_image)}); one placeholder "
                             "per image token is needed (placeholders of other inputs, e.g. videos, are not "
                             "supported here yet)")


def placeholder_runs(visual: Tensor, tokens_per_image: tuple[int, ...] | list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """visual [B, L] bool placeholders, per-image run lengths [I] -> (visual, image [B, L], rank [B, L]).

    ``image`` is the owning image of each placeholder (clamped into [0, I-1] elsewhere) and ``rank``
    its index inside that image's run; no host synchronisation.
    """
    runs = torch.tensor(list(tokens_per_image), device=visual.device, dtype=torch.long)
    if runs.numel() == 0:
        zeros = torch.zeros(visual.shape, dtype=torch.long, device=visual.device)
        return visual, zeros, zeros
    ends = runs.cumsum(0)  # [I] exclusive run ends
    order = visual.flatten().long().cumsum(0).view_as(visual) - 1  # [B, L] placeholder rank in (batch, seq) order
    image = torch.bucketize(order.clamp(min=0), ends, right=True).clamp(max=runs.numel() - 1)  # [B, L]
    rank = order - (ends - runs)[image]
    return visual, image, rank


def interleave_runs(kinds: list[int], counts: tuple[tuple[int, ...], ...]) -> list[tuple[int, int]]:
    """The placeholder runs of a prompt with several modalities, in prompt order.

    ``kinds`` [P] host ints: the modality of each placeholder in (batch, sequence) order (0 = images,
    1 = videos, ...); ``counts[m]``: the placeholder count of each input of modality m, in the order
    of its inputs. Returns ``(m, i)`` per run: the run is input i of modality m. Each run takes the
    next input of its first placeholder's modality. Raises ValueError when the placeholders do not
    match the inputs (a run of mixed modalities, too many or too few placeholders).
    """
    runs, taken, p = [], [0] * len(counts), 0
    while p < len(kinds):
        m = kinds[p]
        i = taken[m]
        if i >= len(counts[m]) or len(set(kinds[p:p + counts[m][i]])) != 1 or p + counts[m][i] > len(kinds):
            break
        runs.append((m, i))
        p += counts[m][i]
        taken[m] += 1
    if p != len(kinds) or taken != [len(c) for c in counts]:
        given = "; ".join(f"{len(c)} input(s) of modality {m} with {list(c)} tokens" for m, c in enumerate(counts))
        raise ValueError(f"vlmprune: the prompt's {len(kinds)} image / video placeholders do not match its inputs "
                         f"({given}); one placeholder per token is needed, in the inputs' order")
    return runs
