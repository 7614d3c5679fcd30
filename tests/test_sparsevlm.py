"""SparseVLM: raters, schedule, density-peak recycling, layer scaling, builder and end-to-end runs."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from vlmprune.integrations.compat import output_cache
from vlmprune.integrations.decoder_builders import build_sparsevlm
from vlmprune.methods import sparsevlm as sv

from conftest import make_inputs, make_tiny_llava


def test_scale_layers():
    assert sv.scale_layers(sv.V15_LAYERS, 32) == [3, 7, 16]  # outputs of layers 2, 6, 15
    assert sv.scale_layers(sv.V15_LAYERS, 6) == [1, 2, 3]
    assert sv.scale_layers(sv.V15_LAYERS, 4) == [1, 2, 3]
    assert sv.scale_layers((2, 6, 15, 19), 40) == [4, 9, 20, 25]
    with pytest.raises(ValueError, match="do not fit"):
        sv.scale_layers(sv.V15_LAYERS, 3)


def test_select_raters():
    # visual tokens all point along e0; text token 4 is aligned with them, 5 and 6 are not
    e = torch.zeros(1, 7, 3)
    e[0, 1:4, 0] = 1.0
    e[0, 4] = torch.tensor([5.0, 0, 0])
    e[0, 5] = torch.tensor([0, 1.0, 0])
    e[0, 6] = torch.tensor([0, 0, 1.0])
    visual = torch.tensor([[False, True, True, True, False, False, False]])
    after = torch.tensor([[False, False, False, False, True, True, True]])
    r = sv.select_raters(e, visual, after, torch.tensor([6]))
    assert r.tolist() == [[False, False, False, False, True, False, False]]
    # equal relevance -> every text token after the image; none -> the last token
    r = sv.select_raters(torch.zeros(1, 7, 3), visual, after, torch.tensor([6]))
    assert r[0, 4:].all() and not r[0, :4].any()
    r = sv.select_raters(e, visual, torch.zeros_like(after), torch.tensor([6]))
    assert r.tolist() == [[False] * 6 + [True]]


def test_schedule_count():
    n0 = torch.tensor([576, 576, 36])
    assert sv.schedule_count(300, torch.tensor([576, 200, 36]), n0).tolist() == [300, 199, 19]
    assert sv.schedule_count(17, torch.tensor([1, 0, 36]), n0).tolist() == [1, 0, 1]


def test_density_peak_clusters_two_blobs_deterministic():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, generator=g) * 0.01
    b = torch.randn(4, 4, generator=g) * 0.01 + 3.0
    x = torch.cat([a, b, torch.zeros(2, 4)])[None]  # 2 padded rows
    valid = torch.tensor([[True] * 9 + [False] * 2])
    assign = sv.density_peak_clusters(x, valid, torch.tensor([2]))
    assert assign[0, 9:].tolist() == [-1, -1]
    assert len(set(assign[0, :5].tolist())) == 1 and len(set(assign[0, 5:9].tolist())) == 1
    assert assign[0, 0] != assign[0, 5]
    # exact ties (identical points) resolve the same way every time
    same = torch.ones(1, 6, 4)
    v = torch.ones(1, 6, dtype=torch.bool)
    first = sv.density_peak_clusters(same, v, torch.tensor([2]))
    for _ in range(3):
        assert torch.equal(sv.density_peak_clusters(same, v, torch.tensor([2])), first)
    assert sorted(set(first[0].tolist())) == [0, 1]


def test_recycle_counts_and_means():
    hidden = torch.arange(2 * 30 * 2, dtype=torch.float32).view(2, 30, 2)
    scores = torch.linspace(0, 1, 30)[None].expand(2, 30)
    pruned = torch.zeros(2, 30, dtype=torch.bool)
    pruned[0, :25] = True  # 25 pruned -> m = 8, c = 1
    pruned[1, :3] = True  # 3 pruned -> m = 1, c = 1
    pos = torch.arange(30)[None].expand(2, 30)
    tok, valid, mpos, sizes = sv.recycle(hidden, scores, pruned, pos)
    assert valid.tolist() == [[True], [True]] and sizes.tolist() == [[8], [1]]
    torch.testing.assert_close(tok[0, 0], hidden[0, 17:25].mean(0))  # the 8 best-scored pruned tokens
    torch.testing.assert_close(tok[1, 0], hidden[1, 2])
    assert mpos.tolist() == [[20], [2]]  # round(20.5) = 20 (half to even)
    pruned[0] = True  # 30 -> m = 10, c = 2
    tok, valid, mpos, sizes = sv.recycle(hidden, scores, pruned, pos)
    assert valid[0].tolist() == [True, True] and int(sizes[0].sum()) == 10


def test_builder_validation():
    assert build_sparsevlm().schedule == (300, 200, 110)
    assert build_sparsevlm(budget=64).schedule == (66, 30, 17)
    with pytest.raises(ValueError, match="budget"):
        build_sparsevlm(budget=100)
    with pytest.raises(ValueError, match="one count"):
        build_sparsevlm(schedule=(10, 5), layers=(1,))
    with pytest.raises(ValueError, match="layers=\\[...\\]"):
        build_sparsevlm(schedule=(10, 5))
    with pytest.raises(ValueError, match="positions"):
        build_sparsevlm(positions="gapped")
    with pytest.raises(ValueError, match="strictly increasing"):
        build_sparsevlm(schedule=(10, 5), layers=(2, 1))
    m = make_tiny_llava(text_layers=4)
    with pytest.raises(ValueError, match="must be <"):
        vlmprune.apply(m, "sparsevlm", schedule=(10, 5), layers=(1, 3))


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_end_to_end_counts_and_positions(positions):
    m = make_tiny_llava(image_size=84, text_layers=6, seed=1)  # 36 visual tokens, 6 layers
    inputs = make_inputs(m, prefix_lens=(2, 5), suffix_lens=(6, 3), seed=2)
    with torch.no_grad(), vlmprune.pruned(m, "sparsevlm", positions=positions) as h:
        out = m(**inputs, use_cache=True)
        st = h.state
    # schedule 300/200/110 of 576 scaled to 36: 19, 12, 7 (+ recycled clusters) after layers 0, 1, 2
    ks = [st.decisions[p]["k"][0] for p in (1, 2, 3)]
    assert ks == [19, 12, 7]
    clusters = [st.decisions[p]["clusters"][0] for p in (1, 2, 3)]
    vis = h.stats.visual_per_layer[0]
    assert vis[0] == 36 and vis[1:4] == [k + c for k, c in zip(ks, clusters)] and vis[4] == vis[5] == vis[3]
    assert h.stats.avg_visual_tokens == pytest.approx(sum(vis) / 6)
    assert h.stats.avg_visual_tokens_output == pytest.approx(sum(vis[1:] + vis[-1:]) / 6)
    last = st.segments[-1]
    pos = last.positions[0][last.valid[0]]
    if positions == "compact":
        assert torch.equal(pos, torch.arange(pos[0], pos[0] + len(pos)))
        assert int(last.shift[0]) > 0
    else:
        own = pos[~last.recycled[0][last.valid[0]]]  # recycled tokens take their members' mean position
        assert (own[1:] > own[:-1]).all() and int(pos[-1]) == int(inputs["attention_mask"][0].sum()) - 1
        assert int(last.shift[0]) == 0
    n = inputs["input_ids"].shape[1]
    lengths = [output_cache(out).get_seq_length(i) for i in range(6)]
    assert lengths[0] == n and lengths[1] < n and lengths[3] == lengths[5] < lengths[2]


def test_batch_equals_single_samples():
    m = make_tiny_llava(image_size=84, text_layers=4, seed=6)
    inputs = make_inputs(m, prefix_lens=(1, 5), suffix_lens=(6, 3), seed=3)
    with torch.no_grad(), vlmprune.pruned(m, "sparsevlm", budget=128):
        out = m.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
        lb = torch.stack(out.logits, 1)
        for b in range(2):
            v = inputs["attention_mask"][b].bool()
            one = {"input_ids": inputs["input_ids"][b:b + 1, v], "attention_mask": inputs["attention_mask"][b:b + 1, v],
                   "pixel_values": inputs["pixel_values"][b:b + 1]}
            o = m.generate(**one, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
            torch.testing.assert_close(lb[b], torch.stack(o.logits, 1)[0], atol=2e-5, rtol=0)


def test_sparsevlm_cannot_keep_every_token_and_rejects_counts_beyond_576():
    """README: keep-all is exact for the other methods, not for SparseVLM (each layer keeps at most
    its current count - 1, the rest recycled), and schedule counts above 576 are an error."""
    model = make_tiny_llava()
    inputs = make_inputs(model, (2, 4), (3, 1))
    with torch.no_grad():
        ref = model(**inputs).logits
        with vlmprune.pruned(model, "sparsevlm", schedule=[576, 576, 576], layers=[0, 1, 2]):
            out = model(**inputs).logits
    assert not torch.equal(out, ref)
    with pytest.raises(ValueError, match="1000 is more than 576"):
        build_sparsevlm(schedule=[1000, 500, 10])


def test_host_counts_follow_the_device():
    """The prune points read nothing: what they take on the host (each layout's visual / valid counts, k, the
    clusters, whether compacted positions end before the original last one) is what the device holds."""
    m = make_tiny_llava(image_size=84, text_layers=6, seed=1)  # 36 visual tokens
    for seed, (prefix, suffix) in enumerate([((2, 5, 1), (6, 3, 9)), ((4,), (2,)), ((1, 3, 6, 2), (8, 1, 4, 5))]):
        inputs = make_inputs(m, prefix_lens=prefix, suffix_lens=suffix, seed=seed)
        for options in ({"budget": 192}, {"budget": 64}, {"schedule": (30, 20, 10, 5), "layers": (0, 1, 2, 3)},
                        {"budget": 128, "recycle": False}, {"budget": 64, "positions": "original"}):
            with torch.no_grad(), vlmprune.pruned(m, "sparsevlm", **options) as h:
                m(**inputs)
                st = h.state
            assert st.context["rater_counts"] is not None  # the read-free path was taken
            for seg in st.segments:
                assert seg.counts == (seg.visual.sum(1).tolist(), seg.valid.sum(1).tolist())
                if not seg.identity:
                    assert seg.shifted == bool((seg.shift != 0).any())
            n0 = st.segments[0].visual.sum(1)
            for target, p in zip(h.method_obj.schedule, st.decisions):
                before = st.segments[st.layer_segment[p - 1]]  # the layout the point pruned
                k = sv.schedule_count(target, before.visual.sum(1), n0)
                assert st.decisions[p]["k"] == k.tolist()
            first = st.decisions[min(st.decisions)]
            assert first["raters"] == st.context["raters"].sum(1).tolist()
            if "clusters" in first:
                assert first["clusters"] == st.segments[1].recycled.sum(1).tolist()


def test_host_counts_equal_the_tensor_arithmetic():
    """``host_counts`` (k, recycle's m and c on the host) against ``schedule_count`` and ``recycle``'s own
    counts, over every count up to 600 and targets with exact half-way ties (576 * t / 576 ... .5)."""
    n = torch.arange(0, 601)
    for target in (1, 17, 36, 110, 192, 288, 300, 575, 576):
        for n0 in (n, torch.full_like(n, 576), torch.full_like(n, 36), n + 3):
            ks, ms, cs = sv.host_counts(target, n.tolist(), n0.tolist())
            k = sv.schedule_count(target, n, n0)
            assert ks == k.tolist()
            pruned = n - torch.minimum(k, n)
            m = torch.where(pruned > 0, torch.minimum(torch.floor(pruned.double() * 0.3).long() + 1, pruned), 0)
            c = torch.where(m > 0, torch.minimum(m // 10 + 1, m), 0)
            assert ms == m.tolist() and cs == c.tolist()
    # the counts recycle itself takes: m best pruned tokens, c clusters
    hidden = torch.randn(3, 40, 4, generator=torch.Generator().manual_seed(0))
    pruned = torch.arange(40)[None, :] < torch.tensor([[37], [3], [0]])
    _, ms, cs = sv.host_counts(1, [38, 4, 1], [576, 576, 576])
    tok, valid, _, sizes = sv.recycle(hidden, torch.rand(3, 40), pruned, torch.arange(40)[None].expand(3, 40),
                                      widths=(max(ms), max(cs)))
    assert sizes.sum(1).tolist() == ms and valid.sum(1).tolist() == cs
    ref = sv.recycle(hidden, torch.rand(3, 40), pruned, torch.arange(40)[None].expand(3, 40))
    assert ref[0].shape == tok.shape
