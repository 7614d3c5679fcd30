"""LLaVA-NeXT (any-res) on a tiny random model: the equivalence guarantees of both stages.

keep-all == stock logits and tokens, packing == the stock packing restricted to the kept
patches, a ragged batch (different image sizes, so different crop and token counts) == single
samples, cached generate == uncached, remove() restores exactly, sdpa stays on, the newline
rule, and the support listing (ATP's own tests: ``test_atp_families.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import vlmprune
from conftest import (assert_beam_batch_equals_singles, assert_ragged_batch_equals_singles, make_next_inputs, make_tiny_llava_next, module_hooks,
                      next_image_tokens, warm_up)
from vlmprune.integrations.base import get_adapter
from vlmprune.integrations.handle import HANDLE_ATTR

# (H, W) per sample: 1x2 crops (one mosaic row survives unpadding), 2x2, 2x1, 1x2 (columns cut)
SIZES = [(20, 90), (90, 90), (90, 40), (42, 42)]
PREFIX, SUFFIX = (3, 1, 2, 4), (2, 5, 1, 3)
GEN = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def model():
    m = make_tiny_llava_next()
    return warm_up(m, _inputs(m, n=1))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _inputs(model, n=4, seed=1):
    return make_next_inputs(model, SIZES[:n], PREFIX[:n], SUFFIX[:n], seed=seed)


def _row(inputs, b):
    valid = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b:b + 1, valid],
            "attention_mask": inputs["attention_mask"][b:b + 1, valid], "pixel_values": inputs["pixel_values"][b:b + 1], "image_sizes": inputs["image_sizes"][b:b + 1]}


def _is_stock(model) -> bool:
    adapter = get_adapter(model)
    q, k = adapter.get_last_qk(model)
    base = adapter.base_model(model)
    return (getattr(model, HANDLE_ATTR, None) is None and not model._forward_pre_hooks and not q._forward_hooks
            and not k._forward_hooks and not base._forward_pre_hooks and "get_image_features" not in vars(base)
            and module_hooks(model) == model._test_stock_hooks)


def test_layout_counts_match_stock_packing(model):
    adapter = get_adapter(model)
    assert adapter.family == "llava-next"
    inputs = _inputs(model)
    layout = adapter.image_layout(model, inputs["pixel_values"], inputs["image_sizes"])
    assert list(layout.tokens_per_image) == next_image_tokens(model, SIZES) == [16, 51, 33, 24]
    assert [sum(u.image == i for u in layout.units) for i in range(4)] == [3, 5, 3, 3]  # base + crops
    assert {u.grid for u in layout.units} == {(3, 3)} and all(u.has_cls for u in layout.units)
    assert [u.crop for u in layout.units if u.image == 1] == [0, 1, 2, 3, 4]
    assert adapter.fixed_image_tokens(model) is None and adapter.budget_tokens(model, "vision") == 9
    assert adapter.budget_tokens(model, "decoder") == 9 + 6 * 7
    with pytest.raises(ValueError, match="image_sizes"):
        adapter.image_layout(model, inputs["pixel_values"])


KEEP_ALL = [
    ("sequential", {"keep": 1.0}),
    ("random", {"keep": 1.0}),
    ("cls-topk", {"keep": 9, "order": "spatial"}),
    ("spatial", {"keep": 9}),
    ("prumerge", {"keep": 9, "k_neighbors": 0, "order": "spatial"}),
    ("prumerge+", {"keep": 9, "k_neighbors": 0, "order": "spatial"}),
]


@pytest.mark.parametrize("method,options", KEEP_ALL)
def test_keep_all_gives_identical_logits_and_tokens(model, method, options):
    inputs = _inputs(model)
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, **GEN)
    with vlmprune.pruned(model, method, **options) as handle:
        assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, **GEN), ref_gen)
        assert handle.stats.last_kept == [16, 51, 33, 24] and handle.stats.mean_kept_ratio == 1.0
    assert _is_stock(model)


@pytest.mark.parametrize("newlines", ["keep", "rows"])
def test_packing_is_the_stock_packing_of_the_kept_patches(model, newlines):
    """sequential keep=k keeps patches 0..k-1 of every crop: the packed tokens are exactly the stock
    tokens of those patches (plus the newline rule), in stock order."""
    inputs = _inputs(model)
    stock = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    adapter = get_adapter(model).configure(newlines=newlines)
    k = 2  # patches (0, 0) and (0, 1) of each 3x3 crop: crop rows 1 and 2 lose every token
    handle = vlmprune.apply(model, "sequential", keep=k, newlines=newlines)
    try:
        assert handle.adapter.newlines == newlines
        ours = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    finally:
        handle.remove()
    layout = adapter.image_layout(model, inputs["pixel_values"], inputs["image_sizes"])
    for i, (full, mine, m) in enumerate(zip(stock.pooler_output, ours.pooler_output, layout.family_data)):
        kept = mine[~torch.isnan(mine).all(-1)]
        assert torch.isnan(mine[kept.shape[0]:]).all()
        # the kept rows are a subsequence of the stock rows (each patch row occurs once in the stock rows)
        j = 0
        for row in kept:
            while j < full.shape[0] and not torch.equal(full[j], row):
                j += 1
            assert j < full.shape[0], f"image {i}: a kept row is not in the stock packing, in order"
            j += 1
        # expected: k base patches, the mosaic cells in crop row 0 with column < k, the newlines
        win = m.window
        mosaic_cols = m.gw * 3
        r, c = win // mosaic_cols, win % mosaic_cols
        cell_kept = ((r % 3) * 3 + c % 3) < k
        newline_rows = win.shape[0] if newlines == "keep" else int(cell_kept.any(1).sum())
        assert kept.shape[0] == k + int(cell_kept.sum()) + newline_rows, i
    assert _is_stock(model)


@pytest.mark.parametrize("method,options", [("prumerge+", {}), ("cls-topk", {"keep": 4}), ("spatial", {"keep": 0.5}),
                                            ("fastv", {"k": 1, "count": 10}), ("sparsevlm", {})])
def test_ragged_batch_equals_single_samples(model, method, options):
    assert_ragged_batch_equals_singles(model, _inputs(model), _row, method, options, GEN)


@pytest.mark.parametrize("method,options", [("prumerge", {}), ("random", {"keep": 3, "seed": 2}),
                                            ("fastv", {"k": 1, "count": 10}), ("sparsevlm", {})])
def test_cached_generate_equals_uncached(model, method, options):
    inputs = _inputs(model, n=3, seed=2)
    with vlmprune.pruned(model, method, **options):
        cached = model.generate(**inputs, **GEN)
        uncached = model.generate(**inputs, **GEN, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("method", ["prumerge+", "fastv"])
def test_remove_restores_exactly_and_sdpa_stays(model, method):
    inputs = _inputs(model)
    state = copy.deepcopy(model.state_dict())
    ref = model(**inputs).logits
    impl = lambda: (model.config._attn_implementation, model.config.text_config._attn_implementation,  # noqa: E731
                    model.config.vision_config._attn_implementation)
    assert impl() == ("sdpa",) * 3
    handle = vlmprune.apply(model, method)
    assert model(**inputs).logits.shape[1] < ref.shape[1]
    model.generate(**inputs, **GEN)
    assert impl() == ("sdpa",) * 3
    handle.remove()
    assert _is_stock(model) and impl() == ("sdpa",) * 3
    assert torch.equal(model(**inputs).logits, ref)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_budget_is_per_crop(model):
    with pytest.raises(ValueError, match="keep=10 is more than the 9"):
        vlmprune.apply(model, "sequential", keep=10)
    inputs = _inputs(model)
    with vlmprune.pruned(model, "sequential", keep=9) as handle:  # every patch of every crop
        model(**inputs)
        assert handle.stats.last_kept == [16, 51, 33, 24]


def test_family_options_and_support_listed():
    listed = {m["name"]: m["families"] for m in vlmprune.list_methods()}
    assert listed["prumerge+"]["llava"] == "yes" and listed["prumerge+"]["llava-next"] == "yes"
    assert listed["atp"]["llava"] == "yes" and listed["atp"]["llava-next"] == "yes"
    next_model = make_tiny_llava_next(text_layers=2, vision_layers=2)
    with pytest.raises(ValueError, match="newlines must be 'keep' or 'rows', got 'all'"):
        vlmprune.apply(next_model, "prumerge", newlines="all")
    assert getattr(next_model, HANDLE_ATTR, None) is None


@pytest.mark.parametrize("method", ["prumerge+", "fastv"])
def test_beam_search_batch_equals_single(model, method):
    inputs = _inputs(model, n=3)
    beams = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    assert_beam_batch_equals_singles(model, inputs, _row, method, {}, beams)
