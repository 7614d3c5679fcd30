"""ATP's threshold MLP: one per pruning module, from score maps to per-instance thresholds.

The input is a fixed-size map: the S_self and S_cross of the alive tokens scattered onto the N
patches of the module's grid (zero for pruned or padded patches), [R, 2N]; the output is
theta_r, theta_s [R] (one row per sample, or per judging group with several grids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common import check_tensor, is_int
from .inputs import valid_mask

__all__ = ["Thresholds", "ATPModule"]


@dataclass
class Thresholds:
    """Thresholds of one module, [B] (or [G], one per judging group) float32 each; None for a
    disabled branch."""

    theta_r: Tensor | None
    theta_s: Tensor | None


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class ATPModule(nn.Module):
    """Threshold MLP of one pruning module: scores on the full grid [B, 2N] -> theta_r, theta_s [B].

    ``z = GELU(Linear(2N, hidden)(concat(S_self, S_cross)))``; ``theta = lo + (hi - lo) *
    sigmoid(head(z))`` for each enabled branch (a disabled branch has no head). Inputs are the
    rescaled scores scattered onto the N patches, zero for pruned / padded tokens, so the size is
    fixed whatever the number of survivors.
    """

    def __init__(self, num_patches: int, hidden: int = 256, *, redundant: bool = True, spatial: bool = True,
                 theta_range: tuple[float, float] = (-1.0, 1.0), init_theta_r: float = -0.5,
                 init_theta_s: float = 0.9, init_std: float = 0.01) -> None:
        super().__init__()
        if not (is_int(num_patches) and num_patches >= 1):
            raise ValueError(f"num_patches must be a positive int, got {num_patches!r}")
        if not (is_int(hidden) and hidden >= 1):
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        if not (redundant or spatial):
            raise ValueError("at least one of redundant, spatial must be enabled")
        lo, hi = (float(x) for x in theta_range)
        for name, value in (("init_theta_r", init_theta_r), ("init_theta_s", init_theta_s)):
            if not lo < value < hi:
                raise ValueError(f"{name} = {value} must lie strictly inside theta_range ({lo}, {hi})")
        self.num_patches, self.lo, self.hi = int(num_patches), lo, hi
        self.fc = nn.Linear(2 * num_patches, hidden)
        self.head_r = nn.Linear(hidden, 1) if redundant else None
        self.head_s = nn.Linear(hidden, 1) if spatial else None
        for head, init in ((self.head_r, init_theta_r), (self.head_s, init_theta_s)):
            if head is not None:
                nn.init.normal_(head.weight, std=init_std)
                nn.init.constant_(head.bias, _logit((init - lo) / (hi - lo)))

    def grid_input(self, s_self: Tensor, s_cross: Tensor, patch_index: Tensor | None = None,
                   valid: Tensor | None = None) -> Tensor:
        """[B, V] scores of alive tokens -> [B, 2N] (scattered to their patches; zeros elsewhere)."""
        check_tensor(s_self, "s_self", 2, "[B, V]")
        batch, vlen = s_self.shape
        if tuple(s_cross.shape) != (batch, vlen):
            raise ValueError(f"s_cross must have the shape of s_self {tuple(s_self.shape)}, got {tuple(s_cross.shape)}")
        n = self.num_patches
        valid = valid_mask(valid, batch, vlen, s_self.device)
        if patch_index is None:
            if vlen != n:
                raise ValueError(f"patch_index is required when V = {vlen} != N = {n} (the alive tokens' grid indices)")
            return torch.cat([s_self * valid, s_cross * valid], dim=1).float()
        check_tensor(patch_index, "patch_index", 2, "[B, V]", floating=False)
        if tuple(patch_index.shape) != (batch, vlen):
            raise ValueError(f"patch_index must have shape [{batch}, {vlen}], got {tuple(patch_index.shape)}")
        idx = patch_index.long()
        if bool(((idx < 0) | (idx >= n))[valid].any()):
            raise ValueError(f"patch_index holds indices outside [0, {n - 1}] on valid slots")
        idx = idx.clamp(0, n - 1)
        vf = valid.float()
        zeros = torch.zeros(batch, n, device=s_self.device)
        x_self = zeros.scatter_add(1, idx, s_self.float() * vf)  # [B, N]
        x_cross = zeros.scatter_add(1, idx, s_cross.float() * vf)
        return torch.cat([x_self, x_cross], dim=1)

    def forward(self, s_self: Tensor, s_cross: Tensor, patch_index: Tensor | None = None,
                valid: Tensor | None = None) -> Thresholds:
        return self.head(self.grid_input(s_self, s_cross, patch_index, valid))  # input [B, 2N]

    def head(self, x: Tensor) -> Thresholds:
        """MLP input rows [R, 2N] (S_self map, then S_cross map, on the N patches) -> thresholds [R]."""
        if x.ndim != 2 or x.shape[1] != 2 * self.num_patches:
            raise ValueError(f"the threshold MLP takes [R, {2 * self.num_patches}] inputs, got {tuple(x.shape)}")
        z = F.gelu(self.fc(x.to(self.fc.weight.dtype)))  # [R, hidden]
        span = self.hi - self.lo

        def head(h: nn.Linear | None) -> Tensor | None:
            return None if h is None else (self.lo + span * torch.sigmoid(h(z)[:, 0])).float()

        return Thresholds(theta_r=head(self.head_r), theta_s=head(self.head_s))
