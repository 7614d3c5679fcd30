"""LLaVA-1.5 (transformers ``LlavaForConditionalGeneration`` / ``LlavaModel``): the adapter as data.

Layout in transformers 5.x::

    LlavaForConditionalGeneration
      .model: LlavaModel
        .vision_tower: CLIPVisionModel      .vision_model.encoder.layers[i].self_attn.{q,k}_proj
        .multi_modal_projector              2-layer MLP, per token
        .language_model: LlamaModel         .layers[i]
      .lm_head

Config: ``image_token_id`` (the placeholder repeated N times per image in ``input_ids``),
``vision_feature_layer`` (-2: the penultimate hidden state) and
``vision_feature_select_strategy`` ("default": drop [CLS]; "full": keep it).
"""

from __future__ import annotations

from .base import ModelAdapter, register_adapter

LLAVA = register_adapter(ModelAdapter(
    family="llava",
    model_classes=("LlavaForConditionalGeneration", "LlavaModel"),
    config_types=("llava",),
))
