"""Decoder-stage machinery: equivalence tests on tiny random LLaVAs (sdpa, batches, KV cache, positions)."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from vlmprune.integrations.compat import output_cache
from vlmprune.integrations.base import get_adapter
from vlmprune.integrations.handle import HANDLE_ATTR
from vlmprune.integrations.decoder import Decision, DecoderMethodBase, attach, attention_row_sums, attention_rows
from vlmprune.methods.common import pack_mask
from vlmprune.methods.fastv import row_scores, topk_visual

from conftest import make_inputs, make_tiny_llava

ATOL = 2e-5


class _Info:
    def __init__(self, name):
        self.name = name
        self.stage = "decoder"


class RaggedMethod(DecoderMethodBase):
    """Test method: at each point keep the top-k visual tokens by last-row attention, k = 1 + the
    number of text tokens after the image, at most half the current ones (a content-dependent,
    per-sample count, so batches are ragged)."""

    name = "ragged-test"

    def __init__(self, points=(1, 3), positions="original"):
        self.points = list(points)
        self.positions = positions
        self.seen = []

    def prune_layers(self, num_layers):
        return self.points

    def score_rows(self, view):
        rows = view.last[:, None]
        return rows, torch.ones_like(rows, dtype=torch.bool)

    def select(self, view, attn):
        self.seen.append(attn)
        k = torch.minimum(1 + (view.after_image & view.prompt).sum(1), view.visual.sum(1) // 2)
        return Decision(keep=topk_visual(attn[:, 0], view.visual, k))


class SoftMethod(DecoderMethodBase):
    """Test method: a soft keep-mask (no hard pruning) at one point."""

    name = "soft-test"

    def __init__(self, value_fn, point=1):
        self.value_fn, self.point = value_fn, point

    def prune_layers(self, num_layers):
        return [self.point]

    def select(self, view, attn):
        return Decision(soft=self.value_fn(view))


def _attach(model, method):
    return attach(model, get_adapter(model), _Info(method.name), method)


def _lm_embeds(model, inputs):
    """The language model's input embeddings for ``inputs`` (unpruned model)."""
    seen = {}
    lm = model.model.language_model
    h = lm.register_forward_pre_hook(lambda m, a, k: seen.update(x=k["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    h.remove()
    return seen["x"]


def _gen(model, inputs, n=4, **kw):
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llava(image_size=56, text_layers=4)


def _hook_counts(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ------------------------------------------------------------------------------------------ exactness


def test_keep_all_reproduces_unpruned_exactly(model):
    inputs = make_inputs(model, prefix_lens=(2, 5), suffix_lens=(6, 1))
    with torch.no_grad():
        ref = model(**inputs).logits
        seq_ref, lg_ref = _gen(model, inputs)
        with vlmprune.pruned(model, "fastv", k=1, drop_ratio=0.0) as h:
            out = model(**inputs).logits
            seq, lg = _gen(model, inputs)
            assert h.stats.avg_visual_tokens == model.config.image_seq_length
    assert torch.equal(out, ref)
    assert torch.equal(seq, seq_ref) and torch.equal(lg, lg_ref)


def test_fastv_k0_equals_stock_model_on_prepruned_sequence(model):
    inputs = make_inputs(model, prefix_lens=(2, 5), suffix_lens=(6, 2))
    embeds = _lm_embeds(model, inputs)
    with torch.no_grad(), vlmprune.pruned(model, "fastv", k=0, count=5) as h:
        out = model(**inputs).logits
        src = h.state.final_source.clone()
        assert h.stats.visual_per_layer == [[5] * 4, [5] * 4]
    valid = src >= 0
    mask2d = inputs["attention_mask"]
    pos_full = (mask2d.cumsum(1) - 1).clamp(min=0)
    idx = src.clamp(min=0)
    x = embeds.gather(1, idx[:, :, None].expand(-1, -1, embeds.shape[-1]))
    pos = pos_full.gather(1, idx)
    with torch.no_grad():  # the untouched model, fed the kept tokens with their original (gapped) positions
        ref = model(inputs_embeds=x, attention_mask=valid.long(), position_ids=pos).logits
    assert (pos[:, 1:] - pos[:, :-1] > 1).any(), "positions should have gaps"
    torch.testing.assert_close(out[valid], ref[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,opts", [("fastv", {}), ("fastv", {"k": 1, "score": "all"}),
                                         ("sparsevlm", {}), ("sparsevlm", {"positions": "original"})])
def test_cached_generate_equals_uncached_repruning(method, opts):
    m = make_tiny_llava(image_size=84, text_layers=5, kv_heads=2, seed=3)
    inputs = make_inputs(m, prefix_lens=(2, 6), suffix_lens=(5, 2), seed=4)
    with torch.no_grad(), vlmprune.pruned(m, method, **opts) as h:
        seq_c, lg_c = _gen(m, inputs, n=5)
        before = h.stats.prefills
        seq_u, lg_u = _gen(m, inputs, n=5, use_cache=False)
        assert h.stats.prefills - before == 5  # re-pruned at every step
    torch.testing.assert_close(lg_c, lg_u, atol=ATOL, rtol=0)
    assert torch.equal(seq_c, seq_u)


def test_ragged_batch_equals_single_sample_runs(model):
    inputs = make_inputs(model, prefix_lens=(1, 6, 3), suffix_lens=(5, 2, 4), seed=7)
    with torch.no_grad():
        meth = RaggedMethod()
        h = _attach(model, meth)
        seq_b, lg_b = _gen(model, inputs, n=4)
        counts = h.stats.visual_per_layer
        singles = []
        for b in range(3):
            valid = inputs["attention_mask"][b].bool()
            one = {"input_ids": inputs["input_ids"][b:b + 1, valid], "pixel_values": inputs["pixel_values"][b:b + 1],
                   "attention_mask": inputs["attention_mask"][b:b + 1, valid]}
            seq, lg = _gen(model, one, n=4)
            singles.append((seq, lg, h.stats.visual_per_layer[0]))
        h.remove()
    assert len({tuple(c) for c in counts}) > 1, f"expected different kept counts per sample, got {counts}"
    for b, (seq, lg, c) in enumerate(singles):
        assert counts[b] == c
        torch.testing.assert_close(lg_b[b], lg[0], atol=ATOL, rtol=0)
        assert torch.equal(seq_b[b, -4:], seq[0, -4:])


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_ragged_cached_equals_uncached(model, positions):
    inputs = make_inputs(model, prefix_lens=(1, 6), suffix_lens=(5, 2), seed=8)
    with torch.no_grad():
        h = _attach(model, RaggedMethod(points=(0, 2), positions=positions))
        seq_c, lg_c = _gen(model, inputs, n=4)
        seq_u, lg_u = _gen(model, inputs, n=4, use_cache=False)
        h.remove()
    torch.testing.assert_close(lg_c, lg_u, atol=ATOL, rtol=0)
    assert torch.equal(seq_c, seq_u)


def test_kv_cache_has_per_layer_lengths(model):
    inputs = make_inputs(model, prefix_lens=(3,), suffix_lens=(4,))
    with torch.no_grad(), vlmprune.pruned(model, "fastv", k=2, count=4):
        out = model(**inputs, use_cache=True)
    n = inputs["input_ids"].shape[1]
    lengths = [output_cache(out).get_seq_length(i) for i in range(4)]
    assert lengths == [n, n, n - 12, n - 12]


# ------------------------------------------------------------------------------------------ scores


def test_attention_rows_match_eager_attention():
    eager = make_tiny_llava(image_size=56, text_layers=3, kv_heads=2, attn="eager", seed=5)
    sdpa = make_tiny_llava(image_size=56, text_layers=3, kv_heads=2, seed=5)
    inputs = make_inputs(sdpa, prefix_lens=(2, 5), suffix_lens=(6, 1), seed=2)
    with torch.no_grad():
        attns = eager(**inputs, output_attentions=True).attentions
        meth = RaggedMethod(points=(2,))
        h = _attach(sdpa, meth)
        sdpa(**inputs)
        h.remove()
    ref = attns[1][:, :, -1].float().mean(1)  # layer 1, last row, head mean: [B, L]
    torch.testing.assert_close(meth.seen[0][:, 0], ref, atol=1e-6, rtol=1e-5)


def test_attention_rows_multiple_rows_and_causality():
    torch.manual_seed(0)
    b, length, h, dh = 2, 7, 4, 8
    q, k = torch.randn(b, length, h * dh), torch.randn(b, length, 2 * dh)
    cos, sin = torch.ones(1, length, dh), torch.zeros(1, length, dh)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[1, :2] = False
    rows, rv = pack_mask(valid)
    a = attention_rows(q, k, rows, rv, cos, sin, valid, num_heads=h, num_kv_heads=2, head_dim=dh, scaling=dh ** -0.5,
                       chunk=3)
    assert a.shape == (b, length, length)
    for i in range(b):
        for r in range(int(rv[i].sum())):
            col = int(rows[i, r])
            assert torch.all(a[i, r, col + 1:] == 0) and torch.all(a[i, r, ~valid[i]] == 0)
            torch.testing.assert_close(a[i, r].sum(), torch.tensor(1.0))
    s = row_scores(a, rv)
    assert s.shape == (b, length)


@pytest.mark.parametrize("key_bias", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_row_sums_equal_reduced_rows(key_bias, kv_heads):
    torch.manual_seed(1)
    b, length, h, dh = 3, 9, 4, 8
    q, k = torch.randn(b, length, h * dh), torch.randn(b, length, kv_heads * dh)
    cos, sin = torch.randn(1, length, dh), torch.randn(1, length, dh)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[1, :3] = False  # left padding: padded rows count 0
    rows, rv = pack_mask(valid)
    weights = torch.rand(b, rows.shape[1], 2)
    bias = torch.randn(b, length) if key_bias else None
    kw = dict(num_heads=h, num_kv_heads=kv_heads, head_dim=dh, scaling=dh ** -0.5, key_bias=bias)
    a = attention_rows(q, k, rows, rv, cos, sin, valid, **kw)
    sums, own = attention_row_sums(q, k, rows, rv, weights, cos, sin, valid, chunk=4, **kw)
    torch.testing.assert_close(sums, torch.einsum("brg,brl->bgl", weights * rv[..., None], a))
    torch.testing.assert_close(own, a.gather(2, rows[..., None])[..., 0] * rv)
    assert torch.isfinite(sums).all() and torch.isfinite(own).all()
    # host bounds of the rows' columns: each chunk scores only the keys it can attend to (causal);
    # the exact bounds (column + 1) and looser ones give the same sums
    exact = [int(c) + 1 for c in torch.where(rv, rows, -1).amax(0)]
    for bounds in (exact, [min(length, e + 2) for e in exact]):
        sums_b, own_b = attention_row_sums(q, k, rows, rv, weights, cos, sin, valid, chunk=4,
                                           row_bounds=bounds, **kw)
        torch.testing.assert_close(sums_b, sums)
        torch.testing.assert_close(own_b, own)
    with pytest.raises(ValueError, match="one bound per row"):
        attention_row_sums(q, k, rows, rv, weights, cos, sin, valid, row_bounds=exact[:-1], **kw)


# ------------------------------------------------------------------------------------------ soft masks


def test_soft_mask_of_ones_is_near_unpruned(model):
    inputs = make_inputs(model, prefix_lens=(2, 5), suffix_lens=(6, 1))
    with torch.no_grad():
        ref = model(**inputs).logits
        h = _attach(model, SoftMethod(lambda v: torch.ones_like(v.visual, dtype=torch.float32)))
        out = model(**inputs).logits
        h.remove()
    assert out.shape == ref.shape
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=0)


def test_soft_mask_of_zeros_approximates_hard_pruning(model):
    inputs = make_inputs(model, prefix_lens=(2, 5), suffix_lens=(6, 1))

    def half(view):  # drop every other visual token (softly / hard)
        idx = torch.arange(view.visual.shape[1])
        return (view.visual & (idx % 2 == 0)[None]).float() + (~view.visual).float()

    class Hard(DecoderMethodBase):
        name = "hard-test"

        def prune_layers(self, n):
            return [1]

        def select(self, view, attn):
            return Decision(keep=half(view).bool())

    with torch.no_grad():
        h = _attach(model, SoftMethod(half))
        soft = model(**inputs).logits[:, -1]
        h.remove()
        h = _attach(model, Hard())
        hard = model(**inputs).logits[:, -1]
        h.remove()
    torch.testing.assert_close(soft, hard, atol=1e-4, rtol=0)


def test_soft_mask_is_differentiable(model):
    inputs = make_inputs(model, prefix_lens=(2,), suffix_lens=(3,))
    theta = torch.tensor(0.3, requires_grad=True)
    h = _attach(model, SoftMethod(lambda v: torch.sigmoid((torch.linspace(0, 1, v.visual.shape[1])[None] - theta) / 0.1)
                                  .expand(v.visual.shape)))
    loss = model(**inputs).logits[:, -1].logsumexp(-1).sum()
    loss.backward()
    h.remove()
    assert theta.grad is not None and torch.isfinite(theta.grad) and theta.grad != 0


# ------------------------------------------------------------------------------------------ model hygiene


def test_remove_restores_model_and_sdpa_stays(model, monkeypatch):
    inputs = make_inputs(model, prefix_lens=(2, 5), suffix_lens=(6, 1))
    hooks0 = _hook_counts(model)
    keys0 = list(model.state_dict())
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ref = model(**inputs).logits
        n_ref = len(calls)
        h = vlmprune.apply(model, "sparsevlm")
        assert getattr(model, HANDLE_ATTR) is h
        with pytest.raises(RuntimeError, match="already pruned"):
            vlmprune.apply(model, "fastv")
        calls.clear()
        model(**inputs)
        assert len(calls) == n_ref  # every layer still runs sdpa, once
        assert model.config._attn_implementation == "sdpa"
        assert model.config.text_config._attn_implementation == "sdpa"
        assert all(l.self_attn.config._attn_implementation == "sdpa" for l in model.model.language_model.layers)
        h.remove()
        h.remove()  # idempotent
        out = model(**inputs).logits
    assert not hasattr(model, HANDLE_ATTR)
    assert _hook_counts(model) == hooks0
    assert list(model.state_dict()) == keys0
    assert torch.equal(out, ref)


def test_text_only_forward_is_untouched(model):
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with vlmprune.pruned(model, "fastv"):
            out = model(input_ids=ids).logits
            seq = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        seq_ref = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref) and torch.equal(seq, seq_ref)


def test_stats_all_layer_average(model):
    inputs = make_inputs(model, prefix_lens=(2, 5), suffix_lens=(6, 1))
    with torch.no_grad(), vlmprune.pruned(model, "fastv", k=1, count=4) as h:
        model(**inputs)
    n = model.config.image_seq_length
    assert h.stats.visual_per_layer == [[n, 4, 4, 4]] * 2
    assert h.stats.avg_visual_tokens == pytest.approx((1 * n + 3 * 4) / 4)
    assert h.stats.visual_tokens_per_sample() == [pytest.approx((n + 12) / 4)] * 2
    assert h.stats.kept_at == {1: [4, 4]}
    assert h.stats.tokens_per_layer[0][0] - h.stats.tokens_per_layer[0][1] == n - 4


def test_prompt_ending_with_image_keeps_its_last_token(model):
    inputs = make_inputs(model, prefix_lens=(2, 4), suffix_lens=(0, 0), seed=9)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad(), vlmprune.pruned(model, "fastv", k=1, count=3) as h:
        seq_c, lg_c = _gen(model, inputs, n=3)
        model(**inputs)
        assert h.state.final_source[:, -1].tolist() == [n - 1, n - 1]
        assert int(h.state.segments[-1].shift.abs().sum()) == 0
        seq_u, lg_u = _gen(model, inputs, n=3, use_cache=False)
    torch.testing.assert_close(lg_c, lg_u, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,opts", [("fastv", {"k": 2, "count": 4}), ("sparsevlm", {"schedule": (12, 8, 4)}),
                                         ("sparsevlm", {"schedule": (12, 8, 4), "recycle": False})])
def test_segment_rotary_tables_equal_the_rotary_of_their_positions(model, method, opts):
    """A pruned layout's (cos, sin) -- gathered from the previous layout when positions are kept --
    are exactly the rotary embedding of its position ids."""
    inputs = make_inputs(model, prefix_lens=(1, 5), suffix_lens=(4, 2), seed=3)
    with torch.no_grad(), vlmprune.pruned(model, method, **opts) as h:
        model(**inputs, use_cache=True)
        rotary = model.model.language_model.rotary_emb
        pruned = [seg for seg in h.state.segments if not seg.identity]
        assert pruned
        for seg in pruned:
            cos, sin = rotary(torch.zeros(1, 1, 1), position_ids=seg.positions)
            assert torch.equal(seg.pos_emb[0].expand_as(cos), cos) and torch.equal(seg.pos_emb[1].expand_as(sin), sin)


def test_labels_are_gathered_like_the_logits(model):
    """``labels=`` under a decoder-stage method: the loss is over the kept tokens, with the labels
    gathered through ``final_source`` like the logits (keep-all: the unpruned loss exactly)."""
    import torch.nn.functional as F

    inputs = make_inputs(model, prefix_lens=(2, 5), suffix_lens=(6, 1))
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = model(**inputs, labels=labels).loss
        with vlmprune.pruned(model, "fastv", k=1, drop_ratio=0.0):
            assert torch.equal(model(**inputs, labels=labels).loss, ref)
        with vlmprune.pruned(model, "fastv", k=1, count=4) as h:
            out = model(**inputs, labels=labels)
            src = h.state.final_source
    assert out.logits.shape[1] == src.shape[1] < labels.shape[1]
    kept = labels.gather(1, src.clamp(min=0)).masked_fill(src < 0, -100)
    expect = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), kept[:, 1:].flatten(), ignore_index=-100)
    assert out.loss == pytest.approx(expect.item(), rel=1e-5)


def test_visual_tokens_per_sample_means_the_same_for_both_stages(model):
    inputs = make_inputs(model, prefix_lens=(2, 5), suffix_lens=(6, 1))
    n, layers = model.config.image_seq_length, model.config.text_config.num_hidden_layers
    with torch.no_grad(), vlmprune.pruned(model, "random", keep=4) as h:
        model(**inputs)
    assert h.stats.visual_tokens_per_sample() == [4.0, 4.0]
    assert h.stats.visual_tokens_per_layer() == [[4] * layers] * 2
    with torch.no_grad(), vlmprune.pruned(model, "fastv", k=1, count=4) as h:
        model(**inputs)
    assert h.stats.visual_tokens_per_layer() == [[n] + [4] * (layers - 1)] * 2
    assert h.stats.visual_tokens_per_sample() == [pytest.approx(sum([n] + [4] * (layers - 1)) / layers)] * 2
