"""Decoder-stage plumbing: prune visual tokens *between* LLM decoder layers, with sdpa, batches and the KV cache.

A decoder-stage method (FastV, SparseVLM, ATP, ...) declares **prune points**: ``p`` means "drop
visual tokens from the input of decoder layer ``p``" (equivalently: from the output of layer
``p - 1``). At each point, during prefill, the method

1. says which query rows of layer ``p - 1``'s attention it needs (``score_rows``; e.g. the last
   prompt token for FastV, the text raters for SparseVLM, the visual and instruction rows for ATP),
2. receives those rows' post-softmax attention, averaged over heads, over every current key
   (``attention_rows``: computed as a side calculation from the q/k projections the layer already
   made, captured by forward hooks on ``q_proj`` / ``k_proj``; RoPE, causal and padding masks,
   softmax over all keys in float32; only the requested rows — never an L x L matrix for the whole
   model, never eager attention, never a second forward that writes to the cache). For ``p = 0``
   the rows are computed from layer 0's own projections of its input.
3. returns a ``Decision``: which visual tokens each sample keeps (ragged), optional tokens to
   insert (SparseVLM's recycled clusters) and, for training, a soft keep-mask.

The machinery then, per sample, gathers the survivors (original order; text is never dropped),
left-pads the batch to the longest sample (ragged counts), and from layer ``p`` on feeds every
layer its own ``attention_mask`` (causal + padding; None when a segment has no padding, so sdpa
keeps its ``is_causal`` fast path), ``position_ids`` and rotary embeddings: survivors keep their
**original** position ids by default (a method may ask for compacted positions, where the family
allows it: ``adapter.compact_positions``). Positions and the rotary function come from the
adapter's layout of the prefill (``adapter.lm_layout``: ``[B, L]`` for Llama-style rope, M-RoPE
``[3, B, L]``, written ``[*P, B, L]`` here): every row is gathered with the survivors, and each
layer's rotary tables are gathered from the previous layout's rows (or computed with the layout's
rotary function from its positions). Each layer's KV
cache therefore holds that layer's own length. During decoding each layer gets a mask over its own
cache (its prefill slots' validity followed by the generated tokens) and, when positions were
compacted, position ids shifted by its own offset, so decoding continues from the original
sequence length. Nothing is switched to eager attention: ``config._attn_implementation`` is never
touched.

How transformers drives this (``compat.py`` lists the assumptions and the releases checked; read in
``generation/utils.py``, ``masking_utils.py``, ``models/llama/modeling_llama.py``): ``generate``
computes ``position_ids`` from the 2D attention mask (cumsum) over the *original* sequence and
appends one per step, so positions continue from the original length by themselves; the model's own
causal mask is sized from layer 0's cache (``DynamicCache.get_mask_sizes``), which is right only
for layers that were not pruned — so every layer after a prune point gets its mask from here. A
forward without ``position_ids`` on a pruned cache gets them from here too (``LlamaModel`` would
derive them from layer 0's cache length).

Everything that changes per prefill lives in a typed ``DecoderState`` on the handle, reset at the
start of every prefill. The machinery only adds torch hooks (pre-hooks on the base model, the
language model and each decoder layer; forward hooks on the score layers' ``q_proj``/``k_proj``),
so ``handle.remove()`` restores the model exactly and module names / state dicts never change.

Prefill is detected as: the base model gets image tokens and the cache is empty (or absent).
Without a cache every forward is a prefill, and pruning is recomputed every time. When such a
forward *continues* the previous prompt (same pixel values, the previous input ids and mask as a
prefix — what ``generate(use_cache=False)`` does), only the previous prompt's tokens act as scoring
queries, so the selection is made "once at prefill" in both modes: uncached generation that
re-prunes at every step gives the same tokens as cached generation.

Outputs of a pruned forward (``logits``, ``last_hidden_state``) cover the final layer's tokens only
(left-padded per sample; the last column is still each sample's last token), so they are shorter
than ``input_ids``; ``handle.state.final_source`` maps each column back to its index in the input.
``labels=`` are gathered the same way (``integrations.attach``), so ``outputs.loss`` is the loss
over the kept tokens.

Not supported (yet): gradient checkpointing with hard pruning (the checkpointed layer re-runs its
hooks), static / offloaded caches, beam reorders across different samples, chunked prefill.
"""

from __future__ import annotations

from .attention import _rope, _soft_mask, attention_row_sums, attention_rows
from .handle import DecoderHandle, attach
from .protocol import Decision, DecoderMethod, DecoderMethodBase, LayerView, RowSums
from .state import DecoderState, DecoderStats, Segment

__all__ = [
    "LayerView",
    "Decision",
    "DecoderMethod",
    "DecoderMethodBase",
    "DecoderStats",
    "DecoderState",
    "DecoderHandle",
    "attention_rows",
    "attention_row_sums",
    "RowSums",
    "attach",
]
