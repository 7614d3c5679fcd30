"""ATP-LLaVA on the decoder machinery: equivalence tests on tiny random LLaVAs (soft and hard modes)."""

from __future__ import annotations


import pytest
import torch

import vlmprune
from vlmprune.methods.atp.budget import fixed_ratio_counts
from vlmprune.integrations.atp import ATPStats, attach_atp, build_atp
from vlmprune.methods.atp import ATPConfig, ATPPruner

from atp_helpers import set_constant_thresholds
from conftest import left_pad, make_inputs, make_tiny_llava

ATOL = 2e-5


@pytest.fixture(scope="module")
def model():
    return make_tiny_llava(text_layers=4)  # 16 patches (4 x 4), modules after layers (0, 1, 2)


def _pruner(model, *, layers=(0, 1, 2), theta_r=None, theta_s=None, seed=0, **kw) -> ATPPruner:
    """A pruner for ``model``; theta_r / theta_s: per-module constant thresholds (head weights zeroed)."""
    torch.manual_seed(seed)
    cfg = ATPConfig(num_layers=model.config.text_config.num_hidden_layers, layers=layers, num_patches=16,
                    hidden=16, **kw)
    return set_constant_thresholds(ATPPruner(cfg), theta_r, theta_s)


def _single(inputs, b):
    """Sample ``b`` of a ``make_inputs`` batch, unpadded."""
    m = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b:b + 1, m], "attention_mask": inputs["attention_mask"][b:b + 1, m],
            "pixel_values": inputs["pixel_values"][b:b + 1]}


def _pruning(model):
    """Thresholds that keep a content-dependent number of tokens per sample."""
    return _pruner(model, theta_r=(0.8, 0.85, 0.9), theta_s=0.9)


# ------------------------------------------------------------------------------------------ soft mode


def test_soft_masks_of_one_equal_the_unpruned_model(model):
    inputs = make_inputs(model, prefix_lens=(3, 1), suffix_lens=(5, 8))
    with torch.no_grad():
        ref = model(**inputs).logits
    pr = _pruner(model, init_theta_r=-0.99, tau=0.005)  # M = sigmoid((S_r + 0.99) / 0.005) == 1 in float32
    handle = attach_atp(model, pr, mode="soft")
    try:
        with torch.no_grad():
            out = model(**inputs).logits
        ctx = handle.state.context
        assert all(bool((m == 1).all()) for m in ctx.masks)
        assert len(ctx.counts) == 3 and all(torch.allclose(c, torch.full_like(c, 16.0)) for c in ctx.soft_counts)
        assert handle.state.segments[-1].soft is not None  # the soft path was really taken
    finally:
        handle.remove()
    real = inputs["attention_mask"].bool()  # (left-padding rows are garbage either way)
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)


def test_gradients_reach_every_threshold_mlp_through_the_llava_forward(model):
    inputs = make_inputs(model, prefix_lens=(3, 1), suffix_lens=(5, 8))
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    pr = _pruner(model, target=8.0)
    for p in model.parameters():
        p.requires_grad_(False)
    handle = attach_atp(model, pr, mode="soft", tau=0.1)
    try:
        out = model(**inputs, labels=labels)
        # the task loss alone reaches every module (through the log-masks in later layers' attention)
        task_grads = torch.autograd.grad(out.loss, [pr.atp[str(l)].fc.weight for l in pr.layers], retain_graph=True)
        assert all(float(g.abs().sum()) > 0 for g in task_grads)
        budget = pr.budget_loss(handle.state.context.counts)
        (out.loss + budget.total).backward()
    finally:
        handle.remove()
    for layer in pr.layers:
        mod = pr.atp[str(layer)]
        for name, p in mod.named_parameters():
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), (layer, name)
        assert float(mod.fc.weight.grad.abs().sum()) > 0 and float(mod.head_r.weight.grad.abs().sum()) > 0
    assert not any(p.grad is not None for p in model.parameters())  # the LLM stays frozen


def test_soft_mode_uses_the_given_instruction_rows(model):
    inputs = make_inputs(model, prefix_lens=(3,), suffix_lens=(6,))
    pr = _pruner(model, score="cross")
    instr = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    instr[0, -6:-3] = True  # 3 of the 6 text tokens after the image
    handle = attach_atp(model, pr, mode="soft")
    seen = []
    orig = handle.method_obj.score_rows
    handle.method_obj.score_rows = lambda view: seen.append(orig(view)) or seen[-1]
    try:
        with torch.no_grad(), handle.method_obj.instruction_rows(instr):
            model(**inputs)
        assert [int(v.sum()) for _, v, _ in seen] == [3, 3, 3]
        with torch.no_grad():
            model(**inputs)  # outside the context: every text token after the image
        assert int(seen[-1][1].sum()) == 6
        with pytest.raises(ValueError, match="instruction mask"), handle.method_obj.instruction_rows(instr[:, 1:]):
            model(**inputs)
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------ hard mode


def test_untrained_modules_keep_everything_exactly(model):
    inputs = make_inputs(model, prefix_lens=(3, 1), suffix_lens=(5, 8))
    with torch.no_grad():
        ref = model(**inputs).logits
    with pytest.warns(UserWarning, match="nothing is pruned"), vlmprune.pruned(model, "atp") as handle:
        with torch.no_grad():
            out = model(**inputs).logits
        assert handle.stats.module_counts == [[16, 16, 16], [16, 16, 16]]
    assert torch.equal(out, ref)


def test_a_keep_everything_module_changes_nothing(model):
    """Modules (0, 1, 2) with module 1 keeping all == modules (0, 2) with the same weights."""
    inputs = make_inputs(model, prefix_lens=(3, 1), suffix_lens=(5, 8))
    three = _pruner(model, theta_r=(0.8, -0.99, 0.9), theta_s=(0.9, 0.99, 0.9))
    two = _pruner(model, layers=(0, 2), theta_r=(0.8, 0.9), theta_s=0.9)
    for layer in (0, 2):
        two.atp[str(layer)].load_state_dict(three.atp[str(layer)].state_dict())
    outs, counts = [], []
    for pr in (three, two):
        with attach_atp(model, pr) as handle:
            with torch.no_grad():
                outs.append(model(**inputs).logits)
            counts.append(handle.stats.module_counts)
    c3, c2 = counts
    assert [r[1] for r in c3] == [r[0] for r in c3]  # module 1 kept every survivor
    assert [[r[0], r[2]] for r in c3] == c2
    assert any(r[0] < 16 for r in c2) and any(r[-1] < r[0] for r in c2)  # the others did prune
    assert outs[0].shape == outs[1].shape
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_batch_equals_single_samples_with_ragged_counts(model):
    pr = _pruning(model)
    inputs = make_inputs(model, prefix_lens=(3, 1, 5), suffix_lens=(5, 8, 2), seed=3)
    with attach_atp(model, pr) as handle:
        with torch.no_grad():
            batch = model(**inputs).logits[:, -1]
        counts = handle.stats.module_counts
        singles, single_counts = [], []
        for b in range(3):
            with torch.no_grad():
                singles.append(model(**_single(inputs, b)).logits[:, -1])
            single_counts += handle.stats.module_counts
    assert len({tuple(c) for c in counts}) > 1, counts  # samples keep different numbers of tokens
    assert counts == single_counts
    torch.testing.assert_close(batch, torch.cat(singles), atol=ATOL, rtol=0)


def test_stats_report_module_counts_and_the_all_layer_average(model):
    pr = _pruning(model)
    inputs = make_inputs(model, prefix_lens=(3, 1, 5), suffix_lens=(5, 8, 2), seed=3)
    with attach_atp(model, pr) as handle:
        with torch.no_grad():
            model(**inputs)
        st = handle.stats
        assert isinstance(st, ATPStats) and st.module_layers == [0, 1, 2]
        assert len(st.module_counts) == 3 and all(len(r) == 3 for r in st.module_counts)
        assert all(a >= b >= c >= 1 for a, b, c in st.module_counts)
        expected = pr.average_tokens(torch.tensor(st.module_counts, dtype=torch.float32)).tolist()
        assert st.atp_average == pytest.approx(expected)
        # the machinery's own layer-by-layer count agrees (what the eval harness reads)
        assert st.visual_tokens_per_sample() == pytest.approx(st.atp_average)
        assert st.visual_per_layer == [[16] + r for r in st.module_counts]
        assert st.kept_at == {1: [r[0] for r in st.module_counts], 2: [r[1] for r in st.module_counts],
                              3: [r[2] for r in st.module_counts]}
        assert st.theta_r is not None and len(st.theta_r[0]) == 3
        grids = handle.state.context.keep_grids
        assert [g.sum(1).tolist() for g in grids] == [list(c) for c in zip(*st.module_counts)]
        with torch.no_grad():
            model(**inputs)
        assert len(st.module_counts_per_image) == 6 and st.mean_atp_average == pytest.approx(sum(expected) / 3)


def test_cached_generation_equals_uncached(model):
    pr = _pruning(model)
    inputs = make_inputs(model, prefix_lens=(3, 1), suffix_lens=(5, 8), seed=5)
    with attach_atp(model, pr) as handle:
        with torch.no_grad():
            cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
            counts = handle.stats.module_counts
            uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
        assert handle.stats.module_counts == counts  # the continuation re-pruned exactly like the prefill
    assert any(c[-1] < 16 for c in counts)
    assert torch.equal(cached, uncached)


def test_fixed_ratio_mode_keeps_the_scheduled_counts(model):
    inputs = make_inputs(model, prefix_lens=(3, 1), suffix_lens=(5, 8))
    with vlmprune.pruned(model, "atp", fixed_ratio=0.5) as handle:
        with torch.no_grad():
            model(**inputs)
        assert handle.stats.module_counts == [[8, 4, 2], [8, 4, 2]]
    with vlmprune.pruned(model, "atp", fixed_target=9.0) as handle:
        with torch.no_grad():
            model(**inputs)
        assert handle.stats.atp_average[0] == pytest.approx(9.0, abs=1.0)


def test_save_and_load_round_trip(model, tmp_path):
    pr = _pruning(model)
    with torch.no_grad():  # give every weight a non-trivial value
        for p in pr.parameters():
            p.add_(0.01 * torch.randn_like(p))
    inputs = make_inputs(model, prefix_lens=(3, 1), suffix_lens=(5, 8), seed=7)
    with attach_atp(model, pr) as handle:
        with torch.no_grad():
            ref = model(**inputs).logits
        ref_counts = handle.stats.module_counts
    pr.save(tmp_path)
    with vlmprune.pruned(model, "atp", checkpoint=str(tmp_path)) as handle:
        with torch.no_grad():
            out = model(**inputs).logits
        assert handle.stats.module_counts == ref_counts
        for a, b in zip(handle.pruner.state_dict().values(), pr.state_dict().values()):
            assert torch.equal(a, b)
    assert torch.equal(out, ref)


def test_remove_restores_the_model(model):
    inputs = make_inputs(model, prefix_lens=(3, 1), suffix_lens=(5, 8))
    with torch.no_grad():
        ref = model(**inputs).logits
    handle = attach_atp(model, _pruning(model))
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


# ------------------------------------------------------------------------------------------ errors


def test_bad_checkpoints_and_options_give_clear_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vlmprune.apply(model, "atp", checkpoint=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not an ATP checkpoint"):
        vlmprune.apply(model, "atp", checkpoint=str(tmp_path))
    deep = ATPPruner(ATPConfig(num_layers=8, layers=(0, 2, 6), num_patches=16, hidden=8))
    deep.save(tmp_path / "deep")
    with pytest.raises(ValueError, match="beyond this model"):
        vlmprune.apply(model, "atp", checkpoint=str(tmp_path / "deep"))
    other = ATPPruner(ATPConfig(num_layers=6, layers=(0, 1), num_patches=16, hidden=8))
    other.save(tmp_path / "other")
    with pytest.raises(ValueError, match="6-layer decoder"):
        vlmprune.apply(model, "atp", checkpoint=str(tmp_path / "other"))
    big = ATPPruner(ATPConfig(num_layers=4, num_patches=576, hidden=8))
    big.save(tmp_path / "big")
    with pytest.raises(ValueError, match="576 visual tokens"):
        vlmprune.apply(model, "atp", checkpoint=str(tmp_path / "big"))
    small = ATPPruner(ATPConfig(num_layers=4, num_patches=16, hidden=8))
    small.save(tmp_path / "small")
    wrong = ATPPruner(ATPConfig(num_layers=4, num_patches=16, hidden=4))  # shapes differ from the config's
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in wrong.state_dict().items()},
              str(tmp_path / "small" / "atp_weights.safetensors"))
    with pytest.raises(ValueError, match="incompatible"):
        vlmprune.apply(model, "atp", checkpoint=str(tmp_path / "small"))
    (tmp_path / "small" / "atp_weights.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="atp_weights.safetensors is not a readable safetensors file"):
        vlmprune.apply(model, "atp", checkpoint=str(tmp_path / "small"))
    (tmp_path / "small" / "atp_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="atp_config.json is not valid JSON"):
        vlmprune.apply(model, "atp", checkpoint=str(tmp_path / "small"))
    with pytest.raises(ValueError, match="cannot be combined"):
        build_atp(checkpoint=str(tmp_path / "small"), fixed_ratio=0.5)
    with pytest.raises(ValueError, match="only one"):
        build_atp(fixed_ratio=0.5, fixed_target=8.0)
    with pytest.raises(ValueError, match="fixed_ratio"):
        build_atp(fixed_ratio=1.5)
    with pytest.raises(ValueError, match="beyond"), pytest.warns(UserWarning, match="nothing is pruned"):
        vlmprune.apply(model, "atp", layers=[0, 3])
    with pytest.raises(ValueError, match="no option"):
        vlmprune.apply(model, "atp", target=144)
    assert getattr(model, "_vlmprune_handle", None) is None  # nothing left attached


def test_a_sample_with_two_images_is_pruned_and_one_without_images_is_refused(model):
    """Two images in one sample: two 24 x 24-style units of that sample; a fixed ratio keeps
    round(2N r^k) of its tokens. A sample without image tokens: a one-line error."""
    inputs = make_inputs(model, prefix_lens=(3,), suffix_lens=(5,))
    ids = inputs["input_ids"]
    n = model.config.image_seq_length
    with torch.no_grad():
        ref = model(input_ids=ids[:, -5:]).logits  # stock, text only
    two = torch.cat([ids[:, :-5], ids[:, 1:-5].clone(), ids[:, -5:]], dim=1)  # the image twice
    batch = {"input_ids": two, "attention_mask": torch.ones_like(two),
             "pixel_values": torch.cat([inputs["pixel_values"], inputs["pixel_values"].flip(-1)])}
    with vlmprune.pruned(model, "atp", fixed_ratio=0.5) as handle, torch.no_grad():
        model(**batch)
        assert handle.state.context.unit_sample.tolist() == [0, 0]
        layers = len(handle.stats.module_layers)
        assert handle.stats.module_counts == [fixed_ratio_counts(0.5, layers, 2 * n)]
        # the summaries count the sample against its own 2N tokens
        assert handle.stats.unpruned_per_image == [2 * n]
        assert handle.stats.mean_kept_ratio == pytest.approx(handle.stats.mean_visual_tokens / (2 * n))
        text = ids[:, -5:]  # a batch without images passes through unpruned
        assert torch.equal(model(input_ids=text).logits, ref)
        ragged, mask = left_pad([two[0].tolist(), text[0].tolist()])
        with pytest.raises(ValueError, match=r"^atp: sample 1 has no image tokens") as err:
            model(input_ids=ragged, attention_mask=mask, pixel_values=batch["pixel_values"])
    assert "\n" not in str(err.value)


def test_range_term_pulls_saturated_thresholds_back_towards_the_scores(model):
    """A threshold far below every score (all soft masks ~1, no gradient) gets a hinge gradient upwards."""
    inputs = make_inputs(model, prefix_lens=(3,), suffix_lens=(5,))
    pr = _pruner(model, theta_r=-0.9, theta_s=0.9)
    handle = attach_atp(model, pr, mode="soft", tau=0.05)
    try:
        model(**inputs)
        terms = handle.state.context.range_terms
        assert len(terms) == 3 and all(float(t.detach().min()) > 0.5 for t in terms)  # theta_r >= 0.5 below min S_r - 2 tau
        torch.stack(terms, 1).sum().backward()
    finally:
        handle.remove()
    for layer in pr.layers:
        assert float(pr.atp[str(layer)].head_r.bias.grad) < 0  # descending the loss raises theta_r
    pr2 = _pruner(model, theta_r=0.85, theta_s=0.9)  # inside the band: no penalty
    with attach_atp(model, pr2, mode="soft", tau=0.05) as handle, torch.no_grad():
        model(**inputs)
        assert all(float(t.max()) == 0.0 for t in handle.state.context.range_terms)


def test_shipped_testbed_checkpoints_load_by_name_and_prune():
    """testbed-144 / testbed-88 ship with the package: named by checkpoint=, they prune the testbed."""
    from vlmprune.integrations.atp import shipped_checkpoints
    from vlmprune.testbed import load

    assert {"testbed-144", "testbed-88"} <= set(shipped_checkpoints())
    testbed, processor = load()
    from vlmprune.eval.data import shapesvqa_items
    from vlmprune.testbed.prompt import PROMPT_TEMPLATE

    items = shapesvqa_items("test", ["color", "count"], 1)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[it.image() for it in items], text=[PROMPT_TEMPLATE.format(question=it.question)
                                                                  for it in items], padding=True, return_tensors="pt")
    averages = {}
    for name in ("testbed-144", "testbed-88"):
        with torch.no_grad(), vlmprune.pruned(testbed, "atp", checkpoint=name) as h:
            testbed(**inputs)
            averages[name] = h.stats.visual_tokens_per_sample()
    assert all(96 < v < 576 for vs in averages.values() for v in vs)
    assert sum(averages["testbed-88"]) < sum(averages["testbed-144"])


def test_unknown_checkpoint_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match=r"does not exist .*name a shipped one: testbed-144, testbed-88"):
        vlmprune.apply(make_tiny_llava(), "atp", checkpoint="testbed-1")


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_positional_ablation_renumbers_survivors_and_stays_exact(model, positions):
    """``positions="compact"`` (the paper's positional ablation) renumbers each sample's survivors
    contiguously from its first position; ``"original"`` keeps their unpruned positions. Both keep the
    equivalences: ragged batch == single samples, cached == uncached generation."""
    inputs = make_inputs(model, prefix_lens=(3, 1, 5), suffix_lens=(5, 8, 2), seed=3)
    with attach_atp(model, _pruning(model), positions=positions) as handle:
        with torch.no_grad():
            batch = model(**inputs).logits[:, -1]
        first, seg = handle.state.segments[0], handle.state.segments[-1]
        for b in range(3):
            got = seg.positions[b][seg.valid[b]]
            unpruned = first.positions[b][first.valid[b]]  # the unpruned layout's positions
            want = (unpruned[0] + torch.arange(int(seg.valid[b].sum())) if positions == "compact"
                    else first.positions[b][seg.source[b][seg.valid[b]]])
            assert torch.equal(got, want), (positions, b)
        assert seg.valid.sum() < inputs["attention_mask"].sum()  # something was pruned
        singles = []
        for b in range(3):
            with torch.no_grad():
                singles.append(model(**_single(inputs, b)).logits[:, -1])
        torch.testing.assert_close(batch, torch.cat(singles), atol=ATOL, rtol=0)
        with torch.no_grad():
            cached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=True)
            uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_positions_option_is_checked():
    with pytest.raises(ValueError, match="positions must be one of"):
        build_atp(fixed_ratio=0.5, positions="renumber")


def test_visual_row_bounds_hand_example():
    from vlmprune.integrations.atp import _visual_row_bounds

    # L = 6; sample 0 has 3 visual columns, sample 1 has 1. Row i of a sample with V visual columns
    # sits at column <= L - V + i: row 0 <= 3 (sample 0) or <= 5 (sample 1) -> bound 6; row 1 is
    # padding for sample 1 -> 6 - 3 + 1 + 1 = 5; row 2 -> 6.
    assert _visual_row_bounds(([3, 1], [6, 6]), 3, 6) == [6, 5, 6]
    assert _visual_row_bounds(([2, 2], [4, 3]), 2, 4) == [3, 4]
    assert _visual_row_bounds(None, 3, 6) is None
