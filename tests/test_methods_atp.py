"""Tests for the model-agnostic ATP-LLaVA modules (vlmprune.methods.atp): small, CPU, seconds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmprune.methods.atp import (
    DEFAULT_LAYERS,
    ATPConfig,
    ATPModule,
    ATPPruner,
    anneal_tau,
    average_tokens,
    budget_loss,
    default_strides,
    equivalent_target,
    fixed_ratio_counts,
    fixed_ratio_for_target,
    hard_keep,
    log_mask,
    min_average_tokens,
    per_layer_counts,
    redundancy_scores,
    redundancy_scores_from_sums,
    scale_layers,
    soft_mask,
    spatial_grids,
    spatial_scores,
    topk_keep,
    topk_soft_mask,
)

torch.set_num_threads(1)

# A hand example: 3 alive visual tokens, 2 instruction rows (rows need not sum to 1: the other keys
# of the sequence - system prompt, text - are not shown).
A_VV = torch.tensor([[1.0, 0.0, 0.9],  # row 0 = visual query 0; A[0, 2] = 0.9 lies above the diagonal:
                     [0.6, 0.4, 0.0],  # a causal model never produces it, and the causal score ignores it
                     [0.2, 0.3, 0.5]])
A_TV = torch.tensor([[0.1, 0.4, 0.2],
                     [0.1, 0.0, 0.2]])


def random_attention(batch: int, n_vis: int, n_text: int, *, scale: float = 3.0, seed: int = 0):
    """Heavy-tailed causal attention rows over [visual | text]: returns attn_vv [B, V, V], attn_tv [B, T, V]."""
    g = torch.Generator().manual_seed(seed)
    n = n_vis + n_text
    logits = torch.randn(batch, n, n, generator=g) * scale
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    a = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)
    return a[:, :n_vis, :n_vis], a[:, n_vis:, :n_vis]


# --------------------------------------------------------------------------- scores


def test_redundancy_scores_hand_example():
    s = redundancy_scores(A_VV[None], A_TV[None])
    # S_self, causal, the key itself excluded:
    #   key 0 is seen by queries 1, 2: (0.6 + 0.2) / 2 = 0.4
    #   key 1 is seen by query 2:       0.3 / 1       = 0.3
    #   key 2 is seen by no later query            -> 0   (A[0, 2] = 0.9 is ignored)
    #   / max 0.4 -> [1.0, 0.75, 0.0]
    torch.testing.assert_close(s.s_self, torch.tensor([[1.0, 0.75, 0.0]]))
    # S_cross = column means over the 2 rows: [0.1, 0.2, 0.2] / max 0.2 -> [0.5, 1.0, 1.0]
    torch.testing.assert_close(s.s_cross, torch.tensor([[0.5, 1.0, 1.0]]))
    # S_r = (S_self + S_cross) / 2 = [0.75, 0.875, 0.5]
    torch.testing.assert_close(s.s_r, torch.tensor([[0.75, 0.875, 0.5]]))


def test_redundancy_scores_modes_and_options():
    # non-causal: key 0 <- queries 1, 2: 0.4; key 1 <- queries 0, 2: (0 + 0.3) / 2 = 0.15;
    # key 2 <- queries 0, 1: (0.9 + 0) / 2 = 0.45; / 0.45 -> [0.8889, 0.3333, 1]
    s = redundancy_scores(A_VV[None], A_TV[None], causal=False)
    torch.testing.assert_close(s.s_self, torch.tensor([[0.4 / 0.45, 0.15 / 0.45, 1.0]]))
    # query weights w = [1, 0.5, 1] (soft-pruned query 1): key 0: (0.5*0.6 + 1*0.2) / 1.5 = 1/3,
    # key 1: 0.3 / 1 = 0.3, key 2: 0 -> / (1/3) -> [1, 0.9, 0]
    s = redundancy_scores(A_VV[None], A_TV[None], query_weight=torch.tensor([[1.0, 0.5, 1.0]]))
    torch.testing.assert_close(s.s_self, torch.tensor([[1.0, 0.9, 0.0]]))
    # single-score ablations: S_r is that score (not halved), the other is zeroed; its attention may be None
    s = redundancy_scores(A_VV[None], None, mode="self")
    torch.testing.assert_close(s.s_r, torch.tensor([[1.0, 0.75, 0.0]]))
    assert torch.count_nonzero(s.s_cross) == 0
    s = redundancy_scores(None, A_TV[None], mode="cross")
    torch.testing.assert_close(s.s_r, torch.tensor([[0.5, 1.0, 1.0]]))
    assert torch.count_nonzero(s.s_self) == 0
    # no instruction rows at all -> S_cross = 0; all-zero attention -> 0, never NaN
    s = redundancy_scores(torch.zeros(1, 3, 3), A_TV[None], text_mask=torch.zeros(1, 2, dtype=torch.bool))
    assert torch.count_nonzero(s.s_r) == 0 and torch.isfinite(s.s_r).all()
    with pytest.raises(ValueError, match="mode"):
        redundancy_scores(A_VV[None], A_TV[None], mode="text")
    with pytest.raises(ValueError, match="does not match"):
        redundancy_scores(A_VV[None], torch.zeros(1, 2, 4))


def _sums(vv, tv, valid, text_mask, w=None):
    """The column sums ``redundancy_scores_from_sums`` takes, computed from the rows."""
    w = valid.float() if w is None else valid.float() * w
    own = vv.diagonal(dim1=1, dim2=2)
    return (w[:, :, None] * vv).sum(1), own, (text_mask.float()[:, :, None] * tv).sum(1)


def test_redundancy_scores_from_sums_hand_example():
    # the causal part of the hand example (A[0, 2] zeroed, as a causal attention has it)
    vv = A_VV.tril()[None]
    ones = torch.ones(1, 3, dtype=torch.bool)
    tmask = torch.ones(1, 2, dtype=torch.bool)
    # self_sum = column sums [1.8, 0.7, 0.5]; own = [1.0, 0.4, 0.5]: key 0 (1.8 - 1.0) / 2 = 0.4,
    # key 1 (0.7 - 0.4) / 1 = 0.3, key 2 (0.5 - 0.5) / 0 -> 0: the hand example's [1.0, 0.75, 0.0]
    s = redundancy_scores_from_sums(*_sums(vv, A_TV[None], ones, tmask), ones, tmask)
    torch.testing.assert_close(s.s_self, torch.tensor([[1.0, 0.75, 0.0]]))
    torch.testing.assert_close(s.s_cross, torch.tensor([[0.5, 1.0, 1.0]]))
    torch.testing.assert_close(s.s_r, torch.tensor([[0.75, 0.875, 0.5]]))
    # query weights w = [1, 0.5, 1]: [1, 0.9, 0] as from the rows
    w = torch.tensor([[1.0, 0.5, 1.0]])
    s = redundancy_scores_from_sums(*_sums(vv, A_TV[None], ones, tmask, w), ones, tmask, query_weight=w)
    torch.testing.assert_close(s.s_self, torch.tensor([[1.0, 0.9, 0.0]]))
    with pytest.raises(ValueError, match="self_own must be a torch.Tensor"):
        redundancy_scores_from_sums(torch.zeros(1, 3), None, None, ones, tmask, mode="self")
    with pytest.raises(ValueError, match="cross_sum must have the shape of valid"):
        redundancy_scores_from_sums(None, None, torch.zeros(1, 4), ones, tmask, mode="cross")


@pytest.mark.parametrize("mode", ["both", "self", "cross"])
@pytest.mark.parametrize("causal", [True, False])
def test_redundancy_scores_from_sums_equal_rows(mode, causal):
    vv, tv = random_attention(3, 7, 4, seed=3)  # causal attention, as the decoder produces
    valid = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    valid[:, 0] = True
    tmask = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4])
    w = torch.rand(3, 7, generator=torch.Generator().manual_seed(2))
    ref = redundancy_scores(vv, tv, valid, tmask, mode=mode, causal=causal, query_weight=w)
    s = redundancy_scores_from_sums(*_sums(vv, tv, valid, tmask, w), valid, tmask, mode=mode, causal=causal,
                                    query_weight=w)
    for name in ("s_self", "s_cross", "s_r"):
        torch.testing.assert_close(getattr(s, name), getattr(ref, name), atol=1e-6, rtol=1e-5)


def test_redundancy_scores_padding():
    # the hand example placed in slots 0, 2, 3 of 5, padded text row at 1: same scores, 0 on padding
    slots = [0, 2, 3]
    vv = torch.full((1, 5, 5), 7.0)  # garbage everywhere a valid slot does not read
    for a, sa in enumerate(slots):
        for b, sb in enumerate(slots):
            vv[0, sa, sb] = A_VV[a, b]
    tv = torch.full((1, 3, 5), 7.0)
    tv[0, 0, slots], tv[0, 2, slots] = A_TV[0], A_TV[1]
    valid = torch.tensor([[True, False, True, True, False]])
    text_mask = torch.tensor([[True, False, True]])
    s = redundancy_scores(vv, tv, valid, text_mask)
    torch.testing.assert_close(s.s_r[0, slots], torch.tensor([0.75, 0.875, 0.5]))
    assert s.s_r[0, 1] == 0 and s.s_r[0, 4] == 0


# --------------------------------------------------------------------------- spatial


def test_spatial_grids_24x24():
    assert default_strides(24, 24) == (8, 4, 2)
    grids = spatial_grids(24, 24)
    assert [int(g.sum()) for g in grids] == [9, 36, 144]
    assert bool((grids[0] <= grids[1]).all() and (grids[1] <= grids[2]).all())  # nested
    rows = sorted({int(i) // 24 for i in grids[0].nonzero()[:, 0]})
    assert rows == [3, 11, 19]  # offset 3: the most centred nested choice (see _axis_offset)
    s = spatial_scores(24, 24)
    # 1 - 3 R: R = 9/576 = 1/64 -> 0.953125; 36/576 = 1/16 -> 0.8125; 144/576 = 1/4 -> 0.25; rest 0
    values, counts = s.unique(return_counts=True)
    torch.testing.assert_close(values, torch.tensor([0.0, 0.25, 0.8125, 0.953125]))
    assert counts.tolist() == [432, 108, 27, 9]
    assert s[3 * 24 + 3] == 0.953125 and s[3 * 24 + 7] == 0.8125 and s[1 * 24 + 1] == 0.25 and s[0] == 0


def test_spatial_grids_other_sizes():
    # strides scale with the side: 48 x 48 -> (16, 8, 4), still 3 / 6 / 12 points per side
    assert default_strides(48, 48) == (16, 8, 4)
    assert [int(g.sum()) for g in spatial_grids(48, 48)] == [9, 36, 144]
    # 4 x 4 -> (4, 2, 1): 1 token (R = 1/16 -> 0.8125), 4 (R = 1/4 -> 0.25), 16 (R = 1 -> score <= 0, ignored)
    assert default_strides(4, 4) == (4, 2, 1)
    s = spatial_scores(4, 4)
    assert sorted(s.tolist()) == [0.0] * 12 + [0.25] * 3 + [0.8125]
    # explicit, non-square
    assert [int(g.sum()) for g in spatial_grids(12, 24, (8, 4, 2))] == [2 * 3, 3 * 6, 6 * 12]
    with pytest.raises(ValueError, match="nested"):
        spatial_grids(24, 24, (8, 3))


# --------------------------------------------------------------------------- masks


def test_soft_mask_keep_everything():
    torch.manual_seed(0)
    s_r, s_s = torch.rand(2, 7), torch.rand(2, 7)
    m = soft_mask(s_r, s_s, torch.tensor([-1.0, -1.0]), torch.tensor([0.9, 0.9]), 0.1)
    # (S_r - theta_r) / tau >= (0 + 1) / 0.1 = 10 -> M >= sigmoid(10) = 0.99995
    assert bool((m > 0.9999).all())
    assert log_mask(m).abs().max() < 1e-4
    # padding slots get 0; one branch disabled; the smooth "or"
    valid = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    assert soft_mask(s_r, s_s, -1.0, 0.9, 0.1, valid)[1, 5:].eq(0).all()
    torch.testing.assert_close(soft_mask(s_r, s_s, None, 0.2, 0.1), torch.sigmoid((s_s - 0.2) / 0.1))
    mr, ms = torch.sigmoid((s_r - 0.5) / 0.1), torch.sigmoid((s_s - 0.5) / 0.1)
    torch.testing.assert_close(soft_mask(s_r, s_s, 0.5, 0.5, 0.1), torch.maximum(mr, ms))
    torch.testing.assert_close(soft_mask(s_r, s_s, 0.5, 0.5, 0.1, combine="or"), 1 - (1 - mr) * (1 - ms))
    with pytest.raises(ValueError, match="at least one"):
        soft_mask(s_r, s_s, None, None, 0.1)


def test_hard_keep_rule():
    s_r = torch.tensor([[0.9, 0.1, 0.0, 0.4]])
    s_s = torch.tensor([[0.0, 0.95, 0.25, 0.0]])
    keep, n = hard_keep(s_r, s_s, -1.0, 0.9)  # keep-everything thresholds
    assert keep.all() and n.tolist() == [4]
    keep, n = hard_keep(s_r, s_s, 0.3, 0.9)  # 0.9 > 0.3, 0.95 > 0.9, 0.4 > 0.3
    assert keep.tolist() == [[True, True, False, True]] and n.tolist() == [3]
    keep, _ = hard_keep(s_r, s_s, 0.3, None)  # spatial branch disabled
    assert keep.tolist() == [[True, False, False, True]]
    # nothing passes -> the slot with the largest margin max(S_r - 2, S_s - 2) is kept: slot 1 (0.95)
    keep, n = hard_keep(s_r, s_s, 2.0, 2.0)
    assert keep.tolist() == [[False, True, False, False]] and n.tolist() == [1]
    # ... but never a padding slot
    keep, n = hard_keep(s_r, s_s, 2.0, 2.0, torch.tensor([[True, False, True, True]]))
    assert keep.tolist() == [[True, False, False, False]]
    with pytest.raises(ValueError, match="at least one valid"):
        hard_keep(s_r, s_s, 0.1, 0.1, torch.zeros(1, 4, dtype=torch.bool))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.floats(-1.5, 1.5), st.floats(-1.5, 1.5), st.integers(0, 10_000))
def test_hard_keep_properties(batch, vlen, theta_r, theta_s, seed):
    g = torch.Generator().manual_seed(seed)
    s_r, s_s = torch.rand(batch, vlen, generator=g), torch.rand(batch, vlen, generator=g)
    valid = torch.rand(batch, vlen, generator=g) < 0.7
    valid[:, 0] = True
    keep, n = hard_keep(s_r, s_s, theta_r, theta_s, valid)
    assert bool((keep <= valid).all()) and bool((n >= 1).all()) and n.tolist() == keep.sum(1).tolist()
    unchecked = hard_keep(s_r, s_s, theta_r, theta_s, valid, check=False)  # the caller vouches: no host read
    assert torch.equal(unchecked[0], keep) and torch.equal(unchecked[1], n)
    plain = ((s_r > theta_r) | (s_s > theta_s)) & valid
    assert bool(((keep == plain) | ~plain.any(1, keepdim=True)).all())  # rule, unless rescued


# --------------------------------------------------------------------------- MLP and pruner


def small_config(**kw) -> ATPConfig:
    base = dict(num_layers=6, num_patches=16, hidden=8)
    base.update(kw)
    return ATPConfig(**base)


def test_defaults_keep_almost_everything_at_start():
    """The init check: on heavy-tailed attention most S_r are far below the spec's 0.1, so theta_r
    starts at -0.5 instead: every token passes the hard rule and the soft cumulative mask after all
    5 modules keeps >= 0.967 of every token (sigmoid(5)^5)."""
    torch.manual_seed(0)
    pruner = ATPPruner(ATPConfig(num_layers=32))
    assert pruner.layers == DEFAULT_LAYERS
    vv, tv = random_attention(2, 576, 12)
    scores = pruner.scores(vv, tv)
    assert float((scores.s_r < 0.1).float().mean()) > 0.5  # theta_r = 0.1 would prune most tokens
    prev, counts = None, []
    for layer in pruner.layers:
        step = pruner.soft_step(layer, scores, prev=prev)
        prev = step.cumulative
        counts.append(step.count)
        assert pruner.hard_step(layer, scores).keep.all()
    assert float(prev.detach().min()) >= torch.sigmoid(torch.tensor(5.0)) ** 5 - 1e-3
    assert float(pruner.average_tokens(counts).detach().min()) > 0.97 * 576
    th = pruner.thresholds(2, scores)
    assert th.theta_r.sub(-0.5).abs().max() < 0.05 and th.theta_s.sub(0.9).abs().max() < 0.05


def test_gradients_reach_both_heads():
    torch.manual_seed(0)
    # thresholds in the middle of the score range, so both branches win on some tokens
    pruner = ATPPruner(small_config(init_theta_r=0.3, init_theta_s=0.5, target=8.0))
    vv, tv = random_attention(3, 16, 4, seed=1)
    scores = pruner.scores(vv, tv)
    prev, counts, bias = None, [], []
    for layer in pruner.layers:
        step = pruner.soft_step(layer, scores, prev=prev)
        prev = step.cumulative
        counts.append(step.count)
        bias.append(pruner.log_mask(prev))
    for name, loss in [("budget", pruner.budget_loss(counts).total),
                       ("log-mask", sum((b * torch.randn_like(b)).sum() for b in bias))]:
        pruner.zero_grad()
        loss.backward(retain_graph=True)
        for layer in pruner.layers:
            m = pruner.atp[str(layer)]
            for p in (m.head_r.weight, m.head_r.bias, m.head_s.weight, m.head_s.bias, m.fc.weight):
                assert p.grad is not None and p.grad.abs().sum() > 0, (name, layer)


def test_gradient_at_default_init_max_vs_or():
    # documented behaviour: at the default init M_r >= 0.993 beats M_s <= sigmoid(0.53) everywhere,
    # so max() gives theta_s no gradient yet; combine="or" feeds both heads from the start
    vv, tv = random_attention(2, 16, 4, seed=2)
    for combine, s_grad in (("max", False), ("or", True)):
        torch.manual_seed(0)
        pruner = ATPPruner(small_config(combine=combine, target=8.0))
        scores = pruner.scores(vv, tv)
        step = pruner.soft_step(0, scores)
        pruner.budget_loss([step.count] + [step.count.detach()] * 4).total.backward()
        m = pruner.atp["0"]
        assert m.head_r.bias.grad.abs() > 0
        assert bool(m.head_s.bias.grad.abs() > 0) == s_grad


def test_ragged_batch_equals_singles():
    torch.manual_seed(0)
    pruner = ATPPruner(small_config(init_theta_r=0.2, init_theta_s=0.5))
    for p in pruner.parameters():  # move away from init so thresholds depend on the input
        p.data.add_(0.3 * torch.randn_like(p))
    sizes, texts = [16, 9, 5], [4, 2, 3]
    singles = []
    for b, (v, t) in enumerate(zip(sizes, texts)):
        vv, tv = random_attention(1, v, t, seed=10 + b)
        idx = torch.randperm(16)[:v].sort().values[None]  # alive patch indices, in sequence order
        singles.append((vv, tv, idx))
    vmax, tmax = max(sizes), max(texts)
    vv = torch.zeros(3, vmax, vmax)
    tv = torch.zeros(3, tmax, vmax)
    idx = torch.full((3, vmax), -1, dtype=torch.long)
    valid = torch.zeros(3, vmax, dtype=torch.bool)
    tmask = torch.zeros(3, tmax, dtype=torch.bool)
    for b, (v1, t1, i1) in enumerate(singles):
        v, t = v1.shape[1], t1.shape[1]
        vv[b, :v, :v], tv[b, :t, :v], idx[b, :v], valid[b, :v], tmask[b, :t] = v1[0], t1[0], i1[0], True, True
    batch_scores = pruner.scores(vv, tv, valid, tmask)
    hard = pruner.hard_step(1, batch_scores, idx)
    soft = pruner.soft_step(1, batch_scores, idx)
    for b, (v1, t1, i1) in enumerate(singles):
        v = v1.shape[1]
        s1 = pruner.scores(v1, t1)
        torch.testing.assert_close(batch_scores.s_r[b, :v], s1.s_r[0])
        h1 = pruner.hard_step(1, s1, i1)
        torch.testing.assert_close(hard.thresholds.theta_r[b], h1.thresholds.theta_r[0])
        torch.testing.assert_close(hard.thresholds.theta_s[b], h1.thresholds.theta_s[0])
        assert hard.keep[b, :v].tolist() == h1.keep[0].tolist() and not hard.keep[b, v:].any()
        assert int(hard.counts[b]) == int(h1.counts[0])
        torch.testing.assert_close(soft.count[b], pruner.soft_step(1, s1, i1).count[0])
    assert 0 < int(hard.counts.min()) and int(hard.counts.max()) < 16  # the example actually prunes


def test_module_grid_input_scatter():
    m = ATPModule(num_patches=6, hidden=4)
    x = m.grid_input(torch.tensor([[0.5, 1.0, 9.0]]), torch.tensor([[0.2, 0.4, 9.0]]),
                     torch.tensor([[4, 1, -1]]), torch.tensor([[True, True, False]]))
    torch.testing.assert_close(x, torch.tensor([[0, 1.0, 0, 0, 0.5, 0, 0, 0.4, 0, 0, 0.2, 0]]))
    with pytest.raises(ValueError, match="outside"):
        m.grid_input(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([[0, 6]]))
    with pytest.raises(ValueError, match="patch_index is required"):
        m.grid_input(torch.ones(1, 2), torch.ones(1, 2))


# --------------------------------------------------------------------------- budgets and layers


def test_all_layer_average_hand_example():
    # 32 layers, modules after 2, 8, 14, 20, 26: layers 0-2 see 576 (3 layers), 3-8 see 288 (6),
    # 9-14: 144 (6), 15-20: 72 (6), 21-26: 36 (6), 27-31: 18 (5)
    # (3*576 + 6*288 + 6*144 + 6*72 + 6*36 + 5*18) / 32 = (1728+1728+864+432+216+90) / 32 = 5058 / 32
    counts = [288.0, 144.0, 72.0, 36.0, 18.0]
    avg = average_tokens(counts, DEFAULT_LAYERS, 32, 576)
    torch.testing.assert_close(avg, torch.tensor([5058 / 32]))
    per = per_layer_counts(counts, DEFAULT_LAYERS, 32, 576)
    assert per.shape == (1, 32) and per[0, :3].eq(576).all() and per[0, 3].item() == 288 and per[0, 31].item() == 18
    torch.testing.assert_close(per.mean(1), avg)
    # batched [B, K] tensor gives one average per sample
    c = torch.tensor([counts, [576.0] * 5])
    torch.testing.assert_close(average_tokens(c, DEFAULT_LAYERS, 32, 576), torch.tensor([5058 / 32, 576.0]))
    assert min_average_tokens(DEFAULT_LAYERS, 32, 576) == (3 * 576 + 29) / 32


def test_budget_loss_hand_example():
    # 6 layers, modules after 0..4; counts (300, 200, 100, 50, 10):
    # per layer 576, 300, 200, 100, 50, 10 -> Nbar = 1236 / 6 = 206
    # L_atp = sum_k (N_k / 576) (l_k + 1) / 6 = (300*1 + 200*2 + 100*3 + 50*4 + 10*5) / (576*6) = 1250 / 3456
    # L_target (target 144) = |206 - 144| / 576 = 62 / 576
    counts = [torch.tensor([300.0]), torch.tensor([200.0]), torch.tensor([100.0]), torch.tensor([50.0]),
              torch.tensor([10.0])]
    out = budget_loss(counts, (0, 1, 2, 3, 4), 6, 576, target=144.0)
    torch.testing.assert_close(out.average, torch.tensor([206.0]))
    torch.testing.assert_close(out.l_atp, torch.tensor(1250 / 3456))
    torch.testing.assert_close(out.l_target, torch.tensor(62 / 576))
    torch.testing.assert_close(out.total, torch.tensor(0.05 * 1250 / 3456 + 62 / 576))
    # batch reduction: one sample above and one below the target can cancel; "sample" does not
    two = torch.tensor([[300.0, 200, 100, 50, 10], [100.0, 60, 30, 10, 5]])  # Nbar 206, (576+205)/6
    b = budget_loss(two, (0, 1, 2, 3, 4), 6, 576, target=160.0)
    s = budget_loss(two, (0, 1, 2, 3, 4), 6, 576, target=160.0, target_reduction="sample")
    assert float(b.l_target) < float(s.l_target)
    assert float(budget_loss(counts, (0, 1, 2, 3, 4), 6, 576).l_target) == 0.0


def test_scale_layers_and_targets():
    assert scale_layers(32) == DEFAULT_LAYERS
    assert scale_layers(6) == (0, 1, 2, 3, 4)
    assert scale_layers(4) == (0, 1, 2)
    assert scale_layers(2) == (0,)
    assert scale_layers(64) == (5, 17, 29, 41, 53)
    # the paper's targets on the 6-layer testbed layout: 29 pruned layers averaging 99.3 / 37.5 tokens
    assert equivalent_target(144, to_layers=(0, 1, 2, 3, 4), to_num_layers=6) == pytest.approx(178.76, abs=0.01)
    assert equivalent_target(88, to_layers=(0, 1, 2, 3, 4), to_num_layers=6) == pytest.approx(127.26, abs=0.01)
    assert equivalent_target(144, to_layers=DEFAULT_LAYERS, to_num_layers=32) == pytest.approx(144)


def test_anneal_tau():
    assert anneal_tau(0, 100) == pytest.approx(0.1) and anneal_tau(100, 100) == pytest.approx(0.02)
    assert anneal_tau(50, 100) == pytest.approx(math.sqrt(0.1 * 0.02))
    assert anneal_tau(50, 100, schedule="linear") == pytest.approx(0.06)
    assert anneal_tau(50, 100, schedule="cosine") == pytest.approx(0.06)
    assert ATPPruner(small_config(tau_final=0.02)).tau_at(100, 100) == pytest.approx(0.02)
    assert ATPPruner(small_config()).tau_at(100, 100) == pytest.approx(0.1)


# --------------------------------------------------------------------------- fixed-ratio ablation


def test_fixed_ratio_mode():
    assert fixed_ratio_counts(0.5, 5, 576) == [288, 144, 72, 36, 18]
    assert fixed_ratio_counts(0.01, 3, 16) == [1, 1, 1]
    r = fixed_ratio_for_target(144, (0, 1, 2, 3, 4), 6, 576)
    avg = average_tokens([float(c) for c in fixed_ratio_counts(r, 5, 576)], (0, 1, 2, 3, 4), 6, 576)
    assert abs(float(avg) - 144) < 1.0
    pruner = ATPPruner(small_config(fixed_ratio=0.5))
    assert len(pruner.state_dict()) == 0 and pruner.fixed_counts == [8, 4, 2, 1, 1]
    vv, tv = random_attention(2, 16, 3)
    scores = pruner.scores(vv, tv)
    assert pruner.hard_step(0, scores).counts.tolist() == [8, 8]
    soft = pruner.soft_step(0, scores, tau=0.01)
    assert soft.count.sub(8).abs().max() < 0.5
    # hard top-k: priorities tie -> tiebreak, then slot order
    keep, n = topk_keep(torch.tensor([[0.5, 0.9, 0.5, 0.5]]), 2, tiebreak=torch.tensor([[0.0, 0.0, 0.3, 0.1]]))
    assert keep.tolist() == [[False, True, True, False]] and n.tolist() == [2]
    # soft: threshold halfway between the 2nd (0.9) and 3rd (0.6) priority: t = 0.75
    p = torch.tensor([[0.9, 0.6, 0.2, 0.95]])
    torch.testing.assert_close(topk_soft_mask(p, 2, 0.1), torch.sigmoid((p - 0.75) / 0.1))
    # a removed slot (prev < 0.5) ranks last: slot 3 -> 0.95 - 2; order 0.9, 0.6, 0.2 -> t = 0.4
    m = topk_soft_mask(p, 2, 0.01, prev=torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert m[0, :2].gt(0.99).all() and m[0, 2:].lt(0.01).all()


# --------------------------------------------------------------------------- persistence and config


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    pruner = ATPPruner(small_config(init_theta_r=0.2, init_theta_s=0.5, target=6.0, score="cross"))
    for p in pruner.parameters():
        p.data.add_(0.3 * torch.randn_like(p))
    pruner.save(tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["atp_config.json", "atp_weights.safetensors"]
    assert not any("spatial" in k for k in pruner.state_dict())  # the spatial buffer is rebuilt, not saved
    loaded = ATPPruner.load(tmp_path)
    assert loaded.config == pruner.config and loaded.layers == pruner.layers
    vv, tv = random_attention(2, 16, 3, seed=4)
    for layer in pruner.layers:
        a, b = pruner.hard_step(layer, pruner.scores(vv, tv)), loaded.hard_step(layer, loaded.scores(vv, tv))
        assert torch.equal(a.thresholds.theta_r, b.thresholds.theta_r)
        assert torch.equal(a.thresholds.theta_s, b.thresholds.theta_s) and torch.equal(a.keep, b.keep)
    fixed = ATPPruner(small_config(fixed_ratio=0.4, spatial=False))
    fixed.save(tmp_path / "fixed")
    assert ATPPruner.load(tmp_path / "fixed").fixed_counts == fixed.fixed_counts
    with pytest.raises(ValueError, match="not an ATP checkpoint"):
        ATPPruner.load(tmp_path / "nowhere")


def test_default_state_dict_is_small():
    pruner = ATPPruner(ATPConfig(num_layers=32))
    n = sum(v.numel() for v in pruner.state_dict().values())
    assert n == 5 * (2 * 576 * 256 + 256 + 2 * (256 + 1))  # ~1.5M floats, 5.9 MB in fp32


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=(0, 5)), r"\[0, 4\]"),
    (dict(layers=(2, 1)), "strictly increasing"),
    (dict(layers=()), "non-empty"),
    (dict(num_layers=1), "num_layers"),
    (dict(num_patches=15), "not a square"),
    (dict(grid=(3, 4)), "does not match"),
    (dict(score="text"), "score must be one of"),
    (dict(redundant=False, spatial=False), "enable at least one"),
    (dict(fixed_ratio=0.0), "fixed_ratio"),
    (dict(fixed_ratio=1.5), "fixed_ratio"),
    (dict(tau=0.0), "tau must be"),
    (dict(tau_final=-1.0), "tau_final"),
    (dict(lambda_atp=-0.1), "lambda_atp"),
    (dict(target=0.0), "target must be"),
    (dict(target=2.0), "unreachable"),
    (dict(init_theta_r=1.5), "strictly inside"),
    (dict(theta_range=(1.0, 0.0)), "theta_range"),
    (dict(spatial_strides=(4, 3)), "nested"),
    (dict(combine="sum"), "combine"),
    (dict(hidden=0), "hidden"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_config(**kwargs)


def test_config_details():
    # the testbed layout cannot reach the paper's 88: layer 0 alone contributes 576 / 6 = 96
    with pytest.raises(ValueError, match="at least 96.83"):
        ATPConfig(num_layers=6, target=88)
    assert ATPConfig(num_layers=6, target=144).layers == (0, 1, 2, 3, 4)
    assert small_config(redundant=False).init_theta_s == small_config().init_theta_r  # starts at keep-all
    assert small_config().init_theta_s == 0.9
    with pytest.raises(ValueError, match="unknown ATPConfig field"):
        ATPConfig.from_dict({"num_layers": 6, "layer": [0]})
    assert ATPConfig.from_dict(small_config().to_dict()) == small_config()
    pruner = ATPPruner(small_config())
    with pytest.raises(ValueError, match="no ATP module after layer 5"):
        pruner.hard_step(5, pruner.scores(*random_attention(1, 16, 2)))
