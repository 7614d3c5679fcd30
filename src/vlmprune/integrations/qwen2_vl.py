"""Qwen2-VL (transformers ``Qwen2VLForConditionalGeneration`` / ``Qwen2VLModel``): the adapter.

Layout in transformers 5.x::

    Qwen2VLForConditionalGeneration
      .model: Qwen2VLModel
        .visual: Qwen2VisionTransformerPretrainedModel
            .patch_embed, .blocks[i] (.attn.qkv fused), .merger (2x2 PatchMerger -> LLM space)
        .language_model: Qwen2VLTextModel   .layers[i].self_attn.{q,k}_proj, .rotary_emb (M-RoPE)
      .lm_head

Images are dynamic-resolution: ``pixel_values`` [sum of patches, C * 2 * 14 * 14] with
``image_grid_thw`` [I, 3] (t, h, w) patches per image; the merger inside ``visual`` turns each 2x2
neighbourhood into one LLM token, so image i has ``t * h * w / 4`` placeholders
(``image_token_id``; videos ``video_token_id``). There is no [CLS] token.

**Positions (M-RoPE).** The language model takes position ids [3, B, L] (temporal, height,
width) from the base model's ``get_rope_index``; ``lm_positions`` brings every form the language
model accepts to [3, B, L] (``compat.mrope_positions``, assumption 11), so the decoder stage
gathers the three rows with the survivors (each keeps its own 3-D position) and decoding
continues after the unpruned maximum position (``generate`` extends the positions it computed
over the whole prompt; ``rope_deltas`` is the base model's own). The rotary function is the
language model's ``rotary_emb``; its (cos, sin) [B, L, Dh] are applied with Llama's rotate-half,
so attention scores and cached keys need nothing family-specific. Decoder layers get
``position_ids=None`` after a prune point (the stock model passes the text row or None; only
flash attention reads it).

**Decoder stage.** FastV and SparseVLM run unchanged on the visual placeholders (image and video
tokens). Survivors always keep their original 3-D positions (``compact_positions=False``): a
contiguous renumbering has no meaning for M-RoPE, so SparseVLM's ``positions="compact"`` (its
LLaVA default) runs as ``"original"`` here (``handle.positions`` says which rule is in force);
recycled tokens get the rounded mean of their members' positions, per axis.

**Vision stage, after the merger.** One ``VisualUnit`` per image (per temporal slice of a video)
with the *merged* grid (h / 2, w / 2) (``image_layout`` from ``image_grid_thw``); ``encode`` runs the whole tower,
merger included (``compat.qwen_vision_tokens``), so a method makes one decision per merged LLM
token (selecting inside the ViT, before the merger, would merge non-neighbours) and
``project`` is the identity. Images of different sizes are reduced grid by grid. ``pack`` puts
each kept token at its own placeholder slot (its merged-grid index), so every survivor keeps its
own 3-D position: the prefill's positions are the unpruned prompt's ``get_rope_index``
(``prompt_positions``), gathered with the survivors, and ``rope_deltas`` is raised by the
deleted count (``after_rewrite``) so a forward that derives decode positions from the mask
continues after the unpruned maximum position, as ``generate`` does. Budgets: a ratio ``keep``
is per image; an int ``keep`` must not exceed any image's merged tokens (budgets are validated on
a 16 x 16 merged grid, a 448 px image). The sampling baselines (random, sequential, spatial on the
merged grid) run as they are.

**Substitute [CLS] score** (cls-topk, prumerge, prumerge+; ``importance_score``). There is no
[CLS] token, so a merged token's importance is the attention it *receives* in the last
full-attention vision block (``score_block``): softmax(q k^T / sqrt(d)) with the block's own
rotary q / k (hooked from its fused ``attn.qkv`` output and the block's ``position_embeddings``,
within the block's attention segments, one per temporal slice, known from the layout on the host;
the tower's attention implementation is never changed), averaged over heads and over the image's
queries, summed over the merged token's 2 x 2 patches, so each image's scores
sum to 1 (like a [CLS] row). The keys PruMerge merges by are the block's (pre-rotary) keys,
averaged over the 2 x 2 patches. Queries are processed in chunks: memory [H, chunk, P] per image.

**Qwen2.5-VL** (``Qwen2_5_VLForConditionalGeneration``; ``Qwen25VLAdapter``, family
``qwen2.5-vl``): the same layout, positions and merger; its tower attends within windows except
in ``vision_config.fullatt_block_indexes`` and keeps the merge groups in window order inside the
tower (``compat.qwen_window_index``), so the substitute score reads the *last full-attention*
block and is put back into merged-grid order with ``argsort(window_index)`` (``tower_order``),
as the tower itself does after its merger.

**Videos** (``pixel_values_videos`` [sum patches, C*2*14*14], ``video_grid_thw`` [V, 3] with t > 1
temporal slices of 2 frames each, ``video_token_id`` placeholders, ``mm_token_type_ids`` 2): a
second modality view (``modality_views``: ``get_video_features``, the ``"video"`` key) through the
same steps. A video is one "image" of the layout with **one unit per temporal slice** (grid
(h / 2, w / 2), ``frame`` = the slice): the tower attends within each slice (``cu_seqlens``), so
each slice's substitute score sums to 1 as an image's does, and budgets are per slice, like
Video-LLaVA's per frame (a count keeps that many merged tokens of every slice, a ratio that
fraction of every slice). Kept tokens take their own placeholder slots (slice s, token j: slot
s * h*w/4 + j), so they keep their ``get_rope_index`` positions (t, h, w) (Qwen2.5-VL's temporal
axis spaced by ``second_per_grid_ts``, which ``prompt_positions`` passes on). Image and video
inputs may be mixed in a batch; videos of different lengths and sizes too.


**Grids for ATP** (``image_grids``): one unit per image (per frame when the temporal index
varies) on its merged grid, read from the 3-D positions ``get_rope_index`` gave the image's
placeholders: (t, row, col) = position - the image's first position, so merged token (row, col)
is patch ``row * w' + col``; a video's runs likewise, one unit per temporal slice (``grid_layout``
orders the image and video runs as the prompt has them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import ModelAdapter, register_adapter
from .compat import (K, mrope_positions, qwen_image_grid, qwen_rope_index, qwen_vision_qk, qwen_vision_tokens,
                     qwen_window_index)
from .layout import VisualLayout, VisualUnit, interleave_runs

__all__ = ["Qwen2VLAdapter", "Qwen25VLAdapter", "QWEN2_VL", "QWEN2_5_VL"]


@dataclass(frozen=True)
class Qwen2VLAdapter(ModelAdapter):
    """``ModelAdapter`` for Qwen2-VL (see the module docstring)."""

    vision_tower: str = "visual"
    vision_layers: tuple[str, ...] = ("blocks",)
    projector: str = "visual.merger"
    video_token_id_field: str = "video_token_id"
    #: The most placeholders one image can get: the processor's default ``max_pixels``
    #: (12845056 = 16384 merged 28 x 28 px cells); the model config does not bound it.
    max_image_tokens: int = 16384
    compact_positions: bool = False
    image_geometry: tuple[str, ...] = ("image_grid_thw",)
    sequence_inputs: tuple[str, ...] = ("mm_token_type_ids",)
    merge_field: str = "spatial_merge_size"
    #: The merged grid budgets are validated on at ``apply`` (a 448 x 448 image).
    reference_grid: tuple[int, int] = (16, 16)
    importance_score: str = ("attention received in the last full-attention vision block, head- and "
                             "query-averaged, summed over each 2x2 merge group (no [CLS] token)")
    #: Query rows per step of the substitute score (memory [heads, chunk, patches]).
    score_chunk: int = 256
    #: Whether this is the video view (``modality_views``).
    video: bool = False

    def modality_views(self, model: Any) -> tuple[ModelAdapter, ...]:
        """(images, videos): the video view reads ``get_video_features``, ``pixel_values_videos``,
        ``video_grid_thw`` and the ``video_token_id`` placeholders."""
        if self.video:
            return (self,)
        video = dataclasses.replace(self, video=True, image_modality="video", image_features_method="get_video_features",
                                    pixel_values_field="pixel_values_videos", image_token_id_field=self.video_token_id_field,
                                    image_geometry=("video_grid_thw",))
        return (self, video)
    vision_start_field: str = "vision_start_token_id"
    vision_end_field: str = "vision_end_token_id"

    def tower_has_cls(self, model: Any) -> bool:
        return False

    def fixed_image_tokens(self, model: Any) -> int | None:
        return None

    def budget_tokens(self, model: Any, stage: str) -> int:
        """Decoder stage: the most placeholders an image can get; vision stage: the reference
        grid's merged tokens (int budgets are validated on it)."""
        if stage == "vision":
            h, w = self.reference_grid
            return h * w
        return self.max_image_tokens

    # ------------------------------------------------------------ config knowledge
    def vision_feature_layer(self, model: Any) -> int:
        return -1  # the merger's output; Qwen2-VL has no feature-layer choice

    def select_strategy(self, model: Any) -> str:
        return "full"  # no [CLS] to drop

    def patch_grid(self, model: Any) -> tuple[int, int]:
        """The reference merged grid (budgets are validated on it; images have their own)."""
        return self.reference_grid

    def merge_size(self, model: Any) -> int:
        return int(getattr(self.vision_config(model), self.merge_field))

    def video_token_id(self, model: Any) -> int | None:
        value = getattr(self.config(model), self.video_token_id_field, None)
        return None if value is None else int(value)

    def visual_columns(self, model: Any, input_ids: Tensor) -> Tensor:
        """input_ids [B, L] -> [B, L] bool: image and video placeholders."""
        visual = input_ids == self.image_token_id(model)
        video = self.video_token_id(model)
        return visual if video is None else visual | (input_ids == video)

    def sequence_layout(self, model: Any, input_ids: Tensor, layout: VisualLayout,
                        position_ids: Tensor | None = None) -> VisualLayout:
        """As the base rule, with image placeholders only (the vision stage reduces images)."""
        return layout.with_sequence(input_ids == self.image_token_id(model), position_ids, self.rotary(model))

    # ------------------------------------------------------------ vision stage
    def image_layout(self, model: Any, pixel_values: Tensor, image_sizes: Any = None,
                     strategy: str | None = None, **geometry: Any) -> VisualLayout:
        """One unit per temporal slice of each image / video of its grid ``geometry[image_geometry[0]]``
        ([I, 3] (t, h, w) patches: ``image_grid_thw``, or ``video_grid_thw`` in the video view):
        slice s has the merged grid (h / m, w / m) (m = ``spatial_merge_size``); t * h * w / m^2
        placeholders per image / video. ``family_data`` is the grid tensor."""
        name = self.image_geometry[0]
        grid_thw = geometry.get(name)
        if grid_thw is None:
            raise ValueError(f"vlmprune: Qwen2-VL needs {name} with its "
                             f"{'videos' if self.video else 'images'} (the processor returns it)")
        m = self.merge_size(model)
        units, counts = [], []
        for i, (t, h, w) in enumerate(grid_thw.tolist()):
            units += [VisualUnit(image=i, grid=(h // m, w // m), has_cls=False, frame=f) for f in range(t)]
            counts.append(t * h * w // (m * m))
        return VisualLayout(units=tuple(units), tokens_per_image=tuple(counts), family_data=grid_thw)

    # ------------------------------------------------------------ geometry (bench, cost model)
    def size_layout(self, model: Any, image_size: Any) -> VisualLayout:
        """One image of ``image_size`` (H, W) px as the processor resizes it (``smart_resize`` with
        its default pixel bounds): patch grid (h, w), h * w / m^2 placeholders; model or config."""
        return self.image_layout(model, None, image_grid_thw=self.geometry_inputs(model, [image_size])["image_grid_thw"])

    def geometry_inputs(self, model: Any, image_sizes: list[tuple[int, int]]) -> dict[str, Any]:
        """``image_grid_thw`` [I, 3] = (1, h, w) patches of each image (one frame)."""
        patch, m = int(self.vision_config(model).patch_size), self.merge_size(model)
        grids = [(1, *qwen_image_grid(int(hh), int(ww), patch, m)) for hh, ww in image_sizes]
        return {"image_grid_thw": torch.tensor(grids, dtype=torch.long)}

    def unit_tokens(self, model: Any, layout: VisualLayout) -> list[tuple[int, int]]:
        """(patches in the tower, merged tokens out of the merger) per image."""
        m2 = self.merge_size(model) ** 2
        return [(u.num_patches * m2, u.num_patches) for u in layout.units]

    def vision_shape(self, model: Any) -> dict[str, Any]:
        """The ViT (``embed_dim`` wide, ``depth`` blocks, fc1/fc2 MLP of ``mlp_ratio``) and the merger
        (4 * D -> 4 * D -> D_text), which is part of the tower: it sees every token."""
        vc = self.vision_config(model)
        width, m2 = int(vc.embed_dim), self.merge_size(model) ** 2
        return {"type": getattr(vc, "model_type", None), "hidden": width, "layers": int(vc.depth),
                "heads": int(vc.num_heads), "intermediate": int(width * vc.mlp_ratio), "mlp_matrices": 2,
                "patch_size": int(vc.patch_size), "image_size": None,
                "patch_in": int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2,
                "window_tokens": None, "full_layers": None,
                "projector_dims": [width * m2, width * m2, int(vc.hidden_size)], "projector_after_pruning": False}

    def image_prompt_ids(self, model: Any, count: int) -> list[int]:
        """<vision_start> <image> * count <vision_end>, as the chat template writes an image."""
        cfg = self.config(model)
        return ([int(getattr(cfg, self.vision_start_field))] + [self.image_token_id(model)] * int(count)
                + [int(getattr(cfg, self.vision_end_field))])

    def random_image_inputs(self, model: Any, image_sizes: list[tuple[int, int]], generator: Any,
                            dtype: Any = None) -> dict[str, Any]:
        """``pixel_values`` [sum of patches, C * T * P * P] and ``image_grid_thw``."""
        vc = self.vision_config(model)
        geo = self.geometry_inputs(model, image_sizes)
        rows = int(geo["image_grid_thw"].prod(-1).sum())
        width = int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2
        return {"pixel_values": torch.randn(rows, width, generator=generator).to(dtype or torch.float32), **geo}

    def sequence_extras(self, model: Any, input_ids: Tensor) -> dict[str, Tensor]:
        """``mm_token_type_ids`` [B, L]: 1 at image placeholders, 2 at video ones, 0 elsewhere."""
        types = (input_ids == self.image_token_id(model)).int()
        video = self.video_token_id(model)
        if video is not None:
            types = types + 2 * (input_ids == video).int()
        return {"mm_token_type_ids": types}

    def encode(self, model: Any, pixel_values: Tensor, layer: int | list[int], strategy: str,
               layout: VisualLayout | None = None) -> Tensor:
        """pixel_values [sum patches, C*2*14*14] -> merged tokens [U, N_max, D_text] (already in
        LLM space; unit u's first h_u * w_u rows are its tokens in merged-grid raster order, zeros
        after; a video's units are its temporal slices, in order)."""
        tokens = qwen_vision_tokens(self.get_vision_tower(model), pixel_values, layout.family_data)
        per_unit = torch.split(tokens, [u.num_patches for u in layout.units])
        return torch.nn.utils.rnn.pad_sequence(list(per_unit), batch_first=True)

    def project(self, model: Any, features: Tensor) -> Tensor:
        """The identity: the merger inside ``visual`` already projected the tokens."""
        return features

    def pack(self, model: Any, projected: Tensor, reduction: Any, counts: list[int],
             layout: VisualLayout) -> tuple[list[Tensor], list[int]]:
        per_image, counts, _ = self.pack_slots(model, projected, reduction, counts, layout)
        return per_image, counts

    def pack_slots(self, model: Any, projected: Tensor, reduction: Any, counts: list[int],
                   layout: VisualLayout) -> tuple[list[Tensor], list[int], list[Tensor | None]]:
        """Each kept token at its own placeholder slot: image i's tensor is [n_i, D_text], NaN
        except at the slots of its kept tokens (unit u = slice s of image i: the first slot of the
        slice plus the token's merged-grid index). PruMerge's extra token (no patch index) takes
        the lowest slot of its slice no kept token uses. Returns the tensors, the per-image kept
        counts and kept slots [counts_i] long (ascending). One host transfer (the indices)."""
        host = reduction.indices if reduction.extra is None else \
            torch.cat([reduction.indices, reduction.extra[:, None].long()], dim=1)
        host = host.cpu()  # one transfer: patch indices [U, M'] (and the extra flags)
        extra = host[:, -1].bool().tolist() if reduction.extra is not None else [False] * len(counts)
        host = host[:, :reduction.indices.shape[1]]
        units_of: list[list[int]] = [[] for _ in layout.tokens_per_image]
        for u, unit in enumerate(layout.units):
            units_of[unit.image].append(u)
        out, kept, slots = [], [], []
        for i, n_i in enumerate(layout.tokens_per_image):
            idx_parts, rows, start = [], [], 0
            for u in units_of[i]:
                n_u = layout.units[u].num_patches
                idx = host[u, :counts[u] - int(extra[u])]
                if extra[u]:
                    free = torch.ones(n_u, dtype=torch.bool)
                    free[idx] = False
                    idx = torch.cat([idx, torch.nonzero(free).flatten()[:1]])
                idx_parts.append(idx + start)
                rows.append(projected[u, :counts[u]])
                start += n_u
            idx, tokens = torch.cat(idx_parts), torch.cat(rows)
            order = torch.argsort(idx)
            slot = idx[order]
            padded = projected.new_full((n_i, projected.shape[-1]), float("nan"))
            padded[slot.to(padded.device)] = tokens[order.to(projected.device)]
            out.append(padded)
            kept.append(int(slot.numel()))
            slots.append(slot.to(projected.device))
        return out, kept, slots

    def prompt_positions(self, model: Any, kwargs: dict[str, Any]) -> Tensor | None:
        """The unpruned prompt's M-RoPE positions [3, B, L] (``get_rope_index``), or None without
        ``mm_token_type_ids`` / ``image_grid_thw`` (the stock model then refuses the input)."""
        ids, types = kwargs.get(K.INPUT_IDS), kwargs.get("mm_token_type_ids")
        if ids is None or types is None or (kwargs.get("image_grid_thw") is None
                                            and kwargs.get("video_grid_thw") is None):
            return None
        pos, _ = qwen_rope_index(self.base_model(model), ids, types, kwargs.get("image_grid_thw"),
                                 kwargs.get("video_grid_thw"), kwargs.get(K.ATTENTION_MASK),
                                 second_per_grid_ts=kwargs.get("second_per_grid_ts"))
        return pos

    def after_rewrite(self, model: Any, plan: Any, positions: Tensor | None = None) -> None:
        """``rope_deltas`` of the rewritten prompt: the unpruned one (max position + 1 - unpadded
        length) plus each sample's deleted count, so positions derived from the rewritten mask
        (or cache length) continue after the unpruned maximum position."""
        if positions is None:
            return
        pos = mrope_positions(positions, plan.keep.shape[0], plan.orig_len, plan.keep.device)
        length = plan.orig_mask.sum(1) if plan.orig_mask is not None else torch.full_like(plan.dropped, plan.orig_len)
        deltas = pos.amax((0, 2)) + 1 - length.to(pos.device) + plan.dropped.to(pos.device)
        self.base_model(model).rope_deltas = deltas[:, None]

    # ------------------------------------------------------------ substitute [CLS] signals
    def score_block(self, model: Any) -> int:
        """Index of the vision block the substitute score reads: the last one (every Qwen2-VL
        block attends over the whole image)."""
        return len(self.get_vision_layers(model)) - 1

    def tower_order(self, model: Any, grid_thw: Tensor) -> Tensor | None:
        """[G] merge-group order inside the tower (tower row g holds group ``order[g]``), or None
        when the tower keeps the merged-grid order (Qwen2-VL)."""
        return None

    def signal_problem(self, model: Any, strategy: str | None = None) -> str | None:
        try:
            block = self.get_vision_layers(model)[self.score_block(model)]
            block.attn.qkv
        except (AttributeError, IndexError, TypeError):
            return f"cannot find attn.qkv of vision block {self.vision_layers[0]}[{self.score_block(model)}]"
        return None

    def encode_with_signals(self, model: Any, pixel_values: Tensor, layer: int | list[int], strategy: str,
                            layout: VisualLayout) -> tuple[Tensor, Any]:
        """``encode`` plus the substitute signals (see the module docstring): cls_attn [U, N_max]
        float32 (each image's row sums to 1 over its N_u merged tokens, zeros after) and keys
        [U, N_max, C] (the block's keys averaged over each 2 x 2 group)."""
        from .vision import VisionSignals

        attn = self.get_vision_layers(model)[self.score_block(model)].attn
        store: dict[str, Any] = {}

        def on_attn(_module: Any, args: tuple, kwargs: dict) -> None:
            store["pe"] = kwargs.get("position_embeddings")

        def on_qkv(_module: Any, _inp: Any, out: Tensor) -> None:
            store["qkv"] = out.detach()  # [S, 3 * C]

        hooks = [attn.register_forward_pre_hook(on_attn, with_kwargs=True), attn.qkv.register_forward_hook(on_qkv)]
        try:
            features = self.encode(model, pixel_values, layer, strategy, layout)
        finally:
            for h in hooks:
                h.remove()
        q, k, k_raw = qwen_vision_qk(store["qkv"], int(attn.num_heads), store["pe"])  # [S, H, Dh] each
        unit = self.merge_size(model) ** 2
        # the block's attention segments (its cu_seqlens): one per temporal slice of each image, in
        # order, known on the host from the layout (t slices of h * w patches; the tower keeps each
        # slice's rows together, in window order for Qwen2.5-VL), so nothing is read from the device
        bounds = [0]
        for u in layout.units:
            bounds.append(bounds[-1] + u.num_patches * unit)
        received = _received_attention(q, k, bounds, float(attn.scaling), self.score_chunk)  # [S]
        received = received.view(-1, unit).sum(-1)  # [G] per merge group, tower order
        keys = k_raw.reshape(k_raw.shape[0] // unit, unit, -1).float().mean(1).to(k_raw.dtype)  # [G, C]
        order = self.tower_order(model, layout.family_data)
        if order is not None:  # back to the merged-grid order of each image
            back = torch.argsort(order.to(received.device))
            received, keys = received[back], keys[back]
        sizes = [u.num_patches for u in layout.units]
        pad = torch.nn.utils.rnn.pad_sequence
        return features, VisionSignals(cls_attn=pad(list(torch.split(received, sizes)), batch_first=True),
                                       keys=pad(list(torch.split(keys, sizes)), batch_first=True))

    def grid_layout(self, model: Any, layout: VisualLayout, embeds: Tensor, images: dict[str, Any]) -> VisualLayout:
        """As the base rule, with videos: every placeholder run is an image or a video, in the prompt's
        order (each modality's in the order of its grid keyword); which one is told by the run's
        first placeholder id, read in the same host transfer as the positions. Without video
        placeholders or video keywords this is the base rule (``image_grids``)."""
        videos = self.video_placeholders(model, layout, images)
        if videos is None:
            return super().grid_layout(model, layout, embeds, images)
        counts, kinds = videos
        host = torch.cat([layout.positions[:, layout.visual], kinds[None]]).cpu()  # one transfer
        pos = host[:3]
        seq = layout.with_runs([counts[m][i] for m, i in interleave_runs(host[3].tolist(), counts)])
        return seq.with_grids(*self._grids_from_positions(pos, seq.tokens_per_image))

    def image_grids(self, model: Any, layout: VisualLayout, embeds: Tensor) -> tuple[tuple[VisualUnit, ...], Tensor, Tensor]:
        """One unit per image and temporal index, on the merged grid its M-RoPE positions span
        (see the module docstring); every placeholder lies on a grid. One host transfer (the
        visual columns' positions)."""
        pos = layout.positions[:, layout.visual].cpu()  # [3, P] in (batch, sequence) order
        layout.check_placeholders(pos.shape[1])
        return self._grids_from_positions(pos, layout.tokens_per_image)

    @staticmethod
    def _grids_from_positions(pos: Tensor, tokens_per_image: tuple[int, ...]) -> tuple[tuple[VisualUnit, ...], Tensor, Tensor]:
        """pos [3, P] host M-RoPE positions of the placeholders, runs ``tokens_per_image`` -> (units,
        unit_of [P], patch_of [P]): one unit per run and temporal index."""
        units, unit_of, patch_of, start = [], [], [], 0
        for i, n_i in enumerate(tokens_per_image):
            rel = pos[:, start:start + n_i]
            start += n_i
            rel = rel - rel.amin(1, keepdim=True)
            frames = torch.unique(rel[0])
            rows, cols = int(rel[1].max()) + 1, int(rel[2].max()) + 1
            patch = rel[1] * cols + rel[2]
            frame = torch.searchsorted(frames, rel[0])
            flat = frame * (rows * cols) + patch
            if len(frames) * rows * cols != n_i or torch.unique(flat).numel() != n_i:
                raise ValueError(f"vlmprune: cannot read the grid of image {i} from its M-RoPE positions ({n_i} "
                                 f"tokens spanning {len(frames)} x {rows} x {cols}); pass the positions "
                                 "get_rope_index gives (the model's own, when position_ids is None)")
            unit_of.append(len(units) + frame)
            patch_of.append(patch)
            units += [VisualUnit(image=i, grid=(rows, cols), has_cls=False, crop=f) for f in range(len(frames))]
        return tuple(units), torch.cat(unit_of), torch.cat(patch_of)

    def lm_positions(self, position_ids: Tensor | None, bsz: int, length: int, device: Any) -> Tensor:
        """Any position form the language model accepts -> M-RoPE [3, B, L] long."""
        return mrope_positions(position_ids, bsz, length, device)

    def layer_position_ids(self, positions: Tensor) -> Tensor | None:
        """Decoder layers get None (the stock model's value in a forward; only flash attention reads it)."""
        return None


def _received_attention(q: Tensor, k: Tensor, bounds: list[int], scaling: float, chunk: int) -> Tensor:
    """q, k [S, H, Dh] (rotated), ``bounds`` the I + 1 segment bounds on the host (each segment
    attends to itself; ``cu_seqlens``) -> [S] float32: the attention each row receives, averaged
    over heads and over its segment's query rows (so each segment sums to 1). Queries in chunks of
    ``chunk`` rows."""
    if bounds[-1] != q.shape[0]:
        raise RuntimeError(f"vlmprune: the layout's {bounds[-1]} patches do not match the tower's {q.shape[0]} rows")
    out = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    for a, b in zip(bounds[:-1], bounds[1:]):
        # head-major copies once per segment (the qkv split leaves them strided): the GEMMs read
        # contiguous rows, the logits are scaled in place
        kk = k[a:b].float().transpose(0, 1).contiguous()  # [H, P, Dh]
        qq = q[a:b].float().transpose(0, 1).contiguous()  # [H, P, Dh]
        total = torch.zeros(b - a, dtype=torch.float32, device=q.device)
        for s in range(0, b - a, chunk):
            logits = torch.matmul(qq[:, s:s + chunk], kk.transpose(1, 2)).mul_(scaling)  # [H, r, P]
            total += torch.softmax(logits, dim=-1).sum((0, 1))
        out[a:b] = total / (q.shape[1] * (b - a))
    return out


QWEN2_VL = register_adapter(Qwen2VLAdapter(
    family="qwen2-vl",
    model_classes=("Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
    config_types=("qwen2_vl",),
))


@dataclass(frozen=True)
class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: Qwen2-VL plus the windowed vision tower (see the module docstring)."""

    fullatt_field: str = "fullatt_block_indexes"

    def score_block(self, model: Any) -> int:
        """The last full-attention vision block (``vision_config.fullatt_block_indexes``)."""
        return int(max(getattr(self.vision_config(model), self.fullatt_field)))

    def tower_order(self, model: Any, grid_thw: Tensor) -> Tensor | None:
        return qwen_window_index(self.get_vision_tower(model), grid_thw)

    def vision_shape(self, model: Any) -> dict[str, Any]:
        """As Qwen2-VL with the 2.5 tower: ``hidden_size`` wide, SwiGLU MLP of ``intermediate_size``,
        windows of (window_size / patch)^2 patches except in ``fullatt_block_indexes``, merger to
        ``out_hidden_size``."""
        vc = self.vision_config(model)
        width, m2 = int(vc.hidden_size), self.merge_size(model) ** 2
        return {"type": getattr(vc, "model_type", None), "hidden": width, "layers": int(vc.depth),
                "heads": int(vc.num_heads), "intermediate": int(vc.intermediate_size), "mlp_matrices": 3,
                "patch_size": int(vc.patch_size), "image_size": None,
                "patch_in": int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2,
                "window_tokens": (int(vc.window_size) // int(vc.patch_size)) ** 2,
                "full_layers": [int(i) for i in getattr(vc, self.fullatt_field)],
                "projector_dims": [width * m2, width * m2, int(vc.out_hidden_size)], "projector_after_pruning": False}


QWEN2_5_VL = register_adapter(Qwen25VLAdapter(
    family="qwen2.5-vl",
    model_classes=("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
    config_types=("qwen2_5_vl",),
))
