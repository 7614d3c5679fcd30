"""ATP's training maths: soft keep masks, their cumulative product and attention bias, the
temperature schedule, the straight-through budget count and the threshold range hinge.

In training nothing is dropped: each module's soft mask M [B, V] in (0, 1) multiplies the
cumulative mask of the modules before it, and later layers see ``log(cumulative + eps)`` added
to their logits against the visual keys. All tensors [B, V] over the alive visual slots
(padded; ``valid`` [B, V] bool), thresholds float, [B] or per slot [B, V].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..common import check_choice, check_tensor, is_real
from .inputs import count_per_sample, threshold_column, valid_mask
from .thresholds import Thresholds
from .units import UnitSlots, group_range

__all__ = ["COMBINE_MODES", "TAU_SCHEDULES", "soft_mask", "cumulative_mask", "log_mask", "topk_soft_mask",
           "anneal_tau", "straight_through_count", "range_hinge"]

#: ``combine`` option: how the two branches' soft masks combine.
COMBINE_MODES = ("max", "or")
#: ``tau_schedule`` option: how the temperature is annealed over training.
TAU_SCHEDULES = ("exp", "linear", "cosine")


def soft_mask(
    s_r: Tensor,
    s_s: Tensor,
    theta_r: Tensor | float | None,
    theta_s: Tensor | float | None,
    tau: float | Tensor,
    valid: Tensor | None = None,
    *,
    combine: str = "max",
) -> Tensor:
    """[B, V] soft keep mask: M_r = sigmoid((S_r - theta_r) / tau), M_s likewise, M = max(M_r, M_s).

    A threshold of None disables that branch (ablation). ``combine="or"`` gives
    1 - (1 - M_r)(1 - M_s). Padding slots get 0. Thresholds are floats or [B] tensors.
    """
    check_choice(combine, "combine", COMBINE_MODES)
    check_tensor(s_r, "s_r", 2, "[B, V]")
    batch, vlen = s_r.shape
    if tuple(s_s.shape) != (batch, vlen):
        raise ValueError(f"s_s must have the shape of s_r {tuple(s_r.shape)}, got {tuple(s_s.shape)}")
    if is_real(tau) and not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    valid = valid_mask(valid, batch, vlen, s_r.device)
    th_r = threshold_column(theta_r, batch, s_r.device, "theta_r")
    th_s = threshold_column(theta_s, batch, s_r.device, "theta_s")
    if th_r is None and th_s is None:
        raise ValueError("soft_mask needs at least one of theta_r, theta_s (both branches disabled)")
    m_r = torch.sigmoid((s_r.float() - th_r) / tau) if th_r is not None else None
    m_s = torch.sigmoid((s_s.float() - th_s) / tau) if th_s is not None else None
    if m_r is None or m_s is None:
        m = m_r if m_s is None else m_s
    elif combine == "max":
        m = torch.maximum(m_r, m_s)
    else:
        m = 1.0 - (1.0 - m_r) * (1.0 - m_s)
    return m * valid.float()


def cumulative_mask(prev: Tensor | None, mask: Tensor) -> Tensor:
    """Cumulative soft mask after a module: prev * mask (prev None = first module)."""
    return mask if prev is None else prev * mask


def log_mask(mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Additive attention bias for visual keys: log(M + eps) (M = 1 -> ~1e-6, M = 0 -> log eps = -13.8).

    The machinery adds it to the logits of every later query against these visual keys, except a
    query's own key (the diagonal is never masked).
    """
    return torch.log(mask + eps)


def topk_soft_mask(priority: Tensor, count: int | Tensor, tau: float | Tensor, valid: Tensor | None = None,
                   prev: Tensor | None = None) -> Tensor:
    """Fixed-ratio training mask [B, V]: sigmoid((p - t) / tau), t halfway between the k-th and (k+1)-th p.

    Slots with ``prev < 0.5`` (already soft-pruned) rank below every other slot, so the k kept are
    chosen among survivors. If k covers every valid slot, t = min(p) - 1 (keep all).
    """
    check_tensor(priority, "priority", 2, "[B, V]")
    batch, vlen = priority.shape
    valid = valid_mask(valid, batch, vlen, priority.device)
    p = priority.float()
    if prev is not None:
        p = p - 2.0 * (prev < 0.5).float()  # priorities live in [0, 1]: removed slots go below all
    k = count_per_sample(count, valid)  # [B]
    srt = p.masked_fill(~valid, -math.inf).sort(dim=1, descending=True).values  # [B, V]
    n_valid = valid.sum(dim=1)
    kth = srt.gather(1, (k - 1)[:, None])  # [B, 1]
    nxt = srt.gather(1, k.clamp_max(vlen - 1)[:, None])
    t = torch.where((k < n_valid)[:, None], 0.5 * (kth + nxt), kth - 1.0)
    return torch.sigmoid((p - t) / tau) * valid.float()


def anneal_tau(step: int, total_steps: int, start: float = 0.1, end: float = 0.02, schedule: str = "exp") -> float:
    """Temperature at ``step`` of ``total_steps``, from start to end.

    Schedules: ``"exp"`` (geometric, the default), ``"linear"``, ``"cosine"``.
    """
    check_choice(schedule, "schedule", TAU_SCHEDULES)
    if not (start > 0 and end > 0):
        raise ValueError(f"tau start and end must be > 0, got {start}, {end}")
    t = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 1.0
    if schedule == "exp":
        return start * (end / start) ** t
    if schedule == "linear":
        return start + (end - start) * t
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def straight_through_count(hard: Tensor, soft_count: Tensor) -> Tensor:
    """[B] budget count whose value is the hard count and whose gradient is the soft one.

    ``hard`` [B, V] bool: the slots the hard rule keeps (cumulated over the modules so far);
    ``soft_count`` [B]: the sum of the cumulative soft mask. Returns ``hard.sum(1) + (soft_count -
    soft_count.detach())``, so a budget loss on it drives the count inference will see.
    """
    return hard.sum(1).to(soft_count.dtype) + (soft_count - soft_count.detach())


def range_hinge(s_r: Tensor, s_s: Tensor, thresholds: Thresholds, slots: UnitSlots, margin: float) -> Tensor:
    """[B] how far each threshold lies outside [min score - margin, max score + margin], summed
    over the two branches and over a sample's judging groups.

    ``s_r``, ``s_s`` [B, V] the slots' scores; ``thresholds`` [G], one per judging group of
    ``slots``; the range of a group is taken over its own slots (``units.group_range``). A
    disabled branch (threshold None) adds nothing.
    """
    out = torch.zeros(slots.num_groups, device=s_r.device)
    for s, t in ((s_r, thresholds.theta_r), (s_s, thresholds.theta_s)):
        if t is None:
            continue
        lo, hi = group_range(s, slots.group, slots.num_groups)
        out = out + torch.relu((lo - margin) - t) + torch.relu(t - (hi + margin))
    return torch.zeros(s_r.shape[0], device=s_r.device).index_add(0, slots.group_sample, out)
