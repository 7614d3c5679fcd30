"""PruMerge / PruMerge+ tensor layer: hand-worked cases, equivalences, invariants, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmprune.methods.common import Reduction
from vlmprune.methods.neighbours import CPU_KERNELS_ENV, cpu_kernel_available
from vlmprune.methods.prumerge import cls_attention, iqr_outlier_count, prumerge, raster_grid_mask

from prumerge_reference import peaked_inputs, prumerge_reference

T = torch.tensor


def rand_inputs(batch, n, d=6, dk=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, n, generator=g)
    logits[:, : max(1, n // 10)] += 3.0  # a few salient patches
    logits = logits[:, torch.randperm(n, generator=g)]
    attn = torch.softmax(logits, dim=1) * 0.9
    keys = torch.randn(batch, n, dk, generator=g)
    feats = torch.randn(batch, n, d, generator=g)
    return attn.to(dtype), keys.to(dtype), feats.to(dtype)


def one(x: torch.Tensor) -> torch.Tensor:
    return x[None]


# ----------------------------------------------------------------------------- IQR (spec §2)


def test_iqr_hand_worked_strict_fence():
    # a = [0, 1, ..., 8, x] (x >= 8 is the maximum), N = 10, positions 0..9 when sorted:
    #   Q1 at 0.25 * 9 = 2.25 -> 2 + 0.25 * (3 - 2) = 2.25
    #   Q3 at 0.75 * 9 = 6.75 -> 6 + 0.75 * (7 - 6) = 6.75
    #   IQR = 4.5, fence U = 6.75 + 1.5 * 4.5 = 13.5 (all exact in binary)
    base = [float(i) for i in range(9)]
    a = T([base + [13.5], base + [13.75]])
    # x = 13.5 equals the fence: not an outlier (strict >); x = 13.75 is.
    assert iqr_outlier_count(a).tolist() == [0, 1]


def test_iqr_ties_and_order():
    # a = 1 everywhere except two 5s at patches 3 and 7. Sorted: eight 1s then 5, 5.
    #   Q1 at 2.25 -> between 1 and 1 = 1; Q3 at 6.75 -> between sorted[6] = 1 and sorted[7] = 1 = 1
    #   IQR = 0, U = 1, outliers (a > 1) = the two 5s -> k = 2.
    a = T([[1.0, 1, 1, 5, 1, 1, 1, 5, 1, 1]])
    assert iqr_outlier_count(a).tolist() == [2]
    keys = torch.eye(10)[None]  # orthogonal keys
    feats = torch.arange(10.0)[None, :, None]
    r = prumerge(a, keys, feats, k_neighbors=0)
    # equal attention: the lower patch index comes first
    assert r.indices.tolist() == [[3, 7]]
    assert r.counts.tolist() == [3] and r.extra.tolist() == [True]


def test_iqr_k0_falls_back_to_top_token():
    # a = [0, 1, ..., 9]: Q1 = 2.25, Q3 = 6.75, U = 13.5 -> no outlier, k = 0.
    a = torch.arange(10.0)[None]
    assert iqr_outlier_count(a).tolist() == [0]
    feats = torch.arange(10.0)[None, :, None]
    r = prumerge(a, torch.eye(10)[None], feats, k_neighbors=0)
    # fallback: the single top-attention patch (9), then the extra token
    assert r.indices.tolist() == [[9]]
    assert r.num_attention.tolist() == [1]
    # extra token = sum_{j<9} a_j y_j = sum j*j for j = 0..8 = 204
    assert torch.allclose(r.tokens, T([[[9.0], [204.0]]]))
    # a flat map: all equal, k = 0, the tie goes to patch 0
    flat = torch.full((1, 8), 0.125)
    r = prumerge(flat, torch.eye(8)[None], torch.ones(1, 8, 2), k_neighbors=0)
    assert iqr_outlier_count(flat).tolist() == [0]
    assert r.indices.tolist() == [[0]] and r.counts.tolist() == [2]


@pytest.mark.parametrize("n", [2, 7, 10, 576, 577, 729])
def test_iqr_matches_numpy_percentile(n):
    g = torch.Generator().manual_seed(n)
    a = torch.softmax(2.0 * torch.randn(40, n, generator=g), dim=1)
    ours = iqr_outlier_count(a).tolist()
    for row, k in zip(a.numpy(), ours):
        # the official outlier_dectection, numpy in float32 as in the authors' environment
        q1, q3 = np.percentile(row, 25), np.percentile(row, 75)
        upper = np.float32(np.float64(q3) + 1.5 * np.float64(q3 - q1))
        assert k == len(np.where(row > upper)[0])


# ----------------------------------------------------------------------------- merge (spec §3)


def four_patch_case():
    # N = 4. a = [0.625, 0.125, 0.125, 0.125]: sorted [.125, .125, .125, .625],
    #   Q1 at 0.75 -> .125, Q3 at 2.25 -> .125 + .25 * .5 = .25, IQR = .125,
    #   U = .25 + .1875 = .4375 -> only patch 0 is an outlier: S = [0], P = [1, 2, 3].
    a = T([[0.625, 0.125, 0.125, 0.125]])
    # cosine to k0 = (1, 0): k1 = (1, 1) -> .707, k2 = (0, 1) -> 0, k3 = (-1, 0) -> -1
    keys = T([[[1.0, 0], [1, 1], [0, 1], [-1, 0]]])
    feats = T([[[1.0, 0], [0, 2], [4, 0], [0, 8]]])
    return a, keys, feats


def test_merge_hand_worked_residual():
    a, keys, feats = four_patch_case()
    r = prumerge(a, keys, feats, k_neighbors=2)
    # neighbours of 0 = {1, 2}: y0' = (1, 0) + .125 (0, 2) + .125 (4, 0) = (1.5, 0.25)
    # extra e = .125 ((0, 2) + (4, 0) + (0, 8)) = (0.5, 1.25)
    assert r.indices.tolist() == [[0]]
    assert r.counts.tolist() == [2] and r.extra.tolist() == [True]
    assert torch.allclose(r.tokens, T([[[1.5, 0.25], [0.5, 1.25]]]))
    # one neighbour (patch 1): (1, 0) + .125 (0, 2) = (1, 0.25)
    r1 = prumerge(a, keys, feats, k_neighbors=1)
    assert torch.allclose(r1.tokens[0, 0], T([1.0, 0.25]))
    # k_neighbors >= N is clamped to N - 1 = 3: (1, 0) + .125 (4, 10) = (1.5, 1.25)
    r_all = prumerge(a, keys, feats, k_neighbors=100)
    assert torch.allclose(r_all.tokens[0, 0], T([1.5, 1.25]))


def test_merge_hand_worked_average():
    a, keys, feats = four_patch_case()
    r = prumerge(a, keys, feats, k_neighbors=2, merge="average")
    # paper: (.125 (0, 2) + .125 (4, 0)) / (.125 + .125) = (0.5, 0.25) / 0.25 = (2, 1)
    assert torch.allclose(r.tokens[0, 0], T([2.0, 1.0]))
    # zero neighbour weight: the centre is kept as is
    z = prumerge(T([[0.625, 0.0, 0.0, 0.0]]), keys, feats, k_neighbors=2, merge="average")
    assert torch.allclose(z.tokens[0, 0], T([1.0, 0.0]))


def test_merge_other_kept_tokens_are_candidates():
    # N = 8, a = [.25, .375, .0625 x 6] (sums to 1). Sorted: six .0625, .25, .375.
    #   Q1 at 1.75 -> .0625; Q3 at 5.25 -> .0625 + .25 (.25 - .0625) = .109375
    #   IQR = .046875, U = .109375 + .0703125 = .1796875 -> S = [1, 0] (descending attention)
    a = T([[0.25, 0.375] + [0.0625] * 6])
    # k0 = (1, 0) and k1 = (1, .1) are each other's nearest key (cos .995); others (0, 1)
    keys = T([[[1.0, 0.0], [1.0, 0.1]] + [[0.0, 1.0]] * 6])
    feats = T([[[1.0, 0.0], [0.0, 1.0]] + [[float(j), -float(j)] for j in range(2, 8)]])
    r = prumerge(a, keys, feats, k_neighbors=1)
    assert r.indices.tolist() == [[1, 0]]
    # y1' = (0, 1) + a0 y0 = (0, 1) + .25 (1, 0) = (.25, 1)
    # y0' = (1, 0) + a1 y1 = (1, 0) + .375 (0, 1) = (1, .375)
    # e = .0625 sum_{j=2..7} (j, -j) = .0625 (27, -27) = (1.6875, -1.6875)
    expected = T([[[0.25, 1.0], [1.0, 0.375], [1.6875, -1.6875]]])
    assert torch.allclose(r.tokens, expected)
    # order="spatial": ascending patch index, extra token still last
    s = prumerge(a, keys, feats, k_neighbors=1, order="spatial")
    assert s.indices.tolist() == [[0, 1]]
    assert torch.allclose(s.tokens, expected[:, [1, 0, 2]])
    # extra_token=False: only the centres
    x = prumerge(a, keys, feats, k_neighbors=1, extra_token=False)
    assert x.extra is None and x.counts.tolist() == [2]
    assert torch.allclose(x.tokens, expected[:, :2])


# ----------------------------------------------------------------------------- PruMerge+ (spec §4)


def sixteen_patch_attention():
    # N = 16 (4 x 4): 1 everywhere, a[5] = 9, a[2] = 8. Q1 = Q3 = 1, U = 1 -> S = [5, 2], k = 2
    a = torch.ones(1, 16)
    a[0, 5], a[0, 2] = 9.0, 8.0
    return a


def test_plus_grid_hand_worked():
    a = sixteen_patch_attention()
    keys = torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(0))
    feats = torch.randn(1, 16, 2)
    r = prumerge(a, keys, feats, plus=True)
    # step_length = int(16 / 2) = 8, step = int(8 / 3) = 2
    # G = arange(0, 15, 2) = [0, 2, 4, ..., 14]; G' = G \ {5, 2} = [0, 4, 6, 8, 10, 12, 14]
    assert r.indices.tolist() == [[5, 2, 0, 4, 6, 8, 10, 12, 14]]
    assert r.num_attention.tolist() == [2]
    assert r.counts.tolist() == [10] and r.extra.tolist() == [True]
    s = prumerge(a, keys, feats, plus=True, order="spatial")
    assert s.indices.tolist() == [[0, 2, 4, 5, 6, 8, 10, 12, 14]]
    # extra token = sum over P = complement of S+ = [1, 3, 7, 9, 11, 13, 15] of a_j y_j (a_j = 1)
    p = [1, 3, 7, 9, 11, 13, 15]
    assert torch.allclose(r.tokens[0, 9], feats[0, p].sum(0), atol=1e-6)


def test_raster_grid_steps_and_clamp():
    grid = raster_grid_mask(T([1, 2, 6, 0]), 16)
    on = [row.nonzero().flatten().tolist() for row in grid]
    assert on[0] == [0, 5, 10]  # k = 1: step int(16 / 3) = 5; 15 = N - 1 is never sampled
    assert on[1] == list(range(0, 15, 2))  # k = 2: step 2
    assert on[2] == list(range(15))  # k = 6 > N/3: int(int(16/6) / 3) = 0, clamped to 1
    assert on[3] == on[0]  # k = 0 is treated as 1


def test_plus_2d_grid_same_size_as_raster():
    # N = 576 (24 x 24), k outliers = 32: step = int(int(576/32)/3) = 6, raster G has 96 points
    # (column stripes, since 6 divides 24). grid="2d": 96 = 8 x 12 lattice instead.
    a = torch.ones(1, 576)
    a[0, torch.arange(0, 576, 18)] = 50.0  # 32 outliers
    assert iqr_outlier_count(a).tolist() == [32]
    keys, feats = torch.randn(1, 576, 4), torch.randn(1, 576, 3)
    raster = prumerge(a, keys, feats, plus=True)
    lat = prumerge(a, keys, feats, plus=True, grid="2d")
    g_r = set(raster.indices[0, 32:].tolist())
    g_l = set(lat.indices[0, 32 : lat.num_indexed[0]].tolist())
    cols_r = {i % 24 for i in g_r}
    assert cols_r <= {0, 6, 12, 18}  # stripes
    rows_l, cols_l = {i // 24 for i in g_l}, {i % 24 for i in g_l}
    assert len(rows_l) >= 8 and len(cols_l) >= 8  # a true 2-D spread
    full = set(i * 24 + j for i in [1, 4, 7, 10, 13, 16, 19, 22] for j in range(1, 24, 2))
    assert g_l == full - set(raster.indices[0, :32].tolist())


def test_plus_empty_grid_and_single_pair():
    # N = 2, a = [.9, .1]: Q1 = .3, Q3 = .7, U = 1.3 -> k = 0 -> fallback S = [0].
    # G = arange(0, 1, step) = [0] is inside S -> G' empty: PruMerge+ = PruMerge here.
    a = T([[0.9, 0.1]])
    keys = T([[[1.0, 0.0], [0.0, 1.0]]])
    feats = T([[[1.0, 1.0], [10.0, 20.0]]])
    for plus in (False, True):
        r = prumerge(a, keys, feats, plus=plus)
        assert r.indices.tolist() == [[0]]
        # k_neighbors = 32 clamps to 1: y0' = (1, 1) + .1 (10, 20) = (2, 3); e = .1 (10, 20)
        assert torch.allclose(r.tokens, T([[[2.0, 3.0], [1.0, 2.0]]]))


def test_single_patch():
    r = prumerge(T([[0.3]]), torch.ones(1, 1, 2), T([[[4.0, 5.0]]]), plus=True)
    assert r.indices.tolist() == [[0]] and r.counts.tolist() == [1]
    assert r.extra.tolist() == [False]  # nothing left to summarise
    assert torch.equal(r.tokens, T([[[4.0, 5.0]]]))


# ----------------------------------------------------------------------------- fixed budget


def test_keep_count_ratio_and_tensor():
    a = sixteen_patch_attention()
    a[0, 11] = 3.0  # third highest
    keys, feats = torch.randn(1, 16, 3), torch.randn(1, 16, 2)
    r = prumerge(a, keys, feats, keep=3)
    assert r.indices.tolist() == [[5, 2, 11]] and r.counts.tolist() == [4]
    r = prumerge(a, keys, feats, keep=0.25)  # floor(0.25 * 16) = 4: 5, 2, 11, then patch 0 (tie)
    assert r.indices.tolist() == [[5, 2, 11, 0]]
    b = prumerge(a.expand(2, -1), keys.expand(2, -1, -1), feats.expand(2, -1, -1), keep=T([1, 3]))
    assert b.counts.tolist() == [2, 4]
    assert b.indices.tolist() == [[5, -1, -1], [5, 2, 11]]


def test_keep_plus_raster_fill_hand_worked():
    a = sixteen_patch_attention()
    keys, feats = torch.randn(1, 16, 3), torch.randn(1, 16, 2)
    r = prumerge(a, keys, feats, plus=True, keep=8)
    # attention part round(8 / 4) = 2 -> S = [5, 2]; need 6 more from the 14 free patches
    # free = [0, 1, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], picks at floor(i * 14 / 6):
    # positions 0, 2, 4, 7, 9, 11 -> patches 0, 3, 6, 9, 11, 13
    assert r.indices.tolist() == [[5, 2, 0, 3, 6, 9, 11, 13]]
    assert r.num_attention.tolist() == [2] and r.counts.tolist() == [9]


def test_keep_plus_2d_fill_hand_worked():
    a = sixteen_patch_attention()
    keys, feats = torch.randn(1, 16, 3), torch.randn(1, 16, 2)
    r = prumerge(a, keys, feats, plus=True, keep=8, grid="2d")
    # need 6 on 4 x 4: r x c = 2 x 3 (exact; 3 x 2 has the same aspect mismatch, fewer rows wins)
    # rows floor((2i + 1) 4 / 4) = 1, 3; cols floor((2j + 1) 4 / 6) = 0, 2, 3
    # -> patches 4, 6, 7, 12, 14, 15, none in S
    assert r.indices.tolist() == [[5, 2, 4, 6, 7, 12, 14, 15]]
    # when lattice points fall in S they are replaced so that the count stays exact
    a2 = a.clone()
    a2[0, 6], a2[0, 7] = 20.0, 19.0  # S = [6, 7] now
    r2 = prumerge(a2, keys, feats, plus=True, keep=8, grid="2d")
    assert r2.indices[0, :2].tolist() == [6, 7] and r2.counts.tolist() == [9]
    assert len(set(r2.indices[0].tolist())) == 8


def test_keep_all_is_identity_and_drops_extra():
    a, keys, feats = rand_inputs(2, 16, d=4)
    r = prumerge(a, keys, feats, keep=16, k_neighbors=0, order="spatial")
    assert r.extra.tolist() == [False, False]  # every patch is a centre: no extra token
    assert torch.equal(r.tokens, feats)
    assert torch.equal(r.indices, torch.arange(16).expand(2, -1))


# ----------------------------------------------------------------------------- batch & dtypes


def flat_row(n):
    return torch.full((n,), 1.0 / n)  # no outlier: k = 0 -> fallback


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"plus": True},
        {"plus": True, "grid": "2d"},
        {"plus": True, "order": "spatial", "merge": "average"},
        {"extra_token": False},
        {"keep": 5},
        {"plus": True, "keep": 12, "grid": "2d"},
        {"k_neighbors": 0},
    ],
)
def test_batch_equals_single(opts):
    n = 36
    a, keys, feats = rand_inputs(4, n, seed=3)
    a[2] = flat_row(n)  # a sample with k = 0
    a[3, :6] = 0.5  # a sample with more outliers
    batched = prumerge(a, keys, feats, **opts)
    if "keep" not in opts:
        assert len(set(batched.counts.tolist())) > 1  # ragged
    for b in range(4):
        single = prumerge(a[b : b + 1], keys[b : b + 1], feats[b : b + 1], **opts)
        c, ci = int(single.counts[0]), int(single.num_indexed[0])
        assert int(batched.counts[b]) == c
        assert torch.equal(batched.indices[b, :ci], single.indices[0, :ci])
        assert (batched.indices[b, ci:] == -1).all()
        torch.testing.assert_close(batched.tokens[b, :c], single.tokens[0, :c], rtol=1e-5, atol=1e-6)
        assert (batched.tokens[b, c:] == 0).all()
        if single.extra is not None:
            assert bool(batched.extra[b]) == bool(single.extra[0])


def test_deterministic():
    a, keys, feats = rand_inputs(3, 49, seed=5)
    for plus in (False, True):
        r1, r2 = prumerge(a, keys, feats, plus=plus), prumerge(a, keys, feats, plus=plus)
        assert torch.equal(r1.tokens, r2.tokens) and torch.equal(r1.indices, r2.indices)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_dtype_follows_input(dtype):
    a, keys, feats = rand_inputs(2, 25, seed=1)
    keys, feats = keys.to(dtype), feats.to(dtype)
    ref = prumerge(a, keys.float(), feats.float(), plus=True)
    for sim_dtype in ("keys", "float32"):
        r = prumerge(a, keys, feats, plus=True, sim_dtype=sim_dtype)
        assert r.tokens.dtype == dtype
        assert torch.equal(r.indices, ref.indices)  # the selection is float32 in both modes
        if sim_dtype == "float32" or dtype == torch.float64:
            # float32 maths: the same as running on the upcast inputs, then casting back
            assert torch.equal(r.tokens, ref.tokens.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_similarity_of_16_bit_keys_is_taken_in_their_dtype(dtype):
    """One-hot features make each merged token show its neighbour set (y_i + sum_j a_j e_j). With
    the default, every set is a top-k of the cosine similarities of the keys normalised and
    multiplied in their own dtype (the official code's fp16 product); with sim_dtype="float32", a
    top-k of the float32 ones. (Tolerance: one rounding step of the product, for GEMM kernels that
    add in another order.) The two differ somewhere on these keys."""
    n, k = 256, 32
    g = torch.Generator().manual_seed(3)
    a = torch.softmax(torch.randn(1, n, generator=g) * 2, dim=1)
    keys = torch.randn(1, n, 64, generator=g).to(dtype)
    feats = torch.eye(n).to(dtype)[None]
    unit16 = F.normalize(keys[0], dim=-1)
    sims = {"keys": (unit16 @ unit16.T).float(), "float32": F.normalize(keys[0].float(), dim=-1) @ F.normalize(
        keys[0].float(), dim=-1).T}
    tol = {"keys": torch.finfo(dtype).eps, "float32": 1e-6}
    sets = {}
    for mode in ("keys", "float32"):
        r = prumerge(a, keys, feats, plus=True, k_neighbors=k, sim_dtype=mode)
        sets[mode] = []
        for row, i in zip(r.tokens[0].float(), r.indices[0].tolist()):
            if i < 0:
                continue
            chosen = set(torch.nonzero(row).flatten().tolist()) - {i}
            assert len(chosen) == k
            left = [j for j in range(n) if j not in chosen and j != i]
            s = sims[mode][i]
            assert min(s[j] for j in chosen) >= max(s[j] for j in left) - tol[mode]
            sets[mode].append(chosen)
    assert sets["keys"] != sets["float32"]


@pytest.mark.skipif(not cpu_kernel_available(), reason="numba is not importable here: the CPU kernel is off")
@pytest.mark.parametrize("plus,merge,dtype", [(False, "residual", torch.float32), (True, "residual", torch.float32),
                                              (True, "average", torch.float32), (True, "residual", torch.bfloat16)])
def test_cpu_kernel_and_tensor_path_give_the_same_reduction(monkeypatch, plus, merge, dtype):
    """The whole method, ragged batch: the CPU kernel (methods.neighbours) and the accelerator's
    tensor path choose the same neighbours (no ties in random keys) and agree up to the order of
    the float additions."""
    a, keys, feats = peaked_inputs(3, 144, 24, 16, salient=9, seed=4)
    keys, feats = keys.to(dtype), feats.to(dtype)
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(CPU_KERNELS_ENV, flag)
        out[flag] = prumerge(a, keys, feats, plus=plus, merge=merge)
    assert torch.equal(out["0"].counts, out["1"].counts) and torch.equal(out["0"].indices, out["1"].indices)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out["1"].tokens.float(), out["0"].tokens.float(), rtol=tol, atol=tol)


def test_matches_per_token_loop_reference():
    a, keys, feats = peaked_inputs(3, 64, 24, 16, salient=6, seed=11)
    for plus in (False, True):
        fast = prumerge(a, keys, feats, plus=plus)
        slow = prumerge_reference(a, keys, feats, plus=plus)
        assert fast.counts.tolist() == [len(t) for t in slow]
        for got, want in zip(fast.unpad(), slow):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- invariants


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 3))
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    n = height * width
    kind = draw(st.sampled_from(["peaked", "flat", "ties"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "peaked":
        a = torch.softmax(3.0 * torch.randn(batch, n, generator=g), dim=1)
    elif kind == "flat":
        a = torch.full((batch, n), 1.0 / n)
    else:
        a = torch.randint(0, 3, (batch, n), generator=g).float() / 4
    keys = torch.randn(batch, n, draw(st.integers(1, 4)), generator=g)
    feats = torch.randn(batch, n, draw(st.integers(1, 4)), generator=g)
    keep = draw(st.one_of(st.none(), st.integers(1, n), st.floats(1.0 / n, 1.0)))
    opts = {
        "plus": draw(st.booleans()),
        "k_neighbors": draw(st.integers(0, 40)),
        "merge": draw(st.sampled_from(["residual", "average"])),
        "extra_token": draw(st.booleans()),
        "grid": draw(st.sampled_from(["raster", "2d"])),
        "order": draw(st.sampled_from(["attention", "spatial"])),
        "keep": keep,
        "grid_size": (height, width),
    }
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return a, keys, feats.to(dtype), opts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_invariants(case):
    a, keys, feats, opts = case
    batch, n, d = feats.shape
    r = prumerge(a, keys, feats, **opts)
    assert isinstance(r, Reduction)
    assert r.tokens.dtype == feats.dtype and r.tokens.shape[::2] == (batch, d)
    assert r.tokens.shape[1] == int(r.counts.max())
    assert ((r.counts >= 1) & (r.counts <= n + 1)).all()
    indexed = r.num_indexed
    assert ((indexed >= 1) & (indexed <= n)).all()
    assert (r.num_attention <= indexed).all()
    if opts["extra_token"]:
        assert torch.equal(r.extra, indexed < n)  # an extra token iff something was pruned
    else:
        assert r.extra is None
    if opts["keep"] is not None:
        want = opts["keep"] if isinstance(opts["keep"], int) else math.floor(opts["keep"] * n + 1e-9)
        assert (indexed == want).all()
    for b in range(batch):
        c, ci = int(r.counts[b]), int(indexed[b])
        idx = r.indices[b]
        centres = idx[:ci]
        assert ((centres >= 0) & (centres < n)).all() and len(set(centres.tolist())) == ci
        assert (idx[ci:] == -1).all()
        assert (r.tokens[b, c:] == 0).all()
        assert torch.isfinite(r.tokens[b, :c].float()).all()
        if opts["order"] == "spatial":
            assert torch.equal(centres, centres.sort().values)
        else:
            k = int(r.num_attention[b])
            head = a[b, centres[:k]]
            assert (head[:-1] >= head[1:]).all()  # descending attention
            assert torch.equal(centres[k:], centres[k:].sort().values)  # grid ascending
        if opts["extra_token"] and ci < n:
            pruned = torch.ones(n, dtype=torch.bool)
            pruned[centres] = False
            e = (a[b, pruned, None] * feats[b, pruned].float()).sum(0)
            tol = 2e-2 if feats.dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(r.tokens[b, c - 1].float(), e, rtol=tol, atol=tol)
        if opts["k_neighbors"] == 0 or n == 1:
            assert torch.equal(r.tokens[b, :ci], feats[b, centres])  # no merge: rows unchanged


# ----------------------------------------------------------------------------- cls_attention


def naive_cls_attention(q, k, num_heads=None):
    b, t, c = q.shape
    if num_heads is None:
        full = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)  # [B, T, T]
        return full[:, 0, 1:]
    h, dh = num_heads, c // num_heads
    qh = q.view(b, t, h, dh).transpose(1, 2)
    kh = k.view(b, t, h, dh).transpose(1, 2)
    full = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(dh), dim=-1)  # [B, h, T, T]
    return full.mean(1)[:, 0, 1:]


def test_cls_attention_matches_full_matrix():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 17, 32, generator=g) * 3, torch.randn(2, 17, 32, generator=g) * 3
    got = cls_attention(q, k)
    assert got.shape == (2, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, naive_cls_attention(q, k), rtol=1e-5, atol=1e-7)
    assert (got.sum(1) < 1).all()  # the [CLS] column is dropped, not renormalised
    torch.testing.assert_close(cls_attention(q, k, num_heads=4), naive_cls_attention(q, k, 4), rtol=1e-5, atol=1e-7)
    # spec §1: one softmax of sqrt(h) * mean_h of the per-head scaled logits
    qh, kh = q[:, :1].view(2, 1, 4, 8), k.view(2, 17, 4, 8)
    per_head = torch.einsum("bqhc,bthc->bht", qh, kh) / math.sqrt(8)
    torch.testing.assert_close(got, torch.softmax(2.0 * per_head.mean(1), -1)[:, 1:], rtol=1e-5, atol=1e-7)
    half = cls_attention(q.bfloat16(), k.bfloat16())
    assert half.dtype == torch.float32


def test_cls_attention_errors():
    q = torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match="same shape"):
        cls_attention(q, torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match=r"\[B, N\+1, C\]"):
        cls_attention(q[0], q[0])
    with pytest.raises(ValueError, match="num_heads"):
        cls_attention(q, q, num_heads=3)
    with pytest.raises(ValueError, match="at least one patch"):
        cls_attention(q[:, :1], q[:, :1])


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "change, message",
    [
        ({"keep": -1}, r"keep = -1 keeps no token; pass an int count in \[1, 16\]"),
        ({"keep": 0}, "keeps no token"),
        ({"keep": 17}, "more than the N = 16 patches"),
        ({"keep": 0.0}, r"not a ratio in \(0, 1\]"),
        ({"keep": 1.5}, r"not a ratio in \(0, 1\]"),
        ({"keep": 0.01}, r"keeps floor\(0.01 \* 16\) = 0 tokens"),
        ({"keep": float("nan")}, "keep is NaN"),
        ({"keep": "8"}, "must be an int, a float or a tensor"),
        ({"keep": True}, "must be an int, a float or a tensor"),
        ({"keep": T([1, 2, 3])}, r"must have shape \[2\]"),
        ({"keep": T([1.0, 2.0])}, "integer counts"),
        ({"keep": T([0, 2])}, r"outside \[1, 16\]"),
        ({"k_neighbors": -1}, "k_neighbors must be an int >= 0"),
        ({"k_neighbors": 2.5}, "k_neighbors must be an int >= 0"),
        ({"merge": "mean"}, "merge must be one of 'residual', 'average'"),
        ({"grid": "hex"}, "grid must be one of"),
        ({"order": "random"}, "order must be one of"),
        ({"plus": 1}, "must be bools"),
        ({"grid_size": (3, 5)}, r"does not match N = 16"),
        ({"grid_size": "4x4"}, "grid_size must be an int or a pair"),
    ],
)
def test_bad_options(change, message):
    a, keys, feats = rand_inputs(2, 16)
    with pytest.raises(ValueError, match=message):
        prumerge(a, keys, feats, **change)


def test_bad_tensors():
    a, keys, feats = rand_inputs(2, 16)
    with pytest.raises(ValueError, match=r"cls_attn must have shape \[B, N\]"):
        prumerge(a[0], keys, feats)
    with pytest.raises(ValueError, match="floating-point"):
        prumerge((a * 100).long(), keys, feats)
    with pytest.raises(ValueError, match="must agree on B and N"):
        prumerge(a, keys[:, 1:], feats)
    with pytest.raises(ValueError, match="must agree on B and N"):
        prumerge(a, keys, feats[:1])
    with pytest.raises(ValueError, match="torch.Tensor"):
        prumerge(a.tolist(), keys, feats)
    bad = a.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prumerge(bad, keys, feats)
    a15, k15, f15 = rand_inputs(1, 15)
    with pytest.raises(ValueError, match=r"not a square grid; pass grid_size=\(H, W\)"):
        prumerge(a15, k15, f15, plus=True, grid="2d")
    r = prumerge(a15, k15, f15, plus=True, grid="2d", grid_size=(3, 5))
    assert r.counts.shape == (1,)
    with pytest.raises(ValueError, match="B >= 1"):
        prumerge(a[:0], keys[:0], feats[:0])


def test_benchmark_command_smoke(tmp_path):
    import json

    from vlmprune.bench.reduction import main

    out = tmp_path / "bench.json"
    argv = ["--tokens", "36", "--dim", "8", "--key-dim", "8", "--batch-sizes", "1", "2"]
    argv += ["--warmup", "1", "--repeats", "2", "--loop-warmup", "0", "--loop-repeats", "1", "--out", str(out)]
    main(argv)
    report = json.loads(out.read_text())
    assert report["command"].endswith(" ".join(argv))
    assert [(r["method"], r["batch"]) for r in report["results"]] == [
        ("prumerge", 1), ("prumerge", 2), ("prumerge+", 1), ("prumerge+", 2)
    ]
    for r in report["results"]:
        assert r["same_counts"] and r["max_abs_diff"] < 1e-5
        assert r["vectorised_ms"]["median"] > 0 and r["speedup"] > 0


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), n=st.sampled_from([8, 12, 64, 576]), k=st.integers(1, 40), block=st.integers(1, 6),
       seed=st.integers(0, 10_000), neg_inf=st.booleans())
def test_topk_indices_is_the_topk_set(rows, n, k, block, seed, neg_inf):
    """Two-stage top-k == one topk (continuous values: no ties at the k-th place)."""
    from vlmprune.methods.common import topk_indices

    k = min(k, n)
    x = torch.randn(2, rows, n, generator=torch.Generator().manual_seed(seed))
    if neg_inf:  # as PruMerge masks a centre's own column
        x[:, :, seed % n] = float("-inf")
    got = topk_indices(x, k, block=block).sort(-1).values
    ref = x.topk(k, dim=-1).indices.sort(-1).values
    assert got.shape == (2, rows, k)
    assert torch.equal(got, ref)


def test_topk_indices_ties_take_one_of_the_tied_entries():
    from vlmprune.methods.common import topk_indices

    x = torch.tensor([[5.0, 1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 4.0, 0.5, 0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0]])
    got = set(topk_indices(x, 3, block=2).tolist()[0])
    assert {0, 7} <= got and len(got) == 3 and (got - {0, 7}) <= {2, 3, 5}
