"""``vlmprune train atp``: data, a few steps on a tiny saved LLaVA, resume, LoRA, ablations, errors, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vlmprune
from vlmprune.cli import app
from vlmprune.testbed.prompt import format_prompt
from vlmprune.train.atp import ATPTrainConfig, make_batch, resolve_target

from atp_helpers import make_tiny_testbed

FAST = ["--steps", "2", "--batch-size", "2", "--checkpoint-every", "1", "--eval-n", "4", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_testbed(tmp_path_factory.mktemp("tiny") / "model")


def _run(*args: str):
    res = CliRunner().invoke(app, ["train", "atp", *args])
    return res


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "atp_weights.safetensors"))


def test_batches_mark_the_first_question_as_instruction_and_train_on_answers(tiny):
    from vlmprune.testbed.model import load

    model, processor = load(tiny)
    tok = processor.tokenizer
    img = model.config.image_token_id
    b = make_batch(processor, [0, 1, 2, 3], image_token_id=img, num_image_tokens=16, turns=2)
    ids, labels, mask, instr = b["input_ids"], b["labels"], b["attention_mask"], b["instruction"]
    assert b["pixel_values"].shape == (4, 3, 56, 56)
    for row in range(4):
        n = int(mask[row].sum())
        assert bool(mask[row, :n].all()) and not bool(mask[row, n:].any())  # right padding
        last_img = int((ids[row] == img).nonzero().max())
        cols = instr[row].nonzero().flatten()
        assert int(cols.min()) == last_img + 1  # the question right after the image ...
        assert bool((labels[row, cols] == -100).all())  # ... never an answer
        text = tok.decode(ids[row, cols])
        assert text.endswith("ASSISTANT:") and text.count("ASSISTANT:") == 1  # first turn only
        # the first turn is tokenised exactly like the evaluation prompt the processor builds
        question = text.strip().split(" Answer with one word.")[0]
        ref = processor(text=format_prompt(question), images=[torch.zeros(3, 56, 56)], return_tensors="pt")["input_ids"][0]
        assert torch.equal(ids[row, : len(ref)], ref) and int(cols.max()) == len(ref) - 1
        ans = labels[row][labels[row] != -100]
        assert len(ans) >= 4 and int(ans[-1]) == tok.eos_token_id  # two answers, each ending with </s>


def test_default_target_is_the_testbed_equivalent_of_144():
    cfg = ATPTrainConfig()
    assert resolve_target(cfg, (0, 1, 2, 3, 4), 6, 576) == pytest.approx(178.76, abs=0.01)
    assert resolve_target(ATPTrainConfig(paper_target=88), (0, 1, 2, 3, 4), 6, 576) == pytest.approx(127.26, abs=0.01)
    assert resolve_target(ATPTrainConfig(target=150.0), (0, 1, 2, 3, 4), 6, 576) == 150.0


def test_train_resume_and_load(tiny, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = ["--model", str(tiny), "--batch-size", "2", "--checkpoint-every", "1", "--eval-n", "4", "--no-progress"]
    r = _run("--out", str(straight), "--steps", "3", *base)
    assert r.exit_code == 0, r.output
    r = _run("--out", str(resumed), "--steps", "3", "--stop-after", "2", *base)
    assert r.exit_code == 0, r.output
    assert "stopped after step 2 of 3" in r.output and not (resumed / "summary.json").exists()
    first = torch.load(resumed / "train_state.pt", weights_only=False)["seconds"]
    assert first > 0
    r = _run("--out", str(resumed), "--steps", "3", *base)
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and "at step 2" in r.output
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the straight run
    from vlmprune.train.atp import build_pruner
    init = build_pruner(ATPTrainConfig(), 4, 16, (4, 4)).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # and the run did train
    hist = [json.loads(l) for l in (resumed / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [0, 1, 2]
    assert json.loads((resumed / "summary.json").read_text())["seconds"] >= first  # training time over both calls
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval"]["n"] == 4
    assert summary["target"] == pytest.approx(resolve_target(ATPTrainConfig(), (0, 1, 2), 4, 16))
    # small weights, loadable by apply(); generation works
    assert (straight / "atp_weights.safetensors").stat().st_size < 2_000_000
    from vlmprune.testbed.model import load

    model, processor = load(tiny)
    with vlmprune.pruned(model, "atp", checkpoint=str(straight)) as handle:
        inputs = processor(images=[torch.zeros(3, 56, 56)], text=[format_prompt("How many stars are there?")],
                           return_tensors="pt")
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert len(handle.stats.module_counts[0]) == 3
    # the eval harness reads the all-layer average per sample from the handle
    from vlmprune.eval.data import shapesvqa_items
    from vlmprune.eval.harness import evaluate

    items = shapesvqa_items("test", "count,exist", 2)
    res = evaluate(model, processor, items, method="atp", method_options={"checkpoint": str(straight)},
                   batch_size=4, max_new_tokens=2, progress=False)
    assert res.n == 4 and 4.75 <= res.mean_visual_tokens <= 16


def test_lora_adapters_are_trained_and_saved(tiny, tmp_path):
    out = tmp_path / "lora"
    r = _run("--model", str(tiny), "--out", str(out), "--lora", *FAST)
    assert r.exit_code == 0, r.output
    again = tmp_path / "lora-resumed"  # interrupted after one step and resumed: identical adapters and modules
    assert _run("--model", str(tiny), "--out", str(again), "--lora", "--stop-after", "1", *FAST).exit_code == 0
    r = _run("--model", str(tiny), "--out", str(again), "--lora", *FAST)
    assert r.exit_code == 0 and "at step 1" in r.output, r.output
    from safetensors.torch import load_file as _lf
    for name in ("lora/adapter_model.safetensors", "atp_weights.safetensors"):
        a, b = _lf(str(out / name)), _lf(str(again / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (out / "lora" / "adapter_config.json").exists() and (out / "model" / "config.json").exists()
    from safetensors.torch import load_file

    lora = load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert any("language_model" in k and "lora_B" in k and float(v.abs().sum()) > 0 for k, v in lora.items())
    assert not any("vision_tower" in k for k in lora)
    from vlmprune.testbed.model import load

    merged, processor = load(out / "model")
    with vlmprune.pruned(merged, "atp", checkpoint=str(out)):
        inputs = processor(images=[torch.zeros(3, 56, 56)], text=[format_prompt("Is there a red star?")],
                           return_tensors="pt")
        with torch.no_grad():
            merged(**inputs)


def test_fixed_ratio_with_a_frozen_llm_needs_no_training(tiny, tmp_path):
    out = tmp_path / "fixed"
    r = _run("--model", str(tiny), "--out", str(out), "--fixed-ratio", "--target", "8", *FAST)
    assert r.exit_code == 0, r.output
    assert "nothing to train" in r.output
    cfg = json.loads((out / "atp_config.json").read_text())["config"]
    assert cfg["fixed_ratio"] is not None and cfg["target"] == 8.0
    assert json.loads((out / "summary.json").read_text())["eval"]["average"] == pytest.approx(8.0, abs=1.0)


def test_ablation_flags_reach_the_saved_config(tiny, tmp_path):
    out = tmp_path / "ablation"
    r = _run("--model", str(tiny), "--out", str(out), "--score", "cross", "--no-spatial", "--layers", "0,2",
             "--budget-count", "soft", *FAST)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "atp_config.json").read_text())["config"]
    assert cfg["score"] == "cross" and cfg["spatial"] is False and cfg["layers"] == [0, 2]
    assert set(_weights(out)) == {"atp.0.fc.weight", "atp.0.fc.bias", "atp.0.head_r.weight", "atp.0.head_r.bias",
                                  "atp.2.fc.weight", "atp.2.fc.bias", "atp.2.head_r.weight", "atp.2.head_r.bias"}


def test_bad_inputs_give_clear_errors(tiny, tmp_path):
    cases = [
        (["--train", "full"], "train must be one of"),
        (["--score", "both2"], "score must be one of"),
        (["--no-redundant", "--no-spatial"], "cannot both be disabled"),
        (["--target", "1"], "unreachable"),
        (["--layers", "0,a"], "--layers must be"),
        (["--layers", "0,3"], "layers"),
        (["--model", str(tmp_path / "nope")], "could not load model"),
    ]
    for args, msg in cases:
        r = _run("--out", str(tmp_path / "bad"), *(["--model", str(tiny)] if "--model" not in args else []),
                 *args, *FAST)
        assert r.exit_code == 2, (args, r.output)
        assert "error:" in r.output and msg in r.output, (args, r.output)
    out = tmp_path / "run"
    assert _run("--model", str(tiny), "--out", str(out), *FAST).exit_code == 0
    r = _run("--model", str(tiny), "--out", str(out), "--lr", "0.1", *FAST)
    assert r.exit_code == 2 and "different options" in r.output and "lr" in r.output


def test_viz_plumbing(tiny, tmp_path):
    out = tmp_path / "run"
    assert _run("--model", str(tiny), "--out", str(out), *FAST).exit_code == 0
    r = CliRunner().invoke(app, ["train", "atp-viz", str(out), "--model", str(tiny), "--out", str(tmp_path / "viz"),
                                 "--seed", "0", "--n", "18", "--batch-size", "9"])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "viz" / "records.json").read_text())
    assert len(rec["overlays"]) == 2 and len(rec["complexity"]) == 18
    assert {r["n_objects"] for r in rec["complexity"]} == set(range(1, 10))
    first = rec["overlays"][0]
    assert [sum(g) for g in first["grids"]] == first["module_counts"]
    for name in ("overlays.png", "complexity.png"):
        assert (tmp_path / "viz" / name).stat().st_size > 10_000


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(tiny, tmp_path):
    """Two CPU processes with DDP (gloo). Note: ``accelerate launch --cpu --num_processes 2`` starts ONE process
    (accelerate's simple launcher; several CPU processes need mpirun) — ``--multi_gpu`` starts two via torchrun,
    and the trainer switches accelerate to its multi-CPU mode when there is no CUDA."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vlmprune.train.cli", "atp",
           "--model", str(tiny), "--out", str(out), "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1",
           "--eval-n", "4", "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("done:") == 2  # two processes ran ...
    assert res.stdout.count("step 2: loss") == 1  # ... and only the main one logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == 2
    model_w = _weights(out)
    assert all(torch.isfinite(v).all() for v in model_w.values())
