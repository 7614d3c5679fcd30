"""The committed testbed checkpoint: a stock LLaVA that loads with the Auto classes, with LLaVA-1.5
geometry, a meaningful [CLS] attention, and exact save/load round trips."""

import pytest
import torch

from vlmprune.eval.testbed_check import cls_attention_share
from vlmprune.testbed.model import CHECKPOINT_DIR, load
from vlmprune.testbed.prompt import format_prompt
from vlmprune.testbed.scenes import make_scene


@pytest.fixture(scope="module")
def testbed():
    return load()


def test_loads_with_auto_classes_and_llava_geometry(testbed):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, proc = testbed
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert isinstance(model, AutoModelForImageTextToText._model_mapping[type(model.config)])
    assert type(proc).__name__ == type(AutoProcessor.from_pretrained(CHECKPOINT_DIR)).__name__ == "LlavaProcessor"
    v, t = model.config.vision_config, model.config.text_config
    assert (v.image_size, v.patch_size) == (336, 14) and model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"  # [CLS] present, dropped before the LLM
    assert t.num_hidden_layers >= 6
    assert model.config._attn_implementation == "sdpa"
    inputs = proc(images=[make_scene(1).image], text=[format_prompt("How many stars are there?")], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576


def test_cls_attention_lands_on_objects(testbed):
    model, proc = testbed
    share = cls_attention_share(model, proc, n_scenes=8)
    # objects and text cover ~5% of the patches; the trained [CLS] puts most of its mass there
    assert share["object_patch_fraction"] < 0.15
    assert share["cls_attention_share_on_objects"] > 0.5


def test_save_load_round_trip_identical_logits(testbed, tmp_path):
    model, proc = testbed
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    again, proc2 = load(tmp_path)
    inputs = proc(images=[make_scene(2).image], text=[format_prompt("What color is the star?")], return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)


def test_load_rejects_an_empty_path():
    with pytest.raises(ValueError, match="empty model path"):
        load("")


def test_package_level_load_is_the_model_loader():
    """The README's ``vlmprune.testbed.load()``; the scene generator imports without it."""
    import vlmprune.testbed as tb

    assert tb.load is load
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tb.nope  # noqa: B018


def test_committed_results_name_the_shipped_testbed_weights():
    """Every results file under docs/results/ that evaluated the testbed names its weights' sha256."""
    import hashlib
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    ckpt = root / "src" / "vlmprune" / "testbed" / "checkpoint" / "model.safetensors"
    expected = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    files = sorted((root / "docs" / "results").rglob("results.json"))
    assert files, "no results files under docs/results"
    for f in files:
        run = json.loads(f.read_text())["run"]
        assert run["model"]["weights_files"] == {"model.safetensors": expected}, f
    # every other JSON there too (tables, probes, bench cards of the testbed): the hash is in it
    others = [f for f in sorted((root / "docs" / "results").rglob("*.json")) if f.name != "results.json"]
    assert others, "no tables / probes / bench cards under docs/results"
    for f in others:
        assert expected in f.read_text(), f"{f} does not name the committed testbed's weights"
