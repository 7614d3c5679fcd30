"""ATP's keep rules at inference: which alive visual slots a module keeps.

Learned thresholds: keep iff ``S_r > theta_r`` or ``S_s > theta_s``, at least one token per
sample. Fixed ratio: the top ``count`` slots by a priority. All tensors [B, V] over the alive
slots (padded; ``valid`` [B, V] bool), thresholds float, [B] or per slot [B, V].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..common import check_tensor, rank_of
from .inputs import count_per_sample, threshold_column, valid_mask

__all__ = ["hard_keep", "fixed_priority", "topk_keep"]


def hard_keep(
    s_r: Tensor,
    s_s: Tensor,
    theta_r: Tensor | float | None,
    theta_s: Tensor | float | None,
    valid: Tensor | None = None,
    *,
    check: bool = True,
) -> tuple[Tensor, Tensor]:
    """Inference rule: keep iff S_r > theta_r or S_s > theta_s. Returns (keep [B, V] bool, counts [B] long).

    A None threshold disables its branch. At least one token is kept per sample: if none passes,
    the valid slot with the largest margin max(S_r - theta_r, S_s - theta_s) is kept. Every sample
    needs a valid slot: ``check=False`` when the caller knows it (the check is a host read).
    """
    check_tensor(s_r, "s_r", 2, "[B, V]")
    batch, vlen = s_r.shape
    if tuple(s_s.shape) != (batch, vlen):
        raise ValueError(f"s_s must have the shape of s_r {tuple(s_r.shape)}, got {tuple(s_s.shape)}")
    valid = valid_mask(valid, batch, vlen, s_r.device)
    if check and not bool(valid.any(dim=1).all()):
        raise ValueError("every sample needs at least one valid visual slot (a row of `valid` is all False)")
    th_r = threshold_column(theta_r, batch, s_r.device, "theta_r")
    th_s = threshold_column(theta_s, batch, s_r.device, "theta_s")
    if th_r is None and th_s is None:
        raise ValueError("hard_keep needs at least one of theta_r, theta_s (both branches disabled)")
    keep = torch.zeros(batch, vlen, dtype=torch.bool, device=s_r.device)
    margin = torch.full((batch, vlen), -math.inf, device=s_r.device)
    for s, th in ((s_r, th_r), (s_s, th_s)):
        if th is not None:
            keep |= s.float() > th
            margin = torch.maximum(margin, s.float() - th)
    keep &= valid
    best = margin.masked_fill(~valid, -math.inf).argmax(dim=1, keepdim=True)  # [B, 1]
    rescue = torch.zeros_like(keep).scatter_(1, best, True) & ~keep.any(dim=1, keepdim=True)
    keep |= rescue
    return keep, keep.sum(dim=1)


def fixed_priority(s_r: Tensor, s_s: Tensor, *, redundant: bool = True, spatial: bool = True) -> Tensor:
    """Fixed-ratio ranking key [B, V]: max(S_r, S_s), or the enabled one."""
    if redundant and spatial:
        return torch.maximum(s_r.float(), s_s.float())
    if redundant or spatial:
        return (s_r if redundant else s_s).float()
    raise ValueError("at least one of redundant, spatial must be enabled")


def _rank(priority: Tensor, valid: Tensor, tiebreak: Tensor | None) -> Tensor:
    """[B, V] long rank (0 = best) by priority desc, then tiebreak desc, then slot; invalid last."""
    order = torch.arange(priority.shape[1], device=priority.device).expand_as(priority)
    if tiebreak is not None:
        order = torch.argsort(tiebreak.float().masked_fill(~valid, -math.inf), dim=1, descending=True, stable=True)
    key = priority.float().masked_fill(~valid, -math.inf).gather(1, order)
    return rank_of(order.gather(1, torch.argsort(key, dim=1, descending=True, stable=True)))


def topk_keep(priority: Tensor, count: int | Tensor, valid: Tensor | None = None,
              tiebreak: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fixed-ratio inference: keep the top ``count`` valid slots by priority (ties: tiebreak, slot).

    Returns (keep [B, V] bool, counts [B] long); counts = min(max(count, 1), valid slots).
    """
    check_tensor(priority, "priority", 2, "[B, V]")
    valid = valid_mask(valid, *priority.shape, priority.device)
    counts = count_per_sample(count, valid)
    keep = (_rank(priority, valid, tiebreak) < counts[:, None]) & valid
    return keep, keep.sum(dim=1)
