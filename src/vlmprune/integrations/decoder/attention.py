"""Attention side calculations of the decoder stage: the post-softmax attention rows a method scores
with (``attention_rows``, from the q/k projections with Llama-style RoPE) and the additive soft mask."""

from __future__ import annotations

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
    cos = cos.expand(bsz, -1, -1)
    sin = sin.expand(bsz, -1, -1)
    if roped_keys is not None:
        kk = roped_keys  # [B, Hkv, L, Dh]
    else:
        length = k.shape[1]
        kk = k.view(bsz, length, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, L, Dh]
        kk = _rope(kk.float(), cos.float(), sin.float()).to(k.dtype)
    length = kk.shape[2]
    rep = num_heads // num_kv_heads
    cols = torch.arange(length, device=kk.device)
    out = []
    for start in range(0, rows.shape[1], chunk):
        r = rows[:, start:start + chunk].clamp(0, length - 1)  # [B, r]
        nr = r.shape[1]
        rv = rows_valid[:, start:start + chunk]
        qr = gather_rows(q, r).view(bsz, nr, num_heads, head_dim)
        cos_r, sin_r = gather_rows(cos, r).float(), gather_rows(sin, r).float()  # [B, r, Dh]
        qr = _rope(qr.transpose(1, 2).float(), cos_r, sin_r)  # [B, H, r, Dh]
        # heads h = g * rep + j use key head g: group the query heads by their key head
        qg = qr.to(kk.dtype).reshape(bsz, num_kv_heads, rep * nr, head_dim)  # [B, Hkv, rep*r, Dh]
        # keys as the left operand: [L, Dh] x [Dh, rep*r] keeps the long, contiguous side as the GEMM's M
        logits = torch.matmul(kk, qg.transpose(-1, -2)).transpose(-1, -2)  # [B, Hkv, rep*r, L]
        logits = logits.float().reshape(bsz, num_heads, nr, length) * scaling  # [B, H, r, L]
        if key_bias is not None:
            diag = cols[None, None, :] == r[:, :, None]  # own position is never masked
            logits = logits + torch.where(diag, 0.0, key_bias.float()[:, None, :])[:, None]
        allowed = key_valid[:, None, :] & (cols[None, None, :] <= r[:, :, None])  # [B, r, L]
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(1)  # [B, r, L]
        out.append(probs * rv[:, :, None])
    if not out:
        return torch.zeros((bsz, 0, length), dtype=torch.float32, device=kk.device)
    return torch.cat(out, dim=1)



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
