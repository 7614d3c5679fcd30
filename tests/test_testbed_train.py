"""The testbed training recipe: runs end to end on a tiny architecture and resumes exactly."""

import json
import math

import pytest
import torch

from vlmprune.testbed.model import load
from vlmprune.testbed.recipe.config import WORDS_GUIDE_ADDONS_OFF, TrainConfig
from vlmprune.testbed.questions import conversation
from vlmprune.testbed.prompt import encode_conversation
from vlmprune.testbed.recipe.batch import segment_attention_mask
from vlmprune.testbed.recipe.loop import train
from vlmprune.testbed.scenes import make_scene

TINY = dict(vision_overrides=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  projection_dim=32),
            text_overrides=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2),
            vision_batch=2, llm_batch=2, cls_batch=2, warmup=1, turns=3,
            # the primitives' own behaviour, not the recipe's stage-2 guide / background dropout
            guide_weight=0.0, guide_rows="answer", guide_layers=(1,), guide_read_layers=None, guide_target=0.5,
            bg_keep=1.0, patch_position=False, **WORDS_GUIDE_ADDONS_OFF)


def tiny_config(**overrides) -> TrainConfig:
    """A tiny-model config; ``overrides`` win over TINY's settings."""
    return TrainConfig(**{**TINY, **overrides})


def _state(path):
    return torch.load(path / "train_state.pt", weights_only=False)


def test_three_stages_resume_exactly(tmp_path):
    straight = tiny_config(out=str(tmp_path / "a"), vision_steps=2, llm_steps=2, cls_steps=2, checkpoint_every=1)
    final = train(straight, progress=False, log=lambda *_: None)
    # interrupted runs: stop after 1 step (inside stage 1), resume, stop again inside stage 2, resume
    part_dir = tmp_path / "b"
    cfg_b = TrainConfig(**{**straight.__dict__, "out": str(part_dir)})
    assert train(cfg_b, progress=False, log=lambda *_: None, stop_after=1) is None
    assert _state(part_dir)["state"] == {"stage": 1, "step": 1}
    assert train(cfg_b, progress=False, log=lambda *_: None, stop_after=2) is None
    assert _state(part_dir)["state"] == {"stage": 2, "step": 1}
    # resuming restores weights, optimiser and data position, so the result equals the straight run's
    resumed = train(cfg_b, progress=False, log=lambda *_: None)
    a, b = _state(tmp_path / "a")["model"], _state(part_dir)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    model, proc = load(final)  # the output is a stock, loadable LLaVA
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    hist = [json.loads(line) for line in (tmp_path / "a" / "history.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in hist] == [1, 1, 2, 2, 3, 3]
    assert resumed.exists()


def test_stage3_changes_only_the_cls_pathway(tmp_path):
    cfg = tiny_config(out=str(tmp_path / "c"), vision_steps=1, llm_steps=1, cls_steps=0, checkpoint_every=1)
    train(cfg, progress=False, log=lambda *_: None)
    before = _state(tmp_path / "c")["model"]
    s = _state(tmp_path / "c")
    s["config"]["cls_steps"] = 2  # extend the finished run by two stage-3 steps
    torch.save(s, tmp_path / "c" / "train_state.pt")
    train(TrainConfig(**s["config"]), progress=False, log=lambda *_: None)
    after = _state(tmp_path / "c")["model"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.vision_tower.encoder.layers.1.", "model.vision_tower.post_layernorm"))
                           for k in changed), changed


def test_resume_may_add_stage3_and_equals_a_straight_run(tmp_path):
    """A finished run extended by ``cls_steps`` on resume gives the straight run's weights; other changes are refused."""
    quiet = dict(progress=False, log=lambda *_: None)
    straight = tiny_config(out=str(tmp_path / "a"), vision_steps=1, llm_steps=1, cls_steps=2)
    train(straight, **quiet)
    short = TrainConfig(**{**straight.__dict__, "out": str(tmp_path / "b"), "cls_steps": 0})
    train(short, **quiet)
    assert _state(tmp_path / "b")["state"] == {"stage": 3, "step": 0}
    notes = []
    extended = TrainConfig(**{**short.__dict__, "cls_steps": 2, "llm_lr": 0.5})  # llm_lr: stage 2 is done
    train(extended, progress=False, log=notes.append)
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["config"]["cls_steps"] == 2 and b["config"]["llm_lr"] == straight.llm_lr
    assert any("cls_steps" in n for n in notes) and any("llm_lr" in n and "keeping the saved" in n for n in notes)


def test_conversation_labels_cover_answers_only():
    from vlmprune.testbed.model import build_processor, build_tokenizer
    import random

    proc = build_processor(build_tokenizer())
    qa = conversation(make_scene(5), random.Random(0), 4)
    ids, labels = encode_conversation(proc, qa)
    assert len(ids) == len(labels)
    answers = [t for t, lab in zip(ids, labels) if lab != -100]
    text = proc.tokenizer.decode(answers)
    assert text.replace("</s>", "|").split("|")[:-1] == [" " + a for _, a in qa]


def test_conversation_family_filter():
    import random

    from vlmprune.testbed.questions import FAMILIES, ask  # noqa: F401

    scene = make_scene(11)
    qa = conversation(scene, random.Random(1), 6, ("exist",))
    assert qa and all(q.startswith("Is there") for q, _ in qa)
    assert len({q for q, _ in qa}) == len(qa)


def test_independent_turns_equal_single_turn_prompts():
    """Turns packed after one shared image prefix give exactly the logits of their own single-turn prompts."""
    import random

    from vlmprune.testbed.model import build_model, build_processor, build_tokenizer
    from vlmprune.testbed.prompt import format_prompt
    from vlmprune.testbed.prompt import encode_independent_turns
    from vlmprune.testbed.recipe.batch import segment_attention_mask

    tok = build_tokenizer()
    proc = build_processor(tok)
    model = build_model(tok, seed=0, vision=TINY["vision_overrides"], text=TINY["text_overrides"]).eval()
    scene = make_scene(11, text=True)
    qa = conversation(scene, random.Random(3), 4)
    enc = encode_independent_turns(tok, qa, tok.convert_tokens_to_ids("<image>"))
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["position_ids"]) == len(enc["segment"])
    seg = torch.tensor([enc["segment"] + [-1, -1]])  # two padding slots, as a right-padded batch has
    ids = torch.tensor([enc["input_ids"] + [tok.pad_token_id] * 2])
    pos = torch.tensor([enc["position_ids"] + [0, 0]])
    pv = proc.image_processor([scene.image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, attention_mask=segment_attention_mask(seg), pixel_values=pv).logits[0]
        for k, (q, a) in enumerate(qa, start=1):
            single = proc(images=[scene.image], text=[format_prompt(q) + " " + a], return_tensors="pt")
            ref = model(**single).logits[0]
            rows = (seg[0] == k).nonzero()[:, 0]
            n = len(rows) - 1  # the turn minus its </s>: the tail of the single prompt
            torch.testing.assert_close(packed[rows[:n]], ref[-n:], atol=1e-5, rtol=1e-4)
            labelled = [t for t, lab in zip(torch.tensor(enc["input_ids"])[rows].tolist(),
                                            torch.tensor(enc["labels"])[rows].tolist()) if lab != -100]
            assert tok.decode(labelled[:-1]).strip() == a and labelled[-1] == tok.eos_token_id


def test_segment_mask_small_case():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    m = segment_attention_mask(seg)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 1, 0, 0],
                 [1, 1, 0, 0, 1, 0],
                 [1, 1, 0, 0, 0, 1]]


def test_attention_guide_recomputes_the_real_attention():
    """The guide's probabilities for its heads equal the eager attention weights of the same forward pass."""
    from vlmprune.testbed.model import build_model, build_tokenizer
    from vlmprune.testbed.recipe.guide import AttentionGuide

    tok = build_tokenizer()
    model = build_model(tok, seed=0, vision=TINY["vision_overrides"], text=TINY["text_overrides"]).eval()
    model.set_attn_implementation("eager")
    L = 12
    ids = torch.randint(5, len(tok), (2, L))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, -3:] = 0  # right padding
    guide = AttentionGuide(model, (0, 1), heads=1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        allowed = torch.ones(L, L, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
        probs = guide.probabilities(allowed)
        assert len(probs) == 2
        for layer, p in enumerate(probs):
            ref = out.attentions[layer][:, :1]
            torch.testing.assert_close(p[0], ref[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(p[1, :, : L - 3], ref[1, :, : L - 3], atol=1e-5, rtol=1e-4)
        # loss = -log(mass on the target keys) on the chosen rows; all mass on targets -> 0
        rows = torch.zeros(2, L, dtype=torch.bool)
        rows[:, 4] = True
        model(input_ids=ids, attention_mask=mask)
        full = guide.loss(rows, torch.ones(2, L, dtype=torch.bool), allowed)
        assert abs(float(full)) < 1e-5
        # layer-specific rows: row 4 guided on layer 0 only, row 7 on layer -1 (= 1) only
        targets = torch.zeros(2, L, dtype=torch.bool)
        targets[:, :3] = True
        r4, r7 = torch.zeros_like(rows), torch.zeros_like(rows)
        r4[:, 4], r7[:, 7] = True, True

        def one(p, r):
            mass = (p * targets[:, None, None, :].float()).sum(-1)
            return (guide.floor - (mass[r[:, None, :].expand_as(mass)] + 1e-6).log()).clamp_min(0).mean()

        model(input_ids=ids, attention_mask=mask)
        split = guide.loss(rows, targets, allowed, layer_rows={0: r4, -1: r7})
        torch.testing.assert_close(split, (one(probs[0], r4) + one(probs[1], r7)) / 2)
        model(input_ids=ids, attention_mask=mask)
        assert float(guide.loss(rows, targets, allowed, layer_rows={0: torch.zeros_like(rows)})) == 0.0  # no row
        # uniform rows: KL(uniform over the row's targets || attention), by hand; row 4 uniform, row 7 share
        uni = torch.zeros_like(rows)
        uni[:, 4] = True
        both = rows.clone()
        both[:, 7] = True
        model(input_ids=ids, attention_mask=mask)
        mixed = guide.loss(both, targets, allowed, uniform=uni)
        want = []
        for p in probs:
            kl = -(p[:, :, 4, :3]).log().mean(-1) - math.log(3)  # [B, heads]: 3 target keys each
            want += [one(p, r7), kl.mean()]
        torch.testing.assert_close(mixed, torch.stack(want).mean(), atol=1e-5, rtol=1e-4)
        # exactly uniform attention on the targets -> 0
        flat = torch.zeros(2, 1, L, L)
        flat[:, :, 4, :3] = 1 / 3
        guide.captured = []
        guide.probabilities = lambda allowed: [flat]  # noqa: E731 -- the loss's arithmetic alone
        guide.layers_seen = [0]
        assert abs(float(guide.loss(uni, targets, allowed, uniform=uni))) < 1e-4
    guide.remove()
    assert not guide.captured
    twice = AttentionGuide(model, (1, -1), heads=1)  # the same layer named twice is hooked once
    assert len(twice.handles) == 1
    twice.remove()


def test_config_overrides_and_validation():
    import pytest

    cfg = TrainConfig().with_overrides(["guide_weight=0.1", "guide_layers=[3]", "projector-init=default", "out=runs/x"])
    assert cfg.guide_weight == 0.1 and cfg.guide_layers == (3,) and cfg.projector_init == "default"
    assert cfg.out == "runs/x"
    with pytest.raises(ValueError, match="key one of"):
        TrainConfig().with_overrides(["no_such_field=1"])
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig().with_overrides(["guide_weight"])
    with pytest.raises(ValueError, match="projector_init"):
        TrainConfig().with_overrides(["projector_init=whiten"])
    with pytest.raises(ValueError, match="guide_target"):
        TrainConfig(guide_target=0).validate()
    with pytest.raises(ValueError, match="families"):
        TrainConfig(families=("colour",)).validate()


def test_cli_rejects_bad_override(tmp_path):
    from typer.testing import CliRunner

    from vlmprune.cli import app

    res = CliRunner().invoke(app, ["testbed", "train", "--out", str(tmp_path / "r"), "--set", "guide_weight=-1"])
    assert res.exit_code != 0 and "guide_weight" in res.output
    assert not (tmp_path / "r").exists()  # nothing was written


def test_standardize_projector_feeds_standardised_features():
    """After the data-dependent init, linear_1(x) == W0 ((x - mean) / std) + b0 on the same statistics."""
    from vlmprune.testbed.model import build_model, build_processor, build_tokenizer
    from vlmprune.testbed.recipe.projector import calibration_features, standardize_projector

    tok = build_tokenizer()
    proc = build_processor(tok)
    model = build_model(tok, seed=0, vision=TINY["vision_overrides"], text=TINY["text_overrides"]).eval()
    lin = model.model.multi_modal_projector.linear_1
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    cfg = tiny_config()
    stats = standardize_projector(model, proc, cfg, n_images=4)
    assert stats["feature_norm"] > 0
    f = calibration_features(model, proc, cfg, n_images=4)  # the statistics' own scenes
    z = (f - f.mean(0)) / f.std(0).clamp_min(1e-4)
    torch.testing.assert_close(lin(f).detach(), z @ w0.T + b0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(lin(f).detach().mean(0), b0, atol=1e-4, rtol=1e-4)  # standardised -> mean is the bias


def test_stage2_options_run_end_to_end(tmp_path):
    """Independent turns + attention guide + standardised projector: a tiny run trains, logs both losses, loads."""
    cfg = tiny_config(out=str(tmp_path / "g"), vision_steps=1, llm_steps=2, cls_steps=0, checkpoint_every=1, independent_turns=True, guide_focus=True,
                      guide_weight=0.1, guide_layers=(1,), guide_heads=1, patch_words=0.5, ground_words=0.3)
    final = train(cfg, progress=False, log=lambda *_: None)
    hist = [json.loads(line) for line in (tmp_path / "g" / "history.jsonl").read_text().splitlines()]
    stage2 = [h for h in hist if h["stage"] == 2]
    assert len(stage2) == 2 and all({"lm", "guide", "patch_words", "ground"} <= h.keys() for h in stage2)
    assert all(abs(h["loss"] - (h["lm"] + 0.1 * h["guide"] + 0.5 * h["patch_words"] + 0.3 * h["ground"])) < 1e-4
               for h in stage2)
    assert all(0 <= h["ground"] <= 2 for h in stage2)
    model, _ = load(final)
    assert not any(m._forward_hooks for m in model.modules())  # the guide's hooks are not saved with the model


def test_vision_from_skips_stage1_and_matches_a_straight_run(tmp_path):
    """Stage 2 started from another run's stage-1 state equals that run's own stage 2."""
    import pytest

    base = dict(vision_steps=2, llm_steps=2, cls_steps=0, checkpoint_every=1, **TINY)
    train(TrainConfig(out=str(tmp_path / "a"), **base), progress=False, log=lambda *_: None, stop_after=2)
    donor = tmp_path / "donor.pt"
    donor.write_bytes((tmp_path / "a" / "train_state.pt").read_bytes())  # the state right after stage 1
    train(TrainConfig(out=str(tmp_path / "a"), **base), progress=False, log=lambda *_: None)
    train(TrainConfig(out=str(tmp_path / "b"), vision_from=str(donor), **base), progress=False, log=lambda *_: None)
    a, b = _state(tmp_path / "a")["model"], _state(tmp_path / "b")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    hist = [json.loads(line) for line in (tmp_path / "b" / "history.jsonl").read_text().splitlines()]
    assert {h["stage"] for h in hist} == {2}
    with pytest.raises(ValueError, match="vision_from"):
        train(TrainConfig(out=str(tmp_path / "c"), vision_from=str(tmp_path / "missing.pt"), **base), progress=False)
    assert not (tmp_path / "c").exists()  # rejected before anything is written


def test_patch_word_targets_name_each_patch():
    """Object patches: colour word on even raster indices, shape word on odd; text patches: their character."""
    import numpy as np

    from vlmprune.testbed.model import build_tokenizer
    from vlmprune.testbed.scenes import CODE_ALPHABET, COLOR_NAMES, SHAPES, patch_labels
    from vlmprune.testbed.recipe.auxiliary import patch_word_targets

    tok = build_tokenizer()
    scene = make_scene(5, text=True)
    ids = patch_word_targets(scene, tok)
    lab = patch_labels(scene)
    assert ids.shape == (576,)
    assert set(np.nonzero(ids.numpy() != -100)[0]) == set(np.nonzero((lab.color > 0) | (lab.char > 0))[0])
    for i in np.nonzero(lab.color)[0]:
        want = COLOR_NAMES[lab.color[i] - 1] if i % 2 == 0 else SHAPES[lab.shape[i] - 1]
        assert tok.decode([int(ids[i])]) == " " + want
    chars = np.nonzero(lab.char)[0]
    assert len(chars) and all(tok.decode([int(ids[i])]) == CODE_ALPHABET[lab.char[i] - 1] for i in chars)


def test_patch_word_targets_with_position_cycle_colour_shape_corner():
    """patch_position: object patches name colour / shape / the object's corner by (row + col) % 3."""
    import numpy as np

    from vlmprune.testbed.model import build_tokenizer
    from vlmprune.testbed.scenes import CODE_ALPHABET, COLOR_NAMES, CORNERS, GRID, SHAPES, corner_of, patch_labels
    from vlmprune.testbed.recipe.auxiliary import patch_word_targets

    tok = build_tokenizer()
    scene = make_scene(5, text=True)
    ids = patch_word_targets(scene, tok, position=True)
    lab = patch_labels(scene)
    assert set(np.nonzero(ids.numpy() != -100)[0]) == set(np.nonzero((lab.color > 0) | (lab.char > 0))[0])
    seen = set()
    for i in np.nonzero(lab.color)[0]:
        phase = (i // GRID + i % GRID) % 3
        want = (COLOR_NAMES[lab.color[i] - 1], SHAPES[lab.shape[i] - 1], CORNERS[lab.corner[i] - 1])[phase]
        assert tok.decode([int(ids[i])]) == " " + want
        seen.add(phase)
    assert seen == {0, 1, 2}
    # every object's patches carry the quadrant of that object's centre
    for o in scene.objects:
        r, c = o.center_patch
        if lab.shape[r * GRID + c] == 1 + SHAPES.index(o.shape) and lab.color[r * GRID + c] == 1 + COLOR_NAMES.index(o.color):
            assert CORNERS[lab.corner[r * GRID + c] - 1] == corner_of(o)
    chars = np.nonzero(lab.char)[0]
    assert all(tok.decode([int(ids[i])]) == CODE_ALPHABET[lab.char[i] - 1] for i in chars)
    assert lab.corner[(lab.color == 0)].max() == 0


def test_patch_position_needs_patch_words():
    with pytest.raises(ValueError, match="patch_position needs patch_words"):
        TrainConfig(patch_position=True, patch_words=0.0).validate()


def test_grounding_small_case():
    """Word ids per patch (colour+shape / character / none) and the 1 - cos loss over labelled patches only."""
    import numpy as np

    from vlmprune.testbed.scenes import PatchLabels
    from vlmprune.testbed.recipe.auxiliary import grounding_loss, grounding_word_ids

    words = {"color": torch.tensor([-100, 10, 11]), "shape": torch.tensor([-100, 20, 21]),
             "char": torch.tensor([-100, 30])}
    lab = PatchLabels(color=np.array([0, 2, 0]), shape=np.array([0, 1, 0]), center=np.zeros(3),
                      char=np.array([0, 0, 1]), present=np.zeros(1))
    ids = grounding_word_ids(lab, words)
    assert ids.tolist() == [[-100, -100], [11, 20], [30, -100]]
    emb = torch.zeros(40, 2)
    emb[11], emb[20], emb[30] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])
    feats = torch.tensor([[[5.0, 5.0], [2.0, 2.0], [0.0, 3.0]]])  # patch 0 (background) is ignored
    # patch 1: target (1, 1), cos = 1 -> 0; patch 2: target (1, 0), cos = 0 -> 1; mean 0.5
    assert torch.allclose(grounding_loss(feats, ids[None], emb), torch.tensor(0.5))
    emb.requires_grad_(True)
    feats.requires_grad_(True)
    grounding_loss(feats, ids[None], emb).backward()
    assert emb.grad is None and feats.grad.abs().sum() > 0  # the embedding table is a fixed target


def test_question_patches_name_the_asked_objects():
    import numpy as np

    from vlmprune.testbed.scenes import COLOR_NAMES, PatchLabels
    from vlmprune.testbed.recipe.guide_targets import question_patches

    # patches: background, red circle, blue circle, red star, a code character
    lab = PatchLabels(color=np.array([0, 1, 2, 1, 0]), shape=np.array([0, 1, 1, 4, 0]), center=np.zeros(5),
                      char=np.array([0, 0, 0, 0, 3]), present=np.zeros(1))
    red, blue = COLOR_NAMES[0], COLOR_NAMES[1]
    assert question_patches("What color is the star?", lab).tolist() == [False, False, False, True, False]
    assert question_patches(f"What shape is the {blue} object?", lab).tolist() == [False, False, True, False, False]
    assert question_patches("How many circles are there?", lab).tolist() == [False, True, True, False, False]
    assert question_patches(f"Is there a {red} star?", lab).tolist() == [False, True, False, True, False]
    assert question_patches("What is written in the image?", lab).tolist() == [False, False, False, False, True]
    assert not question_patches("Which corner is the cross in?", lab).any()


def test_focus_guide_targets_each_answer_row(tmp_path):
    """guide_focus: every guided row's targets are image tokens showing what its own question names."""
    from vlmprune.testbed.model import build_processor, build_tokenizer
    from vlmprune.testbed.recipe.batch import llm_batch

    cfg = tiny_config(guide_weight=0.1, guide_focus=True)
    processor = build_processor(build_tokenizer())
    batch = llm_batch(cfg, 0, processor)
    g = batch["guide"]
    image = batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert g["targets"].shape == (2, *batch["input_ids"].shape[1:], batch["input_ids"].shape[1])
    assert g["rows"].any() and not (g["targets"] & ~image[:, None, :]).any()  # only image tokens are targets
    assert (g["targets"].any(-1) == g["rows"]).all()  # exactly the guided rows have targets
    plain = llm_batch(tiny_config(guide_weight=0.1), 0, processor)["guide"]
    assert (g["rows"] <= plain["rows"]).all()  # focus only drops rows (questions naming nothing present)


def test_patch_ce_object_term_small_case():
    """Uniform logits over C classes: CE is log C per patch; the object term adds log C once more."""
    from vlmprune.testbed.recipe.vision import patch_ce

    logits = torch.zeros(1, 4, 3)
    target = torch.tensor([[0, 0, 2, 0]])
    assert torch.isclose(patch_ce(logits, target, False), torch.tensor(math.log(3)))
    assert torch.isclose(patch_ce(logits, target, True), torch.tensor(2 * math.log(3)))
    # A confident right answer on the labelled patch removes the object term only.
    logits[0, 2] = torch.tensor([0.0, 0.0, 50.0])
    assert torch.isclose(patch_ce(logits, target, True), torch.tensor(3 * math.log(3) / 4), atol=1e-5)
    # No labelled patch: the object term is zero (and still differentiable).
    empty = patch_ce(torch.zeros(1, 4, 3, requires_grad=True), torch.zeros(1, 4, dtype=torch.long), True)
    assert torch.isclose(empty, torch.tensor(math.log(3)))
    empty.backward()


def test_sincos_positions_small_case():
    """2x2 grid, width 4: one frequency (1.0); row r, column c -> [sin r, cos r, sin c, cos c]; [CLS] row 0."""
    from vlmprune.testbed.model import build_model, build_tokenizer
    from vlmprune.testbed.recipe.vision import sincos_positions

    model = build_model(build_tokenizer(), vision=dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                                                       num_attention_heads=1, image_size=28, patch_size=14,
                                                       projection_dim=4), text=TINY["text_overrides"])
    vision = model.model.vision_tower
    sincos_positions(vision)
    emb = vision.embeddings.position_embedding.weight
    expected = torch.tensor([[0.0, 0, 0, 0]] + [[math.sin(r), math.cos(r), math.sin(c), math.cos(c)]
                                                for r in range(2) for c in range(2)])
    assert torch.allclose(emb, expected)


def test_mimetic_attention_ties_queries_to_keys():
    from vlmprune.testbed.model import build_model, build_tokenizer
    from vlmprune.testbed.recipe.vision import mimetic_attention

    model = build_model(build_tokenizer(), vision=TINY["vision_overrides"], text=TINY["text_overrides"])
    vision = model.model.vision_tower
    mimetic_attention(vision, seed=3, self_logit=4.0)
    for layer in vision.encoder.layers:
        a = layer.self_attn
        assert torch.equal(a.q_proj.weight, a.k_proj.weight)
        assert not a.q_proj.bias.any() and not a.k_proj.bias.any()
        # expected self logit: head_dim * std^2 * width / sqrt(head_dim) == 4 for unit-variance inputs
        width = a.q_proj.weight.shape[1]
        std2 = a.q_proj.weight.var().item()
        assert abs(std2 * width * a.head_dim ** 0.5 - 4.0) < 1.0
    with __import__("pytest").raises(ValueError, match="vision_attn_init"):
        TrainConfig(vision_attn_init="nope").validate()


def test_background_keep_schedule_and_sample():
    from vlmprune.testbed.recipe.dropout import background_keep, background_sample

    cfg = TrainConfig(llm_steps=100, bg_keep=0.2, bg_ramp=(0.4, 0.6))
    assert [background_keep(cfg, s) for s in (0, 40, 50, 60, 99)] == [0.2, 0.2, pytest.approx(0.6), 1.0, 1.0]
    assert background_keep(TrainConfig(bg_keep=1.0), 0) == 1.0
    assert background_keep(TrainConfig(), 0) == 0.1  # the recipe's starting share
    fg = torch.zeros(10, dtype=torch.bool)
    fg[[2, 5]] = True
    keep = background_sample(fg, 0.5, seed=3)
    assert keep[fg].all() and int(keep.sum()) == 2 + 4  # every foreground patch + round(0.5 * 8) background
    assert torch.equal(keep, background_sample(fg, 0.5, seed=3))
    with pytest.raises(ValueError, match="bg_keep"):
        TrainConfig(bg_keep=0).validate()
    with pytest.raises(ValueError, match="bg_ramp"):
        TrainConfig(bg_ramp=(0.7, 0.4)).validate()
    with pytest.raises(ValueError, match="cannot be combined"):
        TrainConfig(bg_keep=0.5, ground_words=0.1).validate()
    words_only = dict(guide_rows="words", guide_read_layers=None, guide_read_stop=False, guide_read_prev=False)
    with pytest.raises(ValueError, match="guide_rows must be"):
        TrainConfig(guide_rows="everything").validate()
    with pytest.raises(ValueError, match="needs guide_weight"):
        TrainConfig(**words_only, guide_weight=0.0).validate()
    with pytest.raises(ValueError, match="replaces guide_focus"):
        TrainConfig(**words_only, guide_weight=0.1, guide_focus=True).validate()


def test_sparse_image_batch_keeps_original_positions():
    """All patches kept: same logits and loss as the ordinary forward; some dropped: equals the
    model run on the shortened sequence with gapped position ids."""
    from vlmprune.testbed.model import build_model, build_processor, build_tokenizer
    from vlmprune.testbed.recipe.batch import llm_batch
    from vlmprune.testbed.recipe.dropout import sparse_image_batch

    tok = build_tokenizer()
    processor = build_processor(tok)
    model = build_model(tok, seed=0, vision=TINY["vision_overrides"], text=TINY["text_overrides"]).eval()
    cfg = tiny_config(guide_weight=0.1, guide_rows="words")
    batch = llm_batch(cfg, 0, processor)
    words = batch.pop("patch_words")
    guide = batch.pop("guide")
    with torch.no_grad():
        ref = model(**batch)
        keep = torch.ones(2, 576, dtype=torch.bool)
        sparse, w, g = sparse_image_batch(model, batch, keep, words, guide)
        assert torch.equal(g["rows"], guide["rows"]) and torch.equal(g["targets"], guide["targets"])
        assert torch.equal(g["allowed"], guide["allowed"])
        out = model(**sparse)
        torch.testing.assert_close(out.loss, ref.loss)
        valid = batch["attention_mask"].bool()
        torch.testing.assert_close(out.logits[valid], ref.logits[valid], atol=1e-5, rtol=1e-4)
        assert torch.equal(w, words)
        keep[0, 100:] = False  # sample 0 keeps patches 0-99, sample 1 keeps patches 0, 2, 4, ...
        keep[1, 1::2] = False
        sparse, w, _ = sparse_image_batch(model, batch, keep, words)
        out = model(**sparse)
        image = batch["input_ids"] == model.config.image_token_id
        for b in range(2):
            cols = (~image[b] & valid[b]) | (image[b] & torch.zeros_like(image[b]).masked_scatter(image[b], keep[b]))
            ids = batch["input_ids"][b, cols]
            n = len(ids)
            assert int(sparse["attention_mask"][b].sum()) == n
            assert torch.equal(sparse["position_ids"][b, :n], cols.nonzero()[:, 0])
            assert torch.equal(w[b, :n], words[b, cols])
            embeds = sparse["inputs_embeds"][b, :n]
            single = model(inputs_embeds=embeds[None], position_ids=cols.nonzero()[:, 0][None]).logits[0]
            torch.testing.assert_close(out.logits[b, :n], single, atol=1e-5, rtol=1e-4)
            text = ~image[b, cols]
            torch.testing.assert_close(embeds[text], model.get_input_embeddings()(ids[text]))


def test_background_dropout_trains_end_to_end(tmp_path):
    cfg = tiny_config(out=str(tmp_path / "s"), vision_steps=1, llm_steps=4, cls_steps=0, checkpoint_every=2,
                      bg_keep=0.1, bg_ramp=(0.25, 0.5))
    train(cfg, progress=False, log=lambda *_: None)
    hist = [json.loads(line) for line in (tmp_path / "s" / "history.jsonl").read_text().splitlines()]
    seq = [h.get("seq") for h in hist if h["stage"] == 2]
    assert seq[0] is not None and seq[0] < 576 and seq[2] is None and seq[3] is None  # full images from step 2 on


def test_word_guide_targets_small_case():
    """Question words naming a colour or shape point at the patches showing it; answers and absent words do not."""
    from vlmprune.testbed.model import build_tokenizer
    from vlmprune.testbed.scenes import COLOR_NAMES, SHAPES, patch_labels
    from vlmprune.testbed.prompt import encode_turns
    from vlmprune.testbed.recipe.guide_targets import word_guide_targets

    tok = build_tokenizer()
    scene = make_scene(5, n_objects=3)
    lab = patch_labels(scene)
    o = scene.objects[0]
    absent = next(c for c in COLOR_NAMES if c not in {x.color for x in scene.objects})
    qa = [(f"Is there a {o.color} {o.shape}?", "yes"), (f"Is there a {absent} {o.shape}?", "no"),
          (f"What color is the {o.shape}?", o.color)]
    img_id = tok.convert_tokens_to_ids("<image>")
    ids, labels, _ = encode_turns(tok, qa, img_id)
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    image = ids == img_id
    rows, targets = word_guide_targets(ids, labels, image, [lab], tok)
    words = [tok.decode([t]).strip() for t in ids[0, rows[0]].tolist()]
    assert words == [o.color, o.shape, o.shape, o.shape]  # the absent colour and the answer are not rows
    keys = image[0].nonzero()[:, 0]
    first = rows[0].nonzero()[0, 0]
    assert torch.equal(targets[0, first, keys], torch.as_tensor(lab.color == COLOR_NAMES.index(o.color) + 1))
    assert not targets[0, first, ~image[0]].any()
    second = rows[0].nonzero()[1, 0]
    assert torch.equal(targets[0, second, keys], torch.as_tensor(lab.shape == SHAPES.index(o.shape) + 1))


def test_count_guide_targets_small_case():
    """A count question's plural points at the sink (position 0) + each centre patch of that shape, as a uniform row."""
    from vlmprune.testbed.model import build_tokenizer
    from vlmprune.testbed.scenes import GRID, PLURALS, SHAPES, patch_labels
    from vlmprune.testbed.recipe.guide_targets import count_guide_targets, word_guide_targets
    from vlmprune.testbed.prompt import encode_turns

    tok = build_tokenizer()
    scene = next(sc for sc in (make_scene(seed, n_objects=6) for seed in range(100))
                 if max(sum(o.shape == s for o in sc.objects) for s in SHAPES) >= 2)
    lab = patch_labels(scene)
    twice = next(s for s in SHAPES if sum(o.shape == s for o in scene.objects) >= 2)
    absent = next(s for s in SHAPES if s not in {o.shape for o in scene.objects})
    qa = [(f"How many {PLURALS[twice]} are there?", "2"), (f"How many {PLURALS[absent]} are there?", "0"),
          (f"What color is the {twice}?", "red")]
    img_id = tok.convert_tokens_to_ids("<image>")
    ids, labels, _ = encode_turns(tok, qa, img_id)
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    image = ids == img_id
    rows, targets = word_guide_targets(ids, labels, image, [lab], tok)
    before = rows.clone()
    uniform = count_guide_targets(ids, image, [scene], tok, rows, targets)
    plural = [t for t in range(ids.shape[1]) if tok.decode([int(ids[0, t])]).strip() in (PLURALS[twice], PLURALS[absent])]
    assert uniform[0].nonzero()[:, 0].tolist() == plural and rows[0, plural].all()
    keys = image[0].nonzero()[:, 0]
    centres = {r * GRID + c for r, c in (o.center_patch for o in scene.objects if o.shape == twice)}
    want = torch.zeros(ids.shape[1], dtype=torch.bool)
    want[0] = True
    want[keys[sorted(centres)]] = True
    assert torch.equal(targets[0, plural[0]], want)
    only_sink = torch.zeros_like(want)
    only_sink[0] = True
    assert torch.equal(targets[0, plural[1]], only_sink)  # absent shape: the sink alone (answer 0)
    other = before[0] & ~uniform[0]
    assert other.any() and torch.equal(rows[0] & ~uniform[0], other)  # the singular word rows are untouched


def test_count_guide_trains_and_needs_words(tmp_path):
    cfg = tiny_config(out=str(tmp_path / "n"), vision_steps=1, llm_steps=2, cls_steps=0, checkpoint_every=1,
                      bg_keep=0.2, guide_weight=0.3, guide_rows="words", guide_layers=(0,), guide_count=True,
                      guide_heads=1, families=("count",))
    train(cfg, progress=False, log=lambda *_: None)
    hist = [json.loads(line) for line in (tmp_path / "n" / "history.jsonl").read_text().splitlines()]
    assert all(h["guide"] > 0 for h in hist if h["stage"] == 2)
    with pytest.raises(ValueError, match="guide_count needs"):
        TrainConfig(guide_count=True, guide_rows="answer", guide_read_layers=None).validate()


@pytest.mark.parametrize("prev", [False, True])
def test_word_guide_with_background_dropout_trains(tmp_path, prev):
    cfg = tiny_config(out=str(tmp_path / "w"), vision_steps=1, llm_steps=2, cls_steps=0, checkpoint_every=1,
                      bg_keep=0.2, guide_weight=0.3, guide_rows="words+read", guide_layers=(0,), guide_read_layers=(1,),
                      guide_heads=1, text_prob=1.0, guide_read_prev=prev)
    train(cfg, progress=False, log=lambda *_: None)
    hist = [json.loads(line) for line in (tmp_path / "w" / "history.jsonl").read_text().splitlines()]
    stage2 = [h for h in hist if h["stage"] == 2]
    assert all({"lm", "guide", "patch_words", "seq"} <= h.keys() and h["guide"] > 0 for h in stage2)
    assert all(abs(h["loss"] - (h["lm"] + 0.3 * h["guide"] + h["patch_words"])) < 1e-4 for h in stage2)


def test_read_guide_targets_point_at_each_next_character():
    """Each row predicting a token of the code's answer targets the cell(s) of the character(s) that token spells."""
    from vlmprune.testbed.model import build_tokenizer
    from vlmprune.testbed.scenes import GRID, patch_labels
    from vlmprune.testbed.prompt import encode_turns
    from vlmprune.testbed.recipe.guide_targets import read_guide_targets

    tok = build_tokenizer()
    scene = make_scene(7, text=True)
    code = scene.text.code.lower()
    qa = [("How many circles are there?", "1"), ("What is written in the image?", code)]
    img_id = tok.convert_tokens_to_ids("<image>")
    ids, labels, _ = encode_turns(tok, qa, img_id)
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    image = ids == img_id
    L = ids.shape[1]
    rows, targets = torch.zeros(1, L, dtype=torch.bool), torch.zeros(1, L, L, dtype=torch.bool)
    read_guide_targets(ids, labels, image, [scene], tok, rows, targets)
    keys = image[0].nonzero()[:, 0]
    answer_ids = tok(" " + code, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]).strip() for i in answer_ids]
    guided = rows[0].nonzero()[:, 0]
    assert len(guided) == sum(1 for p in pieces if p)  # one row per token that spells characters
    cells, done = [], 0
    for p in pieces:
        if p:
            cells.append([scene.text.row * GRID + scene.text.col + c for c in range(done, done + len(p))])
        done += len(p)
    for row, want in zip(guided, cells):
        got = (targets[0, row, keys]).nonzero()[:, 0].tolist()
        assert got == want
        assert int(ids[0, row + 1]) in answer_ids  # the row predicts an answer token
    lab = patch_labels(scene)
    assert all(lab.char[c] > 0 for want in cells for c in want)  # the cells show characters


def test_read_stop_row_points_at_the_cell_after_the_code():
    """stop=True adds exactly one row: the one predicting the end token, aimed at the cell after the code."""
    from vlmprune.testbed.model import build_tokenizer
    from vlmprune.testbed.scenes import GRID, patch_labels
    from vlmprune.testbed.prompt import encode_turns
    from vlmprune.testbed.recipe.guide_targets import read_guide_targets

    tok = build_tokenizer()
    scene = next(s for s in (make_scene(seed, text=True) for seed in range(50))
                 if s.text.col + len(s.text.code) < GRID)
    code = scene.text.code.lower()
    img_id = tok.convert_tokens_to_ids("<image>")
    ids, labels, _ = encode_turns(tok, [("What is written in the image?", code)], img_id)
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    image = ids == img_id
    L = ids.shape[1]
    out = {}
    for stop in (False, True):
        rows, targets = torch.zeros(1, L, dtype=torch.bool), torch.zeros(1, L, L, dtype=torch.bool)
        read_guide_targets(ids, labels, image, [scene], tok, rows, targets, stop=stop)
        out[stop] = rows, targets
    extra = (out[True][0] & ~out[False][0])[0].nonzero()[:, 0].tolist()
    assert len(extra) == 1 and torch.equal(out[True][0] & out[False][0], out[False][0])
    row = extra[0]
    assert int(ids[0, row + 1]) == tok.eos_token_id  # the row predicts the end of the answer
    keys = image[0].nonzero()[:, 0]
    cell = scene.text.row * GRID + scene.text.col + len(code)
    assert (out[True][1][0, row, keys]).nonzero()[:, 0].tolist() == [cell]
    assert patch_labels(scene).char[cell] == 0  # an empty cell: nothing more to read
    with pytest.raises(ValueError, match="guide_read_stop"):
        TrainConfig(guide_rows="words", guide_read_layers=None, guide_read_stop=True).validate()


def test_read_rows_go_to_their_own_layers():
    from vlmprune.testbed.model import build_processor, build_tokenizer
    from vlmprune.testbed.recipe.batch import llm_batch

    processor = build_processor(build_tokenizer())
    cfg = tiny_config(guide_weight=0.1, guide_rows="words+read", guide_layers=(0,), guide_read_layers=(2,),
                      text_prob=1.0, families=("read", "color"), turns=4)
    g = llm_batch(cfg, 0, processor)["guide"]
    words, read = g["layer_rows"][0], g["layer_rows"][2]
    assert words.any() and read.any() and not (words & read).any()
    assert torch.equal(words | read, g["rows"])
    with pytest.raises(ValueError, match="guide_read_layers"):
        TrainConfig(guide_weight=0.1, guide_rows="words", guide_read_layers=(2,), guide_read_stop=False,
                    guide_read_prev=False).validate()


def test_position_guide_targets_small_case():
    """A position question's answer row targets its shape words, one per head; other questions are not guided."""
    from vlmprune.testbed.model import build_tokenizer
    from vlmprune.testbed.prompt import encode_turns
    from vlmprune.testbed.recipe.guide_targets import position_guide_targets

    tok = build_tokenizer()
    qa = [("What color is the star?", "red"), ("Is the star left of the square?", "no"),
          ("Which corner is the circle in?", "topleft")]
    img_id = tok.convert_tokens_to_ids("<image>")
    ids, labels, _ = encode_turns(tok, qa, img_id)
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    image = ids == img_id
    rows, words, targets = position_guide_targets(ids, labels, image, [qa], tok, heads=3)
    text = [tok.decode([t]).strip() for t in ids[0].tolist()]
    starts = ((labels[0, :-1] == -100) & (labels[0, 1:] != -100)).nonzero()[:, 0].tolist()
    assert rows[0].nonzero()[:, 0].tolist() == starts[1:]  # the colour question is not guided
    assert [text[t] for t in words[0].nonzero()[:, 0]] == ["star", "square", "circle"]
    star = [t for t, w in enumerate(text) if w == "star"][1]  # the relation's star, not the colour question's
    square, circle = text.index("square"), text.index("circle")
    relation, corner = starts[1], starts[2]
    # relation: head 0 -> first word, head 1 -> second, head 2 -> first again; corner: its one word on every head
    assert [targets[0, h, relation].nonzero()[:, 0].tolist() for h in range(3)] == [[star], [square], [star]]
    assert [targets[0, h, corner].nonzero()[:, 0].tolist() for h in range(3)] == [[circle]] * 3
    assert targets.sum() == 6  # nothing else


def test_position_guide_trains_with_background_dropout(tmp_path):
    """The position group survives the sparse batch (rows and targets still name the same tokens) and trains."""
    from vlmprune.testbed.model import build_model, build_processor, build_tokenizer
    from vlmprune.testbed.recipe.batch import llm_batch
    from vlmprune.testbed.recipe.dropout import sparse_image_batch

    tok = build_tokenizer()
    processor = build_processor(tok)
    cfg = tiny_config(guide_weight=0.3, guide_rows="words", guide_layers=(0,), guide_heads=2, bg_keep=0.2,
                      guide_position=True, guide_position_layers=(1, 1), families=("position", "color"), turns=4)
    batch = llm_batch(cfg, 0, processor)
    group = batch["guide"]["extra"][0]
    assert group["rows"].any() and group["layer"] == 1
    assert batch["guide"]["layer_rows"][1].any()  # the shape words re-fetch their patches on layer 1
    model = build_model(tok, seed=0, vision=TINY["vision_overrides"], text=TINY["text_overrides"]).eval()
    ids = batch["input_ids"]
    keep = batch.pop("keep_image")
    sparse, kept_ids, guide = sparse_image_batch(model, {k: v for k, v in batch.items() if k != "guide"}, keep,
                                                 ids, batch["guide"])
    before, after = group, guide["extra"][0]
    assert before["rows"].sum() == after["rows"].sum() and before["targets"].sum() == after["targets"].sum()
    for (b0, r0), (b1, r1) in zip(before["rows"].nonzero().tolist(), after["rows"].nonzero().tolist()):
        assert b0 == b1 and ids[b0, r0] == kept_ids[b1, r1]
        for h in range(2):
            assert ids[b0, before["targets"][b0, h, r0]].tolist() == kept_ids[b1, after["targets"][b1, h, r1]].tolist()
    cfg = tiny_config(out=str(tmp_path / "p"), vision_steps=1, llm_steps=2, cls_steps=0, checkpoint_every=1,
                      guide_weight=0.3, guide_rows="words", guide_layers=(0,), guide_heads=2, bg_keep=0.2,
                      guide_position=True, guide_position_layers=(1, 1), families=("position",))
    train(cfg, progress=False, log=lambda *_: None)
    hist = [json.loads(line) for line in (tmp_path / "p" / "history.jsonl").read_text().splitlines()]
    assert all(h["guide"] > 0 for h in hist if h["stage"] == 2)
    with pytest.raises(ValueError, match="guide_position needs"):
        TrainConfig(guide_rows="answer", guide_read_layers=None, guide_count=False, guide_read_stop=False,
                    guide_read_prev=False, guide_position=True).validate()


def test_code_prev_targets_small_case():
    """Each code cell after the first targets the image token on its left; nothing else is touched."""
    from vlmprune.testbed.scenes import GRID
    from vlmprune.testbed.recipe.guide_targets import code_prev_targets

    scene = make_scene(7, text=True)
    n, first = len(scene.text.code), scene.text.row * GRID + scene.text.col
    offset = 5  # five text tokens before the image
    L = offset + GRID * GRID + 3
    image = torch.zeros(2, L, dtype=torch.bool)
    image[:, offset:offset + GRID * GRID] = True
    rows, targets = torch.zeros(2, L, dtype=torch.bool), torch.zeros(2, L, L, dtype=torch.bool)
    code_prev_targets(image, [scene, make_scene(7, text=False)], rows, targets)
    want = [offset + first + k for k in range(1, n)]
    assert rows[0].nonzero()[:, 0].tolist() == want and not rows[1].any()
    assert [targets[0, r].nonzero()[:, 0].tolist() for r in want] == [[r - 1] for r in want]
    assert targets.sum() == n - 1


def test_read_prev_rows_go_to_the_word_layers():
    from vlmprune.testbed.model import build_processor, build_tokenizer
    from vlmprune.testbed.recipe.batch import llm_batch

    processor = build_processor(build_tokenizer())
    cfg = tiny_config(guide_weight=0.1, guide_rows="words+read", guide_layers=(0,), guide_read_layers=(2,),
                      text_prob=1.0, families=("read",), turns=2, guide_read_prev=True, bg_keep=0.2)
    batch = llm_batch(cfg, 0, processor)
    g = batch["guide"]
    image = batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")
    prev = g["layer_rows"][0] & image
    assert prev.any() and not (g["layer_rows"][2] & image).any()
    assert (batch["keep_image"].sum(1) < image.sum(1)).all()  # background dropped, yet every guided cell is kept
    kept = torch.zeros_like(image)
    kept[image] = batch["keep_image"].reshape(-1)
    assert kept[prev].all() and all(kept[b, g["targets"][b, r]].all() for b, r in prev.nonzero().tolist())
    with pytest.raises(ValueError, match="guide_read_prev"):
        TrainConfig(guide_rows="words", guide_read_layers=None, guide_read_stop=False, guide_read_prev=True).validate()
