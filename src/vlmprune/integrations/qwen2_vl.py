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

Not yet: vision-stage methods (they must select after the merger, one decision per merged token)
and ATP; ``vlmprune.apply`` refuses them with the reason (``unsupported_methods``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .base import ModelAdapter, register_adapter
from .compat import mrope_positions

__all__ = ["Qwen2VLAdapter", "QWEN2_VL"]

_VISION_LATER = ("vision-stage selection after Qwen2-VL's 2x2 merger is not implemented yet; use a "
                 "decoder-stage method (fastv, sparsevlm)")


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

    def tower_has_cls(self, model: Any) -> bool:
        return False

    def fixed_image_tokens(self, model: Any) -> int | None:
        return None

    def budget_tokens(self, model: Any, stage: str) -> int:
        return self.max_image_tokens

    def video_token_id(self, model: Any) -> int | None:
        value = getattr(self.config(model), self.video_token_id_field, None)
        return None if value is None else int(value)

    def visual_columns(self, model: Any, input_ids: Tensor) -> Tensor:
        """input_ids [B, L] -> [B, L] bool: image and video placeholders."""
        visual = input_ids == self.image_token_id(model)
        video = self.video_token_id(model)
        return visual if video is None else visual | (input_ids == video)

    def lm_positions(self, position_ids: Tensor | None, bsz: int, length: int, device: Any) -> Tensor:
        """Any position form the language model accepts -> M-RoPE [3, B, L] long."""
        return mrope_positions(position_ids, bsz, length, device)

    def layer_position_ids(self, positions: Tensor) -> Tensor | None:
        """Decoder layers get None (the stock model's value in a forward; only flash attention reads it)."""
        return None


QWEN2_VL = register_adapter(Qwen2VLAdapter(
    family="qwen2-vl",
    model_classes=("Qwen2VLForConditionalGeneration", "Qwen2VLModel"),
    unsupported_methods=tuple((m, _VISION_LATER) for m in
                              ("random", "sequential", "spatial", "cls-topk", "prumerge", "prumerge+"))
    + (("atp", "ATP's modules are built for one square grid of N tokens per image; Qwen2-VL images have "
                "dynamic resolution"),),
))
