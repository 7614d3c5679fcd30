"""Video-LLaVA (transformers ``VideoLlavaForConditionalGeneration`` / ``VideoLlavaModel``): the adapter.

Layout in transformers 5.x::

    VideoLlavaForConditionalGeneration
      .model: VideoLlavaModel
        .image_tower: CLIPVisionModel       images
        .video_tower: CLIPVisionModel       video frames (same config, its own weights)
        .multi_modal_projector              shared by both, per token
        .language_model: LlamaModel
      .lm_head

Inputs (``compat`` assumption 15): images ``pixel_values`` [I, 3, S, S] -> ``get_image_features``,
N patch tokens each with the "default" ``vision_feature_select_strategy`` (N + 1 with "full"),
``image_token_id`` placeholders; videos ``pixel_values_videos`` [V, F, 3, S, S] ->
``get_video_features``, which runs every frame through the video tower and **always keeps each
frame's [CLS]** (it takes no select strategy): F * (1 + N) ``video_token_id`` placeholders per
video, frame after frame, each frame's [CLS] first (8 x 257 = 2056 for the released 224 px
checkpoints).

**Vision stage.** Images: one ``VisualUnit`` per image, as LLaVA-1.5. Videos: one unit per frame
(``frame`` = its index; a video counts as one "image" of the layout), so every vision-stage
method reduces each frame on its own patches and its own [CLS] signals (for the [CLS]-based
methods: the last video-tower layer's [CLS] attention of that frame), as the PruMerge paper's
Video-LLaVA experiment runs PruMerge per frame. Budgets (``keep``) are **per frame**: a count
keeps that many of the frame's N patches, a ratio that fraction of every frame. The frames'
[CLS] tokens are layout, not prunable, and outside every budget (family option ``frame_cls``:
``"keep"``, the default, gives each frame its [CLS] first, then its kept tokens in the method's
output order, as the stock packing does; ``"drop"`` removes every frame's [CLS]). A video's kept
tokens take the first placeholders of its run (Llama positions, compacted like LLaVA-1.5).
Mixed batches (some samples with an image, others with a video) are rewritten by one plan.

**Decoder stage.** The Llama decoder with 1-D positions: FastV and SparseVLM run unchanged; image
and video placeholders (frames' [CLS] included) are the visual tokens.

ATP's grids (``grid_layout``): an image is one unit, as LLaVA-1.5's; a video's frame f is a unit
on the patch grid, its [CLS] on no grid, so ATP's thresholds and spatial score are per frame.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import ModelAdapter, register_adapter
from .compat import video_llava_frames
from .layout import VisualLayout, VisualUnit

__all__ = ["VideoLlavaAdapter", "VIDEO_LLAVA"]


@dataclass(frozen=True)
class VideoLlavaAdapter(ModelAdapter):
    """``ModelAdapter`` for Video-LLaVA (see the module docstring); ``video`` marks the video view."""

    vision_tower: str = "image_tower"
    video_tower: str = "video_tower"
    video_token_id_field: str = "video_token_id"
    video_features_method: str = "get_video_features"
    video_pixels_field: str = "pixel_values_videos"
    pixel_values_aliases: tuple[str, ...] = ("pixel_values_images",)  # deprecated name of the images' pixels
    #: ``"keep"``: every frame keeps its [CLS] token (first in its run); ``"drop"``: none does.
    frame_cls: str = "keep"
    #: Whether this is the video view (``modality_views``).
    video: bool = False

    def configure(self, **options: Any) -> "VideoLlavaAdapter":
        if "frame_cls" in options and options["frame_cls"] not in ("keep", "drop"):
            raise ValueError(f"video-llava: frame_cls must be 'keep' or 'drop', got {options['frame_cls']!r}")
        return super().configure(**options)

    def modality_views(self, model: Any) -> tuple[ModelAdapter, ...]:
        """(images, videos): the video view reads the video tower, ``get_video_features``,
        ``pixel_values_videos`` and the video placeholders."""
        if self.video:
            return (self,)
        video = dataclasses.replace(self, video=True, vision_tower=self.video_tower, image_modality="video",
                                    image_features_method=self.video_features_method,
                                    pixel_values_field=self.video_pixels_field, pixel_values_aliases=(),
                                    image_token_id_field=self.video_token_id_field)
        return (self, video)

    # ------------------------------------------------------------ config knowledge
    def video_token_id(self, model: Any) -> int:
        return int(getattr(self.config(model), self.video_token_id_field))

    def select_strategy(self, model: Any) -> str:
        """Videos: "default" for the methods (they reduce a frame's patches; its [CLS] is layout)."""
        return "default" if self.video else super().select_strategy(model)

    def signal_problem(self, model: Any, strategy: str | None = None) -> str | None:
        """Videos ignore the select strategy (their frames' [CLS] is layout, never scored)."""
        return super().signal_problem(model, "default" if self.video else strategy)

    def fixed_image_tokens(self, model: Any) -> int | None:
        return None  # images and videos get different counts

    def budget_tokens(self, model: Any, stage: str) -> int:
        """Vision stage: N patches of one image / frame; decoder stage: the most visual tokens one
        sample's image or video has (``video_seq_length``, F * (1 + N))."""
        n = self.tokens_per_image(model)
        if stage == "vision":
            return n
        return max(n, int(getattr(self.config(model), "video_seq_length", 0) or 0))

    def visual_columns(self, model: Any, input_ids: Tensor) -> Tensor:
        """input_ids [B, L] -> [B, L] bool: image and video placeholders (the decoder stage's)."""
        return (input_ids == self.image_token_id(model)) | (input_ids == self.video_token_id(model))

    def sequence_layout(self, model: Any, input_ids: Tensor, layout: VisualLayout,
                        position_ids: Tensor | None = None) -> VisualLayout:
        """The view's own placeholders only (images: ``image_token_id``; videos: ``video_token_id``)."""
        return layout.with_sequence(input_ids == self.image_token_id(model), position_ids, self.rotary(model))

    # ------------------------------------------------------------ decoder stage (ATP's grids)
    def grid_layout(self, model: Any, layout: VisualLayout, embeds: Tensor, images: dict[str, Any]) -> VisualLayout:
        """The base rule for images, with videos: the prompt's placeholder runs in order, an image
        run taking the next image's count, a video run being a whole unbroken stretch of video
        placeholders (``generate`` passes the videos' encoder outputs frame by frame, so their
        count per video is not in the keywords); one host transfer (each placeholder's kind, row and
        column). A video's frame f is a unit on the patch grid, its [CLS] (first in the frame, as
        ``get_video_features`` packs it) on no grid."""
        videos = self.video_placeholders(model, layout, images)
        if videos is None:
            return super().grid_layout(model, layout, embeds, images)
        (image_counts, video_counts), kinds = videos
        vis = layout.visual
        bsz, length = vis.shape
        rows = torch.arange(bsz, device=vis.device)[:, None].expand(bsz, length)[vis]
        cols = torch.arange(length, device=vis.device)[None, :].expand(bsz, length)[vis]
        kinds, rows, cols = torch.stack([kinds, rows, cols]).cpu().tolist()  # [3, P]: one transfer
        (h, w), ci = self.patch_grid(model), self.cls_index
        n = h * w
        has_cls = self.tower_has_cls(model)
        runs, units, unit_of, patch_of, p, next_image = [], [], [], [], 0, 0

        def problem(what: str) -> ValueError:
            return ValueError(f"vlmprune: the prompt's image / video placeholders do not match its inputs ({what}; "
                              f"images {list(image_counts)} tokens, videos {sum(video_counts)} tokens in all); one "
                              "placeholder per token is needed, in the inputs' order")

        while p < len(kinds):
            if kinds[p]:  # a video: the unbroken stretch of video placeholders from p
                q = p + 1
                while q < len(kinds) and kinds[q] and rows[q] == rows[p] and cols[q] == cols[q - 1] + 1:
                    q += 1
                n_i, per, lead = q - p, n + 1, 1
            else:
                if next_image >= len(image_counts):
                    raise problem("more image placeholders than images")
                n_i, per = image_counts[next_image], image_counts[next_image]
                lead = n_i - n
                next_image += 1
                if len(set(kinds[p:p + n_i])) != 1 or p + n_i > len(kinds):
                    raise problem(f"image {next_image - 1} has fewer placeholders than tokens")
            frames = n_i // per
            if lead not in (0, 1) or frames * per != n_i:
                raise ValueError(f"vlmprune: a Video-LLaVA {'video frame' if kinds[p] else 'image'} has N + 1 "
                                 f"{'' if kinds[p] else 'or N '}placeholders (N = {n}); got {n_i} in a run")
            j = torch.arange(per)
            on = (j != ci) if lead else torch.ones(per, dtype=torch.bool)
            patch = j - lead * (j > ci).long()
            for f in range(frames):
                unit_of.append(torch.where(on, len(units), -1))
                patch_of.append(torch.where(on, patch, -1))
                units.append(VisualUnit(image=len(runs), grid=(h, w), has_cls=has_cls, frame=f if kinds[p] else 0,
                                        cls_index=ci))
            runs.append(n_i)
            p += n_i
        if next_image != len(image_counts) or sum(kinds) != sum(video_counts):
            raise problem(f"{next_image} image run(s) and {sum(kinds)} video placeholders found")
        return layout.with_runs(runs).with_grids(tuple(units), torch.cat(unit_of), torch.cat(patch_of))

    # ------------------------------------------------------------ vision stage (videos)
    def image_layout(self, model: Any, pixel_values: Tensor, image_sizes: Any = None,
                     strategy: str | None = None, **geometry: Any) -> VisualLayout:
        """Images: LLaVA-1.5's rule. Videos (``pixel_values`` [V, F, 3, S, S]): one unit per frame,
        F * (1 + N) placeholders per video. ``family_data`` is a dict the encoding fills with the
        frames' [CLS] features (``"cls"`` [V * F, 1, D])."""
        if not self.video:
            return super().image_layout(model, pixel_values, image_sizes, strategy, **geometry)
        if pixel_values.dim() != 5:
            raise ValueError(f"vlmprune: Video-LLaVA pixel_values_videos must be [videos, frames, 3, H, W], "
                             f"got shape {tuple(pixel_values.shape)}")
        videos, frames = pixel_values.shape[:2]
        grid, n = self.patch_grid(model), self.tokens_per_image(model, "default")
        units = tuple(VisualUnit(image=v, grid=grid, has_cls=True, frame=f, cls_index=self.cls_index)
                      for v in range(videos) for f in range(frames))
        return VisualLayout(units=units, tokens_per_image=(frames * (n + 1),) * videos,
                            family_data={"frames": frames})

    def encode(self, model: Any, pixel_values: Tensor, layer: int | list[int], strategy: str,
               layout: VisualLayout | None = None) -> Tensor:
        """Videos: pixel_values [V, F, 3, S, S] -> patch features [V * F, N, D] (frame after frame);
        the frames' [CLS] features go to ``layout.family_data["cls"]``. Images: LLaVA-1.5's."""
        if not self.video:
            return super().encode(model, pixel_values, layer, strategy, layout)
        frames = video_llava_frames(pixel_values)  # [V * F, 3, S, S]
        out = self.get_vision_tower(model)(frames, output_hidden_states=True, return_dict=True)
        full = self.select_features(out.hidden_states, layer, "full")  # [V * F, 1 + N, D]
        ci = self.cls_index
        layout.family_data["cls"] = full[:, ci:ci + 1]
        return torch.cat([full[:, :ci], full[:, ci + 1:]], dim=1)

    def project_kept(self, model: Any, tokens: Tensor, layout: VisualLayout) -> Tensor:
        """Videos with ``frame_cls="keep"``: each frame's [CLS] row and its kept tokens in one projector
        call ([U, 1 + M, D], the stock [U, 1 + N, D] when every token is kept); the projected [CLS]
        rows go to ``layout.family_data["cls_projected"]``."""
        if not self.video or self.frame_cls != "keep":
            return super().project_kept(model, tokens, layout)
        ci = self.cls_index
        cls = layout.family_data["cls"]  # [U, 1, D]
        both = self.project(model, torch.cat([tokens[:, :ci], cls, tokens[:, ci:]], dim=1))
        layout.family_data["cls_projected"] = both[:, ci:ci + 1]
        return torch.cat([both[:, :ci], both[:, ci + 1:]], dim=1)

    def pack(self, model: Any, projected: Tensor, reduction: Any, counts: list[int],
             layout: VisualLayout) -> tuple[list[Tensor], list[int]]:
        """Videos: per-frame kept tokens [V * F, M, D_text] -> per video [F * (1 + N), D_text]: each
        frame's [CLS] (``frame_cls="keep"``) then its kept tokens, frame after frame; NaN after
        the video's kept count. Returns the tensors and the kept counts. Images: LLaVA-1.5's."""
        if not self.video:
            return super().pack(model, projected, reduction, counts, layout)
        frames = layout.family_data["frames"]
        cls = layout.family_data.get("cls_projected") if self.frame_cls == "keep" else None  # [U, 1, D_text]
        if cls is None and self.frame_cls == "keep":
            cls = self.project(model, layout.family_data["cls"])
        out, kept = [], []
        for v, n_v in enumerate(layout.tokens_per_image):
            parts = []
            for u in range(v * frames, (v + 1) * frames):
                if cls is not None:
                    parts.append(cls[u])
                parts.append(projected[u, :counts[u]])
            tokens = torch.cat(parts)
            padded = tokens.new_full((n_v, tokens.shape[-1]), float("nan"))
            padded[:tokens.shape[0]] = tokens
            out.append(padded)
            kept.append(int(tokens.shape[0]))
        return out, kept

    def image_output(self, per_image: list[Tensor]) -> Any:
        """Per-image (or per-video) tensors [n_i, D_text] -> ``BaseModelOutputWithPooling`` whose
        ``pooler_output`` is a tensor, as the stock forward reads it (assumption 15): [I, n, D]
        when every n_i is equal, else [1, sum n_i, D] (the rewritten, ragged prefill)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if len({tuple(t.shape) for t in per_image}) == 1:
            return BaseModelOutputWithPooling(pooler_output=torch.stack(per_image))
        return BaseModelOutputWithPooling(pooler_output=torch.cat(per_image)[None])


VIDEO_LLAVA = register_adapter(VideoLlavaAdapter(
    family="video-llava",
    model_classes=("VideoLlavaForConditionalGeneration", "VideoLlavaModel"),
    family_options=("frame_cls",),
))
