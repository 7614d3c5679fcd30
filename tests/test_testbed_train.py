"""The testbed training recipe: runs end to end on a tiny architecture and resumes exactly."""

import json

import torch

from vlmprune.testbed.model import load
from vlmprune.testbed.train import TrainConfig, conversation, encode_conversation, train
from vlmprune.testbed.scenes import make_scene

TINY = dict(vision_overrides=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  projection_dim=32),
            text_overrides=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2),
            vision_batch=2, llm_batch=2, cls_batch=2, warmup=1, turns=3)


def _state(path):
    return torch.load(path / "train_state.pt", weights_only=False)


def test_three_stages_resume_exactly(tmp_path):
    straight = TrainConfig(out=str(tmp_path / "a"), vision_steps=2, llm_steps=2, cls_steps=2, checkpoint_every=1, **TINY)
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
    cfg = TrainConfig(out=str(tmp_path / "c"), vision_steps=1, llm_steps=1, cls_steps=0, checkpoint_every=1, **TINY)
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
