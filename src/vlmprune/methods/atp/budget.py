"""ATP's module positions and token budget: where the modules sit, the all-layer average of
visual tokens they leave, the budget losses, and the fixed-ratio schedule.

A module "after layer l" (0-indexed) prunes the input of layers l + 1 .. L - 1. ``counts`` are the
visual tokens alive after each module, modules in layer order: a list of K [B] tensors / floats,
or a [B, K] tensor. ``N`` is the number of patches of the module's grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..common import check_choice, is_int, is_real
from ..common import scale_layers as common_scale_layers

__all__ = ["DEFAULT_LAYERS", "DEFAULT_NUM_LAYERS", "TARGET_REDUCTIONS", "check_layers", "scale_layers",
           "average_tokens", "per_layer_counts", "min_average_tokens", "equivalent_target", "BudgetLoss",
           "budget_loss", "fixed_ratio_counts", "fixed_ratio_for_target", "check_target"]

DEFAULT_LAYERS = (2, 8, 14, 20, 26)  # module positions for a 32-layer LLaVA-1.5 (0-indexed)
DEFAULT_NUM_LAYERS = 32
#: ``target_reduction`` option: L_target on the batch-mean average, or per sample.
TARGET_REDUCTIONS = ("batch", "sample")


def check_layers(layers: object, num_layers: int) -> tuple[int, ...]:
    """Validate module positions (strictly increasing, in [0, L - 2]) -> a tuple of ints."""
    if not is_int(num_layers) or num_layers < 2:
        raise ValueError(f"num_layers must be an int >= 2 (a module needs a layer after it), got {num_layers!r}")
    if not (isinstance(layers, (tuple, list)) and len(layers) >= 1 and all(is_int(x) for x in layers)):
        raise ValueError(f"layers must be a non-empty sequence of decoder-layer indices, got {layers!r}")
    out = tuple(int(x) for x in layers)
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"layers must be strictly increasing, got {out}")
    if out[0] < 0 or out[-1] > num_layers - 2:
        raise ValueError(f"layers {out} must lie in [0, {num_layers - 2}]: a module after layer l prunes for "
                         f"layers l+1..{num_layers - 1}, so none may sit after the last layer")
    return out


def scale_layers(num_layers: int, reference: Sequence[int] = DEFAULT_LAYERS,
                 reference_num_layers: int = DEFAULT_NUM_LAYERS) -> tuple[int, ...]:
    """Map module positions of a ``reference_num_layers`` model to one with ``num_layers`` layers.

    The number of layers that run before each module scales proportionally: l -> round((l + 1) * L
    / L_ref) - 1 (half up), clamped to [0, L - 2], duplicates dropped (``common.scale_layers``).
    (2, 8, 14, 20, 26) of 32:
    for 32 -> unchanged; 6 -> (0, 1, 2, 3, 4) (3/32*6 = 0.56 -> 1 layer before the first module,
    9/32*6 = 1.69 -> 2, 2.81 -> 3, 3.94 -> 4, 5.06 -> 5); 4 -> (0, 1, 2); 2 -> (0,).
    """
    if not is_int(num_layers) or num_layers < 2:
        raise ValueError(f"num_layers must be an int >= 2, got {num_layers!r}")
    ref = check_layers(reference, reference_num_layers)
    return tuple(common_scale_layers(ref, num_layers, reference_num_layers, ties="up", collide="drop"))


def average_tokens(counts: Sequence[Tensor | float] | Tensor, layers: Sequence[int], num_layers: int,
                   num_patches: int | Tensor) -> Tensor:
    """[B] visual tokens averaged over all L decoder layers (the paper's "144*" / "88*").

    counts: kept count after each module (K [B] tensors / floats, or [B, K]), modules in layer
    order. Layers 0..l_1 see N tokens; module k after layer l_k sets the count of layers
    l_k + 1 .. l_{k+1} (the last module: up to L - 1):
    ``Nbar = ((l_1 + 1) N + sum_k N_k (l_{k+1} - l_k)) / L`` with l_{K+1} = L - 1. Differentiable.
    ``num_patches`` may be a [B] tensor: each sample's own visual tokens before the first module.
    """
    layers = check_layers(layers, num_layers)
    c = _stack_counts(counts, len(layers))  # [B, K]
    span = torch.tensor([b - a for a, b in zip(layers, layers[1:] + (num_layers - 1,))],
                        dtype=c.dtype, device=c.device)  # [K] layers governed by each module
    return ((layers[0] + 1) * num_patches + (c * span).sum(dim=1)) / num_layers


def per_layer_counts(counts: Sequence[Tensor | float] | Tensor, layers: Sequence[int], num_layers: int,
                     num_patches: int) -> Tensor:
    """[B, L] visual tokens processed by each decoder layer (for reports); its row mean is ``average_tokens``."""
    layers = check_layers(layers, num_layers)
    c = _stack_counts(counts, len(layers))
    cols = [torch.full_like(c[:, :1], float(num_patches)).expand(-1, layers[0] + 1)]
    for k, (a, b) in enumerate(zip(layers, layers[1:] + (num_layers - 1,))):
        cols.append(c[:, k : k + 1].expand(-1, b - a))
    return torch.cat(cols, dim=1)


def min_average_tokens(layers: Sequence[int], num_layers: int, num_patches: int) -> float:
    """Smallest reachable all-layer average: N up to the first module, then 1 token per layer."""
    return float(average_tokens([1.0] * len(tuple(layers)), layers, num_layers, num_patches)[0])


def equivalent_target(target: float, *, to_layers: Sequence[int], to_num_layers: int, num_patches: int = 576,
                      from_layers: Sequence[int] = DEFAULT_LAYERS, from_num_layers: int = DEFAULT_NUM_LAYERS) -> float:
    """Translate an all-layer average target between module layouts, keeping the mean count of the
    layers after the first module the same.

    The paper's 144 / 88 on 32 layers with the first module after layer 2 mean 99.3 / 37.5 tokens on
    the 29 pruned layers; on a 6-layer model with a module after layer 0 (576 at layer 0) that is
    (576 + 5 x 99.3) / 6 = 178.8 and (576 + 5 x 37.5) / 6 = 127.3. (88 itself is unreachable there:
    layer 0 alone contributes 576 / 6 = 96.)
    """
    fl, tl = check_layers(from_layers, from_num_layers), check_layers(to_layers, to_num_layers)
    pruned = (target * from_num_layers - (fl[0] + 1) * num_patches) / (from_num_layers - fl[0] - 1)
    if not 0 < pruned <= num_patches:
        raise ValueError(f"target {target} is not reachable with modules after layers {fl} of {from_num_layers}")
    return ((tl[0] + 1) * num_patches + (to_num_layers - tl[0] - 1) * pruned) / to_num_layers


@dataclass
class BudgetLoss:
    """Budget terms (scalars) and the [B] all-layer average token count they were computed from."""

    total: Tensor  # lambda_atp * l_atp + lambda_target * l_target
    l_atp: Tensor
    l_target: Tensor
    average: Tensor  # [B]
    fraction: Tensor | None = None  # [B] average / the sample's initial visual tokens


def budget_loss(counts: Sequence[Tensor | float] | Tensor, layers: Sequence[int], num_layers: int, num_patches: int,
                *, target: float | None = None, lambda_atp: float = 0.05, lambda_target: float = 1.0,
                target_reduction: str = "batch", initial: Tensor | None = None) -> BudgetLoss:
    """L_atp = mean_b sum_k (N_k / N)(l_k + 1) / L; L_target = |mean_b Nbar / N - target / N| (0 if no target).

    counts are the soft kept counts after each module ([B] each), so both terms are differentiable.
    ``target_reduction="sample"`` averages |Nbar_b / N - target / N| over samples instead.
    ``initial`` [B]: each sample's own visual tokens before the first module (samples of different
    sizes): N_k / N and Nbar / N become N_k / initial_b and Nbar_b / initial_b, the target stays a
    fraction target / N of the module's grid.
    """
    check_choice(target_reduction, "target_reduction", TARGET_REDUCTIONS)
    layers = check_layers(layers, num_layers)
    c = _stack_counts(counts, len(layers))  # [B, K]
    depth = torch.tensor([(l + 1) / num_layers for l in layers], dtype=c.dtype, device=c.device)  # [K]
    if initial is not None:
        n0 = initial.to(device=c.device, dtype=c.dtype)  # [B]
        l_atp = ((c / n0[:, None]) * depth).sum(dim=1).mean()
        avg = average_tokens(c, layers, num_layers, n0)
        frac = avg / n0
        if target is None:
            l_target = torch.zeros((), dtype=c.dtype, device=c.device)
        elif target_reduction == "batch":
            l_target = (frac.mean() - target / num_patches).abs()
        else:
            l_target = (frac - target / num_patches).abs().mean()
        return BudgetLoss(total=lambda_atp * l_atp + lambda_target * l_target, l_atp=l_atp, l_target=l_target,
                          average=avg, fraction=frac)
    l_atp = ((c / num_patches) * depth).sum(dim=1).mean()
    avg = average_tokens(c, layers, num_layers, num_patches)  # [B]
    if target is None:
        l_target = torch.zeros((), dtype=c.dtype, device=c.device)
    elif target_reduction == "batch":
        l_target = (avg.mean() / num_patches - target / num_patches).abs()
    else:
        l_target = (avg / num_patches - target / num_patches).abs().mean()
    return BudgetLoss(total=lambda_atp * l_atp + lambda_target * l_target, l_atp=l_atp, l_target=l_target,
                      average=avg, fraction=avg / num_patches)


def fixed_ratio_counts(ratio: float, num_modules: int, num_patches: int) -> list[int]:
    """Tokens alive after each module when every module keeps the fraction ``ratio`` of the survivors.

    count_k = max(1, round(N * ratio^k)), k = 1..K (rounded half up from the exact geometric value,
    not compounded, so the schedule has no drift).
    """
    return [max(1, int(math.floor(num_patches * ratio ** k + 0.5))) for k in range(1, num_modules + 1)]


def check_target(target: float, layers: Sequence[int], num_layers: int, num_patches: int) -> None:
    """ValueError unless ``target`` (an all-layer average out of ``num_patches`` tokens) is reachable
    with modules after ``layers`` of ``num_layers``: in [min_average_tokens, num_patches]."""
    unit = (f"(targets count the tokens of one image on the module's grid of N = {num_patches}; an image of "
            "another size keeps the fraction target / N)")
    if not (is_real(target) and 0 < target <= num_patches):
        raise ValueError(f"target must be a token count in (0, {num_patches}], got {target!r} {unit}")
    low = min_average_tokens(layers, num_layers, num_patches)
    if target < low:
        raise ValueError(
            f"target {target} is unreachable: with modules after layers {tuple(layers)} of {num_layers}, layers "
            f"0..{layers[0]} always see all {num_patches} tokens, so the all-layer average is at least {low:.2f}; "
            f"raise the target (equivalent_target() translates the paper's 32-layer targets) or move the first "
            f"module earlier {unit}")


def fixed_ratio_for_target(target: float, layers: Sequence[int], num_layers: int, num_patches: int) -> float:
    """The per-module keep ratio r whose all-layer average (with integer counts) is closest to ``target``."""
    layers = check_layers(layers, num_layers)
    check_target(target, layers, num_layers, num_patches)

    def avg(r: float) -> float:
        counts = fixed_ratio_counts(r, len(layers), num_patches)
        return float(average_tokens([float(c) for c in counts], layers, num_layers, num_patches)[0])

    lo, hi = 0.0, 1.0
    for _ in range(60):  # average is non-decreasing in r
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if avg(mid) < target else (lo, mid)
    return hi if abs(avg(hi) - target) <= abs(avg(lo) - target) else max(lo, 1e-12)


def _stack_counts(counts: Sequence[Tensor | float] | Tensor, num_modules: int) -> Tensor:
    """Per-module counts (a list of K [B] tensors / floats, or a [B, K] tensor) -> [B, K] float."""
    if isinstance(counts, Tensor):
        c = counts if counts.ndim == 2 else counts.reshape(1, -1)
    else:
        items = list(counts)
        if not items:
            raise ValueError("counts is empty; pass one kept count per module")
        cols = [torch.as_tensor(x, dtype=torch.float32).reshape(-1) for x in items]
        ref = next((x for x in items if isinstance(x, Tensor)), None)
        batch = max(col.numel() for col in cols)
        cols = [col.expand(batch) if col.numel() == 1 else col for col in cols]
        c = torch.stack([col.to(ref.device) if ref is not None else col for col in cols], dim=1)
    if c.shape[1] != num_modules:
        raise ValueError(f"got counts for {c.shape[1]} modules, but {num_modules} modules are configured")
    return c if c.is_floating_point() else c.float()
