"""PruMerge and PruMerge+ (arXiv 2403.15388) as batched, vectorised tensor code.

Per image, with the defaults (what the authors' code computes):

1. ``cls_attention``: a = softmax(q_cls K^T / sqrt(C)) over all N+1 keys, [CLS] column dropped.
2. Adaptive selection (AITS): k = #{a_i > Q3 + 1.5 (Q3 - Q1)} (at least 1); the kept set S =
   top-k by a, in descending attention order.
3. PruMerge+ only: raster grid G = arange(0, N-1, max(1, floor(floor(N/k)/3))); centres
   S+ = [S; G \\ S].
4. Token supplement (TS): every centre i gets y_i + sum_{j in N_i} a_j y_j where N_i are the
   k_neighbors patches (any other patch, kept or not) with the most similar L2-normalised keys.
5. An extra token e = sum_{j not a centre} a_j y_j is appended last (when some patch is not a
   centre).

Everything is vectorised over batch and tokens: ragged per-image counts are padded to the batch
maximum (see ``common.Reduction``). Internal maths is float32 except the key-similarity product of
16-bit keys, which is taken in their dtype as in the official code (``sim_dtype``); the output has
the input dtype.
Where this differs from the authors' code (which runs at batch size 1 only) is listed on
``prumerge``; the reasons are in ``docs/design/vision-methods.md``.

Shapes: ``B`` images, ``N`` patches ([CLS] excluded), ``C`` / ``Dk`` key width, ``D`` feature width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (Fetch, Reduction, check_choice, check_tensor, fetch_counts, grid_shape, lattice_mask,
                     order_chosen, rank_of, resolve_budget, spread_priority)
from .neighbours import neighbour_sums

__all__ = [
    "cls_attention",
    "iqr_outlier_count",
    "raster_grid_mask",
    "prumerge",
]


# --------------------------------------------------------------------------- signals


def cls_attention(q: Tensor, k: Tensor, *, num_heads: int | None = None) -> Tensor:
    """[CLS] attention over the patches: q, k [B, N+1, C] (raw q_proj / k_proj outputs) -> [B, N].

    Default (``num_heads=None``, what PruMerge uses): one softmax over the concatenated
    heads, ``softmax(q_0 K^T / sqrt(C))`` over all N+1 keys including [CLS], then the [CLS]
    column is dropped without renormalising (rows sum to < 1). With ``num_heads=h`` it is the
    usual per-head attention of row 0, ``mean_h softmax(q_0h K_h^T / sqrt(C/h))``, [CLS] column
    dropped. Only row 0 is computed (O(N C), never the (N+1)^2 matrix). Always float32: bf16
    scores would tie and change the IQR count.
    """
    check_tensor(q, "q", 3, "[B, N+1, C]")
    check_tensor(k, "k", 3, "[B, N+1, C]")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, N+1, C], got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, seq, dim = k.shape
    if seq < 2:
        raise ValueError(f"q and k need the [CLS] token plus at least one patch (N+1 >= 2), got N+1 = {seq}")
    q0 = q[:, 0].float()  # [B, C]
    kf = k.float()  # [B, N+1, C]
    if num_heads is None:
        logits = torch.bmm(kf, q0[:, :, None])[:, :, 0] / math.sqrt(dim)  # [B, N+1]
        return torch.softmax(logits, dim=-1)[:, 1:]  # [B, N]
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads must be a positive int dividing C = {dim}, got {num_heads!r}")
    head_dim = dim // num_heads
    qh = q0.reshape(batch, num_heads, head_dim)  # [B, h, c]
    kh = kf.reshape(batch, seq, num_heads, head_dim)  # [B, N+1, h, c]
    logits = torch.einsum("bhc,bthc->bht", qh, kh) / math.sqrt(head_dim)  # [B, h, N+1]
    return torch.softmax(logits, dim=-1).mean(dim=1)[:, 1:]  # [B, N]


# --------------------------------------------------------------------------- selection


def _quartile_fence(descending: Tensor) -> Tensor:
    """[B, N] float32 sorted descending -> [B] float32 upper fence Q3 + 1.5 (Q3 - Q1).

    Q1, Q3 by linear interpolation (numpy's default; bit-identical to ``np.percentile`` and
    ``torch.quantile`` in float32). The fence is rounded once to float32 from float64, as numpy
    1.x evaluated the official ``Q3 + 1.5 * IQR``.
    """
    last = descending.shape[1] - 1

    def quantile(q: float) -> Tensor:
        pos = q * last  # position in ascending order; ascending[p] = descending[last - p]
        lo = math.floor(pos)
        hi = min(lo + 1, last)
        return torch.lerp(descending[:, last - lo], descending[:, last - hi], pos - lo)  # [B]

    q1, q3 = quantile(0.25), quantile(0.75)
    if descending.device.type == "mps":  # no float64 there: fence in float32 (may differ by 1 ulp)
        return q3 + 1.5 * (q3 - q1)
    return (q3.double() + 1.5 * (q3 - q1).double()).float()


def iqr_outlier_count(cls_attn: Tensor) -> Tensor:
    """[B, N] scores -> [B] long k = #{a_i > Q3 + 1.5 (Q3 - Q1)} per row (no k = 0 fallback).

    Quartiles in float32 with linear interpolation, strict comparison in float32.
    """
    a = cls_attn.float()  # [B, N]
    fence = _quartile_fence(a.sort(dim=1, descending=True).values)  # [B]
    return (a > fence[:, None]).sum(dim=1)


def _grid_step(k: Tensor, num_tokens: int) -> Tensor:
    """[B] attention counts -> [B] PruMerge+ grid step int(int(N / k) / 3), clamped to >= 1.

    The official ``int(1 / r)`` with r = k / N equals floor(N / k) here in exact integers. k > N/3
    gives step 0 (official: arange crash); with the IQR rule k <= N/4 + 1/2 < N/3 for N > 2, so the
    clamp only matters for N <= 2 (where the k = 0 -> 1 fallback gives step 0). k = 0 counts as 1.
    """
    return ((num_tokens // k.clamp(min=1)) // 3).clamp(min=1)


def raster_grid_mask(k: Tensor, num_tokens: int) -> Tensor:
    """[B] attention counts -> [B, N] bool: PruMerge+'s raster grid arange(0, N-1, step).

    step as in ``_grid_step`` (clamped to >= 1). Index N-1 is never on the grid, as in the official
    ``arange(0, 575, step)``.
    """
    step = _grid_step(k, num_tokens)  # [B]
    n = torch.arange(num_tokens, device=k.device)[None, :]  # [1, N]
    return (n % step[:, None] == 0) & (n < num_tokens - 1)


def _rank(a: Tensor, descending: bool = True) -> Tensor:
    """[B, N] -> [B, N] long position of each patch in sorted-score order (ties: lower index first)."""
    return rank_of(torch.sort(a, dim=1, descending=descending, stable=True).indices)


def _even_fill(in_s: Tensor, need: Tensor) -> Tensor:
    """Evenly spaced raster fill: need[b] patches outside S, at complement positions floor(i |P| / need)."""
    batch, num_tokens = in_s.shape
    n = torch.arange(num_tokens, device=in_s.device)[None, :]
    complement = torch.argsort(torch.where(in_s, n + num_tokens, n), dim=1)  # [B, N] ascending, S last
    free = num_tokens - in_s.sum(dim=1)  # [B] |P| >= need
    i = torch.arange(num_tokens, device=in_s.device)[None, :]  # [1, N]: need <= N, no host read of max(need)
    pos = (i * free[:, None]) // need.clamp(min=1)[:, None]  # [B, G] < free where valid
    valid = i < need[:, None]
    picked = complement.gather(1, pos.clamp(max=num_tokens - 1))  # [B, N]
    picked = torch.where(valid, picked, num_tokens)  # invalid -> dump column
    out = torch.zeros(batch, num_tokens + 1, dtype=torch.bool, device=in_s.device)
    return out.scatter_(1, picked, True)[:, :num_tokens]


def _lattice_fill(in_s: Tensor, need: Tensor, height: int, width: int) -> Tensor:
    """Exactly need[b] patches outside S: a 2-D lattice of ~need points first, then spread order."""
    num_tokens = in_s.shape[1]
    lattice = lattice_mask(need, height, width)  # [B, N]
    prio = spread_priority(height, width, in_s.device)[None, :]  # [1, N]
    key = torch.where(lattice, prio, prio + num_tokens)
    key = torch.where(in_s, torch.full_like(key, 3 * num_tokens), key)  # S never picked
    return _rank(key, descending=False) < need[:, None]


# --------------------------------------------------------------------------- PruMerge


def prumerge(
    cls_attn: Tensor,
    keys: Tensor,
    features: Tensor,
    *,
    plus: bool = False,
    k_neighbors: int = 32,
    merge: str = "residual",
    extra_token: bool = True,
    grid: str = "raster",
    order: str = "attention",
    keep: int | float | Tensor | None = None,
    grid_size: int | tuple[int, int] | None = None,
    sim_dtype: str = "keys",
    fetch: Fetch | None = None,
) -> Reduction:
    """PruMerge / PruMerge+ token reduction; defaults reproduce the official code per image.

    Args:
        cls_attn: [B, N] [CLS] attention over the N patches (``cls_attention``); must be finite
            (checked: NaN or inf raise ValueError).
        keys: [B, N, Dk] patch keys of the last layer ([CLS] dropped), not normalised.
        features: [B, N, D] patch features to reduce (LLaVA: penultimate layer, before projector).
            keys and features are not scanned for NaN (a full pass over them would cost about as
            much as the reduction); a NaN there propagates to the output.
        plus: PruMerge+ — add the spatial grid to the centres.
        k_neighbors: neighbours merged into each centre (official: 32; clamped to N - 1; 0 turns
            the merge off, i.e. the paper's "AITS only" selection).
        merge: "residual" (official: y_i + sum a_j y_j, unnormalised) or "average" (paper:
            sum a_j y_j / sum a_j over the neighbours, the centre itself not included; y_i is
            kept when the neighbour weights sum to 0).
        extra_token: append e = sum of a_j y_j over the non-centre patches (official: yes).
        grid: PruMerge+ grid. "raster" (official arange(0, N-1, step), column stripes when step
            divides the width) or "2d" (a centred 2-D lattice with as many points as the raster
            grid; needs a square N or ``grid_size``).
        order: "attention" (official: attention-selected centres by descending attention, then
            grid centres ascending) or "spatial" (all centres by ascending patch index). The
            extra token is last either way.
        keep: fixed budget instead of the IQR rule: int count in [1, N], float ratio in (0, 1]
            (floor of ratio * N, >= 1) or a [B] tensor of per-image counts. It counts the centres (the extra token
            comes on top). PruMerge: the top-``keep`` patches by attention. PruMerge+:
            max(1, round(keep / 4)) attention centres (the official ~1:3 attention:grid ratio),
            and the rest filled with exactly as many patches outside S, evenly spaced in raster
            order ("raster") or on a 2-D lattice topped up in coarse-to-fine order ("2d").
        grid_size: (H, W) or side of the patch grid, for ``grid="2d"`` when N is not square.
        sim_dtype: precision of the key-similarity product. "keys" (official): 16-bit keys (bf16,
            fp16) are L2-normalised and multiplied in their own dtype, as the authors' code does
            with the tower's fp16 keys; other keys in float32. "float32": always float32 (the
            neighbour sets of bf16 keys then differ at near-ties from the official ones).
        fetch: how the centre counts (and the finiteness check of ``cls_attn``) reach the host,
            called once (``common.Fetch``; default ``tolist``).

    Returns:
        ``Reduction`` with tokens [B, M, D] (input dtype), counts [B], indices [B, M'] of the
        centres in output order (the extra token has no index), extra [B] bool (None when
        ``extra_token=False``) and num_attention [B].

    Behaviour that differs from the official code (``docs/design/vision-methods.md``):

    * the IQR fence is computed per image, not over the pooled batch (equal at batch size 1);
    * k = 0 (no attention outlier, e.g. a flat map): k = 1, the top-attention patch;
    * a PruMerge+ grid step of 0 (k > N/3, only for N <= 2 with the IQR rule) is clamped to 1;
      ``keep`` does not use the step formula;
    * G \\ S empty: no grid centre is added for that image;
    * k_neighbors >= N: every other patch is a neighbour (clamped to N - 1);
    * every patch a centre (only possible with ``keep``): no extra token, ``extra[b]`` is False;
    * counts and the grid step are exact integers: N * (k / N) = k and floor(N / k) (the official
      float arithmetic loses one for some N, e.g. N = 729; identical for N = 576);
    * exact ties in attention go to the lower patch index; exact ties in key similarity at the
      k_neighbors boundary are broken arbitrarily (as with torch.topk in the official code).
    """
    check_tensor(cls_attn, "cls_attn", 2, "[B, N]")
    check_tensor(keys, "keys", 3, "[B, N, Dk]")
    check_tensor(features, "features", 3, "[B, N, D]")
    batch, num_tokens = cls_attn.shape
    if batch < 1 or num_tokens < 1:
        raise ValueError(f"cls_attn must have B >= 1 and N >= 1, got shape {tuple(cls_attn.shape)}")
    if keys.shape[:2] != cls_attn.shape or features.shape[:2] != cls_attn.shape:
        raise ValueError(
            f"cls_attn [B, N] = {tuple(cls_attn.shape)}, keys [B, N, Dk] = {tuple(keys.shape)} and "
            f"features [B, N, D] = {tuple(features.shape)} must agree on B and N "
            f"(drop the [CLS] token from keys and features)"
        )
    if not (cls_attn.device == keys.device == features.device):
        raise ValueError(
            f"cls_attn, keys and features must be on one device, got "
            f"{cls_attn.device}, {keys.device}, {features.device}"
        )
    if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, int) or k_neighbors < 0:
        raise ValueError(f"k_neighbors must be an int >= 0 (official: 32), got {k_neighbors!r}")
    if not isinstance(plus, bool) or not isinstance(extra_token, bool):
        raise ValueError(f"plus and extra_token must be bools, got plus={plus!r}, extra_token={extra_token!r}")
    check_choice(merge, "merge", ("residual", "average"))
    check_choice(grid, "grid", ("raster", "2d"))
    check_choice(order, "order", ("attention", "spatial"))
    check_choice(sim_dtype, "sim_dtype", ("keys", "float32"))
    hw = None
    if grid_size is not None or (plus and grid == "2d"):
        hw = grid_shape(num_tokens, grid_size)
    budget = None if keep is None else resolve_budget(keep, num_tokens, batch, cls_attn.device, "keep")

    device = cls_attn.device
    a = cls_attn.float()  # [B, N]
    desc = torch.sort(a, dim=1, descending=True, stable=True)  # ties: lower patch index first

    # ---- 1. attention-selected set S: the k_attn first patches of `desc`
    if budget is None:
        fence = _quartile_fence(desc.values)  # [B], IQR per image
        k_attn = (a > fence[:, None]).sum(dim=1).clamp(min=1)  # [B], k = 0 -> 1
    elif plus:
        k_attn = ((budget + 2) // 4).clamp(min=1)  # [B] round(keep / 4), >= 1
    else:
        k_attn = budget

    # ---- 2. centres in output order, padded to the batch maximum Mc
    if not plus and order == "attention":  # centres = S in descending attention: a prefix of `desc`
        n_centres = k_attn
        host = fetch_counts(n_centres, fetch, finite=cls_attn)  # the call's one host synchronisation
        mc = max(host)
        centres = desc.indices[:, :mc]  # [B, Mc]
        valid = torch.arange(mc, device=device)[None, :] < n_centres[:, None]  # [B, Mc]
        is_centre = torch.zeros_like(a, dtype=torch.bool).scatter_(1, torch.where(valid, centres, centres[:, :1]), True)
    else:
        n = torch.arange(num_tokens, device=device)[None, :]  # [1, N]
        rank = rank_of(desc.indices)  # [B, N] position of each patch in descending-attention order
        in_s = rank < k_attn[:, None]  # [B, N]
        if not plus:
            in_g = torch.zeros_like(in_s)
        elif budget is None:  # PruMerge+ grid G' = G \ S
            if grid == "raster":
                in_g = raster_grid_mask(k_attn, num_tokens)
            else:
                step = _grid_step(k_attn, num_tokens)  # [B]
                size = (num_tokens - 2) // step + 1 if num_tokens >= 2 else torch.zeros_like(step)
                in_g = lattice_mask(size, *hw)  # as many points as the raster grid, len(arange(0, N-1, step))
            in_g = in_g & ~in_s
        else:
            need = budget - k_attn  # [B] >= 0 grid centres, all outside S
            in_g = _even_fill(in_s, need) if grid == "raster" else _lattice_fill(in_s, need, *hw)
        is_centre = in_s | in_g  # [B, N]
        if order == "attention":
            key = torch.where(in_s, rank, n + num_tokens)  # S by attention, then grid ascending
        else:
            key = n.expand(batch, num_tokens)  # ascending patch index
        host = fetch_counts(is_centre.sum(dim=1), fetch, finite=cls_attn)  # the call's one host synchronisation
        mc = max(host)
        centres, valid, n_centres = order_chosen(key, is_centre, span=2 * num_tokens, width=mc)  # keys in [0, 2N)

    # ---- 3. merge: each centre absorbs its k_neighbors most key-similar other patches.
    # The output buffer holds Mc centre rows plus one slot for the extra token; it is filled by one
    # row gather (slot rows take an arbitrary in-range row, overwritten below) and updated in place.
    y = features.float()  # [B, N, D]
    dim = y.shape[-1]
    y_flat = y.reshape(batch * num_tokens, dim)  # [B*N, D]
    offsets = torch.arange(batch, device=device)[:, None] * num_tokens  # [B, 1] row offset of each sample
    centre_rows = centres + offsets  # [B, Mc] rows of y_flat
    width = mc + 1 if extra_token else mc
    src_rows = centre_rows if not extra_token else torch.cat([centre_rows, offsets], dim=1)  # [B, width]
    tokens = y_flat.index_select(0, src_rows.reshape(-1)).view(batch, width, dim)  # [B, width, D]
    knb = min(k_neighbors, num_tokens - 1)
    if knb > 0:
        if sim_dtype == "keys" and keys.dtype in (torch.float16, torch.bfloat16):
            unit = F.normalize(keys, dim=-1)  # [B, N, Dk] in the keys' dtype, as the official code
            u_centres = unit.reshape(batch * num_tokens, -1).index_select(0, centre_rows.reshape(-1)).view(batch, mc, -1)
            sims = torch.bmm(u_centres, unit.transpose(1, 2)).float()  # [B, Mc, N] cosine, rounded to the keys' dtype
        else:
            k32 = keys.float()  # [B, N, Dk]
            inv_norm = torch.linalg.vector_norm(k32, dim=-1).clamp_(min=1e-12).reciprocal_()  # [B, N], as F.normalize
            k_centres = k32.reshape(batch * num_tokens, -1).index_select(0, centre_rows.reshape(-1)).view(batch, mc, -1)
            # cosine(i, j) up to the factor 1/|k_i|, which is constant along a row and cannot change
            # which j rank highest for centre i
            sims = torch.bmm(k_centres, k32.transpose(1, 2)).mul_(inv_norm[:, None, :])  # [B, Mc, N]
        pooled, total = neighbour_sums(sims, centres, a, y, knb)  # [B, Mc, D] sum_j a_j y_j, [B, Mc] sum_j a_j
        merged = tokens[:, :mc]
        if merge == "residual":
            merged.add_(pooled)
        else:
            total = total[:, :, None]  # [B, Mc, 1]
            merged.copy_(torch.where(total > 0, pooled / total.clamp(min=torch.finfo(total.dtype).tiny), merged))
    if batch > 1:
        tokens[:, :mc].masked_fill_(~valid[:, :, None], 0)
    indices = torch.where(valid, centres, torch.full_like(centres, -1))  # [B, Mc]

    # ---- 4. extra token e = sum over the non-centre patches of a_j y_j, appended last
    if not extra_token:
        return Reduction(
            tokens=tokens.to(features.dtype), counts=n_centres, indices=indices, extra=None, num_attention=k_attn,
            host_counts=host,
        )
    has_extra = n_centres < num_tokens  # [B]: some patch is not a centre (is_centre holds n_centres patches)
    host = [c + (c < num_tokens) for c in host]
    e = torch.bmm(a.masked_fill(is_centre, 0)[:, None, :], y)  # [B, 1, D]
    counts = n_centres + has_extra.long()
    # samples with fewer centres: their slot n_centres[b] < Mc is padding (already zero); the last
    # column is padding for them and gets zero, for the others it is overwritten by the scatter
    tokens[:, mc].zero_()
    slot = n_centres[:, None, None].expand(-1, 1, dim)
    tokens.scatter_(1, slot, e.masked_fill_(~has_extra[:, None, None], 0))
    m = max(host)
    if m < mc + 1:
        tokens = tokens[:, :m].contiguous()
    return Reduction(
        tokens=tokens.to(features.dtype), counts=counts, indices=indices, extra=has_extra, num_attention=k_attn,
        host_counts=host,
    )
