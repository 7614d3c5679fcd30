"""SparseVLM (arXiv 2410.04417, v1.5 schedule) as pure tensor code: text raters, ranking, recycling.

The decoder machinery captures the attention rows and applies the decision; this module computes:

1. **Raters** (once per prefill, ``select_raters``): from the decoder input embeddings X, V = image
   tokens, T = text tokens after the image; ``M = softmax_T(V T^T)`` (no 1/sqrt(d));
   ``r = mean_V M``; raters = text tokens with ``r_t > mean(r)``. When every ``r_t`` is equal
   (e.g. a single text token after the image) every text token after the image is a rater; with
   no text after the image, the last prompt token is.
2. **Pruning layers**: v1.5 prunes the *output* of layers {2, 6, 15} of a 32-layer decoder (layer
   l and its cache hold every token). ``scale_layers`` maps them to shallower decoders.
3. **Score** at a pruning layer: mean over raters of the head-averaged post-softmax attention of
   that layer to each current visual token (``fastv.row_scores`` on the rater rows).
4. **How many survive**: the v1.5 fixed schedule (``V15_SCHEDULES``, for 576 visual tokens; for N
   tokens each count is ``round(count * N / 576)``), each capped at the current visual count - 1
   (``schedule_count``).
5. **Recycling** (``recycle``): of the pruned tokens take the top ``m = floor(0.3 n) + 1`` by score,
   cluster them into ``c = floor(m / 10) + 1`` clusters by density-peak clustering
   (``density_peak_clusters``: density ``exp(-mean squared distance to the c nearest other
   tokens)``, deterministic ties), and insert each cluster's unweighted mean right after the kept
   visual tokens. Recycled tokens are visual tokens afterwards (a later layer may rank and drop
   them; ``handle.stats`` counts them); with original positions one takes the rounded mean of its
   members' positions.
6. **Positions**: compacted after pruning by default (text shifts left, decoding continues from
   each layer's own length), original positions optional.

Any batch size. How this differs from the official code, and why:
``docs/design/decoder-methods.md``.

Shapes: B batch, L tokens (left-padded layout), D hidden size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .common import gather_rows, pack_mask
from .common import scale_layers as common_scale_layers
from .fastv import row_scores, topk_visual

__all__ = ["V15_SCHEDULES", "V15_LAYERS", "REFERENCE_LAYERS", "REFERENCE_TOKENS", "scale_layers",
           "select_raters", "rater_scores", "schedule_count", "host_counts", "density_peak_clusters", "recycle"]

#: v1.5 visual tokens kept after layers 2 / 6 / 15 for each budget (LLaVA-1.5-7B, 576 tokens).
V15_SCHEDULES: dict[int, tuple[int, int, int]] = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
#: Layers whose output v1.5 prunes (0-indexed, 32-layer decoder).
V15_LAYERS: tuple[int, ...] = (2, 6, 15)
REFERENCE_LAYERS = 32
REFERENCE_TOKENS = 576


def scale_layers(layers: tuple[int, ...] | list[int], num_layers: int, reference: int = REFERENCE_LAYERS) -> list[int]:
    """Prune points (drop from the input of layer p = l + 1) for a ``num_layers`` decoder.

    ``p = round((l + 1) * num_layers / reference)`` (half to even), then forced strictly increasing
    and into [1, num_layers - 1] (``common.scale_layers``, colliding points move later). Raises
    ValueError when the decoder is too shallow for that many points.
    """
    if len(layers) > num_layers - 1:
        raise ValueError(f"{len(layers)} pruning layers do not fit a {num_layers}-layer decoder "
                         f"(at most {num_layers - 1}); pass fewer layers")
    return [l + 1 for l in common_scale_layers(layers, num_layers, reference, ties="even", collide="shift")]


def select_raters(embeds: Tensor, visual: Tensor, text_after: Tensor, last: Tensor, *,
                  widths: tuple[int, int] | None = None) -> Tensor:
    """Rater text tokens. embeds [B, L, D]; visual / text_after [B, L] bool; last [B] -> [B, L] bool.

    ``widths``: the largest row counts of ``visual`` and ``text_after``, when the caller has them on
    the host (``pack_mask``; else two host reads)."""
    x = embeds.float()
    nv, nt = widths if widths is not None else (None, None)
    v_idx, vv = pack_mask(visual, nv)  # [B, Nv]
    v = gather_rows(x, v_idx)
    t_idx, tv = pack_mask(text_after, nt)  # [B, Nt]
    t = gather_rows(x, t_idx)
    logits = torch.matmul(v, t.transpose(1, 2))  # [B, Nv, Nt]  (no 1/sqrt(d), as the official code)
    logits = logits.masked_fill(~tv[:, None, :], float("-inf"))
    m = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    r = (m * vv[:, :, None]).sum(1) / vv.sum(1).clamp(min=1)[:, None]  # [B, Nt]
    mean = (r * tv).sum(1) / tv.sum(1).clamp(min=1)
    chosen = tv & (r > mean[:, None])
    # fallbacks: no rater above the mean -> every text token after the image; no such text -> last token
    chosen = torch.where(chosen.any(1, keepdim=True), chosen, tv)
    raters = torch.zeros(visual.shape, dtype=torch.long, device=visual.device)
    raters = raters.scatter_add(1, t_idx, chosen.long()) > 0  # padded columns add 0
    none = ~raters.any(1)
    cols = torch.arange(raters.shape[1], device=raters.device)
    return raters | (none[:, None] & (cols[None, :] == last[:, None]))


def rater_scores(attn: Tensor, rows_valid: Tensor) -> Tensor:
    """[B, R, L] rater-row attention -> [B, L] mean over raters."""
    return row_scores(attn, rows_valid)


def schedule_count(target: int, num_visual: Tensor, num_visual0: Tensor, reference: int = REFERENCE_TOKENS) -> Tensor:
    """Visual tokens to keep: ``round(target * N0 / 576)`` capped at current - 1 (at least 1 if any)."""
    k = torch.round(num_visual0.double() * target / reference).long()
    k = torch.minimum(k, num_visual - 1)
    return torch.maximum(k, num_visual.clamp(max=1))


def host_counts(target: int, num_visual: list[int], num_visual0: list[int], *, reference: int = REFERENCE_TOKENS,
                ratio: float = 0.3, cluster_div: int = 10) -> tuple[list[int], list[int], list[int]]:
    """One pruning layer's counts per row on the host, from host visual counts (the arithmetic of
    ``schedule_count`` and ``recycle``, in float64 and half-to-even rounding as there) ->
    (k: ``schedule_count``; m: pruned tokens ``recycle`` merges, of the ``N - min(k, N)`` pruned;
    c: its clusters)."""
    ks, ms, cs = [], [], []
    for n, n0 in zip(num_visual, num_visual0):
        k = max(min(round(n0 * target / reference), n - 1), min(n, 1))
        pruned = n - min(k, n)
        m = min(math.floor(pruned * ratio) + 1, pruned) if pruned > 0 else 0
        ks.append(k)
        ms.append(m)
        cs.append(min(m // cluster_div + 1, m) if m > 0 else 0)
    return ks, ms, cs


def density_peak_clusters(x: Tensor, valid: Tensor, num_clusters: Tensor, *, width: int | None = None) -> Tensor:
    """Density-peak clustering (DPC-kNN), batched with ragged sizes and deterministic ties.

    x [B, M, D] float, valid [B, M] bool, num_clusters [B] long (c <= valid count) ->
    assignment [B, M] long in [0, c) (cluster ids ranked by centre score), -1 where invalid.
    ``width``: ``max(num_clusters)`` when the caller has it on the host (else one host read).
    """
    bsz, m, d = x.shape
    dev = x.device
    xf = x.float()
    dist = torch.cdist(xf, xf) / d ** 0.5  # [B, M, M]
    pair = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(m, dtype=torch.bool, device=dev)[None]
    inf = torch.tensor(float("inf"), device=dev)
    # density from the c nearest other tokens
    nn_d = torch.where(pair & ~eye, dist, inf).sort(dim=-1).values  # [B, M, M] ascending
    kk = num_clusters.clamp(min=1)
    n_valid = valid.sum(1)
    kk = torch.minimum(kk, (n_valid - 1).clamp(min=0))  # neighbours available
    sq = torch.where(torch.isfinite(nn_d), nn_d ** 2, torch.zeros((), device=dev)).cumsum(-1)
    take = (kk - 1).clamp(min=0)[:, None, None].expand(bsz, m, 1)
    mean_sq = sq.gather(-1, take).squeeze(-1) / kk.clamp(min=1)[:, None]
    mean_sq = torch.where((kk > 0)[:, None], mean_sq, torch.zeros_like(mean_sq))
    rho = torch.exp(-mean_sq)  # [B, M]
    # distance to the nearest denser token (ties: lower index is denser)
    idx = torch.arange(m, device=dev)
    denser = (rho[:, None, :] > rho[:, :, None]) | ((rho[:, None, :] == rho[:, :, None]) & (idx[None, None, :] < idx[None, :, None]))
    denser &= pair
    delta = torch.where(denser, dist, inf).amin(-1)
    far = torch.where(pair, dist, torch.zeros((), device=dev)).amax(-1)
    delta = torch.where(torch.isfinite(delta), delta, far)
    score = torch.where(valid, rho * delta, torch.full_like(rho, float("-inf")))
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # centres = first c
    c_max = max(int(num_clusters.max()) if width is None else width, 1)
    centres = order[:, :c_max]  # [B, C]
    cvalid = torch.arange(c_max, device=dev)[None, :] < num_clusters[:, None]
    cdist = dist.gather(2, centres[:, None, :].expand(bsz, m, c_max))  # [B, M, C]
    cdist = torch.where(cvalid[:, None, :], cdist, inf)
    assign = cdist.argmin(-1)  # first minimum -> lower-ranked centre on ties
    # a centre always belongs to its own cluster
    assign.scatter_(1, centres, torch.where(cvalid, torch.arange(c_max, device=dev)[None, :].expand(bsz, c_max),
                                            assign.gather(1, centres)))
    return torch.where(valid, assign, torch.full_like(assign, -1))


def recycle(hidden: Tensor, scores: Tensor, pruned: Tensor, positions: Tensor, *, ratio: float = 0.3,
            cluster_div: int = 10, widths: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge the best pruned tokens into cluster means.

    hidden [B, L, D], scores [B, L], pruned [B, L] bool, positions [*P, B, L] long (any leading
    dims, e.g. M-RoPE's 3 axes) -> (tokens [B, C, D] in hidden's dtype, valid [B, C] bool,
    positions [*P, B, C] long (rounded mean of the members', per axis), sizes [B, C] long). ``m = floor(ratio * n) + 1`` (capped at n) best pruned
    tokens by score, ``c = floor(m / cluster_div) + 1`` clusters. ``widths``: (max m, max c) over the
    rows when the caller has them on the host (``host_counts``; else two host reads).
    """
    bsz, length, d = hidden.shape
    n = pruned.sum(1)
    m = torch.where(n > 0, torch.minimum(torch.floor(n.double() * ratio).long() + 1, n), torch.zeros_like(n))
    c = torch.where(m > 0, torch.minimum(m // cluster_div + 1, m), torch.zeros_like(m))
    sel = topk_visual(scores, pruned, m)  # [B, L]
    m_max, c_max = widths if widths is not None else (None, None)
    idx, valid = pack_mask(sel, m_max)  # [B, M]
    x = gather_rows(hidden, idx)
    pos = positions.gather(-1, idx.expand(*positions.shape[:-2], *idx.shape))  # [*P, B, M]
    assign = density_peak_clusters(x, valid, c, width=c_max)  # [B, M]
    c_max = max(int(c.max()) if c_max is None else c_max, 1)
    onehot = (assign[:, :, None] == torch.arange(c_max, device=hidden.device)[None, None, :]).float()  # [B, M, C]
    sizes = onehot.sum(1)  # [B, C]
    tokens = torch.einsum("bmc,bmd->bcd", onehot, x.float()) / sizes.clamp(min=1)[:, :, None]
    mpos = torch.round(torch.einsum("bmc,...bm->...bc", onehot.double(), pos.double()) / sizes.double().clamp(min=1)).long()
    cvalid = sizes > 0
    return tokens.to(hidden.dtype), cvalid, mpos, sizes.long()
