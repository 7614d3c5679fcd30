"""A slow, per-image reference of PruMerge / PruMerge+ (default options), written for clarity.

It follows the algorithm one image and one centre at a time with plain Python control flow, so
that the vectorised ``vlmprune.methods.prumerge.prumerge`` can be checked against it:

1. quartiles of the image's [CLS] attention by linear interpolation; k = number of patches
   strictly above Q3 + 1.5 (Q3 - Q1), at least 1;
2. centres = the k patches of highest attention, in descending order (ties: lower index);
   PruMerge+ appends the raster grid 0, step, 2 step, ... < N - 1 (step = (N // k) // 3, at
   least 1) minus the patches already chosen;
3. each centre i becomes y_i + sum a_j y_j over its ``k_neighbors`` most similar other patches
   (cosine similarity of the keys; any patch, centre or not);
4. one extra token sum a_j y_j over the patches that are not centres, when there are any.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of ``values`` (numpy's default method)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def _centres(attn: list[float], plus: bool) -> list[int]:
    n = len(attn)
    q1, q3 = _quantile(attn, 0.25), _quantile(attn, 0.75)
    fence = q3 + 1.5 * (q3 - q1)
    k = max(1, sum(1 for a in attn if a > fence))
    chosen = sorted(range(n), key=lambda i: (-attn[i], i))[:k]
    if plus:
        step = max(1, (n // k) // 3)
        chosen += [g for g in range(0, n - 1, step) if g not in chosen]
    return chosen


def prumerge_reference(cls_attn: Tensor, keys: Tensor, features: Tensor, *, plus: bool = False,
                       k_neighbors: int = 32) -> list[Tensor]:
    """cls_attn [B, N], keys [B, N, Dk], features [B, N, D] -> one [count, D] tensor per image
    (centres in output order, then the extra token), in the features' dtype."""
    out = []
    for a_row, k_row, y_row in zip(cls_attn.float(), keys.float(), features.float()):
        attn = a_row.tolist()
        n = len(attn)
        centres = _centres(attn, plus)
        unit = k_row / k_row.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [N, Dk]
        sims = unit @ unit.T  # [N, N] cosine similarity
        neighbours = min(k_neighbors, n - 1)
        rows = []
        for i in centres:
            others = sorted((j for j in range(n) if j != i), key=lambda j: -float(sims[i, j]))[:neighbours]
            token = y_row[i].clone()
            for j in others:
                token += attn[j] * y_row[j]
            rows.append(token)
        rest = [j for j in range(n) if j not in centres]
        if rest:
            rows.append(sum(attn[j] * y_row[j] for j in rest))
        out.append(torch.stack(rows).to(features.dtype))
    return out


def peaked_inputs(batch: int, num_tokens: int, dim: int, key_dim: int, *, salient: int = 24,
                  seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A peaked [CLS] attention [B, N] (a few salient patches on a noisy background; rows sum to
    < 1, as with [CLS] attending to itself), keys [B, N, Dk] and features [B, N, D]."""
    g = torch.Generator().manual_seed(seed)
    logits = 0.35 * torch.randn(batch, num_tokens, generator=g)
    hot = torch.rand(batch, num_tokens, generator=g).argsort(dim=1)[:, :salient]
    logits.scatter_add_(1, hot, 2.0 + 2.0 * torch.rand(batch, salient, generator=g))
    with_cls = torch.cat([torch.full((batch, 1), 3.0), logits], dim=1)
    cls_attn = torch.softmax(with_cls, dim=1)[:, 1:]
    keys = torch.randn(batch, num_tokens, key_dim, generator=g)
    features = torch.randn(batch, num_tokens, dim, generator=g)
    return cls_attn, keys, features
