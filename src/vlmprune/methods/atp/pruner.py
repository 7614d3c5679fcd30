"""``ATPPruner``: all ATP modules of a model, and one module's step in training and at inference.

The decoder-stage integration computes the attention rows after each pruning layer and calls, per
module: ``scores`` (S_self, S_cross, S_r), then ``soft_step`` in training (soft mask, cumulative
mask, soft count; later layers get ``log_mask(cumulative)`` on the visual keys) or ``hard_step``
at inference (keep mask over the alive slots); at the end of a training prefill, ``budget_loss``
on the per-module counts. With several grids per sample, ``units`` says where the slots lie.

Shapes: ``B`` samples, ``V`` alive visual slots per sample (padded; ``scores.valid`` [B, V]),
``N`` patches of the module's grid, ``patch_index`` [B, V] long the grid index of each slot,
``G`` judging groups (``units.UnitSlots``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from . import units as U
from .budget import BudgetLoss, average_tokens, budget_loss, fixed_ratio_counts, per_layer_counts
from .config import CONFIG_NAME, FORMAT, WEIGHTS_NAME, ATPConfig, read_config, write_config
from .hard import fixed_priority, hard_keep, topk_keep
from .scores import ATPScores, redundancy_scores, redundancy_scores_from_sums
from .soft import anneal_tau, cumulative_mask, log_mask, soft_mask, straight_through_count, topk_soft_mask
from .spatial import spatial_scores
from .thresholds import ATPModule, Thresholds
from .units import UnitSlots

__all__ = ["SoftStep", "HardStep", "ATPPruner", "per_sample_thresholds"]


@dataclass
class SoftStep:
    """Training output of one module; all [B, V] over the same slots as the scores (0 on padding)."""

    mask: Tensor  # this module's M
    cumulative: Tensor  # prev * M: enters later layers as log_mask(cumulative)
    count: Tensor  # [B] soft number of surviving visual tokens (sum of cumulative)
    s_s: Tensor  # spatial score of each slot
    thresholds: Thresholds
    slot_thresholds: Thresholds | None = None  # several grids: each slot's thresholds [B, V]
    judged: Tensor | None = None  # several grids: [B, V] bool, the slots the rule decides (others kept)


@dataclass
class HardStep:
    """Inference output of one module over the alive slots."""

    keep: Tensor  # [B, V] bool, at least one True per sample
    counts: Tensor  # [B] long, tokens alive after this module
    s_s: Tensor  # [B, V]
    thresholds: Thresholds  # [B]; several grids: [G], one per judging group


class ATPPruner(nn.Module):
    """All ATP modules of a model, keyed by the decoder layer they follow; stateless between calls.

    The caller (decoder machinery) keeps the per-prefill state: the cumulative soft mask in
    training, the alive patch indices at inference, the per-module counts.
    """

    def __init__(self, config: ATPConfig) -> None:
        super().__init__()
        if not isinstance(config, ATPConfig):
            raise ValueError(f"config must be an ATPConfig, got {type(config).__name__}")
        self.config = config
        self.layers: tuple[int, ...] = tuple(config.layers)
        self.atp = nn.ModuleDict()
        if config.learned:
            for layer in self.layers:
                self.atp[str(layer)] = ATPModule(
                    config.num_patches, config.hidden, redundant=config.redundant, spatial=config.spatial,
                    theta_range=config.theta_range, init_theta_r=config.init_theta_r,
                    init_theta_s=config.init_theta_s)
        self.fixed_counts = (fixed_ratio_counts(config.fixed_ratio, len(self.layers), config.num_patches)
                             if config.fixed_ratio is not None else None)
        h, w = config.grid
        self.register_buffer("spatial", spatial_scores(h, w, config.spatial_strides), persistent=False)  # [N]
        self._spatial_tables: dict[tuple[int, int], Tensor] = {}

    # ----- lookup
    def module_index(self, layer: int) -> int:
        """Index k of the module after decoder layer ``layer`` (ValueError if there is none)."""
        if layer not in self.layers:
            raise ValueError(f"no ATP module after layer {layer}; modules sit after layers {self.layers}")
        return self.layers.index(layer)

    def tau_at(self, step: int, total_steps: int) -> float:
        """Soft-mask temperature at training ``step`` of ``total_steps`` (constant without ``tau_final``)."""
        c = self.config
        if c.tau_final is None:
            return c.tau
        return anneal_tau(step, total_steps, c.tau, c.tau_final, c.tau_schedule)

    # ----- scores
    def scores(self, attn_vv: Tensor | None, attn_tv: Tensor | None, valid: Tensor | None = None,
               text_mask: Tensor | None = None, query_weight: Tensor | None = None,
               slots: UnitSlots | None = None) -> ATPScores:
        """``redundancy_scores`` with the configured mode / causality, detached if configured;
        with ``slots``, rescaled per judging group."""
        groups = None if slots is None else (slots.group, slots.num_groups)
        s = redundancy_scores(attn_vv, attn_tv, valid, text_mask, mode=self.config.score,
                              causal=self.config.causal, query_weight=query_weight, groups=groups)
        return s.detach() if self.config.detach_scores else s

    def scores_from_sums(self, self_sum: Tensor | None, self_own: Tensor | None, cross_sum: Tensor | None,
                         valid: Tensor, text_mask: Tensor | None = None, query_weight: Tensor | None = None,
                         slots: UnitSlots | None = None) -> ATPScores:
        """``scores`` from the column sums of a causal attention (``redundancy_scores_from_sums``)."""
        groups = None if slots is None else (slots.group, slots.num_groups)
        s = redundancy_scores_from_sums(self_sum, self_own, cross_sum, valid, text_mask, mode=self.config.score,
                                        causal=self.config.causal, query_weight=query_weight, groups=groups)
        return s.detach() if self.config.detach_scores else s

    def spatial_for(self, patch_index: Tensor | None, valid: Tensor) -> Tensor:
        """[B, V] spatial score of each slot (0 on padding)."""
        n = self.config.num_patches
        if patch_index is None:
            if valid.shape[1] != n:
                raise ValueError(f"patch_index is required when V = {valid.shape[1]} != N = {n}")
            return self.spatial[None, :].expand(valid.shape[0], n) * valid.float()
        return self.spatial[patch_index.long().clamp(0, n - 1)] * valid.float()

    # ----- several grids per sample
    def units(self, unit: Tensor, patch: Tensor, grids: Sequence[tuple[int, int]], unit_sample: Tensor,
              valid: Tensor, initial: list[int] | None = None, *, samples_in_order: bool | None = None) -> UnitSlots:
        """The ``UnitSlots`` of alive slots ``unit`` / ``patch`` [B, V] (judging groups by the config's
        ``thresholds`` / ``off_grid``); ``initial`` defaults to the judged slots now. ``samples_in_order``:
        whether ``unit_sample`` is 0..B-1 (one unit per sample), when the caller knows it on the host
        (else read from ``unit_sample``)."""
        c = self.config
        unit = torch.where(valid, unit, torch.full_like(unit, -1))
        group, group_sample = U.judge_groups(unit, valid, unit_sample, per=c.thresholds, off_grid=c.off_grid)
        if initial is None:
            initial = (group >= 0).sum(1).tolist()
        if samples_in_order is None:
            samples_in_order = unit_sample.tolist() == list(range(unit.shape[0]))
        per_sample = c.thresholds == "sample" or samples_in_order
        return UnitSlots(unit=unit, patch=patch, grids=tuple(tuple(g) for g in grids), unit_sample=unit_sample,
                         group=group, group_sample=group_sample, initial=list(initial), per_sample=per_sample)

    def spatial_table(self, grid: tuple[int, int]) -> Tensor:
        """[h * w] S_s of a unit's grid: the configured strides on the module's grid, else
        ``default_strides(h, w)`` (the strides scale with the grid)."""
        grid = (int(grid[0]), int(grid[1]))
        if grid == tuple(self.config.grid):
            return self.spatial
        if grid not in self._spatial_tables:
            self._spatial_tables[grid] = spatial_scores(grid[0], grid[1]).to(self.spatial.device)
        return self._spatial_tables[grid].to(self.spatial.device)

    def spatial_units(self, slots: UnitSlots) -> Tensor:
        """[B, V] each judged slot's S_s on its own unit's grid (0 off grid and where not judged)."""
        tables = [self.spatial_table(g) for g in slots.grids]
        return U.slot_lookup(tables, slots.unit, slots.patch) * (slots.group >= 0).float()

    def unit_thresholds(self, layer: int, scores: ATPScores, slots: UnitSlots,
                        prev: Tensor | None = None) -> Thresholds:
        """theta_r, theta_s [G] of the module after ``layer``, one per judging group: MLP input =
        the group's S_self / S_cross maps (x prev, if given) on the module's grid (``unit_maps``,
        ``group_maps``)."""
        if not self.config.learned:
            raise ValueError("fixed-ratio mode (fixed_ratio set) has no learned thresholds")
        self.module_index(layer)
        c = self.config
        on = ((slots.group >= 0) & (slots.unit >= 0)).float()
        rows = []
        for s in (scores.s_self, scores.s_cross):
            v = s * on if prev is None else s * prev * on
            maps = U.unit_maps(v, slots.unit, slots.patch, slots.grids, tuple(c.grid), c.resample)  # [U, N]
            rows.append(U.group_maps(maps, slots.unit_sample, c.thresholds, scores.s_r.shape[0]))
        return self.atp[str(layer)].head(torch.cat(rows, dim=1))

    def _slot_thresholds(self, th: Thresholds, slots: UnitSlots) -> Thresholds:
        """Group thresholds [G] -> each slot's: [B, 1] when the groups are the samples, else [B, V]."""
        if slots.per_sample:
            return Thresholds(None if th.theta_r is None else th.theta_r[:, None],
                              None if th.theta_s is None else th.theta_s[:, None])
        g = slots.group.clamp(min=0)
        return Thresholds(None if th.theta_r is None else th.theta_r[g], None if th.theta_s is None else th.theta_s[g])

    def _fixed_count(self, k: int, slots: UnitSlots) -> Tensor:
        """[B] fixed-ratio count of module k for each sample: round(initial_b * r^k), at least 1."""
        per = {n: fixed_ratio_counts(self.config.fixed_ratio, len(self.layers), n)[k] for n in set(slots.initial)}
        return torch.tensor([per[n] for n in slots.initial], dtype=torch.long, device=slots.group.device)

    def thresholds(self, layer: int, scores: ATPScores, patch_index: Tensor | None = None,
                   prev: Tensor | None = None) -> Thresholds:
        """theta_r, theta_s [B] of the module after ``layer`` (MLP input = scores x prev, if given)."""
        if not self.config.learned:
            raise ValueError("fixed-ratio mode (fixed_ratio set) has no learned thresholds")
        self.module_index(layer)
        s_self, s_cross = scores.s_self, scores.s_cross
        if prev is not None:
            s_self, s_cross = s_self * prev, s_cross * prev
        return self.atp[str(layer)](s_self, s_cross, patch_index, scores.valid)

    # ----- training
    def soft_step(self, layer: int, scores: ATPScores, patch_index: Tensor | None = None,
                  prev: Tensor | None = None, tau: float | None = None, slots: UnitSlots | None = None) -> SoftStep:
        """Soft mask of the module after ``layer``; ``prev`` = cumulative mask so far ([B, V], None at the first).
        ``slots``: the slots' grids (several per sample; ``patch_index`` is then unused)."""
        k = self.module_index(layer)
        c = self.config
        tau = c.tau if tau is None else tau
        valid = scores.valid
        if prev is not None and tuple(prev.shape) != tuple(valid.shape):
            raise ValueError(f"prev (cumulative mask) must have the scores' shape {tuple(valid.shape)}, "
                             f"got {tuple(prev.shape)}")
        if slots is not None:
            judged = slots.group >= 0
            s_s = self.spatial_units(slots)
            slot_th = None
            if c.learned:
                th = self.unit_thresholds(layer, scores, slots, prev)
                slot_th = self._slot_thresholds(th, slots)
                mask = soft_mask(scores.s_r, s_s, slot_th.theta_r, slot_th.theta_s, tau, judged, combine=c.combine)
            else:
                th = Thresholds(None, None)
                prio = fixed_priority(scores.s_r, s_s, redundant=c.redundant, spatial=c.spatial)
                mask = topk_soft_mask(prio, self._fixed_count(k, slots), tau, judged, prev)
            mask = torch.where(valid & ~judged, torch.ones_like(mask), mask)  # unjudged tokens stay
            cum = cumulative_mask(prev, mask)
            return SoftStep(mask=mask, cumulative=cum, count=cum.sum(dim=1), s_s=s_s, thresholds=th,
                            slot_thresholds=slot_th, judged=judged)
        s_s = self.spatial_for(patch_index, valid)
        if c.learned:
            th = self.thresholds(layer, scores, patch_index, prev)
            mask = soft_mask(scores.s_r, s_s, th.theta_r, th.theta_s, tau, valid, combine=c.combine)
        else:
            th = Thresholds(None, None)
            prio = fixed_priority(scores.s_r, s_s, redundant=c.redundant, spatial=c.spatial)
            mask = topk_soft_mask(prio, self.fixed_counts[k], tau, valid, prev)
        cum = cumulative_mask(prev, mask)
        return SoftStep(mask=mask, cumulative=cum, count=cum.sum(dim=1), s_s=s_s, thresholds=th)

    def straight_through(self, scores: ATPScores, step: SoftStep, prev_hard: Tensor | None = None, *,
                         check: bool = True) -> tuple[Tensor, Tensor]:
        """The straight-through budget count of a soft step -> (count [B], hard [B, V] bool).

        ``hard`` is what the hard rule would keep with the step's thresholds (detached; slots the
        rule does not judge are kept), cumulated with ``prev_hard`` (the previous module's
        ``hard``, None at the first); ``count`` has the value ``hard.sum(1)`` and the gradient of
        ``step.count`` (``straight_through_count``). Learned thresholds only. ``check=False``: the
        caller knows every sample has a slot to judge (``hard_keep``'s host read is skipped).
        """
        if not self.config.learned:
            raise ValueError("fixed-ratio mode (fixed_ratio set) has no thresholds to count with")
        th = step.slot_thresholds if step.slot_thresholds is not None else step.thresholds
        judged = step.judged if step.judged is not None else scores.valid
        keep, _ = hard_keep(scores.s_r, step.s_s, None if th.theta_r is None else th.theta_r.detach(),
                            None if th.theta_s is None else th.theta_s.detach(), judged, check=check)
        keep = keep | (scores.valid & ~judged)
        hard = keep if prev_hard is None else prev_hard & keep
        return straight_through_count(hard, step.count), hard

    def log_mask(self, mask: Tensor) -> Tensor:
        """``log_mask`` with the configured eps: the attention bias of a cumulative mask."""
        return log_mask(mask, self.config.log_eps)

    # ----- inference
    def hard_step(self, layer: int, scores: ATPScores, patch_index: Tensor | None = None,
                  slots: UnitSlots | None = None, *, check: bool = True) -> HardStep:
        """Keep mask over the alive slots of the module after ``layer`` (at least 1 per sample).
        ``slots``: the slots' grids (several per sample; ``patch_index`` is then unused): the
        rule decides the judged slots, the others are kept. ``check=False``: the caller knows every
        sample has a slot to judge (``hard_keep``'s check, a host read, is skipped)."""
        k = self.module_index(layer)
        c = self.config
        valid = scores.valid
        if slots is not None:
            judged = slots.group >= 0
            s_s = self.spatial_units(slots)
            if c.learned:
                th = self.unit_thresholds(layer, scores, slots)
                slot_th = self._slot_thresholds(th, slots)
                keep, _ = hard_keep(scores.s_r, s_s, slot_th.theta_r, slot_th.theta_s, judged, check=check)
            else:
                th = Thresholds(None, None)
                prio = fixed_priority(scores.s_r, s_s, redundant=c.redundant, spatial=c.spatial)
                keep, _ = topk_keep(prio, self._fixed_count(k, slots), judged, tiebreak=scores.s_r)
            keep = keep | (valid & ~judged)
            return HardStep(keep=keep, counts=keep.sum(dim=1), s_s=s_s, thresholds=th)
        s_s = self.spatial_for(patch_index, valid)
        if c.learned:
            th = self.thresholds(layer, scores, patch_index)
            keep, counts = hard_keep(scores.s_r, s_s, th.theta_r, th.theta_s, valid, check=check)
        else:
            th = Thresholds(None, None)
            prio = fixed_priority(scores.s_r, s_s, redundant=c.redundant, spatial=c.spatial)
            keep, counts = topk_keep(prio, self.fixed_counts[k], valid, tiebreak=scores.s_r)
        return HardStep(keep=keep, counts=counts, s_s=s_s, thresholds=th)

    # ----- budgets
    def average_tokens(self, counts: Sequence[Tensor | float] | Tensor, initial: Tensor | None = None) -> Tensor:
        """[B] all-layer average; ``initial`` [B]: each sample's visual tokens before the first module
        (default: N)."""
        n = self.config.num_patches if initial is None else initial
        return average_tokens(counts, self.layers, self.config.num_layers, n)

    def per_layer_counts(self, counts: Sequence[Tensor | float] | Tensor) -> Tensor:
        return per_layer_counts(counts, self.layers, self.config.num_layers, self.config.num_patches)

    def budget_loss(self, counts: Sequence[Tensor | float] | Tensor, initial: Tensor | None = None) -> BudgetLoss:
        c = self.config
        return budget_loss(counts, self.layers, c.num_layers, c.num_patches, target=c.target,
                           lambda_atp=c.lambda_atp, lambda_target=c.lambda_target,
                           target_reduction=c.target_reduction, initial=initial)

    # ----- persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``atp_config.json`` and ``atp_weights.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": FORMAT})
        write_config(directory, self.config)

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "ATPPruner":
        """Rebuild a pruner saved by ``save``."""
        from safetensors.torch import load_file

        cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
            raise ValueError(f"{directory} is not an ATP checkpoint: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
        pruner = cls(read_config(cfg_path))
        pruner.load_state_dict(load_file(w_path, device=str(map_location)))
        return pruner.to(map_location)

def per_sample_thresholds(th: Thresholds, slots: UnitSlots, batch: int) -> Thresholds:
    """Thresholds of the judging groups [G] -> [B]: each sample's mean over its groups (its own
    value when it has one)."""
    def mean(t: Tensor | None) -> Tensor | None:
        return None if t is None else U.sample_mean(t, slots.group_sample, batch)
    return Thresholds(mean(th.theta_r), mean(th.theta_s))
