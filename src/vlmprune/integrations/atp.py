"""ATP-LLaVA on the decoder-stage machinery: learned, per-instance, per-layer visual-token pruning.

The tensor algorithm (scores, spatial grids, threshold MLPs, soft / hard keep rules, budget,
straight-through count, range hinge) is ``vlmprune.methods.atp``; this file wires an
``ATPPruner`` into ``integrations.decoder``:

* an ATP module "after decoder layer l" is the machinery's prune point ``p = l + 1`` (tokens are
  dropped from the input of layer l + 1, ranked by layer l's attention);
* at each point it asks for the attention rows of the alive visual tokens (S_self) and of the
  instruction tokens T (S_cross), head-averaged and post-softmax over every current key, computed
  by the machinery from layer l's hooked q / k;
* ``mode="hard"`` (inference, the default): ``pruner.hard_step``; each sample keeps its own tokens,
  survivors keep their original positions (``positions="compact"`` renumbers them, the paper's
  positional ablation); works batched (ragged counts) and with ``generate()`` (only the prefill
  prunes);
* ``mode="soft"`` (training): ``pruner.soft_step``; nothing is dropped, the cumulative mask enters
  every later layer's attention as ``log(M + eps)`` on the visual keys through the machinery's
  soft-mask path (a float sdpa mask, differentiable); the counts for the budget loss and the range
  hinge terms are kept in the per-prefill ``ATPContext`` (``handle.state.context``).

Instruction rows T: at inference, the prompt's text tokens after the sample's last image (LLaVA-1.5:
the question and "ASSISTANT:"). A trainer whose sequences also hold answers passes T explicitly with
``ATP.instruction_rows(mask)`` [B, L] bool over ``input_ids``.

Budget counts in training (``budget_count``): ``"st"`` (default) is the straight-through count
(``ATPPruner.straight_through``: value = tokens the hard rule keeps, gradient = the soft count's);
``"soft"`` is the plain soft count (sum of the cumulative soft mask).

Grids: the machinery gives every visual column its grid unit and patch (``adapter.grid_layout``);
the pruner decides per unit or per sample (``methods.atp.units``; ``docs/atp.md``, "Other
families"). A sample may hold several images (each is one or more units). With several grids, or a
sample whose visual count differs from N, budgets count each sample against its own initial visual
tokens (``ATPContext.initial``).

Use: ``vlmprune.apply(model, "atp", checkpoint=DIR)`` (a directory written by
``ATPPruner.save`` / ``vlmprune train atp``); ``handle.stats`` is an ``ATPStats``.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from ..methods import atp as A
from ..methods.atp import units as U
from ..methods.common import is_real, pack_mask, to_host_lists
from .base import in_phase
from .decoder import Decision, DecoderHandle, DecoderMethodBase, DecoderStats, LayerView, RowSums

__all__ = ["ATP", "ATPContext", "ATPStats", "ATPHandle", "build_atp", "attach_atp", "MODES", "BUDGET_COUNTS"]

MODES = ("hard", "soft")
BUDGET_COUNTS = ("st", "soft")
POSITIONS = ("original", "compact")  # survivors keep their position ids | renumbered (the positional ablation)


# ================================================================================ per-prefill state


@dataclass
class ATPContext:
    """What ATP keeps during one prefill (``handle.state.context``); modules in layer order.

    ``counts``: [B] per module — hard mode: tokens kept (long); soft mode: the budget counts
    (straight-through or soft, float, differentiable). ``soft_counts``: soft mode, the plain soft
    counts. ``keep_grids``: [B, N] bool per module, the patches alive after it (soft mode:
    cumulative soft mask > 0.5). ``masks``: soft mode, [B, N] cumulative soft mask (detached).
    Both only when every sample is one unit on the module's grid (``single_grid``; LLaVA-1.5).
    """

    mode: str
    instruction0: Tensor  # [B, L0] bool over the input layout
    patch0: Tensor  # [B, L0] long: raster index of each visual token in its unit's grid, -1 elsewhere
    unit0: Tensor | None = None  # [B, L0] long: grid unit of each visual token (-1 on no grid / elsewhere)
    grids: tuple[tuple[int, int], ...] = ()  # (h, w) of every unit
    unit_sample: Tensor | None = None  # [U] long: the sample of each unit
    initial: Tensor | None = None  # [B] float visual tokens per sample before pruning; None = N for every sample
    initial_counts: list[int] = field(default_factory=list)  # the same on the host, always given
    judged0: list[int] | None = None  # judged visual tokens per sample before pruning
    single_grid: bool = True  # every sample: one unit on the module's grid, no token off it
    layers: list[int] = field(default_factory=list)
    counts: list[Tensor] = field(default_factory=list)
    soft_counts: list[Tensor] = field(default_factory=list)
    thresholds: list[A.Thresholds] = field(default_factory=list)
    keep_grids: list[Tensor] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    range_terms: list[Tensor] = field(default_factory=list)  # soft: [B] distance of theta outside the scores' range
    prev: Tensor | None = None  # soft: cumulative soft mask over the visual slots [B, V]
    prev_hard: Tensor | None = None  # soft: cumulative hard keep [B, V] (straight-through count)
    pending: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # rows of the current point
    text_width: int | None = None  # most instruction rows of a sample (constant: text is never dropped)
    samples_in_order: bool | None = None  # unit u belongs to sample u (one unit per sample, in order)
    checked: bool = False  # every sample keeps a judged slot at every module (hard_keep need not check)


# ================================================================================ stats


@dataclass
class ATPStats(DecoderStats):
    """``DecoderStats`` plus ATP's per-module view of the last prefill (and accumulated per sample,
    the ``*_per_image`` fields: a sample is one image in the paper's setting; a sample of several
    images counts once, with all their tokens).

    ``module_layers``: the layers the modules follow. ``module_counts`` [B][K]: visual tokens each
    sample keeps after each module. ``atp_average`` [B]: the all-layer average (the paper's
    "144*"), computed by ``ATPPruner.average_tokens`` — equal to ``visual_tokens_per_sample()``,
    which the machinery measures layer by layer. ``theta_r`` / ``theta_s`` [B][K] the predicted
    thresholds (None for a disabled branch or fixed-ratio mode; with per-unit thresholds, the mean
    over the sample's units). In training (soft) prefills
    ``soft_average`` [B] holds the differentiable budget's average instead.
    """

    module_layers: list[int] = field(default_factory=list)
    module_counts: list[list[int]] = field(default_factory=list)
    atp_average: list[float] = field(default_factory=list)
    theta_r: list[list[float]] | None = None
    theta_s: list[list[float]] | None = None
    soft_average: list[float] = field(default_factory=list)
    module_counts_per_image: list[list[int]] = field(default_factory=list)
    atp_average_per_image: list[float] = field(default_factory=list)
    initial_per_image: list[int] = field(default_factory=list)  # visual tokens of each sample before pruning

    def record_atp(self, ctx: ATPContext, decisions: dict[int, dict[str, Any]]) -> None:
        """Record one prefill from what its prune points brought to the host (``handle.state.decisions``:
        per module the kept counts, thresholds and, at the last one, the all-layer average)."""
        self.module_layers = list(ctx.layers)
        if not ctx.counts:
            return
        rows = [decisions[layer + 1] for layer in ctx.layers]  # module after layer l = prune point l + 1
        average = list(rows[-1]["atp_average"])  # [B]
        if ctx.mode == "soft":
            self.soft_average = average
            return
        self.module_counts = [list(r) for r in zip(*(d["atp_kept"] for d in rows))]  # [B][K]
        self.atp_average = average
        self.module_counts_per_image.extend(self.module_counts)
        self.atp_average_per_image.extend(self.atp_average)
        self.initial_per_image.extend(ctx.initial_counts)

        def thetas(name: str) -> list[list[float]] | None:
            vals = [d.get(name) for d in rows]
            if any(v is None for v in vals):
                return None
            return [list(r) for r in zip(*vals)]

        self.theta_r, self.theta_s = thetas("theta_r"), thetas("theta_s")

    @property
    def mean_module_counts(self) -> list[float]:
        """Mean kept count after each module over every sample since the last reset."""
        rows = self.module_counts_per_image
        if not rows:
            return []
        return [sum(r[k] for r in rows) / len(rows) for k in range(len(rows[0]))]

    @property
    def mean_atp_average(self) -> float:
        v = self.atp_average_per_image
        return sum(v) / len(v) if v else math.nan

    def reset(self) -> None:
        super().reset()
        self.module_counts_per_image = []
        self.atp_average_per_image = []
        self.initial_per_image = []


# ================================================================================ the method


def _visual_row_bounds(counts: tuple[list[int], list[int]] | None, width: int, length: int) -> list[int] | None:
    """Host bounds of the packed visual rows' columns (``attention_row_sums``' ``row_bounds``).

    Row i of sample b is the i-th of its V_b visual columns, ascending and distinct in [0, L), so
    ``col <= L - V_b + i``; the bound of row i is that plus one, maximised over the samples with
    V_b > i (the others' row i is padding). None when the counts are not on the host.
    """
    if counts is None:
        return None
    visual = sorted(counts[0])
    bounds, j = [], 0
    for i in range(width):
        while j < len(visual) and visual[j] <= i:  # samples whose row i is padding
            j += 1
        bounds.append(length if j == len(visual) else length - visual[j] + i + 1)
    return bounds


class ATP(DecoderMethodBase):
    """ATP modules as a decoder-stage method (see the module docstring)."""

    name = "atp"
    positions = "original"
    needs_grids = True

    def __init__(self, pruner: A.ATPPruner | None = None, *, mode: str = "hard", tau: float | None = None,
                 budget_count: str = "st", layers: tuple[int, ...] | None = None,
                 fixed_ratio: float | None = None, fixed_target: float | None = None,
                 grid_options: dict[str, str] | None = None, positions: str = "original") -> None:
        if positions not in POSITIONS:
            raise ValueError(f"atp: positions must be one of {POSITIONS} ('original': survivors keep their "
                             f"positions, as in the paper; 'compact': renumbered, the positional ablation), "
                             f"got {positions!r}")
        if mode not in MODES:
            raise ValueError(f"atp: mode must be one of {MODES}, got {mode!r}")
        if budget_count not in BUDGET_COUNTS:
            raise ValueError(f"atp: budget_count must be one of {BUDGET_COUNTS}, got {budget_count!r}")
        if pruner is not None and not isinstance(pruner, A.ATPPruner):
            raise ValueError(f"atp: pruner must be an ATPPruner, got {type(pruner).__name__}")
        self.pruner = pruner
        self.mode = mode
        self.tau = tau
        self.budget_count = budget_count
        self._layers, self._fixed_ratio, self._fixed_target = layers, fixed_ratio, fixed_target
        self.positions = positions
        self._grid_options = dict(grid_options or {})  # thresholds / off_grid / resample over the config's
        if pruner is not None and self._grid_options:
            self.pruner = _with_grid_options(pruner, self._grid_options)
        self._instruction: Tensor | None = None

    handle_class: type  # set below (ATPHandle)

    # ---------------------------------------------------------------- binding to a model
    def check_budget(self, num_tokens: int) -> None:
        """``fixed_target`` (an all-layer average) must not exceed the model's visual tokens per image."""
        if self._fixed_target is not None and self._fixed_target > num_tokens:
            raise ValueError(f"atp: fixed_target={self._fixed_target:g} is more than the {num_tokens} visual tokens "
                             f"per image of this model; pass fixed_target <= {num_tokens}")

    def bind(self, num_layers: int, num_patches: int, grid: tuple[int, int]) -> A.ATPPruner:
        """Build the pruner for this model (untrained / fixed-ratio), or check a loaded one fits it."""
        if num_patches != grid[0] * grid[1]:
            raise ValueError(f"atp: the model feeds {num_patches} tokens per image but its patch grid is "
                             f"{grid[0]} x {grid[1]}; ATP needs the patch tokens only "
                             "(vision_feature_select_strategy='default')")
        if self.pruner is None:
            ratio = self._fixed_ratio
            layers = self._layers if self._layers is not None else A.scale_layers(num_layers)
            if self._layers is not None and max(self._layers) > num_layers - 2:
                raise ValueError(f"atp: layers {list(self._layers)} reach beyond this {num_layers}-layer decoder "
                                 f"(a module may follow layers 0..{num_layers - 2})")
            if self._fixed_target is not None:
                try:
                    ratio = A.fixed_ratio_for_target(self._fixed_target, layers, num_layers, num_patches)
                except ValueError as e:
                    raise ValueError(f"atp: fixed_target={self._fixed_target:g}: {e}; or pass fixed_ratio") from None
            self.pruner = A.ATPPruner(A.ATPConfig(num_layers=num_layers, layers=tuple(layers),
                                                  num_patches=num_patches, grid=tuple(grid), fixed_ratio=ratio,
                                                  **self._grid_options))
            return self.pruner
        c = self.pruner.config
        if max(c.layers) > num_layers - 2:
            raise ValueError(f"atp: the ATP modules follow decoder layers {list(c.layers)}, beyond this model's "
                             f"{num_layers} layers (trained for a {c.num_layers}-layer decoder)")
        if c.num_layers != num_layers:
            raise ValueError(f"atp: the ATP weights were trained for a {c.num_layers}-layer decoder, this model "
                             f"has {num_layers} layers")
        if c.num_patches != num_patches or tuple(c.grid) != tuple(grid):
            raise ValueError(f"atp: the ATP weights expect {c.num_patches} visual tokens per image on a "
                             f"{c.grid[0]} x {c.grid[1]} grid, this model feeds {num_patches} "
                             f"({grid[0]} x {grid[1]})")
        return self.pruner

    def prune_layers(self, num_layers: int) -> list[int]:
        if self.pruner is None:
            raise RuntimeError("atp: the pruner is not bound to a model; attach with vlmprune.apply(model, 'atp')")
        return [l + 1 for l in self.pruner.layers]

    # ---------------------------------------------------------------- instruction rows
    @contextmanager
    def instruction_rows(self, mask: Tensor) -> Iterator[None]:
        """Use ``mask`` [B, L] bool (over ``input_ids``) as the instruction rows T of the forwards inside."""
        if not isinstance(mask, Tensor) or mask.ndim != 2:
            raise ValueError("atp: the instruction mask must be a [B, L] bool tensor over input_ids")
        self._instruction = mask
        try:
            yield
        finally:
            self._instruction = None

    def _instruction_mask(self, view: LayerView) -> Tensor:
        text = view.valid & ~view.visual
        if self._instruction is None:
            return view.after_image & view.prompt & text
        m = self._instruction.to(view.valid.device).bool()
        if tuple(m.shape) != tuple(view.valid.shape):
            raise ValueError(f"atp: the instruction mask has shape {tuple(m.shape)} but the forward's input is "
                             f"{tuple(view.valid.shape)} ([B, L] over input_ids)")
        return m & text

    # ---------------------------------------------------------------- machinery callbacks
    def prepare(self, embeds: Tensor, view: LayerView) -> ATPContext:
        pr = self.pruner
        if pr.spatial.device != embeds.device:
            pr.to(embeds.device)
        c = pr.config
        lay = view.layout
        if lay is None or lay.grid_unit is None:
            raise RuntimeError("atp: the decoder stage gave no grid layout (the method sets needs_grids)")
        visual = view.visual & view.valid
        none = torch.full_like(lay.grid_unit, -1)
        unit0 = torch.where(visual, lay.grid_unit, none)
        patch0 = torch.where(visual, lay.grid_patch, none)
        judged = visual & ((unit0 >= 0) | (c.off_grid == "score"))
        grid = visual & (unit0 >= 0)
        instruction0 = self._instruction_mask(view)
        units = len(lay.units)
        rows = torch.arange(visual.shape[0], device=visual.device)[:, None].expand_as(visual)
        unit_sample = torch.zeros(units + 1, dtype=torch.long, device=visual.device).scatter_(
            0, torch.where(grid, unit0, units).flatten(), rows.flatten())[:units]  # other slots -> a dump entry
        # the prefill's one host read before the first module (the machinery's counts of the input layout, its
        # visual tokens per sample, come in the same transfer): per sample its judged / on-grid / off-grid visual
        # tokens and instruction rows (their packed width: text is never dropped), and the sample of each unit
        tensors = [judged.sum(1), grid.sum(1), (visual & ~grid).sum(1), instruction0.sum(1), unit_sample]
        if view.fetch is not None:
            judged0, grid0, off0, text0, samples = view.fetch(tensors)
            n0 = view.counts[0]
        else:
            judged0, grid0, off0, text0, samples, n0 = to_host_lists([*tensors, view.num_visual0])
        lay.check_placeholders(sum(n0))
        empty = [b for b, n_vis in enumerate(n0) if n_vis == 0]
        if empty:
            raise ValueError(f"atp: sample {empty[0]} has no image tokens; ATP prunes the visual tokens of "
                             "samples that hold at least one image or video")
        grids = tuple(u.grid for u in lay.units)
        per_sample = [0] * visual.shape[0]
        for b in samples:
            per_sample[b] += 1
        single = (all(k == 1 for k in per_sample) and all(g == tuple(c.grid) for g in grids)
                  and not any(off0))
        initial = None if all(n == c.num_patches for n in n0) else view.num_visual0.float()
        # hard_keep's check (every sample has a judged slot) holds at every module when each sample starts with
        # an on-grid token: the rule keeps one judged slot per sample, and judged slots stay judged (except
        # off-grid ones judged with their unit's grid slots, off_grid="score" with per-unit thresholds)
        checked = all(g > 0 for g in grid0) and (c.off_grid == "keep" or c.thresholds == "sample")
        return ATPContext(mode=self.mode, instruction0=instruction0, patch0=patch0, unit0=unit0,
                          grids=grids, unit_sample=unit_sample, initial=initial, initial_counts=list(n0),
                          judged0=judged0, single_grid=single,
                          text_width=max(text0), samples_in_order=samples == list(range(visual.shape[0])),
                          checked=checked)

    def _rows(self, view: LayerView) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ctx: ATPContext = view.context
        src = view.source.clamp(min=0)
        instr = ctx.instruction0.gather(1, src) & (view.source >= 0) & view.valid & ~view.visual
        width = None if view.counts is None else max(view.counts[0])  # known from the last host read
        cols_v, valid_v = pack_mask(view.visual & view.valid, width)  # [B, V]
        cols_t, valid_t = pack_mask(instr, ctx.text_width)  # [B, T]
        return cols_v, valid_v, cols_t, valid_t

    def score_rows(self, view: LayerView) -> tuple[Tensor, Tensor, Tensor]:
        """The visual and instruction query rows, with the weights of the two column sums the scores
        need (``RowSums``: group 0 = the visual rows, times the cumulative soft mask in training;
        group 1 = the instruction rows); the [B, R, L] rows themselves are never built."""
        ctx: ATPContext = view.context
        ctx.pending = self._rows(view)
        cols_v, valid_v, cols_t, valid_t = ctx.pending
        score = self.pruner.config.score
        w_v = valid_v.float()
        prev = ctx.prev if self.mode == "soft" else None
        if prev is not None and score != "cross":
            if tuple(prev.shape) != tuple(valid_v.shape):
                raise RuntimeError("atp: the visual layout changed between soft modules (tokens were dropped in "
                                   "training mode)")
            w_v = w_v * prev
        if score == "cross":
            return cols_t, valid_t, valid_t.float()[:, :, None]
        bounds = _visual_row_bounds(view.counts, cols_v.shape[1], view.valid.shape[1])
        if score == "self":
            return cols_v, valid_v, w_v[:, :, None], *([bounds] if bounds is not None else [])
        zeros_v, zeros_t = torch.zeros_like(w_v), torch.zeros_like(valid_t, dtype=w_v.dtype)
        weights = torch.stack([torch.cat([w_v, zeros_t], 1), torch.cat([zeros_v, valid_t.to(w_v.dtype)], 1)], 2)
        rows = torch.cat([cols_v, cols_t], dim=1), torch.cat([valid_v, valid_t], dim=1), weights  # [B, V+T, 2]
        if bounds is None:
            return rows
        return *rows, bounds + [view.valid.shape[1]] * cols_t.shape[1]

    def _scores(self, attn: RowSums, cols_v: Tensor, valid_v: Tensor, valid_t: Tensor, prev: Tensor | None,
                slots: Any) -> A.ATPScores:
        """ATP's scores from the column sums ``score_rows`` asked for, at the visual key columns."""
        score = self.pruner.config.score
        vlen = cols_v.shape[1]
        self_sum = own = cross_sum = None
        if score != "cross":
            self_sum = attn.sums[:, 0].gather(1, cols_v)  # [B, V]
            own = attn.own[:, :vlen]  # visual rows come first
        if score != "self":
            cross_sum = attn.sums[:, 1 if score == "both" else 0].gather(1, cols_v)
        return self.pruner.scores_from_sums(self_sum, own, cross_sum, valid_v, valid_t, query_weight=prev,
                                            slots=slots)

    def select(self, view: LayerView, attn: RowSums | None) -> Decision:
        ctx: ATPContext = view.context
        pr = self.pruner
        layer = view.layer - 1  # the module follows layer p - 1
        cols_v, valid_v, cols_t, valid_t = ctx.pending if ctx.pending is not None else self._rows(view)
        ctx.pending = None
        bsz, length = view.valid.shape
        src = view.source.gather(1, cols_v).clamp(min=0)
        patch = ctx.patch0.gather(1, src)  # [B, V]
        unit = torch.where(valid_v, ctx.unit0.gather(1, src), torch.full_like(patch, -1))
        slots = pr.units(unit, patch, ctx.grids, ctx.unit_sample, valid_v, ctx.judged0,
                         samples_in_order=ctx.samples_in_order)
        patch = torch.where(valid_v, patch, torch.zeros_like(patch))
        n = pr.config.num_patches
        patch_dump = torch.where(valid_v, patch, torch.full_like(patch, n))  # padding slots -> grid index N
        ctx.layers.append(layer)
        dump = torch.where(valid_v, cols_v, torch.full_like(cols_v, length))  # padding slots -> column L

        if self.mode == "soft":
            prev = ctx.prev
            scores = self._scores(attn, cols_v, valid_v, valid_t, prev, slots)
            step = pr.soft_step(layer, scores, patch, prev, tau=self.tau, slots=slots)
            ctx.prev = step.cumulative
            count = step.count
            if pr.config.learned and self.budget_count == "st":
                count, ctx.prev_hard = pr.straight_through(scores, step, ctx.prev_hard, check=not ctx.checked)
            ctx.counts.append(count)
            ctx.soft_counts.append(step.count)
            if pr.config.learned:
                margin = 2.0 * (self.tau if self.tau is not None else pr.config.tau)
                ctx.range_terms.append(A.range_hinge(scores.s_r, step.s_s, step.thresholds, slots, margin))
            ctx.thresholds.append(A.per_sample_thresholds(step.thresholds, slots, bsz))
            cum = step.cumulative.detach()
            if ctx.single_grid:
                ctx.masks.append(torch.zeros(bsz, n + 1, device=cum.device).scatter(1, patch_dump, cum)[:, :n])
                ctx.keep_grids.append(ctx.masks[-1] > 0.5)
            ones = torch.ones(bsz, length + 1, dtype=step.mask.dtype, device=step.mask.device)
            soft = ones.scatter(1, dump, torch.where(valid_v, step.mask, torch.ones_like(step.mask)))[:, :length]
            info = {"atp_layer": layer, "soft_count": step.count.detach()}
            self._last_module_average(ctx, layer, info)
            return Decision(soft=soft, info=info)

        scores = self._scores(attn, cols_v, valid_v, valid_t, None, slots)
        step = pr.hard_step(layer, scores, patch, slots=slots, check=not ctx.checked)
        keep = step.keep & valid_v
        cols_keep = torch.zeros(bsz, length + 1, dtype=torch.bool, device=keep.device).scatter(1, dump, keep)
        ctx.counts.append(step.counts)
        thresholds = A.per_sample_thresholds(step.thresholds, slots, bsz)
        ctx.thresholds.append(thresholds)
        if ctx.single_grid:
            grid = torch.zeros(bsz, n + 1, dtype=torch.bool, device=keep.device).scatter(1, patch_dump, keep)[:, :n]
            ctx.keep_grids.append(grid)
        info: dict[str, Any] = {"atp_layer": layer, "atp_kept": step.counts}
        for name in ("theta_r", "theta_s"):
            t = getattr(thresholds, name)
            if t is not None:
                info[name] = t.detach().float()
        self._last_module_average(ctx, layer, info)
        return Decision(keep=cols_keep[:, :length], info=info)

    def _last_module_average(self, ctx: ATPContext, layer: int, info: dict[str, Any]) -> None:
        """At the last module: the all-layer average of the kept counts, into ``info`` (so it comes to the host
        in that prune point's read, for ``ATPStats``)."""
        if layer == self.pruner.layers[-1]:
            with torch.no_grad():
                info["atp_average"] = self.pruner.average_tokens([c.detach().float() for c in ctx.counts],
                                                                 ctx.initial)

    def __repr__(self) -> str:
        if self.pruner is None:
            return f"ATP(unbound, mode={self.mode!r})"
        c = self.pruner.config
        kind = f"fixed_ratio={c.fixed_ratio:.4f}" if c.fixed_ratio is not None else "learned"
        return f"ATP(layers={c.layers}, {kind}, score={c.score!r}, mode={self.mode!r})"


class ATPHandle(DecoderHandle):
    """``DecoderHandle`` that binds the ATP pruner to the model first and keeps ``ATPStats``."""

    stats_class = ATPStats

    def __init__(self, model: Any, adapter: Any, method: str, method_obj: ATP) -> None:
        num_layers = len(adapter.get_decoder_layers(model))
        pruner = method_obj.bind(num_layers, adapter.tokens_per_image(model), adapter.patch_grid(model))
        super().__init__(model, adapter, method, method_obj)
        self.pruner = pruner
        self.stats.module_layers = list(pruner.layers)

    @in_phase("prefill")
    def _finish_prefill(self, output: Any) -> None:
        super()._finish_prefill(output)
        ctx = self.state.context
        if isinstance(ctx, ATPContext):
            self.stats.record_atp(ctx, self.state.decisions)


ATP.handle_class = ATPHandle


def _with_grid_options(pruner: A.ATPPruner, options: dict[str, str]) -> A.ATPPruner:
    """``pruner`` with its config's grid options (thresholds / off_grid / resample) replaced (weights kept)."""
    import dataclasses

    config = dataclasses.replace(pruner.config, **options)
    new = A.ATPPruner(config)
    new.load_state_dict(pruner.state_dict())
    return new


# ================================================================================ builder


#: Said (as a ``UserWarning``) when ``atp`` is built with neither a checkpoint nor a fixed ratio / target.
UNTRAINED_WARNING = ("atp without checkpoint=DIR (or fixed_ratio / fixed_target) has untrained modules whose "
                     "thresholds keep every visual token: nothing is pruned. Train them with `vlmprune train atp "
                     "--out DIR` and pass checkpoint=DIR")


def _load_pruner(path: str) -> A.ATPPruner:
    """``ATPPruner.load`` with every file problem as a ``ValueError`` naming the file."""
    import json

    from safetensors import SafetensorError

    cfg_path, w_path = os.path.join(path, A.CONFIG_NAME), os.path.join(path, A.WEIGHTS_NAME)
    missing = [p for p in (cfg_path, w_path) if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"atp: {' and '.join(missing)} not found: {path} is not an ATP checkpoint (it needs "
                                f"{A.CONFIG_NAME} + {A.WEIGHTS_NAME}, written by `vlmprune train atp --out DIR`)")
    try:
        with open(cfg_path) as fh:
            json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"atp: {cfg_path} is not valid JSON ({e}); re-run `vlmprune train atp` or restore the "
                         "file") from None
    try:
        return A.ATPPruner.load(path)
    except SafetensorError as e:
        raise ValueError(f"atp: {w_path} is not a readable safetensors file ({e}); re-run `vlmprune train atp` or "
                         "restore the file") from None
    except (KeyError, TypeError, RuntimeError) as e:  # incompatible weights / config
        raise ValueError(f"atp: {path} holds incompatible ATP weights or config ({e})") from None


#: Folder of the ATP checkpoints shipped with the package (one sub-folder per name, e.g. ``testbed-144``).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "atp"


def shipped_checkpoints() -> dict[str, Path]:
    """Name -> folder of every ATP checkpoint shipped with the package (trained on the testbed)."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {d.name: d for d in sorted(SHIPPED_DIR.iterdir()) if (d / A.CONFIG_NAME).is_file()}


def resolve_checkpoint(checkpoint: str | os.PathLike) -> str:
    """A checkpoint folder, or the name of a shipped one (``testbed-144``) -> its folder."""
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        return path
    shipped = shipped_checkpoints()
    if path in shipped:
        return str(shipped[path])
    names = ", ".join(shipped) or "none"
    raise FileNotFoundError(f"atp: checkpoint directory {path!r} does not exist (train one with "
                            f"`vlmprune train atp --out DIR`, or name a shipped one: {names})")


def build_atp(*, checkpoint: str | os.PathLike | None = None, layers: tuple[int, ...] | list[int] | None = None,
              fixed_ratio: float | None = None, fixed_target: float | None = None, thresholds: str | None = None,
              off_grid: str | None = None, resample: str | None = None, positions: str = "original") -> ATP:
    """ATP-LLaVA. ``checkpoint``: directory with ``atp_config.json`` + ``atp_weights.safetensors``
    (written by ``vlmprune train atp``), or the name of one shipped with the package
    (``shipped_checkpoints()``: ``testbed-144``, ``testbed-88``, trained on the committed testbed). Without it: untrained modules (initial thresholds keep every
    token) at ``layers`` (default (2, 8, 14, 20, 26) of 32, scaled to the decoder's depth), or the
    fixed-ratio ablation: ``fixed_ratio`` (fraction of survivors each module keeps) or
    ``fixed_target`` (all-layer average visual tokens, solved for that ratio). Samples with several
    grids (LLaVA-NeXT, Qwen2-VL; ``docs/atp.md``): ``thresholds`` ``"unit"`` | ``"sample"``,
    ``off_grid`` ``"keep"`` | ``"score"``, ``resample`` ``"area"`` | ``"bilinear"`` (default: the
    checkpoint's config, else unit / keep / area). ``positions``: ``"original"`` (survivors keep
    their position ids; the paper) or ``"compact"`` (survivors renumbered contiguously, decoding
    continues after the compacted length: the paper's positional-information ablation)."""
    if positions not in POSITIONS:
        raise ValueError(f"atp: positions must be one of {POSITIONS}, got {positions!r}")
    grid_options = {}
    for name, value, choices in (("thresholds", thresholds, U.THRESHOLD_UNITS), ("off_grid", off_grid, U.OFF_GRID),
                                 ("resample", resample, U.RESAMPLE)):
        if value is not None:
            if value not in choices:
                raise ValueError(f"atp: {name} must be one of {', '.join(choices)}, got {value!r}")
            grid_options[name] = value
    if checkpoint is not None:
        given = [n for n, v in (("layers", layers), ("fixed_ratio", fixed_ratio), ("fixed_target", fixed_target))
                 if v is not None]
        if given:
            raise ValueError(f"atp: {', '.join(given)} cannot be combined with checkpoint (the checkpoint's "
                             "config decides them)")
        return ATP(_load_pruner(resolve_checkpoint(checkpoint)), grid_options=grid_options, positions=positions)
    if fixed_ratio is not None and fixed_target is not None:
        raise ValueError("atp: pass only one of fixed_ratio, fixed_target")
    if fixed_ratio is not None and not (is_real(fixed_ratio) and 0 < fixed_ratio <= 1):
        raise ValueError(f"atp: fixed_ratio is the fraction of survivors each module keeps, in (0, 1]; "
                         f"got {fixed_ratio!r}")
    if fixed_target is not None and not (is_real(fixed_target) and fixed_target > 0):
        raise ValueError(f"atp: fixed_target is an all-layer average token count > 0, got {fixed_target!r}")
    if layers is not None:
        if not (isinstance(layers, (tuple, list)) and layers and all(isinstance(l, int) and l >= 0 for l in layers)
                and list(layers) == sorted(set(layers))):
            raise ValueError(f"atp: layers must be strictly increasing ints >= 0, got {layers!r}")
        layers = tuple(int(l) for l in layers)
    if fixed_ratio is None and fixed_target is None:
        import warnings

        warnings.warn(UNTRAINED_WARNING, UserWarning, stacklevel=4)
    return ATP(None, layers=layers, fixed_ratio=None if fixed_ratio is None else float(fixed_ratio),
               fixed_target=None if fixed_target is None else float(fixed_target), grid_options=grid_options,
               positions=positions)


def attach_atp(model: Any, pruner: A.ATPPruner, *, mode: str = "hard", tau: float | None = None,
               budget_count: str = "st", positions: str = "original") -> ATPHandle:
    """Attach an in-memory ``pruner`` (e.g. while training it) to ``model``; returns the ``ATPHandle``."""
    from . import attach
    from ..registry import get_method

    return attach(model, get_method("atp"), ATP(pruner, mode=mode, tau=tau, budget_count=budget_count,
                                                positions=positions))
