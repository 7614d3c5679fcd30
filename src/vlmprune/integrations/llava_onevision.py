"""LLaVA-OneVision (transformers ``LlavaOnevisionForConditionalGeneration`` / ``LlavaOnevisionModel``).

Layout in transformers 5.x::

    LlavaOnevisionForConditionalGeneration
      .model: LlavaOnevisionModel
        .vision_tower: SiglipVisionModel    .encoder.layers[i].self_attn.{q,k}_proj (no [CLS])
        .multi_modal_projector              2-layer MLP, per token
        .image_newline                      [D_text], already in LLM space
        .language_model: Qwen2Model         1-D positions, Llama's rotate-half rope
      .lm_head

**Images** (``compat`` assumption 17) are any-res as in LLaVA-NeXT (``image_sizes``,
``config.image_grid_pinpoints``, ``pixel_values`` [B, max_crops, 3, S, S]), with three
differences: the SigLIP tower has no [CLS] token (``vision_feature_select_strategy`` "full"), the
projector runs on every token *before* the packing, and the packing may resize the unpadded
mosaic bilinearly (``vision_aspect_ratio`` "anyres_max_<m>": a mosaic of more than about m crops'
tokens is shrunk to about m crops' tokens), so a packed mosaic token need not be one crop patch.
An image whose sample holds several images (``batch_num_images``) is its base image only.

**Vision stage: the units are the packed grids, not the crops.** Each image has a base unit (its
base image, the h x w crop grid) and, when it has crops, a mosaic unit on the *packed* grid
(rows x cols: after the unpadding and the anyres_max resize, newlines excluded). ``encode`` runs
the tower on every crop, the projector on every token and the stock packing
(``compat.onevision_pack``), so a method makes one decision per token the LLM would receive, on
the grid the LLM receives it in (selecting crop patches before the resize would not say which
resized tokens survive); ``project`` is the identity, as on Qwen2-VL after its merger. Budgets
(``keep``) are per unit: a ratio keeps that fraction of the base image and of the mosaic; a count
keeps that many tokens of each (validated on the base image's h*w; a mosaic with fewer tokens
refuses it at the first forward). Packing (``pack``): the base image's kept tokens in the method's
output order, then the mosaic's kept tokens in raster order with the ``image_newline`` rule of
LLaVA-NeXT (family option ``newlines``: ``"keep"``, the default, keeps every row's newline;
``"rows"`` drops the newline of a row that lost all its tokens), then a mosaic's extra token
(PruMerge+'s summary); an image without crops ends with its one newline. Kept tokens take the
first placeholders of the image's run (Llama positions, compacted like LLaVA-1.5).

**Substitute [CLS] score** (cls-topk, prumerge, prumerge+; ``importance_score``): the attention
each token *receives* in the last vision layer, softmax(q k^T * scale) from that layer's hooked
``q_proj`` / ``k_proj`` outputs (assumption 19; the tower keeps its sdpa attention), averaged
over heads and over the tower pass's queries; the scores (and the keys PruMerge merges by, the
layer's ``k_proj`` outputs) are then packed exactly as the tokens are — the base image as it is,
the crops through the same unpadding and bilinear resize into the mosaic grid, video frames
through the same pooling — and each unit's scores are renormalised to sum to 1.

**Videos** (assumption 18): ``pixel_values_videos`` [V, F, 3, S, S]; every frame runs through the
tower and projector and is pooled to (ceil(h/2), ceil(w/2)); a video has F * n' + 1
``video_token_id`` placeholders (one ``image_newline`` at the end). A second modality view
(``modality_views``: ``get_video_features``, the ``"video"`` key) with **one unit per frame** on
its pooled grid, so budgets are per frame, as on Video-LLaVA and Qwen2-VL; a video's run is its
frames' kept tokens (the method's order), frame after frame, then its newline (always kept).
Image and video samples may be mixed in a batch.

**Decoder stage.** Qwen2's decoder with 1-D positions: FastV and SparseVLM run unchanged, every
image and video placeholder (newlines included) is a visual token. ATP reads each image's grids
from the newline tokens in the language model's input, with LLaVA-NeXT's rule (``image_grids``:
the base image, then the packed mosaic whose rows end with a newline), and each video's frames as
units on the pooled grid (``grid_layout``; the video's final newline lies on no grid).

The bench and cost model get per-pass figures: ``unit_tokens`` lists every *tower pass* (crop or
frame), not every unit, and the projector sees every token (``projector_after_pruning`` False).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import register_adapter
from .compat import onevision_mosaic, onevision_pack, onevision_pool, onevision_video_grid, vision_qk_heads
from .layout import VisualLayout, VisualUnit, interleave_runs
from .llava_next import LlavaNextAdapter

__all__ = ["LlavaOnevisionAdapter", "LLAVA_ONEVISION", "OvImage", "OvBatch"]


@dataclass(frozen=True)
class OvImage:
    """One image's geometry: ``crops`` tower passes (1: the base image only), the (gh, gw) mosaic
    of crops, ``size`` (H, W) px and ``shape`` (rows, cols) of its packed mosaic ((0, 0) without)."""

    crops: int
    gh: int
    gw: int
    size: tuple[int, int]
    shape: tuple[int, int]


@dataclass(frozen=True)
class OvBatch:
    """``family_data`` of a OneVision layout: the images' geometry (or ``frames`` per video, for the
    video view) and the ``vision_aspect_ratio`` the packing uses."""

    images: tuple[OvImage, ...] = ()
    frames: int = 0
    aspect: str = ""

    @property
    def passes(self) -> list[int]:
        """Tower passes per image (crops) or per video (frames)."""
        return [m.crops for m in self.images] if not self.frames else []


@dataclass(frozen=True)
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """``ModelAdapter`` for LLaVA-OneVision (see the module docstring); ``video`` marks the video view."""

    aspect_field: str = "vision_aspect_ratio"
    video_token_id_field: str = "video_token_id"
    image_geometry: tuple[str, ...] = ("batch_num_images", "vision_aspect_ratio")
    importance_score: str = ("attention received in the last vision layer (head- and query-averaged per tower "
                             "pass), packed like the tokens (unpadded and anyres_max-resized mosaic, pooled video "
                             "frames) and renormalised per grid (no [CLS] token)")
    #: Passes of the tower per step of the substitute score (memory [chunk, heads, S, S]).
    score_chunk: int = 4
    #: Whether this is the video view (``modality_views``).
    video: bool = False

    def configure(self, **options: Any) -> "LlavaOnevisionAdapter":
        if options.get("newlines", "keep") not in ("keep", "rows"):
            raise ValueError(f"{self.family}: newlines must be 'keep' or 'rows', got {options['newlines']!r}")
        return super(LlavaNextAdapter, self).configure(**options)

    def modality_views(self, model: Any) -> tuple[LlavaNextAdapter, ...]:
        """(images, videos): the video view reads ``get_video_features``, ``pixel_values_videos`` and
        the ``video_token_id`` placeholders."""
        if self.video:
            return (self,)
        return (self, dataclasses.replace(self, video=True, image_modality="video", image_geometry=(),
                                          image_features_method="get_video_features",
                                          pixel_values_field="pixel_values_videos",
                                          image_token_id_field=self.video_token_id_field))

    # ------------------------------------------------------------ config knowledge
    def video_token_id(self, model: Any) -> int:
        return int(getattr(self.config(model), self.video_token_id_field))

    def visual_columns(self, model: Any, input_ids: Tensor) -> Tensor:
        """input_ids [B, L] -> [B, L] bool: image and video placeholders (the decoder stage's)."""
        return (input_ids == self.image_token_id(model)) | (input_ids == self.video_token_id(model))

    def sequence_layout(self, model: Any, input_ids: Tensor, layout: VisualLayout,
                        position_ids: Tensor | None = None) -> VisualLayout:
        """The view's own placeholders only (images: ``image_token_id``; videos: ``video_token_id``)."""
        return layout.with_sequence(input_ids == self.image_token_id(model), position_ids, self.rotary(model))

    def grid_layout(self, model: Any, layout: VisualLayout, embeds: Tensor, images: dict[str, Any]) -> VisualLayout:
        """As LLaVA-NeXT's rule for the images, with videos: each placeholder run is an image or a
        video in the prompt's order (told by its first placeholder's id); a video's frame f is a unit
        on the pooled grid (its j-th token at patch j), its final newline on no grid. One host
        transfer (the runs' kinds and the newline flags)."""
        videos = self.video_placeholders(model, layout, images)
        if videos is None:
            return super().grid_layout(model, layout, embeds, images)
        counts, kinds = videos
        host = torch.stack([kinds, self.newline_flags(model, layout, embeds).long()]).cpu()  # one transfer
        newline = host[1].bool()
        pooled = onevision_video_grid(*self.patch_grid(model))
        per_frame = pooled[0] * pooled[1]
        runs, units, unit_of, patch_of, start = [], [], [], [], 0
        for r, (m, i) in enumerate(interleave_runs(host[0].tolist(), counts)):
            n_i = counts[m][i]
            flags = newline[start:start + n_i]
            start += n_i
            runs.append(n_i)
            if m == 0:
                new, uo, po = self.one_image_grids(model, r, flags, len(units))
            else:
                frames = (n_i - 1) // per_frame
                if frames < 1 or frames * per_frame + 1 != n_i or not flags[-1] or flags[:-1].any():
                    raise ValueError(f"vlmprune: video {i} of this batch is not laid out as LLaVA-OneVision packs "
                                     f"videos (frames of {per_frame} pooled tokens, then one image_newline); got "
                                     f"{n_i} placeholders with {int(flags.sum())} newlines")
                new = [VisualUnit(image=r, grid=pooled, has_cls=False, frame=f) for f in range(frames)]
                j = torch.arange(n_i - 1)
                off = torch.tensor([-1])
                uo, po = torch.cat([len(units) + j // per_frame, off]), torch.cat([j % per_frame, off])
            units += new
            unit_of.append(uo)
            patch_of.append(po)
        return layout.with_runs(runs).with_grids(tuple(units), torch.cat(unit_of), torch.cat(patch_of))

    def aspect(self, model: Any, value: str | None = None) -> str:
        """The ``vision_aspect_ratio`` in force: ``value``, else the config's."""
        return str(value if value is not None else getattr(self.config(model), self.aspect_field))

    def _check_strategy(self, model: Any, strategy: str) -> None:
        """Each tower pass must give exactly its h x w patch tokens (the packing's assumption)."""
        if (strategy in self.cls_dropping_strategies) != self.tower_has_cls(model):
            vtype = getattr(self.vision_config(model), "model_type", "?")
            raise ValueError(f"vlmprune: LLaVA-OneVision needs each tower pass to give its patch tokens only "
                             f"(vision_feature_select_strategy 'full' on a tower without [CLS], 'default' on one "
                             f"with it); got {strategy!r} on {vtype}")

    def signal_problem(self, model: Any, strategy: str | None = None) -> str | None:
        """The substitute score needs the last vision layer's q_proj / k_proj (no [CLS] needed)."""
        try:
            self.get_last_qk(model)
        except (AttributeError, IndexError, TypeError):
            return f"cannot find q_proj/k_proj of the last vision layer ({' or '.join(self.vision_layers)})[-1]"
        return None

    # ------------------------------------------------------------ layout
    def mosaic(self, model: Any, image_size: Any, aspect: str | None = None, crops: bool = True) -> OvImage:
        """The geometry of one image of ``image_size`` (H, W) (``crops`` False: its base image only)."""
        h, _ = self.patch_grid(model)
        size = tuple(int(x) for x in image_size)
        if not crops:
            return OvImage(crops=1, gh=0, gw=0, size=size, shape=(0, 0))
        tile = int(self.vision_config(model).image_size)
        n, gh, gw, rows, cols = onevision_mosaic(size, self._pinpoints(model), tile, h, self.aspect(model, aspect))
        return OvImage(crops=n, gh=gh, gw=gw, size=size, shape=(rows, cols) if n > 1 else (0, 0))

    def image_layout(self, model: Any, pixel_values: Tensor, image_sizes: Any = None,
                     strategy: str | None = None, **geometry: Any) -> VisualLayout:
        """Images: per image a base unit (h x w) and, with crops, a mosaic unit on its packed grid
        (rows x cols); N + rows * (cols + 1) placeholders (N + 1 without crops). Videos
        (``pixel_values`` [V, F, 3, S, S]): one unit per frame on the pooled grid, F * n' + 1
        placeholders per video. ``family_data`` is an ``OvBatch``."""
        strategy = self.select_strategy(model) if strategy is None else strategy
        self._check_strategy(model, strategy)
        grid = self.patch_grid(model)
        n = grid[0] * grid[1]
        if self.video:
            if pixel_values is None or pixel_values.dim() != 5:
                raise ValueError("vlmprune: LLaVA-OneVision pixel_values_videos must be [videos, frames, 3, H, W], "
                                 f"got {None if pixel_values is None else tuple(pixel_values.shape)}")
            videos, frames = pixel_values.shape[:2]
            pooled = onevision_video_grid(*grid)
            units = tuple(VisualUnit(image=v, grid=pooled, has_cls=False, frame=f)
                          for v in range(videos) for f in range(frames))
            return VisualLayout(units=units, tokens_per_image=(frames * pooled[0] * pooled[1] + 1,) * videos,
                                family_data=OvBatch(frames=frames))
        if image_sizes is None:
            raise ValueError("vlmprune: LLaVA-OneVision needs image_sizes with its images (the processor returns them)")
        sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else list(image_sizes)
        per_sample = geometry.get("batch_num_images")
        patched = [True] * len(sizes) if per_sample is None else \
            [int(k) == 1 for k in (per_sample.tolist() if torch.is_tensor(per_sample) else per_sample)
             for _ in range(int(k))]
        if len(patched) != len(sizes):
            raise ValueError(f"vlmprune: batch_num_images counts {len(patched)} images, image_sizes {len(sizes)}")
        aspect = self.aspect(model, geometry.get("vision_aspect_ratio"))
        images = tuple(self.mosaic(model, s, aspect, p) for s, p in zip(sizes, patched))
        units, counts = [], []
        for i, m in enumerate(images):
            units.append(VisualUnit(image=i, grid=grid, has_cls=False, crop=0))
            if m.crops > 1:
                units.append(VisualUnit(image=i, grid=m.shape, has_cls=False, crop=1))
            counts.append(n + (m.shape[0] * (m.shape[1] + 1) if m.crops > 1 else 1))
        return VisualLayout(units=tuple(units), tokens_per_image=tuple(counts),
                            family_data=OvBatch(images=images, aspect=aspect))

    def unit_tokens(self, model: Any, layout: VisualLayout) -> list[tuple[int, int]]:
        """Per **tower pass** (every crop of every image, or every frame): (tokens in the tower's
        sequence, projector rows), N each: the units are packed grids spanning several passes."""
        n = self.tokens_per_image(model)
        data = layout.family_data
        passes = sum(data.passes) if not data.frames else data.frames * layout.num_images
        return [(n + int(self.tower_has_cls(model)), n)] * passes

    def vision_shape(self, model: Any) -> dict[str, Any]:
        """The base rule, with the projector before the selection (it sees every token)."""
        return {**super().vision_shape(model), "projector_after_pruning": False}

    # ------------------------------------------------------------ encoding
    def _passes(self, pixel_values: Tensor, layout: VisualLayout) -> Tensor:
        """The tower's input [P, 3, S, S]: each image's first ``crops`` crops, or every frame."""
        if self.video:
            return pixel_values.reshape(-1, *pixel_values.shape[2:])
        if pixel_values.dim() == 5:
            return torch.cat([pv[:m.crops] for pv, m in zip(pixel_values, layout.family_data.images)])
        return pixel_values

    def _packed(self, model: Any, rows: Tensor, layout: VisualLayout) -> Tensor:
        """Per-pass rows [P, N, C] (tokens, scores or keys) -> per-unit rows [U, N_max, C] as the stock
        model packs its tokens (images: base, then the unpadded and resized mosaic; videos: each
        frame pooled); unit u's first h_u * w_u rows are real, zeros after."""
        base = self.base_model(model)
        if self.video:
            return onevision_pool(base, rows)
        data = layout.family_data
        packed = onevision_pack(base, list(torch.split(rows, data.passes)), [list(m.size) for m in data.images],
                                data.aspect)
        n = rows.shape[1]
        units = [part for x, m in zip(packed, data.images) for part in ((x[:n], x[n:]) if m.crops > 1 else (x,))]
        return torch.nn.utils.rnn.pad_sequence(units, batch_first=True)

    def encode(self, model: Any, pixel_values: Tensor, layer: int | list[int], strategy: str,
               layout: VisualLayout | None = None) -> Tensor:
        """pixel_values -> the projected tokens of every unit [U, N_max, D_text] (see ``_packed``)."""
        out = self.get_vision_tower(model)(self._passes(pixel_values, layout), output_hidden_states=True,
                                           return_dict=True)
        features = self.select_features(out.hidden_states, layer, strategy)  # [P, N, D]
        return self._packed(model, self.get_projector(model)(features), layout)

    def project(self, model: Any, features: Tensor) -> Tensor:
        """The identity: ``encode`` already projected the tokens (before the stock packing)."""
        return features

    def encode_with_signals(self, model: Any, pixel_values: Tensor, layer: int | list[int], strategy: str,
                            layout: VisualLayout) -> tuple[Tensor, Any]:
        """``encode`` plus the substitute signals (module docstring): cls_attn [U, N_max] float32
        (each unit's scores sum to 1, zeros after) and keys [U, N_max, C], packed like the tokens."""
        from .vision import VisionSignals

        q_proj, k_proj = self.get_last_qk(model)
        attn = self.get_vision_layers(model)[-1].self_attn
        store: dict[str, Tensor] = {}
        hooks = [q_proj.register_forward_hook(lambda _m, _i, out: store.__setitem__("q", out.detach())),
                 k_proj.register_forward_hook(lambda _m, _i, out: store.__setitem__("k", out.detach()))]
        try:
            features = self.encode(model, pixel_values, layer, strategy, layout)
        finally:
            for h in hooks:
                h.remove()
        q, k, scale = vision_qk_heads(store["q"], store["k"], attn)  # [P, H, S, Dh]
        received = torch.cat([torch.softmax(torch.matmul(q[p:p + self.score_chunk].float(),
                                                         k[p:p + self.score_chunk].float().transpose(-1, -2))
                                            * scale, dim=-1).mean((1, 2))
                              for p in range(0, q.shape[0], self.score_chunk)])  # [P, S]
        lead = int(self.tower_has_cls(model))  # a [CLS] (at 0) is no unit's token
        scores = self._packed(model, received[:, lead:, None].contiguous(), layout)[..., 0]  # [U, N_max]
        scores = scores / scores.sum(1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
        keys = self._packed(model, store["k"][:, lead:].contiguous(), layout)
        return features, VisionSignals(cls_attn=scores, keys=keys)

    # ------------------------------------------------------------ packing
    def pack(self, model: Any, projected: Tensor, reduction: Any, counts: list[int],
             layout: VisualLayout) -> tuple[list[Tensor], list[int]]:
        """Per-unit kept tokens -> per image / video [n_i, D_text], kept tokens first, NaN after
        (module docstring). Returns the tensors and the kept counts. One host transfer (the kept
        patch indices) for images."""
        newline = getattr(self.base_model(model), self.newline_param).to(projected)  # [D_text]
        if self.video:
            frames = layout.family_data.frames
            per = [[projected[u, :counts[u]] for u in range(v * frames, (v + 1) * frames)] + [newline[None]]
                   for v in range(layout.num_images)]
        else:
            per = self._pack_images(projected, reduction, counts, layout, newline)
        tokens = [torch.cat(parts) for parts in per]
        return ([torch.nn.functional.pad(t, (0, 0, 0, n_i - t.shape[0]), value=float("nan"))
                 for t, n_i in zip(tokens, layout.tokens_per_image)], [int(t.shape[0]) for t in tokens])

    def _pack_images(self, projected: Tensor, reduction: Any, counts: list[int], layout: VisualLayout,
                     newline: Tensor) -> list[list[Tensor]]:
        """Per image: [base kept tokens, mosaic kept tokens and newlines in raster order, extra]."""
        host = reduction.indices if reduction.extra is None else \
            torch.cat([reduction.indices, reduction.extra[:, None].long()], dim=1)
        host = host.cpu()
        extra = host[:, -1].bool().tolist() if reduction.extra is not None else [False] * len(counts)
        indices = host[:, :reduction.indices.shape[1]]
        per, u = [], 0
        for m in layout.family_data.images:
            parts = [projected[u, :counts[u]]]  # the base image, in the method's order
            u += 1
            if m.crops == 1:
                parts.append(newline[None])
            else:
                parts += self._mosaic_parts(projected[u], indices[u], counts[u], extra[u], m.shape, newline)
                u += 1
            per.append(parts)
        return per

    def _mosaic_parts(self, tokens: Tensor, indices: Tensor, count: int, extra: bool, shape: tuple[int, int],
                      newline: Tensor) -> list[Tensor]:
        """One mosaic unit's kept ``tokens`` [M, D] (``indices`` their raster indices on the rows x
        cols grid ``shape``) -> [kept tokens and newlines in raster order, the extra token]."""
        rows, cols = shape
        n_idx = count - int(extra)
        idx = indices[:n_idx]
        nl_rows = torch.arange(rows) if self.newlines == "keep" else torch.unique(idx // cols)
        key = torch.cat([idx // cols * (cols + 1) + idx % cols, nl_rows * (cols + 1) + cols])
        packed = torch.cat([tokens[:n_idx], newline[None].expand(len(nl_rows), -1)])
        return [packed[torch.argsort(key).to(packed.device)]] + ([tokens[count - 1:count]] if extra else [])

    def image_output(self, per_image: list[Tensor]) -> Any:
        """Images: the base rule (a list). Videos: ``pooler_output`` as one tensor, as the stock
        forward flattens it: [V, n, D] when every video has n rows, else [1, sum n_v, D]."""
        if not self.video:
            return super().image_output(per_image)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        equal = len({tuple(t.shape) for t in per_image}) == 1
        return BaseModelOutputWithPooling(pooler_output=torch.stack(per_image) if equal else torch.cat(per_image)[None])


LLAVA_ONEVISION = register_adapter(LlavaOnevisionAdapter(
    family="llava-onevision",
    model_classes=("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel"),
    config_types=("llava_onevision",),
    family_options=("newlines",),
))
