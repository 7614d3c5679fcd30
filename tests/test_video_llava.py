"""Video-LLaVA on a tiny random model (image and video towers, 3-frame videos): both stages.

keep-all == stock logits and tokens (mixed image + video batches); the LLM receives the stock
tokens of each frame's [CLS] and kept patches, with the kept tokens' consecutive positions;
per-frame budgets on a hand-checked case; a mixed batch (images and videos, so different visual
counts; different kept counts per frame for PruMerge) == single samples; cached generate ==
uncached; remove() restores exactly; sdpa stays on; FastV at layer 0 == the stock language model
fed the survivors; one clear error line for what cannot run.
"""

from __future__ import annotations


import pytest
import torch

import vlmprune
from conftest import (assert_beam_batch_equals_singles, assert_fastv_k0_equals_lm_on_survivors, assert_remove_restores_and_sdpa_stays, EOS_ID, IMAGE_TOKEN_ID, VIDEO_ID, assert_mixed_batch_equals_singles, make_tiny_video_llava,
                      make_video_llava_inputs, module_hooks, video_llava_row, warm_up)
from vlmprune.integrations.base import get_adapter
from vlmprune.integrations.handle import HANDLE_ATTR

FRAMES, N = 3, 16  # 3 frames of 4 x 4 patches (+ [CLS] each: 51 video placeholders)
KINDS = ["video", "image", "video", "image"]
PREFIX, SUFFIX = (3, 1, 2, 4), (2, 5, 1, 3)
GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID, VIDEO_ID, EOS_ID])
ATOL = 2e-5
VISUAL_IDS = [IMAGE_TOKEN_ID, VIDEO_ID]

VISION = [("random", {"keep": 0.5, "seed": 2}), ("sequential", {"keep": 0.5}), ("spatial", {"keep": 0.5}),
          ("cls-topk", {"keep": 0.5}), ("prumerge", {}), ("prumerge+", {})]
DECODER = [("fastv", {"k": 1, "count": 8}), ("fastv", {"k": 2, "drop_ratio": 0.5}), ("sparsevlm", {})]
KEEP_ALL = [("sequential", {"keep": 1.0}), ("random", {"keep": 1.0}), ("spatial", {"keep": 1.0}),
            ("cls-topk", {"keep": 1.0, "order": "spatial"}),
            ("prumerge", {"keep": 1.0, "k_neighbors": 0, "order": "spatial"}),
            ("prumerge+", {"keep": 1.0, "k_neighbors": 0, "order": "spatial"}),
            ("fastv", {"k": 1, "drop_ratio": 0.0})]


@pytest.fixture(scope="module")
def model():
    m = make_tiny_video_llava(frames=FRAMES)
    return warm_up(m, _inputs(m, kinds=["video", "image"]))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _inputs(model, kinds=KINDS, seed=1):
    n = len(kinds)
    return make_video_llava_inputs(model, kinds, PREFIX[:n], SUFFIX[:n], frames=FRAMES, seed=seed)


def _is_stock(model) -> bool:
    base = model.model
    return (getattr(model, HANDLE_ATTR, None) is None and not model._forward_pre_hooks
            and "get_image_features" not in vars(base) and "get_video_features" not in vars(base)
            and module_hooks(model) == model._test_stock_hooks)


def _lm_inputs(model, inputs):
    """What the language model received in a forward of ``inputs`` (its keywords), and the output."""
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    try:
        out = model(**inputs)
    finally:
        hook.remove()
    return out, seen


def test_adapter_and_layout(model):
    adapter = get_adapter(model)
    assert adapter.family == "video-llava" and adapter.fixed_image_tokens(model) is None
    images, videos = adapter.modality_views(model)
    assert (images.image_modality, videos.image_modality) == ("image", "video")
    assert videos.get_vision_tower(model) is model.model.video_tower
    assert images.get_vision_tower(model) is model.model.image_tower
    inputs = _inputs(model)
    assert adapter.visual_columns(model, inputs["input_ids"]).sum(1).tolist() == [FRAMES * (N + 1), N] * 2
    layout = videos.image_layout(model, inputs["pixel_values_videos"])
    assert [(u.image, u.frame, u.grid, u.has_cls) for u in layout.units] == \
        [(v, f, (4, 4), True) for v in range(2) for f in range(FRAMES)]
    assert layout.tokens_per_image == (FRAMES * (N + 1),) * 2
    assert adapter.budget_tokens(model, "vision") == N and adapter.budget_tokens(model, "decoder") == FRAMES * (N + 1)


def test_layout_counts_match_stock_features(model):
    """The layout's placeholder counts are the stock encoders' token counts."""
    adapter = get_adapter(model)
    inputs = _inputs(model)
    images, videos = adapter.modality_views(model)
    stock_video = model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output
    stock_image = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
    assert stock_video.shape[:2] == (2 * FRAMES, N + 1)
    assert [FRAMES * stock_video.shape[1]] * 2 == list(videos.image_layout(model, inputs["pixel_values_videos"])
                                                       .tokens_per_image)
    assert [stock_image.shape[1]] * 2 == list(images.image_layout(model, inputs["pixel_values"]).tokens_per_image)


@pytest.mark.parametrize("method,options", KEEP_ALL)
def test_keep_all_gives_identical_logits_and_tokens(model, method, options):
    inputs = _inputs(model)
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, **GEN)
    with vlmprune.pruned(model, method, **options):
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, **GEN), ref_gen)
    assert _is_stock(model)


@pytest.mark.parametrize("method,options", [("sequential", {"keep": 5}), ("spatial", {"keep": 0.25}),
                                            ("cls-topk", {"keep": 4}), ("prumerge+", {})])
def test_llm_gets_each_frames_cls_and_kept_patches(model, method, options):
    """The pruned forward feeds the language model exactly the stock tokens of what each frame
    kept — its [CLS], then its kept patches in the method's order (per-frame reduction; merging
    methods change the kept tokens, so for them the [CLS] rows are checked) — in the first
    placeholders of the video's run, images as LLaVA-1.5, text unchanged; at consecutive
    positions: its logits are the stock language model's on that sequence."""
    inputs = _inputs(model)
    _, stock = _lm_inputs(model, inputs)
    with vlmprune.pruned(model, method, **options) as handle:
        out, seen = _lm_inputs(model, inputs)
        plan, red = handle.plan, handle.last_reductions["video"]
    ids, new_ids = inputs["input_ids"], plan.compact(inputs["input_ids"], 0)
    merges = method.startswith("prumerge")
    for b in (0, 2):
        v = b // 2
        run = torch.nonzero(ids[b] == VIDEO_ID).flatten()
        rows = seen["inputs_embeds"][b, new_ids[b] == VIDEO_ID]
        frames, start = [], 0
        for f in range(FRAMES):
            u = v * FRAMES + f
            kept = red.indices[u, :red.counts[u]]
            if merges:  # (PruMerge+'s extra token has no patch index)
                torch.testing.assert_close(rows[start], stock["inputs_embeds"][b, run[f * (N + 1)]], atol=0, rtol=0)
            else:
                frames.append(torch.cat([torch.tensor([f * (N + 1)]), f * (N + 1) + 1 + kept]))
            start += 1 + int(red.counts[u])
        assert start == rows.shape[0]
        if not merges:
            torch.testing.assert_close(rows, stock["inputs_embeds"][b, run[torch.cat(frames)]], atol=0, rtol=0)
    text = (plan.src >= 0) & ~torch.isin(new_ids, torch.tensor(VISUAL_IDS))
    x = stock["inputs_embeds"].gather(1, plan.src.clamp(min=0)[:, :, None].expand(-1, -1, stock["inputs_embeds"].shape[-1]))
    torch.testing.assert_close(seen["inputs_embeds"][text], x[text], atol=0, rtol=0)
    valid = plan.src >= 0
    pos = (plan.new_mask.cumsum(1) - 1).clamp(min=0)
    ref = model(inputs_embeds=seen["inputs_embeds"], attention_mask=plan.new_mask, position_ids=pos).logits
    torch.testing.assert_close(out.logits[valid], ref[valid], atol=ATOL, rtol=0)


def test_budget_is_per_frame(model):
    """Hand-checked: keep=5 keeps 5 of every frame's 16 patches plus its [CLS]: 3 * 6 = 18 video
    tokens (15 with frame_cls="drop"), 5 for an image; ratios are per frame too."""
    inputs = _inputs(model)
    with vlmprune.pruned(model, "sequential", keep=5) as handle:
        model(**inputs)
        assert handle.last_reductions["image"].counts.tolist() == [5, 5]
        assert handle.last_reductions["video"].counts.tolist() == [5] * (2 * FRAMES)
        assert (handle.plan.keep & inputs["attention_mask"].bool()).sum(1).tolist() == [inputs["attention_mask"][b].sum().item()
                                                   - (FRAMES * (N + 1) - 18 if k == "video" else N - 5)
                                                   for b, k in enumerate(KINDS)]
    with vlmprune.pruned(model, "sequential", keep=5, frame_cls="drop") as handle:
        model(**_inputs(model, kinds=["video"]))
        assert handle.stats.last_kept == [15]
    with vlmprune.pruned(model, "sequential", keep=0.25) as handle:
        model(**_inputs(model, kinds=["video"]))
        assert handle.stats.last_kept == [FRAMES * (1 + 4)]


@pytest.mark.parametrize("method,options", VISION[1:] + DECODER)  # (random draws depend on the batch)
def test_mixed_batch_equals_single_samples(model, method, options):
    assert_mixed_batch_equals_singles(model, _inputs(model), lambda inp, b: video_llava_row(inp, b, KINDS), method,
                                      options, GEN, VISUAL_IDS, atol=ATOL)


def test_prumerge_frames_keep_different_counts(model):
    """PruMerge's adaptive budget is decided per frame: frames of one video keep different counts,
    and the video batch still equals its single samples."""
    kinds = ["video", "video"]
    inputs = _inputs(model, kinds=kinds, seed=2)
    inputs["pixel_values_videos"][:, 1] *= 3  # frames unlike each other
    inputs["pixel_values_videos"][:, 2, :, :28] = 0
    with vlmprune.pruned(model, "prumerge") as handle:
        model(**inputs)
        counts = handle.last_reductions["video"].counts.tolist()
        assert handle.stats.last_kept == [sum(counts[v * FRAMES:(v + 1) * FRAMES]) + FRAMES for v in range(2)]
    assert len(set(counts[FRAMES:])) > 1, counts
    assert_mixed_batch_equals_singles(model, inputs, lambda inp, b: video_llava_row(inp, b, kinds), "prumerge", {},
                                      GEN, VISUAL_IDS, atol=ATOL)


@pytest.mark.parametrize("method,options", VISION + DECODER)
def test_cached_generate_equals_uncached(model, method, options):
    inputs = _inputs(model, kinds=KINDS[:3], seed=2)
    with vlmprune.pruned(model, method, **options):
        cached = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        uncached = model.generate(**inputs, **GEN, use_cache=False, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,options", [("prumerge+", {}), ("spatial", {}), ("fastv", {"k": 1, "count": 8}),
                                            ("sparsevlm", {})])
def test_remove_restores_exactly_and_sdpa_stays(model, method, options, monkeypatch):
    assert_remove_restores_and_sdpa_stays(model, _inputs(model), method, options, monkeypatch, _is_stock, GEN)



def test_fastv_k0_equals_stock_model_on_prepruned_sequence(model):
    """FastV at layer 0 == the untouched language model fed only the survivors (image and video
    tokens alike) with their own unpruned positions."""
    inputs = _inputs(model)
    full = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)  # the stock positions of the prompt
    idx, valid = assert_fastv_k0_equals_lm_on_survivors(model, inputs, 6, lambda idx: full.gather(1, idx), atol=ATOL)
    visual = torch.isin(inputs["input_ids"].gather(1, idx), torch.tensor(VISUAL_IDS)) & valid
    assert visual.sum(1).tolist() == [6] * 4


@pytest.mark.parametrize("method,options", [("prumerge+", {}), ("fastv", {"k": 1, "count": 8})])
def test_beam_search_batch_equals_single(model, method, options):
    """Beams: generate() expands the encoded images and videos into new tensors, whose kept
    counts the vision stage reads back from their NaN rows."""
    kinds = KINDS[:3]
    inputs = _inputs(model, kinds=kinds)
    beams = dict(max_new_tokens=3, num_beams=2, do_sample=False, suppress_tokens=GEN["suppress_tokens"])
    assert_beam_batch_equals_singles(model, inputs, lambda inp, b: video_llava_row(inp, b, kinds), method, options,
                                     beams)


def test_deprecated_pixel_values_images_is_pruned_too(model):
    """The images' deprecated keyword pixel_values_images is encoded and rewritten like pixel_values,
    and counted among ATP's grids."""
    for method, options in (("spatial", {"keep": 0.25}), ("atp", {"fixed_ratio": 0.5})):
        inputs = _inputs(model)
        with vlmprune.pruned(model, method, **options):
            ref = model(**inputs).logits
            inputs["pixel_values_images"] = inputs.pop("pixel_values")
            torch.testing.assert_close(model(**inputs).logits, ref, atol=0, rtol=0)


@pytest.mark.parametrize("method, options", [("prumerge+", {}), ("atp", {"fixed_ratio": 0.5})])
def test_generate_with_the_processors_pixel_values_images(model, method, options):
    """``VideoLlavaProcessor`` returns the images as ``pixel_values_images``, which ``generate``
    hands to ``get_image_features`` under that name: pruned generation equals the same call with
    ``pixel_values``."""
    inputs = _inputs(model)
    gen = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with vlmprune.pruned(model, method, **options):
        ref = model.generate(**inputs, **gen)
        inputs["pixel_values_images"] = inputs.pop("pixel_values")
        out = model.generate(**inputs, **gen)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    stock = model.generate(**inputs, **gen)  # unpruned: the images' pruning did take part above
    assert not torch.allclose(stock.logits[0], ref.logits[0])


def test_full_strategy_images(model):
    """With vision_feature_select_strategy="full" the images keep their [CLS] (N + 1 tokens): the
    sampling baselines that need no grid run, the grid methods refuse with one line."""
    m = make_tiny_video_llava(frames=FRAMES, strategy="full")
    inputs = _inputs(m)
    ref = m(**inputs).logits
    with vlmprune.pruned(m, "sequential", keep=1.0):
        assert torch.equal(m(**inputs).logits, ref)
    with vlmprune.pruned(m, "sequential", keep=5) as handle:
        m(**inputs)
        assert handle.last_reductions["image"].counts.tolist() == [5, 5]
    for method, pattern in [("spatial", r"needs the 4x4 patch grid"),
                            ("prumerge+", r"vision_feature_select_strategy='full' feeds the \[CLS\] token")]:
        with pytest.raises(ValueError, match=pattern) as err:
            vlmprune.apply(m, method)
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ ATP


@pytest.fixture(scope="module")
def atp_checkpoint(model, tmp_path_factory):
    """ATP thresholds that keep a content-dependent number of tokens per frame, saved as a folder."""
    from atp_helpers import set_constant_thresholds
    from vlmprune.methods.atp import ATPConfig, ATPPruner

    adapter = get_adapter(model)
    torch.manual_seed(0)
    cfg = ATPConfig(num_layers=len(adapter.get_decoder_layers(model)), layers=(0, 1), num_patches=N,
                    grid=adapter.patch_grid(model), hidden=16)
    d = tmp_path_factory.mktemp("atp-video-llava")
    set_constant_thresholds(ATPPruner(cfg), (0.8, 0.85), 0.99).save(d)
    return str(d)


def test_atp_grids_are_one_unit_per_frame(model):
    """ATP's grids: an image is one unit (its N patches); a video's frame f is a unit on the 4 x 4
    grid, its [CLS] (first in the frame) on no grid; runs in the prompt's order."""
    adapter = get_adapter(model)
    inputs = _inputs(model)
    out, seen = _lm_inputs(model, inputs)
    visual = adapter.visual_columns(model, inputs["input_ids"])
    lm = adapter.lm_layout(model, visual, seen.get("position_ids"))
    names = ("input_ids", "pixel_values", "pixel_values_videos")
    grids = adapter.grid_layout(model, lm, seen["inputs_embeds"], {k: inputs.get(k) for k in names})
    expect, first = [], []
    for i, kind in enumerate(KINDS):
        first.append(len(expect))
        expect += [(i, (4, 4), f) for f in range(FRAMES if kind == "video" else 1)]
    assert [(u.image, u.grid, u.frame) for u in grids.units] == expect
    for b, kind in enumerate(KINDS):
        cols = torch.nonzero(visual[b]).flatten()
        if kind == "video":
            unit = [-1 if j == 0 else first[b] + f for f in range(FRAMES) for j in range(N + 1)]
            patch = [j - 1 for _ in range(FRAMES) for j in range(N + 1)]
        else:
            unit, patch = [first[b]] * N, list(range(N))
        assert grids.grid_unit[b, cols].tolist() == unit and grids.grid_patch[b, cols].tolist() == patch
    # a video whose pixels are missing from the keywords: its placeholders are not accounted for
    with pytest.raises(ValueError, match="do not match"):
        adapter.grid_layout(model, lm, seen["inputs_embeds"],
                            {**{k: inputs.get(k) for k in names},
                             "pixel_values_videos": inputs["pixel_values_videos"][:1]})


def test_atp_mixed_batch_equals_single_samples(model, atp_checkpoint):
    """ATP with content-dependent thresholds, frames as units: a batch of videos and images ==
    each sample alone (tokens, logits, visual counts), and cached generate == uncached."""
    assert_mixed_batch_equals_singles(model, _inputs(model), lambda inp, b: video_llava_row(inp, b, KINDS), "atp",
                                      {"checkpoint": atp_checkpoint}, GEN, VISUAL_IDS, atol=ATOL)
    inputs = _inputs(model, seed=2)
    with vlmprune.pruned(model, "atp", checkpoint=atp_checkpoint) as h:
        cached = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        assert any(c[-1] < c[0] for c in h.stats.module_counts)  # it prunes
        uncached = model.generate(**inputs, **GEN, use_cache=False, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=ATOL, rtol=0)
    assert _is_stock(model)


def test_errors_are_one_clear_line(model):
    for call, pattern in [
        (lambda: vlmprune.apply(model, "prumerge+", frame_cls="no"), r"frame_cls must be 'keep' or 'drop'"),
        (lambda: vlmprune.apply(model, "sequential", keep=17), r"keep=17 is more than the 16 visual tokens"),
    ]:
        with pytest.raises(ValueError, match=pattern) as err:
            call()
        assert "\n" not in str(err.value)
        assert _is_stock(model)
    inputs = _inputs(model, kinds=["video"])
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"][0]  # frames without the video axis
    with vlmprune.pruned(model, "sequential", keep=4):
        with pytest.raises(ValueError, match=r"pixel_values_videos must be \[videos, frames, 3, H, W\]") as err:
            model(**inputs)
    assert "\n" not in str(err.value)


def test_support_listed():
    listed = {m["name"]: m["families"] for m in vlmprune.list_methods()}
    scores = {m["name"]: m.get("scores") for m in vlmprune.list_methods()}
    for name in ("random", "sequential", "spatial", "cls-topk", "prumerge", "prumerge+", "fastv", "sparsevlm", "atp"):
        assert listed[name]["video-llava"] == "yes"
    assert scores["prumerge"]["video-llava"].startswith("[CLS] attention")
