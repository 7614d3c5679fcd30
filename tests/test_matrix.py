"""The support matrix: every method on every model family, the same guarantees, batched.

Each (family, method) cell runs on a tiny random model of the family built in code, on a
left-padded batch of prompts of different lengths (and, where the family allows, different image
sizes / crop counts / grids, so samples keep different visual counts):

* ``keep_all``  -- a keep-everything setting of the method gives the stock logits exactly (methods
  without such a setting, e.g. SparseVLM's fixed schedules, have no cell);
* ``batch``     -- greedy ``generate`` on the batch gives every sample the tokens and logits of its own
  single-sample run, and the same visual count;
* ``cache``     -- cached ``generate`` == uncached ``generate``;
* ``remove``    -- ``remove()`` restores the stock model (same logits, no hook left) and sdpa stays on.

A method a family refuses is tested for its one-line refusal instead. ``scripts/support_matrix.py``
runs this file and writes the README's matrix from its outcomes.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import vlmprune
from conftest import (IMAGE_TOKEN_ID, PAD_ID, QWEN_VIDEO_ID, QWEN_VISION_END, QWEN_VISION_START, VIDEO_ID,
                      join_samples, make_inputs, make_next_inputs, make_onevision_inputs, make_onevision_multi_inputs,
                      make_qwen_inputs, make_qwen_mixed_inputs, make_qwen_multi_inputs, make_tiny_llava,
                      make_tiny_llava_next, make_tiny_llava_onevision, make_tiny_qwen2_vl, make_tiny_video_llava,
                      make_video_llava_inputs, module_hooks, onevision_multi_row, onevision_row, qwen_mixed_row,
                      qwen_multi_row, qwen_row, video_llava_row, visual_kept_per_sample, warm_up)
from vlmprune.integrations.base import get_adapter
from vlmprune.integrations.handle import HANDLE_ATTR

# random weights may emit a placeholder id, which a re-encoding step would take for an image slot
GEN = dict(max_new_tokens=4, do_sample=False, suppress_tokens=sorted({IMAGE_TOKEN_ID, QWEN_VIDEO_ID, VIDEO_ID,
                                                                       QWEN_VISION_START, QWEN_VISION_END}))
VISUAL_IDS = sorted({IMAGE_TOKEN_ID, QWEN_VIDEO_ID, VIDEO_ID})
ATOL = 2e-5


def _llava_row(inputs, b):
    valid = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b:b + 1, valid], "attention_mask": inputs["attention_mask"][b:b + 1, valid],
            "pixel_values": inputs["pixel_values"][b:b + 1],
            **({"image_sizes": inputs["image_sizes"][b:b + 1]} if "image_sizes" in inputs else {})}


def _llava():
    m = make_tiny_llava(text_layers=4)
    return m, make_inputs(m, prefix_lens=(3, 1, 5), suffix_lens=(5, 8, 2), seed=3), _llava_row


def _llava_next():
    m = make_tiny_llava_next()
    return m, make_next_inputs(m, [(20, 90), (90, 90), (90, 40)], (3, 1, 2), (2, 5, 1)), _llava_row


def _qwen(family):
    def build():
        m = make_tiny_qwen2_vl(family=family)
        return m, make_qwen_inputs([(4, 4), (8, 4), (6, 6)], (2, 4, 1), (3, 1, 5)), qwen_row
    return build


def _qwen_video(family):
    items = [(2, 4, 4), (1, 4, 6), (3, 4, 6)]  # a 2-slice video, an image, a 3-slice video

    def build():
        m = make_tiny_qwen2_vl(family=family)
        return m, make_qwen_mixed_inputs(items, (2, 4, 1), (3, 1, 5)), lambda inp, b: qwen_mixed_row(inp, b, items)
    return build


def _llava_multi():
    m = make_tiny_llava(text_layers=4)
    return (m, *join_samples(make_inputs(m, prefix_lens=(3, 1, 5, 2, 4, 1), suffix_lens=(5, 8, 2, 3, 1, 2), seed=3),
                             [2, 1, 3]))


def _llava_next_multi():
    m = make_tiny_llava_next()
    sizes = [(20, 90), (90, 90), (90, 40), (42, 42), (90, 90), (40, 90)]
    return m, *join_samples(make_next_inputs(m, sizes, (3, 1, 2, 1, 2, 1), (2, 5, 1, 1, 2, 3)), [2, 1, 3])


def _qwen_multi(family):
    samples = [[(4, 4), (6, 4)], [(8, 4)], [(4, 6), (4, 4), (6, 6)]]  # image grids per sample

    def build():
        m = make_tiny_qwen2_vl(family=family)
        return (m, make_qwen_multi_inputs(samples, (2, 4, 1), (3, 1, 5)),
                lambda inp, b: qwen_multi_row(inp, b, samples))
    return build


def _video_llava_multi():
    m = make_tiny_video_llava()
    return m, *join_samples(make_video_llava_inputs(m, ["image"] * 6, (3, 1, 2, 1, 2, 1), (2, 5, 1, 1, 2, 3)),
                            [2, 1, 3])


def _onevision_multi():
    samples = [[(20, 90), (90, 90)], [(90, 40)], [(42, 42), (90, 90), (40, 90)]]  # 2, 1 (any-res) and 3 images
    m = make_tiny_llava_onevision()
    return (m, make_onevision_multi_inputs(m, samples, (3, 1, 2), (2, 5, 1)),
            lambda inp, b: onevision_multi_row(inp, b, samples))


def _video_llava():
    kinds = ["video", "image", "video"]
    m = make_tiny_video_llava()
    return (m, make_video_llava_inputs(m, kinds, (3, 1, 5), (5, 8, 2)),
            lambda inp, b: video_llava_row(inp, b, kinds))


def _onevision(items):
    def build():
        m = make_tiny_llava_onevision()
        return m, make_onevision_inputs(m, items, (3, 1, 2), (2, 5, 1)), lambda inp, b: onevision_row(inp, b, items)
    return build


#: family name (as the adapters call it; "+video": the family's video inputs, batched with images;
#: "+multi": samples holding different numbers of images)
#: -> builder of (model, ragged batch, row(inputs, b))
FAMILIES = {"llava-1.5": _llava, "llava-1.5+multi": _llava_multi, "llava-next": _llava_next,
            "llava-next+multi": _llava_next_multi, "qwen2-vl": _qwen("qwen2_vl"),
            "qwen2.5-vl": _qwen("qwen2_5_vl"), "qwen2-vl+multi": _qwen_multi("qwen2_vl"),
            "qwen2.5-vl+multi": _qwen_multi("qwen2_5_vl"), "video-llava+multi": _video_llava_multi,
            "qwen2-vl+video": _qwen_video("qwen2_vl"),
            "qwen2.5-vl+video": _qwen_video("qwen2_5_vl"), "video-llava+video": _video_llava,
            "llava-onevision": _onevision([(20, 90), (90, 90), (90, 40)]),  # resized, resized, plain mosaics
            "llava-onevision+multi": _onevision_multi,
            "llava-onevision+video": _onevision(["video", (90, 90), "video"])}

#: method -> (options that prune, options that keep everything or None)
METHODS = {
    "random": ({"keep": 0.5, "seed": 2}, {"keep": 1.0}),
    "sequential": ({"keep": 0.5}, {"keep": 1.0}),
    "spatial": ({"keep": 0.5}, {"keep": 1.0}),
    "cls-topk": ({"keep": 0.5}, {"keep": 1.0, "order": "spatial"}),
    "prumerge": ({}, {"keep": 1.0, "k_neighbors": 0, "order": "spatial"}),
    "prumerge+": ({}, {"keep": 1.0, "k_neighbors": 0, "order": "spatial"}),
    "fastv": ({"k": 1, "drop_ratio": 0.5}, {"k": 1, "drop_ratio": 0.0}),
    "sparsevlm": ({}, None),
    "atp": ({"fixed_ratio": 0.5}, {"fixed_ratio": 1.0}),
}
GUARANTEES = ("keep_all", "batch", "cache", "remove")
#: (method, guarantee) pairs that do not apply, with the reason the matrix prints
NOT_APPLICABLE = {("random", "batch"): "a seeded draw over the whole batch: a sample's draw depends on its batchmates",
                  ("sparsevlm", "keep_all"): "no keep-everything setting (fixed v1.5 schedules)"}

_MODELS: dict[str, tuple] = {}


def _family(name):
    if name not in _MODELS:
        model, inputs, row = FAMILIES[name]()
        warm_up(model, inputs)  # the whole batch: every modality path adds its stock hooks once
        _MODELS[name] = (model, inputs, row)
    return _MODELS[name]


def _kept(handle, input_ids):
    """Visual tokens per sample at the last prefill: the LLM's input (vision stage) or the all-layer
    average (decoder stage)."""
    if handle.stage == "decoder":
        return handle.stats.visual_tokens_per_sample()
    return visual_kept_per_sample(handle, input_ids, VISUAL_IDS)


def _apply(model, method, opts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # untrained-module notices
        return vlmprune.apply(model, method, **opts)


def _is_stock(model) -> bool:
    return getattr(model, HANDLE_ATTR, None) is None and module_hooks(model) == model._test_stock_hooks


#: (family, method) cells refused for the family's inputs rather than the family (a one-line error at the prefill)
INPUT_REFUSALS: dict[tuple[str, str], str] = {}


def _refusal(model, method):
    return get_adapter(model).method_problem(method)


CELLS = [(f, m, g) for f in FAMILIES for m in METHODS for g in GUARANTEES if (m, g) not in NOT_APPLICABLE]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("family,method,guarantee", CELLS, ids=["|".join(c) for c in CELLS])
def test_cell(family, method, guarantee):
    model, inputs, row = _family(family)
    if (family, method) in INPUT_REFUSALS:
        handle = _apply(model, method, dict(METHODS[method][0]))
        try:
            with pytest.raises(ValueError) as err:
                model(**inputs)
        finally:
            handle.remove()
        assert "\n" not in str(err.value)
        assert _is_stock(model)
        pytest.skip(f"refused: {INPUT_REFUSALS[family, method]}")
    if problem := _refusal(model, method):
        with pytest.raises(ValueError) as err:
            _apply(model, method, dict(METHODS[method][0]))
        msg = str(err.value)
        assert "\n" not in msg and method in msg and problem in msg
        assert _is_stock(model)
        pytest.skip(f"refused: {problem}")
    prune, keep_all = METHODS[method]
    if guarantee == "keep_all":
        _check_keep_all(model, inputs, method, dict(keep_all))
    elif guarantee == "batch":
        _check_batch(model, inputs, row, method, dict(prune))
    elif guarantee == "cache":
        _check_cache(model, inputs, method, dict(prune))
    else:
        _check_remove(model, inputs, method, dict(prune))


def _check_keep_all(model, inputs, method, opts):
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, **GEN)
    handle = _apply(model, method, opts)
    try:
        torch.testing.assert_close(model(**inputs).logits, ref, atol=ATOL, rtol=0)
        assert torch.equal(model.generate(**inputs, **GEN), ref_gen)
    finally:
        handle.remove()


def _check_batch(model, inputs, row, method, opts):
    width = inputs["input_ids"].shape[1]
    handle = _apply(model, method, opts)
    try:
        model(**inputs)
        counts = _kept(handle, inputs["input_ids"])
        out = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        placeholders = torch.isin(inputs["input_ids"], torch.tensor(VISUAL_IDS)).sum(1).tolist()
        assert len(counts) == len(placeholders) and all(c <= n for c, n in zip(counts, placeholders)), counts
        assert any(c < n for c, n in zip(counts, placeholders)), counts  # something was pruned
        for b in range(len(counts)):
            one_in = row(inputs, b)
            model(**one_in)
            assert _kept(handle, one_in["input_ids"]) == pytest.approx([counts[b]])
            one = model.generate(**one_in, **GEN, return_dict_in_generate=True, output_logits=True)
            new = one.sequences[0, one_in["input_ids"].shape[1]:]  # may stop early at EOS
            assert torch.equal(new, out.sequences[b, width:width + new.numel()])
            assert (out.sequences[b, width + new.numel():] == PAD_ID).all()
            for step_b, step_1 in zip(out.logits, one.logits):
                torch.testing.assert_close(step_1[0], step_b[b], atol=ATOL, rtol=1e-5)
    finally:
        handle.remove()


def _check_cache(model, inputs, method, opts):
    handle = _apply(model, method, opts)
    try:
        cached = model.generate(**inputs, **GEN, use_cache=True, return_dict_in_generate=True, output_logits=True)
        uncached = model.generate(**inputs, **GEN, use_cache=False, return_dict_in_generate=True, output_logits=True)
    finally:
        handle.remove()
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


def _check_remove(model, inputs, method, opts):
    ref = model(**inputs).logits
    handle = _apply(model, method, opts)
    assert model.config._attn_implementation == "sdpa"
    pruned = model(**inputs).logits
    handle.remove()
    assert _is_stock(model) and model.config._attn_implementation == "sdpa"
    assert torch.equal(model(**inputs).logits, ref)
    assert pruned.shape[0] == ref.shape[0]
