"""LoRA with a vision-stage method: ``vlmprune train lora`` on a tiny saved LLaVA, and ``METHOD:lora=DIR``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vlmprune
from vlmprune.cli import app
from vlmprune.integrations import lora as L

from atp_helpers import make_tiny_testbed
from conftest import (make_inputs, make_next_inputs, make_qwen_inputs, make_tiny_llava, make_tiny_llava_next,
                      make_tiny_qwen2_vl, module_hooks)

FAST = ["--batch-size", "2", "--checkpoint-every", "1", "--no-progress", "--warmup", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_testbed(tmp_path_factory.mktemp("tiny") / "model")


def _train(*args: str):
    return CliRunner().invoke(app, ["train", "lora", *args])


def _randomise_b(injection: L.LoraInjection, seed: int = 0) -> None:
    """Give every LoRA B a non-zero value (a fresh injection has B = 0, a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in injection.parameters().items():
            if ".lora_B." in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()},
            {n: type(m) for n, m in model.named_modules()}, set(vars(model)), module_hooks(model))


def test_training_changes_only_the_lora_parameters(tiny, tmp_path, monkeypatch):
    import vlmprune.train.lora as T
    from vlmprune.testbed.model import load

    model, processor = load(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(T, "load_model", lambda *_a, **_k: (model, processor))  # keep a handle on the trained model
    out = tmp_path / "run"
    cfg = T.LoraTrainConfig(method="prumerge", model=str(tiny), out=str(out), steps=3, batch_size=2, warmup=1,
                            checkpoint_every=1, lr=1e-2)
    T.train_lora(cfg, progress_bar=False, log=lambda _m: None)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # base untouched
    from safetensors.torch import load_file

    saved = load_file(str(out / L.WEIGHTS_NAME))
    names = L.read_folder(out)[2]
    assert len(names) == 4 * 7 and all(".language_model." in n for n in names)  # LLM attention + MLP only
    assert set(saved) == {f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert all(bool(saved[k].abs().sum() > 0) for k in saved if ".lora_B." in k)  # B left zero: trained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["mean_visual_tokens"] < 16  # trained under pruning (N = 16)
    assert (out / L.WEIGHTS_NAME).stat().st_size < 200_000


def test_zero_initialised_lora_equals_the_method_without_lora(tmp_path):
    model = make_tiny_llava()
    inputs = make_inputs(model, prefix_lens=(2, 4), suffix_lens=(5, 3))
    for method in ("prumerge", "prumerge+"):
        with vlmprune.pruned(model, method):
            ref = _logits(model, inputs)
        injection = L.inject(model, L.LoraOptions(r=4), seed=1)  # B = 0
        L.save(injection, tmp_path / "zero")
        injection.remove()
        with vlmprune.pruned(model, method, lora=str(tmp_path / "zero")) as handle:
            assert handle.lora.active
            out = _logits(model, inputs)
        assert torch.equal(out, ref)


def test_save_load_round_trip_gives_identical_logits_and_remove_restores_exactly(tmp_path):
    trained = make_tiny_llava()
    inputs = make_inputs(trained, prefix_lens=(2, 4), suffix_lens=(5, 3))
    with vlmprune.pruned(trained, "prumerge+"):
        injection = L.inject(trained, L.LoraOptions(r=4, alpha=8), seed=3)
        _randomise_b(injection)
        want = _logits(trained, inputs)
        L.save(injection, tmp_path / "a", {"method": "prumerge+"})
        injection.remove()
        plain = _logits(trained, inputs)
    assert not torch.allclose(want, plain, atol=1e-4)  # the adapters do change the model
    fresh = make_tiny_llava()
    unpruned = _logits(fresh, inputs)
    stock = _snapshot(fresh)
    with vlmprune.pruned(fresh, "prumerge+", lora=str(tmp_path / "a")):
        assert torch.equal(_logits(fresh, inputs), want)
    state, grads, types, attrs, hooks = _snapshot(fresh)
    assert state.keys() == stock[0].keys() and all(torch.equal(state[k], stock[0][k]) for k in state)
    assert (grads, types, attrs, hooks) == stock[1:]
    assert torch.equal(_logits(fresh, inputs), unpruned)


def test_cached_generate_with_lora_equals_uncached(tmp_path):
    model = make_tiny_llava()
    inputs = make_inputs(model, prefix_lens=(2, 4), suffix_lens=(5, 3))
    injection = L.inject(model, L.LoraOptions(r=4), seed=2)
    _randomise_b(injection, 1)
    L.save(injection, tmp_path / "a")
    injection.remove()
    with vlmprune.pruned(model, "prumerge", lora=str(tmp_path / "a")):
        with torch.no_grad():
            a = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=True)
            b = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_every_family_names_its_targets_and_round_trips(family, tmp_path):
    if family == "llava_next":
        model = make_tiny_llava_next()
        inputs = make_next_inputs(model, [(42, 42), (28, 56)], (2, 3), (4, 2))
        method = "prumerge+"
    else:
        model = make_tiny_qwen2_vl()
        inputs = make_qwen_inputs([(4, 4), (4, 8)], (2, 3), (4, 2))
        method = "spatial:keep=0.5"
    from vlmprune.integrations.base import get_adapter

    names = get_adapter(model).lora_target_modules(model)
    assert len(names) == 4 * 7 and not any("vision" in n or "visual" in n for n in names)
    stock = _snapshot(model)
    injection = L.inject(model, L.LoraOptions(r=2), seed=0)
    _randomise_b(injection)
    with vlmprune.pruned(model, method):
        want = _logits(model, inputs)
    L.save(injection, tmp_path / "a")
    injection.remove()
    with vlmprune.pruned(model, method, lora=str(tmp_path / "a")):
        assert torch.equal(_logits(model, inputs), want)
    state = model.state_dict()
    assert all(torch.equal(state[k], stock[0][k]) for k in stock[0]) and _snapshot(model)[1:] == stock[1:]


def test_resume_continues_from_the_saved_step(tiny, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = ["--model", str(tiny), "--steps", "3", *FAST]
    r = _train("--out", str(straight), *base)
    assert r.exit_code == 0, r.output
    r = _train("--out", str(resumed), "--stop-after", "2", *base)
    assert r.exit_code == 0, r.output
    assert "stopped after step 2 of 3" in r.output and not (resumed / "summary.json").exists()
    assert torch.load(resumed / "train_state.pt", weights_only=False)["step"] == 2
    r = _train("--out", str(resumed), *base)
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and "at step 2" in r.output
    a, b = L.read_folder(straight)[1], L.read_folder(resumed)[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the straight run
    hist = [json.loads(line) for line in (resumed / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [0, 1, 2]
    # the adapters load with the method on the model they were trained on
    from vlmprune.testbed.model import load

    model, processor = load(tiny)
    from vlmprune.testbed.questions import format_prompt

    inputs = processor(images=[torch.zeros(3, 56, 56)], text=[format_prompt("How many stars are there?")],
                       return_tensors="pt")
    with vlmprune.pruned(model, "prumerge", lora=str(resumed)):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_bad_inputs_are_one_line_errors(tiny, tmp_path):
    cases = [
        (["--method", "fastv"], "needs a vision-stage method"),
        (["--method", "nope"], "unknown pruning method"),
        (["--method", "none"], "prunes nothing"),
        (["--method", "prumerge:keep=0"], "keeps no token"),
        (["--method", f"prumerge:lora={tmp_path}"], "is not a LoRA adapter folder"),
        (["--lora-r", "0"], "rank r must be"),
        (["--lora-dropout", "1.5"], "dropout must be"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--targets", "self_attn.nope"], "no decoder layer"),
        (["--model", str(tmp_path / "nope")], "could not load model"),
        (["--dtype", "fp8"], "--dtype must be"),
    ]
    for args, msg in cases:
        r = _train("--out", str(tmp_path / "bad"), *(["--model", str(tiny)] if "--model" not in args else []),
                   "--steps", "1", *FAST, *args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error:") and msg in r.output and len(r.output.strip().splitlines()) == 1, \
            (args, r.output)
    out = tmp_path / "run"
    assert _train("--model", str(tiny), "--out", str(out), "--steps", "1", *FAST).exit_code == 0
    r = _train("--model", str(tiny), "--out", str(out), "--steps", "1", "--lr", "0.1", *FAST)
    assert r.exit_code == 2 and "different options" in r.output and "lr" in r.output
    # loading: a missing folder is refused when the spec is checked, a foreign adapter when it is applied
    with pytest.raises(ValueError, match="does not exist"):
        vlmprune.registry.check_method_spec(f"prumerge:lora={tmp_path / 'missing'}")
    model = make_tiny_llava(hidden=16)
    stock = _snapshot(model)
    with pytest.raises(ValueError, match="does not fit this model|trained on another model"):
        vlmprune.apply(model, "prumerge", lora=str(out))
    assert getattr(model, "_vlmprune_handle", None) is None  # the failed apply left nothing behind
    state = model.state_dict()
    assert all(torch.equal(state[k], stock[0][k]) for k in stock[0]) and _snapshot(model)[1:] == stock[1:]
