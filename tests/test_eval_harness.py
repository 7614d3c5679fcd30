"""Evaluation harness on a tiny model saved locally with the real testbed tokenizer and processor.

The tiny model is random, so its answers are nonsense, but they are deterministic: single vs
batched runs and save/load round trips must agree exactly.
"""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from vlmprune.eval.data import EvalItem, jsonl_items, parse_families, shapesvqa_items
from vlmprune.eval.harness import evaluate, run_items, summarize, wilson_interval
from vlmprune.testbed.model import load

@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return load(tiny_dir)


def test_tokenizer_and_processor_round_trip(tiny):
    _, proc = tiny
    tok = proc.tokenizer
    text = "USER: What is written in the image? Answer with one word. ASSISTANT: k7qz"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    items = shapesvqa_items("test", "count", 1)
    batch = proc(images=[items[0].image()], text=["USER: <image>\nHi"], return_tensors="pt")
    image_id = tok.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 576
    assert batch["pixel_values"].shape == (1, 3, 336, 336)


def test_save_load_round_trip_gives_identical_logits(tiny, tmp_path):
    model, proc = tiny
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    again, proc2 = load(tmp_path)
    item = shapesvqa_items("test", "color", 1)[0]
    inputs = proc(images=[item.image()], text=[f"USER: <image>\n{item.question} ASSISTANT:"], return_tensors="pt")
    inputs2 = proc2(images=[item.image()], text=[f"USER: <image>\n{item.question} ASSISTANT:"], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], inputs2["input_ids"])
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, again(**inputs2).logits)


def test_single_and_batched_answers_agree(tiny):
    model, proc = tiny
    items = shapesvqa_items("test", "exist,read", 3)
    singles, _ = run_items(model, proc, items, batch_size=1, max_new_tokens=4, progress=False)
    batched, _ = run_items(model, proc, items, batch_size=6, max_new_tokens=4, progress=False)
    assert [r.prediction for r in singles] == [r.prediction for r in batched]
    assert all(r.visual_tokens == 576 for r in batched)


def test_evaluate_summary(tiny):
    model, proc = tiny
    items = shapesvqa_items("test", "count", 4)
    res = evaluate(model, proc, items, batch_size=4, max_new_tokens=3, progress=False)
    assert res.n == 4 and [f.family for f in res.families] == ["count"]
    assert 0 <= res.families[0].ci_low <= res.families[0].accuracy <= res.families[0].ci_high <= 1
    assert res.mean_visual_tokens == 576


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(50, 100)  # textbook: 0.4038 .. 0.5962
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_summarize_retention_and_means():
    from vlmprune.eval.harness import ItemResult
    rs = [ItemResult("a", "x", "1", "1", True, 10), ItemResult("b", "x", "1", "2", False, 20),
          ItemResult("c", "y", "1", "1", True, 30)]
    base = summarize("base", None, {}, rs, 1.0)
    assert base.mean_accuracy == pytest.approx((0.5 + 1.0) / 2)
    assert base.mean_visual_tokens == pytest.approx(20)
    half = summarize("m", "random", {}, rs[:2] + [ItemResult("c", "y", "1", "0", False, 5)], 2.0, baseline=base)
    assert half.retention == pytest.approx(0.25 / 0.75)
    assert half.questions_per_s == pytest.approx(1.5)


def _write_jsonl(tmp_path, lines):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_jsonl_path(tiny, tmp_path):
    model, proc = tiny
    items = shapesvqa_items("test", "color", 2)
    lines = []
    for k, it in enumerate(items):
        it.image().save(tmp_path / f"img{k}.png")
        lines.append(json.dumps({"image": f"img{k}.png", "question": it.question, "answer": it.answer}))
    loaded = jsonl_items(_write_jsonl(tmp_path, lines))
    assert [i.question for i in loaded] == [i.question for i in items]
    a, _ = run_items(model, proc, loaded, batch_size=2, max_new_tokens=3, progress=False)
    b, _ = run_items(model, proc, items, batch_size=2, max_new_tokens=3, progress=False)
    assert [r.prediction for r in a] == [r.prediction for r in b]  # PNG round trip is lossless


def test_jsonl_records_of_several_images(tiny, tmp_path):
    """{"image": [files]}: the images one after the other before the question (text template: one
    <image> line each); batched with one-image items == each alone; unpruned, an item feeds the LLM
    all its images' tokens; a pruning method runs on them."""
    from vlmprune.eval.prompts import prompt_style

    model, proc = tiny
    items = shapesvqa_items("test", "color", 3)
    for k, it in enumerate(items):
        it.image().save(tmp_path / f"img{k}.png")
    lines = [json.dumps({"image": ["img0.png", "img1.png"], "question": items[0].question, "answer": items[0].answer}),
             json.dumps({"image": ["img2.png"], "question": items[2].question, "answer": items[2].answer})]
    two, one = jsonl_items(_write_jsonl(tmp_path, lines))
    assert (two.num_images, one.num_images) == (2, 1) and one.image_paths is None
    assert [im.size for im in two.pixels()] == [items[0].image().size] * 2
    build = prompt_style(proc).build
    assert build("q", images=2) == build("q").replace("<image>", "<image>\n<image>", 1)
    n = model.config.image_seq_length
    batched, _ = run_items(model, proc, [two, one], batch_size=2, max_new_tokens=3, progress=False)
    singles = [run_items(model, proc, [it], batch_size=1, max_new_tokens=3, progress=False)[0][0] for it in (two, one)]
    assert [r.visual_tokens for r in batched] == [2 * n, n]
    assert [r.prediction for r in batched] == [r.prediction for r in singles]
    pruned = evaluate(model, proc, [two, one], method="prumerge+", batch_size=2, max_new_tokens=3, progress=False)
    assert pruned.n == 2 and pruned.mean_visual_tokens < 1.5 * n
    atp = evaluate(model, proc, [two, one], method="atp", method_options={"fixed_ratio": 0.5}, batch_size=2,
                   max_new_tokens=3, progress=False)
    assert atp.n == 2 and atp.mean_visual_tokens < 1.5 * n
    with pytest.raises(ValueError, match=r"data.jsonl:1: the question holds the placeholder '<image>'"):
        run_items(model, proc, jsonl_items(_write_jsonl(tmp_path, [json.dumps(
            {"image": ["img0.png", "img1.png"], "question": "Compare <image> and the other", "answer": "a"})])),
            progress=False)
    for rec, match in (({"image": [], "question": "q", "answer": "a"}, "image must be a file or a non-empty list"),
                       ({"image": ["img0.png", 3], "question": "q", "answer": "a"}, "image must be a file or a non-empty list")):
        with pytest.raises(ValueError, match=r"data.jsonl:1: " + match):
            jsonl_items(_write_jsonl(tmp_path, [json.dumps(rec)]))


def test_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="JSONL file not found"):
        jsonl_items(tmp_path / "nope.jsonl")
    p = _write_jsonl(tmp_path, ['{"image": "missing.png", "question": "q", "answer": "a"}'])
    with pytest.raises(FileNotFoundError, match=r"data.jsonl:1: image file not found"):
        jsonl_items(p)
    p = _write_jsonl(tmp_path, ["{not json"])
    with pytest.raises(ValueError, match=r"data.jsonl:1: not valid JSON"):
        jsonl_items(p)
    p = _write_jsonl(tmp_path, ['{"image": "x.png", "question": "q"}'])
    with pytest.raises(ValueError, match="missing or non-string field.*answer"):
        jsonl_items(p)


def test_jsonl_video_records_and_their_errors(tmp_path):
    """{"video": [frames]} records: frames resolved and decoded up front, item.visual "video"; every
    malformed record is one error naming its line."""
    from PIL import Image

    from vlmprune.eval.harness import _batches

    for k in range(3):
        Image.new("RGB", (20, 10), (80 * k, 0, 0)).save(tmp_path / f"f{k}.png")
    p = _write_jsonl(tmp_path, [json.dumps({"video": ["f0.png", "f1.png", "f2.png"], "question": "q", "answer": "a"}),
                                json.dumps({"image": "f0.png", "question": "q2", "answer": "b"})])
    video, image = jsonl_items(p)
    assert (video.visual, image.visual) == ("video", "image") and video.image_path is None
    assert [f.getpixel((0, 0)) for f in video.pixels()] == [(0, 0, 0), (80, 0, 0), (160, 0, 0)]
    assert image.pixels().size == (20, 10)
    for rec, match in (({"video": ["f0.png"], "image": "f0.png", "question": "q", "answer": "a"}, "give exactly one of image.*got both"),
                       ({"question": "q", "answer": "a"}, "give exactly one of image.*got neither"),
                       ({"video": [], "question": "q", "answer": "a"}, "video must be a non-empty list"),
                       ({"video": "f0.png", "question": "q", "answer": "a"}, "video must be a non-empty list")):
        with pytest.raises(ValueError, match=r"data.jsonl:1: " + match):
            jsonl_items(_write_jsonl(tmp_path, [json.dumps(rec)]))
    with pytest.raises(FileNotFoundError, match=r"data.jsonl:1: video file not found: .*nope.png"):
        jsonl_items(_write_jsonl(tmp_path, [json.dumps({"video": ["f0.png", "nope.png"], "question": "q",
                                                        "answer": "a"})]))
    # batches: consecutive runs of one kind, at most batch_size items each
    kinds = [EvalItem(str(k), "f", "q", "a", video_paths=("x",) if v else None) for k, v in enumerate("IIVVVIV")]
    kinds = [dataclasses.replace(it, video_paths=None) if c == "I" else it for it, c in zip(kinds, "IIVVVIV")]
    assert [[it.id for it in b] for b in _batches(kinds, 2)] == [["0", "1"], ["2", "3"], ["4"], ["5"], ["6"]]
    assert _batches([], 4) == []


def test_bad_family_and_template(tiny):
    with pytest.raises(ValueError, match="unknown question family"):
        parse_families("exist,colour")
    model, proc = tiny
    with pytest.raises(ValueError, match="prompt_template"):
        run_items(model, proc, [EvalItem("i", "x", "q", "a", seed=1)], prompt_template="no placeholders")


def test_unknown_method_is_a_clear_error(tiny):
    model, proc = tiny
    with pytest.raises(ValueError, match=r"unknown pruning method 'prumerge\+\+'"):
        evaluate(model, proc, shapesvqa_items("test", "count", 1), method="prumerge++", progress=False)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlmprune.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_eval_writes_tables(tiny_dir, tmp_path):
    r = _cli("eval", "--model", str(tiny_dir), "--families", "count,exist", "--n", "2", "--max-new-tokens", "2",
             "--out", str(tmp_path / "o"), "--no-progress")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    assert res[0]["n"] == 4 and {f["family"] for f in res[0]["families"]} == {"count", "exist"}
    assert "| method |" in (tmp_path / "o" / "results.md").read_text()


def test_cli_bad_inputs(tiny_dir, tmp_path):
    r = _cli("eval", "--model", str(tiny_dir), "--method", "nosuch")
    assert r.returncode == 2 and "unknown pruning method 'nosuch'" in r.stderr
    r = _cli("eval", "--model", str(tiny_dir), "--families", "colour")
    assert r.returncode == 2 and "unknown question family" in r.stderr
    r = _cli("eval", "--model", str(tmp_path / "no-model"), "--n", "1")
    assert r.returncode == 2 and "could not load model" in r.stderr and "no model folder at" in r.stderr
    r = _cli("testbed", "check", "--model", str(tmp_path / "no-model"), "--n", "1")
    assert r.returncode == 2 and "no model folder at" in r.stderr


@pytest.mark.slow
def test_accelerate_two_processes_match_single(tiny_dir, tmp_path):
    """Data-parallel evaluation with 2 CPU processes gives the same per-item answers as 1 process."""
    common = ["eval", "--model", str(tiny_dir), "--families", "count,color", "--n", "3", "--max-new-tokens", "2",
              "--no-progress", "--batch-size", "2"]
    r1 = _cli(*common, "--out", str(tmp_path / "one"))
    assert r1.returncode == 0, r1.stderr
    # `accelerate launch --cpu` starts one process; --multi_gpu starts two via torchrun, and the
    # harness switches accelerate to its multi-CPU (gloo) mode when there is no CUDA.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vlmprune.cli", *common,
           "--out", str(tmp_path / "two")]
    r2 = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r2.returncode == 0, r2.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())["results"][0]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["results"][0]
    assert one["extra"]["processes"] == 1 and two["extra"]["processes"] == 2
    assert [i["id"] for i in two["items"]] == [i["id"] for i in one["items"]]
    assert [i["prediction"] for i in two["items"]] == [i["prediction"] for i in one["items"]]


# ------------------------------------------------------------------ chat templates

CHAT = ("<s>{% for m in messages %}[{{ m['role'] }}] {% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def chat_dir(tiny_dir, tmp_path_factory):
    """The tiny saved model again, its processor carrying a chat template."""
    import shutil

    from transformers import AutoProcessor

    d = tmp_path_factory.mktemp("tiny_chat")
    shutil.copytree(tiny_dir, d, dirs_exist_ok=True)
    proc = AutoProcessor.from_pretrained(d)
    proc.chat_template = CHAT
    proc.save_pretrained(d)
    return d


def test_prompt_style_rules(tiny, chat_dir):
    from vlmprune.eval.prompts import prompt_style
    from vlmprune.testbed.prompt import PROMPT_TEMPLATE

    _, proc = tiny  # the testbed's processor has no chat template: the ShapesVQA template
    style = prompt_style(proc)
    assert not style.chat and style.description == PROMPT_TEMPLATE and style.add_special_tokens
    assert style.build("How many?") == PROMPT_TEMPLATE.format(question="How many?")
    _, chat = load(chat_dir)
    style = prompt_style(chat)
    assert style.chat and not style.add_special_tokens and "chat template" in style.description
    text = style.build("How many?")
    assert text == "<s>[user] <image>\nHow many?[assistant]"  # (the newline after a block tag is trimmed)
    ids = chat(images=[shapesvqa_items("test", "count", 1)[0].image()], text=[text], add_special_tokens=False,
               return_tensors="pt")["input_ids"][0].tolist()
    tok = chat.tokenizer
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's BOS, once
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 576
    assert prompt_style(chat, "Q: <image> {question} A:").build("x") == "Q: <image> x A:"  # explicit wins


def test_chat_template_prompts_are_what_eval_feeds(chat_dir, tmp_path):
    """run_items with the chat template == run_items with that rendered prompt as the template."""
    model, chat = load(chat_dir)
    items = shapesvqa_items("test", "exist", 2)
    auto, _ = run_items(model, chat, items, batch_size=2, max_new_tokens=3, progress=False)
    # the same prompt written as a plain template (no BOS in it: the processor adds its own)
    manual, _ = run_items(model, chat, items, batch_size=2, max_new_tokens=3, progress=False,
                          prompt_template="[user] <image>\n{question}[assistant]")
    assert [r.prediction for r in auto] == [r.prediction for r in manual]


def test_cli_eval_jsonl_with_chat_template(chat_dir, tmp_path):
    items = shapesvqa_items("test", "color", 2)
    lines = []
    for k, it in enumerate(items):
        it.image().save(tmp_path / f"img{k}.png")
        lines.append(json.dumps({"image": f"img{k}.png", "question": it.question, "answer": it.answer}))
    data = _write_jsonl(tmp_path, lines)
    r = _cli("eval", "--model", str(chat_dir), "--data", str(data), "--max-new-tokens", "2", "--no-progress",
             "--no-baseline", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "o" / "results.json").read_text())
    assert out["results"][0]["n"] == 2
    assert "chat template" in out["run"]["generation"]["prompt_template"]


def test_cli_eval_records_the_rule_for_several_images(tiny_dir, tmp_path):
    """A JSONL file with a record of several images, through the text template: the results say how
    its prompt was built, and the two-image record fed both images' tokens."""
    items = shapesvqa_items("test", "color", 2)
    for k, it in enumerate(items):
        it.image().save(tmp_path / f"img{k}.png")
    data = _write_jsonl(tmp_path, [json.dumps({"image": ["img0.png", "img1.png"], "question": items[0].question,
                                               "answer": items[0].answer})])
    r = _cli("eval", "--model", str(tiny_dir), "--data", str(data), "--max-new-tokens", "2", "--no-progress",
             "--no-baseline", "-m", "fastv:k=1", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "o" / "results.json").read_text())
    assert out["run"]["generation"]["prompt_template"].endswith("(a record of several images: one <image> line each)")
    assert out["results"][0]["n"] == 1
