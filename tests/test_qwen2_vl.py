"""Qwen2-VL and Qwen2.5-VL on tiny random models (every test runs on both): both stages with M-RoPE.

keep-all == stock logits and tokens; FastV at layer 0 == the stock model fed the survivors with
their own 3-D positions; survivors' positions == ``get_rope_index``'s; decoding continues after
the unpruned maximum position; a ragged batch (different image sizes, so different token
counts) == single samples; cached generate == uncached; remove() restores exactly; sdpa stays on;
every method is listed as supported (ATP's own tests: ``test_atp_families.py``). Video inputs (``pixel_values_videos``,
``video_grid_thw`` with t > 1), alone and mixed with images, get the same guarantees, with
per-temporal-slice budgets.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import vlmprune
from conftest import (assert_beam_batch_equals_singles, assert_fastv_k0_equals_lm_on_survivors, assert_remove_restores_and_sdpa_stays, EOS_ID, IMAGE_TOKEN_ID, QWEN_VIDEO_ID, QWEN_VISION_START, assert_mixed_batch_equals_singles,
                      assert_ragged_batch_equals_singles, make_qwen_inputs, make_qwen_mixed_inputs, make_tiny_qwen2_vl,
                      module_hooks, qwen_mixed_row, qwen_row, warm_up)
from vlmprune.integrations.base import get_adapter
from vlmprune.integrations.handle import HANDLE_ATTR

# patch grids (h, w) per sample: 4, 6, 8 and 9 merged tokens (the processor's smallest image has 4)
GRIDS = [(4, 4), (4, 6), (8, 4), (6, 6)]
PREFIX, SUFFIX = (3, 1, 2, 4), (2, 5, 1, 3)
# a random model may emit the placeholder ids (an uncached step would then see an image token too
# many) or EOS (a single sample would stop before its batch row)
GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID, QWEN_VIDEO_ID, QWEN_VISION_START, EOS_ID])
ATOL = 2e-5
DECODER = [("fastv", {"k": 1, "count": 2}), ("fastv", {"k": 2, "drop_ratio": 0.5}), ("sparsevlm", {})]


FAMILIES = {"qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    m = make_tiny_qwen2_vl(family=request.param)
    m._test_family = request.param
    return warm_up(m, _inputs(n=1))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _inputs(n=4, seed=1):
    return make_qwen_inputs(GRIDS[:n], PREFIX[:n], SUFFIX[:n], seed=seed)


def _is_stock(model) -> bool:
    return getattr(model, HANDLE_ATTR, None) is None and module_hooks(model) == model._test_stock_hooks


def _rope_index(model, inputs):
    pos, deltas = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    return pos, deltas  # [3, B, L], [B, 1]


def test_adapter_and_layout(model):
    adapter = get_adapter(model)
    assert adapter.family == FAMILIES[model._test_family]
    assert adapter.fixed_image_tokens(model) is None
    inputs = _inputs()
    visual = adapter.visual_columns(model, inputs["input_ids"])
    assert visual.sum(1).tolist() == [h * w // 4 for h, w in GRIDS]
    pos, _ = _rope_index(model, inputs)
    layout = adapter.lm_layout(model, visual, torch.cat([pos[:1], pos]))  # generate's [4, B, L] form
    assert torch.equal(layout.positions, pos) and layout.rotary is model.model.language_model.rotary_emb
    assert torch.equal(adapter.lm_layout(model, visual).positions,
                       torch.arange(visual.shape[1]).expand(3, 4, -1))
    # one unit per image on the merged grid; merged token j sits at (j // w', j % w') of it, which
    # is where get_rope_index puts the j-th placeholder of the image
    units = adapter.image_layout(model, inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    assert [u.grid for u in units.units] == [(h // 2, w // 2) for h, w in GRIDS]
    assert list(units.tokens_per_image) == [h * w // 4 for h, w in GRIDS] and not any(u.has_cls for u in units.units)
    for b, u in enumerate(units.units):
        cols = torch.nonzero(inputs["input_ids"][b] == IMAGE_TOKEN_ID).flatten()
        p = pos[:, b, cols] - pos[:, b, cols[:1]]
        j = torch.arange(u.num_patches)
        assert torch.equal(p, torch.stack([torch.zeros_like(j), j // u.grid[1], j % u.grid[1]]))


def test_keep_all_gives_identical_logits_and_tokens(model):
    inputs = _inputs()
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, **GEN)
    with vlmprune.pruned(model, "fastv", k=1, drop_ratio=0.0) as handle:
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, **GEN), ref_gen)
        assert handle.stats.visual_per_layer[0] == [4] * 4  # 4 decoder layers, 4 visual tokens
    assert _is_stock(model)


def test_fastv_k0_equals_stock_model_on_prepruned_sequence(model):
    """FastV at layer 0 == the untouched model fed only the survivors, each with its own 3-D
    position from get_rope_index (gaps included)."""
    inputs = _inputs()
    pos, _ = _rope_index(model, inputs)
    assert_fastv_k0_equals_lm_on_survivors(model, inputs, 2, lambda idx: pos.gather(2, idx[None].expand(3, -1, -1)),
                                           atol=ATOL)


@pytest.mark.parametrize("method,options", DECODER)
def test_survivors_keep_their_get_rope_index_positions(model, method, options):
    """Every pruned layout's positions are the survivors' own [3, B, L] positions from the
    model's get_rope_index, its rotary tables are the rotary of those positions, and decoding
    continues after each sample's unpruned maximum position."""
    inputs = _inputs()
    full, deltas = _rope_index(model, inputs)
    seen = []
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True)
    try:
        with vlmprune.pruned(model, method, **options) as h:
            model.generate(**inputs, **GEN)
            pruned = [seg for seg in h.state.segments if not seg.identity]
            assert pruned and h.positions == "original"
            for seg in pruned:
                ok = seg.valid & ~seg.recycled
                expect = full.gather(2, seg.source.clamp(min=0)[None].expand(3, -1, -1))
                assert seg.positions.shape[0] == 3
                assert torch.equal(seg.positions[:, ok], expect[:, ok])
                cos, sin = lm.rotary_emb(torch.zeros(1, 1, 1), position_ids=seg.positions)
                assert torch.equal(seg.pos_emb[0].expand_as(cos), cos) and torch.equal(seg.pos_emb[1].expand_as(sin), sin)
    finally:
        hook.remove()
    top = full.amax((0, 2))  # [B] unpruned maximum position of each sample
    unpadded = inputs["attention_mask"].sum(1)
    assert torch.equal(top + 1, unpadded + deltas[:, 0])
    for step, pos in enumerate(seen[1:]):  # decode steps: [4, B, 1] from generate
        assert torch.equal(pos[1:, :, -1], (top + 1 + step).expand(3, -1))


@pytest.mark.parametrize("method,options", [("fastv", {"k": 0, "count": 3}), ("sparsevlm", {})])
def test_manual_decoding_continues_after_the_unpruned_positions(model, method, options):
    """A forward loop without position_ids after a decoder-stage prefill (layer 0 pruned too:
    its cache is shorter than the prompt) gives generate()'s logits."""
    _manual_decoding_matches_generate(model, method, options)


def _manual_decoding_matches_generate(model, method, options):
    single = qwen_row(_inputs(), 3)
    del single["attention_mask"]  # with a mask the stock forward derives positions for the whole mask
    with vlmprune.pruned(model, method, **options):
        gen = model.generate(**single, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, suppress_tokens=GEN["suppress_tokens"])
        out = model(**single, use_cache=True)
        cache = out.cache
        assert cache.get_seq_length(len(model.model.language_model.layers) - 1) < single["input_ids"].shape[1]
        torch.testing.assert_close(out.logits[:, -1], gen.logits[0], atol=ATOL, rtol=0)
        width = single["input_ids"].shape[1]
        for step in range(1, 3):
            token = gen.sequences[:, width + step - 1:width + step]
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache = out.cache
            torch.testing.assert_close(out.logits[:, -1], gen.logits[step], atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,options", DECODER)
def test_ragged_batch_equals_single_samples(model, method, options):
    assert_ragged_batch_equals_singles(model, _inputs(), qwen_row, method, options, GEN, atol=ATOL)


@pytest.mark.parametrize("method,options", DECODER)
def test_cached_generate_equals_uncached(model, method, options):
    inputs = _inputs(n=3, seed=2)
    with vlmprune.pruned(model, method, **options) as h:
        cached = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        before = h.stats.prefills
        uncached = model.generate(**inputs, **GEN, use_cache=False, return_dict_in_generate=True, output_logits=True)
        assert h.stats.prefills - before == GEN["max_new_tokens"]  # re-pruned at every step
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["fastv", "sparsevlm"])
def test_remove_restores_exactly_and_sdpa_stays(model, method, monkeypatch, options=None):
    assert_remove_restores_and_sdpa_stays(model, _inputs(), method, options, monkeypatch, _is_stock, GEN)



# ------------------------------------------------------------------------------------------ vision stage

VISION = [("random", {"keep": 0.5, "seed": 2}), ("sequential", {"keep": 0.5}), ("spatial", {"keep": 0.5})]
# (the adaptive IQR budgets keep the same few tokens of every tiny image: fixed budgets make the batch ragged)
SCORED = [("cls-topk", {"keep": 0.5}), ("prumerge", {"keep": 0.5}), ("prumerge+", {"keep": 0.25})]


def _lm_inputs(model, inputs, **kw):
    """What the language model received in a forward of ``inputs``: inputs_embeds, position_ids."""
    seen = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        out = model(**inputs, **kw)
    finally:
        hook.remove()
    return out, seen


KEEP_ALL = [("sequential", {"keep": 1.0}), ("random", {"keep": 1.0}), ("spatial", {"keep": 1.0}),
            ("cls-topk", {"keep": 1.0, "order": "spatial"}),
            ("prumerge", {"keep": 1.0, "k_neighbors": 0, "order": "spatial"}),
            ("prumerge+", {"keep": 1.0, "k_neighbors": 0, "order": "spatial"})]


@pytest.mark.parametrize("method,options", KEEP_ALL)
def test_vision_keep_all_gives_identical_logits_and_tokens(model, method, options):
    inputs = _inputs()
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, **GEN)
    with vlmprune.pruned(model, method, **options) as handle:
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, **GEN), ref_gen)
        assert handle.stats.last_kept == [h * w // 4 for h, w in GRIDS] and handle.stats.mean_kept_ratio == 1.0
    assert _is_stock(model)


@pytest.mark.parametrize("method,options", VISION + SCORED[:1])
def test_vision_survivors_keep_their_positions(model, method, options):
    """One decision per merged token: the LLM gets exactly the stock merged tokens of the kept
    grid cells, each at its own placeholder with its own get_rope_index position, so the pruned
    forward == the stock language model fed those columns with their original 3-D positions."""
    inputs = _inputs()
    _, stock = _lm_inputs(model, inputs)
    full, _ = _rope_index(model, inputs)
    with vlmprune.pruned(model, method, **options) as handle:
        out, seen = _lm_inputs(model, inputs)
        plan, red = handle.plan, handle.last_reduction
    src = plan.src
    valid = src >= 0
    idx = src.clamp(min=0)
    assert torch.equal(seen["position_ids"], full.gather(2, idx[None].expand(3, -1, -1)).masked_fill(~valid, 0))
    x = stock["inputs_embeds"].gather(1, idx[:, :, None].expand(-1, -1, stock["inputs_embeds"].shape[-1]))
    torch.testing.assert_close(seen["inputs_embeds"][valid], x[valid], atol=0, rtol=0)
    ids = inputs["input_ids"]
    for b, (h, w) in enumerate(GRIDS):  # the kept placeholders are the kept cells of the merged grid
        run = torch.nonzero(ids[b] == IMAGE_TOKEN_ID).flatten()
        kept = torch.isin(run, src[b])
        assert torch.equal(torch.nonzero(kept).flatten(), red.indices[b, :red.counts[b]].sort().values)
    ref = model(inputs_embeds=x, attention_mask=plan.new_mask, position_ids=seen["position_ids"]).logits
    torch.testing.assert_close(out.logits[valid], ref[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,options", VISION + SCORED)
def test_vision_ragged_batch_equals_single_samples(model, method, options):
    test_ragged_batch_equals_single_samples(model, method, options)


@pytest.mark.parametrize("method,options", VISION + SCORED)
def test_vision_cached_generate_equals_uncached(model, method, options):
    inputs = _inputs(n=3, seed=2)
    with vlmprune.pruned(model, method, **options):
        cached = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        uncached = model.generate(**inputs, **GEN, use_cache=False, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=ATOL, rtol=0)


def test_vision_manual_decoding_continues_after_the_unpruned_positions(model):
    """A forward loop without position_ids (the model derives them from its cache length and
    rope_deltas, which the rewrite raised by the deleted count) gives generate()'s logits:
    decoding continues after the unpruned maximum position."""
    _manual_decoding_matches_generate(model, "spatial", {"keep": 0.5})


@pytest.mark.parametrize("method,options", [("spatial", {}), ("prumerge+", {"keep": 0.25})])
def test_vision_remove_restores_exactly_and_sdpa_stays(model, method, options, monkeypatch):
    test_remove_restores_exactly_and_sdpa_stays(model, method, monkeypatch, options)


def test_substitute_score_is_the_blocks_attention(model):
    """The substitute [CLS] score is the attention each merged token receives in the last vision
    block: recomputed here in float64 from the block's input, with probabilities whose output
    (probs @ v, then attn.proj) is the block's own attention output, i.e. the very attention the
    block computed; keys are the block's keys averaged over each 2x2 group."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    adapter = get_adapter(model)
    inputs = _inputs()
    layout = adapter.image_layout(model, inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    attn = model.model.visual.blocks[adapter.score_block(model)].attn
    seen = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, k: seen.update(x=a[0], **k), with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, k, out: seen.update(out=out), with_kwargs=True)
    try:
        _, signals = adapter.encode_with_signals(model, inputs["pixel_values"], -1, "full", layout)
    finally:
        h1.remove()
        h2.remove()
    x, heads = seen["x"].double(), attn.num_heads
    q, k, v = (torch.nn.functional.linear(x, attn.qkv.weight.double(), attn.qkv.bias.double())
               .reshape(x.shape[0], 3, heads, -1).permute(1, 0, 2, 3).unbind(0))
    cos, sin = (t.double() for t in seen["position_embeddings"])
    qr, kr = apply_rotary_pos_emb_vision(q, k, cos, sin)
    order = adapter.tower_order(model, inputs["image_grid_thw"])  # tower row g holds merge group order[g]
    back = torch.arange(sum(layout.tokens_per_image)) if order is None else torch.argsort(order)
    outs, received, start = [], [], 0
    for n in layout.tokens_per_image:  # images stay contiguous in the tower (full-attention segments)
        p = 4 * n
        qq, kk, vv = (t[start:start + p].transpose(0, 1) for t in (qr.double(), kr.double(), v))
        probs = torch.softmax(qq @ kk.transpose(1, 2) * attn.scaling, dim=-1)  # [H, P, P]
        outs.append((probs @ vv).transpose(0, 1).reshape(p, -1))
        received.append(probs.mean((0, 1)).view(n, 4).sum(-1))  # per merge group, tower order
        start += p
    received = torch.cat(received)[back]
    keys = k.reshape(-1, 4, k.shape[1] * k.shape[2]).mean(1)[back]
    start = 0
    for b, n in enumerate(layout.tokens_per_image):
        torch.testing.assert_close(signals.cls_attn[b, :n].double(), received[start:start + n], atol=1e-6, rtol=0)
        assert float(signals.cls_attn[b, :n].sum()) == pytest.approx(1.0, abs=1e-5)
        assert not signals.cls_attn[b, n:].any()
        torch.testing.assert_close(signals.keys[b, :n].double(), keys[start:start + n], atol=1e-6, rtol=0)
        start += n
    mine = torch.nn.functional.linear(torch.cat(outs), attn.proj.weight.double(), attn.proj.bias.double())
    torch.testing.assert_close(mine, seen["out"].double(), atol=1e-5, rtol=0)


def test_tower_order_is_the_mergers_order(model):
    """tower_order is the order the tower itself undoes after its merger (Qwen2.5-VL's window
    order, a real permutation on these images; Qwen2-VL: none)."""
    adapter = get_adapter(model)
    inputs = _inputs()
    visual = model.model.visual
    out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], return_dict=True)
    order = adapter.tower_order(model, inputs["image_grid_thw"])
    merged = visual.merger(out.last_hidden_state)  # tower order
    if order is None:
        assert adapter.family == "qwen2-vl"
        assert torch.equal(merged, out.pooler_output)
    else:
        assert adapter.family == "qwen2.5-vl" and adapter.score_block(model) == 1 < len(visual.blocks) - 1
        assert not torch.equal(order, torch.arange(len(order)))
        assert torch.equal(merged[torch.argsort(order)], out.pooler_output)


def test_scored_methods_select_by_the_substitute_score(model):
    """cls-topk keeps each image's merged tokens with the highest substitute score."""
    adapter = get_adapter(model)
    inputs = _inputs()
    layout = adapter.image_layout(model, inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    _, signals = adapter.encode_with_signals(model, inputs["pixel_values"], -1, "full", layout)
    with vlmprune.pruned(model, "cls-topk", keep=0.5) as handle:
        model(**inputs)
        red = handle.last_reduction
    for b, n in enumerate(layout.tokens_per_image):
        top = signals.cls_attn[b, :n].topk(n // 2).indices.sort().values
        assert torch.equal(red.indices[b, :red.counts[b]].sort().values, top)


@pytest.mark.parametrize("method,options", [("spatial", {"keep": 0.5}), ("prumerge+", {"keep": 0.25}),
                                            ("fastv", {"k": 1, "count": 2})])
def test_beam_search_batch_equals_single(model, method, options):
    """Beams: generate() expands the encoded images into new tensors, whose kept slots the
    vision stage reads back from their NaN rows (image_token_slots)."""
    inputs = _inputs(n=3)
    beams = dict(max_new_tokens=3, num_beams=2, do_sample=False, suppress_tokens=GEN["suppress_tokens"])
    assert_beam_batch_equals_singles(model, inputs, qwen_row, method, options, beams)


def test_int_budgets(model):
    """An int keep is validated on the 16x16 reference grid at apply(); an image with fewer merged
    tokens than an int keep fails at its forward with a clear message (ratios always fit)."""
    with pytest.raises(ValueError, match="keep=300 is more than the 256 visual tokens"):
        vlmprune.apply(model, "sequential", keep=300)
    assert _is_stock(model)
    inputs = _inputs()
    with vlmprune.pruned(model, "sequential", keep=4) as handle:
        model(**inputs)
        assert handle.stats.last_kept == [4, 4, 4, 4]
    with vlmprune.pruned(model, "sequential", keep=5):
        with pytest.raises(ValueError, match=r"n = 5 is more than the N = 4 patches"):
            model(**inputs)


def test_image_token_slots_exact():
    from vlmprune.integrations.vision import image_token_slots

    nan = float("nan")
    prefix = torch.tensor([[1.0, 2.0], [3.0, 4.0], [nan, nan]])
    gaps = torch.tensor([[nan, nan], [1.0, 2.0], [nan, nan]])
    full = torch.ones(2, 2)
    counts, slots = image_token_slots([prefix, gaps, full, torch.empty(0, 2)])
    assert counts == [2, 1, 2, 0]
    assert slots[0] is None and torch.equal(slots[1], torch.tensor([1])) and slots[2] is None and slots[3] is None


# ------------------------------------------------------------------------------------------ support


def test_support_listed():
    listed = {m["name"]: m["families"] for m in vlmprune.list_methods()}
    scores = {m["name"]: m.get("scores") for m in vlmprune.list_methods()}
    for family in FAMILIES.values():
        assert listed["fastv"][family] == "yes" and listed["sparsevlm"][family] == "yes"
        assert listed["atp"][family] == "yes"
        for name in ("random", "sequential", "spatial", "cls-topk", "prumerge", "prumerge+"):
            assert listed[name][family] == "yes"
        for name in ("cls-topk", "prumerge", "prumerge+"):
            assert scores[name]["llava"].startswith("[CLS] attention")
            assert scores[name][family].startswith("attention received in the last full-attention vision block")
    assert scores["random"] is None and scores["fastv"] is None


# ------------------------------------------------------------------------------------------ video inputs

# (t, h, w) patches per sample: videos of 2 and 3 temporal slices (t > 1) and images (t = 1)
ITEMS = [(2, 4, 4), (1, 4, 6), (3, 4, 6), (1, 8, 4)]
VIDEOS = [(2, 4, 4), (3, 4, 6), (2, 6, 4)]  # a video-only batch: different frame counts and sizes
VISUAL_IDS = [IMAGE_TOKEN_ID, QWEN_VIDEO_ID]


def _mixed(items=ITEMS, seed=1):
    n = len(items)
    return make_qwen_mixed_inputs(items, PREFIX[:n], SUFFIX[:n], seed=seed)


def _mixed_rope_index(model, inputs, **extra):
    return model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                      image_grid_thw=inputs.get("image_grid_thw"),
                                      video_grid_thw=inputs.get("video_grid_thw"),
                                      attention_mask=inputs["attention_mask"], **extra)


def _video_view(model):
    views = get_adapter(model).modality_views(model)
    assert [v.image_modality for v in views] == ["image", "video"]
    return views[1]


def test_video_layout_is_one_unit_per_temporal_slice(model):
    """A video of t temporal slices is t units on the merged (h/2, w/2) grid; slice s's merged
    token j is placeholder s * h*w/4 + j of the video, where get_rope_index puts (s, j // w', j % w')."""
    inputs = _mixed(VIDEOS)
    view = _video_view(model)
    layout = view.image_layout(model, inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
    assert [(u.image, u.frame, u.grid) for u in layout.units] == \
        [(i, f, (h // 2, w // 2)) for i, (t, h, w) in enumerate(VIDEOS) for f in range(t)]
    assert list(layout.tokens_per_image) == [t * h * w // 4 for t, h, w in VIDEOS]
    pos, _ = _mixed_rope_index(model, inputs)
    # temporal step per slice: 1 (Qwen2-VL); tokens_per_second x 1 s (Qwen2.5-VL without second_per_grid_ts)
    step = int(getattr(model.config.vision_config, "tokens_per_second", 1)) if model._test_family == "qwen2_5_vl" else 1
    for b, (t, h, w) in enumerate(VIDEOS):
        cols = torch.nonzero(inputs["input_ids"][b] == QWEN_VIDEO_ID).flatten()
        p = pos[:, b, cols] - pos[:, b, cols[:1]]
        j = torch.arange(h * w // 4)
        grid = torch.stack([torch.zeros_like(j), j // (w // 2), j % (w // 2)])
        assert torch.equal(p, torch.cat([grid + torch.tensor([[s * step], [0], [0]]) for s in range(t)], dim=1))
    with pytest.raises(ValueError, match="Qwen2-VL needs video_grid_thw with its videos"):
        view.image_layout(model, inputs["pixel_values_videos"])


@pytest.mark.parametrize("method,options", KEEP_ALL)
def test_video_keep_all_gives_identical_logits_and_tokens(model, method, options):
    inputs = _mixed()
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, **GEN)
    with vlmprune.pruned(model, method, **options) as handle:
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, **GEN), ref_gen)
        assert handle.last_reductions["video"].counts.tolist() == [4] * 2 + [6] * 3
    assert _is_stock(model)


@pytest.mark.parametrize("method,options", VISION + SCORED[:1])
def test_video_survivors_keep_their_positions(model, method, options):
    """Per temporal slice, one decision per merged token: the LLM gets the stock merged tokens of
    the kept cells of each slice at their own placeholders, with their own get_rope_index 3-D
    positions, so the pruned forward == the stock language model fed those columns."""
    inputs = _mixed()
    _, stock = _lm_inputs(model, inputs)
    full, _ = _mixed_rope_index(model, inputs)
    with vlmprune.pruned(model, method, **options) as handle:
        out, seen = _lm_inputs(model, inputs)
        plan, red = handle.plan, handle.last_reductions["video"]
    valid, idx = plan.src >= 0, plan.src.clamp(min=0)
    assert torch.equal(seen["position_ids"], full.gather(2, idx[None].expand(3, -1, -1)).masked_fill(~valid, 0))
    x = stock["inputs_embeds"].gather(1, idx[:, :, None].expand(-1, -1, stock["inputs_embeds"].shape[-1]))
    torch.testing.assert_close(seen["inputs_embeds"][valid], x[valid], atol=0, rtol=0)
    u = 0
    for b, (t, h, w) in enumerate(ITEMS):
        if t == 1:
            continue
        run = torch.nonzero(inputs["input_ids"][b] == QWEN_VIDEO_ID).flatten()
        n = h * w // 4
        expect = torch.cat([s * n + red.indices[u + s, :red.counts[u + s]].sort().values for s in range(t)])
        assert torch.equal(torch.nonzero(torch.isin(run, plan.src[b])).flatten(), expect)
        u += t
    ref = model(inputs_embeds=x, attention_mask=plan.new_mask, position_ids=seen["position_ids"]).logits
    torch.testing.assert_close(out.logits[valid], ref[valid], atol=ATOL, rtol=0)


def test_video_budget_is_per_temporal_slice(model):
    """Hand-checked: keep=2 keeps the first 2 merged tokens of every slice: the (2, 4, 4) video
    (4 tokens per slice) keeps placeholders 0, 1, 4, 5; the (3, 4, 6) video (6 per slice) 0, 1, 6,
    7, 12, 13; a ratio is per slice too."""
    inputs = _mixed(VIDEOS[:2])
    with vlmprune.pruned(model, "sequential", keep=2) as handle:
        model(**inputs)
        plan = handle.plan
        assert handle.stats.last_kept == [4, 6]
    for b, expect in enumerate([[0, 1, 4, 5], [0, 1, 6, 7, 12, 13]]):
        run = torch.nonzero(inputs["input_ids"][b] == QWEN_VIDEO_ID).flatten()
        assert torch.nonzero(plan.keep[b, run]).flatten().tolist() == expect
    with vlmprune.pruned(model, "spatial", keep=0.5) as handle:
        model(**inputs)
        assert handle.last_reductions["video"].counts.tolist() == [2, 2, 3, 3, 3]


def test_a_prompt_of_images_and_videos_is_one_prefill_in_the_stats(model):
    """Images and videos encoded for one prompt are one record: ``prefills`` counts the forward once,
    ``last_kept`` holds every image's then every video's kept tokens (the images' first), and a
    second forward starts a new record."""
    inputs = _mixed()
    with vlmprune.pruned(model, "sequential", keep=2) as handle:
        model(**inputs)
        assert handle.stats.prefills == 1
        # images (1, 4, 6), (1, 8, 4): 2 tokens each; videos (2, 4, 4), (3, 4, 6): 2 per slice
        assert handle.stats.last_kept == [2, 2, 4, 6]
        assert sum(handle.stats.last_kept) == sum(handle.stats.visual_tokens_per_sample())
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle.stats.prefills == 2 and handle.stats.last_kept == [2, 2, 4, 6]
        assert handle.stats.kept_per_image == [2, 2, 4, 6] * 2
        # a prompt whose video fails after its image was recorded: the next prompt is a record of its own
        bad = make_qwen_mixed_inputs([(1, 4, 6), (2, 2, 2)], (2, 3), (3, 2))  # keep=2 > the video's 1 token a slice
        with pytest.raises(ValueError):
            model(**bad)
        prefills = handle.stats.prefills
        model(**make_qwen_mixed_inputs([(2, 4, 4)], (2,), (2,)))
        assert handle.stats.prefills == prefills + 1 and handle.stats.last_kept == [4]


@pytest.mark.parametrize("method,options", VISION[1:] + SCORED + DECODER)  # (random draws depend on the batch)
def test_video_mixed_batch_equals_single_samples(model, method, options):
    assert_mixed_batch_equals_singles(model, _mixed(), lambda inp, b: qwen_mixed_row(inp, b, ITEMS), method, options,
                                      GEN, VISUAL_IDS, atol=ATOL)


@pytest.mark.parametrize("method,options", [("prumerge+", {"keep": 0.25}), ("fastv", {"k": 1, "count": 3})])
def test_videos_of_different_frame_counts_equal_single_samples(model, method, options):
    assert_mixed_batch_equals_singles(model, _mixed(VIDEOS), lambda inp, b: qwen_mixed_row(inp, b, VIDEOS), method,
                                      options, GEN, VISUAL_IDS, atol=ATOL)


@pytest.mark.parametrize("method,options", VISION + SCORED + DECODER)
def test_video_cached_generate_equals_uncached(model, method, options):
    inputs = _mixed(ITEMS[:3], seed=2)
    with vlmprune.pruned(model, method, **options):
        cached = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        uncached = model.generate(**inputs, **GEN, use_cache=False, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=ATOL, rtol=0)


def _decode_positions(model, inputs, method=None, options=None, manual=False):
    """The language model's position_ids at every decode step of greedy generate() (or, with
    ``manual``, of a forward loop without position_ids on sample-by-sample cache), under
    ``method`` (None: the stock model)."""
    seen = []
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.append(k["position_ids"]), with_kwargs=True)
    ctx = vlmprune.pruned(model, method, **(options or {})) if method else contextlib.nullcontext()
    try:
        with ctx:
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=GEN["suppress_tokens"])
            if manual:
                seen.clear()
                out = model(**inputs, use_cache=True)
                width = inputs["input_ids"].shape[1]
                for step in range(1, 3):
                    out = model(input_ids=gen[:, width + step - 1:width + step], cache=out.cache, use_cache=True)
    finally:
        hook.remove()
    return [p[-3:, :, -1] for p in seen[1:]]  # the M-RoPE rows of the new token, per step


@pytest.mark.parametrize("method,options", DECODER)
def test_video_decoder_survivors_keep_their_get_rope_index_positions(model, method, options):
    """Decoder stage on videos and images: every pruned segment's positions are the survivors'
    own get_rope_index positions, and decoding continues with the stock model's positions."""
    inputs = _mixed()
    full, _ = _mixed_rope_index(model, inputs)
    with vlmprune.pruned(model, method, **options) as h:
        model.generate(**inputs, **GEN)
        pruned = [seg for seg in h.state.segments if not seg.identity]
        assert pruned
        for seg in pruned:
            ok = seg.valid & ~seg.recycled
            expect = full.gather(2, seg.source.clamp(min=0)[None].expand(3, -1, -1))
            assert torch.equal(seg.positions[:, ok], expect[:, ok])
    stock = _decode_positions(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(_decode_positions(model, inputs, method, options), stock))


@pytest.mark.parametrize("method,options", [("spatial", {"keep": 0.5}), ("prumerge+", {"keep": 0.25}),
                                            ("fastv", {"k": 0, "count": 3})])
@pytest.mark.parametrize("manual", [False, True])
def test_video_decoding_continues_with_the_unpruned_positions(model, method, options, manual):
    """A video prompt: the decode steps of generate() and of a forward loop without position_ids
    (positions from the cache length and rope_deltas) get the stock model's positions. (On
    Qwen2.5-VL videos the two differ in the stock model itself: generate continues after the last
    prompt position, rope_deltas after the largest, a temporal one; the decoder stage's loop
    continues as generate does there — a known difference, see docs/families.md.)"""
    single = qwen_mixed_row(_mixed(), 2, ITEMS)
    del single["attention_mask"]
    decoder_loop = manual and method == "fastv"
    stock = _decode_positions(model, single, manual=manual and not decoder_loop)
    pruned = _decode_positions(model, single, method, options, manual=manual)
    assert len(stock) == len(pruned) == 2 and all(torch.equal(a, b) for a, b in zip(pruned, stock))
    if decoder_loop and model._test_family == "qwen2_5_vl":  # the stock loop itself differs from generate here
        assert not all(torch.equal(a, b) for a, b in zip(pruned, _decode_positions(model, single, manual=True)))


@pytest.mark.parametrize("method,options", [("prumerge+", {"keep": 0.25}), ("fastv", {"k": 1, "count": 2})])
def test_video_beam_search_batch_equals_single(model, method, options):
    """Beams on a mixed image + video batch: generate() expands both modalities' encodings."""
    items = ITEMS[:3]
    inputs = _mixed(items)
    beams = dict(max_new_tokens=3, num_beams=2, do_sample=False, suppress_tokens=GEN["suppress_tokens"])
    assert_beam_batch_equals_singles(model, inputs, lambda inp, b: qwen_mixed_row(inp, b, items), method, options, beams)


def test_video_substitute_score_sums_to_one_per_slice(model):
    """The tower attends within each temporal slice, so the substitute score of each slice (one
    unit) sums to 1 over its merged tokens."""
    inputs = _mixed(VIDEOS)
    view = _video_view(model)
    layout = view.image_layout(model, inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
    _, signals = view.encode_with_signals(model, inputs["pixel_values_videos"], -1, "full", layout)
    for u, unit in enumerate(layout.units):
        assert float(signals.cls_attn[u, :unit.num_patches].sum()) == pytest.approx(1.0, abs=1e-5)
        assert not signals.cls_attn[u, unit.num_patches:].any()


def test_substitute_score_segments_are_the_towers_own(model, monkeypatch):
    """The attention segments the substitute score uses (computed on the host from the layout) are
    the scored block's own ``cu_seqlens``, for videos of several slices and (Qwen2.5-VL) through
    the windowed tower."""
    import vlmprune.integrations.qwen2_vl as Q

    inputs = _mixed(VIDEOS)
    view = _video_view(model)
    layout = view.image_layout(model, inputs["pixel_values_videos"], video_grid_thw=inputs["video_grid_thw"])
    seen = {}
    attn = view.get_vision_layers(model)[view.score_block(model)].attn
    def on_attn(_module, args, kwargs):
        seen["cu"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)

    def received(q, k, bounds, *rest):
        seen["bounds"] = bounds
        return real(q, k, bounds, *rest)

    hook = attn.register_forward_pre_hook(on_attn, with_kwargs=True)
    real = Q._received_attention
    monkeypatch.setattr(Q, "_received_attention", received)
    try:
        view.encode_with_signals(model, inputs["pixel_values_videos"], -1, "full", layout)
    finally:
        hook.remove()
    assert len(layout.units) > len(VIDEOS)  # videos of several temporal slices
    assert seen["bounds"] == seen["cu"].tolist()


@pytest.mark.parametrize("method,options", [("spatial", {"keep": 0.5}), ("prumerge+", {"keep": 0.25}),
                                            ("sparsevlm", {})])
def test_video_remove_restores_exactly_and_sdpa_stays(model, method, options, monkeypatch):
    assert_remove_restores_and_sdpa_stays(model, _mixed(), method, options, monkeypatch, _is_stock)
    assert "get_video_features" not in vars(model.model)



def test_qwen2_5_video_seconds_per_slice_positions():
    """Qwen2.5-VL's videos space their temporal positions by second_per_grid_ts: survivors keep
    the positions get_rope_index gives with it."""
    model = make_tiny_qwen2_vl(family="qwen2_5_vl")
    model._test_family = "qwen2_5_vl"
    inputs = _mixed(VIDEOS)
    inputs["second_per_grid_ts"] = torch.tensor([0.5, 2.0, 1.0])
    full, _ = _mixed_rope_index(model, inputs, second_per_grid_ts=inputs["second_per_grid_ts"])
    plain, _ = _mixed_rope_index(model, inputs)
    assert not torch.equal(full, plain)
    with vlmprune.pruned(model, "sequential", keep=2) as handle:
        _, seen = _lm_inputs(model, inputs)
        plan = handle.plan
    valid, idx = plan.src >= 0, plan.src.clamp(min=0)
    assert torch.equal(seen["position_ids"], full.gather(2, idx[None].expand(3, -1, -1)).masked_fill(~valid, 0))


@pytest.mark.parametrize("method", ["spatial:keep=0.5", "prumerge+"])
def test_stats_count_per_sample_with_several_images_in_a_sample(method):
    """A batch [two images, one image] through the real processor: ``visual_tokens_per_sample()``
    has one entry per sample, the sum of its images' kept tokens (``last_kept`` stays per image),
    and equals the placeholders each row kept in the rewritten prompt."""
    from PIL import Image

    from atp_helpers import make_tiny_qwen_chat

    model, proc = make_tiny_qwen_chat()
    pair = "<|vision_start|><|image_pad|><|vision_end|>"
    images = [Image.new("RGB", (100, 80), "red"), Image.new("RGB", (60, 120), "blue"), Image.new("RGB", (90, 90))]
    inputs = proc(images=images, text=[f"a {pair} b {pair} c", f"{pair} d"], padding=True, return_tensors="pt")
    with vlmprune.pruned(model, method) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        kept = handle.stats.last_kept
        assert len(kept) == 3
        per_sample = handle.stats.visual_tokens_per_sample()
        assert per_sample == [float(kept[0] + kept[1]), float(kept[2])]
        assert [row[0] for row in handle.stats.visual_tokens_per_layer()] == [int(v) for v in per_sample]
        visual = inputs["input_ids"] == model.config.image_token_id
        assert (visual & handle.plan.keep).sum(1).tolist() == [int(v) for v in per_sample]
