"""Qwen2-VL and Qwen2.5-VL on tiny random models (every test runs on both): both stages with M-RoPE.

keep-all == stock logits and tokens; FastV at layer 0 == the stock model fed the survivors with
their own 3-D positions; survivors' positions == ``get_rope_index``'s; decoding continues after
the unpruned maximum position; a ragged batch (different image sizes, so different token
counts) == single samples; cached generate == uncached; remove() restores exactly; sdpa stays on;
every method is listed as supported (ATP's own tests: ``test_atp_families.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import vlmprune
from conftest import (EOS_ID, IMAGE_TOKEN_ID, QWEN_VIDEO_ID, QWEN_VISION_START, assert_ragged_batch_equals_singles,
                      make_qwen_inputs, make_tiny_qwen2_vl, module_hooks, qwen_row, warm_up)
from vlmprune.integrations.base import HANDLE_ATTR, get_adapter

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
    seen = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.update(x=k["inputs_embeds"]), with_kwargs=True)
    model(**inputs)
    hook.remove()
    with vlmprune.pruned(model, "fastv", k=0, count=2) as h:
        out = model(**inputs).logits
        src = h.state.final_source.clone()
    valid = src >= 0
    idx = src.clamp(min=0)
    x = seen["x"].gather(1, idx[:, :, None].expand(-1, -1, seen["x"].shape[-1]))
    pos, _ = _rope_index(model, inputs)
    pos = pos.gather(2, idx[None].expand(3, -1, -1))
    ref = model(inputs_embeds=x, attention_mask=valid.long(), position_ids=pos).logits
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=0)


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
    inputs = _inputs()
    state = copy.deepcopy(model.state_dict())
    ref = model(**inputs).logits
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model(**inputs)
    n_ref = len(calls)
    impl = lambda: (model.config._attn_implementation, model.config.text_config._attn_implementation,  # noqa: E731
                    model.config.vision_config._attn_implementation)
    assert impl() == ("sdpa",) * 3
    handle = vlmprune.apply(model, method, **(options or {}))
    calls.clear()
    assert model(**inputs).logits.shape[1] < ref.shape[1]
    assert len(calls) == n_ref  # every attention still runs sdpa, once
    model.generate(**inputs, **GEN)
    assert impl() == ("sdpa",) * 3
    handle.remove()
    handle.remove()  # idempotent
    assert _is_stock(model) and impl() == ("sdpa",) * 3
    assert torch.equal(model(**inputs).logits, ref)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


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
    width = inputs["input_ids"].shape[1]
    beams = dict(max_new_tokens=3, num_beams=2, do_sample=False, suppress_tokens=GEN["suppress_tokens"])
    with vlmprune.pruned(model, method, **options):
        out = model.generate(**inputs, **beams)
        for b in range(3):
            single = qwen_row(inputs, b)
            one = model.generate(**single, **beams)
            assert torch.equal(one[0, single["input_ids"].shape[1]:], out[b, width:])


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
