"""FastV: pure tensor ranking, counts, builder validation, and end-to-end behaviour on a tiny LLaVA."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from vlmprune.integrations.decoder_builders import build_fastv
from vlmprune.methods import fastv as fv
from vlmprune.methods.common import pack_mask

from conftest import make_inputs, make_tiny_llava


def test_topk_visual_per_sample_counts_and_ties():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.5, 0.1], [0.1, 0.2, 0.3, 0.4, 0.5]])
    visual = torch.tensor([[False, True, True, True, True], [True, True, True, True, False]])
    keep = fv.topk_visual(scores, visual, torch.tensor([2, 3]))
    # text (col 0 of sample 0) is never "kept" as visual; ties go to the lower column
    assert keep.tolist() == [[False, True, True, False, False], [False, True, True, True, False]]
    assert fv.topk_visual(scores, visual, torch.tensor([10, 0])).sum(1).tolist() == [4, 0]


def test_pack_mask_and_row_scores():
    mask = torch.tensor([[False, True, False, True], [False, False, False, True]])
    idx, valid = pack_mask(mask)
    assert idx.tolist() == [[1, 3], [3, 0]] and valid.tolist() == [[True, True], [True, False]]
    wide, wide_valid = pack_mask(mask, width=3)  # a host-known width: the same columns, more padding
    assert wide.tolist() == [[1, 3, 0], [3, 0, 0]] and wide_valid.tolist() == [[True, True, False], [True, False, False]]
    assert [t.shape for t in pack_mask(torch.zeros(2, 4, dtype=torch.bool))] == [(2, 1), (2, 1)]
    attn = torch.arange(16.0).view(2, 2, 4)
    s = fv.row_scores(attn, valid)
    assert torch.equal(s[0], (attn[0, 0] + attn[0, 1]) / 2) and torch.equal(s[1], attn[1, 0])


def test_keep_counts():
    n = torch.tensor([576, 575, 1])
    assert fv.keep_count_ratio(n, 0.5).tolist() == [288, 288, 1]
    assert fv.keep_count_ratio(n, 0.75).tolist() == [144, 144, 1]
    # the ATP paper's FastV 192 / 128 / 64 all-layer averages with K = 2 of 32 layers
    n576 = torch.tensor([576])
    ks = [int(fv.keep_count_budget(n576, b, 2, 32)) for b in (192, 128, 64)]
    assert ks == [166, 98, 30]
    for b, k in zip((192, 128, 64), ks):
        assert abs((2 * 576 + 30 * k) / 32 - b) < 1


def test_builder_validation():
    assert build_fastv().k == 2 and build_fastv().drop_ratio == 0.5 and build_fastv().score == "last"
    with pytest.raises(ValueError, match="only one of"):
        build_fastv(count=10, budget=100)
    with pytest.raises(ValueError, match="drop_ratio"):
        build_fastv(drop_ratio=1.0)
    with pytest.raises(ValueError, match="k must be"):
        build_fastv(k=-1)
    with pytest.raises(ValueError, match="count"):
        build_fastv(count=0)
    with pytest.raises(ValueError, match="score"):
        build_fastv(score="first")
    with pytest.raises(ValueError, match="no option"):
        vlmprune.apply(make_tiny_llava(text_layers=2), "fastv", K=2)
    names = {m["name"]: m for m in vlmprune.list_methods()}
    assert names["fastv"]["stage"] == "decoder" and names["fastv"]["options"]["k"] == "2"


def test_k_must_be_inside_the_decoder():
    m = make_tiny_llava(text_layers=3)
    with pytest.raises(ValueError, match="smaller than"):
        vlmprune.apply(m, "fastv", k=3)
    assert not hasattr(m, "_vlmprune_handle")


@pytest.mark.parametrize("opts,kept", [({}, 8), ({"drop_ratio": 0.75}, 4), ({"count": 3}, 3), ({"budget": 10}, 4)])
def test_counts_end_to_end(opts, kept):
    m = make_tiny_llava(image_size=56, text_layers=4)  # 16 visual tokens
    inputs = make_inputs(m, prefix_lens=(2, 4), suffix_lens=(3, 5))
    with torch.no_grad(), vlmprune.pruned(m, "fastv", **opts) as h:
        m(**inputs)
    assert h.stats.visual_per_layer == [[16, 16, kept, kept]] * 2
    assert h.stats.avg_visual_tokens == pytest.approx((2 * 16 + 2 * kept) / 4)


def test_last_row_ranks_by_the_last_prompt_token():
    """The kept tokens are the top-k of layer K-1's last-row attention (checked against eager)."""
    eager = make_tiny_llava(image_size=56, text_layers=3, attn="eager", seed=2)
    m = make_tiny_llava(image_size=56, text_layers=3, seed=2)
    inputs = make_inputs(m, prefix_lens=(2,), suffix_lens=(4,), seed=3)
    with torch.no_grad():
        a = eager(**inputs, output_attentions=True).attentions[1][:, :, -1].mean(1)  # [1, L]
        with vlmprune.pruned(m, "fastv", k=2, count=5) as h:
            m(**inputs)
            src = h.state.final_source
    visual = inputs["input_ids"] == m.config.image_token_id
    expect = torch.where(visual, a, torch.tensor(-1.0)).topk(5).indices.sort().values
    got = src[(src >= 0) & visual.gather(1, src.clamp(min=0))]
    assert got.tolist() == expect[0].tolist()


def test_score_all_runs_and_differs_from_last():
    m = make_tiny_llava(image_size=56, text_layers=3, seed=4)
    inputs = make_inputs(m, prefix_lens=(2, 3), suffix_lens=(4, 2), seed=5)
    with torch.no_grad():
        with vlmprune.pruned(m, "fastv", k=1, count=6, score="all") as h:
            m(**inputs)
            all_src = h.state.final_source.clone()
        with vlmprune.pruned(m, "fastv", k=1, count=6) as h:
            m(**inputs)
            last_src = h.state.final_source.clone()
    assert all_src.shape == last_src.shape and not torch.equal(all_src, last_src)


def test_budget_below_what_k_allows_is_a_clear_error():
    """layers before k see all N tokens, so the all-layer average cannot go below (k N + L - k) / L."""
    import vlmprune
    from conftest import make_tiny_llava

    model = make_tiny_llava(text_layers=4)  # N = 16 visual tokens
    with pytest.raises(ValueError, match=r"fastv: budget=5 is below the lowest all-layer average reachable with "
                                         r"k=2 on this 4-layer decoder \(8\.5"):
        vlmprune.apply(model, "fastv", k=2, budget=5)
    vlmprune.apply(model, "fastv", k=1, budget=5).remove()  # (16 + 3) / 4 = 4.75 <= 5
