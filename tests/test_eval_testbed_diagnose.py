"""Diagnostics of a decoder under training (docs/testbed.md): run on a tiny model, right shapes, export round-trips."""

from dataclasses import asdict

import torch

from vlmprune.eval import testbed_diagnose as diagnose
from vlmprune.testbed.model import build_model, build_processor, build_tokenizer, load
from vlmprune.testbed.recipe.config import TrainConfig

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)


def test_export_and_diagnostics(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path / "run" / "tokenizer")
    model = build_model(tok, seed=1, vision=VISION, text=TEXT)
    cfg = TrainConfig(vision_overrides=VISION, text_overrides=TEXT)
    torch.save({"config": asdict(cfg), "model": model.state_dict(), "state": {"stage": 2, "step": 7}},
               tmp_path / "run" / "train_state.pt")
    assert diagnose.export(str(tmp_path / "run"), str(tmp_path / "m")) == {"stage": 2, "step": 7}
    loaded, proc = load(tmp_path / "m")
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())

    table = diagnose.answers(loaded, proc, n=2, objects=(1,), families=("color",))
    assert list(table) == [(1, "color")] and 0 <= table[(1, "color")][0] <= table[(1, "color")][1] == 2
    accs = diagnose.linear_probe(loaded, proc, n=20, train=16, steps=3)
    assert len(accs) == TEXT["num_hidden_layers"] + 1 and all(0 <= a <= 1 for a in accs)
    probes = diagnose.corner_probe(loaded, proc, n=12, train=8, steps=3)
    assert list(probes) == ["patch", "word", "answer"]
    assert all(len(a) == TEXT["num_hidden_layers"] + 1 and set(a) <= {0, .25, .5, .75, 1}
               for a in probes.values())  # 4 held-out scenes per probe
    hooks = {name: len(m._forward_hooks) for name, m in loaded.named_modules()}
    share, heads = diagnose.attention_share(loaded, proc, batch_size=2)
    assert 0 < share < 1 and len(heads) == 2 and all(len(h) == 2 for h in heads)
    assert all(0 <= o <= i + 1e-6 <= 1 + 1e-6 for layer in heads for o, i in layer)  # object share within image share
    assert {name: len(m._forward_hooks) for name, m in loaded.named_modules()} == hooks  # the guide's hooks are gone
    n, table = diagnose.binding(loaded, proc, "color", n=4)
    assert n >= 1 and len(table) == 2 and all(len(h) == 2 for h in table)
    assert all(0 <= a and 0 <= b and a + b <= 1 + 1e-5 for layer in table for a, b in layer)
    assert {name: len(m._forward_hooks) for name, m in loaded.named_modules()} == hooks
    res = diagnose.copying(loaded, proc, n=3)
    assert set(res) == {"single", "wrong", "right"} and all(0 <= r <= t and 0 <= w <= t for r, w, t in res.values())


def test_vision_heads_counts_labelled_patches_only(tmp_path):
    """A shape head that always says "circle" is right exactly on the circle patches (background excluded)."""
    from vlmprune.testbed.scenes import SHAPES, make_scene, patch_labels, split_seed
    from vlmprune.testbed.recipe.vision import VisionHeads

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path / "run" / "tokenizer")
    model = build_model(tok, seed=1, vision=VISION, text=TEXT)
    heads = VisionHeads(VISION["hidden_size"])
    with torch.no_grad():
        heads.shape.weight.zero_()
        heads.shape.bias.zero_()
        heads.shape.bias[1 + SHAPES.index("circle")] = 1.0
    cfg = TrainConfig(vision_overrides=VISION, text_overrides=TEXT)
    torch.save({"config": asdict(cfg), "model": model.state_dict(), "heads": heads.state_dict(),
                "state": {"stage": 2, "step": 0}}, tmp_path / "run" / "train_state.pt")
    counts = diagnose.vision_heads(str(tmp_path / "run"), n=3)
    labels = [patch_labels(make_scene(split_seed("val", 500 + i), text=i % 2 == 0)) for i in range(3)]
    circle = 1 + SHAPES.index("circle")
    assert counts["shape"] == (sum(int((lab.shape == circle).sum()) for lab in labels),
                               sum(int((lab.shape > 0).sum()) for lab in labels))
    assert counts["color"][1] == counts["shape"][1]
    assert counts["char"][1] == sum(int((lab.char > 0).sum()) for lab in labels)
    share, scenes = counts["cls_attention_share"]
    assert scenes == 3 and 0 <= share <= 3
    assert sum(t for k, (_, t) in counts.items() if k.startswith("shape@centre/")) == sum(
        len(make_scene(split_seed("val", 500 + i), text=i % 2 == 0).objects) for i in range(3))


def test_run_folder_errors_say_what_is_expected(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="not a training run folder"):
        diagnose.vision_heads(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--out folder of `vlmprune testbed train`"):
        diagnose.export(str(tmp_path), str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_loss_table_averages_stage2_blocks(tmp_path):
    import json

    import pytest

    for name, rows in (("a", [(1, 0, 9.0), (2, 0, 1.0), (2, 1, 3.0), (2, 2, 5.0)]), ("b", [(2, 0, 2.0)])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "history.jsonl").write_text(
            "".join(json.dumps({"stage": st, "step": s, "loss": 0.0, "lm": v}) + "\n" for st, s, v in rows))
    table = diagnose.loss_table([str(tmp_path / "a"), str(tmp_path / "b")], every=2)
    assert table == [(0, [2.0, 2.0]), (2, [5.0, None])]  # stage 1 left out; b has no step 2
    with pytest.raises(FileNotFoundError, match="history.jsonl"):
        diagnose.loss_table([str(tmp_path / "nope")])
