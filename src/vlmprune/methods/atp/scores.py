"""ATP's redundancy scores of the alive visual tokens, from one layer's attention.

Inputs are head-averaged, post-softmax attention rows over the visual keys: ``attn_vv`` [B, V, V]
(visual query slot j, visual key slot i) and ``attn_tv`` [B, T, V] (instruction query rows), or
(``redundancy_scores_from_sums``) only the weighted column sums of those rows, which is all the
scores need when the attention is causal.
``B`` samples, ``V`` alive visual slots per sample in sequence order, padded (``valid`` [B, V]
bool), ``T`` instruction rows, padded (``text_mask`` [B, T] bool). Outputs are [B, V] float32,
0 on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..common import check_choice, check_tensor
from .inputs import valid_mask
from .units import group_rescale

__all__ = ["SCORE_MODES", "ATPScores", "redundancy_scores", "redundancy_scores_from_sums"]

#: ``score`` option: S_r from both scores, or one of them (ablations).
SCORE_MODES = ("both", "self", "cross")


@dataclass
class ATPScores:
    """Redundancy scores of the alive visual tokens, padded; all [B, V] float32, 0 on padding.

    ``s_self`` and ``s_cross`` are rescaled per sample to [0, 1] (divided by their max);
    ``s_r`` is the redundant-pruning score for the configured ``mode``.
    """

    s_self: Tensor
    s_cross: Tensor
    s_r: Tensor
    valid: Tensor  # [B, V] bool

    def detach(self) -> "ATPScores":
        return ATPScores(self.s_self.detach(), self.s_cross.detach(), self.s_r.detach(), self.valid)


def _rescale(s: Tensor, valid: Tensor) -> Tensor:
    """Divide each row by its max over valid slots ([B, V] -> [B, V] in [0, 1]); all-zero stays 0."""
    s = s.masked_fill(~valid, 0.0)
    top = s.amax(dim=1, keepdim=True)  # [B, 1]
    return torch.where(top > 0, s / top.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))


def redundancy_scores(
    attn_vv: Tensor | None,
    attn_tv: Tensor | None,
    valid: Tensor | None = None,
    text_mask: Tensor | None = None,
    *,
    mode: str = "both",
    causal: bool = True,
    query_weight: Tensor | None = None,
    groups: tuple[Tensor, int] | None = None,
) -> ATPScores:
    """S_self, S_cross, S_r from head-averaged post-softmax attention rows over visual keys.

    attn_vv [B, V, V]: row j = visual query slot j, column i = visual key slot i (alive visual
    tokens only, in sequence order). attn_tv [B, T, V]: instruction query rows over the same keys.
    ``S_self(i) = sum_{j sees i, j != i} w_j A[j, i] / sum_{j sees i, j != i} w_j`` where "j sees
    i" is j > i (``causal``) or j != i, and w_j is 1 for valid slots (times ``query_weight``, e.g.
    the cumulative soft mask in training); 0 when no query sees i. ``S_cross(i) = mean over valid
    t of A[t, i]``. Both are divided by their per-sample max; ``S_r`` = their mean (``"both"``)
    or the single score (``"self"`` / ``"cross"``, the other is zeroed; its attention may be None).
    ``groups`` = (group [B, V] long, G): divide by the max over each slot's judging group instead
    (``units.group_rescale``; slots with group -1 get 0). Computed in float32.
    """
    check_choice(mode, "mode", SCORE_MODES)
    need_vv, need_tv = mode != "cross", mode != "self"
    if need_vv:
        check_tensor(attn_vv, "attn_vv", 3, "[B, V, V]")
        if attn_vv.shape[1] != attn_vv.shape[2]:
            raise ValueError(f"attn_vv must be square over the visual slots [B, V, V], got {tuple(attn_vv.shape)}")
    if need_tv:
        check_tensor(attn_tv, "attn_tv", 3, "[B, T, V]")
    ref = attn_vv if need_vv else attn_tv
    batch, vlen, device = ref.shape[0], ref.shape[-1], ref.device
    if need_vv and need_tv and (attn_tv.shape[0] != batch or attn_tv.shape[2] != vlen):
        raise ValueError(f"attn_tv {tuple(attn_tv.shape)} does not match attn_vv {tuple(attn_vv.shape)}: "
                         "expected [B, T, V] with the same B and V")
    valid = valid_mask(valid, batch, vlen, device)
    vf = valid.float()  # [B, V]

    s_self = None
    if need_vv:
        a = attn_vv.float()
        w = vf if query_weight is None else vf * check_tensor(query_weight, "query_weight", 2, "[B, V]").float()
        slots = torch.arange(vlen, device=device)
        sees = slots[:, None] > slots[None, :] if causal else slots[:, None] != slots[None, :]  # [Vq, Vk]
        wq = w[:, :, None] * sees[None].float()  # [B, Vq, Vk] weight of query j for key i
        s_self = _self_score((a * wq).sum(dim=1), wq.sum(dim=1), vf)

    s_cross = None
    if need_tv:
        tmask = valid_mask(text_mask, attn_tv.shape[0], attn_tv.shape[1], device, "text_mask").float()  # [B, T]
        s_cross = _cross_score((attn_tv.float() * tmask[:, :, None]).sum(dim=1), tmask.sum(dim=1), vf)
    return _finish(s_self, s_cross, valid, mode, groups)


def _self_score(num: Tensor, den: Tensor, vf: Tensor) -> Tensor:
    """[B, V] unrescaled S_self from its numerator and (weighted) query count; 0 where none sees i."""
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num)) * vf


def _cross_score(total: Tensor, n_text: Tensor, vf: Tensor) -> Tensor:
    """[B, V] unrescaled S_cross from the sum over valid instruction rows and their number [B]."""
    return total / n_text[:, None].clamp_min(1.0) * vf


def _finish(s_self: Tensor | None, s_cross: Tensor | None, valid: Tensor, mode: str,
            groups: tuple[Tensor, int] | None) -> ATPScores:
    """Rescale both scores (per sample, or per judging group) and combine them into S_r."""
    zeros = torch.zeros(valid.shape, device=valid.device)

    def rescale(x: Tensor | None) -> Tensor:
        if x is None:
            return zeros
        return _rescale(x, valid) if groups is None else group_rescale(x, *groups)

    s_self, s_cross = rescale(s_self), rescale(s_cross)
    if mode == "both":
        s_r = 0.5 * (s_self + s_cross)
    else:
        s_r = s_self if mode == "self" else s_cross
    return ATPScores(s_self=s_self, s_cross=s_cross, s_r=s_r, valid=valid)


def redundancy_scores_from_sums(
    self_sum: Tensor | None,
    self_own: Tensor | None,
    cross_sum: Tensor | None,
    valid: Tensor,
    text_mask: Tensor | None = None,
    *,
    mode: str = "both",
    causal: bool = True,
    query_weight: Tensor | None = None,
    groups: tuple[Tensor, int] | None = None,
) -> ATPScores:
    """``redundancy_scores`` of a causal attention, from column sums instead of the rows.

    With A causal in sequence order (A[j, i] = 0 for j < i) the scores need only
    self_sum [B, V] = sum_j w_j A[j, i] over the visual query slots (w_j = 1 on valid slots, times
    ``query_weight``), self_own [B, V] = A[i, i], and cross_sum [B, V] = sum over the valid
    instruction rows of A[t, i] (``text_mask`` [B, T] counts them): S_self(i) = (self_sum(i) -
    w_i A[i, i]) / sum_{j sees i} w_j. Equal to ``redundancy_scores`` on the rows up to float
    summation order. Sums not needed by ``mode`` may be None.
    """
    check_choice(mode, "mode", SCORE_MODES)
    check_tensor(valid, "valid", 2, "[B, V]", floating=False)
    vf = valid.float()
    needed = [("self_sum", self_sum), ("self_own", self_own)] if mode != "cross" else []
    needed += [("cross_sum", cross_sum)] if mode != "self" else []
    for name, x in needed:
        if check_tensor(x, name, 2, "[B, V]").shape != valid.shape:
            raise ValueError(f"{name} must have the shape of valid {tuple(valid.shape)}, got {tuple(x.shape)}")
    s_self = s_cross = None
    if mode != "cross":
        w = vf if query_weight is None else vf * check_tensor(query_weight, "query_weight", 2, "[B, V]").float()
        num = self_sum.float() - w * self_own.float()
        later = w.flip(1).cumsum(1).flip(1) - w  # [B, V] sum of w_j over j > i
        den = later if causal else w.sum(dim=1, keepdim=True) - w
        s_self = _self_score(num, den, vf)
    if mode != "self":
        n_text = check_tensor(text_mask, "text_mask", 2, "[B, T]", floating=False).float().sum(dim=1)
        s_cross = _cross_score(cross_sum.float(), n_text, vf)
    return _finish(s_self, s_cross, valid, mode, groups)
