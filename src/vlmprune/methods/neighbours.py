"""Weighted sums over each row's k most similar columns: PruMerge's merge step, on any device,
with a compiled CPU kernel where one is available.

``neighbour_sums(sims, exclude, weights, values, k)`` gives, for every row r of sample b,

    pooled[b, r] = sum_{j in top_k(b, r)} weights[b, j] * values[b, j]     [B, M, D]
    total[b, r]  = sum_{j in top_k(b, r)} weights[b, j]                    [B, M]

where top_k(b, r) are the k columns j != exclude[b, r] with the largest ``sims[b, r, j]``.
Two implementations compute the same sets (they differ only in which of the tied entries is
taken at the k-th place, arbitrary in both, and in the order of the float additions):

* the tensor path, for every device and for autograd: the excluded column set to -inf, one
  batched top-k (``common.topk_indices``), a gather of the weights and an ``embedding_bag``;
* the CPU kernel (numba, compiled on first use and cached on disk), used for CPU float32 inputs
  that need no gradient when numba imports: per row, a bisection on the similarity value (each
  step one vectorised count over the row) until at most ``WIDE * k`` columns reach the
  threshold, the same bisection over those candidates alone until at most ``k + SLACK`` are
  left, the smallest dropped to exactly k, and the weighted sum in the same pass.
  ``VLMPRUNE_CPU_KERNELS=0`` turns it off; a numba that cannot compile it leaves the tensor path.

Non-finite similarities (a NaN or an infinite key) still give k distinct in-range columns per
row on both paths; which ones is unspecified.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .common import topk_indices

__all__ = ["neighbour_sums", "cpu_kernel_available", "cpu_kernels_enabled", "CPU_KERNELS_ENV"]

CPU_KERNELS_ENV = "VLMPRUNE_CPU_KERNELS"
SLACK = 8  # candidates beyond k at which the bisection stops
WIDE = 4  # candidates per k at which it goes on over the candidates alone


def neighbour_sums(sims: Tensor, exclude: Tensor, weights: Tensor, values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """sims [B, M, N] float, exclude [B, M] long (a column in [0, N) per row), weights [B, N]
    float32, values [B, N, D] float32, 1 <= k <= N - 1 -> (pooled [B, M, D], total [B, M]),
    both float32 (see the module docstring). ``sims`` may be overwritten."""
    batch, rows, n = sims.shape
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, N - 1] = [1, {n - 1}], got {k}")
    if _use_kernel(sims, weights, values):
        return _kernel_sums(sims, exclude, weights, values, k)
    sims.scatter_(2, exclude[:, :, None], float("-inf"))  # a row's own column is never among its k
    nbr = topk_indices(sims, k)  # [B, M, k]
    w = weights.gather(1, nbr.view(batch, -1)).view(batch * rows, k)  # [B*M, k]
    offsets = torch.arange(batch, device=sims.device)[:, None, None] * n
    pooled = F.embedding_bag((nbr + offsets).view(batch * rows, k), values.reshape(batch * n, -1),
                             per_sample_weights=w, mode="sum").view(batch, rows, -1)
    return pooled, w.sum(dim=1).view(batch, rows)


def cpu_kernels_enabled() -> bool:
    """Whether ``VLMPRUNE_CPU_KERNELS`` leaves the CPU kernel on (anything but 0); nothing is compiled."""
    return os.environ.get(CPU_KERNELS_ENV, "1") != "0"


def cpu_kernel_available() -> bool:
    """Whether ``neighbour_sums`` uses the compiled CPU kernel for CPU float32 inputs (it is enabled
    and numba compiles it)."""
    return cpu_kernels_enabled() and _kernel() is not None


def _use_kernel(sims: Tensor, weights: Tensor, values: Tensor) -> bool:
    if sims.device.type != "cpu" or weights.device.type != "cpu" or values.device.type != "cpu":
        return False
    if not (sims.dtype == weights.dtype == values.dtype == torch.float32):
        return False
    if torch.is_grad_enabled() and (sims.requires_grad or weights.requires_grad or values.requires_grad):
        return False
    return cpu_kernel_available()


def _kernel_sums(sims: Tensor, exclude: Tensor, weights: Tensor, values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    batch, rows, n = sims.shape
    dim = values.shape[-1]
    pooled = torch.empty(batch, rows, dim, dtype=torch.float32)
    total = torch.empty(batch, rows, dtype=torch.float32)
    sims = sims.detach().contiguous()
    row_min, row_max = sims.amin(dim=-1), sims.amax(dim=-1)  # [B, M] each (NaN when the row holds one; aminmax is slower)
    _kernel()(sims.numpy(), row_min.numpy(), row_max.numpy(), exclude.detach().to(torch.int64).contiguous().numpy(),
              weights.detach().contiguous().numpy(), values.detach().contiguous().numpy(), k,
              pooled.numpy(), total.numpy())
    return pooled, total


@lru_cache(maxsize=1)
def _kernel() -> Any:
    """The compiled kernel (compiled, or loaded from numba's on-disk cache, and run once on a tiny
    case here), or None when numba is missing, fails to import or cannot compile it."""
    source = _kernel_source()
    if source is None:
        return None
    for cache in (True, False):  # an unwritable cache folder must not cost the kernel
        try:
            kernel = source(cache)
            sims = np.zeros((1, 1, 3), np.float32)
            kernel(sims, sims[:, :, 0].copy(), sims[:, :, 0].copy(), np.zeros((1, 1), np.int64),
                   np.ones((1, 3), np.float32), np.ones((1, 3, 2), np.float32), 2,
                   np.empty((1, 1, 2), np.float32), np.empty((1, 1), np.float32))
            return kernel
        except Exception:  # noqa: BLE001 -- any numba failure: the tensor path does the same work
            continue
    return None


def _kernel_source() -> Any:
    """A function of ``cache`` that returns the njit-decorated kernel, or None without numba."""
    try:
        from numba import njit
    except Exception:  # ImportError, or numba refusing this numpy version
        return None

    def compile_kernel(cache: bool) -> Any:
        return njit(cache=cache, nogil=True, boundscheck=False)(kernel)

    def kernel(sims, row_min, row_max, exclude, weights, values, k, pooled, total):  # pragma: no cover - compiled
        batch, rows, n = sims.shape
        dim = values.shape[2]
        half = np.float32(0.5)
        inf = np.float32(np.inf)
        cand_v = np.empty(n, np.float32)
        cand_i = np.empty(n, np.int64)
        for b in range(batch):
            for r in range(rows):
                row = sims[b, r]
                own = exclude[b, r]
                lo, hi = row_min[b, r], row_max[b, r]  # bounds for the bisection (the own column may set them)
                first = not (-inf < lo <= hi < inf)  # a NaN or infinite entry: the slow pass below
                if first:
                    for j in range(n):
                        v = row[j]
                        if j != own and v == v and abs(v) != inf:
                            if first:
                                lo, hi, first = v, v, False
                            elif v < lo:
                                lo = v
                            elif v > hi:
                                hi = v
                m = 0
                if not first:
                    # 1. bisection over the row, keeping count(row >= lo) >= k, until at most WIDE * k reach lo
                    reach = n
                    for _ in range(64):
                        if reach <= WIDE * k:
                            break
                        mid = np.float32(lo + (hi - lo) * half)
                        if not (lo < mid < hi):
                            break
                        c = 0
                        for j in range(n):
                            c += row[j] >= mid
                        if 0 <= own < n:
                            c -= row[own] >= mid
                        if c >= k:
                            lo, reach = mid, c
                        else:
                            hi = mid
                    # 2. the candidates: every column but the own one that reaches lo (branch-free)
                    for j in range(n):
                        v = row[j]
                        cand_v[m] = v
                        cand_i[m] = j
                        m += (v >= lo) & (j != own)
                    # 3. the same bisection over the candidates, until at most k + SLACK are left
                    for _ in range(64):
                        if m <= k + SLACK:
                            break
                        mid = np.float32(lo + (hi - lo) * half)
                        if not (lo < mid < hi):
                            break
                        c = 0
                        for t in range(m):
                            c += cand_v[t] >= mid
                        if c >= k:
                            q = 0
                            for t in range(m):
                                v = cand_v[t]
                                cand_v[q] = v
                                cand_i[q] = cand_i[t]
                                q += v >= mid
                            m, lo = q, mid
                        else:
                            hi = mid
                    top = -inf
                    for t in range(m):
                        top = cand_v[t] if cand_v[t] > top else top
                    if m > k and top == lo:  # all candidates tie: any k of them
                        m = k
                if m < k:  # non-finite rows: top up with columns not yet taken (any k distinct ones)
                    taken = m
                    for j in range(n):
                        if m == k:
                            break
                        if j == own:
                            continue
                        seen = False
                        for t in range(taken):
                            if cand_i[t] == j:
                                seen = True
                                break
                        if not seen:
                            cand_v[m] = -inf
                            cand_i[m] = j
                            m += 1
                while m > k:  # drop the smallest candidates
                    low = 0
                    for t in range(1, m):
                        if cand_v[t] < cand_v[low]:
                            low = t
                    m -= 1
                    cand_v[low] = cand_v[m]
                    cand_i[low] = cand_i[m]
                acc = pooled[b, r]
                acc[:] = 0
                wsum = np.float32(0)
                for t in range(k):
                    j = cand_i[t]
                    w = weights[b, j]
                    wsum += w
                    src = values[b, j]
                    for d in range(dim):
                        acc[d] += w * src[d]
                total[b, r] = wsum

    return compile_kernel
