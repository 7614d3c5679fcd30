"""The decoder-stage method protocol: what a method sees at a prune point (``LayerView``), what it
answers (``Decision``), and the interface the machinery drives (``DecoderMethod`` / ``DecoderMethodBase``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from torch import Tensor

from ..layout import VisualLayout


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


@dataclass
class RowSums:
    """What ``select`` gets when ``score_rows`` asked for weighted sums of the attention rows.

    ``sums`` [B, G, L] float32: sum_r weights[b, r, g] * A[b, r, :], A the head-mean post-softmax
    attention of the requested rows over the current keys; ``own`` [B, R] float32: A[b, r, rows[b, r]],
    each row's attention to its own column. Invalid rows count 0 in both.
    """

    sums: Tensor
    own: Tensor


@runtime_checkable
class DecoderMethod(Protocol):
    """The interface the machinery drives (see ``DecoderMethodBase`` for defaults)."""

    name: str
    positions: str  # "original" | "compact"

    def prune_layers(self, num_layers: int) -> list[int]: ...

    def prepare(self, embeds: Tensor, view: LayerView) -> Any: ...

    def score_rows(self, view: LayerView) -> tuple[Tensor, ...] | None: ...

    def select(self, view: LayerView, attn: Tensor | RowSums | None) -> Decision: ...


class DecoderMethodBase:
    """Defaults for a decoder-stage method object.

    ``prune_layers(num_layers)``: sorted prune points in [0, num_layers).
    ``prepare(embeds [B, L0, D], view)``: once per prefill, on the decoder's input embeddings.
    ``score_rows(view)``: ([B, R] long columns, [B, R] bool valid) of the query rows whose attention
    to every current key is needed, or None when no attention is needed; or (columns, valid,
    weights [B, R, G]) when only G weighted sums of those rows are needed (``RowSums``: the
    [B, R, L] rows are then never materialised); or (columns, valid, weights, bounds) with
    ``bounds`` R host ints, ``columns[b, i] < bounds[i]`` for every valid row i, so that each
    chunk of rows is scored over the keys it can attend to only (the causal triangle).
    ``select(view, attn)``: the ``Decision``; ``attn`` is [B, R, L] float32, a ``RowSums``, or None.
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

    def score_rows(self, view: LayerView) -> tuple[Tensor, ...] | None:
        return None

    def select(self, view: LayerView, attn: Tensor | RowSums | None) -> Decision:
        raise NotImplementedError
