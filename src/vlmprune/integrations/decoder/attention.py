"""Attention side calculations of the decoder stage: the post-softmax attention rows a method scores
with (``attention_rows``, from the q/k projections with Llama-style RoPE) and the additive soft mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...methods.common import gather_rows


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama-style RoPE. x [B, H, T, Dh]; cos/sin [B, T, Dh]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _keys(k: Tensor | None, cos: Tensor, sin: Tensor, bsz: int, num_kv_heads: int, head_dim: int,
          roped_keys: Tensor | None) -> Tensor:
    """The layer's rotated keys [B, Hkv, L, Dh]: ``roped_keys`` as given, else ``k`` re-rotated."""
    if roped_keys is not None:
        return roped_keys
    length = k.shape[1]
    kk = k.view(bsz, length, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, L, Dh]
    return _rope(kk.float(), cos.float(), sin.float()).to(k.dtype)


def _chunk_probs(q: Tensor, kk: Tensor, r: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor, *,
                 num_heads: int, num_kv_heads: int, head_dim: int, scaling: float,
                 key_bias: Tensor | None) -> Tensor:
    """Post-softmax attention [B, H, r, L] float32 of the query rows at columns r [B, r].

    ``allowed`` [B, r, L] bool: the keys each row may attend to (a row with none gives NaN).
    Logits are computed in the keys' dtype with the keys as the GEMM's long side; one pass then
    transposes them to [B, H, r, L] float32, scales them and adds the mask (and the soft bias).
    """
    bsz, nr = r.shape
    length = kk.shape[2]
    rep = num_heads // num_kv_heads
    qr = gather_rows(q, r).view(bsz, nr, num_heads, head_dim)
    cos_r, sin_r = gather_rows(cos, r).float(), gather_rows(sin, r).float()  # [B, r, Dh]
    qr = _rope(qr.transpose(1, 2).float(), cos_r, sin_r)  # [B, H, r, Dh]
    # heads h = g * rep + j use key head g: group the query heads by their key head
    qg = qr.to(kk.dtype).reshape(bsz, num_kv_heads, rep * nr, head_dim)  # [B, Hkv, rep*r, Dh]
    # keys as the left operand: [L, Dh] x [Dh, rep*r] keeps the long, contiguous side as the GEMM's M
    lt = torch.matmul(kk, qg.transpose(-1, -2))  # [B, Hkv, L, rep*r]
    # additive mask [B, r, L]: 0 (or the soft bias) where allowed, -inf elsewhere
    if key_bias is None:
        add = torch.zeros((), dtype=torch.float32, device=kk.device)
    else:
        cols = torch.arange(length, device=kk.device)
        own = cols[None, None, :] == r[:, :, None]  # own position is never biased
        add = torch.where(own, 0.0, key_bias.float()[:, None, :])
    add = torch.where(allowed, add, float("-inf"))
    lt = lt.view(bsz, num_kv_heads, length, rep, nr).permute(0, 1, 3, 4, 2)  # [B, Hkv, rep, r, L]
    if torch.is_grad_enabled() and (lt.requires_grad or add.requires_grad):
        logits = lt.float() * scaling + add[:, None, None]  # autograd has no out= variant
    else:  # one pass: transpose, convert to float32, scale, add the mask
        logits = torch.empty(bsz, num_kv_heads, rep, nr, length, dtype=torch.float32, device=kk.device)
        torch.add(add[:, None, None], lt, alpha=scaling, out=logits)
    logits = logits.reshape(bsz, num_heads, nr, length)
    return torch.softmax(logits, dim=-1)


def _allowed(key_valid: Tensor, r: Tensor, length: int) -> Tensor:
    """[B, r, L] bool: valid keys at or before each row's column (causal by column index)."""
    cols = torch.arange(length, device=key_valid.device)
    return key_valid[:, None, :] & (cols[None, None, :] <= r[:, :, None])


def attention_rows(q: Tensor, k: Tensor | None, rows: Tensor, rows_valid: Tensor, cos: Tensor, sin: Tensor,
                   key_valid: Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float,
                   key_bias: Tensor | None = None, chunk: int = 256, roped_keys: Tensor | None = None) -> Tensor:
    """Post-softmax attention of selected query rows, averaged over heads, [B, R, L] float32.

    q [B, L, H*Dh] and k [B, L, Hkv*Dh] are the layer's projections *before* RoPE; rows [B, R]
    columns of the queries (rows_valid [B, R]); cos/sin [B or 1, L, Dh] the layer's rotary tables;
    key_valid [B, L] bool; key_bias [B, L] optional additive logit bias (soft masks). Causal by
    column index. ``roped_keys`` [B, Hkv, L, Dh]: the layer's keys after RoPE as the layer used
    them (its KV-cache entry); when given, ``k`` is not read and no key is re-rotated. Logits are
    computed in the keys' dtype (the model's), softmax in float32. Grouped-query heads share their
    key head without copies. Invalid rows are zero. Memory: [B, H, chunk, L] at a time.
    """
    bsz = rows.shape[0]
    cos, sin = cos.expand(bsz, -1, -1), sin.expand(bsz, -1, -1)
    kk = _keys(k, cos, sin, bsz, num_kv_heads, head_dim, roped_keys)
    length = kk.shape[2]
    out = []
    for start in range(0, rows.shape[1], chunk):
        r = rows[:, start:start + chunk].clamp(0, length - 1)  # [B, r]
        rv = rows_valid[:, start:start + chunk]
        probs = _chunk_probs(q, kk, r, cos, sin, _allowed(key_valid, r, length), num_heads=num_heads,
                             num_kv_heads=num_kv_heads, head_dim=head_dim, scaling=scaling, key_bias=key_bias)
        # a row with no allowed key is NaN in every head: zero after the head mean
        out.append(probs.mean(1).nan_to_num_(0.0).mul_(rv[:, :, None]))  # [B, r, L]
    if not out:
        return torch.zeros((bsz, 0, length), dtype=torch.float32, device=kk.device)
    return torch.cat(out, dim=1)


def attention_row_sums(q: Tensor, k: Tensor | None, rows: Tensor, rows_valid: Tensor, weights: Tensor,
                       cos: Tensor, sin: Tensor, key_valid: Tensor, *, num_heads: int, num_kv_heads: int,
                       head_dim: int, scaling: float, key_bias: Tensor | None = None, chunk: int = 128,
                       roped_keys: Tensor | None = None,
                       row_bounds: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Weighted sums of the head-mean attention rows, without materialising the rows.

    Inputs as ``attention_rows``, plus weights [B, R, G] (G groups of rows). Returns
    (sums [B, G, L] float32 = sum_r weights[b, r, g] * A[b, r, :], own [B, R] float32 =
    A[b, r, rows[b, r]], each row's attention to its own column), where A = ``attention_rows(...)``
    (invalid rows count 0 in both). The same quantities as reducing ``attention_rows``' output,
    up to float summation order; memory: [B, H, chunk, L] at a time, nothing of size [B, R, L].

    ``row_bounds``: R ints on the host with ``rows[b, i] < row_bounds[i]`` for every valid row i of
    every sample. Attention is causal, so keys at or after a chunk's largest bound get no weight
    from its rows: they are not computed, and a chunk of early rows costs its part of the causal
    triangle instead of the whole [chunk, L] square. Without them every chunk spans all L keys.
    """
    bsz = rows.shape[0]
    cos, sin = cos.expand(bsz, -1, -1), sin.expand(bsz, -1, -1)
    kk = _keys(k, cos, sin, bsz, num_kv_heads, head_dim, roped_keys)
    length = kk.shape[2]
    groups = weights.shape[2]
    sums = torch.zeros(bsz, groups, length, dtype=torch.float32, device=kk.device)
    own = []
    if row_bounds is not None and len(row_bounds) != rows.shape[1]:
        raise ValueError(f"row_bounds must hold one bound per row ({rows.shape[1]}), got {len(row_bounds)}")
    for start in range(0, rows.shape[1], chunk):
        # keys [0, span) can carry weight for this chunk's rows (all keys without bounds)
        span = length if row_bounds is None else min(length, max(1, max(row_bounds[start:start + chunk])))
        r = rows[:, start:start + chunk].clamp(0, span - 1)  # [B, r]
        rv = rows_valid[:, start:start + chunk]
        # invalid rows may attend anywhere (finite, weighted 0) so that no NaN reaches the sums
        allowed = _allowed(key_valid[:, :span], r, span) | ~rv[:, :, None]
        probs = _chunk_probs(q, kk[:, :, :span], r, cos, sin, allowed, num_heads=num_heads,
                             num_kv_heads=num_kv_heads, head_dim=head_dim, scaling=scaling,
                             key_bias=None if key_bias is None else key_bias[:, :span])  # [B, H, r, span]
        w = (weights[:, start:start + chunk].float() * rv[:, :, None]).transpose(1, 2)  # [B, G, r]
        sums[:, :, :span] += torch.matmul(w[:, None], probs).sum(1)  # [B, H, G, span] -> [B, G, span]
        diag = probs.gather(3, r[:, None, :, None].expand(-1, num_heads, -1, 1))[..., 0]  # [B, H, r]
        own.append(diag.mean(1) * rv)
    own_all = torch.cat(own, dim=1) if own else torch.zeros(bsz, 0, device=kk.device)
    return sums.div_(num_heads), own_all


def _soft_mask(key_valid: Tensor, bias: Tensor, dtype: torch.dtype, *, q_len: int, past: int) -> Tensor:
    """Float additive mask [B, 1, q, kv]: bias on allowed keys (0 on the query's own key), min elsewhere.

    Queries are the last ``q_len`` slots: query i sits at key index ``past + i``.
    """
    kv = key_valid.shape[1]
    dev = key_valid.device
    qi = past + torch.arange(q_len, device=dev)
    kj = torch.arange(kv, device=dev)
    allowed = (kj[None, :] <= qi[:, None])[None] & key_valid[:, None, :]  # [B, q, kv]
    own = (kj[None, :] == qi[:, None])[None]
    vals = torch.where(own, torch.zeros((), dtype=bias.dtype, device=dev), bias[:, None, :])
    neg = torch.finfo(dtype).min
    return torch.where(allowed, vals.to(dtype), torch.full((), neg, dtype=dtype, device=dev))[:, None]
