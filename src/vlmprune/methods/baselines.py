"""Vision-stage baselines at a given budget: random, sequential, spatial lattice, [CLS] top-k.

None of them merges: the output tokens are the selected input rows, unchanged, padded to the
batch maximum (``common.Reduction``, ``extra=None``). A budget ``n`` is an int count in [1, N], a
float ratio in (0, 1] (floor(ratio * N)) or a [B] integer tensor of per-sample counts, e.g. the
counts PruMerge chose, for an equal-budget comparison image by image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import (Fetch, Reduction, check_choice, check_tensor, grid_shape, lattice_mask, rank_of,
                     resolve_budget, select_chosen)

__all__ = ["random_keep", "sequential_keep", "spatial_keep", "cls_topk"]


def _check_features(features: object) -> tuple[int, int]:
    check_tensor(features, "features", 3, "[B, N, D]")
    batch, num_tokens, _ = features.shape
    if batch < 1 or num_tokens < 1:
        raise ValueError(f"features must have B >= 1 and N >= 1, got shape {tuple(features.shape)}")
    return batch, num_tokens


def random_keep(features: Tensor, n: int | float | Tensor, *, generator: torch.Generator | None = None,
                fetch: Fetch | None = None) -> Reduction:
    """n patches per sample drawn uniformly without replacement, in ascending patch order.

    ``fetch`` (every method here takes one): how the counts reach the host, see ``common.Fetch``."""
    batch, num_tokens = _check_features(features)
    counts = resolve_budget(n, num_tokens, batch, features.device, "n")
    noise = torch.rand(batch, num_tokens, generator=generator, device=features.device)  # [B, N]
    order = noise.argsort(dim=1)  # [B, N] a uniform random permutation per sample
    positions = torch.arange(num_tokens, device=features.device).expand(batch, num_tokens)
    rank = rank_of(order)  # [B, N] rank of each patch
    return select_chosen(features, positions, rank < counts[:, None], num_tokens, fetch)


def sequential_keep(features: Tensor, n: int | float | Tensor, *, fetch: Fetch | None = None) -> Reduction:
    """The first n patches in raster order (the paper's "sequential" sampling ablation)."""
    batch, num_tokens = _check_features(features)
    counts = resolve_budget(n, num_tokens, batch, features.device, "n")
    positions = torch.arange(num_tokens, device=features.device).expand(batch, num_tokens)
    return select_chosen(features, positions, positions < counts[:, None], num_tokens, fetch)


def spatial_keep(features: Tensor, n: int | float | Tensor, grid_size: int | tuple[int, int] | None = None, *,
                 fetch: Fetch | None = None) -> Reduction:
    """A centred, uniform r x c lattice with r * c as close to n as the grid allows (~n tokens).

    r, c minimise |r c - n|, then the aspect mismatch with the grid, then r (e.g. n = 40 on 24 x 24
    gives the paper's 5 x 8; n = 37 gives 6 x 6 = 36). Row i sits at floor((i + 1/2) H / r), column
    j at floor((j + 1/2) W / c). ``counts`` reports the exact number kept. ``grid_size`` (H, W) is
    needed when N is not a square.
    """
    batch, num_tokens = _check_features(features)
    height, width = grid_shape(num_tokens, grid_size)
    counts = resolve_budget(n, num_tokens, batch, features.device, "n")
    positions = torch.arange(num_tokens, device=features.device).expand(batch, num_tokens)
    return select_chosen(features, positions, lattice_mask(counts, height, width), num_tokens, fetch)


def cls_topk(cls_attn: Tensor, features: Tensor, n: int | float | Tensor, *, order: str = "attention",
             fetch: Fetch | None = None) -> Reduction:
    """The n patches with the highest [CLS] attention, no merge (the paper's "AITS only").

    ``order="attention"`` (default, PruMerge's order): descending attention, ties to the lower
    index; ``order="spatial"``: ascending patch index. For the adaptive (IQR) count use
    ``prumerge(..., k_neighbors=0, extra_token=False)``, which is exactly that.
    """
    batch, num_tokens = _check_features(features)
    check_tensor(cls_attn, "cls_attn", 2, "[B, N]")
    if tuple(cls_attn.shape) != (batch, num_tokens):
        raise ValueError(
            f"cls_attn must have shape [B, N] = {(batch, num_tokens)} to match features, "
            f"got {tuple(cls_attn.shape)}"
        )
    check_choice(order, "order", ("attention", "spatial"))
    counts = resolve_budget(n, num_tokens, batch, features.device, "n")
    ranked = torch.sort(cls_attn.float(), dim=1, descending=True, stable=True).indices  # [B, N]
    positions = torch.arange(num_tokens, device=features.device).expand(batch, num_tokens)
    rank = torch.empty_like(ranked).scatter_(1, ranked, positions)  # [B, N]
    key = rank if order == "attention" else positions
    return select_chosen(features, key, rank < counts[:, None], num_tokens, fetch, finite=cls_attn)
