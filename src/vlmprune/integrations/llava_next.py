"""LLaVA-NeXT (transformers ``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``): any-res adapter.

Layout in transformers 5.x: as LLaVA-1.5 (``model.vision_tower`` CLIP, ``multi_modal_projector``,
``language_model`` Llama / Mistral), plus ``model.image_newline`` [D_text]. An image of size
(H, W) (``image_sizes``) is the base image plus a (gh, gw) mosaic of crops chosen from
``config.image_grid_pinpoints``; ``pixel_values`` is [B, max_crops, 3, S, S] (``compat``
assumption 10). Each crop is one tower pass with its own [CLS], so each crop is one
``VisualUnit`` with the (h, w) = (S/patch, S/patch) grid.

**Vision stage, per crop.** The method reduces every crop (base and mosaic crops alike) on its own
features and its own [CLS] signals; budgets (``keep``) are per crop: a count keeps that many of
the crop's N patches, a ratio the same fraction of each crop (so the image's budget is split in
proportion to its crops' tokens). The kept tokens are then packed as the stock model packs all of
them: the base crop's kept tokens first, in the method's output order; then the mosaic's kept
tokens in raster order of the mosaic, where a kept patch that the stock unpadding cuts away
(outside the image's aspect ratio) is dropped; extra tokens of mosaic crops (PruMerge+'s summary
token, which has no patch position) follow the mosaic.

**``image_newline`` rule** (``newlines``): ``"keep"`` (default) keeps every row's newline token:
newlines are layout, not prunable, and not counted in any budget; ``"rows"`` drops the newline of
a mosaic row that lost all its tokens. It is a family option of ``vlmprune.apply``:
``apply(model, "prumerge+", newlines="rows")``.

**Decoder stage.** The decoder is Llama-like with 1-D positions, so the decoder-stage methods run
unchanged; there every placeholder — newline tokens included — is a visual token. For methods that
read grids (ATP), ``image_grids`` gives each image two units: the base image (its first N
placeholders, on the crop grid) and the unpadded mosaic (H' x W', the rows of W' tokens each
followed by its newline); the newline tokens lie on no grid. The mosaic's shape is read from where
the ``image_newline`` tokens sit in the language model's input (exact copies of the parameter), so
it needs neither ``image_sizes`` nor pixels (``generate`` passes neither to the prefill).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import ModelAdapter, register_adapter
from .compat import anyres_crops, unpad_window
from .layout import VisualLayout, VisualUnit

__all__ = ["LlavaNextAdapter", "LLAVA_NEXT", "Mosaic"]


@dataclass(frozen=True)
class Mosaic:
    """One image's any-res geometry: ``crops`` tower passes (base included), the (gh, gw) mosaic
    of crops, and ``window`` [H', W'] long, the raster indices of the (gh*h) x (gw*w) mosaic
    patch grid that survive the unpadding."""

    crops: int
    gh: int
    gw: int
    window: Tensor


@dataclass(frozen=True)
class LlavaNextAdapter(ModelAdapter):
    """``ModelAdapter`` for any-res LLaVA-NeXT (see the module docstring)."""

    newline_param: str = "image_newline"
    grid_pinpoints_field: str = "image_grid_pinpoints"
    #: ``"keep"``: every newline token is kept; ``"rows"``: a mosaic row without kept tokens loses it.
    newlines: str = "keep"

    def configure(self, **options: Any) -> "LlavaNextAdapter":
        if "newlines" in options and options["newlines"] not in ("keep", "rows"):
            raise ValueError(f"llava-next: newlines must be 'keep' or 'rows', got {options['newlines']!r}")
        return super().configure(**options)

    def fixed_image_tokens(self, model: Any) -> int | None:
        return None

    def budget_tokens(self, model: Any, stage: str) -> int:
        """Vision stage: N patches of one crop; decoder stage: the most tokens an image can get."""
        n = self.tokens_per_image(model)
        if stage == "vision":
            return n
        h, w = self.patch_grid(model)
        tile = int(self.vision_config(model).image_size)
        return n + max((ph // tile) * h * ((pw // tile) * w + 1) for ph, pw in self._pinpoints(model))

    def _pinpoints(self, model: Any) -> list[list[int]]:
        return [list(p) for p in getattr(self.config(model), self.grid_pinpoints_field)]

    def mosaic(self, model: Any, image_size: Any) -> Mosaic:
        """The any-res geometry of one image of ``image_size`` (H, W)."""
        h, w = self.patch_grid(model)
        tile = int(self.vision_config(model).image_size)
        crops, gh, gw = anyres_crops(image_size, self._pinpoints(model), tile)
        return Mosaic(crops=crops, gh=gh, gw=gw, window=unpad_window(gh * h, gw * w, image_size))

    def image_layout(self, model: Any, pixel_values: Tensor, image_sizes: Any = None,
                     strategy: str | None = None, **geometry: Any) -> VisualLayout:
        """Units: per image its base image (crop 0) and mosaic crops; placeholders per image:
        N + H' * (W' + 1) (one newline per mosaic row), or N + 1 for an image without mosaic."""
        if image_sizes is None:
            raise ValueError("vlmprune: LLaVA-NeXT needs image_sizes (the processor returns them)")
        strategy = self.select_strategy(model) if strategy is None else strategy
        if strategy not in self.cls_dropping_strategies:
            raise ValueError(f"vlmprune: LLaVA-NeXT supports vision_feature_select_strategy "
                             f"{' or '.join(map(repr, self.cls_dropping_strategies))} only, got {strategy!r}")
        grid, has_cls, n = self.patch_grid(model), self.tower_has_cls(model), self.tokens_per_image(model)
        units, counts, mosaics = [], [], []
        for i, size in enumerate(image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes):
            m = self.mosaic(model, size)
            units += [VisualUnit(image=i, grid=grid, has_cls=has_cls, crop=c, cls_index=self.cls_index)
                      for c in range(m.crops)]
            rows, cols = m.window.shape
            counts.append(n + (rows * (cols + 1) if m.crops > 1 else 1))
            mosaics.append(m)
        return VisualLayout(units=tuple(units), tokens_per_image=tuple(counts), family_data=tuple(mosaics))

    def size_layout(self, model: Any, image_size: Any) -> VisualLayout:
        """One image of ``image_size`` (H, W) px: its base image and mosaic crops, N + H' * (W' + 1)
        placeholders (``image_layout``); model or config."""
        return self.image_layout(model, None, image_sizes=[list(image_size)])

    def geometry_inputs(self, model: Any, image_sizes: list[tuple[int, int]]) -> dict[str, Any]:
        """``image_sizes`` [I, 2] long (H, W), as the processor returns it."""
        return {"image_sizes": torch.tensor([list(map(int, s)) for s in image_sizes], dtype=torch.long)}

    def random_image_inputs(self, model: Any, image_sizes: list[tuple[int, int]], generator: Any,
                            dtype: Any = None) -> dict[str, Any]:
        """``pixel_values`` [I, max_crops, 3, S, S] (crops past an image's own count are padding,
        as the processor pads them) and ``image_sizes``."""
        vc = self.vision_config(model)
        side = int(vc.image_size)
        crops = max(self.mosaic(model, size).crops for size in image_sizes)
        pixels = torch.randn(len(image_sizes), crops, int(getattr(vc, "num_channels", 3)), side, side,
                             generator=generator)
        return {"pixel_values": pixels.to(dtype or torch.float32), **self.geometry_inputs(model, image_sizes)}

    def encode(self, model: Any, pixel_values: Tensor, layer: int | list[int], strategy: str,
               layout: VisualLayout | None = None) -> Tensor:
        """pixel_values [B, max_crops, 3, S, S] (or [U, 3, S, S]) -> features [U, N, D], one row
        per crop of ``layout`` (each image's first ``crops`` crops)."""
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:m.crops] for pv, m in zip(pixel_values, layout.family_data)])
        return super().encode(model, pixel_values, layer, strategy, layout)

    def pack(self, model: Any, projected: Tensor, reduction: Any, counts: list[int],
             layout: VisualLayout) -> tuple[list[Tensor], list[int]]:
        """Per-crop kept tokens -> per image [n_i, D_text]: base crop's tokens, then the mosaic's
        surviving tokens in raster order with the newline rule, then mosaic crops' extra tokens;
        NaN after the image's kept count. Returns the tensors and the kept counts."""
        h, w = self.patch_grid(model)
        newline = getattr(self.base_model(model), self.newline_param).to(projected)  # [D_text]
        host = reduction.indices if reduction.extra is None else \
            torch.cat([reduction.indices, reduction.extra[:, None].long()], dim=1)
        host = host.cpu()  # one transfer: patch indices [U, M'] (and the extra flags)
        indices = host[:, :reduction.indices.shape[1]]
        extra = host[:, -1].bool().tolist() if reduction.extra is not None else [False] * len(counts)
        out, kept, u = [], [], 0
        for n_i, m in zip(layout.tokens_per_image, layout.family_data):
            parts = [projected[u, :counts[u]]]  # the base image, in the method's order
            if m.crops > 1:
                parts += self._pack_mosaic(projected, indices, counts, extra, u, m, h, w, newline)
            else:
                parts.append(newline[None])
            tokens = torch.cat(parts)
            padded = tokens.new_full((n_i, tokens.shape[-1]), float("nan"))
            padded[:tokens.shape[0]] = tokens
            out.append(padded)
            kept.append(int(tokens.shape[0]))
            u += m.crops
        return out, kept

    def _pack_mosaic(self, projected: Tensor, indices: Tensor, counts: list[int], extra: list[bool], u0: int,
                     m: Mosaic, h: int, w: int, newline: Tensor) -> list[Tensor]:
        """The mosaic crops u0+1 .. u0+crops-1 of one image -> [tokens in packing order, extras]."""
        rows, cols = m.window.shape
        slot = torch.full((m.gh * h * m.gw * w,), -1, dtype=torch.long)
        slot[m.window.flatten()] = torch.arange(rows * cols)  # mosaic raster index -> window slot (-1: cut)
        keys, rows_of, sources, extras = [], [], [], []
        for c in range(1, m.crops):
            u = u0 + c
            n_idx = counts[u] - int(extra[u])
            idx = indices[u, :n_idx]  # patch indices of the crop's kept tokens, output order
            cr, cc = divmod(c - 1, m.gw)
            q = slot[(cr * h + idx // w) * (m.gw * w) + cc * w + idx % w]  # window slot of each kept token
            ok = q >= 0
            keys.append(q[ok] // cols * (cols + 1) + q[ok] % cols)  # key in the packed rows (newline = col W')
            rows_of.append(q[ok] // cols)
            sources.append(torch.nonzero(ok).flatten() + u * projected.shape[1])
            if extra[u]:
                extras.append(projected[u, counts[u] - 1:counts[u]])
        key, src = torch.cat(keys), torch.cat(sources)
        if self.newlines == "keep":
            nl_rows = torch.arange(rows)
        else:
            nl_rows = torch.unique(torch.cat(rows_of))
        nl_key = nl_rows * (cols + 1) + cols
        flat = projected.reshape(-1, projected.shape[-1])
        tokens = torch.cat([flat[src.to(flat.device)], newline[None].expand(len(nl_key), -1)])
        order = torch.argsort(torch.cat([key, nl_key]))
        return [tokens[order.to(tokens.device)], *extras]


    def image_grids(self, model: Any, layout: VisualLayout, embeds: Tensor) -> tuple[tuple[VisualUnit, ...], Tensor, Tensor]:
        """Per image: the base image (unit on the h x w crop grid: its first N placeholders) and, for
        an image with a mosaic, the unpadded mosaic (unit on its H' x W' grid, H' = the number of
        newline tokens after the base image, each mosaic row's W' tokens followed by one newline);
        newline tokens lie on no grid (-1). One host transfer (the newline flags)."""
        flags = self.newline_flags(model, layout, embeds).cpu()  # [P] placeholder is a newline
        layout.check_placeholders(flags.numel())
        units, unit_of, patch_of, start = [], [], [], 0
        for i, n_i in enumerate(layout.tokens_per_image):
            new, uo, po = self.one_image_grids(model, i, flags[start:start + n_i], len(units))
            start += n_i
            units += new
            unit_of.append(uo)
            patch_of.append(po)
        return tuple(units), torch.cat(unit_of), torch.cat(patch_of)

    def newline_flags(self, model: Any, layout: VisualLayout, embeds: Tensor) -> Tensor:
        """[P] bool (device): which placeholders of ``layout`` hold the ``image_newline`` embedding."""
        newline = getattr(self.base_model(model), self.newline_param)
        return (embeds[layout.visual] == newline.to(embeds)).all(-1)

    def one_image_grids(self, model: Any, i: int, flags: Tensor, first_unit: int) -> tuple[list[VisualUnit], Tensor, Tensor]:
        """``image_grids``' rule for image ``i`` alone: its placeholders' newline flags [n_i] (host)
        -> (its units, unit_of [n_i] counted from ``first_unit``, patch_of [n_i])."""
        h, w = self.patch_grid(model)
        n, n_i = h * w, flags.numel()
        has_cls = self.tower_has_cls(model)
        rest = flags[n:]
        units = [VisualUnit(image=i, grid=(h, w), has_cls=has_cls, crop=0, cls_index=self.cls_index)]
        uo = torch.full((n_i,), -1, dtype=torch.long)
        po = torch.full((n_i,), -1, dtype=torch.long)
        uo[:n], po[:n] = first_unit, torch.arange(min(n, n_i))
        rows = int(rest.sum())
        width = (n_i - n) // rows - 1 if rows else -1
        expect = torch.zeros(max(n_i - n, 0), dtype=torch.bool)
        if rows and width >= 0:
            expect[width::width + 1] = True
        if n_i <= n or not (rows and rows * (width + 1) == n_i - n and torch.equal(rest, expect)):
            raise ValueError(f"vlmprune: image {i} of this batch is not laid out as LLaVA-NeXT packs images "
                             f"(base image of {n} tokens, then rows of mosaic tokens each ending with the "
                             f"image_newline token); got {n_i} placeholders with {rows} newlines")
        if width > 0:
            units.append(VisualUnit(image=i, grid=(rows, width), has_cls=has_cls, crop=1, cls_index=self.cls_index))
            j = torch.arange(n_i - n)
            row, col = j // (width + 1), j % (width + 1)
            on = col < width
            uo[n:] = torch.where(on, first_unit + 1, -1)
            po[n:] = torch.where(on, row * width + col, -1)
        return units, uo, po


LLAVA_NEXT = register_adapter(LlavaNextAdapter(
    family="llava-next",
    model_classes=("LlavaNextForConditionalGeneration", "LlavaNextModel"),
    config_types=("llava_next",),
    family_options=("newlines",),
))
