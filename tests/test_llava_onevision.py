"""LLaVA-OneVision on a tiny random model (SigLIP tower without [CLS], any-res crops with the
anyres_max resize, Qwen2 decoder, videos): the equivalence guarantees of both stages.

keep-all == stock logits and tokens (images and videos); the packing == the stock packing
restricted to the kept tokens; a ragged batch (different image sizes, so different crop counts,
mosaic grids and token counts; images mixed with videos) == single samples; cached generate ==
uncached; remove() restores exactly with sdpa on; the substitute score == the last vision
layer's own attention; decoder-stage survivors keep their unpruned positions; budgets per grid
and per frame; the refusals are one clear line.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import vlmprune
from conftest import (EOS_ID, assert_fastv_k0_equals_lm_on_survivors, IMAGE_TOKEN_ID, ONEVISION_VIDEO_ID, assert_beam_batch_equals_singles,
                      assert_mixed_batch_equals_singles, assert_ragged_batch_equals_singles,
                      assert_remove_restores_and_sdpa_stays, make_onevision_inputs, make_tiny_llava_onevision,
                      module_hooks, onevision_row, onevision_visual_tokens, warm_up)
from vlmprune.integrations.base import get_adapter
from vlmprune.integrations.handle import HANDLE_ATTR

# (H, W) per sample: 1x3 crops resized to 2x7, 2x2 resized to 4x4, 2x1 (6x3, not resized), 1x2 cut to 3x4
SIZES = [(20, 90), (90, 90), (90, 40), (42, 42)]
COUNTS = [9 + 2 * 8, 9 + 4 * 5, 9 + 6 * 4, 9 + 3 * 5]
PREFIX, SUFFIX = (3, 1, 2, 4), (2, 5, 1, 3)
MIXED = ["video", (90, 90), "video", (90, 40)]
VISUAL_IDS = [IMAGE_TOKEN_ID, ONEVISION_VIDEO_ID]
GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=VISUAL_IDS + [EOS_ID])
ATOL = 2e-5

KEEP_ALL = [
    ("sequential", {"keep": 1.0}),
    ("random", {"keep": 1.0}),
    ("cls-topk", {"keep": 1.0, "order": "spatial"}),
    ("spatial", {"keep": 1.0}),
    ("prumerge", {"keep": 1.0, "k_neighbors": 0, "order": "spatial"}),
    ("prumerge+", {"keep": 1.0, "k_neighbors": 0, "order": "spatial"}),
    ("fastv", {"k": 1, "drop_ratio": 0.0}),
    ("atp", {"fixed_ratio": 1.0}),
]
PRUNING = [("prumerge+", {}), ("prumerge", {}), ("cls-topk", {"keep": 4}), ("spatial", {"keep": 0.5}),
           ("sequential", {"keep": 0.5}), ("fastv", {"k": 1, "count": 10}), ("sparsevlm", {}),
           ("atp", {"fixed_ratio": 0.5})]


@pytest.fixture(scope="module")
def model():
    m = make_tiny_llava_onevision()
    return warm_up(m, make_onevision_inputs(m, MIXED, (1,) * 4, (1,) * 4))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _inputs(model, n=4, seed=1):
    return make_onevision_inputs(model, SIZES[:n], PREFIX[:n], SUFFIX[:n], seed=seed)


def _row(inputs, b):
    return onevision_row(inputs, b, SIZES)


def _mixed(model, seed=1):
    return make_onevision_inputs(model, MIXED, PREFIX, SUFFIX, seed=seed)


def _mixed_row(inputs, b):
    return onevision_row(inputs, b, MIXED)


def _is_stock(model) -> bool:
    base = model.model
    return (getattr(model, HANDLE_ATTR, None) is None and "get_image_features" not in vars(base)
            and "get_video_features" not in vars(base) and module_hooks(model) == model._test_stock_hooks)


def _apply(model, method, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # untrained-module notices
        return vlmprune.apply(model, method, **options)


# ------------------------------------------------------------------------------------------ layout


def test_layout_counts_match_stock_packing(model):
    adapter = get_adapter(model)
    assert adapter.family == "llava-onevision" and not adapter.tower_has_cls(model)
    inputs = _inputs(model)
    layout = adapter.image_layout(model, inputs["pixel_values"], inputs["image_sizes"])
    assert list(layout.tokens_per_image) == onevision_visual_tokens(model, SIZES) == COUNTS
    assert [u.grid for u in layout.units] == [(3, 3), (2, 7), (3, 3), (4, 4), (3, 3), (6, 3), (3, 3), (3, 4)]
    assert [m.crops for m in layout.family_data.images] == [4, 5, 3, 3]
    assert len(adapter.unit_tokens(model, layout)) == 15  # tower passes (every crop), not units
    assert adapter.fixed_image_tokens(model) is None and adapter.budget_tokens(model, "vision") == 9
    # batch_num_images: the images of a sample with several images are their base image only
    two = adapter.image_layout(model, inputs["pixel_values"][:2], inputs["image_sizes"][:2],
                               batch_num_images=torch.tensor([2]))
    stock = model.model.get_image_features(inputs["pixel_values"][:2], inputs["image_sizes"][:2],
                                           batch_num_images=torch.tensor([2]), return_dict=True)
    assert list(two.tokens_per_image) == [t.shape[0] for t in stock.pooler_output] == [10, 10]
    # videos: one unit per frame on the pooled 2x2 grid, frames * 4 + 1 placeholders
    video = adapter.modality_views(model)[1]
    frames = torch.zeros(2, 3, 3, 42, 42)
    vl = video.image_layout(model, frames)
    assert vl.tokens_per_image == (13, 13) == tuple(onevision_visual_tokens(model, ["video"]) * 2)
    assert [u.frame for u in vl.units] == [0, 1, 2] * 2 and {u.grid for u in vl.units} == {(2, 2)}
    with pytest.raises(ValueError, match="image_sizes"):
        adapter.image_layout(model, inputs["pixel_values"])


@pytest.mark.parametrize("method,options,videos", [(m, o, False) for m, o in KEEP_ALL]
                         + [(m, o, True) for m, o in KEEP_ALL if m != "atp"])
def test_keep_all_gives_identical_logits_and_tokens(model, method, options, videos):
    """Images of four sizes, or videos mixed with images (ATP refuses videos: see the refusals)."""
    inputs = _mixed(model) if videos else _inputs(model)
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, **GEN)
    handle = _apply(model, method, options)
    try:
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, **GEN), ref_gen)
        if handle.stage == "vision":
            # (a batch with videos records its images, then its videos: one record per prefill)
            assert handle.stats.last_kept == ([COUNTS[1], COUNTS[2], 13, 13] if videos else COUNTS)
            assert handle.stats.mean_kept_ratio == 1.0
    finally:
        handle.remove()
    assert _is_stock(model)


@pytest.mark.parametrize("newlines", ["keep", "rows"])
def test_packing_is_the_stock_packing_of_the_kept_tokens(model, newlines):
    """sequential keep=k keeps the first k tokens of the base image and of the packed mosaic: the
    LLM gets exactly those stock tokens and the newline rule's newlines, in stock order."""
    inputs = _inputs(model)
    stock = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    k = 4
    layout = get_adapter(model).image_layout(model, inputs["pixel_values"], inputs["image_sizes"])
    with vlmprune.pruned(model, "sequential", keep=k, newlines=newlines) as handle:
        assert handle.adapter.newlines == newlines
        ours = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    for full, mine, m in zip(stock.pooler_output, ours.pooler_output, layout.family_data.images):
        rows, cols = m.shape
        mosaic = [9 + j // cols * (cols + 1) + j % cols for j in range(k)]
        lines = range(rows) if newlines == "keep" else range(-(-k // cols))
        expect = list(range(k)) + sorted(mosaic + [9 + r * (cols + 1) + cols for r in lines])
        kept = mine[~torch.isnan(mine).all(-1)]
        assert torch.isnan(mine[kept.shape[0]:]).all()
        assert torch.equal(kept, full[expect])
    assert _is_stock(model)


# ------------------------------------------------------------------------------------------ the substitute score


def test_substitute_score_is_the_last_layers_attention(model):
    """The substitute score is the attention each token receives in the last vision layer,
    recomputed here in float64 from the layer's input with probabilities whose output (probs @ v,
    then out_proj) is the layer's own attention output; it is packed as the stock model packs the
    tokens (here with the stock packing itself) and each unit's scores sum to 1."""
    adapter = get_adapter(model)
    inputs = _inputs(model)
    layout = adapter.image_layout(model, inputs["pixel_values"], inputs["image_sizes"])
    attn = model.model.vision_tower.encoder.layers[-1].self_attn
    seen = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, k: seen.update(x=k.get("hidden_states", a[0] if a else None)),
                                        with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, k, out: seen.update(out=out[0]), with_kwargs=True)
    try:
        _, signals = adapter.encode_with_signals(model, inputs["pixel_values"], -1, "full", layout)
    finally:
        h1.remove()
        h2.remove()
    x = seen["x"].double()
    lin = lambda p: torch.nn.functional.linear(x, p.weight.double(), p.bias.double())  # noqa: E731
    heads = attn.num_heads
    q, k, v = (lin(p).view(*x.shape[:2], heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.head_dim ** -0.5, dim=-1)  # [P, H, S, S]
    out = torch.nn.functional.linear((probs @ v).transpose(1, 2).reshape(x.shape), attn.out_proj.weight.double(),
                                     attn.out_proj.bias.double())
    torch.testing.assert_close(out, seen["out"].double(), atol=1e-5, rtol=0)
    received = probs.mean((1, 2))  # [P, S]
    crops = [m.crops for m in layout.family_data.images]
    packed = model.model.pack_image_features(list(torch.split(received[..., None], crops)), inputs["image_sizes"],
                                             vision_aspect_ratio="anyres_max_2")[0]
    keys = model.model.pack_image_features(list(torch.split(lin(attn.k_proj), crops)), inputs["image_sizes"],
                                           vision_aspect_ratio="anyres_max_2")[0]
    u = 0
    for i, (score, key) in enumerate(zip(packed, keys)):
        for part in (slice(0, 9), slice(9, None)):
            n = score[part].shape[0]
            expect = score[part, 0] / score[part, 0].sum()
            torch.testing.assert_close(signals.cls_attn[u, :n].double(), expect, atol=1e-6, rtol=0)
            torch.testing.assert_close(signals.keys[u, :n].double(), key[part], atol=1e-5, rtol=0)
            assert float(signals.cls_attn[u, :n].sum()) == pytest.approx(1.0, abs=1e-5)
            assert not signals.cls_attn[u, n:].any()
            u += 1


def test_scored_methods_select_by_the_substitute_score(model):
    """cls-topk keeps each unit's tokens with the highest substitute score."""
    adapter = get_adapter(model)
    inputs = _inputs(model)
    layout = adapter.image_layout(model, inputs["pixel_values"], inputs["image_sizes"])
    _, signals = adapter.encode_with_signals(model, inputs["pixel_values"], -1, "full", layout)
    with vlmprune.pruned(model, "cls-topk", keep=0.5) as handle:
        model(**inputs)
        red = handle.last_reduction
    for u, unit in enumerate(layout.units):
        n = unit.num_patches
        top = signals.cls_attn[u, :n].topk(n // 2).indices.sort().values
        assert torch.equal(red.indices[u, :red.counts[u]].sort().values, top)


# ------------------------------------------------------------------------------------------ equivalences


@pytest.mark.parametrize("method,options", PRUNING)
def test_ragged_batch_equals_single_samples(model, method, options):
    assert_ragged_batch_equals_singles(model, _inputs(model), _row, method, options, GEN)


@pytest.mark.parametrize("method,options", [("prumerge", {}), ("random", {"keep": 3, "seed": 2}),
                                            ("fastv", {"k": 1, "count": 10}), ("sparsevlm", {}),
                                            ("atp", {"fixed_ratio": 0.5})])
def test_cached_generate_equals_uncached(model, method, options):
    inputs = _inputs(model, n=3, seed=2)
    with vlmprune.pruned(model, method, **options):
        cached = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        uncached = model.generate(**inputs, **GEN, use_cache=False, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.sequences[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,options", [("prumerge+", {}), ("spatial", {}), ("fastv", {"k": 1, "count": 10}),
                                            ("sparsevlm", {})])
def test_remove_restores_exactly_and_sdpa_stays(model, method, options, monkeypatch):
    assert_remove_restores_and_sdpa_stays(model, _inputs(model), method, options, monkeypatch, _is_stock, GEN)


@pytest.mark.parametrize("method", ["prumerge+", "fastv"])
def test_beam_search_batch_equals_single(model, method):
    beams = dict(max_new_tokens=4, num_beams=2, do_sample=False, suppress_tokens=VISUAL_IDS + [EOS_ID])
    assert_beam_batch_equals_singles(model, _inputs(model, n=3), _row, method, {}, beams)


def test_fastv_k0_equals_stock_model_on_prepruned_sequence(model):
    """FastV at layer 0 == the untouched language model fed only the survivors (images and
    videos alike) with their own unpruned positions."""
    inputs = _mixed(model)
    full = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
    idx, valid = assert_fastv_k0_equals_lm_on_survivors(model, inputs, 6, lambda idx: full.gather(1, idx), atol=ATOL)
    visual = torch.isin(inputs["input_ids"].gather(1, idx), torch.tensor(VISUAL_IDS)) & valid
    assert visual.sum(1).tolist() == [6] * 4


def test_several_images_per_sample_are_base_images(model):
    """batch_num_images (a sample with two images): each image is its base image and one newline,
    as in the stock model; keep-all == stock, and pruning keeps per base image."""
    one = _inputs(model, n=2)
    ids = torch.tensor([[1, 9] + [IMAGE_TOKEN_ID] * 20 + [11, 12]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": one["pixel_values"],
              "image_sizes": one["image_sizes"], "batch_num_images": torch.tensor([2])}
    ref = model(**inputs).logits
    with vlmprune.pruned(model, "sequential", keep=1.0):
        assert torch.equal(model(**inputs).logits, ref)
    with vlmprune.pruned(model, "spatial", keep=4) as handle:
        assert model(**inputs).logits.shape[1] == ids.shape[1] - 2 * 5
        assert handle.stats.last_kept == [5, 5]


# ------------------------------------------------------------------------------------------ videos


def test_video_budget_is_per_frame(model):
    """sequential keep=2 keeps the first two pooled tokens of every frame; each video's run is its
    frames' kept tokens, then its newline: exactly those stock rows."""
    inputs = _mixed(model)
    pv = inputs["pixel_values_videos"]
    stock = model.model.get_video_features(pv, return_dict=True).pooler_output  # [V, 13, D]
    with vlmprune.pruned(model, "sequential", keep=2) as handle:
        ours = model.model.get_video_features(pv, return_dict=True).pooler_output
        model(**inputs)
        assert handle.stats.last_kept == [7, 7]
    expect = [0, 1, 4, 5, 8, 9, 12]
    for full, mine in zip(stock, ours):
        assert torch.equal(mine[:7], full[expect]) and torch.isnan(mine[7:]).all()


@pytest.mark.parametrize("method,options", PRUNING)
def test_video_mixed_batch_equals_single_samples(model, method, options):
    assert_mixed_batch_equals_singles(model, _mixed(model), _mixed_row, method, options, GEN, VISUAL_IDS)


@pytest.mark.parametrize("method,options", [("prumerge+", {}), ("random", {"keep": 0.5, "seed": 2}),
                                            ("fastv", {"k": 1, "count": 10}), ("sparsevlm", {})])
def test_video_cached_generate_equals_uncached(model, method, options):
    inputs = _mixed(model, seed=2)
    with vlmprune.pruned(model, method, **options):
        cached = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        uncached = model.generate(**inputs, **GEN, use_cache=False, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,options", [("spatial", {"keep": 0.5}), ("fastv", {"k": 1, "count": 10})])
def test_video_remove_restores_exactly_and_sdpa_stays(model, method, options, monkeypatch):
    assert_remove_restores_and_sdpa_stays(model, _mixed(model), method, options, monkeypatch, _is_stock, GEN)


def test_video_substitute_score_sums_to_one_per_frame(model):
    video = get_adapter(model).modality_views(model)[1]
    pv = _mixed(model)["pixel_values_videos"]
    layout = video.image_layout(model, pv)
    _, signals = video.encode_with_signals(model, pv, -1, "full", layout)
    assert signals.cls_attn.shape == (6, 4)
    torch.testing.assert_close(signals.cls_attn.sum(1), torch.ones(6), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ ATP grids, budgets, errors


def test_atp_grids_are_the_base_image_and_the_packed_mosaic(model):
    """The decoder stage's grids: per image the base image (3x3) and the packed mosaic (the
    layout's rows x cols), read from the newline tokens; newlines lie on no grid."""
    adapter = get_adapter(model)
    inputs = _inputs(model)
    layout = adapter.image_layout(model, inputs["pixel_values"], inputs["image_sizes"])
    embeds = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: embeds.update(x=k["inputs_embeds"]),
                                                                with_kwargs=True)
    model(**inputs)
    hook.remove()
    lm = adapter.lm_layout(model, adapter.visual_columns(model, inputs["input_ids"]))
    grids = adapter.grid_layout(model, lm, embeds["x"], {k: inputs[k] for k in ("pixel_values", "image_sizes")})
    assert [u.grid for u in grids.units] == [u.grid for u in layout.units]
    on_grid = (grids.grid_unit >= 0).sum(1).tolist()
    assert on_grid == [n - rows for n, rows in zip(COUNTS, (2, 4, 6, 3))]


def test_atp_grids_of_videos_are_one_unit_per_frame(model):
    """Videos among images: each frame a unit on the pooled 2x2 grid (frame f's j-th token at patch
    j), the video's final newline on no grid; the images keep their base and mosaic units, in the
    prompt's order."""
    adapter = get_adapter(model)
    inputs = _mixed(model)
    embeds = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: embeds.update(x=k["inputs_embeds"]),
                                                                with_kwargs=True)
    model(**inputs)
    hook.remove()
    visual = adapter.visual_columns(model, inputs["input_ids"])
    lm = adapter.lm_layout(model, visual)
    names = ("input_ids", "pixel_values", "image_sizes", "pixel_values_videos")
    grids = adapter.grid_layout(model, lm, embeds["x"], {k: inputs.get(k) for k in names})
    images = adapter.image_layout(model, inputs["pixel_values"], inputs["image_sizes"]).units
    expect = ([(0, (2, 2), f) for f in range(3)] + [(1, u.grid, 0) for u in images if u.image == 0]
              + [(2, (2, 2), f) for f in range(3)] + [(3, u.grid, 0) for u in images if u.image == 1])
    assert [(u.image, u.grid, u.frame) for u in grids.units] == expect
    for b, first in ((0, 0), (2, len(expect) - 3 - sum(u.image == 1 for u in images))):
        cols = torch.nonzero(visual[b]).flatten()
        assert torch.equal(grids.grid_unit[b, cols], torch.tensor([first + f for f in range(3) for _ in range(4)] + [-1]))
        assert torch.equal(grids.grid_patch[b, cols], torch.tensor(list(range(4)) * 3 + [-1]))
    with pytest.raises(ValueError, match="placeholders do not match"):  # the videos' pixels not given
        adapter.grid_layout(model, lm, embeds["x"], {"input_ids": inputs["input_ids"], "pixel_values_videos":
                                                     inputs["pixel_values_videos"][:1], "pixel_values": inputs["pixel_values"],
                                                     "image_sizes": inputs["image_sizes"]})


def test_budgets_and_refusals_are_one_clear_line(model):
    with pytest.raises(ValueError, match="keep=10 is more than the 9") as err:
        vlmprune.apply(model, "sequential", keep=10)
    assert "\n" not in str(err.value)
    inputs = _inputs(model)
    with vlmprune.pruned(model, "sequential", keep=9) as handle:  # every base token, 9 of each mosaic
        model(**inputs)
        assert handle.stats.last_kept == [9 + 9 + 2, 9 + 9 + 4, 9 + 9 + 6, 9 + 9 + 3]
    small = make_onevision_inputs(model, [(130, 20)], (1,), (1,))  # a 6 x 1 mosaic
    with vlmprune.pruned(model, "sequential", keep=9):
        with pytest.raises(ValueError, match="more than the N = 6") as err:
            model(**small)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="newlines must be 'keep' or 'rows', got 'all'"):
        vlmprune.apply(model, "prumerge", newlines="all")
    assert _is_stock(model)


def test_strategy_and_towers():
    """SigLIP with "default" (the stock model would drop a patch) is refused in one line; a CLIP
    tower with "default" (its [CLS] dropped) runs, keep-all == stock."""
    siglip = make_tiny_llava_onevision(text_layers=2)
    inputs = make_onevision_inputs(siglip, SIZES[:2], (1, 2), (2, 1))
    with vlmprune.pruned(siglip, "spatial"):
        with pytest.raises(ValueError, match="'default' on siglip_vision_model") as err:
            siglip(**inputs, vision_feature_select_strategy="default")
    assert "\n" not in str(err.value)
    clip = make_tiny_llava_onevision(text_layers=2, tower="clip")
    assert get_adapter(clip).tower_has_cls(clip)
    inputs = make_onevision_inputs(clip, SIZES[:2], (1, 2), (2, 1))
    ref = clip(**inputs).logits
    with vlmprune.pruned(clip, "prumerge+", keep=1.0, k_neighbors=0, order="spatial"):
        assert torch.equal(clip(**inputs).logits, ref)
    with vlmprune.pruned(clip, "prumerge+") as handle:
        clip(**inputs)
        assert all(k < n for k, n in zip(handle.stats.last_kept, onevision_visual_tokens(clip, SIZES[:2])))


def test_qwen2_rotary_is_llama_rotate_half():
    """OneVision's language model (Qwen2) rotates q / k as Llama does (compat assumption 4)."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from vlmprune.integrations.compat import apply_rotary

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    for a, b in zip(apply_rotary_pos_emb(q, k, cos, sin), apply_rotary(q, k, cos, sin)):
        assert torch.equal(a, b)


def test_support_listed():
    listed = {m["name"]: m for m in vlmprune.list_methods()}
    for name in ("random", "sequential", "spatial", "cls-topk", "prumerge", "prumerge+", "fastv", "sparsevlm", "atp"):
        assert listed[name]["families"]["llava-onevision"] == "yes"
    assert "attention received in the last vision layer" in listed["prumerge+"]["scores"]["llava-onevision"]
