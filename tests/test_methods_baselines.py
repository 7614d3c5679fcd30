"""Vision-stage baselines: random, sequential, spatial lattice, [CLS] top-k."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmprune.methods.baselines import cls_topk, random_keep, sequential_keep, spatial_keep
from vlmprune.methods.common import lattice_mask, rank_of, scale_layers, spread_priority
from vlmprune.methods.prumerge import prumerge

T = torch.tensor


def feats_of(batch, n, d=3):
    # feature row j of sample b is (b, j, j * j): easy to read back which patch was kept
    j = torch.arange(n, dtype=torch.float32)
    row = torch.stack([torch.zeros(n), j, j * j], dim=1)[None].repeat(batch, 1, 1)
    row[:, :, 0] = torch.arange(batch, dtype=torch.float32)[:, None]
    return row[:, :, :d]


def check_selection(r, feats, counts):
    batch, n, _ = feats.shape
    assert r.counts.tolist() == list(counts)
    assert r.extra is None
    assert r.tokens.shape == (batch, max(counts), feats.shape[2]) and r.tokens.dtype == feats.dtype
    for b in range(batch):
        c = counts[b]
        idx = r.indices[b, :c]
        assert ((idx >= 0) & (idx < n)).all() and len(set(idx.tolist())) == c
        assert (r.indices[b, c:] == -1).all()
        assert torch.equal(r.tokens[b, :c], feats[b, idx])  # no merge: rows unchanged
        assert (r.tokens[b, c:] == 0).all()


def test_sequential_keeps_first_n():
    f = feats_of(2, 10)
    r = sequential_keep(f, 4)
    check_selection(r, f, [4, 4])
    assert r.indices.tolist() == [[0, 1, 2, 3]] * 2
    r = sequential_keep(f, T([2, 5]))  # per-sample budgets, padded
    check_selection(r, f, [2, 5])
    assert r.indices.tolist() == [[0, 1, -1, -1, -1], [0, 1, 2, 3, 4]]
    assert sequential_keep(f, 0.5).counts.tolist() == [5, 5]  # floor(0.5 * 10)


def test_random_keep_is_uniform_sorted_and_reproducible():
    f = feats_of(3, 20)
    r1 = random_keep(f, 6, generator=torch.Generator().manual_seed(0))
    r2 = random_keep(f, 6, generator=torch.Generator().manual_seed(0))
    check_selection(r1, f, [6, 6, 6])
    assert torch.equal(r1.indices, r2.indices)
    assert torch.equal(r1.indices, r1.indices.sort(dim=1).values)  # ascending patch order
    assert len({tuple(row) for row in r1.indices.tolist()}) > 1  # samples draw independently
    # every patch is drawn about equally often: 2000 draws of 5 of 10 -> 1000 each
    g = torch.Generator().manual_seed(1)
    big = random_keep(feats_of(2000, 10), 5, generator=g)
    hits = torch.bincount(big.indices.flatten(), minlength=10)
    assert ((hits > 900) & (hits < 1100)).all()
    rr = random_keep(f, T([1, 20, 7]), generator=g)
    check_selection(rr, f, [1, 20, 7])


def test_spatial_keep_lattice_hand_worked():
    f = feats_of(1, 576)
    r = spatial_keep(f, 40)
    # 40 on 24 x 24: 5 x 8 (exact; 8 x 5 ties on aspect, fewer rows wins)
    # rows floor((2i + 1) 24 / 10) = 2, 7, 12, 16, 21; cols floor((2j + 1) 24 / 16) = 1, 4, ..., 22
    rows, cols = [2, 7, 12, 16, 21], [1, 4, 7, 10, 13, 16, 19, 22]
    assert r.indices.tolist() == [[i * 24 + j for i in rows for j in cols]]
    check_selection(r, f, [40])
    # 37 has no good factorisation: 6 x 6 = 36 is the closest lattice; counts says so
    assert spatial_keep(f, 37).counts.tolist() == [36]
    assert spatial_keep(f, 576).indices.tolist() == [list(range(576))]
    # 1 token: the centre patch (12, 12)
    assert spatial_keep(f, 1).indices.tolist() == [[12 * 24 + 12]]


def test_spatial_keep_non_square_grid():
    f = feats_of(2, 12)
    with pytest.raises(ValueError, match="grid_size"):
        spatial_keep(f, 4)
    r = spatial_keep(f, 4, grid_size=(3, 4))
    # 4 on 3 x 4: 2 x 2; rows floor((2i + 1) 3 / 4) = 0, 2; cols floor((2j + 1) 4 / 4) = 1, 3
    assert r.indices.tolist() == [[1, 3, 9, 11]] * 2
    check_selection(r, f, [4, 4])


def test_cls_topk_hand_worked_and_orders():
    a = T([[0.1, 0.5, 0.2, 0.5, 0.05, 0.3]])
    f = feats_of(1, 6)
    r = cls_topk(a, f, 3)
    assert r.indices.tolist() == [[1, 3, 5]]  # 0.5 (patch 1), 0.5 (patch 3: tie, higher index), 0.3
    check_selection(r, f, [3])
    assert cls_topk(a, f, 3, order="spatial").indices.tolist() == [[1, 3, 5]]
    assert cls_topk(a, f, 4).indices.tolist() == [[1, 3, 5, 2]]
    assert cls_topk(a, f, 4, order="spatial").indices.tolist() == [[1, 2, 3, 5]]


def test_cls_topk_equals_prumerge_selection_only():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(3 * torch.randn(3, 49, generator=g), dim=1)
    keys, f = torch.randn(3, 49, 4, generator=g), torch.randn(3, 49, 5, generator=g)
    aits = prumerge(a, keys, f, k_neighbors=0, extra_token=False)  # the paper's "AITS only"
    r = cls_topk(a, f, aits.counts)  # same per-image budgets
    assert torch.equal(r.indices, aits.indices) and torch.equal(r.tokens, aits.tokens)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 6),
    st.data(),
)
def test_baseline_invariants(batch, height, width, data):
    n = height * width
    counts = [data.draw(st.integers(1, n)) for _ in range(batch)]
    budget = T(counts)
    f = torch.randn(batch, n, 2, dtype=data.draw(st.sampled_from([torch.float32, torch.bfloat16])))
    a = torch.rand(batch, n)
    check_selection(sequential_keep(f, budget), f, counts)
    check_selection(random_keep(f, budget, generator=torch.Generator().manual_seed(0)), f, counts)
    check_selection(cls_topk(a, f, budget), f, counts)
    s = spatial_keep(f, budget, grid_size=(height, width))
    check_selection(s, f, s.counts.tolist())
    assert ((s.counts >= 1) & (s.counts <= n)).all()


def test_lattice_mask_counts_and_spread_priority():
    m = lattice_mask(T([0, 1, 6, 16]), 4, 4)
    assert m.sum(1).tolist() == [0, 1, 6, 16]
    rank = spread_priority(4, 4)
    assert sorted(rank.tolist()) == list(range(16))
    first4 = set((rank < 4).nonzero().flatten().tolist())
    assert first4 == {0, 2, 8, 10}  # the first 4 of a 4 x 4 grid: a regular stride-2 lattice


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f, a: sequential_keep(f, 0), "keeps no token"),
        (lambda f, a: sequential_keep(f, -3), "keeps no token"),
        (lambda f, a: random_keep(f, 17), "more than the N = 16 patches"),
        (lambda f, a: spatial_keep(f, 1.2), r"not a ratio in \(0, 1\]"),
        (lambda f, a: spatial_keep(f, 4, grid_size=(2, 2)), "does not match N = 16"),
        (lambda f, a: cls_topk(a, f, float("nan")), "NaN"),
        (lambda f, a: cls_topk(a[:, :8], f, 2), r"shape \[B, N\] = \(2, 16\)"),
        (lambda f, a: cls_topk(a, f, 2, order="desc"), "order must be one of"),
        (lambda f, a: cls_topk(a.masked_fill(a > 0, float("nan")), f, 2), "NaN"),
        (lambda f, a: sequential_keep(f[0], 2), r"features must have shape \[B, N, D\]"),
        (lambda f, a: sequential_keep(f.long(), 2), "floating-point"),
        (lambda f, a: random_keep(f, T([1, 2, 3])), r"shape \[2\]"),
    ],
)
def test_bad_inputs(call, message):
    f, a = torch.randn(2, 16, 3), torch.rand(2, 16)
    with pytest.raises(ValueError, match=message):
        call(f, a)


def test_rank_of_inverts_a_permutation():
    order = torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3]])
    rank = rank_of(order)
    assert rank.tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]]
    assert torch.equal(rank.gather(1, order), torch.arange(4).expand(2, 4))
    assert rank_of(torch.tensor([1, 2, 0])).tolist() == [2, 0, 1]  # any number of leading dims


def test_scale_layers_rounding_and_collisions():
    # (l + 1) * 6 / 32 for l = 2, 6, 15: 0.5625, 1.3125, 3.0 -> 1, 1, 3 layers before -> layers 0, 0, 2
    assert scale_layers((2, 6, 15), 6, 32, collide="drop") == [0, 2]
    assert scale_layers((2, 6, 15), 6, 32, collide="shift") == [0, 1, 2]
    # a tie: (l + 1) * 48 / 32 = 4.5 for l = 2 -> 4 (half to even) or 5 (half up)
    assert scale_layers((2,), 48, 32, ties="even") == [3] and scale_layers((2,), 48, 32, ties="up") == [4]
    # "shift" leaves room for the layers still to come: 4 layers of 32 onto a 5-layer decoder
    assert scale_layers((27, 28, 29, 30), 5, 32) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="collide"):
        scale_layers((2,), 6, 32, collide="merge")
