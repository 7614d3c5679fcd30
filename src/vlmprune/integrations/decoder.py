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

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..methods.common import gather_rows, to_host_lists
from .base import ModelAdapter, PruneHandle, PruneStats, in_phase
from .compat import K, get_cache, layer_keys, output_cache
from .layout import VisualLayout

__all__ = [
    "LayerView",
    "Decision",
    "DecoderMethod",
    "DecoderMethodBase",
    "DecoderStats",
    "DecoderState",
    "DecoderHandle",
    "attention_rows",
    "attach",
]

_SOFT_EPS = 1e-6


# ================================================================================ method protocol


@dataclass
class LayerView:
    """What a method sees at prune point ``layer`` (tokens are dropped from that layer's input).

    All per-token tensors are [B, L] over the *current* layout (left-padded; L shrinks as tokens
    are dropped). ``hidden`` is the input of ``layer`` (= output of ``layer - 1``).
    """

    layer: int
    num_layers: int
    hidden: Tensor  # [B, L, D]
    valid: Tensor  # [B, L] bool: a real token (not padding)
    visual: Tensor  # [B, L] bool: an alive visual token (recycled ones included)
    recycled: Tensor  # [B, L] bool: a token inserted by a method (e.g. SparseVLM's merged clusters)
    after_image: Tensor  # [B, L] bool: a text token after the sample's last image token
    prompt: Tensor  # [B, L] bool: a token of the prompt (eligible as a scoring query)
    source: Tensor  # [B, L] long: index in the original (padded) input; -1 for padding / inserted
    positions: Tensor  # [*P, B, L] long: position ids the next layer uses, in the family's form
    # ([B, L] for Llama-style rope, [3, B, L] for M-RoPE: the adapter's ``lm_positions``)
    last: Tensor  # [B] long: column of each sample's last prompt token
    num_visual0: Tensor  # [B] long: visual tokens of each sample before any pruning
    context: Any = None  # what ``method.prepare`` returned for this prefill
    # the prefill's layout over the input columns (``adapter.lm_layout``; with its grids,
    # ``adapter.grid_layout``, when the method sets ``needs_grids``)
    layout: VisualLayout | None = None
    # (visual, valid) tokens of each row of this layout, on the host once read (None before the
    # prefill's first host read)
    counts: tuple[list[int], list[int]] | None = None
    # in ``prepare`` only: ``fetch(tensors) -> their tolist() values``, the method's start-of-prefill
    # host read, which brings the input layout's ``counts`` in the same transfer
    fetch: Callable[[list[Tensor]], list] | None = None


@dataclass
class Decision:
    """A method's answer at one prune point ([B, L] over the current layout).

    ``keep``: visual tokens to keep (entries at non-visual tokens are ignored: text is always kept).
    ``soft``: training-time soft keep in [0, 1] for visual tokens; multiplied into the cumulative
    mask, whose ``log(m + 1e-6)`` is added to the attention logits of those keys in every later
    layer (the query's own position is never masked). ``extra`` [B, E, D] with ``extra_valid``
    [B, E]: tokens inserted right after each sample's last alive visual token (they count as
    visual); ``extra_positions`` [*P, B, E]: their position ids (the family's form, as
    ``LayerView.positions``) when positions are kept original.
    ``info``: anything to record in ``handle.state.decisions`` (e.g. raters, cluster sizes); tensors
    there come to the host as lists in the prune point's one host read.
    ``counts``: per row, on the host, the visual tokens of the layout that ``keep`` keeps and the valid
    ``extra`` tokens, when the method knows them without reading the device; with the layout's own
    counts known (``LayerView.counts``) and no tensor in ``info``, the prune point then makes no host
    read. The method guarantees them, and that no row's last prompt token is a visual token it drops
    (the machinery keeps that token).
    """

    keep: Tensor | None = None
    soft: Tensor | None = None
    extra: Tensor | None = None
    extra_valid: Tensor | None = None
    extra_positions: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    counts: tuple[list[int], list[int]] | None = None


@runtime_checkable
class DecoderMethod(Protocol):
    """The interface the machinery drives (see ``DecoderMethodBase`` for defaults)."""

    name: str
    positions: str  # "original" | "compact"

    def prune_layers(self, num_layers: int) -> list[int]: ...

    def prepare(self, embeds: Tensor, view: LayerView) -> Any: ...

    def score_rows(self, view: LayerView) -> tuple[Tensor, Tensor] | None: ...

    def select(self, view: LayerView, attn: Tensor | None) -> Decision: ...


class DecoderMethodBase:
    """Defaults for a decoder-stage method object.

    ``prune_layers(num_layers)``: sorted prune points in [0, num_layers).
    ``prepare(embeds [B, L0, D], view)``: once per prefill, on the decoder's input embeddings.
    ``score_rows(view)``: ([B, R] long columns, [B, R] bool valid) of the query rows whose attention
    to every current key is needed, or None when no attention is needed.
    ``select(view, attn [B, R, L] float32 or None)``: the ``Decision``.
    ``needs_grids``: True when the method reads where each visual token lies on its image's grids
    (``LayerView.layout.grid_unit`` / ``grid_patch``, from ``adapter.grid_layout``).
    """

    name = "decoder-method"
    positions = "original"
    needs_grids = False

    def prune_layers(self, num_layers: int) -> list[int]:
        raise NotImplementedError

    def prepare(self, embeds: Tensor, view: LayerView) -> Any:
        return None

    def score_rows(self, view: LayerView) -> tuple[Tensor, Tensor] | None:
        return None

    def select(self, view: LayerView, attn: Tensor | None) -> Decision:
        raise NotImplementedError


# ================================================================================ attention rows


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama-style RoPE. x [B, H, T, Dh]; cos/sin [B, T, Dh]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def attention_rows(q: Tensor, k: Tensor | None, rows: Tensor, rows_valid: Tensor, cos: Tensor, sin: Tensor,
                   key_valid: Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float,
                   key_bias: Tensor | None = None, chunk: int = 256, roped_keys: Tensor | None = None) -> Tensor:
    """Post-softmax attention of selected query rows, averaged over heads, [B, R, L] float32.

    q [B, L, H*Dh] and k [B, L, Hkv*Dh] are the layer's projections *before* RoPE; rows [B, R]
    columns of the queries (rows_valid [B, R]); cos/sin [B or 1, L, Dh] the layer's rotary tables;
    key_valid [B, L] bool; key_bias [B, L] optional additive logit bias (soft masks). Causal by
    column index. ``roped_keys`` [B, Hkv, L, Dh]: the layer's keys after RoPE as the layer used
    them (its KV-cache entry); when given, ``k`` is not read and no key is re-rotated. Logits are
    computed in the keys' dtype (the model's), softmax in float32. Grouped-query heads share their
    key head without copies. Invalid rows are zero. Memory: [B, H, chunk, L] at a time.
    """
    bsz = rows.shape[0]
    cos = cos.expand(bsz, -1, -1)
    sin = sin.expand(bsz, -1, -1)
    if roped_keys is not None:
        kk = roped_keys  # [B, Hkv, L, Dh]
    else:
        length = k.shape[1]
        kk = k.view(bsz, length, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, L, Dh]
        kk = _rope(kk.float(), cos.float(), sin.float()).to(k.dtype)
    length = kk.shape[2]
    rep = num_heads // num_kv_heads
    cols = torch.arange(length, device=kk.device)
    out = []
    for start in range(0, rows.shape[1], chunk):
        r = rows[:, start:start + chunk].clamp(0, length - 1)  # [B, r]
        nr = r.shape[1]
        rv = rows_valid[:, start:start + chunk]
        qr = gather_rows(q, r).view(bsz, nr, num_heads, head_dim)
        cos_r, sin_r = gather_rows(cos, r).float(), gather_rows(sin, r).float()  # [B, r, Dh]
        qr = _rope(qr.transpose(1, 2).float(), cos_r, sin_r)  # [B, H, r, Dh]
        # heads h = g * rep + j use key head g: group the query heads by their key head
        qg = qr.to(kk.dtype).reshape(bsz, num_kv_heads, rep * nr, head_dim)  # [B, Hkv, rep*r, Dh]
        # keys as the left operand: [L, Dh] x [Dh, rep*r] keeps the long, contiguous side as the GEMM's M
        logits = torch.matmul(kk, qg.transpose(-1, -2)).transpose(-1, -2)  # [B, Hkv, rep*r, L]
        logits = logits.float().reshape(bsz, num_heads, nr, length) * scaling  # [B, H, r, L]
        if key_bias is not None:
            diag = cols[None, None, :] == r[:, :, None]  # own position is never masked
            logits = logits + torch.where(diag, 0.0, key_bias.float()[:, None, :])[:, None]
        allowed = key_valid[:, None, :] & (cols[None, None, :] <= r[:, :, None])  # [B, r, L]
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(1)  # [B, r, L]
        out.append(probs * rv[:, :, None])
    if not out:
        return torch.zeros((bsz, 0, length), dtype=torch.float32, device=kk.device)
    return torch.cat(out, dim=1)


# ================================================================================ stats and state


@dataclass
class DecoderStats(PruneStats):
    """``PruneStats`` plus per-layer counts of the last prefill.

    ``visual_per_layer`` [B][num_layers]: visual tokens each decoder layer *processed* (its input);
    ``visual_after_layer``: visual tokens each layer *output* (after the pruning applied to it).
    ``avg_visual_tokens``: mean over samples and layers of ``visual_per_layer`` — the all-layer
    average the ATP paper reports (layers before the first prune point count the full N);
    ``avg_visual_tokens_output``: the same over output counts (SparseVLM's way of counting).
    ``kept_per_image`` (inherited) accumulates the per-sample all-layer averages.
    """

    num_layers: int = 0
    visual_per_layer: list[list[int]] = field(default_factory=list)
    visual_after_layer: list[list[int]] = field(default_factory=list)
    tokens_per_layer: list[list[int]] = field(default_factory=list)
    kept_at: dict[int, list[int]] = field(default_factory=dict)

    def record_layers(self, visual_in: list[list[int]], tokens_in: list[list[int]],
                      kept_at: dict[int, list[int]]) -> None:
        """Record one prefill: visual_in / tokens_in [B][num_layers] counts (host lists)."""
        self.num_layers = len(visual_in[0]) if visual_in else 0
        self.visual_per_layer = [list(r) for r in visual_in]
        self.visual_after_layer = [r[1:] + r[-1:] for r in visual_in]  # the last layer's output is never pruned
        self.tokens_per_layer = [list(r) for r in tokens_in]
        self.kept_at = dict(kept_at)
        self.record([sum(r) / len(r) for r in visual_in])

    def visual_tokens_per_sample(self) -> list[float]:
        """All-layer average visual tokens of each sample in the last prefill (processed counts)."""
        return [float(v) for v in self.last_kept]

    def visual_tokens_per_layer(self) -> list[list[int]]:
        return [list(r) for r in self.visual_per_layer]

    def visual_tokens_output_per_sample(self) -> list[float]:
        return [sum(r) / len(r) for r in self.visual_after_layer] if self.visual_after_layer else []

    @property
    def avg_visual_tokens(self) -> float:
        v = self.visual_tokens_per_sample()
        return sum(v) / len(v) if v else math.nan

    @property
    def avg_visual_tokens_output(self) -> float:
        v = self.visual_tokens_output_per_sample()
        return sum(v) / len(v) if v else math.nan


@dataclass
class Segment:
    """One token layout, shared by the consecutive layers between two prune points."""

    first_layer: int
    source: Tensor  # [B, L] long
    valid: Tensor  # [B, L] bool
    visual: Tensor  # [B, L] bool
    recycled: Tensor  # [B, L] bool
    prompt: Tensor  # [B, L] bool
    after_image: Tensor  # [B, L] bool
    positions: Tensor  # [*P, B, L] long, the family's form (see ``LayerView.positions``)
    soft: Tensor | None  # [B, L] cumulative soft keep (visual keys), or None
    shift: Tensor  # [*P, B] long: original position of the last token minus this layout's
    identity: bool  # the untouched input layout: the model's own mask / rotary apply
    mask: Any = None  # prefill attention mask for this layout (None -> is_causal)
    pos_emb: tuple[Tensor, Tensor] | None = None
    counts: tuple[list[int], list[int]] | None = None  # (visual, valid) tokens per row, on the host once read
    shifted: bool | None = None  # whether ``shift`` is non-zero anywhere, once read (decode rotary)

    @property
    def all_valid(self) -> bool | None:
        """No padding in this layout (from the host counts), or None when they are not read yet."""
        return None if self.counts is None else all(v == self.length for v in self.counts[1])

    @property
    def length(self) -> int:
        return self.source.shape[1]

    def key_bias(self) -> Tensor | None:
        if self.soft is None:
            return None
        return torch.where(self.visual, torch.log(self.soft + _SOFT_EPS), torch.zeros_like(self.soft))


@dataclass
class DecoderState:
    """Per-handle mutable state; ``begin_prefill`` resets everything that belongs to one prefill."""

    phase: str = "idle"  # "idle" | "prefill" | "decode"
    # what the base-model pre-hook saw for the forward about to run
    pending_visual: Tensor | None = None
    pending_prompt_len: int | None = None
    pending_images: dict[str, Any] | None = None  # the base forward's image keywords (``needs_grids``)
    # the last fresh prompt (for continuation detection without a cache)
    prompt_ids: Tensor | None = None
    prompt_mask: Tensor | None = None
    prompt_image: Any = None  # what identifies the prompt's images (see _image_key)
    # one prefill
    orig_len: int = 0
    segments: list[Segment] = field(default_factory=list)
    layer_segment: list[int] = field(default_factory=list)
    captured: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    pos_emb_used: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    context: Any = None
    layout: VisualLayout | None = None  # the prefill's columns, positions and rotary (``adapter.lm_layout``)
    last_pos: Tensor | None = None  # [*P, B] original position of each sample's last token
    num_visual0: Tensor | None = None  # [B] visual tokens of each sample before any pruning
    span: list[int] | None = None  # compacted positions: each row's last position minus its first, once read
    decisions: dict[int, dict[str, Any]] = field(default_factory=dict)
    cache_ref: Any = None  # weakref to the prefill's cache
    final_source: Tensor | None = None  # [B, L_final] input index of each output column (-1: pad/inserted)
    step: dict[str, Any] = field(default_factory=dict)  # per decode step: masks / rotary per segment

    def begin_prefill(self) -> None:
        self.phase = "prefill"
        self.segments = []
        self.layer_segment = []
        self.captured = {}
        self.pos_emb_used = {}
        self.context = None
        self.layout = None
        self.span = None
        self.decisions = {}
        self.cache_ref = None
        self.final_source = None
        self.step = {}

    @property
    def current(self) -> Segment:
        return self.segments[-1]


# ================================================================================ the handle


class DecoderHandle(PruneHandle):
    """Handle of a decoder-stage pruning: ``.stats`` (``DecoderStats``), ``.state``, ``.remove()``."""

    stats_class = DecoderStats

    def __init__(self, model: Any, adapter: ModelAdapter, method: str, method_obj: Any) -> None:
        base = adapter.base_model(model)
        lm = adapter.get_language_model(model)
        layers = adapter.get_decoder_layers(model)
        num_layers = len(layers)
        points = sorted(set(int(p) for p in method_obj.prune_layers(num_layers)))
        if not points:
            raise ValueError(f"{method!r} has no prune points for a {num_layers}-layer decoder")
        if points[0] < 0 or points[-1] >= num_layers:
            raise ValueError(f"{method!r}: prune points {points} must lie in [0, {num_layers - 1}] "
                             f"(point p drops tokens from the input of decoder layer p)")
        if method_obj.positions not in ("original", "compact"):
            raise ValueError(f"positions must be 'original' or 'compact', got {method_obj.positions!r}")
        rotary = adapter.rotary(model)
        if rotary is None:
            raise ValueError(f"{type(lm).__name__} has no rotary_emb; decoder-stage pruning needs RoPE")
        super().__init__(model, adapter, method, method_obj, "decoder")  # marks the model as pruned
        self.state = DecoderState()
        self.base, self.lm, self.layers, self.num_layers = base, lm, layers, num_layers
        self.rotary = rotary
        #: the position rule in force: the method's, unless the family keeps original positions only
        #: (``adapter.compact_positions`` False, e.g. M-RoPE: survivors keep their own 3-D positions)
        self.positions = method_obj.positions if adapter.compact_positions else "original"
        self.image_token_id = adapter.image_token_id(model)
        self.embed = adapter.get_input_embeddings(model)
        self.points = points
        self.stats.tokens_per_image = adapter.fixed_image_tokens(model)
        attn0 = self.layers[0].self_attn
        self.num_heads = int(getattr(attn0.config, "num_attention_heads"))
        self.head_dim = int(attn0.head_dim)
        self.num_kv_heads = self.num_heads // int(getattr(attn0, "num_key_value_groups", 1))
        self.scaling = float(attn0.scaling)
        self._install()

    # ---------------------------------------------------------------- hooks
    def _install(self) -> None:
        self.add_hook(self.base.register_forward_pre_hook(self._base_pre_hook, with_kwargs=True))
        self.add_hook(self.lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True))
        self.add_hook(self.lm.register_forward_hook(self._lm_post_hook, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self.add_hook(layer.register_forward_pre_hook(self._make_layer_pre_hook(i), with_kwargs=True))
        for p in self.points:
            if p >= 1:
                attn = self.layers[p - 1].self_attn
                self.add_hook(attn.q_proj.register_forward_hook(self._make_capture(p - 1, "q")))
                self.add_hook(attn.k_proj.register_forward_hook(self._make_capture(p - 1, "k")))

    def _make_capture(self, layer: int, which: str):
        state = self.state

        def hook(module, args, output):
            if state.phase == "prefill":
                state.captured.setdefault(layer, {})[which] = output
        return hook

    def _base_pre_hook(self, module, args, kwargs):
        """Base multimodal model: find each sample's image tokens (and whether the prompt continues)."""
        st = self.state
        ids = kwargs.get(K.INPUT_IDS, args[0] if args else None)
        embeds = kwargs.get(K.INPUTS_EMBEDS)
        pixels = kwargs.get(K.PIXEL_VALUES)
        mask = kwargs.get(K.ATTENTION_MASK)
        cache = get_cache(kwargs)
        st.pending_visual, st.pending_prompt_len = None, None
        ref = ids if ids is not None else embeds
        if (kwargs.get(K.POSITION_IDS) is None and ref is not None and cache is not None and st.cache_ref is not None
                and st.cache_ref() is cache and ref.shape[0] == st.segments[0].source.shape[0]):
            # a decode step on the pruned cache without positions: the base model would derive them
            # from layer 0's (possibly pruned) cache length; give it the original continuation
            positions = self._decode_positions(self._appended(cache), ref.shape[1], ref.device)
            return args, {**kwargs, K.POSITION_IDS: positions}
        if ids is not None:
            visual = self.adapter.visual_columns(self.model, ids)
        elif embeds is not None:
            tok = self.embed(torch.tensor(self.image_token_id, device=embeds.device))
            visual = (embeds == tok.to(embeds.dtype)).all(-1)
        else:
            return None
        if visual.shape[1] <= 1:
            return None
        if _image_key(pixels, kwargs.get(K.MM_ENCODER_OUTPUTS)) is None and not bool(visual.any()):
            return None  # no image passed and no placeholder (with images, the model checks the placeholders)
        if cache is not None and cache.get_seq_length() > 0:
            return None  # a continuation on a filled cache: not a prefill we prune
        st.pending_visual = visual
        if getattr(self.method_obj, "needs_grids", False):
            names = (K.PIXEL_VALUES, K.IMAGE_SIZES, K.MM_ENCODER_OUTPUTS, *self.adapter.image_geometry)
            st.pending_images = {name: kwargs.get(name) for name in names}
        # continuation of the previous prompt without a cache (generate(use_cache=False))?
        image = _image_key(pixels, kwargs.get(K.MM_ENCODER_OUTPUTS))
        plen = None
        if ids is not None and st.prompt_ids is not None and image is not None and st.prompt_image is not None:
            old_ids = st.prompt_ids
            n = old_ids.shape[1]
            if (ids.shape[0] == old_ids.shape[0] and ids.shape[1] > n and torch.equal(ids[:, :n], old_ids)
                    and _same_image(image, st.prompt_image)
                    and (mask is None) == (st.prompt_mask is None)
                    and (mask is None or torch.equal(mask[:, :n], st.prompt_mask))):
                plen = n
        if plen is None:
            st.prompt_ids = ids.clone() if ids is not None else None
            st.prompt_mask = mask.clone() if mask is not None else None
            st.prompt_image = image
        st.pending_prompt_len = plen
        return None

    def _lm_pre_hook(self, module, args, kwargs):
        st = self.state
        embeds = kwargs.get(K.INPUTS_EMBEDS)
        cache = get_cache(kwargs)
        visual, plen, images = st.pending_visual, st.pending_prompt_len, st.pending_images
        st.pending_visual, st.pending_prompt_len, st.pending_images = None, None, None
        if embeds is None:
            st.phase = "idle"
            return None
        if visual is not None and visual.shape == embeds.shape[:2] and (cache is None or cache.get_seq_length() == 0):
            self._begin_prefill(embeds, kwargs.get(K.ATTENTION_MASK), kwargs.get(K.POSITION_IDS), visual, plen,
                                images)
            return None
        if (st.cache_ref is not None and cache is not None and st.cache_ref() is cache
                and embeds.shape[0] == st.segments[0].source.shape[0]):
            st.phase = "decode"
            return self._begin_decode_step(args, kwargs, embeds, cache)
        st.phase = "idle"
        st.cache_ref = None
        return None

    def _lm_post_hook(self, module, args, kwargs, output):
        st = self.state
        if st.phase == "prefill":
            self._finish_prefill(output)
        elif st.phase == "decode":
            st.step = {}
        return None

    def _make_layer_pre_hook(self, idx: int):
        def hook(module, args, kwargs):
            st = self.state
            if st.phase == "prefill":
                return self._prefill_layer(idx, args, kwargs)
            if st.phase == "decode":
                return self._decode_layer(idx, args, kwargs)
            return None
        return hook

    # ---------------------------------------------------------------- prefill
    @in_phase("prefill")
    def _begin_prefill(self, embeds: Tensor, mask2d: Tensor | None, position_ids: Tensor | None,
                       visual: Tensor, prompt_len: int | None, images: dict[str, Any] | None = None) -> None:
        st = self.state
        st.begin_prefill()
        bsz, length = embeds.shape[:2]
        dev = embeds.device
        cols = torch.arange(length, device=dev)
        valid = mask2d.bool() if mask2d is not None else torch.ones(bsz, length, dtype=torch.bool, device=dev)
        if valid.shape != (bsz, length):
            valid = valid[:, -length:]
        source = torch.where(valid, cols[None, :], torch.full_like(cols[None, :], -1)).expand(bsz, length)
        visual = visual.to(dev) & valid
        # the family's positions ([B, L] or M-RoPE [3, B, L]) and rotary function, from the adapter
        st.layout = self.adapter.lm_layout(self.model, visual, position_ids, self.rotary)
        if getattr(self.method_obj, "needs_grids", False):
            st.layout = self.adapter.grid_layout(self.model, st.layout, embeds, images or {})
        positions = st.layout.positions
        last_vis = _last_true(visual)  # [B]
        after = valid & ~visual & (cols[None, :] > last_vis[:, None]) & (last_vis[:, None] >= 0)
        prompt = valid if prompt_len is None else valid & (cols[None, :] < prompt_len)
        root = Segment(first_layer=0, source=source, valid=valid, visual=visual,
                       recycled=torch.zeros_like(visual), prompt=prompt, after_image=after, positions=positions,
                       soft=None, shift=torch.zeros_like(positions[..., -1]), identity=True, shifted=False)
        st.segments = [root]
        st.layer_segment = [0] * self.num_layers
        st.orig_len = length
        st.last_pos = positions[..., -1].clone()
        st.num_visual0 = visual.sum(1)
        if getattr(type(self.method_obj), "prepare", None) is not DecoderMethodBase.prepare:  # skip the no-op
            view = self._view(0, embeds, root)
            view.fetch = self._start_fetch(root, view)
            st.context = self.method_obj.prepare(embeds, view)

    def _start_fetch(self, root: Segment, view: LayerView) -> Callable[[list[Tensor]], list]:
        """``LayerView.fetch`` for ``prepare``: the method's tensors, the input layout's counts and (with
        compacted positions) each row's last position minus its first, in one host transfer."""
        def fetch(tensors: list[Tensor]) -> list:
            own = [root.visual.sum(1), root.valid.sum(1)]
            span = self.positions == "compact" and root.positions.dim() == 2
            if span:
                own.append(self.state.last_pos - _first_position(root))
            host = to_host_lists([*own, *tensors])
            root.counts = view.counts = (host[0], host[1])
            if span:
                self.state.span = host[2]
            return host[len(own):]
        return fetch

    def _view(self, layer: int, hidden: Tensor, seg: Segment) -> LayerView:
        last = _last_true(seg.prompt).clamp(min=0)
        n0 = self.state.num_visual0
        return LayerView(layer=layer, num_layers=self.num_layers, hidden=hidden, valid=seg.valid, visual=seg.visual,
                         recycled=seg.recycled, after_image=seg.after_image, prompt=seg.prompt, source=seg.source,
                         positions=seg.positions, last=last, num_visual0=n0, context=self.state.context,
                         layout=self.state.layout, counts=seg.counts)

    @in_phase("prefill")
    def _prefill_layer(self, idx: int, args: tuple, kwargs: dict):
        st = self.state
        hidden = args[0] if args else kwargs[K.HIDDEN_STATES]
        if idx == 0 or st.current.identity:
            # the model's own mask / rotary are right for the untouched layout
            root = st.segments[0]
            if root.pos_emb is None:
                root.pos_emb = kwargs.get(K.POSITION_EMBEDDINGS)
                root.mask = kwargs.get(K.ATTENTION_MASK)
        if idx in self.points:
            hidden = self._prune(idx, hidden, get_cache(kwargs))
        seg = st.current
        st.layer_segment[idx] = len(st.segments) - 1
        st.pos_emb_used[idx] = seg.pos_emb
        if seg.identity:
            return None
        kwargs = dict(kwargs)
        kwargs[K.ATTENTION_MASK] = seg.mask
        kwargs[K.POSITION_EMBEDDINGS] = seg.pos_emb
        kwargs[K.POSITION_IDS] = self.adapter.layer_position_ids(seg.positions)
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs[K.HIDDEN_STATES] = hidden
        return args, kwargs

    @in_phase("score")
    def _scores(self, p: int, hidden: Tensor, seg: Segment, rows: Tensor, rows_valid: Tensor,
                cache: Any = None) -> Tensor:
        """[B, R, L] head-mean attention of layer p-1 (or layer 0 on its input when p == 0).

        Layer p-1's rotated keys are read from its KV-cache entry when there is one (no key is
        recomputed); without a cache they are re-rotated from the captured ``k_proj`` output.
        """
        st = self.state
        roped = None
        if p == 0:
            layer = self.layers[0]
            normed = layer.input_layernorm(hidden)
            q = layer.self_attn.q_proj(normed)
            k = layer.self_attn.k_proj(normed)
            cos, sin = seg.pos_emb
        else:
            cap = st.captured.get(p - 1, {})
            if "q" not in cap or "k" not in cap:
                raise RuntimeError(f"q/k of decoder layer {p - 1} were not captured; is the model's attention "
                                   "module laid out as expected (self_attn.q_proj / k_proj)?")
            q, k = cap["q"], cap["k"]
            cos, sin = st.pos_emb_used[p - 1]
            roped = layer_keys(cache, p - 1, (k.shape[0], self.num_kv_heads, seg.length, self.head_dim))
        return attention_rows(q, k, rows, rows_valid, cos, sin, seg.valid, num_heads=self.num_heads,
                              num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, scaling=self.scaling,
                              key_bias=seg.key_bias(), roped_keys=roped)

    def _prune(self, p: int, hidden: Tensor, cache: Any = None) -> Tensor:
        st = self.state
        seg = st.current
        view = self._view(p, hidden, seg)
        req = self.method_obj.score_rows(view)
        attn = None
        if req is not None:
            rows, rows_valid = req
            attn = self._scores(p, hidden, seg, rows.to(hidden.device), rows_valid.to(hidden.device), cache)
        st.captured.pop(p - 1, None)  # free the projections
        with self.phase("select"):
            dec = self.method_obj.select(view, attn)
        new_hidden, new_seg, info = self._apply_decision(p, hidden, seg, dec)
        st.decisions[p] = {**dec.info, **info, "kept": new_seg.counts[0]}
        if new_seg is not seg:
            st.segments.append(new_seg)
        return new_hidden

    @in_phase("gather")
    def _apply_decision(self, p: int, hidden: Tensor, seg: Segment,
                        dec: Decision) -> tuple[Tensor, Segment, dict[str, Any]]:
        """Apply ``dec`` at prune point ``p``: (new hidden, new segment, ``dec.info``'s tensors as host lists)."""
        bsz, length = seg.source.shape
        dev = hidden.device
        keep = seg.valid.clone() if dec.keep is None else (seg.valid & (dec.keep.to(dev).bool() | ~seg.visual))
        # each sample's last prompt token stays (it produces the next-token logits)
        cols = torch.arange(length, device=dev)
        keep |= (cols[None, :] == _last_true(seg.prompt)[:, None]) & seg.valid
        soft = seg.soft
        if dec.soft is not None:
            s = torch.where(seg.visual, dec.soft.to(dev, torch.float32), torch.ones_like(dec.soft, dtype=torch.float32))
            soft = s if soft is None else soft * s
        n_extra = 0 if dec.extra is None else dec.extra.shape[1]
        ev = None
        if n_extra:
            ev = dec.extra_valid.to(dev).bool() if dec.extra_valid is not None else \
                torch.ones(bsz, n_extra, dtype=torch.bool, device=dev)
        compact = self.positions == "compact"
        base = _first_position(seg) if compact else None  # [*P, B]
        names = [k for k, v in dec.info.items() if isinstance(v, Tensor)]
        if (dec.counts is not None and seg.counts is not None and not names
                and (not compact or self.state.span is not None)):
            # the method's host counts: no host read at this point
            kept, inserted = dec.counts
            counts = ([k + e for k, e in zip(kept, inserted)],
                      [t - v + k + e for t, v, k, e in zip(seg.counts[1], seg.counts[0], kept, inserted)])
            new_len, min_len = max(counts[1]), min(counts[1])
            dropped = any(k < v for k, v in zip(kept, seg.counts[0]))
            shifted = compact and any(s != max(n - 1, 0) for s, n in zip(self.state.span, counts[1]))
            info = {}
        else:
            n_new = keep.sum(1) + (ev.sum(1) if n_extra else 0)  # [B] tokens of the new layout
            vis_new = (keep & seg.visual).sum(1) + (ev.sum(1) if n_extra else 0)  # [B] visual tokens of the new layout
            # the prune point's one host synchronisation: new width, narrowest sample, anything dropped, whether
            # compacted positions end before the original last one (decode rotary), the new layout's counts (and
            # the first layout's), and the method's recorded tensors
            flags = [n_new.max(), n_new.min(), (seg.valid & ~keep).any().long()]
            if compact:  # the new layout's last position is base + n_new - 1 (its last column is valid)
                flags.append((self.state.last_pos - base - (n_new - 1).clamp(min=0) != 0).any().long())
            first = [seg.visual.sum(1), seg.valid.sum(1)] if seg.counts is None else []
            host = to_host_lists([torch.stack(flags), vis_new, n_new, *first, *(dec.info[k] for k in names)])
            (new_len, min_len, dropped), counts = host[0][:3], (host[1], host[2])
            shifted = compact and bool(host[0][3])
            if first:
                seg.counts = (host[3], host[4])
            info = dict(zip(names, host[3 + len(first):]))
        if not dropped and n_extra == 0:
            if soft is seg.soft:
                return hidden, seg, info
            new = Segment(first_layer=p, source=seg.source, valid=seg.valid, visual=seg.visual,
                          recycled=seg.recycled, prompt=seg.prompt, after_image=seg.after_image,
                          positions=seg.positions, soft=soft, shift=seg.shift, identity=False, counts=counts,
                          shifted=seg.shifted)
            self._finish_segment(new, hidden)
            return hidden, new, info

        cols = torch.arange(length, device=dev)
        key = torch.where(keep, cols[None, :] * 2, torch.full_like(cols[None, :], -1)).expand(bsz, length)
        cand = [hidden]
        source, valid, visual, recycled = [seg.source], [keep], [seg.visual], [seg.recycled]
        prompt, after, positions = [seg.prompt], [seg.after_image], [seg.positions]  # positions: [*P, B, *]
        softs = [soft] if soft is not None else None
        if n_extra:
            # insert after each sample's last visual token (of the layout before dropping)
            last_vis = _last_true(seg.visual)
            ekey = torch.where(ev, (last_vis * 2 + 1)[:, None].expand(bsz, n_extra), torch.full_like(ev, -1, dtype=torch.long))
            key = torch.cat([key, ekey], dim=1)
            cand.append(dec.extra.to(hidden.dtype))
            source.append(torch.full((bsz, n_extra), -1, dtype=torch.long, device=dev))
            valid.append(ev)
            visual.append(ev)
            recycled.append(ev)
            prompt.append(ev)
            after.append(torch.zeros_like(ev))
            if dec.extra_positions is not None:
                positions.append(dec.extra_positions.to(dev).long())
            else:
                positions.append(_take_positions(seg.positions, last_vis.clamp(min=0)[:, None].expand(bsz, n_extra)))
            if softs is not None:
                softs.append(torch.ones(bsz, n_extra, dtype=torch.float32, device=dev))
        order = torch.sort(key, dim=1, stable=True).indices[:, -new_len:]  # pads (-1) first, then in order

        def take(parts: list[Tensor]) -> Tensor:
            t = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            return t.gather(1, order)

        h = torch.cat(cand, dim=1) if n_extra else hidden
        new_hidden = gather_rows(h, order)  # [B, L', D]
        new_valid = take(valid)
        new_source = torch.where(new_valid, take(source), -1)
        new_visual = take(visual) & new_valid
        new_positions = _take_positions(torch.cat(positions, dim=-1) if n_extra else seg.positions, order)
        if compact:
            new_positions = torch.where(new_valid, base[..., None] + new_valid.long().cumsum(1) - 1, base[..., None])
        new = Segment(first_layer=p, source=new_source, valid=new_valid, visual=new_visual,
                      recycled=take(recycled) & new_valid, prompt=take(prompt) & new_valid,
                      after_image=take(after) & new_valid, positions=new_positions,
                      soft=take(softs) if softs is not None else None,
                      shift=(self.state.last_pos - new_positions[..., -1]) if compact
                      else torch.zeros_like(seg.shift), identity=False, counts=counts, shifted=shifted)
        pos_emb = None
        if n_extra == 0 and self.positions == "original" and seg.pos_emb is not None:
            # survivors keep their positions, so their rotary rows are the old layout's rows
            pos_emb = tuple(gather_rows(t.expand(bsz, -1, -1), order) for t in seg.pos_emb)
        self._finish_segment(new, new_hidden, all_valid=min_len == new_len, pos_emb=pos_emb)
        return new_hidden, new, info

    @in_phase("masks")
    def _finish_segment(self, seg: Segment, hidden: Tensor, all_valid: bool | None = None,
                        pos_emb: tuple[Tensor, Tensor] | None = None) -> None:
        """Prefill attention mask and rotary tables of a new layout (``all_valid``: no padding, if
        known; ``pos_emb``: its rotary tables, if known, else computed from its positions)."""
        length = seg.length
        bias = seg.key_bias()
        if bias is None:
            if bool(seg.valid.all()) if all_valid is None else all_valid:
                seg.mask = None  # sdpa's is_causal path
            else:
                causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
                seg.mask = causal[None, None] & seg.valid[:, None, None, :]
        else:
            seg.mask = _soft_mask(seg.valid, bias, hidden.dtype, q_len=length, past=0)
        seg.pos_emb = pos_emb if pos_emb is not None else self.state.layout.rotary(hidden, position_ids=seg.positions)

    @in_phase("prefill")
    def _finish_prefill(self, output: Any) -> None:
        st = self.state
        cache = output_cache(output)
        st.cache_ref = weakref.ref(cache) if cache is not None else None
        st.phase = "idle"
        st.captured = {}
        st.pos_emb_used = {}
        st.final_source = st.current.source
        # per-segment counts, read at the prune points' synchronisations (one transfer if no point ran)
        missing = [seg for seg in st.segments if seg.counts is None]
        if missing:
            host = to_host_lists([t for seg in missing for t in (seg.visual.sum(1), seg.valid.sum(1))])
            for i, seg in enumerate(missing):
                seg.counts = (host[2 * i], host[2 * i + 1])
        per_layer = [st.segments[s].counts for s in st.layer_segment]
        vis = [[c[0][b] for c in per_layer] for b in range(len(per_layer[0][0]))]  # [B][layers]
        tok = [[c[1][b] for c in per_layer] for b in range(len(per_layer[0][0]))]
        kept_at = {p: d["kept"] for p, d in st.decisions.items()}
        self.stats.record_layers(vis, tok, kept_at)

    # ---------------------------------------------------------------- decode
    def _appended(self, cache: Any) -> int:
        """Tokens appended since the prefill, read from the last layer's cache (its own length)."""
        st = self.state
        return cache.get_seq_length(self.num_layers - 1) - st.segments[st.layer_segment[-1]].length

    def _decode_positions(self, past_new: int, q_len: int, device: Any) -> Tensor:
        """[*P, B, q_len] positions of the next decode tokens in the family's form: after the
        original (unpruned) last position, counting the ``past_new`` tokens appended since the prefill."""
        return (self.state.last_pos.to(device) + 1 + past_new)[..., None] + torch.arange(q_len, device=device)

    @in_phase("decode")
    def _begin_decode_step(self, args: tuple, kwargs: dict, embeds: Tensor, cache: Any):
        st = self.state
        q_len = embeds.shape[1]
        mask2d = kwargs.get(K.ATTENTION_MASK)
        past_new = self._appended(cache)
        bsz = embeds.shape[0]
        dev = embeds.device
        if mask2d is not None and mask2d.dim() == 2 and mask2d.shape[1] == st.orig_len + past_new + q_len:
            tail = mask2d[:, st.orig_len:].to(dev).bool()
            tail_full = None  # read once, at the step's first pruned layer that can use it
        else:
            tail = torch.ones(bsz, past_new + q_len, dtype=torch.bool, device=dev)
            tail_full = True
        pos = kwargs.get(K.POSITION_IDS)
        new_kwargs = None
        if pos is None:
            pos = self._decode_positions(past_new, q_len, dev)  # after the original last position, [*P, B, q]
            new_kwargs = dict(kwargs)
            new_kwargs[K.POSITION_IDS] = pos
        else:
            pos = self.adapter.lm_positions(pos, bsz, q_len, dev)  # the family's form, [*P, B, q]
        st.step = {"q_len": q_len, "past_new": past_new, "tail": tail, "tail_full": tail_full, "pos": pos,
                   "mask": {}, "rot": {}}
        if new_kwargs is not None:
            return args, new_kwargs
        return None

    @in_phase("decode")
    def _decode_layer(self, idx: int, args: tuple, kwargs: dict):
        st = self.state
        s = st.layer_segment[idx]
        seg = st.segments[s]
        if seg.identity:
            return None
        step = st.step
        if s not in step["mask"]:
            key_valid = torch.cat([seg.valid, step["tail"]], dim=1)
            bias = seg.key_bias()
            if bias is None and step["q_len"] == 1 and self._no_padding(seg, step):
                step["mask"][s] = None
            elif bias is None:
                q_len, kv = step["q_len"], key_valid.shape[1]
                limit = seg.length + step["past_new"] + torch.arange(q_len, device=key_valid.device)
                causal = torch.arange(kv, device=key_valid.device)[None, :] <= limit[:, None]
                step["mask"][s] = causal[None, None] & key_valid[:, None, None, :]
            else:
                full_bias = torch.cat([bias, torch.zeros_like(step["tail"], dtype=bias.dtype)], dim=1)
                step["mask"][s] = _soft_mask(key_valid, full_bias, args[0].dtype if args else
                                             kwargs[K.HIDDEN_STATES].dtype, q_len=step["q_len"],
                                             past=seg.length + step["past_new"])
            if seg.shifted is None:
                seg.shifted = bool((seg.shift != 0).any())  # once per layout, not per step
            if seg.shifted:
                hidden = args[0] if args else kwargs[K.HIDDEN_STATES]
                step["rot"][s] = st.layout.rotary(hidden, position_ids=step["pos"] - seg.shift[..., None])
            else:
                step["rot"][s] = None
        kwargs = dict(kwargs)
        kwargs[K.ATTENTION_MASK] = step["mask"][s]
        if step["rot"][s] is not None:
            kwargs[K.POSITION_EMBEDDINGS] = step["rot"][s]
            kwargs[K.POSITION_IDS] = self.adapter.layer_position_ids(step["pos"] - seg.shift[..., None])
        return args, kwargs

    @staticmethod
    def _no_padding(seg: Segment, step: dict[str, Any]) -> bool:
        """No padding among a decode step's keys of ``seg``: the layout's (host counts) and the new tokens'
        (the step's mask tail, read at most once per step)."""
        valid = seg.all_valid
        if valid is None:
            valid = bool(seg.valid.all())
        if not valid:
            return False
        if step["tail_full"] is None:
            step["tail_full"] = bool(step["tail"].all())
        return step["tail_full"]

    def remove(self) -> None:
        super().remove()
        self.state = DecoderState()


def _take_positions(positions: Tensor, order: Tensor) -> Tensor:
    """positions [*P, B, L] (any family form), columns order [B, L'] -> [*P, B, L'] (same columns per row)."""
    return positions.gather(-1, order.expand(*positions.shape[:-2], *order.shape))


def _first_position(seg: Segment) -> Tensor:
    """[*P, B] each row's smallest position over the layout's valid tokens (0 for a row with none)."""
    base = torch.where(seg.valid, seg.positions, torch.full_like(seg.positions, 1 << 40)).amin(-1)
    return torch.where(base == (1 << 40), 0, base)


def _last_true(mask: Tensor) -> Tensor:
    """[B, L] bool -> [B] long column of each row's last True (-1 when none)."""
    cols = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, cols, -1).amax(1)


def _image_key(pixels: Any, mm_outputs: Any) -> tuple | None:
    """What identifies a forward's images: the pixel tensor (and its in-place version counter), or the
    precomputed encoder outputs ``generate`` passes on every step (transformers >= 5 encodes once)."""
    if pixels is not None:
        return ("pixels", pixels, pixels._version)
    image = mm_outputs.get("image") if isinstance(mm_outputs, dict) else None
    if image is not None:
        return ("encoded", image)
    return None


def _same_image(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "encoded":
        return a[1] is b[1]
    if a[1] is b[1]:
        return a[2] == b[2]
    return a[1].shape == b[1].shape and bool(torch.equal(a[1], b[1]))


def _soft_mask(key_valid: Tensor, bias: Tensor, dtype: torch.dtype, *, q_len: int, past: int) -> Tensor:
    """Float additive mask [B, 1, q, kv]: bias on allowed keys (0 on the query's own key), min elsewhere.

    Queries are the last ``q_len`` slots: query i sits at key index ``past + i``.
    """
    kv = key_valid.shape[1]
    dev = key_valid.device
    qi = past + torch.arange(q_len, device=dev)
    kj = torch.arange(kv, device=dev)
    allowed = (kj[None, :] <= qi[:, None])[None] & key_valid[:, None, :]  # [B, q, kv]
    own = (kj[None, :] == qi[:, None])[None]
    vals = torch.where(own, torch.zeros((), dtype=bias.dtype, device=dev), bias[:, None, :])
    neg = torch.finfo(dtype).min
    return torch.where(allowed, vals.to(dtype), torch.full((), neg, dtype=dtype, device=dev))[:, None]


# ================================================================================ attach


def attach(model: Any, adapter: ModelAdapter, info: Any, method_obj: Any) -> DecoderHandle:
    """Install ``method_obj`` (a ``DecoderMethod``) on ``model``; returns the handle."""
    for attr in ("prune_layers", "select", "score_rows", "prepare", "positions"):
        if not hasattr(method_obj, attr):
            raise TypeError(f"{type(method_obj).__name__} is not a decoder-stage method (missing {attr!r}); "
                            "subclass vlmprune.integrations.decoder.DecoderMethodBase")
    name = getattr(info, "name", None) or getattr(method_obj, "name", "decoder-method")
    # a method may bring its own handle subclass (e.g. ATP: richer stats, extra checks at attach)
    handle_class = getattr(method_obj, "handle_class", None) or DecoderHandle
    if not (isinstance(handle_class, type) and issubclass(handle_class, DecoderHandle)):
        raise TypeError(f"{type(method_obj).__name__}.handle_class must be a DecoderHandle subclass, "
                        f"got {handle_class!r}")
    return handle_class(model, adapter, name, method_obj)
