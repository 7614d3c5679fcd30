"""Argument normalisation shared by the ATP rules: validity masks, thresholds, requested counts.

Shapes: ``B`` samples, ``V`` alive visual slots per sample (padded).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..common import is_real

__all__ = ["valid_mask", "threshold_column", "count_per_sample"]


def valid_mask(valid: Tensor | None, batch: int, length: int, device: torch.device, name: str = "valid") -> Tensor:
    """[B, V] bool (all True when ``valid`` is None)."""
    if valid is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(valid, Tensor) or tuple(valid.shape) != (batch, length):
        got = tuple(valid.shape) if isinstance(valid, Tensor) else type(valid).__name__
        raise ValueError(f"{name} must be a [{batch}, {length}] bool tensor, got {got}")
    return valid.to(device=device, dtype=torch.bool)


def threshold_column(theta: Tensor | float | None, batch: int, device: torch.device, name: str) -> Tensor | None:
    """A threshold given as a float, a [B] or a [B, 1] tensor -> [B, 1] float32, or per slot [B, V]
    -> [B, V] float32 (None stays None)."""
    if theta is None:
        return None
    if is_real(theta):
        return torch.full((batch, 1), float(theta), device=device)
    if isinstance(theta, Tensor) and theta.ndim == 2 and theta.shape[0] == batch and theta.shape[1] > 1:
        return theta.to(device=device, dtype=torch.float32)
    if isinstance(theta, Tensor) and theta.numel() in (1, batch) and theta.ndim <= 2:
        return theta.reshape(-1, 1).expand(batch, 1).to(device=device, dtype=torch.float32)
    got = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
    raise ValueError(f"{name} must be a float or a [{batch}] tensor, got {got}")


def count_per_sample(count: int | Tensor, valid: Tensor) -> Tensor:
    """Requested count (an int, or [B]) -> [B] long in [1, number of valid slots]."""
    c = torch.as_tensor(count, device=valid.device).reshape(-1).long().expand(valid.shape[0])
    return torch.minimum(c.clamp_min(1), valid.sum(dim=1))
