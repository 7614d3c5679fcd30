"""Bookkeeping of a decoder-stage pruning: per-layer stats (``DecoderStats``), the token layouts shared
by the layers between two prune points (``Segment``) and the per-prefill state (``DecoderState``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..base import PruneStats
from ..layout import VisualLayout

_SOFT_EPS = 1e-6


@dataclass
class DecoderStats(PruneStats):
    """``PruneStats`` plus per-layer counts of the last prefill.

    ``visual_per_layer`` [B][num_layers]: visual tokens each decoder layer *processed* (its input);
    ``visual_after_layer``: visual tokens each layer *output* (after the pruning applied to it).
    ``avg_visual_tokens``: mean over samples and layers of ``visual_per_layer`` — the all-layer
    average the ATP paper reports (layers before the first prune point count the sample's whole unpruned visual tokens);
    ``avg_visual_tokens_output``: the same over output counts (SparseVLM's way of counting).
    ``kept_per_image`` (inherited) accumulates the per-sample all-layer averages.
    """

    num_layers: int = 0
    visual_per_layer: list[list[int]] = field(default_factory=list)
    visual_after_layer: list[list[int]] = field(default_factory=list)
    tokens_per_layer: list[list[int]] = field(default_factory=list)
    kept_at: dict[int, list[int]] = field(default_factory=dict)

    def record_layers(self, visual_in: list[list[int]], tokens_in: list[list[int]],
                      kept_at: dict[int, list[int]], unpruned: list[int] | None = None) -> None:
        """Record one prefill: visual_in / tokens_in [B][num_layers] counts (host lists); ``unpruned``
        [B] each sample's visual tokens before pruning."""
        self.num_layers = len(visual_in[0]) if visual_in else 0
        self.visual_per_layer = [list(r) for r in visual_in]
        self.visual_after_layer = [r[1:] + r[-1:] for r in visual_in]  # the last layer's output is never pruned
        self.tokens_per_layer = [list(r) for r in tokens_in]
        self.kept_at = dict(kept_at)
        self.record([sum(r) / len(r) for r in visual_in], unpruned)

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

    def padding_free(self) -> bool:
        """No padding in this layout: from the host counts once read, else read from the device."""
        if self.counts is not None:
            return all(v == self.length for v in self.counts[1])
        return bool(self.valid.all())

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
