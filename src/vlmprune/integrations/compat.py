"""Every assumption vlmprune makes about transformers internals, in one module.

The hooks in ``vision/`` / ``decoder/`` and the helpers elsewhere read keyword arguments and
output fields only through the names and functions below, so a rename upstream is one edit here.
Checked on transformers 5.20.0, 5.23.0, 5.24.0 and 5.25.0 (``.ci/run`` runs the equivalence tests on the
floor and the newest release of the declared range; ``tests/test_compat.py`` guards each item).

Assumptions, each with the test that guards it:

1. **The cache's name.** Up to 5.23 the KV cache travels as ``past_key_values`` (keyword of
   ``generate``, the models' and decoder layers' ``forward``s, and a ``ModelOutput`` field). 5.24
   renamed it ``cache`` everywhere; the old names are shims (``deprecate_kwarg`` on the
   ``forward``s, a warning property on outputs). The installed name is read off the
   ``BaseModelOutputWithPast`` dataclass (``CACHE``). A forward pre-hook sees the caller's own
   keywords *before* the shim renames them, so a hook accepts every name in ``CACHE_NAMES``
   (``get_cache``); outputs are read by the installed field name only (``output_cache``), which
   never triggers the deprecation warning. Guarded by ``test_compat.py::test_cache_name_*``,
   ``test_cache_under_each_name_*`` and the cached == uncached tests of ``test_decoder.py`` /
   ``test_integration_vision.py``.
2. **Keyword names the hooks read or rewrite** (``K``): the multimodal model's forward takes
   ``input_ids``, ``inputs_embeds``, ``pixel_values``, ``attention_mask`` (2-D ``[B, L]`` from
   ``generate``), ``position_ids`` (``[B, L]``; M-RoPE families: assumption 11), ``labels``, ``image_sizes``,
   ``vision_feature_layer``, ``vision_feature_select_strategy`` and ``mm_encoder_outputs`` (a dict
   ``modality -> output of get_image_features``; ``generate`` encodes the images once and passes
   the result on every step); the language model's decoder layers take ``hidden_states`` (first
   positional), ``attention_mask`` (4-D, or None for sdpa's ``is_causal`` path),
   ``position_ids`` and ``position_embeddings`` (the rotary ``(cos, sin)``, each ``[B, L, Dh]``).
   Guarded by ``test_compat.py::test_forward_signatures`` (the names exist in the installed
   signatures) and every equivalence test.
3. **Masks and positions** (``decoder/``): the language model builds one causal mask sized from
   layer 0's cache (``DynamicCache.get_mask_sizes``) and hands the same mask to every layer, so a
   layer whose cache is shorter needs its own mask; ``generate`` derives ``position_ids`` from the
   2-D mask's cumsum over the *original* prompt and extends it by one per step; a forward without
   ``position_ids`` derives them from layer 0's cache length. ``DynamicCache.get_seq_length(i)``
   gives layer i's own length. Guarded by ``test_decoder.py`` (per-layer cache lengths, cached ==
   uncached, ragged batch == singles, positions kept).
4. **Rotary embeddings**: the language model owns ``rotary_emb(x, position_ids) -> (cos, sin)``
   and Llama's rotate-half convention (``q * cos + rotate_half(q) * sin``), re-implemented in
   ``decoder.attention_rows`` and imported for the testbed's training via ``apply_rotary``.
   Guarded by ``test_decoder.py::test_attention_rows_match_eager_attention`` and
   ``test_compat.py::test_apply_rotary_matches_transformers``.
5. **Attention modules**: decoder layers hold ``self_attn.{q,k}_proj`` (heads concatenated),
   ``head_dim``, ``scaling``, ``num_key_value_groups`` and ``config.num_attention_heads``; the
   attention implementation is read from ``config._attn_implementation`` and never changed.
   Guarded by ``test_decoder.py::test_attention_rows_match_eager_attention`` (scores equal eager
   attention's) and ``test_decoder.py::test_remove_restores_model_and_sdpa_stays``.
6. **Image features**: ``get_image_features(pixel_values, vision_feature_layer,
   vision_feature_select_strategy, ..., return_dict=True)`` returns a
   ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the per-image token tensors; the
   CLIP tower returns ``hidden_states`` with ``output_hidden_states=True``. Guarded by
   ``test_integration_vision.py::test_get_image_features_returns_nan_padded_kept_tokens`` and
   ``::test_keep_all_gives_identical_logits_and_tokens``.
7. **Cache internals**: ``DynamicCache.layers[i].keys / .values`` are ``[B, Hkv, L, Dh]`` tensors,
   the keys stored *after* RoPE. The decoder stage reads a layer's keys from there to score
   attention without re-rotating them (``layer_keys``; any other layout, e.g. a sliding-window
   or quantized layer, is ignored and the keys are recomputed), the benchmarks count the bytes.
   Guarded by ``test_compat.py::test_layer_keys_are_the_rotated_keys`` and ``test_cost.py``.
8. **Loading progress bars**: ``from_pretrained`` draws a "Loading weights" bar on stderr unless
   ``transformers.utils.logging.disable_progress_bar()`` was called (``quiet_loading``; the CLI
   calls it so that an error is stderr's first line). Guarded by
   ``test_cli.py::test_eval_typo_in_second_method_fails_before_any_work``.
9. **The loss**: ``LlavaForConditionalGeneration.forward`` computes ``loss`` as
   ``self.loss_function(logits=, labels=, vocab_size=config.text_config.vocab_size)`` (shifted
   cross-entropy, -100 ignored) from ``labels`` (keyword ``K.LABELS``) aligned with its logits
   (``lm_loss``). Guarded by ``test_decoder.py::test_labels_are_gathered_like_the_logits``.
10. **LLaVA-NeXT any-res packing** (``models/llava_next/modeling_llava_next.py``):
    ``get_image_features(pixel_values [B, max_crops, 3, S, S], image_sizes [B, 2] (H, W))`` keeps
    the first ``image_size_to_num_patches(size, image_grid_pinpoints, S)`` crops of each image
    (crop 0 the base image, then the ``get_anyres_image_grid_shape`` (gh, gw) mosaic in raster
    order), runs the tower on all of them at once, drops [CLS] ("default") and projects per token;
    ``pack_image_features`` puts the base image's N tokens first, then the mosaic as a
    (gh*h, gw*w) patch grid cut by ``unpad_image`` to the image's aspect ratio, row-major with the
    ``image_newline`` parameter (on the base model, already in LLM space) after every row
    (``anyres_crops``, ``unpad_window``). Guarded by
    ``test_llava_next.py::test_keep_all_gives_identical_logits_and_tokens`` and
    ``::test_layout_counts_match_stock_packing``.
11. **Qwen2-VL M-RoPE** (``models/qwen2_vl/modeling_qwen2_vl.py``): the base model computes
    ``position_ids`` [3, B, L] with ``get_rope_index(input_ids, mm_token_type_ids,
    image_grid_thw, video_grid_thw, attention_mask)`` (vision tokens at (t, h, w) offsets, text
    continuing after the largest vision position) and stores ``rope_deltas`` [B, 1] (max position
    + 1 - unpadded length); ``generate`` passes [4, B, L] (row 0 the 1-D text positions) and
    extends every row by one per step, so decoding continues after the unpruned maximum position
    whatever the cache holds; a forward without ``position_ids`` on a filled cache uses layer 0's
    cache length (or the mask's cumsum) + ``rope_deltas``. The language model's ``rotary_emb(x,
    position_ids [3, B, L])`` returns (cos, sin) [B, L, Dh] (the ``mrope_section`` axes already
    interleaved), which the attention applies with Llama's rotate-half (so ``attention_rows`` and
    the cached keys need nothing else); decoder layers receive ``position_ids`` = the text row or
    None, read by flash attention only (``mrope_positions``). Guarded by
    ``test_qwen2_vl.py::test_survivors_keep_their_get_rope_index_positions``,
    ``::test_fastv_k0_equals_stock_model_on_prepruned_sequence`` and
    ``test_compat.py::test_qwen2_vl_rotary_is_llama_rotate_half``.
12. **Qwen2-VL vision tower** (same file): ``model.visual(pixel_values, grid_thw=image_grid_thw)``
    returns ``pooler_output`` [sum t*h*w/4, D_text], the ``PatchMerger`` output (already in LLM
    space), image after image, each in raster order of its merged (h/2, w/2) grid — the order of
    ``get_rope_index``'s vision positions and of the image's placeholders; ``get_image_features``
    splits it per image into ``pooler_output`` and the forward scatters the concatenation into the
    placeholders in order (``qwen_vision_tokens``, ``qwen_rope_index``). Guarded by
    ``test_qwen2_vl.py::test_vision_keep_all_gives_identical_logits_and_tokens`` and
    ``::test_vision_survivors_keep_their_positions``.
13. **Qwen2-VL vision attention** (same file; Qwen2.5-VL's is the same): a block's ``attn``
    (``VisionAttention``) is called with ``cu_seqlens`` (second positional or keyword) and
    ``position_embeddings`` (cos, sin) [S, Dh]; its fused ``qkv`` linear gives [S, 3 * C] read as
    ``reshape(S, 3, heads, Dh)``; q, k are rotated by ``apply_rotary_pos_emb_vision``; scaling
    ``attn.scaling``; attention is within each ``cu_seqlens`` segment, non-causal
    (``qwen_vision_qk``). Guarded by ``test_qwen2_vl.py::test_substitute_score_is_the_blocks_attention``.
14. **Qwen2.5-VL's windowed tower** (``models/qwen2_5_vl/modeling_qwen2_5_vl.py``): as Qwen2-VL, but
    the tower permutes the merge groups (2x2 patch rows, contiguous) into window order with
    ``transformers.vision_utils.get_vision_window_index(grid_thw, spatial_merge_size, window_size,
    patch_size)`` before the blocks, attends within windows except in
    ``vision_config.fullatt_block_indexes`` (whole image, ``cu_seqlens``), and undoes the order
    after the merger with ``argsort(window_index)`` (``qwen_window_index``); ``get_rope_index``
    takes ``second_per_grid_ts`` before ``attention_mask``. Guarded by
    ``test_qwen2_vl.py::test_tower_order_is_the_mergers_order`` and the whole module run on the
    Qwen2.5-VL fixture.
15. **Video-LLaVA inputs** (``models/video_llava/modeling_video_llava.py``): ``VideoLlavaModel`` holds
    ``image_tower`` and ``video_tower`` (two CLIP vision models) and one ``multi_modal_projector``;
    ``get_image_features(pixel_values [I, 3, S, S], vision_feature_layer,
    vision_feature_select_strategy)`` is LLaVA-1.5's; ``get_video_features(pixel_values_videos [V, F,
    3, S, S], vision_feature_layer)`` reshapes the videos to [V * F, 3, S, S] frames, runs the video
    tower and projects the selected hidden states of every frame *with* its [CLS] token (no select
    strategy): ``pooler_output`` [V * F, 1 + N, D_text]. The forward reads ``pooler_output`` as one
    tensor (``.to(...)``, then ``flatten(0, 1)``) and scatters it into the ``image_token_id`` /
    ``video_token_id`` placeholders in order (``video_llava_frames``). ``VideoLlavaProcessor``
    returns the images as ``pixel_values_images``, a deprecated keyword that ``get_image_features``
    still names in its signature, so ``generate`` hands it over under that name (the adapter's
    ``pixel_values_aliases``). Guarded by
    ``test_video_llava.py::test_vision_keep_all_gives_identical_logits_and_tokens``,
    ``::test_layout_counts_match_stock_features`` and
    ``::test_generate_with_the_processors_pixel_values_images``.
16. **Configs and image geometry without a model** (the bench and the cost model): a multimodal
    config is a ``transformers.PretrainedConfig`` whose ``model_type`` names the family
    (``is_config``); ``AutoConfig.for_model(model_type, **fields)`` builds one from plain fields
    (``config_for``); Qwen2-VL's processor resizes an (H, W) image with ``smart_resize(H, W,
    factor=patch*merge, min_pixels, max_pixels)`` (its defaults: 56*56 and 28*28*1280 pixels) to the
    patch grid it returns as ``image_grid_thw`` (``qwen_image_grid``). Guarded by
    ``test_cost.py::test_qwen_geometry_matches_the_processor`` and
    ``test_cost.py::test_next_geometry_matches_the_stock_packing``.
17. **LLaVA-OneVision images** (``models/llava_onevision/modeling_llava_onevision.py``):
    ``get_image_features(pixel_values [B, max_crops, 3, S, S] (or the crops concatenated, [C, 3, S,
    S]), image_sizes [B, 2] (H, W), vision_feature_layer, vision_feature_select_strategy,
    vision_aspect_ratio, batch_num_images)`` cuts an image into crops as LLaVA-NeXT does (the file's
    own ``image_size_to_num_patches`` / ``get_anyres_image_grid_shape`` / ``unpad_image``), except
    that an image whose sample holds several images (``batch_num_images``) is its base image only;
    the tower runs on every crop, ``hidden_states[vision_feature_layer]`` is selected ("default"
    drops the first token, [CLS] or not), and the projector runs on **every** token. Then
    ``pack_image_features(features, image_sizes, image_newline, vision_aspect_ratio)`` gives each
    image its base image's h*w tokens and, for an image with crops, the (gh*h, gw*w) mosaic cut by
    ``unpad_image`` to (H', W') and, when r = sqrt(H'W' / (m h^2)) > 1.1 (m from
    ``"anyres_max_<m>"``), resized bilinearly to (int(H' // r), int(W' // r)); row-major with
    ``image_newline`` after every row (no newline argument: no newline column). An image without
    crops gets its h*w tokens and one newline. ``vision_aspect_ratio`` defaults to the config's;
    the model's ``forward`` does not pass its own on (``onevision_mosaic``, ``onevision_pack``).
    Guarded by ``test_llava_onevision.py::test_layout_counts_match_stock_packing`` and
    ``::test_keep_all_gives_identical_logits_and_tokens``.
18. **LLaVA-OneVision videos** (same file): ``get_video_features(pixel_values_videos [V, F, 3, S,
    S], vision_feature_layer, vision_feature_select_strategy)`` runs every frame through the tower,
    projects every token, pools each frame's (h, w) grid to (ceil(h/2), ceil(w/2)) with
    ``apply_pooling`` (bilinear) and returns ``pooler_output`` [V, F * n' + 1, D_text]: the frames'
    pooled tokens, frame after frame, then one ``image_newline``; the forward flattens it
    (``flatten(0, 1)``) into the ``video_token_id`` placeholders (``onevision_pool``,
    ``onevision_video_grid``). Guarded by
    ``test_llava_onevision.py::test_keep_all_gives_identical_logits_and_tokens`` (its videos cases).
19. **SigLIP vision attention** (``models/siglip/modeling_siglip.py``, LLaVA-OneVision's tower):
    ``SiglipVisionModel.encoder.layers[i].self_attn`` has separate ``q_proj`` / ``k_proj`` linears
    whose outputs [P, S, heads * Dh] are split into ``num_heads`` contiguous heads of ``head_dim``
    and scaled by ``scale``; no attention mask, not causal; there is no [CLS] token, and
    ``hidden_states[-1]`` is the last layer's output before ``post_layernorm``
    (``vision_qk_heads``). Guarded by
    ``test_llava_onevision.py::test_substitute_score_is_the_last_layers_attention``. The language
    model is Qwen2's, whose rotary embedding is Llama's rotate-half (assumption 4), guarded by
    ``test_llava_onevision.py::test_qwen2_rotary_is_llama_rotate_half``.
20. **Processors whose video processor needs torchvision** (``processing_utils.ProcessorMixin``):
    ``AutoProcessor.from_pretrained`` builds every sub-processor the processor class's ``__init__``
    names (``get_attributes()``: e.g. Qwen2-VL's ``image_processor``, ``tokenizer``,
    ``video_processor``) and raises ``ImportError`` naming torchvision when one needs it (Qwen2-VL's,
    Video-LLaVA's and OneVision's video processors do; their images have a PIL image processor that
    does not). The class's ``__init__`` takes ``video_processor=None`` once
    ``check_argument_for_proper_class`` lets it pass; the image processor and tokenizer load by
    their auto classes, the processor's own settings and chat template by ``get_processor_dict``,
    and ``from_args_and_dict(args in get_attributes() order, processor_dict)`` builds it as
    ``from_pretrained`` does; ``save_pretrained`` skips the missing video processor while
    ``get_attributes()`` leaves it out (and copies the source folder's
    ``video_preprocessor_config.json`` beside, so the folder stays loadable); the subclass refuses ``videos`` itself (``load_processor``,
    ``images_only_processor``). Guarded by
    ``test_compat.py::test_processor_without_torchvision_loads_for_images_only``.
"""

from __future__ import annotations

from typing import Any, Mapping

import transformers
from transformers.modeling_outputs import BaseModelOutputWithPast

__all__ = ["TRANSFORMERS_VERSION", "CACHE", "CACHE_NAMES", "K", "get_cache", "cache_kwargs", "output_cache",
           "ACCEPTED_CACHE_NAMES", "layer_keys", "apply_rotary", "anyres_crops", "unpad_window",
           "mrope_positions", "qwen_rope_index", "qwen_vision_tokens", "qwen_vision_qk", "qwen_window_index",
           "video_llava_frames", "is_config", "config_for", "qwen_image_grid",
           "onevision_mosaic", "onevision_pack", "onevision_pool", "onevision_video_grid", "vision_qk_heads",
           "load_processor", "images_only_processor", "ImagesOnlyProcessorWarning"]

TRANSFORMERS_VERSION: str = transformers.__version__

_CACHE_CANDIDATES = ("cache", "past_key_values")


def _installed_cache_name() -> str:
    fields = getattr(BaseModelOutputWithPast, "__dataclass_fields__", {})
    for name in _CACHE_CANDIDATES:
        if name in fields:
            return name
    raise ImportError(f"transformers {TRANSFORMERS_VERSION}: BaseModelOutputWithPast has none of the cache fields "
                      f"{_CACHE_CANDIDATES}; this release is outside vlmprune's tested range (see README)")


#: The installed transformers' name for the KV cache (keyword and output field).
CACHE: str = _installed_cache_name()
#: Every name a cache may arrive under in a hooked forward's keywords (installed name first).
CACHE_NAMES: tuple[str, ...] = (CACHE,) + tuple(n for n in _CACHE_CANDIDATES if n != CACHE)
#: The names a user may pass the cache under to the installed release's ``forward`` / ``generate``:
#: from 5.24 the new name and the deprecated one (a shim renames it); before, the old name only.
ACCEPTED_CACHE_NAMES: tuple[str, ...] = CACHE_NAMES if CACHE == "cache" else (CACHE,)


class K:
    """Keyword names of the forwards vlmprune's hooks read or rewrite (assumption 2)."""

    INPUT_IDS = "input_ids"
    INPUTS_EMBEDS = "inputs_embeds"
    PIXEL_VALUES = "pixel_values"
    ATTENTION_MASK = "attention_mask"
    POSITION_IDS = "position_ids"
    POSITION_EMBEDDINGS = "position_embeddings"
    HIDDEN_STATES = "hidden_states"
    LABELS = "labels"
    IMAGE_SIZES = "image_sizes"
    FEATURE_LAYER = "vision_feature_layer"
    SELECT_STRATEGY = "vision_feature_select_strategy"
    MM_ENCODER_OUTPUTS = "mm_encoder_outputs"
    RETURN_DICT = "return_dict"


def get_cache(kwargs: Mapping[str, Any]) -> Any:
    """The cache object in a forward's keywords, under whichever supported name the caller used."""
    for name in CACHE_NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the installed name, for calling a model or layer directly."""
    return {CACHE: cache}


def output_cache(output: Any) -> Any:
    """The cache of a model output (``ModelOutput`` or dict), read without deprecation shims."""
    if output is None:
        return None
    if isinstance(output, Mapping):
        # ModelOutput is an OrderedDict of its non-None fields; keys() never goes through the BC rename
        return output[CACHE] if CACHE in list(output.keys()) else None
    return getattr(output, CACHE, None)


def layer_keys(cache: Any, layer_idx: int, shape: tuple[int, ...]) -> Any:
    """Layer ``layer_idx``'s rotated keys in ``cache`` when they are a floating tensor of ``shape``
    ([B, Hkv, L, Dh]), else None (assumption 7)."""
    layers = getattr(cache, "layers", None)
    if layers is None or not 0 <= layer_idx < len(layers):
        return None
    keys = getattr(layers[layer_idx], "keys", None)
    if getattr(keys, "shape", None) != shape or not keys.is_floating_point():
        return None
    return keys


def apply_rotary(q: Any, k: Any, cos: Any, sin: Any) -> tuple[Any, Any]:
    """Llama's rotary embedding applied to q, k [B, H, L, Dh] with cos/sin [B, L, Dh] (assumption 4)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def quiet_loading() -> None:
    """No progress bars from ``from_pretrained`` (assumption 8), and no retry messages of the Hub
    client (a hub id that cannot be reached ends in one error, not a line per retry)."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging

    logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


def lm_loss(model: Any, logits: Any, labels: Any) -> Any:
    """The model's own causal-LM loss of ``logits`` [B, L, V] against ``labels`` [B, L] (assumption 9)."""
    return model.loss_function(logits=logits, labels=labels, vocab_size=model.config.get_text_config().vocab_size)


def anyres_crops(image_size: Any, pinpoints: Any, tile: int) -> tuple[int, int, int]:
    """LLaVA-NeXT crops of an image of ``image_size`` (H, W): (crops incl. the base image, gh, gw)
    with (gh, gw) the mosaic's crops per column / row (assumption 10)."""
    from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                     image_size_to_num_patches)

    size = [int(x) for x in image_size]
    gh, gw = get_anyres_image_grid_shape(size, pinpoints, tile)
    return int(image_size_to_num_patches(size, pinpoints, tile)), int(gh), int(gw)


def unpad_window(height: int, width: int, image_size: Any) -> Any:
    """[H', W'] long: the mosaic's raster indices (of a ``height`` x ``width`` patch grid) that
    LLaVA-NeXT's ``unpad_image`` keeps for an image of ``image_size`` (H, W) (assumption 10)."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    grid = torch.arange(height * width).view(1, height, width)
    return unpad_image(grid, [int(x) for x in image_size])[0]


def mrope_positions(position_ids: Any, bsz: int, length: int, device: Any) -> Any:
    """The ``position_ids`` a Qwen2-VL language model received -> M-RoPE [3, B, L] long (assumption 11).

    ``Qwen2VLTextModel.forward`` takes [3, B, L] (temporal, height, width), [4, B, L] (``generate``:
    row 0 the text positions for the mask, rows 1-3 the M-RoPE ones), [1, B, L] or [B, L] (one
    position for all three axes), or None (0..L-1 on an empty cache).
    """
    import torch

    if position_ids is None:
        return torch.arange(length, device=device).view(1, 1, length).expand(3, bsz, length)
    pos = position_ids.to(device)
    if pos.dim() == 2:
        pos = pos[None]
    if pos.shape[0] == 4:
        pos = pos[1:]
    return pos.expand(3, bsz, length)


def qwen_rope_index(base: Any, input_ids: Any, mm_token_type_ids: Any, image_grid_thw: Any, video_grid_thw: Any,
                    attention_mask: Any, second_per_grid_ts: Any = None) -> tuple[Any, Any]:
    """Qwen2-VL's own M-RoPE positions of a prompt: (position_ids [3, B, L], rope_deltas [B, 1])
    from ``Qwen2VLModel.get_rope_index`` (assumption 11; Qwen2.5-VL's videos also read
    ``second_per_grid_ts``, the seconds per temporal slice, assumption 14)."""
    # keywords: Qwen2.5-VL's signature has second_per_grid_ts before attention_mask
    extra = {} if second_per_grid_ts is None else {"second_per_grid_ts": second_per_grid_ts}
    return base.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
                               video_grid_thw=video_grid_thw, attention_mask=attention_mask, **extra)


def qwen_vision_tokens(visual: Any, pixel_values: Any, grid_thw: Any) -> Any:
    """Qwen2-VL's vision tower, merger included: pixel_values [sum patches, C*T*P*P], grid_thw
    [I, 3] -> merged tokens [sum t*h*w/m^2, D_text], image by image, each in the raster order of
    its merged (t*h/m, w/m) grid (assumption 12)."""
    out = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw, return_dict=True)
    return out.pooler_output


def qwen_vision_qk(qkv: Any, num_heads: int, position_embeddings: Any) -> tuple[Any, Any, Any]:
    """A Qwen2-VL vision block's fused ``qkv`` output [S, 3 * C] and its (cos, sin) [S, Dh] ->
    (q, k rotated as the block rotates them, k before rotary), each [S, heads, Dh] (assumption 13)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    q, k, _ = qkv.reshape(qkv.shape[0], 3, num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q_rot, k_rot = apply_rotary_pos_emb_vision(q, k, cos, sin)
    return q_rot, k_rot, k


def qwen_window_index(visual: Any, grid_thw: Any) -> Any:
    """Qwen2.5-VL's window order of the merge groups inside its tower: [G] long, tower row g holds
    merge group ``window_index[g]`` (groups numbered image by image in merged-grid raster order;
    assumption 14)."""
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
    return window_index


def video_llava_frames(pixel_values_videos: Any) -> Any:
    """Video-LLaVA's videos [V, F, 3, S, S] -> the frames [V * F, 3, S, S] its video tower runs on,
    video after video (assumption 15)."""
    videos, frames = pixel_values_videos.shape[:2]
    return pixel_values_videos.reshape(videos * frames, *pixel_values_videos.shape[2:])


def is_config(obj: Any) -> bool:
    """Whether ``obj`` is a transformers config (not a model) (assumption 16)."""
    return isinstance(obj, transformers.PretrainedConfig)


def config_for(model_type: str, **fields: Any) -> Any:
    """A transformers config of ``model_type`` built from plain fields (nested configs as dicts)
    (assumption 16)."""
    return transformers.AutoConfig.for_model(model_type, **fields)


def qwen_image_grid(height: int, width: int, patch: int, merge: int, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> tuple[int, int]:
    """(h, w) patches Qwen2-VL's image processor gives an image of ``height`` x ``width`` px:
    ``smart_resize`` to multiples of ``patch * merge`` within [min_pixels, max_pixels] (the
    processor's defaults when None), divided by ``patch`` (assumption 16)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    bounds = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    h, w = smart_resize(int(height), int(width), factor=patch * merge, **bounds)
    return h // patch, w // patch


def onevision_mosaic(image_size: Any, pinpoints: Any, tile: int, side: int,
                     aspect: str) -> tuple[int, int, int, int, int]:
    """LLaVA-OneVision's any-res geometry of an image of ``image_size`` (H, W) px: (crops incl. the
    base image, gh, gw, rows, cols), (gh, gw) the mosaic's crops per column / row and rows x cols
    its packed grid after the unpadding and the ``aspect`` ("anyres_max_<m>") resize of a
    (gh * side) x (gw * side) patch mosaic (assumption 17)."""
    import math

    import torch
    from transformers.models.llava_onevision import modeling_llava_onevision as ov

    size = [int(x) for x in image_size]
    crops = int(ov.image_size_to_num_patches(size, pinpoints, tile))
    gh, gw = (int(x) for x in ov.get_anyres_image_grid_shape(size, pinpoints, tile))
    rows, cols = ov.unpad_image(torch.empty(0, gh * side, gw * side), size).shape[1:]
    ratio = math.sqrt(rows * cols / (int(aspect.strip("anyres_max_")) * side ** 2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return crops, gh, gw, int(rows), int(cols)


def onevision_pack(base: Any, per_image: list, image_sizes: list, aspect: str) -> list:
    """Per image [crops_i, h*w, C] (crop 0 the base image) -> per image [h*w + rows*cols, C]: the
    base image's rows, then the unpadded, resized mosaic in raster order, without newlines
    (``pack_image_features`` with no ``image_newline``; assumption 17). Any C: tokens, scores, keys."""
    packed, _ = base.pack_image_features(per_image, image_sizes, image_newline=None, vision_aspect_ratio=aspect)
    return packed


def onevision_pool(base: Any, frames: Any) -> Any:
    """LLaVA-OneVision's video pooling of per-frame rows [F, h*w, C] -> [F, n', C], each frame's grid
    resized bilinearly to ``onevision_video_grid`` (``apply_pooling``; assumption 18). Any C."""
    return base.apply_pooling(frames)


def onevision_video_grid(h: int, w: int) -> tuple[int, int]:
    """The pooled grid of a video frame of h x w patches (assumption 18)."""
    return -(-h // 2), -(-w // 2)


def vision_qk_heads(q: Any, k: Any, attn: Any) -> tuple[Any, Any, float]:
    """A SigLIP attention's ``q_proj`` / ``k_proj`` outputs [P, S, C] -> (q, k [P, heads, S, Dh],
    scale) as the attention splits and scales them (assumption 19)."""
    heads = int(attn.num_heads)
    split = lambda t: t.view(*t.shape[:2], heads, -1).transpose(1, 2)  # noqa: E731
    return split(q), split(k), float(attn.scale)


def images_only_processor(processor_class: type) -> type:
    """A subclass of ``processor_class`` (same name, so a save records the real class) that accepts
    ``video_processor=None`` and refuses ``videos`` in one line (assumption 20)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    def __call__(self, *args, **kwargs):
        if kwargs.get("videos") is not None or len(args) > 2 and args[2] is not None:
            raise ImportError(f"this {processor_class.__name__} was loaded without its video processor, which needs "
                              f"torchvision (not installed): install torchvision to process videos")
        return processor_class.__call__(self, *args, **kwargs)

    def get_attributes(cls):
        names = processor_class.get_attributes()
        return [a for a in names if a != "video_processor"] if cls._saving else names

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save without the missing video processor, and with the video processor's config files
        of the folder it was loaded from (``load_processor``) copied beside, so that the saved folder
        loads in full where torchvision is installed."""
        import shutil
        from pathlib import Path

        type(self)._saving = True
        try:
            out = processor_class.save_pretrained(self, save_directory, *args, **kwargs)
        finally:
            type(self)._saving = False
        for file in getattr(self, "_video_files", ()):
            if not (Path(save_directory) / Path(file).name).exists():
                shutil.copy2(file, save_directory)
        return out

    return type(processor_class.__name__, (processor_class,),
                {"check_argument_for_proper_class": check_argument_for_proper_class, "__call__": __call__,
                 "get_attributes": classmethod(get_attributes), "save_pretrained": save_pretrained, "_saving": False,
                 "__module__": processor_class.__module__, "__doc__": processor_class.__doc__, "images_only": True})


class ImagesOnlyProcessorWarning(UserWarning):
    """``load_processor`` loaded a processor without its video processor (torchvision is missing)."""


def load_processor(src: str) -> Any:
    """``AutoProcessor.from_pretrained(src)``; when that fails because the folder's video processor
    needs torchvision (not installed), the same processor class without it, for images only, with a
    ``ImagesOnlyProcessorWarning`` (a ``UserWarning``) saying so (assumption 20): its image processor and tokenizer loaded by their
    auto classes, its own settings and chat template as ``from_pretrained`` reads them
    (``get_processor_dict``, ``from_args_and_dict``). Any other error propagates."""
    try:
        return transformers.AutoProcessor.from_pretrained(src)
    except ImportError as err:
        if "torchvision" not in str(err).lower():
            raise
        first = err
    import json
    import warnings
    from pathlib import Path

    name = None
    for file in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        path = Path(src) / file
        if not name and path.is_file():
            name = json.loads(path.read_text()).get("processor_class")
    processor_class = getattr(transformers, name, None) if name else None
    loaders = {"image_processor": transformers.AutoImageProcessor, "tokenizer": transformers.AutoTokenizer}
    attributes = processor_class.get_attributes() if processor_class is not None else []
    if "video_processor" not in attributes or not set(attributes) <= {"video_processor", *loaders}:
        raise first
    args = [None if a == "video_processor" else loaders[a].from_pretrained(src) for a in attributes]
    processor_dict, _ = processor_class.get_processor_dict(src)
    processor = images_only_processor(processor_class).from_args_and_dict(args, processor_dict)
    processor._video_files = [str(p) for p in (Path(src) / "video_preprocessor_config.json",) if p.is_file()]
    warnings.warn(f"{name}'s video processor needs torchvision, which is not installed: loaded the processor for "
                  f"images only (install torchvision to process videos)", ImagesOnlyProcessorWarning, stacklevel=2)
    return processor
