"""Builders for the decoder-stage methods (``fastv``, ``sparsevlm``): validate options, build the method object.

Each builder returns a ``DecoderMethodBase`` subclass that the decoder machinery
(``vlmprune.integrations.decoder``) drives: it names its prune points, asks for attention rows and
turns them into a ``Decision`` with the pure tensor code of ``vlmprune.methods.fastv`` /
``vlmprune.methods.sparsevlm``. Options are validated here and bad values raise ``ValueError``
saying what to pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..methods import fastv as fv
from ..methods import sparsevlm as sv
from ..methods.common import is_int, is_real, pack_mask, to_host
from .decoder import Decision, DecoderMethodBase, LayerView

__all__ = ["FastV", "SparseVLM", "build_fastv", "build_sparsevlm"]


# ================================================================================ FastV


class FastV(DecoderMethodBase):
    """FastV: drop visual tokens from the input of layer ``k`` by layer ``k - 1``'s attention."""

    name = "fastv"
    positions = "original"

    def __init__(self, k: int = 2, drop_ratio: float = 0.5, count: int | None = None, budget: float | None = None,
                 score: str = "last") -> None:
        self.k, self.drop_ratio, self.count, self.budget, self.score = k, drop_ratio, count, budget, score

    def prune_layers(self, num_layers: int) -> list[int]:
        if self.k >= num_layers:
            raise ValueError(f"fastv: k={self.k} must be smaller than the decoder's {num_layers} layers")
        n = getattr(self, "_num_tokens", None)  # set by check_budget, which attach calls first
        if self.budget is not None and n is not None:
            lowest = (self.k * n + (num_layers - self.k)) / num_layers  # one token kept from layer k on
            if self.budget < lowest:
                raise ValueError(f"fastv: budget={self.budget:g} is below the lowest all-layer average reachable "
                                 f"with k={self.k} on this {num_layers}-layer decoder ({lowest:.1f}: layers before k "
                                 f"see all {n} tokens); pass a smaller k or budget >= {lowest:.1f}")
        return [self.k]

    def score_rows(self, view: LayerView, width: int | None = None) -> tuple[Tensor, Tensor]:
        """The last prompt token's row, or every prompt row (``width``: their most per sample, if known)."""
        if self.score == "last":
            rows = view.last[:, None]
            return rows, torch.ones_like(rows, dtype=torch.bool)
        return pack_mask(view.prompt & view.valid, width)

    def check_budget(self, num_tokens: int) -> None:
        """``count`` / ``budget`` must not exceed the model's visual tokens per image (remembered for the
        budget's lower bound, checked in ``prune_layers`` once the decoder's depth is known)."""
        self._num_tokens = num_tokens
        for name, value in (("count", self.count), ("budget", self.budget)):
            if value is not None and value > num_tokens:
                raise ValueError(f"fastv: {name}={value:g} is more than the {num_tokens} visual tokens per image of "
                                 f"this model; pass {name} <= {num_tokens}")

    def keep_counts(self, view: LayerView) -> Tensor:
        n = view.visual.sum(1)
        if self.count is not None:
            return torch.minimum(torch.full_like(n, self.count), n)
        if self.budget is not None:
            return fv.keep_count_budget(n, self.budget, self.k, view.num_layers)
        return fv.keep_count_ratio(n, self.drop_ratio)

    def select(self, view: LayerView, attn: Tensor | None) -> Decision:
        _, rows_valid = self.score_rows(view, attn.shape[1])
        scores = fv.row_scores(attn, rows_valid)
        k = self.keep_counts(view)
        return Decision(keep=fv.topk_visual(scores, view.visual, k), info={"k": k})

    def __repr__(self) -> str:
        how = (f"count={self.count}" if self.count is not None else f"budget={self.budget}" if self.budget is not None
               else f"drop_ratio={self.drop_ratio}")
        return f"FastV(k={self.k}, {how}, score={self.score!r})"


def build_fastv(*, k: int = 2, drop_ratio: float | None = None, count: int | None = None,
                budget: float | None = None, score: str = "last") -> FastV:
    """FastV. ``k``: first layer that sees the pruned sequence (ranking by layer k-1; k = 0 ranks by
    layer 0's attention on its input). How many visual tokens survive — give at most one of:
    ``drop_ratio`` (the paper's R, fraction dropped, default 0.5), ``count`` (visual tokens kept),
    ``budget`` (all-layer average visual tokens, e.g. 192 / 128 / 64). ``score``: "last" (official
    code: the last prompt token's row) or "all" (paper text: mean over all prompt rows)."""
    if not is_int(k) or k < 0:
        raise ValueError(f"fastv: k must be an int >= 0 (the layer whose input is pruned), got {k!r}")
    given = [n for n, v in (("drop_ratio", drop_ratio), ("count", count), ("budget", budget)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"fastv: pass only one of drop_ratio, count, budget (got {', '.join(given)})")
    if drop_ratio is not None and (not is_real(drop_ratio) or not 0.0 <= drop_ratio < 1.0):
        raise ValueError(f"fastv: drop_ratio is the fraction of visual tokens dropped, in [0, 1); got {drop_ratio!r}")
    if count is not None and (not is_int(count) or count < 1):
        raise ValueError(f"fastv: count is the number of visual tokens kept, an int >= 1; got {count!r}")
    if budget is not None and (not is_real(budget) or budget <= 0):
        raise ValueError(f"fastv: budget is the all-layer average of visual tokens, a number > 0; got {budget!r}")
    if score not in ("last", "all"):
        raise ValueError(f"fastv: score must be 'last' (official code) or 'all' (paper text), got {score!r}")
    return FastV(k=int(k), drop_ratio=0.5 if drop_ratio is None else float(drop_ratio),
                 count=None if count is None else int(count), budget=None if budget is None else float(budget),
                 score=score)


# ================================================================================ SparseVLM


class SparseVLM(DecoderMethodBase):
    """SparseVLM v1.5: text raters rank visual tokens at several layers; pruned tokens are recycled."""

    name = "sparsevlm"

    def __init__(self, schedule: tuple[int, ...], layers: tuple[int, ...] | None, positions: str = "compact",
                 recycle: bool = True, reference_layers: int = sv.REFERENCE_LAYERS) -> None:
        self.schedule = tuple(schedule)
        self.layers = None if layers is None else tuple(layers)
        self.positions = positions
        self.recycle = recycle
        self.reference_layers = reference_layers
        self._points: list[int] = []

    def prune_layers(self, num_layers: int) -> list[int]:
        if self.layers is None:
            points = sv.scale_layers(sv.V15_LAYERS, num_layers, self.reference_layers)
        else:
            if self.layers[-1] >= num_layers - 1:
                raise ValueError(f"sparsevlm: layers {list(self.layers)} must be < {num_layers - 1} (the output of "
                                 f"the last layer is never pruned) for this {num_layers}-layer decoder")
            points = [l + 1 for l in self.layers]
        self._points = points
        return points

    def prepare(self, embeds: Tensor, view: LayerView) -> dict[str, Any]:
        """The raters, with two host reads before the first layer: the rows' visual / text counts (the
        packed widths; the machinery's counts of the input layout come in the same transfer) and the
        raters per row (their packed width at every prune point: raters are text, never dropped)."""
        text = view.after_image & view.prompt
        if view.fetch is None:  # not driven by the decoder machinery: every width read where needed
            return {"raters": sv.select_raters(embeds, view.visual, text, view.last), "visual0": None,
                    "rater_counts": None}
        last_visual = view.visual.gather(1, view.last[:, None])[:, 0]  # the machinery keeps that token
        n_text, last_visual = view.fetch([text.sum(1), last_visual])
        visual0 = view.counts[0]
        raters = sv.select_raters(embeds, view.visual, text, view.last, widths=(max(visual0), max(n_text)))
        # a prompt that ends with an image: the recycled tokens land after that last token and become the last
        # prompt token, so the raters per row change from layer to layer: their width is read at every point
        rater_counts = None if any(last_visual) else to_host(raters.sum(1))
        return {"raters": raters, "visual0": visual0, "rater_counts": rater_counts}  # raters: [B, L0], input layout

    def score_rows(self, view: LayerView, width: int | None = None) -> tuple[Tensor, Tensor]:
        """The raters' rows in the current layout (``width``: their most per sample, if known)."""
        ctx = view.context
        src = view.source.clamp(min=0)
        cur = ctx["raters"].gather(1, src) & (view.source >= 0)
        if width is None and ctx["rater_counts"] is not None:
            width = max(ctx["rater_counts"])
        return pack_mask(cur, width)

    def select(self, view: LayerView, attn: Tensor | None) -> Decision:
        ctx = view.context
        _, rows_valid = self.score_rows(view, attn.shape[1])
        scores = sv.rater_scores(attn, rows_valid)
        target = self.schedule[self._points.index(view.layer)]
        k = sv.schedule_count(target, view.visual.sum(1), view.num_visual0)
        keep = fv.topk_visual(scores, view.visual, k)
        # the counts follow on the host from the layout's visual counts (topk_visual keeps min(k, N) tokens: the
        # scores are finite); with the raters per row known too, the prune point reads nothing
        host = view.counts is not None and ctx["visual0"] is not None
        ks, ms, cs = sv.host_counts(target, view.counts[0], ctx["visual0"]) if host else (None, None, None)
        direct = host and ctx["rater_counts"] is not None
        info: dict[str, Any] = {"k": ks if direct else k, "raters": ctx["rater_counts"] if direct else rows_valid.sum(1)}
        extra: dict[str, Tensor] = {}
        if self.recycle:
            tokens, valid, pos, _ = sv.recycle(view.hidden, scores, view.visual & ~keep, view.positions,
                                               widths=(max(ms), max(cs)) if host else None)
            info["clusters"] = cs if direct else valid.sum(1)  # every cluster holds its centre
            extra = {"extra": tokens, "extra_valid": valid, "extra_positions": pos}
        counts = None
        if direct:
            kept = [min(a, b) for a, b in zip(ks, view.counts[0])]
            counts = (kept, cs if self.recycle else [0] * len(kept))
        return Decision(keep=keep, info=info, counts=counts, **extra)

    def __repr__(self) -> str:
        return (f"SparseVLM(schedule={self.schedule}, layers={self.layers or 'v1.5 scaled'}, "
                f"positions={self.positions!r}, recycle={self.recycle})")


def build_sparsevlm(*, budget: int = 192, schedule: tuple[int, ...] | list[int] | None = None,
                    layers: tuple[int, ...] | list[int] | None = None, positions: str = "compact",
                    recycle: bool = True) -> SparseVLM:
    """SparseVLM (v1.5). ``budget``: 192, 128 or 64 picks the v1.5 schedule (tokens kept after each
    pruning layer, for 576 visual tokens; scaled for other counts). ``schedule``: explicit counts
    instead (one per pruning layer). ``layers``: layers whose output is pruned (default v1.5's
    {2, 6, 15} of 32, scaled to shallower decoders). ``positions``: "compact" (official) or
    "original". ``recycle``: merge the best pruned tokens into cluster means."""
    if schedule is None:
        if budget not in sv.V15_SCHEDULES:
            raise ValueError(f"sparsevlm: budget must be one of {sorted(sv.V15_SCHEDULES)} (the v1.5 schedules), "
                             f"got {budget!r}; pass schedule=(...) for other counts")
        schedule = sv.V15_SCHEDULES[budget]
    else:
        if not isinstance(schedule, (tuple, list)) or not schedule or not all(is_int(c) and c >= 1 for c in schedule):
            raise ValueError(f"sparsevlm: schedule must be a non-empty list of ints >= 1, got {schedule!r}")
        if max(schedule) > sv.REFERENCE_TOKENS:
            raise ValueError(f"sparsevlm: schedule counts are visual tokens kept out of {sv.REFERENCE_TOKENS} "
                             f"(scaled to the model's count); {max(schedule)} is more than {sv.REFERENCE_TOKENS} — "
                             f"pass counts <= {sv.REFERENCE_TOKENS}, e.g. schedule=[300,200,110]")
    if layers is not None:
        if not isinstance(layers, (tuple, list)) or not all(is_int(l) and l >= 0 for l in layers) \
                or list(layers) != sorted(set(layers)):
            raise ValueError(f"sparsevlm: layers must be strictly increasing ints >= 0, got {layers!r}")
        if len(layers) != len(schedule):
            raise ValueError(f"sparsevlm: {len(layers)} layers but {len(schedule)} schedule counts; give one count "
                             "per layer")
    elif len(schedule) != len(sv.V15_LAYERS):
        raise ValueError(f"sparsevlm: the default layers are {list(sv.V15_LAYERS)}; a schedule of {len(schedule)} "
                         "counts needs layers=[...] of the same length")
    if positions not in ("compact", "original"):
        raise ValueError(f"sparsevlm: positions must be 'compact' (official) or 'original', got {positions!r}")
    if not isinstance(recycle, bool):
        raise ValueError(f"sparsevlm: recycle must be True or False, got {recycle!r}")
    return SparseVLM(tuple(int(c) for c in schedule), None if layers is None else tuple(int(l) for l in layers),
                     positions=positions, recycle=recycle)
