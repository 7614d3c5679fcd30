"""The per-sample visual layout (``integrations.layout``) and the adapter facts behind it."""

from __future__ import annotations

import pytest
import torch

from conftest import IMAGE_TOKEN_ID, make_inputs, make_tiny_llava
from vlmprune.integrations.base import get_adapter
from vlmprune.integrations.handle import PruneStats
from vlmprune.integrations.layout import VisualLayout, VisualUnit, placeholder_runs
from vlmprune.integrations.vision import signals_from_qk


def test_placeholder_runs_exact_small_case():
    # two samples; image 0 (2 tokens) and image 1 (3 tokens) in sample 0, image 2 (1 token) in sample 1
    visual = torch.tensor([[0, 1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    _, image, rank = placeholder_runs(visual, [2, 3, 1])
    assert image[visual].tolist() == [0, 0, 1, 1, 1, 2]
    assert rank[visual].tolist() == [0, 1, 0, 1, 2, 0]


def test_llava_image_layout_one_unit_per_image_and_sequence_part():
    model = make_tiny_llava(image_size=56)
    adapter = get_adapter(model)
    inputs = make_inputs(model, (2, 4), (3, 1))
    layout = adapter.image_layout(model, inputs["pixel_values"])
    assert layout.units == (VisualUnit(image=0, grid=(4, 4), has_cls=True),
                            VisualUnit(image=1, grid=(4, 4), has_cls=True))
    assert layout.tokens_per_image == (16, 16) and layout.num_images == 2
    seq = adapter.sequence_layout(model, inputs["input_ids"], layout)
    assert torch.equal(seq.visual, inputs["input_ids"] == IMAGE_TOKEN_ID)
    assert seq.image[seq.visual].tolist() == [0] * 16 + [1] * 16
    assert seq.rank[seq.visual].tolist() == list(range(16)) * 2
    assert seq.rotary is adapter.get_language_model(model).rotary_emb
    with pytest.raises(ValueError, match="image_sizes"):
        adapter.image_layout(model, inputs["pixel_values"], image_sizes=torch.tensor([[56, 56]] * 2))
    assert adapter.method_problem("prumerge") is None and adapter.fixed_image_tokens(model) == 16


def test_signals_from_qk_reads_cls_at_any_index():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    ref = signals_from_qk(q, k)
    moved = signals_from_qk(q, k[:, [1, 2, 0, 3, 4]], cls_index=2)  # [CLS] at index 2, patches in order
    assert torch.allclose(moved.cls_attn, ref.cls_attn) and torch.equal(moved.keys, ref.keys)


def test_kept_ratio_over_images_of_different_sizes():
    stats = PruneStats(method="x")
    stats.record([5, 10], [10, 40])
    assert stats.mean_kept_ratio == pytest.approx(15 / 50)
    stats.tokens_per_image = 10  # the recorded unpruned counts win over the nominal N
    assert stats.mean_kept_ratio == pytest.approx(15 / 50)
    nominal = PruneStats(method="x", tokens_per_image=10)
    nominal.record([5, 10])  # no unpruned counts: kept over N
    assert nominal.mean_kept_ratio == pytest.approx(7.5 / 10)
    assert VisualLayout().num_images == 0


def test_select_features_drops_cls_at_the_adapters_index():
    import dataclasses

    model = make_tiny_llava(image_size=56)
    adapter = get_adapter(model)
    h = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    assert torch.equal(adapter.select_features((h,), 0, "default"), h[:, 1:])
    moved = dataclasses.replace(adapter, cls_index=2)
    assert torch.equal(moved.select_features((h,), 0, "default"), h[:, [0, 1, 3, 4]])
    assert torch.equal(moved.select_features((h,), 0, "full"), h)


def test_with_grids_places_each_placeholder_and_check_placeholders():
    visual = torch.tensor([[0, 1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    layout = VisualLayout(tokens_per_image=(2, 3, 1)).with_sequence(visual)
    unit_of, patch_of = torch.tensor([0, 0, 1, 1, -1, 2]), torch.tensor([0, 1, 0, 1, -1, 0])
    lay = layout.with_grids((), unit_of, patch_of)
    assert lay.grid_unit[visual].tolist() == unit_of.tolist() and lay.grid_patch[visual].tolist() == patch_of.tolist()
    assert (lay.grid_unit[~visual] == -1).all() and (lay.grid_patch[~visual] == -1).all()
    layout.check_placeholders(6)
    with pytest.raises(ValueError, match="holds 5 image placeholders but its images give 6 tokens"):
        layout.check_placeholders(5)


def test_interleave_runs_hand_example_and_mismatches():
    from vlmprune.integrations.layout import interleave_runs

    # an image of 2, a video of 3, an image of 1 (placeholder kinds in (batch, sequence) order)
    assert interleave_runs([0, 0, 1, 1, 1, 0], ((2, 1), (3,))) == [(0, 0), (1, 0), (0, 1)]
    assert interleave_runs([1, 1, 0], ((1,), (2,))) == [(1, 0), (0, 0)]
    assert interleave_runs([], ((), ())) == []
    bad = [([0, 1, 1, 1], ((2,), (2,))),   # a run of mixed kinds
           ([0, 0, 0], ((2,), ())),        # a placeholder more than the inputs give
           ([0, 0], ((2, 1), ())),         # an image without placeholders
           ([1, 1], ((), (3,)))]           # a video cut short
    for kinds, counts in bad:
        with pytest.raises(ValueError, match="do not match its inputs") as err:
            interleave_runs(kinds, counts)
        assert "\n" not in str(err.value)
