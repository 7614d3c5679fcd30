"""ATP with several grids per sample (methods/atp/units.py and ATPPruner's slots path): hand-worked
cases, and the one-unit-per-sample path == the one-grid path exactly."""

from __future__ import annotations

import pytest
import torch

from vlmprune.methods import atp as A
from vlmprune.methods.atp import units as U


def test_judge_groups_hand_case():
    unit = torch.tensor([[-1, 0, 0, -1, 1, -1], [2, 2, -1, -1, -1, -1]])
    valid = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    sample = torch.tensor([0, 0, 1])
    g, gs = U.judge_groups(unit, valid, sample, per="unit", off_grid="keep")
    assert g.tolist() == [[-1, 0, 0, -1, 1, -1], [2, 2, -1, -1, -1, -1]] and gs.tolist() == [0, 0, 1]
    g, _ = U.judge_groups(unit, valid, sample, per="unit", off_grid="score")
    # an off-grid slot joins the unit before it (the first one: the unit after it); padding stays -1
    assert g.tolist() == [[0, 0, 0, 0, 1, 1], [2, 2, 2, -1, -1, -1]]
    g, gs = U.judge_groups(unit, valid, sample, per="sample", off_grid="keep")
    assert g.tolist() == [[-1, 0, 0, -1, 0, -1], [1, 1, -1, -1, -1, -1]] and gs.tolist() == [0, 1]
    g, _ = U.judge_groups(unit, valid, sample, per="sample", off_grid="score")
    assert g.tolist() == [[0] * 6, [1, 1, 1, -1, -1, -1]]


def test_group_rescale_and_range_hand_case():
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0]])
    group = torch.tensor([[0, 0, 1, 1, -1]])
    assert U.group_rescale(s, group, 2).tolist() == [[0.5, 1.0, 0.75, 1.0, 0.0]]
    lo, hi = U.group_range(s, group, 2)
    assert lo.tolist() == [1.0, 3.0] and hi.tolist() == [2.0, 4.0]


def test_unit_maps_identity_and_area_resampling():
    # unit 0: 2 x 2 (the module's grid), slots at patches 3, 0; unit 1: 2 x 4, all 8 patches
    unit = torch.tensor([[0, 0, -1], [1, 1, 1]])
    patch = torch.tensor([[3, 0, -1], [0, 1, 2]])
    values = torch.tensor([[5.0, 7.0, 1.0], [1.0, 3.0, 4.0]])
    maps = U.unit_maps(values, unit, patch, [(2, 2), (2, 4)], (2, 2))
    assert maps[0].tolist() == [7.0, 0.0, 0.0, 5.0]  # scattered as it is; the off-grid slot is ignored
    assert maps[1].tolist() == [2.0, 2.0, 0.0, 0.0]  # pairs of columns averaged: (1+3)/2, (4+0)/2
    bil = U.unit_maps(values, unit, patch, [(2, 2), (2, 4)], (2, 2), resample="bilinear")
    assert torch.equal(bil[0], maps[0]) and bil[1].shape == (4,)
    # per sample: the mean of its units' maps
    both = U.group_maps(maps, torch.tensor([0, 0]), "sample", 1)
    assert both.tolist() == [[4.5, 1.0, 0.0, 2.5]]
    assert U.group_maps(maps, torch.tensor([0, 1]), "unit", 2) is maps


def _scores(pr, batch, vlen, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn_vv = torch.rand(batch, vlen, vlen, generator=g)
    attn_tv = torch.rand(batch, 3, vlen, generator=g)
    return attn_vv, attn_tv


@pytest.mark.parametrize("fixed", [None, 0.5])
def test_one_unit_per_sample_equals_the_one_grid_path_exactly(fixed):
    """Each sample one unit on the module's grid (LLaVA-1.5): scores, thresholds, keep, soft mask
    and counts are bitwise those of the patch-index path."""
    torch.manual_seed(0)
    pr = A.ATPPruner(A.ATPConfig(num_layers=6, num_patches=16, hidden=8, fixed_ratio=fixed))
    for m in pr.atp.values():
        torch.nn.init.normal_(m.head_r.weight, std=1.0)
    bsz, vlen = 3, 16
    valid = torch.ones(bsz, vlen, dtype=torch.bool)
    valid[1, 10:] = False  # sample 1 has lost 6 tokens
    patch = torch.stack([torch.randperm(16) for _ in range(bsz)])
    unit = torch.arange(bsz)[:, None].expand(bsz, vlen)
    slots = pr.units(unit, patch, [(4, 4)] * bsz, torch.arange(bsz), valid, initial=[16] * bsz)
    assert slots.per_sample
    vv, tv = _scores(pr, bsz, vlen)
    old, new = pr.scores(vv, tv, valid), pr.scores(vv, tv, valid, slots=slots)
    assert torch.equal(old.s_r, new.s_r) and torch.equal(old.s_self, new.s_self)
    layer = pr.layers[1]
    a, b = pr.hard_step(layer, old, patch), pr.hard_step(layer, new, patch, slots=slots)
    assert torch.equal(a.keep, b.keep) and torch.equal(a.counts, b.counts) and torch.equal(a.s_s, b.s_s)
    if fixed is None:
        assert torch.equal(a.thresholds.theta_r, b.thresholds.theta_r)
    prev = torch.rand(bsz, vlen) * valid
    a, b = pr.soft_step(layer, old, patch, prev), pr.soft_step(layer, new, patch, prev, slots=slots)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.count, b.count)


def test_units_of_other_grids_get_their_own_spatial_score_and_thresholds():
    torch.manual_seed(0)
    pr = A.ATPPruner(A.ATPConfig(num_layers=6, num_patches=16, hidden=8, spatial_strides=(2, 1)))
    for m in pr.atp.values():
        torch.nn.init.normal_(m.head_r.weight, std=1.0)
    # one sample: a 4 x 4 unit (16 slots), a 6 x 8 unit (48 slots), one off-grid slot
    unit = torch.cat([torch.zeros(16), torch.ones(48), -torch.ones(1)]).long()[None]
    patch = torch.cat([torch.arange(16), torch.arange(48), torch.tensor([-1])])[None]
    valid = torch.ones(1, 65, dtype=torch.bool)
    slots = pr.units(unit, patch, [(4, 4), (6, 8)], torch.tensor([0, 0]), valid)
    assert not slots.per_sample and slots.num_groups == 2 and slots.initial == [64]
    s_s = pr.spatial_units(slots)
    assert torch.equal(s_s[0, :16], A.spatial_scores(4, 4, (2, 1)))  # the configured strides on the module's grid
    assert torch.equal(s_s[0, 16:64], A.spatial_scores(6, 8))  # default strides on another grid
    assert s_s[0, 64] == 0
    vv, tv = _scores(pr, 1, 65)
    scores = pr.scores(vv, tv, valid, slots=slots)
    assert scores.s_r[0, :16].max() <= 1 and scores.s_self[0, :16].max() == 1 and scores.s_self[0, 16:64].max() == 1
    assert scores.s_r[0, 64] == 0  # off grid, kept: not judged
    step = pr.hard_step(pr.layers[0], scores, slots=slots)
    assert step.thresholds.theta_r.shape == (2,) and step.keep[0, 64]  # the off-grid slot is kept
    assert step.thresholds.theta_r[0] != step.thresholds.theta_r[1]


def test_budget_against_each_samples_initial_count():
    layers, num_layers, n = (0, 2), 4, 16
    counts = [torch.tensor([8.0, 4.0]), torch.tensor([4.0, 2.0])]
    # sample 1 started with 8 tokens: average (1 * 8 + 2 * 4 + 1 * 2) / 4 = 4.5
    avg = A.average_tokens(counts, layers, num_layers, torch.tensor([16.0, 8.0]))
    assert avg.tolist() == [(16 + 2 * 8 + 4) / 4, 4.5]
    loss = A.budget_loss(counts, layers, num_layers, n, target=8.0, initial=torch.tensor([16.0, 8.0]))
    frac = torch.tensor([9.0 / 16, 4.5 / 8])
    assert torch.allclose(loss.fraction, frac) and torch.allclose(loss.l_target, (frac.mean() - 0.5).abs())
    same = A.budget_loss(counts, layers, num_layers, n, target=8.0, initial=torch.full((2,), 16.0))
    plain = A.budget_loss(counts, layers, num_layers, n, target=8.0)
    assert torch.allclose(same.total, plain.total) and torch.allclose(same.average, plain.average)


def test_fixed_ratio_counts_are_per_sample_fractions():
    pr = A.ATPPruner(A.ATPConfig(num_layers=4, layers=(0, 1, 2), num_patches=16, fixed_ratio=0.5))
    slots = pr.units(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), [(4, 4)],
                     torch.tensor([0]), torch.ones(2, 4, dtype=torch.bool), initial=[16, 6])
    assert [pr._fixed_count(k, slots).tolist() for k in range(3)] == [[8, 3], [4, 2], [2, 1]]


def test_bad_grid_options_are_refused():
    with pytest.raises(ValueError, match="thresholds must be one of 'unit', 'sample'"):
        A.ATPConfig(num_patches=16, thresholds="image")
    with pytest.raises(ValueError, match="off_grid must be one of 'keep', 'score'"):
        A.ATPConfig(num_patches=16, off_grid="drop")
