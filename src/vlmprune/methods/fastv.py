"""FastV (arXiv 2403.06764) as pure tensor code: rank visual tokens by attention, keep the top k.

The decoder machinery (``vlmprune.integrations.decoder``) captures the attention rows and applies
the decision; this module only ranks and counts:

* Layers 0..K-1 see every token; the ranking uses layer K-1's post-softmax attention; tokens are
  dropped from the input of layer K (default K = 2; K = 0 ranks by layer 0's attention computed
  from its input).
* Score ``"last"`` (the official code): ``a_j = mean_h A[h, last, j]``, the last prompt token's
  row. Score ``"all"`` (the paper's text, "attention received from all tokens"): the mean over
  every prompt query row of the head-averaged attention to column j (softmax over all keys,
  causal, so later columns are seen by fewer queries).
* Keep count: ``k = round(N * (1 - R))`` per sample (N = that sample's visual tokens, R the drop
  ratio, 50% by default), or an explicit count, or an all-layer average budget
  ``B = (K * N + (L - K) * k) / L`` solved for k.
* Survivors stay in their original order; ties in the ranking go to the lower index (a stable sort).

How this differs from the official code, and why: ``docs/design/decoder-methods.md``.

Shapes: B batch, L tokens of the current layout (left-padded), R query rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import rank_of

__all__ = ["topk_visual", "row_scores", "keep_count_ratio", "keep_count_budget"]


def row_scores(attn: Tensor, rows_valid: Tensor) -> Tensor:
    """Mean over the valid query rows: attn [B, R, L] float32, rows_valid [B, R] -> [B, L]."""
    w = rows_valid.to(attn.dtype)
    return (attn * w[:, :, None]).sum(1) / w.sum(1).clamp(min=1)[:, None]


def topk_visual(scores: Tensor, visual: Tensor, k: Tensor) -> Tensor:
    """Keep the top ``k[b]`` visual tokens of each sample by score.

    scores [B, L] float, visual [B, L] bool, k [B] long -> keep [B, L] bool (True only at visual
    tokens). Ties go to the lower column (stable descending sort), so the result is deterministic.
    """
    masked = torch.where(visual, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    rank = rank_of(torch.sort(masked, dim=1, descending=True, stable=True).indices)  # [B, L]
    k = torch.minimum(k.to(rank.device), visual.sum(1))
    return visual & (rank < k[:, None])


def keep_count_ratio(num_visual: Tensor, drop_ratio: float) -> Tensor:
    """``round(N * (1 - R))`` per sample, at least 1 when N > 0. num_visual [B] -> [B] long."""
    k = torch.round(num_visual.double() * (1.0 - drop_ratio)).long()
    return torch.minimum(k.clamp(min=1), num_visual)


def keep_count_budget(num_visual: Tensor, budget: float, k_layer: int, num_layers: int) -> Tensor:
    """k solving ``(K * N + (L - K) * k) / L = budget`` per sample, rounded, clamped to [1, N]."""
    n = num_visual.double()
    k = torch.round((budget * num_layers - k_layer * n) / (num_layers - k_layer)).long()
    return torch.minimum(k.clamp(min=1), num_visual)
