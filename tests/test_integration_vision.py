"""Vision-stage integration on a tiny random LLaVA: equivalence tests, not golden values.

keep-all == stock, remove() restores exactly, cached generate == uncached, batch == single,
sdpa stays on, stats, clear errors, and the hooked PruMerge signals == the spec's formula.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import vlmprune
from conftest import IMAGE_TOKEN_ID, PAD_ID, make_inputs, make_tiny_llava
from vlmprune.integrations.base import UnsupportedModelError, get_adapter
from vlmprune.integrations.handle import HANDLE_ATTR
from vlmprune.integrations.vision import image_token_counts, signals_from_qk
from vlmprune.methods.prumerge import prumerge

# prefix / suffix lengths of a left-padded batch of three prompts
PREFIX, SUFFIX = (3, 6, 1), (5, 2, 4)
GEN = dict(max_new_tokens=5, do_sample=False)


@pytest.fixture(scope="module")
def model():
    """16 patches per image (56 px / 14)."""
    return make_tiny_llava(image_size=56)


@pytest.fixture(scope="module")
def model36():
    """36 patches per image; with these inputs PruMerge keeps different counts per image."""
    return make_tiny_llava(image_size=84)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _logits(model, inputs):
    return model(**inputs).logits


def _row(inputs, b):
    """Sample b of a left-padded batch, without its padding."""
    valid = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b:b + 1, valid], "attention_mask": inputs["attention_mask"][b:b + 1, valid],
            "pixel_values": inputs["pixel_values"][b:b + 1]}


def _is_stock(model) -> bool:
    q, k = get_adapter(model).get_last_qk(model)
    return (getattr(model, HANDLE_ATTR, None) is None and not model._forward_pre_hooks and not q._forward_hooks
            and not k._forward_hooks and "forward" not in vars(model)
            and "get_image_features" not in vars(get_adapter(model).base_model(model)))


# ----------------------------------------------------------------------------- keep-all / remove


@pytest.mark.parametrize("method,options", [
    ("sequential", {"keep": 1.0}),
    ("sequential", {"keep": 16}),
    ("random", {"keep": 1.0}),
    ("cls-topk", {"keep": 16, "order": "spatial"}),
    ("spatial", {"keep": 16}),
    ("prumerge", {"keep": 16, "k_neighbors": 0, "order": "spatial"}),
    ("prumerge+", {"keep": 16, "k_neighbors": 0, "order": "spatial"}),
])
def test_keep_all_gives_identical_logits_and_tokens(model, method, options):
    inputs = make_inputs(model, PREFIX, SUFFIX)
    ref = _logits(model, inputs)
    ref_gen = model.generate(**inputs, **GEN)
    with vlmprune.pruned(model, method, **options) as handle:
        out = _logits(model, inputs)
        gen = model.generate(**inputs, **GEN)
        assert handle.stats.last_kept == [16, 16, 16]
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)
    assert _is_stock(model)


def test_keep_all_with_cls_kept_and_two_images_per_sample():
    """select strategy "full" (N+1 tokens incl. [CLS]) and two placeholder runs in one prompt."""
    m = make_tiny_llava(image_size=56)
    m.config.vision_feature_select_strategy = "full"
    m.config.image_seq_length = 17
    inputs = make_inputs(m, (2, 4), (3, 1))
    # a second image in sample 1: append another run of 17 placeholders (+ one text token)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    more = torch.tensor([[7] + [IMAGE_TOKEN_ID] * 17 + [9]] * 2)
    ids, mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    pixels = torch.cat([inputs["pixel_values"], torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(5))])
    pixels = pixels[[0, 2, 1, 3]]  # images in placeholder order: sample 0 (two), then sample 1 (two)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    ref = _logits(m, inputs)
    with vlmprune.pruned(m, "sequential", keep=1.0) as handle:
        assert torch.equal(_logits(m, inputs), ref)
        assert handle.stats.last_kept == [17] * 4 and handle.stats.tokens_per_image == 17
    with vlmprune.pruned(m, "sequential", keep=5) as handle:
        out = _logits(m, inputs)
        assert out.shape[1] == ids.shape[1] - 2 * 12 and handle.stats.last_kept == [5] * 4


def test_remove_restores_identical_logits_and_stock_model(model):
    inputs = make_inputs(model, PREFIX, SUFFIX)
    state = copy.deepcopy(model.state_dict())
    ref = _logits(model, inputs)
    assert _is_stock(model)
    handle = vlmprune.apply(model, "prumerge+")
    pruned_logits = _logits(model, inputs)
    assert pruned_logits.shape[1] < ref.shape[1]
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.active and _is_stock(model)
    assert torch.equal(_logits(model, inputs), ref)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert vlmprune.remove(model) is False
    vlmprune.apply(model, "prumerge")
    assert vlmprune.remove(model) is True and _is_stock(model)


def test_apply_twice_raises(model):
    with vlmprune.pruned(model, "prumerge"):
        with pytest.raises(RuntimeError, match="already pruned with 'prumerge'.*remove"):
            vlmprune.apply(model, "random")
    assert _is_stock(model)


def test_pruned_context_manager_removes_even_on_error(model):
    inputs = make_inputs(model, PREFIX, SUFFIX)
    ref = _logits(model, inputs)
    with pytest.raises(KeyError):
        with vlmprune.pruned(model, "spatial", keep=4) as handle:
            assert getattr(model, HANDLE_ATTR) is handle and handle.method == "spatial"
            assert _logits(model, inputs).shape[1] == ref.shape[1] - 12
            raise KeyError("boom")
    assert _is_stock(model) and torch.equal(_logits(model, inputs), ref)


# ----------------------------------------------------------------------------- generate


@pytest.mark.parametrize("method,options", [("prumerge", {}), ("prumerge+", {}), ("cls-topk", {}),
                                            ("random", {"keep": 5, "seed": 3}), ("spatial", {"keep": 0.25})])
def test_cached_generate_equals_uncached(model36, method, options):
    inputs = make_inputs(model36, PREFIX, SUFFIX)
    with vlmprune.pruned(model36, method, **options) as handle:
        cached = model36.generate(**inputs, max_new_tokens=8, do_sample=False)
        uncached = model36.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
        assert handle.stats.last_kept
    assert torch.equal(cached, uncached)
    # sequences are in the caller's coordinates: the original prompt, then the new tokens
    assert torch.equal(cached[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("method", ["prumerge", "prumerge+"])
def test_batch_equals_single_with_different_counts(model36, method):
    inputs = make_inputs(model36, PREFIX, SUFFIX)
    with vlmprune.pruned(model36, method) as handle:
        batch_logits = _logits(model36, inputs)[:, -1]
        batch_counts = handle.stats.last_kept
        assert len(set(batch_counts)) > 1, "the test needs images with different kept counts"
        out = model36.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        width = inputs["input_ids"].shape[1]
        for b in range(len(PREFIX)):
            single = _row(inputs, b)
            torch.testing.assert_close(_logits(model36, single)[0, -1], batch_logits[b], atol=1e-5, rtol=1e-5)
            assert handle.stats.last_kept == [batch_counts[b]]
            one = model36.generate(**single, **GEN, return_dict_in_generate=True, output_logits=True)
            assert torch.equal(one.sequences[0, single["input_ids"].shape[1]:], out.sequences[b, width:])
            for step_b, step_1 in zip(out.logits, one.logits):
                torch.testing.assert_close(step_1[0], step_b[b], atol=1e-5, rtol=1e-5)


def test_batch_equals_single_when_generate_drops_an_all_ones_mask(model36):
    """Equal prompt lengths: generate() drops the all-ones mask, yet the new left pads must stay masked."""
    inputs = make_inputs(model36, (3, 3, 3), (4, 4, 4))
    with vlmprune.pruned(model36, "prumerge+") as handle:
        out = model36.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], **GEN)
        counts = handle.stats.last_kept
        assert len(set(counts)) > 1
        for b in range(3):
            one = model36.generate(input_ids=inputs["input_ids"][b:b + 1], pixel_values=inputs["pixel_values"][b:b + 1],
                                   **GEN)
            assert torch.equal(one[0], out[b])


def test_text_only_generate_after_pruned_generate_is_stock(model):
    inputs = make_inputs(model, PREFIX, SUFFIX)
    text = {"input_ids": torch.tensor([[PAD_ID, 1, 5, 6], [1, 7, 8, 9]]),
            "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}
    ref = model.generate(**text, **GEN)
    with vlmprune.pruned(model, "prumerge") as handle:
        model.generate(**inputs, **GEN)
        assert handle.plan is not None
        assert torch.equal(model.generate(**text, **GEN), ref)
        assert handle.plan is None


def test_beam_search_batch_equals_single_and_positional_call(model36):
    """Beam search expands the pre-encoded (NaN-padded) features by placeholder counting."""
    inputs = make_inputs(model36, PREFIX, SUFFIX)
    beam = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    width = inputs["input_ids"].shape[1]
    with vlmprune.pruned(model36, "prumerge+") as handle:
        out = model36.generate(**inputs, **beam)
        assert len(handle.stats.last_kept) == 3 and handle.plan.keep.shape[0] == 6
        for b in range(3):
            single = _row(inputs, b)
            one = model36.generate(**single, **beam)
            assert torch.equal(one[:, single["input_ids"].shape[1]:], out[2 * b:2 * b + 2, width:])
        by_name = _logits(model36, inputs)
        positional = model36(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]).logits
        assert torch.equal(by_name, positional)


def test_labels_are_rewritten_with_the_sequence(model36):
    inputs = make_inputs(model36, PREFIX, SUFFIX)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    ref = model36(**inputs, labels=labels)
    with vlmprune.pruned(model36, "sequential", keep=1.0):
        assert torch.equal(model36(**inputs, labels=labels).loss, ref.loss)
    with vlmprune.pruned(model36, "prumerge"):
        out = model36(**inputs, labels=labels)
        assert math.isfinite(float(out.loss)) and out.logits.shape[:2] == out.logits.shape[:2]


# ----------------------------------------------------------------------------- sdpa, stats


def test_sdpa_stays_on(model):
    inputs = make_inputs(model, PREFIX, SUFFIX)
    before = (model.config._attn_implementation, model.config.text_config._attn_implementation,
              model.config.vision_config._attn_implementation)
    assert before == ("sdpa", "sdpa", "sdpa")
    with vlmprune.pruned(model, "prumerge+"):
        _logits(model, inputs)
        model.generate(**inputs, **GEN)
        during = (model.config._attn_implementation, model.config.text_config._attn_implementation,
                  model.config.vision_config._attn_implementation)
    assert during == before
    assert (model.config._attn_implementation, model.config.text_config._attn_implementation,
            model.config.vision_config._attn_implementation) == before


def test_stats_match_what_the_llm_receives(model36):
    inputs = make_inputs(model36, PREFIX, SUFFIX)
    seen = {}
    lm = get_adapter(model36).get_language_model(model36)
    hook = lm.register_forward_pre_hook(
        lambda mod, args, kw: seen.setdefault("shape", kw["inputs_embeds"].shape) and None, with_kwargs=True)
    try:
        with vlmprune.pruned(model36, "prumerge+") as handle:
            assert handle.stats.tokens_per_image == 36 and math.isnan(handle.stats.mean_visual_tokens)
            _logits(model36, inputs)
            counts = handle.last_reduction.counts.tolist()
            assert handle.stats.last_kept == counts == handle.stats.kept_per_image
            assert handle.stats.prefills == 1 and handle.stats.images == 3
            assert handle.stats.mean_visual_tokens == pytest.approx(sum(counts) / 3)
            assert handle.stats.mean_kept_ratio == pytest.approx(sum(counts) / 3 / 36)
            lengths = [p + 1 + c + s for p, c, s in zip(PREFIX, counts, SUFFIX)]
            assert seen["shape"][1] == max(lengths)
            # each sample's placeholder run now holds exactly its own count
            plan = handle.plan
            ph = inputs["input_ids"] == IMAGE_TOKEN_ID
            assert (plan.keep & ph).sum(1).tolist() == counts
            assert plan.new_mask.sum(1).tolist() == lengths
            _logits(model36, inputs)
            assert handle.stats.prefills == 2 and handle.stats.kept_per_image == counts * 2
            handle.stats.reset()
            assert handle.stats.images == 0
    finally:
        hook.remove()


# ----------------------------------------------------------------------------- signals


def test_hooked_signals_equal_naive_eager_formula(model36):
    """Spec §1: q, k of the LAST layer (input: penultimate hidden state); one softmax over all heads."""
    inputs = make_inputs(model36, PREFIX, SUFFIX)
    tower = model36.model.vision_tower
    hs = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    last = tower.encoder.layers[-1]
    x = last.layer_norm1(hs[-2])  # [B, 1+N, C]: the last layer's attention input
    q, k = last.self_attn.q_proj(x), last.self_attn.k_proj(x)
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)  # the full (1+N)^2 matrix
    naive_a, naive_keys, feats = attn[:, 0, 1:], k[:, 1:], hs[-2][:, 1:]
    expected = prumerge(naive_a, naive_keys, feats, plus=True)

    captured = {}
    with vlmprune.pruned(model36, "prumerge+") as handle:
        q_proj, k_proj = last.self_attn.q_proj, last.self_attn.k_proj
        h1 = q_proj.register_forward_hook(lambda m, i, o: captured.setdefault("q", o))
        h2 = k_proj.register_forward_hook(lambda m, i, o: captured.setdefault("k", o))
        try:
            _logits(model36, inputs)
        finally:
            h1.remove(), h2.remove()
        red = handle.last_reduction
    assert not q_proj._forward_hooks and not k_proj._forward_hooks  # capture hooks are per call
    signals = signals_from_qk(captured["q"][:, :1], captured["k"])
    torch.testing.assert_close(signals.cls_attn, naive_a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(signals.keys, naive_keys)
    assert torch.equal(red.counts, expected.counts) and torch.equal(red.indices, expected.indices)
    torch.testing.assert_close(red.tokens, expected.tokens, atol=1e-5, rtol=1e-5)


def test_no_signal_hooks_for_methods_that_do_not_need_them(model):
    inputs = make_inputs(model, PREFIX, SUFFIX)
    q_proj, k_proj = get_adapter(model).get_last_qk(model)
    calls = []
    real = q_proj.register_forward_hook
    q_proj.register_forward_hook = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with vlmprune.pruned(model, "sequential", keep=4):
            _logits(model, inputs)
        assert calls == []
        with vlmprune.pruned(model, "cls-topk"):
            _logits(model, inputs)
        assert calls == [1]
    finally:
        del q_proj.register_forward_hook


# ----------------------------------------------------------------------------- errors


def test_bad_options_and_budgets(model):
    with pytest.raises(ValueError, match="unknown pruning method 'prumerge-'.*prumerge\\+"):
        vlmprune.apply(model, "prumerge-")
    with pytest.raises(ValueError, match="has no option.*budget.*k_neighbors"):
        vlmprune.apply(model, "prumerge", budget=4)
    with pytest.raises(ValueError, match="keep = -3 keeps no token"):
        vlmprune.apply(model, "random", keep=-3)
    with pytest.raises(ValueError, match="sequential: keep=17 is more than the 16 visual tokens"):
        vlmprune.apply(model, "sequential", keep=17)
    with pytest.raises(ValueError, match="cls-topk: keep=40 is more than the 16 visual tokens"):
        vlmprune.apply(model, "cls-topk", keep=40)
    with pytest.raises(ValueError, match="not a ratio in \\(0, 1\\]"):
        vlmprune.apply(model, "spatial", keep=1.5)
    with pytest.raises(ValueError, match="k_neighbors must be an int >= 0"):
        vlmprune.apply(model, "prumerge+", k_neighbors=-1)
    assert _is_stock(model)


def test_cls_methods_need_a_cls_token():
    full = make_tiny_llava(image_size=56)
    full.config.vision_feature_select_strategy = "full"
    for method in ("prumerge", "prumerge+", "cls-topk"):
        with pytest.raises(ValueError, match=r"select_strategy='full'.*\[CLS\]"):
            vlmprune.apply(full, method)
    with pytest.raises(ValueError, match="needs the 4x4 patch grid"):
        vlmprune.apply(full, "spatial", keep=4)
    assert _is_stock(full)

    # a per-call override to "full" is caught at the forward
    m = make_tiny_llava(image_size=56)
    inputs = make_inputs(m, PREFIX, SUFFIX)
    with vlmprune.pruned(m, "prumerge"):
        with pytest.raises(ValueError, match=r"\[CLS\]"):
            m(**inputs, vision_feature_select_strategy="full")


def test_tower_without_cls_is_refused_for_cls_methods():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=56, patch_size=14)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, pad_token_id=PAD_ID)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-1,
                      vision_feature_select_strategy="full", image_seq_length=16)
    m = LlavaForConditionalGeneration(cfg).eval()
    for method in ("prumerge", "prumerge+", "cls-topk"):
        with pytest.raises(ValueError, match=r"no \[CLS\] token"):
            vlmprune.apply(m, method)
    inputs = make_inputs(m, (2,), (3,))
    ref = m(**inputs).logits
    with vlmprune.pruned(m, "spatial", keep=1.0) as handle:  # the grid methods work on a CLS-free tower
        assert torch.equal(m(**inputs).logits, ref) and handle.stats.tokens_per_image == 16


def test_unsupported_model_family():
    with pytest.raises(UnsupportedModelError, match="does not support Linear.*llava"):
        vlmprune.apply(torch.nn.Linear(2, 2), "random")


def test_get_image_features_returns_nan_padded_kept_tokens(model36):
    inputs = make_inputs(model36, PREFIX, SUFFIX)
    stock = model36.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    with vlmprune.pruned(model36, "sequential", keep=10) as handle:
        feats = model36.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        assert image_token_counts(feats) == [10, 10, 10] == handle.stats.last_kept
        for f, s in zip(feats, stock):
            assert f.shape == s.shape and torch.isnan(f[10:]).all()
            torch.testing.assert_close(f[:10], s[:10])
        # pre-encoded features passed by the caller go through the same rewrite
        direct = _logits(model36, inputs)
        pre = model36(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      mm_encoder_outputs={"image": model36.model.get_image_features(
                          pixel_values=inputs["pixel_values"])}).logits
        assert torch.equal(direct, pre)


def test_apply_to_the_base_llava_model(model):
    inputs = make_inputs(model, PREFIX, SUFFIX)
    base = model.model
    ref = base(**inputs).last_hidden_state
    with vlmprune.pruned(base, "sequential", keep=1.0):
        assert torch.equal(base(**inputs).last_hidden_state, ref)
    with vlmprune.pruned(base, "prumerge") as handle:
        assert base(**inputs).last_hidden_state.shape[1] < ref.shape[1] and handle.stats.images == 3
    assert _is_stock(base)
