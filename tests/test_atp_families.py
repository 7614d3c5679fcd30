"""ATP on LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL (tiny random models): the grids and the equivalences.

The adapters' grids (NeXT: base image + unpadded mosaic, newlines on no grid; Qwen: the merged
grid read from M-RoPE); keep-all thresholds == the unpruned model; a ragged batch (different
image sizes, so different grids and counts) == single samples; cached generate == uncached;
remove() restores exactly with sdpa on; survivors keep their unpruned positions (Qwen: the
get_rope_index 3-D positions); the off-grid and per-sample threshold options; soft mode with
masks of one == the unpruned model; and ``vlmprune train atp``'s training step on synthetic batches,
saved, reloaded by ``atp:checkpoint=DIR`` and run with generate.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vlmprune
from atp_helpers import set_constant_thresholds
from conftest import (assert_beam_batch_equals_singles, assert_remove_restores_and_sdpa_stays, EOS_ID, IMAGE_TOKEN_ID, QWEN_VIDEO_ID, QWEN_VISION_START, assert_ragged_batch_equals_singles,
                      assert_mixed_batch_equals_singles, make_next_inputs, make_qwen_inputs, make_qwen_mixed_inputs,
                      join_samples, make_qwen_multi_inputs, make_tiny_llava_next, make_tiny_qwen2_vl, module_hooks, qwen_mixed_row, qwen_multi_row, qwen_row, warm_up)
from vlmprune.integrations.atp import attach_atp
from vlmprune.integrations.base import get_adapter
from vlmprune.integrations.handle import HANDLE_ATTR
from vlmprune.methods.atp import ATPConfig, ATPPruner
from vlmprune.methods.atp.budget import fixed_ratio_counts

NEXT_SIZES = [(20, 90), (90, 90), (90, 40), (42, 42)]
QWEN_GRIDS = [(4, 4), (4, 6), (8, 4), (6, 6)]
PREFIX, SUFFIX = (3, 1, 2, 4), (2, 5, 1, 3)
QWEN_GEN = dict(max_new_tokens=4, do_sample=False,
                suppress_tokens=[IMAGE_TOKEN_ID, QWEN_VIDEO_ID, QWEN_VISION_START, EOS_ID])
NEXT_GEN = dict(max_new_tokens=4, do_sample=False)
ATOL = 2e-5
FAMILIES = ["llava_next", "qwen2_vl", "qwen2_5_vl"]


def _inputs(model, n=4, seed=1):
    if model._test_family == "llava_next":
        return make_next_inputs(model, NEXT_SIZES[:n], PREFIX[:n], SUFFIX[:n], seed=seed)
    return make_qwen_inputs(QWEN_GRIDS[:n], PREFIX[:n], SUFFIX[:n], seed=seed)


def _row(inputs, b):
    if "image_sizes" not in inputs:
        return qwen_row(inputs, b)
    valid = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b:b + 1, valid], "attention_mask": inputs["attention_mask"][b:b + 1, valid],
            "pixel_values": inputs["pixel_values"][b:b + 1], "image_sizes": inputs["image_sizes"][b:b + 1]}


def _gen(model):
    return NEXT_GEN if model._test_family == "llava_next" else QWEN_GEN


def _tiny_model(family):
    m = make_tiny_llava_next() if family == "llava_next" else make_tiny_qwen2_vl(family=family)
    m._test_family = family
    return warm_up(m, _inputs(m, n=1))


def _saved_pruning(model, tmp_path_factory) -> str:
    """``_pruning``'s thresholds saved as a checkpoint folder (``atp:checkpoint=DIR``)."""
    d = tmp_path_factory.mktemp(f"atp-{model._test_family}")
    _pruning(model).save(d)
    return str(d)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return _tiny_model(request.param)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _is_stock(model) -> bool:
    return getattr(model, HANDLE_ATTR, None) is None and module_hooks(model) == model._test_stock_hooks


def _pruner(model, *, theta_r=None, theta_s=None, seed=0, **kw) -> ATPPruner:
    """A pruner on the adapter's grid with constant per-module thresholds (head weights zeroed)."""
    adapter = get_adapter(model)
    grid = adapter.patch_grid(model)
    layers = len(adapter.get_decoder_layers(model))
    torch.manual_seed(seed)
    cfg = ATPConfig(num_layers=layers, layers=(0, 1, 2), num_patches=grid[0] * grid[1], grid=grid, hidden=16, **kw)
    return set_constant_thresholds(ATPPruner(cfg), theta_r, theta_s)


def _pruning(model, **kw) -> ATPPruner:
    """Thresholds that keep a content-dependent number of tokens per unit."""
    return _pruner(model, theta_r=(0.8, 0.85, 0.9), theta_s=0.99, **kw)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return _saved_pruning(model, tmp_path_factory)


# ------------------------------------------------------------------------------------------ grids


def test_grid_layout_units_and_patches(model):
    """NeXT: per image the base grid (first N placeholders) and the unpadded mosaic (H' x W',
    newlines on no grid); Qwen: the merged grid of each image, placeholder j at patch j."""
    adapter = get_adapter(model)
    inputs = _inputs(model)
    ids = inputs["input_ids"]
    visual = adapter.visual_columns(model, ids)
    seen = {}
    lm = adapter.get_language_model(model)
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    model(**inputs)
    hook.remove()
    layout = adapter.lm_layout(model, visual, seen.get("position_ids"))
    images = {k: inputs.get(k) for k in ("pixel_values", "image_sizes", "image_grid_thw")}
    lay = adapter.grid_layout(model, layout, seen["inputs_embeds"], images)
    if model._test_family == "llava_next":
        mosaics = adapter.image_layout(model, inputs["pixel_values"], inputs["image_sizes"]).family_data
        expect = []
        for i, m in enumerate(mosaics):
            expect.append((i, (3, 3)))
            if m.crops > 1:
                expect.append((i, tuple(m.window.shape)))
        assert [(u.image, u.grid) for u in lay.units] == expect
        for b in range(4):
            cols = torch.nonzero(visual[b]).flatten()
            unit, patch = lay.grid_unit[b, cols], lay.grid_patch[b, cols]
            u0 = int(unit[0])
            assert torch.equal(unit[:9], torch.full((9,), u0)) and torch.equal(patch[:9], torch.arange(9))
            h, w = lay.units[u0 + 1].grid
            rest_u, rest_p = unit[9:].view(h, w + 1), patch[9:].view(h, w + 1)
            assert (rest_u[:, w] == -1).all() and (rest_p[:, w] == -1).all()  # the newline of each row
            assert (rest_u[:, :w] == u0 + 1).all() and torch.equal(rest_p[:, :w].flatten(), torch.arange(h * w))
            newline = model.model.image_newline
            x = seen["inputs_embeds"][b, cols[9:]].view(h, w + 1, -1)
            assert (x[:, w] == newline).all() and not (x[:, :w] == newline).all(-1).any()
    else:
        assert [(u.image, u.grid) for u in lay.units] == [(i, (h // 2, w // 2)) for i, (h, w) in enumerate(QWEN_GRIDS)]
        for b, (h, w) in enumerate(QWEN_GRIDS):
            cols = torch.nonzero(visual[b]).flatten()
            assert torch.equal(lay.grid_unit[b, cols], torch.full((h * w // 4,), b))
            assert torch.equal(lay.grid_patch[b, cols], torch.arange(h * w // 4))
    assert (lay.grid_unit[~visual] == -1).all()


# ------------------------------------------------------------------------------------------ equivalences


def test_keep_all_thresholds_give_the_unpruned_model(model):
    inputs = _inputs(model)
    gen = _gen(model)
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, **gen)
    counts = get_adapter(model).visual_columns(model, inputs["input_ids"]).sum(1).tolist()
    pr = _pruner(model, theta_r=-0.99, theta_s=0.99)  # every S_r >= 0 > theta_r
    with attach_atp(model, pr) as handle:
        assert torch.equal(model(**inputs).logits, ref)
        assert handle.stats.module_counts == [[c] * 3 for c in counts]
        assert torch.equal(model.generate(**inputs, **gen), ref_gen)
    with pytest.warns(UserWarning, match="nothing is pruned"), vlmprune.pruned(model, "atp"):  # untrained
        assert torch.equal(model(**inputs).logits, ref)
    assert _is_stock(model)


def test_ragged_batch_equals_single_samples(model, checkpoint):
    assert_ragged_batch_equals_singles(model, _inputs(model), _row, "atp", {"checkpoint": checkpoint}, _gen(model),
                                       atol=ATOL)


@pytest.mark.parametrize("options", [{}, {"thresholds": "sample", "off_grid": "score"}])
def test_cached_generate_equals_uncached(model, checkpoint, options):
    inputs = _inputs(model, n=3, seed=2)
    gen = _gen(model)
    with vlmprune.pruned(model, "atp", checkpoint=checkpoint, **options) as h:
        cached = model.generate(**inputs, **gen, return_dict_in_generate=True, output_logits=True)
        assert any(c[-1] < c[0] for c in h.stats.module_counts)  # it prunes
        uncached = model.generate(**inputs, **gen, use_cache=False, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), atol=ATOL, rtol=0)


def test_beam_search_batch_equals_single(model, checkpoint):
    """Beams: generate() expands the encoded images; each sample's beams prune as its single run."""
    inputs = _inputs(model, n=3)
    beams = {**_gen(model), "max_new_tokens": 3, "num_beams": 2}
    assert_beam_batch_equals_singles(model, inputs, _row, "atp", {"checkpoint": checkpoint}, beams)


def test_remove_restores_exactly_and_sdpa_stays(model, checkpoint, monkeypatch):
    assert_remove_restores_and_sdpa_stays(model, _inputs(model), "atp", {"checkpoint": checkpoint}, monkeypatch, _is_stock,
                                          _gen(model))



def test_survivors_keep_their_unpruned_positions(model, checkpoint):
    """Every pruned layout's positions are the survivors' own (Qwen: get_rope_index's [3, B, L];
    NeXT: generate's 1-D positions from the mask); decoding continues after the unpruned maximum."""
    inputs = _inputs(model)
    seen = []
    lm = get_adapter(model).get_language_model(model)
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("position_ids")), with_kwargs=True)
    try:
        with vlmprune.pruned(model, "atp", checkpoint=checkpoint) as h:
            model.generate(**inputs, **_gen(model))
            root = h.state.segments[0].positions
            pruned = [seg for seg in h.state.segments if not seg.identity]
            assert pruned
            for seg in pruned:
                expect = root.gather(-1, seg.source.clamp(min=0).expand(*root.shape[:-2], -1, -1))
                assert torch.equal(seg.positions[..., seg.valid], expect[..., seg.valid])
    finally:
        hook.remove()
    mask = inputs["attention_mask"]
    if model._test_family == "llava_next":
        assert torch.equal(root[mask.bool()], (mask.cumsum(1) - 1)[mask.bool()])
        top = root[:, -1]
    else:
        full, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
        assert torch.equal(root[:, mask.bool()], full[:, mask.bool()])
        top = full.amax((0, 2))
    for step, pos in enumerate(seen[1:]):  # decode steps
        assert torch.equal(pos[..., -1].reshape(-1, pos.shape[-2])[-1], top + 1 + step)


def test_grid_options(model):
    """off_grid="keep" keeps every NeXT newline; "score" lets S_r drop them; thresholds="sample"
    gives one threshold per sample (its units share it), "unit" one per unit."""
    inputs = _inputs(model)
    high = dict(theta_r=(0.85, 0.9, 0.95), theta_s=0.99)
    for off_grid in ("keep", "score"):
        pr = _pruner(model, off_grid=off_grid, **high)
        with attach_atp(model, pr) as h:
            model(**inputs)
            seg = h.state.segments[-1]
            lay = h.state.layout
            src = seg.source.clamp(min=0)
            alive_off = (lay.grid_unit.gather(1, src) < 0) & seg.visual
            total_off = (lay.grid_unit < 0) & lay.visual
            if off_grid == "keep":
                assert torch.equal(alive_off.sum(1), total_off.sum(1))
            elif model._test_family == "llava_next":
                assert int(alive_off.sum()) < int(total_off.sum())
    for per in ("unit", "sample"):
        pr = _pruner(model, thresholds=per, seed=3)
        for mod in pr.atp.values():  # thresholds that depend on the MLP input
            mod.head_r.weight.normal_(0, 1.0)
        steps, orig = [], pr.hard_step
        pr.hard_step = lambda *a, **k: steps.append(orig(*a, **k)) or steps[-1]
        with attach_atp(model, pr) as h:
            model(**inputs)
            units = len(h.state.layout.units)
            ctx = h.state.context
        groups = units if per == "unit" else 4
        assert [s.thresholds.theta_r.shape for s in steps] == [(groups,)] * 3
        assert len(ctx.thresholds) == 3 and ctx.thresholds[0].theta_r.shape == (4,)  # stats: per sample
        if per == "unit" and units > 4:  # NeXT: the units of a sample get their own thresholds
            assert len(set(steps[0].thresholds.theta_r.tolist())) > 4
    assert _is_stock(model)


def test_soft_masks_of_one_equal_the_unpruned_model(model):
    inputs = _inputs(model)
    real = inputs["attention_mask"].bool()
    ref = model(**inputs).logits
    pr = _pruner(model, init_theta_r=-0.99, tau=0.005)
    with attach_atp(model, pr, mode="soft") as handle:
        out = model(**inputs).logits
        ctx = handle.state.context
        assert handle.state.segments[-1].soft is not None and len(ctx.counts) == 3
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def _two_image_batch(model):
    """A left-padded batch of two samples: sample 0 holds two images, sample 1 one (the first three
    sizes / grids of this file); -> (batch, row(batch, b))."""
    if model._test_family == "llava_next":
        return join_samples(_inputs(model, n=3), [2, 1])
    samples = [QWEN_GRIDS[:2], QWEN_GRIDS[2:3]]
    return make_qwen_multi_inputs(samples, PREFIX[:2], SUFFIX[:2]), lambda inp, b: qwen_multi_row(inp, b, samples)


def test_a_sample_with_two_images_is_pruned_per_unit(model, checkpoint):
    """A sample holding two images: its units are both images' units (per-unit thresholds); keep-all
    thresholds give the stock model; fixed ratio r keeps round(judged * r^k) of the sample's judged
    tokens after module k (newlines on no grid stay); a batch [two images, one image] with
    content-dependent thresholds == each sample alone."""
    batch, row = _two_image_batch(model)
    ref = model(**batch).logits
    visual = get_adapter(model).visual_columns(model, batch["input_ids"])
    counts = visual.sum(1).tolist()
    with attach_atp(model, _pruner(model, theta_r=-0.99, theta_s=0.99)) as handle:
        assert torch.equal(model(**batch).logits, ref)
        assert handle.stats.module_counts == [[c] * 3 for c in counts]
        ctx_units = handle.state.context.unit_sample.tolist()
    per_image = 2 if model._test_family == "llava_next" else 1  # NeXT: base image + mosaic (these sizes have both)
    assert ctx_units == [0] * (2 * per_image) + [1] * per_image
    with vlmprune.pruned(model, "atp", fixed_ratio=0.5) as handle:
        model(**batch)
        judged = handle.state.context.judged0
        off = [c - j for c, j in zip(counts, judged)]  # NeXT's newlines (off_grid="keep"), else 0
        expect = [[n + o for n in fixed_ratio_counts(0.5, 3, j)] for j, o in zip(judged, off)]
        assert handle.stats.module_counts == expect
    assert_ragged_batch_equals_singles(model, batch, row, "atp", {"checkpoint": checkpoint}, _gen(model), atol=ATOL)
    assert _is_stock(model)


def test_bad_atp_options_are_refused(model):
    with pytest.raises(ValueError, match="thresholds must be one of unit, sample"):
        vlmprune.apply(model, "atp", fixed_ratio=0.5, thresholds="image")
    assert _is_stock(model)


# ------------------------------------------------------------------------------------------ Qwen videos

#: a 2-slice video, an image, a 3-slice video ((t, h, w) patches; one visual input per sample)
QWEN_VIDEO_ITEMS = [(2, 4, 4), (1, 4, 6), (3, 4, 6)]


def _qwen_video_inputs(model):
    return make_qwen_mixed_inputs(QWEN_VIDEO_ITEMS, (3, 1, 2), (2, 5, 1))


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen_model(request):
    return _tiny_model(request.param)


@pytest.fixture(scope="module")
def qwen_checkpoint(qwen_model, tmp_path_factory):
    return _saved_pruning(qwen_model, tmp_path_factory)


def test_qwen_video_grids_are_one_unit_per_slice(qwen_model):
    """Videos: every temporal slice of a video is a unit on its merged grid, slice s's j-th
    placeholder at patch j; the image between the videos keeps its own unit (runs in prompt order)."""
    model = qwen_model
    adapter = get_adapter(model)
    inputs = _qwen_video_inputs(model)
    visual = adapter.visual_columns(model, inputs["input_ids"])
    seen = {}
    hook = adapter.get_language_model(model).register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    model(**inputs)
    hook.remove()
    layout = adapter.lm_layout(model, visual, seen.get("position_ids"))
    names = ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    lay = adapter.grid_layout(model, layout, seen["inputs_embeds"], {k: inputs.get(k) for k in names})
    expect, first = [], []
    for i, (t, h, w) in enumerate(QWEN_VIDEO_ITEMS):
        first.append(len(expect))
        expect += [(i, (h // 2, w // 2), f) for f in range(t)]
    assert [(u.image, u.grid, u.crop) for u in lay.units] == expect
    for b, (t, h, w) in enumerate(QWEN_VIDEO_ITEMS):
        cols = torch.nonzero(visual[b]).flatten()
        n = h * w // 4
        assert torch.equal(lay.grid_unit[b, cols], first[b] + torch.arange(t).repeat_interleave(n))
        assert torch.equal(lay.grid_patch[b, cols], torch.arange(n).repeat(t))
    assert (lay.grid_unit[~visual] == -1).all()
    # the image keywords without the video ones: the videos' placeholders are not accounted for
    with pytest.raises(ValueError, match="placeholders"):
        adapter.grid_layout(model, layout, seen["inputs_embeds"],
                            {k: inputs.get(k) for k in ("input_ids", "pixel_values", "image_grid_thw")})


def test_qwen_video_ragged_batch_equals_single_samples(qwen_model, qwen_checkpoint):
    """ATP with content-dependent thresholds on a batch of videos and an image (different slice
    counts and grids) == each sample alone: tokens, logits and visual counts."""
    model = qwen_model
    assert_mixed_batch_equals_singles(model, _qwen_video_inputs(model), lambda inp, b: qwen_mixed_row(inp, b, QWEN_VIDEO_ITEMS),
                                      "atp", {"checkpoint": qwen_checkpoint}, QWEN_GEN, [IMAGE_TOKEN_ID, QWEN_VIDEO_ID],
                                      atol=ATOL)


# ------------------------------------------------------------------------------------------ training plumbing


def _training_batch(model, seed):
    """Synthetic training batch: labels on the suffix tokens, instruction = the suffix's first token."""
    inputs = _inputs(model, seed=seed)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    instruction = torch.zeros_like(ids, dtype=torch.bool)
    instruction[:, -3] = True
    return {**inputs, "labels": labels, "instruction": instruction}


def test_training_steps_save_reload_and_generate(model, tmp_path):
    """ATPTrainStep (the step `vlmprune train atp` runs) on synthetic batches of this family: the
    budget moves the thresholds, the saved modules reload by checkpoint=DIR and prune in generate
    exactly as the in-memory pruner does."""
    from vlmprune.train.atp import ATPTrainConfig, ATPTrainStep, build_pruner

    adapter = get_adapter(model)
    grid = adapter.patch_grid(model)
    n = grid[0] * grid[1]
    cfg = ATPTrainConfig(target=0.6 * n, hidden=16, tau=0.1, seed=0)
    pruner = build_pruner(cfg, len(adapter.get_decoder_layers(model)), n, grid)
    before = copy.deepcopy(pruner.state_dict())
    for p in model.parameters():
        p.requires_grad_(False)
    handle = attach_atp(model, pruner, mode="soft", tau=cfg.tau)
    step = ATPTrainStep(model, pruner, handle, lambda_range=1.0)
    opt = torch.optim.AdamW(pruner.parameters(), lr=1e-2)
    with torch.enable_grad(), handle:
        for i in range(3):
            batch = _training_batch(model, seed=10 + i)
            loss, parts = step(**batch, mu=0.1)
            assert torch.isfinite(loss) and parts.shape[0] == 5 + len(pruner.layers)
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pruner.parameters())
            opt.step()
    assert any(not torch.equal(v, pruner.state_dict()[k]) for k, v in before.items())
    pruner.save(tmp_path)
    inputs = _inputs(model, n=3, seed=5)
    gen = _gen(model)
    with attach_atp(model, pruner) as h:
        mine = model.generate(**inputs, **gen)
        counts = h.stats.module_counts
    with vlmprune.pruned(model, "atp", checkpoint=str(tmp_path)) as h:
        loaded = model.generate(**inputs, **gen)
        assert h.stats.module_counts == counts
    assert torch.equal(mine, loaded)
    assert _is_stock(model)
