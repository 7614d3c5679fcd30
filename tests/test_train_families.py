"""``vlmprune train atp`` / ``train lora`` on LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL: batches through the
processor's chat template, the training loops, checkpoints, and the trained modules / adapters loaded
back for generate / eval.

Every family runs through the CLI on a saved tiny model with its real processor
(``LlavaNextProcessor``; ``Qwen2VLProcessor``, which ``AutoProcessor`` builds only with torchvision —
its video processor needs it, and torchvision cannot be installed beside this project's torch — so
these folders load through ``compat.load_processor``, for images only, as a user's would).
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import vlmprune
from atp_helpers import (make_tiny_next_folder, make_tiny_onevision_folder, make_tiny_qwen_chat, make_tiny_qwen_folder,
                         make_tiny_video_llava_folder)
from vlmprune.cli import app
from vlmprune.train.data import chat_segments, conversations, make_chat_batch

FAST = ["--batch-size", "2", "--checkpoint-every", "1", "--eval-n", "3", "--no-progress"]


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return make_tiny_next_folder(tmp_path_factory.mktemp("next") / "model")


def _load(folder):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def _run(*args: str):
    return CliRunner().invoke(app, ["train", "atp", *args])


def _one_item_jsonl(folder, index: int):
    """A JSONL file of one ShapesVQA training conversation's first question (image saved beside it)."""
    (image, qa), = conversations([index], 1, 0.5)
    image.save(folder / "img.png")
    data = folder / "data.jsonl"
    data.write_text(json.dumps({"image": "img.png", "question": qa[0][0], "answer": qa[0][1]}) + "\n")
    return data


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "atp_weights.safetensors"))


def test_chat_segments_cut_the_rendered_conversation_at_each_turn(next_dir):
    _, proc = _load(next_dir)
    qa = [("How many stars?", "3"), ("What color is the star?", "red")]
    segs = chat_segments(proc, qa)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa[0][0]}]},
                {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
                {"role": "user", "content": [{"type": "text", "text": qa[1][0]}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    assert "".join(segs) == proc.apply_chat_template(messages, tokenize=False)
    assert segs == ["[user] <image>\nHow many stars?[assistant] ", "3</s>", "[user] What color is the star?[assistant] ",
                    "red</s>"]

    class Rewriting:  # a template that changes earlier turns once one is added cannot be cut
        def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
            return f"{len(messages)} turns"

    with pytest.raises(ValueError, match="renders a conversation differently"):
        chat_segments(Rewriting(), qa)


def test_chat_batches_train_on_answers_and_score_the_first_question(next_dir):
    _, proc = _load(next_dir)
    tok = proc.tokenizer
    img = tok.convert_tokens_to_ids("<image>")
    indices = [0, 1, 2, 3]
    b = make_chat_batch(proc, indices, image_token_id=img, turns=2)
    ids, labels, mask, instr = b["input_ids"], b["labels"], b["attention_mask"], b["instruction"]
    assert b["pixel_values"].shape[0] == 4 and b["image_sizes"].shape == (4, 2)
    for row, (image, qa) in enumerate(conversations(indices, 2, 0.5)):
        n = int(mask[row].sum())
        assert bool(mask[row, :n].all()) and not bool(mask[row, n:].any())  # right padding
        # the whole rendered conversation as the processor tokenises it alone; the template writes
        # no BOS, so the tokenizer's is added, once
        text = "".join(chat_segments(proc, qa))
        single = proc(images=[image], text=[text], return_tensors="pt")
        ref = single["input_ids"][0]
        assert n == len(ref) and torch.equal(ids[row, :n], ref) and int((ref == tok.bos_token_id).sum()) == 1
        assert torch.equal(b["image_sizes"][row], single["image_sizes"][0])
        last_img = int((ref == img).nonzero().max())
        cols = instr[row].nonzero().flatten().tolist()
        assert cols[0] == last_img + 1 and cols == list(range(cols[0], cols[-1] + 1))
        # the first question through the generation prompt (its trailing space is tokenised with the answer)
        assert tok.decode(ids[row, cols]) == "\n" + qa[0][0] + "[assistant]"
        ans = labels[row][labels[row] != -100]
        assert tok.decode(ans) == f" {qa[0][1]}</s> {qa[1][1]}</s>"  # both answers with their EOS, nothing else
        first_answer = int((labels[row] != -100).nonzero().min())
        assert first_answer == cols[-1] + 1  # the answer follows the instruction rows directly


def test_chat_batches_match_a_sentencepiece_tokenisation_of_the_whole_conversation(next_dir):
    """A Metaspace (SentencePiece-style) tokenizer puts a word-start mark at the start of every
    separately tokenised text; the batch's ids are the whole conversation's, and the labels cover
    exactly the answers' tokens of that tokenisation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoProcessor, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "[user]", "[assistant]", "\n"]
    vocab = {w: i for i, w in enumerate(words)}
    for q, a in (qa for _, conv in conversations(range(6), 2, 0.5) for qa in conv):
        for w in f"{q} {a}".replace("?", " ?").split():
            vocab.setdefault("\u2581" + w, len(vocab))
            vocab.setdefault(w, len(vocab))
    vocab.setdefault("\u2581", len(vocab))
    vocab.setdefault("?", len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("?", "isolated"), pre_tokenizers.Metaspace()])
    core.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"additional_special_tokens": ["[user]", "[assistant]"]})
    base = AutoProcessor.from_pretrained(next_dir)
    proc = type(base)(image_processor=base.image_processor, tokenizer=tok, patch_size=14,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                      chat_template=base.chat_template)
    img = tok.convert_tokens_to_ids("<image>")
    b = make_chat_batch(proc, [0, 1, 2], image_token_id=img, turns=2)
    for row, (image, qa) in enumerate(conversations([0, 1, 2], 2, 0.5)):
        whole = proc(images=[image], text=["".join(chat_segments(proc, qa))], add_special_tokens=False,
                     return_tensors="pt")["input_ids"][0]
        n = int(b["attention_mask"][row].sum())
        assert torch.equal(b["input_ids"][row, :n], whole)
        got = tok.convert_ids_to_tokens(b["labels"][row][b["labels"][row] != -100].tolist())
        plain = tok.convert_ids_to_tokens(tok("".join(chat_segments(proc, qa)), add_special_tokens=False)["input_ids"])
        assert "".join(got).replace("\u2581", " ").split("</s>")[:2] == [f" {qa[0][1]}", f" {qa[1][1]}"]
        assert all(t in plain for t in got)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_chat_batches_carry_the_grids_and_token_types(family):
    model, proc = make_tiny_qwen_chat(family)
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    b = make_chat_batch(proc, [4, 5, 6], image_token_id=pad, turns=2)
    assert b["image_grid_thw"].shape == (3, 3)
    merged = (b["image_grid_thw"].prod(1) // 4).tolist()
    assert (b["input_ids"] == pad).sum(1).tolist() == merged
    # the processor's token types (1 on image tokens), 0 over the appended turns and the padding
    assert torch.equal(b["mm_token_type_ids"], (b["input_ids"] == pad).long() * b["attention_mask"])
    with torch.no_grad():
        out = model(**{k: v for k, v in b.items() if k != "instruction"})
    assert torch.isfinite(out.loss)


def test_cli_trains_atp_on_llava_next_resumes_and_loads(next_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = ["--model", str(next_dir), "--steps", "2", "--lr", "0.01", *FAST]
    r = _run("--out", str(straight), *base)
    assert r.exit_code == 0, r.output
    assert "images have their own token counts" in r.output
    r = _run("--out", str(resumed), "--stop-after", "1", *base)
    assert r.exit_code == 0 and "stopped after step 1 of 2" in r.output, r.output
    r = _run("--out", str(resumed), *base)
    assert r.exit_code == 0 and "resumed from" in r.output, r.output
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the straight run
    summary = json.loads((straight / "summary.json").read_text())
    e = summary["eval"]
    assert e["n"] == 3 and e["visual_tokens"] > 9  # several crops per image: more tokens than the 3x3 grid
    # the average in the target's units: each image's kept fraction x N (N = 9, the grid of one crop)
    assert e["average"] == pytest.approx(e["kept_average"] / e["visual_tokens"] * 9)
    hist = [json.loads(line) for line in (straight / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [0, 1] and all(0 < h["avg"] <= 9 for h in hist)

    model, proc = _load(next_dir)
    (image, qa), = conversations([7], 1, 0.5)
    inputs = proc(images=[image, image.resize((120, 60))], text=[chat_segments(proc, qa)[0]] * 2, padding=True,
                  add_special_tokens=False, return_tensors="pt")
    with vlmprune.pruned(model, "atp", checkpoint=str(straight)) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert len(handle.stats.module_counts) == 2 and len(handle.stats.module_counts[0]) == 3


def test_cli_eval_runs_the_trained_modules_on_llava_next(next_dir, tmp_path):
    """`vlmprune eval --model DIR --data FILE.jsonl` on a NeXT folder: chat-template prompts, ATP from a run."""
    run = tmp_path / "run"
    r = _run("--model", str(next_dir), "--out", str(run), "--steps", "1", "--fixed-ratio", *FAST)  # prunes untrained
    assert r.exit_code == 0, r.output
    data = _one_item_jsonl(tmp_path, 3)
    r = CliRunner().invoke(app, ["eval", "--model", str(next_dir), "--data", str(data), "-m", f"atp:checkpoint={run}",
                                 "--max-new-tokens", "2", "--no-progress", "--no-baseline", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "o" / "results.json").read_text())
    assert "chat template" in out["run"]["generation"]["prompt_template"]
    assert out["results"][0]["n"] == 1 and out["results"][0]["mean_visual_tokens"] < 51


def test_a_family_processor_without_chat_template_is_refused_in_one_line(next_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(next_dir, bare)
    (bare / "chat_template.jinja").unlink()
    r = _run("--model", str(bare), "--out", str(tmp_path / "run"), "--steps", "1", *FAST)
    assert r.exit_code == 2 and "has no chat template" in r.output, r.output
    assert not (tmp_path / "run").exists()


FOLDERS = {"qwen2_vl": lambda d: make_tiny_qwen_folder(d, "qwen2_vl"),
           "qwen2_5_vl": lambda d: make_tiny_qwen_folder(d, "qwen2_5_vl"),
           "video_llava": make_tiny_video_llava_folder, "llava_onevision": make_tiny_onevision_folder}


@pytest.mark.filterwarnings("ignore:.*torchvision")
@pytest.mark.parametrize("family", list(FOLDERS))
def test_cli_trains_evaluates_and_benches_a_saved_family_folder(family, tmp_path):
    """`vlmprune train atp` / `eval` / `bench` on a saved folder of the family with its real
    processor (loaded without torchvision, for images only); the trained modules prune in `generate`."""
    from transformers import AutoModelForImageTextToText

    from vlmprune.integrations.compat import load_processor

    folder = FOLDERS[family](tmp_path / "model")
    run = tmp_path / "run"
    r = _run("--model", str(folder), "--out", str(run), "--steps", "2", "--lr", "0.01", *FAST)
    assert r.exit_code == 0, r.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval"]["n"] == 3
    assert [h["step"] for h in map(json.loads, (run / "history.jsonl").read_text().splitlines())] == [0, 1]
    data = _one_item_jsonl(tmp_path, 3)
    r = CliRunner().invoke(app, ["eval", "--model", str(folder), "--data", str(data), "-m", f"atp:checkpoint={run}",
                                 "-m", "prumerge+", "--max-new-tokens", "2", "--no-progress", "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    if importlib.util.find_spec("torchvision") is None:
        notices = [line for line in r.output.splitlines() if "video processor needs torchvision" in line]
        assert len(notices) == 1 and notices[0].startswith("warning: "), r.output
    out = json.loads((tmp_path / "o" / "results.json").read_text())
    assert "chat template" in out["run"]["generation"]["prompt_template"]
    rows = {row["label"]: row for row in out["results"]}
    assert all(row["n"] == 1 for row in rows.values()) and rows.keys() >= {"unpruned", "prumerge+"}, rows.keys()
    assert rows["prumerge+"]["mean_visual_tokens"] < rows["unpruned"]["mean_visual_tokens"]
    r = CliRunner().invoke(app, ["bench", "-M", str(folder), "-m", "prumerge+", "-b", "1", "-b", "2", "--repeats",
                                 "1", "--warmup", "0", "--new-tokens", "2", "--no-memory", "--dtype", "fp32",
                                 "--out", str(tmp_path / "bench")])
    assert r.exit_code == 0, r.output
    if importlib.util.find_spec("torchvision") is None:  # the bench's load says it in one line too
        notices = [line for line in r.output.splitlines() if "video processor needs torchvision" in line]
        assert len(notices) == 1 and notices[0].startswith("warning: "), r.output
    card = json.loads((tmp_path / "bench" / "card.json").read_text())
    assert {(b["batch"], v["label"]) for b in card["results"] for v in b["variants"]} >= {(1, "prumerge+"), (2, "prumerge+")}
    model, proc = AutoModelForImageTextToText.from_pretrained(folder).eval(), load_processor(str(folder))
    b = make_chat_batch(proc, [11, 12], image_token_id=model.config.image_token_id)
    inputs = {k: v for k, v in b.items() if k not in ("labels", "instruction")}
    with vlmprune.pruned(model, "atp", checkpoint=str(run)) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert len(handle.stats.module_counts) == 2 and len(handle.stats.module_counts[0]) == 3


def test_lora_training_on_llava_next_writes_a_merged_model(next_dir, tmp_path):
    run = tmp_path / "run"
    r = _run("--model", str(next_dir), "--out", str(run), "--steps", "1", "--train", "lora", *FAST)
    assert r.exit_code == 0, r.output
    (merged, proc), (base, base_proc) = _load(run / "model"), _load(next_dir)
    assert type(merged) is type(base) and proc.chat_template == base_proc.chat_template
    base_params = dict(base.named_parameters())
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base_params[n])]
    assert changed and all("language_model" in n for n in changed)  # the LoRA-merged LLM projections only


def test_train_lora_with_prumerge_on_llava_next_and_eval_with_the_adapters(next_dir, tmp_path):
    run = tmp_path / "lora"
    r = CliRunner().invoke(app, ["train", "lora", "--model", str(next_dir), "--method", "prumerge+", "--out", str(run),
                                 "--steps", "2", "--batch-size", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "visual tokens" in r.output and "per image" in r.output
    hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [0, 1] and all(0 < h["visual_tokens"] < 51 for h in hist)
    data = _one_item_jsonl(tmp_path, 5)
    r = CliRunner().invoke(app, ["eval", "--model", str(next_dir), "--data", str(data), "-m", f"prumerge+:lora={run}",
                                 "--max-new-tokens", "2", "--no-progress", "--no-baseline", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "results.json").read_text())["results"][0]["n"] == 1


@pytest.mark.filterwarnings("ignore:.*torchvision")
def test_lora_training_on_a_qwen_folder_writes_a_merged_model_that_loads(tmp_path):
    """The merged model's folder keeps the processor loadable (its video processor's config copied
    along although it was loaded for images only) and evaluates."""
    folder = make_tiny_qwen_folder(tmp_path / "model")
    run = tmp_path / "run"
    r = _run("--model", str(folder), "--out", str(run), "--steps", "1", "--train", "lora", *FAST)
    assert r.exit_code == 0, r.output
    if importlib.util.find_spec("torchvision") is None:  # else the stock processor saved its video processor itself
        assert (run / "model" / "video_preprocessor_config.json").is_file()
    data = _one_item_jsonl(tmp_path, 4)
    r = CliRunner().invoke(app, ["eval", "--model", str(run / "model"), "--data", str(data), "-m", "prumerge+",
                                 "--max-new-tokens", "2", "--no-progress", "--no-baseline", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "results.json").read_text())["results"][0]["n"] == 1


def _video_token_id(model) -> int:
    from vlmprune.integrations.base import get_adapter

    return next(v for v in get_adapter(model).modality_views(model) if v.image_modality == "video").image_token_id(model)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="video processors need torchvision (run by make torchvision-check)")
@pytest.mark.parametrize("family", list(FOLDERS))
def test_cli_trains_atp_on_still_videos(family, tmp_path):
    """`vlmprune train atp --videos 4`: batches of 4-frame still videos through the chat template and
    the family's video processor; the held-out count is measured on videos; the modules prune a
    video batch in `generate`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = FOLDERS[family](tmp_path / "model")
    model, proc = AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    video_id = _video_token_id(model)
    b = make_chat_batch(proc, [11, 12], image_token_id=video_id, video_frames=4)
    assert "pixel_values_videos" in b and (b["input_ids"] == model.config.image_token_id).sum() == 0
    placeholders = (b["input_ids"] == video_id).sum(1)
    assert placeholders.min() > 0 and len(set(placeholders.tolist())) == 1  # two scenes, one video geometry
    run = tmp_path / "run"
    r = _run("--model", str(folder), "--out", str(run), "--steps", "2", "--lr", "0.01", "--videos", "4", *FAST)
    assert r.exit_code == 0, r.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["videos"] == 4 and summary["steps"] == 2 and summary["eval"]["n"] == 3
    inputs = {k: v for k, v in b.items() if k not in ("labels", "instruction")}
    with vlmprune.pruned(model, "atp", checkpoint=str(run)) as handle, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert handle.stats.initial_per_image == [int(placeholders[0])] * 2  # each sample's video tokens


def test_training_on_videos_is_refused_in_one_line_where_it_cannot_run(next_dir, tmp_path):
    r = _run("--model", str(next_dir), "--out", str(tmp_path / "run"), "--steps", "1", "--videos", "4", *FAST)
    assert r.exit_code == 2 and r.output.startswith("error: --videos 4: the llava-next family takes no videos"), r.output
    if importlib.util.find_spec("torchvision") is None:
        folder = make_tiny_qwen_folder(tmp_path / "qwen")
        r = _run("--model", str(folder), "--out", str(tmp_path / "run2"), "--steps", "1", "--videos", "4", *FAST)
        assert r.exit_code == 2 and "has no video processor" in r.output and "install torchvision" in r.output, r.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def _video_jsonl(folder):
    """A JSONL file mixing ShapesVQA images and still videos of 4 frames (frames saved beside it)."""
    lines = []
    for k, ((image, qa),) in enumerate(conversations([i], 1, 0.5) for i in (20, 21, 22, 23, 24)):
        image.save(folder / f"s{k}.png")
        visual = {"image": f"s{k}.png"} if k in (0, 3) else {"video": [f"s{k}.png"] * 4}
        lines.append(json.dumps({**visual, "question": qa[0][0], "answer": qa[0][1], "id": f"item{k}"}))
    data = folder / "videos.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="video processors need torchvision (run by make torchvision-check)")
@pytest.mark.parametrize("family", list(FOLDERS))
def test_cli_eval_of_video_records_batched_equals_one_by_one(family, tmp_path):
    """`vlmprune eval --data` with {"video": [frames]} records beside image records: batches of one
    kind, the same answers and visual counts at batch size 3 as one item at a time, and pruning
    cuts the videos' tokens (PruMerge+ keeps the 4 tokens of OneVision's pooled 2x2 frames here: its
    grid step is 1 on a 4-token grid)."""
    folder = FOLDERS[family](tmp_path / "model")
    data = _video_jsonl(tmp_path)
    runs = {}
    for bs in (1, 3):
        r = CliRunner().invoke(app, ["eval", "--model", str(folder), "--data", str(data), "-m", "prumerge+", "-m",
                                     "fastv", "--batch-size", str(bs), "--max-new-tokens", "2", "--no-progress",
                                     "--out", str(tmp_path / f"o{bs}")])
        assert r.exit_code == 0, r.output
        runs[bs] = {row["label"]: row for row in json.loads((tmp_path / f"o{bs}" / "results.json").read_text())["results"]}
    for label, row in runs[3].items():
        one = runs[1][label]
        assert [(i["id"], i["prediction"]) for i in row["items"]] == [(i["id"], i["prediction"]) for i in one["items"]]
        for a, b in zip(row["items"], one["items"]):
            assert a["visual_tokens"] == pytest.approx(b["visual_tokens"], rel=1e-6)
    base = {i["id"]: i["visual_tokens"] for i in runs[3]["unpruned"]["items"]}
    assert base["item1"] == base["item2"] == base["item4"] > 0 and base["item0"] > 0  # one video geometry
    fastv = {i["id"]: i["visual_tokens"] for i in runs[3]["fastv"]["items"]}
    vision = {i["id"]: i["visual_tokens"] for i in runs[3]["prumerge+"]["items"]}
    assert all(fastv[k] < base[k] and vision[k] <= base[k] for k in base)  # (a 2x2 frame may keep all 4)
    assert any(vision[k] < base[k] for k in ("item1", "item2", "item4")) or family == "llava_onevision"


def test_video_records_are_refused_in_one_line_where_they_cannot_run(next_dir, tmp_path):
    data = _video_jsonl(tmp_path)
    r = CliRunner().invoke(app, ["eval", "--model", str(next_dir), "--data", str(data), "--no-progress",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "llava-next family takes no videos" in r.output
    if importlib.util.find_spec("torchvision") is None:
        folder = make_tiny_qwen_folder(tmp_path / "qwen")
        r = CliRunner().invoke(app, ["eval", "--model", str(folder), "--data", str(data), "--no-progress",
                                     "--out", str(tmp_path / "o2")])
        assert r.exit_code == 2 and "has no video processor" in r.output and "install torchvision" in r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_llava_only_commands_refuse_other_families_in_one_line(tmp_path):
    """`train atp-viz` and `testbed check` are the testbed's (LLaVA-1.5: one grid, ShapesVQA prompt):
    on another family's folder they stop with one line before any work."""
    folder = make_tiny_video_llava_folder(tmp_path / "vl")
    r = CliRunner().invoke(app, ["train", "atp-viz", str(tmp_path), "-M", str(folder), "--n", "1",
                                 "--out", str(tmp_path / "viz")])
    assert r.exit_code == 2 and r.output.startswith("error: atp-viz draws LLaVA-1.5 models"), r.output
    r = CliRunner().invoke(app, ["testbed", "check", "-M", str(folder), "--n", "1", "--blank-n", "1",
                                 "--out", str(tmp_path / "check")])
    assert r.exit_code == 2 and "error: testbed check runs on LLaVA-1.5 models" in r.output, r.output
    assert "video-llava model" in r.output and not (tmp_path / "check").exists() and not (tmp_path / "viz").exists()


def test_eval_input_mistakes_are_one_line(tmp_path):
    data = _one_item_jsonl(tmp_path, 2)
    r = CliRunner().invoke(app, ["eval", "--data", str(data), "--families", "count", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith("error: --families chooses ShapesVQA questions"), r.output
    r = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "img.png"), "--data", str(data),
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "img.png is a file; pass the model's folder" in r.output, r.output
    assert not (tmp_path / "o").exists()


def _two_image_jsonl(folder):
    """A JSONL file of a question about two images and one about one image (images saved beside it)."""
    lines = []
    for k, ((image, qa),) in enumerate(conversations([i], 1, 0.5) for i in (21, 22, 23)):
        image.save(folder / f"img{k}.png")
        if k:
            files = ["img0.png", "img1.png"] if k == 1 else ["img2.png"]
            lines.append(json.dumps({"image": files, "question": qa[0][0], "answer": qa[0][1]}))
    data = folder / "multi.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data


@pytest.mark.filterwarnings("ignore:.*torchvision")
@pytest.mark.parametrize("family", ["llava_next", *FOLDERS])
def test_cli_evaluates_questions_about_several_images(family, next_dir, tmp_path):
    """`vlmprune eval --data` with a two-image record beside a one-image one, through the family's
    chat template and processor: unpruned, every item feeds all its images' tokens; vision- and
    decoder-stage methods (ATP included) run on them."""
    folder = next_dir if family == "llava_next" else FOLDERS[family](tmp_path / "model")
    data = _two_image_jsonl(tmp_path)
    r = CliRunner().invoke(app, ["eval", "--model", str(folder), "--data", str(data), "-m", "prumerge+", "-m",
                                 "atp:fixed_ratio=0.5", "-m", "fastv", "--max-new-tokens", "2", "--no-progress",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "o" / "results.json").read_text())
    rows = {row["label"]: row for row in out["results"]}
    assert rows.keys() >= {"unpruned", "prumerge+", "atp fixed_ratio=0.5", "fastv"}, rows.keys()
    assert all(row["n"] == 2 for row in rows.values())
    two, one = (item["visual_tokens"] for item in rows["unpruned"]["items"])
    if family != "llava_onevision":  # (OneVision gives each image of a multi-image sample its base image only)
        assert two == 2 * one  # ShapesVQA images are all one size
    for label in ("prumerge+", "atp fixed_ratio=0.5", "fastv"):
        assert rows[label]["mean_visual_tokens"] < rows["unpruned"]["mean_visual_tokens"], label


@pytest.mark.filterwarnings("ignore:.*torchvision")
def test_an_unreachable_target_on_a_family_of_its_own_image_sizes_says_what_it_counts(tmp_path):
    folder = make_tiny_qwen_folder(tmp_path / "model")
    r = _run("--model", str(folder), "--out", str(tmp_path / "run"), "--target", "8", "--steps", "1")
    assert r.exit_code == 2 and "error: --target 8: target 8.0 is unreachable" in r.output, r.output
    assert "grid of N = 256" in r.output and not (tmp_path / "run" / "train_state.pt").exists()
