"""Vision-stage plumbing: reduce each image's visual tokens before the LLM, keep the model's API.

Two things are installed on the model (both undone by ``handle.remove()``): the base model's
``get_image_features`` is shadowed by an instance attribute, and the user's model gets a forward
pre-hook. Nothing else is patched; the attention implementation (sdpa) is never touched.

**Modalities.** The adapter lists one view per visual modality (``adapter.modality_views``: images,
and videos for families that take them), each naming its features method (``get_image_features``
/ ``get_video_features``), its ``mm_encoder_outputs`` key, its pixels keyword and placeholder
token. Every view's features method is shadowed the same way and the pre-hook encodes whichever
pixels a forward carries; a prefill with images and videos is rewritten by one plan (the columns
each modality keeps, intersected). A video counts as one "image" of its view's layout, its frames
or temporal slices being the units. Stats record one entry per prefill (a batch with images
and videos records its images, then its videos, in that one entry).

**Encoding images** (``get_image_features``, which ``generate()`` calls before the prefill and a
plain forward reaches through the pre-hook; videos alike through their view):

0. The family's adapter says what the images are (``adapter.image_layout``: a
   ``layout.VisualLayout`` of U tower passes — one per image for LLaVA-1.5, base image + crops for
   LLaVA-NeXT — each with its grid, [CLS] flag and index, and each image's placeholder count).
1. The vision tower runs once over the U units (its own attention implementation). If the method
   needs [CLS] signals, the adapter computes them (``adapter.encode_with_signals``; a family
   without [CLS] supplies a documented substitute, ``adapter.importance_score``). By default
   forward hooks on the *last* encoder layer's ``q_proj`` / ``k_proj`` are
   registered for the duration of this call only: they keep the [CLS] query row (at the
   adapter's ``cls_index``) and ``k`` (all keys), raw linear outputs [U, 1+N, C]. Spec §1: that
   layer's input is the penultimate hidden state, i.e. the very features LLaVA feeds the
   projector, and its keys are what the official PruMerge code uses. Only the [CLS] row of the attention is computed (``cls_attention``).
2. The method reduces the features [U, N, D] to a padded ``Reduction`` (tokens [U, M, D], counts
   [U]); units of different grids (dynamic-resolution families) are reduced group by group, one
   call per grid, and the groups' results padded into one ``Reduction``. The projector runs on
   the reduced tokens only.
3. The adapter packs the units into the stock layout (``adapter.pack``), one [n_i, D_text]
   tensor per image (n_i its unpruned placeholder count) whose finite rows are the kept tokens
   and whose all-NaN rows are dropped slots: the kept rows are either the first ``counts[i]``
   (the kept tokens take the first placeholders, LLaVA's rule) or, for a family whose tokens
   keep their own positions, the rows of their own placeholder slots. The padding is
   self-describing: it survives what
   ``generate()`` does to pre-encoded features (beam expansion by placeholder counting, device
   moves, re-use at every step without cache), and NaN can never be consumed silently.

**Prefill** (a forward whose ``mm_encoder_outputs`` carry such features; ``pixel_values`` are
first encoded as above): image i's placeholder run (n_i copies of ``image_token_id`` in
``input_ids``, found with ``adapter.sequence_layout``) keeps the slots of its finite rows; the
other slots are deleted. Every sample is compacted and re-padded **on the left** to the new batch
width L' = max_b(kept length), so every image keeps its own count. ``attention_mask`` (0 on the new pads), ``position_ids`` (original
position minus the number of slots deleted before it, so the survivors are consecutive, as
LLaVA-PruMerge feeds them; a family with ``compact_positions`` False instead keeps every
survivor's original positions, in its own form, e.g. M-RoPE [3, B, L], computed on the unpruned
prompt by ``adapter.prompt_positions`` when the caller passed none), the adapter's other per-token
inputs (``adapter.sequence_inputs``, e.g. Qwen2-VL's ``mm_token_type_ids``) and ``labels`` (-100 on
new pads) are rewritten the same way, the NaN
rows are sliced off, and the stock forward scatters the kept tokens into the kept placeholders.
Logits therefore have the rewritten length L'. The rewrite is remembered as a ``Plan`` on the
handle until the next prefill.

**Later calls** (no image features, a non-empty KV cache): the caller keeps speaking in its
*original* coordinates, as ``generate()`` does — it extends the original ``attention_mask`` by one
column per token and derives ``position_ids`` from it. The hook translates: the mask's prompt
columns are compacted with the plan (the appended columns are kept), and ``position_ids`` are
shifted down by the sample's deleted count (families with ``compact_positions`` False keep them:
decoding continues after the unpruned prompt's positions). A mask that already has the cache's length (the
caller used the rewritten mask) passes unchanged. If ``generate`` dropped an all-ones mask, the
hook rebuilds the rewritten one so the new left pads stay masked. So ``generate()`` works
unchanged — greedy, sampling, beams, with or without cache (without cache every step is a
prefill with the same pre-encoded features) — and returns sequences in the original
coordinates (the original prompt followed by the new tokens).

A call without images on an empty cache is a text-only prefill: the plan is dropped. Static /
compiled caches (4-D masks built by ``generate``) are not supported with an active plan and raise.
"""

from __future__ import annotations

from .handle import VisionHandle, attach
from .method import VisionMethod, VisionSignals
from .plan import Plan, image_token_counts, image_token_slots, make_plan
from .signals import capture_signals, signals_from_qk

__all__ = ["VisionSignals", "VisionMethod", "VisionHandle", "Plan", "attach", "capture_signals", "signals_from_qk",
           "image_token_counts", "image_token_slots"]
