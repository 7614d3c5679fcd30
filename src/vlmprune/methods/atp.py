"""ATP-LLaVA: learnable, instance- and layer-wise visual-token pruning between decoder layers.

Model-agnostic tensor code (torch only). The decoder-stage machinery (``integrations/decoder.py``)
computes head-averaged, post-softmax attention rows after a pruning layer and calls in here; this
file never sees a model. Design: the ATP-LLaVA paper; every choice it leaves open is a
config option of ``ATPConfig`` and is written down where it is implemented.

Flow at a module sitting after decoder layer ``l`` (0-indexed)::

    scores = pruner.scores(attn_vv, attn_tv, valid, text_mask)      # S_self, S_cross, S_r  [B, V]
             (training: query_weight=prev, the cumulative mask so far, weights the visual query rows)
    train:  step = pruner.soft_step(l, scores, patch_index, prev)   # soft M, cumulative, soft count
            prev = step.cumulative
            bias = log_mask(step.cumulative)                        # added to later layers' visual keys
            ...  loss = task + pruner.budget_loss([step.count for each module]).total
    infer:  step = pruner.hard_step(l, scores, patch_index)         # keep [B, V] over alive slots

Shapes. ``B`` samples; ``V`` alive visual tokens per sample, padded to the batch maximum (ragged
batches: ``valid`` [B, V] bool says which slots hold a token; valid slots must appear in sequence
order, padding may sit anywhere); ``T`` instruction (text) query rows, padded, ``text_mask`` [B, T];
``N`` the number of patches of the full grid (576 = 24 x 24 for LLaVA-1.5); ``patch_index`` [B, V]
long gives the grid index (0..N-1) of the token in each slot (anything, e.g. -1, on padding).

Decisions taken here (beyond the spec's [decision] items):

* Threshold range. The spec asks for ``theta = sigmoid(.)`` in (0, 1) initialised at
  theta_r ~ 0.1 "so that almost every token is kept". With max-rescaled scores that does not
  hold: most visual tokens get S_r << 0.1 (attention is heavy-tailed), so the hard rule would
  drop them at step 0, and the soft mask of a token with S_r = 0 can never exceed
  sigmoid((0 - 0) / tau) = 0.5 while theta > 0. Thresholds therefore live in
  ``theta_range = (-1, 1)``: ``theta = lo + (hi - lo) * sigmoid(head(z))``, initialised at
  theta_r = -0.5 (every token passes the hard rule; soft M_r >= sigmoid(0.5 / 0.1) = 0.9933 for
  every token, so after 5 modules the cumulative mask is >= 0.967 even for a token scoring 0
  everywhere; with tau annealed to 0.02 it is 1 - 1e-11) and theta_s = 0.9 (only the stride-8
  grid passes the spatial rule, S_s = 0.953 > 0.9, which matters once theta_r has risen). When
  redundant pruning is disabled (ablation), theta_s starts at ``init_theta_r`` instead, so that
  run also starts from "keep everything". Head weights start at N(0, 0.01) so every instance
  starts within ~1e-2 of those values and every parameter gets a gradient from step one.
* ``M = max(M_r, M_s)`` (spec) sends the gradient only to the larger branch: at the start M_r
  wins everywhere, so theta_s gets no gradient until theta_r has risen enough that M_s > M_r on
  some grid tokens. ``combine="or"`` (``1 - (1 - M_r)(1 - M_s)``, equal to max at 0/1) is a
  smooth alternative that feeds both heads always.
* S_self: causal by default - key i is seen by the valid visual query slots after it; the token
  itself is excluded; a key that no other visual query can see (the last visual token) gets
  S_self = 0 before rescaling. S_cross of a sample without instruction rows is 0. Rescaling
  divides by the per-sample max over valid slots (an all-zero score stays zero).
  ``score="self"`` / ``"cross"`` (ablations) set S_r to that single rescaled score (not halved, so
  thresholds keep their scale) and zero the other score everywhere, MLP input included.
* Scores are detached by default (``detach_scores``): the budget trains the thresholds, not the
  LLM's attention pattern. In training the MLP input is ``score * prev`` (prev = cumulative soft
  mask), the soft analogue of "zeros for tokens already pruned".
* Hard rule: keep iff S_r > theta_r or S_s > theta_s (strict). If a sample would keep nothing,
  the alive token with the largest margin max(S_r - theta_r, S_s - theta_s) is kept, so every
  sample always has at least one visual token (the machinery never sees an empty image).
* Budget: module k after layer l_k affects layers l_k + 1 .. L - 1; the token count of layer j
  is N for j <= l_1, N_k for l_k < j <= l_{k+1}, N_K after the last module; Nbar = mean over
  the L layers. ``L_atp = mean_b sum_k (N_k / N) * (l_k + 1) / L`` (l_k + 1 = decoder layers
  that run before module k, i.e. the spec's l_k counted 1-based). ``L_target =
  |mean_b(Nbar) / N - N_target / N|`` on the batch mean by default: a per-sample absolute value
  (``target_reduction="sample"``) would pull every instance to the target and remove the
  adaptivity the method exists for.
* Spatial grids: see ``default_strides`` and ``spatial_grids``.
* Several grids per sample (LLaVA-NeXT, Qwen2-VL; ``UnitSlots``, helpers in ``atp_units``): each
  slot's S_s is its unit's own spatial score; thresholds per unit (``thresholds="unit"``: each
  unit is rescaled by its own max and its score maps, resampled onto the module's grid, feed the
  MLP) or per sample (``"sample"``: rescaled over the sample, MLP input = the mean of its units'
  resampled maps); off-grid tokens are always kept (``off_grid="keep"``) or judged by S_r with the
  unit before them (``"score"``). One unit per sample on the module's grid gives the numbers of
  the one-grid path exactly. Budgets then count each sample against its own initial visual
  tokens (``budget_loss(initial=...)``).
* Fixed-ratio mode (the paper's Table 2 ablation): no threshold MLPs; module k keeps
  ``max(1, round(N * r^k))`` tokens (every module keeps the same fraction r of the survivors),
  ranked by ``max(S_r, S_s)`` (just S_r / S_s when a branch is disabled), ties by S_r then slot.
  In training the soft mask is ``sigmoid((p - t) / tau)`` with t halfway between the k-th and
  (k+1)-th priority, so both arms train in the same soft regime. ``fixed_ratio_for_target``
  solves r for an all-layer average.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import atp_units as U

__all__ = [
    "DEFAULT_LAYERS",
    "DEFAULT_NUM_LAYERS",
    "SCORE_MODES",
    "ATPScores",
    "Thresholds",
    "SoftStep",
    "HardStep",
    "BudgetLoss",
    "ATPConfig",
    "ATPModule",
    "ATPPruner",
    "UnitSlots",
    "redundancy_scores",
    "default_strides",
    "spatial_grids",
    "spatial_scores",
    "soft_mask",
    "cumulative_mask",
    "log_mask",
    "hard_keep",
    "fixed_priority",
    "topk_keep",
    "topk_soft_mask",
    "fixed_ratio_counts",
    "fixed_ratio_for_target",
    "anneal_tau",
    "scale_layers",
    "per_layer_counts",
    "average_tokens",
    "min_average_tokens",
    "equivalent_target",
    "budget_loss",
]

DEFAULT_LAYERS = (2, 8, 14, 20, 26)  # module positions for a 32-layer LLaVA-1.5 (0-indexed)
DEFAULT_NUM_LAYERS = 32
SCORE_MODES = ("both", "self", "cross")
COMBINE_MODES = ("max", "or")
TARGET_REDUCTIONS = ("batch", "sample")
TAU_SCHEDULES = ("exp", "linear", "cosine")
CONFIG_NAME = "atp_config.json"
WEIGHTS_NAME = "atp_weights.safetensors"
FORMAT = "vlmprune-atp"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- small helpers


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_tensor(x: object, name: str, ndim: int, what: str, *, floating: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {what}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {what}, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _valid_mask(valid: Tensor | None, batch: int, length: int, device: torch.device, name: str = "valid") -> Tensor:
    """[B, V] bool (all True when ``valid`` is None)."""
    if valid is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(valid, Tensor) or tuple(valid.shape) != (batch, length):
        got = tuple(valid.shape) if isinstance(valid, Tensor) else type(valid).__name__
        raise ValueError(f"{name} must be a [{batch}, {length}] bool tensor, got {got}")
    return valid.to(device=device, dtype=torch.bool)


def _per_sample(theta: Tensor | float | None, batch: int, device: torch.device, name: str) -> Tensor | None:
    """A threshold given as a float, a [B] or a [B, 1] tensor -> [B, 1] float32, or per slot [B, V]
    -> [B, V] float32 (None stays None)."""
    if theta is None:
        return None
    if _is_real(theta):
        return torch.full((batch, 1), float(theta), device=device)
    if isinstance(theta, Tensor) and theta.ndim == 2 and theta.shape[0] == batch and theta.shape[1] > 1:
        return theta.to(device=device, dtype=torch.float32)
    if isinstance(theta, Tensor) and theta.numel() in (1, batch) and theta.ndim <= 2:
        return theta.reshape(-1, 1).expand(batch, 1).to(device=device, dtype=torch.float32)
    got = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
    raise ValueError(f"{name} must be a float or a [{batch}] tensor, got {got}")


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


# --------------------------------------------------------------------------- scores


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
    (``atp_units.group_rescale``; slots with group -1 get 0). Computed in float32.
    """
    _check_choice(mode, "mode", SCORE_MODES)
    need_vv, need_tv = mode != "cross", mode != "self"
    if need_vv:
        _check_tensor(attn_vv, "attn_vv", 3, "[B, V, V]")
        if attn_vv.shape[1] != attn_vv.shape[2]:
            raise ValueError(f"attn_vv must be square over the visual slots [B, V, V], got {tuple(attn_vv.shape)}")
    if need_tv:
        _check_tensor(attn_tv, "attn_tv", 3, "[B, T, V]")
    ref = attn_vv if need_vv else attn_tv
    batch, vlen, device = ref.shape[0], ref.shape[-1], ref.device
    if need_vv and need_tv and (attn_tv.shape[0] != batch or attn_tv.shape[2] != vlen):
        raise ValueError(f"attn_tv {tuple(attn_tv.shape)} does not match attn_vv {tuple(attn_vv.shape)}: "
                         "expected [B, T, V] with the same B and V")
    valid = _valid_mask(valid, batch, vlen, device)
    vf = valid.float()  # [B, V]
    zeros = torch.zeros(batch, vlen, device=device)

    s_self = zeros
    if need_vv:
        a = attn_vv.float()
        w = vf if query_weight is None else vf * _check_tensor(query_weight, "query_weight", 2, "[B, V]").float()
        slots = torch.arange(vlen, device=device)
        sees = slots[:, None] > slots[None, :] if causal else slots[:, None] != slots[None, :]  # [Vq, Vk]
        wq = w[:, :, None] * sees[None].float()  # [B, Vq, Vk] weight of query j for key i
        num = (a * wq).sum(dim=1)  # [B, Vk]
        den = wq.sum(dim=1)  # [B, Vk] (weighted) number of queries that can see key i
        s_self = torch.where(den > 0, num / den.clamp_min(1e-12), zeros) * vf
        s_self = _rescale(s_self, valid) if groups is None else U.group_rescale(s_self, *groups)

    s_cross = zeros
    if need_tv:
        tmask = _valid_mask(text_mask, attn_tv.shape[0], attn_tv.shape[1], device, "text_mask").float()  # [B, T]
        n_text = tmask.sum(dim=1, keepdim=True)  # [B, 1]
        s_cross = (attn_tv.float() * tmask[:, :, None]).sum(dim=1) / n_text.clamp_min(1.0) * vf  # [B, V]
        s_cross = _rescale(s_cross, valid) if groups is None else U.group_rescale(s_cross, *groups)

    if mode == "both":
        s_r = 0.5 * (s_self + s_cross)
    else:
        s_r = s_self if mode == "self" else s_cross
    return ATPScores(s_self=s_self, s_cross=s_cross, s_r=s_r, valid=valid)


# --------------------------------------------------------------------------- spatial score


def _grid_hw(num_patches: int, grid: object) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"num_patches = {num_patches} is not a square; pass grid=(H, W) with H * W == N")
        return side, side
    if _is_int(grid):
        grid = (grid, grid)
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(_is_int(g) for g in grid)):
        raise ValueError(f"grid must be an int or a pair of ints (H, W), got {grid!r}")
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1 or h * w != num_patches:
        raise ValueError(f"grid {(h, w)} does not match num_patches = {num_patches} (need H * W == N)")
    return h, w


def default_strides(height: int, width: int) -> tuple[int, ...]:
    """Strides of the nested grids for an H x W map: (4f, 2f, f), f = max(1, round(sqrt(HW) / 12)).

    24 x 24 (LLaVA-1.5) -> (8, 4, 2): 3, 6, 12 points per side, 9 / 36 / 144 tokens. The strides
    scale with the side, so a 48 x 48 map gets (16, 8, 4) and the same 3 / 6 / 12 points per side
    (lower sampling rates, hence higher scores); small maps bottom out at stride 1 (16 x 16 and
    4 x 4 -> (4, 2, 1)). A grid whose rate R >= 1/3 has score 1 - 3R <= 0 and is ignored.
    """
    f = max(1, int(math.floor(math.sqrt(height * width) / 12 + 0.5)))
    return (4 * f, 2 * f, f)


def _check_strides(strides: object) -> tuple[int, ...]:
    if not (isinstance(strides, (tuple, list)) and len(strides) >= 1 and all(_is_int(s) and s >= 1 for s in strides)):
        raise ValueError(f"spatial strides must be a non-empty sequence of positive ints, got {strides!r}")
    s = tuple(int(x) for x in strides)
    for a, b in zip(s, s[1:]):
        if not (a > b and a % b == 0):
            raise ValueError(f"spatial strides {s} must be decreasing, each a multiple of the next "
                             "(so the grids are nested), e.g. (8, 4, 2)")
    return s


def _axis_offset(length: int, strides: tuple[int, ...]) -> int:
    """Common offset o: the grid of stride s on this axis is {p : p = o (mod s)}, nested by construction.

    o minimises the left/right margin imbalance of the coarsest grid, then of the next, ...; ties go
    to the smaller o. Exactly centred nested grids do not exist (the centre of a 2-block falls
    between its sub-blocks); on 24: o = 3 -> stride 8 at {3, 11, 19}, 4 at {3, 7, ..., 23}, 2 at
    {1, 3, ..., 23}.
    """
    best, best_cost = 0, None
    for o in range(min(strides[0], length)):
        cost = []
        for s in strides:
            first = o % s
            last = first + ((length - 1 - first) // s) * s
            cost.append(abs(first - (length - 1 - last)))
        if best_cost is None or cost < best_cost:
            best, best_cost = o, cost
    return best


def spatial_grids(height: int, width: int, strides: Sequence[int] | None = None) -> list[Tensor]:
    """Nested uniform grids on an H x W map, coarsest first: a list of [H*W] bool masks (raster order)."""
    strides = default_strides(height, width) if strides is None else _check_strides(strides)
    oh, ow = _axis_offset(height, strides), _axis_offset(width, strides)
    rows, cols = torch.arange(height), torch.arange(width)
    out = []
    for s in strides:
        m = ((rows % s) == (oh % s))[:, None] & ((cols % s) == (ow % s))[None, :]  # [H, W]
        out.append(m.reshape(-1))
    return out


def spatial_scores(height: int, width: int, strides: Sequence[int] | None = None) -> Tensor:
    """[H*W] float32 S_s: max over grids containing the patch of 1 - 3 R (R = grid tokens / N); 0 off-grid.

    24 x 24, strides (8, 4, 2): 9 tokens -> 1 - 3/64 = 0.953125, 36 -> 1 - 3/16 = 0.8125,
    144 -> 1 - 3/4 = 0.25, all other 432 tokens 0. Grids with R >= 1/3 contribute 0.
    """
    n = height * width
    score = torch.zeros(n)
    for g in spatial_grids(height, width, strides):
        value = max(0.0, 1.0 - 3.0 * float(g.sum()) / n)
        score = torch.where(g, torch.clamp(score, min=value), score)
    return score


# --------------------------------------------------------------------------- masks and keep rules


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
    _check_choice(combine, "combine", COMBINE_MODES)
    _check_tensor(s_r, "s_r", 2, "[B, V]")
    batch, vlen = s_r.shape
    if tuple(s_s.shape) != (batch, vlen):
        raise ValueError(f"s_s must have the shape of s_r {tuple(s_r.shape)}, got {tuple(s_s.shape)}")
    if _is_real(tau) and not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    valid = _valid_mask(valid, batch, vlen, s_r.device)
    th_r = _per_sample(theta_r, batch, s_r.device, "theta_r")
    th_s = _per_sample(theta_s, batch, s_r.device, "theta_s")
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


def hard_keep(
    s_r: Tensor,
    s_s: Tensor,
    theta_r: Tensor | float | None,
    theta_s: Tensor | float | None,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Inference rule: keep iff S_r > theta_r or S_s > theta_s. Returns (keep [B, V] bool, counts [B] long).

    A None threshold disables its branch. At least one token is kept per sample: if none passes,
    the valid slot with the largest margin max(S_r - theta_r, S_s - theta_s) is kept.
    """
    _check_tensor(s_r, "s_r", 2, "[B, V]")
    batch, vlen = s_r.shape
    if tuple(s_s.shape) != (batch, vlen):
        raise ValueError(f"s_s must have the shape of s_r {tuple(s_r.shape)}, got {tuple(s_s.shape)}")
    valid = _valid_mask(valid, batch, vlen, s_r.device)
    if not bool(valid.any(dim=1).all()):
        raise ValueError("every sample needs at least one valid visual slot (a row of `valid` is all False)")
    th_r = _per_sample(theta_r, batch, s_r.device, "theta_r")
    th_s = _per_sample(theta_s, batch, s_r.device, "theta_s")
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
    order = order.gather(1, torch.argsort(key, dim=1, descending=True, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return rank


def _count_per_sample(count: int | Tensor, valid: Tensor) -> Tensor:
    """Requested count -> [B] long in [1, number of valid slots]."""
    c = torch.as_tensor(count, device=valid.device).reshape(-1).long().expand(valid.shape[0])
    return torch.minimum(c.clamp_min(1), valid.sum(dim=1))


def topk_keep(priority: Tensor, count: int | Tensor, valid: Tensor | None = None,
              tiebreak: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fixed-ratio inference: keep the top ``count`` valid slots by priority (ties: tiebreak, slot).

    Returns (keep [B, V] bool, counts [B] long); counts = min(max(count, 1), valid slots).
    """
    _check_tensor(priority, "priority", 2, "[B, V]")
    valid = _valid_mask(valid, *priority.shape, priority.device)
    counts = _count_per_sample(count, valid)
    keep = (_rank(priority, valid, tiebreak) < counts[:, None]) & valid
    return keep, keep.sum(dim=1)


def topk_soft_mask(priority: Tensor, count: int | Tensor, tau: float | Tensor, valid: Tensor | None = None,
                   prev: Tensor | None = None) -> Tensor:
    """Fixed-ratio training mask [B, V]: sigmoid((p - t) / tau), t halfway between the k-th and (k+1)-th p.

    Slots with ``prev < 0.5`` (already soft-pruned) rank below every other slot, so the k kept are
    chosen among survivors. If k covers every valid slot, t = min(p) - 1 (keep all).
    """
    _check_tensor(priority, "priority", 2, "[B, V]")
    batch, vlen = priority.shape
    valid = _valid_mask(valid, batch, vlen, priority.device)
    p = priority.float()
    if prev is not None:
        p = p - 2.0 * (prev < 0.5).float()  # priorities live in [0, 1]: removed slots go below all
    k = _count_per_sample(count, valid)  # [B]
    srt = p.masked_fill(~valid, -math.inf).sort(dim=1, descending=True).values  # [B, V]
    n_valid = valid.sum(dim=1)
    kth = srt.gather(1, (k - 1)[:, None])  # [B, 1]
    nxt = srt.gather(1, k.clamp_max(vlen - 1)[:, None])
    t = torch.where((k < n_valid)[:, None], 0.5 * (kth + nxt), kth - 1.0)
    return torch.sigmoid((p - t) / tau) * valid.float()


def fixed_ratio_counts(ratio: float, num_modules: int, num_patches: int) -> list[int]:
    """Tokens alive after each module when every module keeps the fraction ``ratio`` of the survivors.

    count_k = max(1, round(N * ratio^k)), k = 1..K (rounded half up from the exact geometric value,
    not compounded, so the schedule has no drift).
    """
    return [max(1, int(math.floor(num_patches * ratio ** k + 0.5))) for k in range(1, num_modules + 1)]


def fixed_ratio_for_target(target: float, layers: Sequence[int], num_layers: int, num_patches: int) -> float:
    """The per-module keep ratio r whose all-layer average (with integer counts) is closest to ``target``."""
    layers = _check_layers(layers, num_layers)
    lo_avg = float(average_tokens([1.0] * len(layers), layers, num_layers, num_patches)[0])
    if not lo_avg <= target <= num_patches:
        raise ValueError(f"target {target} is outside the reachable range [{lo_avg:.2f}, {num_patches}] "
                         f"for modules after layers {layers} of {num_layers}")

    def avg(r: float) -> float:
        counts = fixed_ratio_counts(r, len(layers), num_patches)
        return float(average_tokens([float(c) for c in counts], layers, num_layers, num_patches)[0])

    lo, hi = 0.0, 1.0
    for _ in range(60):  # average is non-decreasing in r
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if avg(mid) < target else (lo, mid)
    return hi if abs(avg(hi) - target) <= abs(avg(lo) - target) else max(lo, 1e-12)


def anneal_tau(step: int, total_steps: int, start: float = 0.1, end: float = 0.02, schedule: str = "exp") -> float:
    """Temperature at ``step`` of ``total_steps``, from start to end.

    Schedules: ``"exp"`` (geometric, the default), ``"linear"``, ``"cosine"``.
    """
    _check_choice(schedule, "schedule", TAU_SCHEDULES)
    if not (start > 0 and end > 0):
        raise ValueError(f"tau start and end must be > 0, got {start}, {end}")
    t = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 1.0
    if schedule == "exp":
        return start * (end / start) ** t
    if schedule == "linear":
        return start + (end - start) * t
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------- layers and budgets


def _check_layers(layers: object, num_layers: int) -> tuple[int, ...]:
    if not _is_int(num_layers) or num_layers < 2:
        raise ValueError(f"num_layers must be an int >= 2 (a module needs a layer after it), got {num_layers!r}")
    if not (isinstance(layers, (tuple, list)) and len(layers) >= 1 and all(_is_int(x) for x in layers)):
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
    / L_ref) - 1 (half up), clamped to [0, L - 2], duplicates dropped. (2, 8, 14, 20, 26) of 32:
    for 32 -> unchanged; 6 -> (0, 1, 2, 3, 4) (3/32*6 = 0.56 -> 1 layer before the first module,
    9/32*6 = 1.69 -> 2, 2.81 -> 3, 3.94 -> 4, 5.06 -> 5); 4 -> (0, 1, 2); 2 -> (0,).
    """
    if not _is_int(num_layers) or num_layers < 2:
        raise ValueError(f"num_layers must be an int >= 2, got {num_layers!r}")
    ref = _check_layers(reference, reference_num_layers)
    out: list[int] = []
    for l in ref:
        before = int(math.floor((l + 1) * num_layers / reference_num_layers + 0.5))
        layer = min(max(before - 1, 0), num_layers - 2)
        if not out or layer > out[-1]:
            out.append(layer)
    return tuple(out)


def average_tokens(counts: Sequence[Tensor | float] | Tensor, layers: Sequence[int], num_layers: int,
                   num_patches: int | Tensor) -> Tensor:
    """[B] visual tokens averaged over all L decoder layers (the paper's "144*" / "88*").

    counts: kept count after each module (K [B] tensors / floats, or [B, K]), modules in layer
    order. Layers 0..l_1 see N tokens; module k after layer l_k sets the count of layers
    l_k + 1 .. l_{k+1} (the last module: up to L - 1):
    ``Nbar = ((l_1 + 1) N + sum_k N_k (l_{k+1} - l_k)) / L`` with l_{K+1} = L - 1. Differentiable.
    ``num_patches`` may be a [B] tensor: each sample's own visual tokens before the first module.
    """
    layers = _check_layers(layers, num_layers)
    c = _stack_counts(counts, len(layers))  # [B, K]
    span = torch.tensor([b - a for a, b in zip(layers, layers[1:] + (num_layers - 1,))],
                        dtype=c.dtype, device=c.device)  # [K] layers governed by each module
    return ((layers[0] + 1) * num_patches + (c * span).sum(dim=1)) / num_layers


def per_layer_counts(counts: Sequence[Tensor | float] | Tensor, layers: Sequence[int], num_layers: int,
                     num_patches: int) -> Tensor:
    """[B, L] visual tokens processed by each decoder layer (for reports); its row mean is ``average_tokens``."""
    layers = _check_layers(layers, num_layers)
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
    fl, tl = _check_layers(from_layers, from_num_layers), _check_layers(to_layers, to_num_layers)
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
    _check_choice(target_reduction, "target_reduction", TARGET_REDUCTIONS)
    layers = _check_layers(layers, num_layers)
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


# --------------------------------------------------------------------------- threshold MLP


@dataclass
class Thresholds:
    """Per-sample thresholds, [B] float32 each; None for a disabled branch."""

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
        if not (_is_int(num_patches) and num_patches >= 1):
            raise ValueError(f"num_patches must be a positive int, got {num_patches!r}")
        if not (_is_int(hidden) and hidden >= 1):
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
        _check_tensor(s_self, "s_self", 2, "[B, V]")
        batch, vlen = s_self.shape
        if tuple(s_cross.shape) != (batch, vlen):
            raise ValueError(f"s_cross must have the shape of s_self {tuple(s_self.shape)}, got {tuple(s_cross.shape)}")
        n = self.num_patches
        valid = _valid_mask(valid, batch, vlen, s_self.device)
        if patch_index is None:
            if vlen != n:
                raise ValueError(f"patch_index is required when V = {vlen} != N = {n} (the alive tokens' grid indices)")
            return torch.cat([s_self * valid, s_cross * valid], dim=1).float()
        _check_tensor(patch_index, "patch_index", 2, "[B, V]", floating=False)
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


# --------------------------------------------------------------------------- config and container


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ATPConfig:
    """Configuration of an ATPPruner; validated on construction (ValueError says what to pass)."""

    num_layers: int = _opt(DEFAULT_NUM_LAYERS, "decoder layers L of the LLM")
    layers: tuple[int, ...] | None = _opt(None, "module positions (0-indexed, a module acts after that layer); "
                                                "None = (2, 8, 14, 20, 26) of 32 scaled to num_layers (scale_layers)")
    num_patches: int = _opt(576, "patches N of the full visual grid (MLP input size is 2N)")
    grid: tuple[int, int] | None = _opt(None, "(H, W) of the patch grid; None = square sqrt(N)")
    spatial_strides: tuple[int, ...] | None = _opt(None, "strides of the nested grids, coarsest first; "
                                                         "None = default_strides(H, W), (8, 4, 2) on 24 x 24")
    hidden: int = _opt(256, "hidden width of the threshold MLP")
    tau: float = _opt(0.1, "soft-mask temperature (start value when annealed)")
    tau_final: float | None = _opt(None, "anneal tau to this value over training (e.g. 0.02); None = constant")
    tau_schedule: str = _opt("exp", "annealing schedule: exp | linear | cosine")
    lambda_atp: float = _opt(0.05, "weight of L_atp")
    lambda_target: float = _opt(1.0, "weight of L_target")
    target: float | None = _opt(None, "target visual tokens averaged over all decoder layers (e.g. 144); "
                                      "None = no L_target")
    target_reduction: str = _opt("batch", "L_target on the batch-mean average (batch) or per sample (sample)")
    score: str = _opt("both", "redundancy score: both | self | cross (ablations)")
    redundant: bool = _opt(True, "redundant pruning branch (theta_r) enabled")
    spatial: bool = _opt(True, "spatial pruning branch (theta_s) enabled")
    combine: str = _opt("max", "branch combination of the soft mask: max (spec) | or (1-(1-Mr)(1-Ms))")
    fixed_ratio: float | None = _opt(None, "fixed-ratio ablation: every module keeps this fraction of the "
                                           "survivors, no thresholds learned; None = learned thresholds")
    theta_range: tuple[float, float] = _opt((-1.0, 1.0), "(lo, hi) of theta = lo + (hi - lo) sigmoid(.)")
    init_theta_r: float = _opt(-0.5, "initial theta_r (keeps every token at the start)")
    init_theta_s: float | None = _opt(None, "initial theta_s; None = 0.9, or init_theta_r when redundant=False")
    causal: bool = _opt(True, "S_self counts only the later visual queries (causal LLM)")
    detach_scores: bool = _opt(True, "treat scores as constants (gradients reach the thresholds only)")
    log_eps: float = _opt(1e-6, "eps of the additive log-mask log(M + eps)")
    thresholds: str = _opt("unit", "samples with several grids: one threshold pair per unit (unit) or per "
                                   "sample (sample)")
    off_grid: str = _opt("keep", "visual tokens on no grid (LLaVA-NeXT newlines): always kept (keep) or judged "
                                 "by S_r with the unit before them (score)")
    resample: str = _opt("area", "how a unit's score map of another size reaches the MLP's grid: area | bilinear")

    def __post_init__(self) -> None:
        if not _is_int(self.num_layers) or self.num_layers < 2:
            raise ValueError(f"num_layers must be an int >= 2, got {self.num_layers!r}")
        if self.layers is None:
            self.layers = scale_layers(self.num_layers)
        self.layers = _check_layers(self.layers, self.num_layers)
        if not _is_int(self.num_patches) or self.num_patches < 1:
            raise ValueError(f"num_patches must be a positive int, got {self.num_patches!r}")
        self.grid = _grid_hw(self.num_patches, self.grid)
        if self.spatial_strides is not None:
            self.spatial_strides = _check_strides(self.spatial_strides)
        if not _is_int(self.hidden) or self.hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {self.hidden!r}")
        for name in ("tau", "tau_final"):
            v = getattr(self, name)
            if v is not None and not (_is_real(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite float > 0, got {v!r}")
        _check_choice(self.tau_schedule, "tau_schedule", TAU_SCHEDULES)
        for name in ("lambda_atp", "lambda_target"):
            v = getattr(self, name)
            if not (_is_real(v) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite float >= 0, got {v!r}")
        _check_choice(self.target_reduction, "target_reduction", TARGET_REDUCTIONS)
        _check_choice(self.score, "score", SCORE_MODES)
        _check_choice(self.combine, "combine", COMBINE_MODES)
        if not (self.redundant or self.spatial):
            raise ValueError("redundant and spatial are both False: enable at least one pruning branch")
        if self.fixed_ratio is not None and not (_is_real(self.fixed_ratio) and 0 < self.fixed_ratio <= 1):
            raise ValueError(f"fixed_ratio must be a float in (0, 1] (fraction of survivors kept per module) "
                             f"or None, got {self.fixed_ratio!r}")
        tr = self.theta_range
        if not (isinstance(tr, (tuple, list)) and len(tr) == 2 and all(_is_real(x) for x in tr) and tr[0] < tr[1]):
            raise ValueError(f"theta_range must be a pair (lo, hi) with lo < hi, got {tr!r}")
        self.theta_range = (float(tr[0]), float(tr[1]))
        if self.init_theta_s is None:
            self.init_theta_s = 0.9 if self.redundant else self.init_theta_r
        for name in ("init_theta_r", "init_theta_s"):
            v = getattr(self, name)
            if not (_is_real(v) and self.theta_range[0] < v < self.theta_range[1]):
                raise ValueError(f"{name} = {v!r} must lie strictly inside theta_range {self.theta_range}")
        _check_choice(self.thresholds, "thresholds", U.THRESHOLD_UNITS)
        _check_choice(self.off_grid, "off_grid", U.OFF_GRID)
        _check_choice(self.resample, "resample", U.RESAMPLE)
        if not (_is_real(self.log_eps) and self.log_eps > 0):
            raise ValueError(f"log_eps must be > 0, got {self.log_eps!r}")
        if self.target is not None:
            if not (_is_real(self.target) and 0 < self.target <= self.num_patches):
                raise ValueError(f"target must be a token count in (0, {self.num_patches}], got {self.target!r}")
            low = min_average_tokens(self.layers, self.num_layers, self.num_patches)
            if self.target < low:
                raise ValueError(
                    f"target {self.target} is unreachable: with modules after layers {self.layers} of "
                    f"{self.num_layers}, layers 0..{self.layers[0]} always see all {self.num_patches} tokens, so "
                    f"the all-layer average is at least {low:.2f}; raise the target (equivalent_target() "
                    f"translates the paper's 32-layer targets) or move the first module earlier")

    @property
    def learned(self) -> bool:
        return self.fixed_ratio is None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ATPConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ATPConfig field(s): {', '.join(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})


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
class UnitSlots:
    """Where a batch's alive visual slots lie (see ``atp_units``), for ``ATPPruner.units``.

    ``unit`` [B, V] long: global unit of each grid slot (-1 off grid / padding); ``patch`` [B, V]
    long: raster index in its unit's grid; ``grids``: (h, w) of each unit; ``unit_sample`` [U]
    long: the sample of each unit; ``group`` [B, V] long: the judging group of each slot (-1: not
    judged, always kept); ``group_sample`` [G] long; ``initial`` [B] long: judged slots of each
    sample before the first module (fixed-ratio counts are fractions of it).
    """

    unit: Tensor
    patch: Tensor
    grids: tuple[tuple[int, int], ...]
    unit_sample: Tensor
    group: Tensor
    group_sample: Tensor
    initial: list[int]
    per_sample: bool = False  # group b holds exactly sample b's judged slots (G = B)

    @property
    def num_groups(self) -> int:
        return int(self.group_sample.numel())


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
        if layer not in self.layers:
            raise ValueError(f"no ATP module after layer {layer}; modules sit after layers {self.layers}")
        return self.layers.index(layer)

    def tau_at(self, step: int, total_steps: int) -> float:
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
              valid: Tensor, initial: list[int] | None = None) -> UnitSlots:
        """The ``UnitSlots`` of alive slots ``unit`` / ``patch`` [B, V] (judging groups by the config's
        ``thresholds`` / ``off_grid``); ``initial`` defaults to the judged slots now."""
        c = self.config
        unit = torch.where(valid, unit, torch.full_like(unit, -1))
        group, group_sample = U.judge_groups(unit, valid, unit_sample, per=c.thresholds, off_grid=c.off_grid)
        if initial is None:
            initial = (group >= 0).sum(1).tolist()
        per_sample = c.thresholds == "sample" or unit_sample.tolist() == list(range(unit.shape[0]))
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

    def log_mask(self, mask: Tensor) -> Tensor:
        return log_mask(mask, self.config.log_eps)

    # ----- inference
    def hard_step(self, layer: int, scores: ATPScores, patch_index: Tensor | None = None,
                  slots: UnitSlots | None = None) -> HardStep:
        """Keep mask over the alive slots of the module after ``layer`` (at least 1 per sample).
        ``slots``: the slots' grids (several per sample; ``patch_index`` is then unused): the
        rule decides the judged slots, the others are kept."""
        k = self.module_index(layer)
        c = self.config
        valid = scores.valid
        if slots is not None:
            judged = slots.group >= 0
            s_s = self.spatial_units(slots)
            if c.learned:
                th = self.unit_thresholds(layer, scores, slots)
                slot_th = self._slot_thresholds(th, slots)
                keep, _ = hard_keep(scores.s_r, s_s, slot_th.theta_r, slot_th.theta_s, judged)
            else:
                th = Thresholds(None, None)
                prio = fixed_priority(scores.s_r, s_s, redundant=c.redundant, spatial=c.spatial)
                keep, _ = topk_keep(prio, self._fixed_count(k, slots), judged, tiebreak=scores.s_r)
            keep = keep | (valid & ~judged)
            return HardStep(keep=keep, counts=keep.sum(dim=1), s_s=s_s, thresholds=th)
        s_s = self.spatial_for(patch_index, valid)
        if c.learned:
            th = self.thresholds(layer, scores, patch_index)
            keep, counts = hard_keep(scores.s_r, s_s, th.theta_r, th.theta_s, valid)
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
        with open(os.path.join(directory, CONFIG_NAME), "w") as fh:
            json.dump({"format": FORMAT, "version": FORMAT_VERSION, "config": self.config.to_dict()}, fh, indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "ATPPruner":
        """Rebuild a pruner saved by ``save``."""
        from safetensors.torch import load_file

        cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
            raise ValueError(f"{directory} is not an ATP checkpoint: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
        with open(cfg_path) as fh:
            meta = json.load(fh)
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{cfg_path} is not a {FORMAT} v{FORMAT_VERSION} config "
                             f"(format={meta.get('format')!r}, version={meta.get('version')!r})")
        pruner = cls(ATPConfig.from_dict(meta["config"]))
        pruner.load_state_dict(load_file(w_path, device=str(map_location)))
        return pruner.to(map_location)
