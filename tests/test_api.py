"""The public API: apply / pruned / remove / list_methods, option validation, handles and stats."""

from __future__ import annotations

import math

import pytest
import torch

import vlmprune
from conftest import make_inputs, make_tiny_llava
from vlmprune.integrations.base import UnsupportedModelError, get_adapter
from vlmprune.integrations.handle import HANDLE_ATTR, PruneStats
from vlmprune.integrations.vision import VisionHandle, VisionMethod

VISION_METHODS = ("random", "sequential", "spatial", "cls-topk", "prumerge", "prumerge+")


@pytest.fixture(scope="module")
def model():
    return make_tiny_llava(image_size=56)


def test_list_methods_has_the_vision_methods_with_options():
    listed = {m["name"]: m for m in vlmprune.list_methods()}
    for name in VISION_METHODS:
        assert listed[name]["stage"] == "vision" and listed[name]["summary"]
    assert listed["prumerge+"]["options"] == {"k_neighbors": "32", "merge": "'residual'", "extra_token": "True",
                                              "grid": "'raster'", "order": "'attention'", "keep": "None",
                                              "sim_dtype": "'keys'", "lora": "None"}
    assert listed["prumerge"]["options"]["k_neighbors"] == "32" and "grid" not in listed["prumerge"]["options"]
    assert listed["random"]["options"] == {"keep": "0.25", "seed": "0", "lora": "None"}
    assert listed["cls-topk"]["options"] == {"keep": "None", "order": "'attention'", "lora": "None"}
    assert all(listed[name]["options"]["lora"] == "None" for name in VISION_METHODS)  # LoRA adapters: any method


@pytest.mark.parametrize("name", VISION_METHODS)
def test_every_vision_method_builds_and_declares_its_needs(name):
    from vlmprune import registry

    obj = registry.get_method(name).build()
    assert isinstance(obj, VisionMethod) and obj.name == name
    assert obj.needs_signals == (name in ("cls-topk", "prumerge", "prumerge+"))


@pytest.mark.parametrize("name,options,match", [
    ("random", {"keep": 0}, "keep = 0 keeps no token"),
    ("random", {"keep": -0.5}, "not a ratio in \\(0, 1\\]"),
    ("random", {"keep": True}, "keep must be an int count"),
    ("random", {"keep": "half"}, "keep must be an int count"),
    ("random", {"seed": -1}, "seed must be an int >= 0 or None"),
    ("sequential", {"keep": 2.0}, "not a ratio"),
    ("spatial", {"keep": None}, "keep is required"),
    ("cls-topk", {"order": "random"}, "order must be one of 'attention', 'spatial'"),
    ("prumerge", {"merge": "mean"}, "merge must be one of 'residual', 'average'"),
    ("prumerge", {"k_neighbors": 2.5}, "k_neighbors must be an int >= 0"),
    ("prumerge", {"extra_token": 1}, "extra_token must be True or False"),
    ("prumerge+", {"grid": "hex"}, "grid must be one of 'raster', '2d'"),
    ("prumerge+", {"keep": 0}, "keeps no token"),
    ("prumerge", {"plus": True}, "has no option\\(s\\) plus; its options are: k_neighbors"),
])
def test_bad_options_raise_clear_errors(name, options, match):
    from vlmprune import registry

    with pytest.raises(ValueError, match=match):
        registry.get_method(name).build(**options)


def test_budget_larger_than_n_fails_at_apply(model):
    for name, options in [("random", {"keep": 17}), ("prumerge", {"keep": 99}), ("prumerge+", {"keep": 17})]:
        with pytest.raises(ValueError, match="16"):
            vlmprune.apply(model, name, **options)
    assert getattr(model, HANDLE_ATTR, None) is None


def test_unknown_method_lists_the_known_ones(model):
    with pytest.raises(ValueError, match="unknown pruning method 'pru-merge'; available: .*prumerge.*list_methods"):
        vlmprune.apply(model, "pru-merge")


def test_apply_returns_a_handle_remove_and_context_manager(model):
    inputs = make_inputs(model, (2, 4), (3, 1))
    with torch.no_grad():
        ref = model(**inputs).logits
        handle = vlmprune.apply(model, "prumerge+", k_neighbors=4, grid="2d")
        assert isinstance(handle, VisionHandle) and handle.active and handle.method == "prumerge+"
        assert handle.method_obj.options["grid"] == "2d" and handle.stage == "vision"
        assert "prumerge+" in repr(handle) and "active" in repr(handle)
        assert getattr(model, HANDLE_ATTR) is handle
        model(**inputs)
        assert isinstance(handle.stats, PruneStats) and handle.stats.images == 2
        assert vlmprune.remove(model) is True and not handle.active and "removed" in repr(handle)
        assert vlmprune.remove(model) is False
        with vlmprune.apply(model, "random", keep=3) as h2:  # a handle is a context manager too
            assert model(**inputs).logits.shape[1] == ref.shape[1] - 13
        assert not h2.active and torch.equal(model(**inputs).logits, ref)
        with vlmprune.pruned(model, "cls-topk", keep=2) as h3:
            assert h3.method == "cls-topk"
        assert getattr(model, HANDLE_ATTR, None) is None


def test_unsupported_models_name_the_supported_families():
    with pytest.raises(UnsupportedModelError, match="supported model families: llava \\(LlavaForConditionalGeneration"):
        get_adapter(torch.nn.Module())
    assert issubclass(UnsupportedModelError, ValueError)


def test_stats_dataclass():
    stats = PruneStats(method="x", tokens_per_image=10)
    assert math.isnan(stats.mean_visual_tokens) and stats.images == 0
    stats.record([2, 4])
    stats.record([6])
    assert stats.kept_per_image == [2, 4, 6] and stats.last_kept == [6] and stats.prefills == 2
    assert stats.mean_visual_tokens == 4.0 and stats.mean_kept_ratio == 0.4
    stats.reset()
    assert stats.images == 0 and stats.prefills == 0


def test_the_adapter_finds_a_replaced_base_module(model):
    """``base_model`` remembers the module it found per model object, but not past a replacement."""
    import copy

    adapter = get_adapter(model)
    base = adapter.base_model(model)
    assert adapter.base_model(model) is base and adapter.get_vision_tower(model) is base.vision_tower
    twin = copy.deepcopy(model)
    assert adapter.base_model(twin) is twin.model and adapter.base_model(twin) is not base
    twin.model = copy.deepcopy(twin.model)  # the same path, another module
    assert adapter.base_model(twin) is twin.model
