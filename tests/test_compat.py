"""The transformers compatibility layer: names match the installed release, and the cache works
under every name that release accepts (the class of break transformers 5.24's rename caused)."""

from __future__ import annotations

import inspect
import logging
import re
import warnings
from contextlib import contextmanager

import pytest
import torch
import transformers
from packaging.version import Version

import vlmprune
from vlmprune.integrations import compat
from vlmprune.integrations.compat import ACCEPTED_CACHE_NAMES, CACHE, CACHE_NAMES, K, get_cache, output_cache

from conftest import make_inputs, make_tiny_llava

ATOL = 2e-5
# one vision-stage and one decoder-stage method, each with a setting that really prunes
METHODS = [("prumerge+", {}), ("fastv", {"k": 2, "count": 5})]


@contextmanager
def _quiet_transformers():
    """Silence transformers' deprecation notices (a deliberate deprecated-name call warns by design)."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def test_cache_name_is_the_installed_field():
    from transformers.modeling_outputs import BaseModelOutputWithPast

    fields = BaseModelOutputWithPast.__dataclass_fields__
    assert CACHE in fields
    assert CACHE == ("cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values")
    assert CACHE_NAMES[0] == CACHE and set(CACHE_NAMES) == {"cache", "past_key_values"}


def test_cache_name_is_the_forwards_keyword():
    from transformers import LlamaModel, LlavaForConditionalGeneration, LlavaModel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    for cls in (LlavaForConditionalGeneration, LlavaModel, LlamaModel, LlamaDecoderLayer):
        params = inspect.signature(cls.forward).parameters
        assert CACHE in params, f"{cls.__name__}.forward has no {CACHE!r} parameter"


def test_forward_signatures():
    """Every keyword name the hooks read or rewrite is a parameter of the forward that receives it."""
    from transformers import LlavaForConditionalGeneration, LlavaModel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    mm = [K.INPUT_IDS, K.INPUTS_EMBEDS, K.PIXEL_VALUES, K.ATTENTION_MASK, K.POSITION_IDS, K.FEATURE_LAYER,
          K.SELECT_STRATEGY, K.IMAGE_SIZES]
    for cls in (LlavaForConditionalGeneration, LlavaModel):
        params = inspect.signature(cls.forward).parameters
        missing = [n for n in mm if n not in params]
        assert not missing, f"{cls.__name__}.forward lacks {missing}"
    assert K.LABELS in inspect.signature(LlavaForConditionalGeneration.forward).parameters
    # mm_encoder_outputs travels through **kwargs into LlavaModel.forward, which reads it by name
    assert K.MM_ENCODER_OUTPUTS in inspect.getsource(LlavaModel.forward)
    layer = inspect.signature(LlamaDecoderLayer.forward).parameters
    for n in (K.HIDDEN_STATES, K.ATTENTION_MASK, K.POSITION_IDS, K.POSITION_EMBEDDINGS):
        assert n in layer, f"LlamaDecoderLayer.forward lacks {n!r}"
    assert list(layer)[1] == K.HIDDEN_STATES  # first positional after self


def test_get_cache_reads_every_name_and_outputs_read_without_shims():
    marker = object()
    for name in CACHE_NAMES:
        assert get_cache({name: marker}) is marker
    assert get_cache({}) is None and get_cache({CACHE: None}) is None
    model = make_tiny_llava()
    inputs = make_inputs(model)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = output_cache(out)
    assert isinstance(cache, transformers.DynamicCache)
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]
    assert output_cache({"logits": 1}) is None and output_cache(None) is None


def test_apply_rotary_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from vlmprune.integrations.decoder import _rope

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 1, 5, 8, generator=g)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    q2, k2 = compat.apply_rotary(q, k, cos, sin)
    q3, k3 = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(q2, q3) and torch.equal(k2, k3)
    torch.testing.assert_close(_rope(q, cos, sin), q3)  # the decoder stage's own copy agrees


def _manual_greedy(model, inputs, steps: int, cache_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by hand: prefill, then one token per call with the cache passed as ``cache_name``.

    The caller speaks original coordinates, as generate() does: the 2-D mask grows by one column
    per token and no position_ids are passed.
    """
    out = model(**inputs, use_cache=True)
    cache = output_cache(out)
    mask = inputs["attention_mask"]
    logits = [out.logits[:, -1]]
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(steps - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        with _quiet_transformers():
            out = model(input_ids=tokens[-1][:, None], attention_mask=mask, use_cache=True, **{cache_name: cache})
        cache = output_cache(out)
        logits.append(out.logits[:, -1])
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("cache_name", ACCEPTED_CACHE_NAMES)
@pytest.mark.parametrize("method,opts", METHODS, ids=[m for m, _ in METHODS])
def test_cache_under_each_name_equals_uncached_generation(method, opts, cache_name):
    """A decode loop passing the cache under ``cache_name`` == generate() without a cache (re-pruning)."""
    model = make_tiny_llava(image_size=84, text_layers=5, kv_heads=2, seed=3)
    inputs = make_inputs(model, prefix_lens=(2, 6), suffix_lens=(5, 2), seed=4)
    n = 4
    with torch.no_grad(), vlmprune.pruned(model, method, **opts) as h:
        tok_m, lg_m = _manual_greedy(model, inputs, n, cache_name)
        assert h.stats.prefills == 1  # the later calls were recognised as decode steps, not prefills
        pruned_counts = list(h.stats.last_kept)
        ref = model.generate(**inputs, max_new_tokens=n, do_sample=False, use_cache=False, output_logits=True,
                             return_dict_in_generate=True)
        cached = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    n_img = model.config.image_seq_length
    assert all(c < n_img for c in pruned_counts), f"{method} kept {pruned_counts} of {n_img}: nothing was pruned"
    prompt = inputs["input_ids"].shape[1]
    torch.testing.assert_close(lg_m, torch.stack(ref.logits, 1), atol=ATOL, rtol=0)
    assert torch.equal(tok_m, ref.sequences[:, prompt:])
    assert torch.equal(cached.sequences, ref.sequences)


@contextmanager
def _recorded_messages():
    """Every transformers log record and Python warning raised inside the block (warn-once caches cleared)."""
    from transformers.utils import logging as tf_logging

    tf_logging.warning_once.cache_clear()  # a message already warned once in this process would be hidden
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")  # does not propagate to the root logger: caplog cannot see it
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records, caught
    finally:
        logger.removeHandler(handler)


def _deprecations(records, caught) -> list[str]:
    texts = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    return [t for t in texts if "deprecated" in t and ("past_key_values" in t or "cache_params" in t or "cache" in t)]


@pytest.mark.skipif(CACHE != "cache", reason="the old cache name is current before transformers 5.24")
def test_recorder_sees_the_deprecated_cache_name():
    """Control for the test below: the recorder does catch transformers' deprecation notices."""
    model = make_tiny_llava()
    inputs = make_inputs(model)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
        with _recorded_messages() as (records, caught):
            model(input_ids=inputs["input_ids"][:, -1:], use_cache=True, past_key_values=cache)
    assert _deprecations(records, caught)


@pytest.mark.parametrize("method,opts", METHODS, ids=[m for m, _ in METHODS])
def test_no_cache_deprecation_warning(method, opts):
    """Pruned generate() and forward on the installed release raise no cache-rename deprecation."""
    model = make_tiny_llava()
    inputs = make_inputs(model)
    with _recorded_messages() as (records, caught), torch.no_grad(), vlmprune.pruned(model, method, **opts):
        out = model(**inputs, use_cache=True)
        output_cache(out)
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    assert not _deprecations(records, caught)


def test_layer_keys_are_the_rotated_keys():
    """The KV cache holds each layer's keys after RoPE, [B, Hkv, L, Dh] (what the decoder stage scores with)."""
    model = make_tiny_llava(kv_heads=2)
    inputs = make_inputs(model, prefix_lens=(2, 4), suffix_lens=(3, 1))
    lm = model.model.language_model
    captured = {}

    def on_k(module, args, output):
        captured["k"] = output

    def on_layer(module, args, kwargs):
        captured["pe"] = kwargs[K.POSITION_EMBEDDINGS]

    hooks = [lm.layers[1].self_attn.k_proj.register_forward_hook(on_k),
             lm.layers[1].register_forward_pre_hook(on_layer, with_kwargs=True)]
    try:
        with torch.no_grad():
            cache = output_cache(model(**inputs, use_cache=True))
    finally:
        for h in hooks:
            h.remove()
    attn = lm.layers[1].self_attn
    bsz, length = inputs["input_ids"].shape
    shape = (bsz, model.config.text_config.num_key_value_heads, length, attn.head_dim)
    keys = compat.layer_keys(cache, 1, shape)
    assert keys is not None
    k = captured["k"].view(bsz, length, shape[1], shape[3]).transpose(1, 2)
    cos, sin = captured["pe"]
    _, expected = compat.apply_rotary(k, k, cos, sin)
    torch.testing.assert_close(keys, expected)
    assert compat.layer_keys(cache, 1, (bsz, shape[1], length - 1, shape[3])) is None  # other layout: ignored
    assert compat.layer_keys(None, 1, shape) is None and compat.layer_keys(cache, 99, shape) is None


def test_qwen2_vl_rotary_is_llama_rotate_half():
    """Assumption 11: Qwen2-VL's text attention applies rotary_emb's (cos, sin) [B, L, Dh] of
    [3, B, L] positions with Llama's rotate-half; every accepted position form maps to [3, B, L]."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as q2

    from conftest import make_tiny_qwen2_vl

    lm = make_tiny_qwen2_vl(text_layers=1, vision_layers=1).model.language_model
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 20, (3, 2, 5), generator=g)
    x = torch.randn(2, 5, 32, generator=g)
    cos, sin = lm.rotary_emb(x, position_ids=pos)
    assert cos.shape == (2, 5, 8)
    q, k = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    q1, k1 = q2.apply_rotary_pos_emb(q, k, cos, sin)
    q2_, k2 = compat.apply_rotary(q, k, cos, sin)
    assert torch.equal(q1, q2_) and torch.equal(k1, k2)
    text = pos[0]
    assert torch.equal(compat.mrope_positions(torch.cat([text[None], pos]), 2, 5, "cpu"), pos)
    assert torch.equal(compat.mrope_positions(pos, 2, 5, "cpu"), pos)
    assert torch.equal(compat.mrope_positions(text, 2, 5, "cpu"), text.expand(3, 2, 5))
    assert torch.equal(compat.mrope_positions(None, 2, 5, "cpu"), torch.arange(5).expand(3, 2, 5))
    assert "position_ids" in inspect.signature(q2.Qwen2VLTextModel.forward).parameters
    assert "mm_token_type_ids" in inspect.signature(q2.Qwen2VLModel.get_rope_index).parameters


def test_processor_without_torchvision_loads_for_images_only(tmp_path):
    """Assumption 20: a Qwen2-VL folder (with its video processor's config) loads through
    ``load_processor`` with the real ``Qwen2VLProcessor`` for images (placeholders expanded to the
    image's merged grid, pixels the image processor's own), warns once, refuses videos in one line;
    any other loading error propagates unchanged."""
    import importlib.util

    from PIL import Image
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    from atp_helpers import make_tiny_qwen_folder

    folder = str(make_tiny_qwen_folder(tmp_path / "qwen"))
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError, match="(?i)torchvision"):
            transformers.AutoProcessor.from_pretrained(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proc = compat.load_processor(folder)
    ours = [w for w in caught if "loaded the processor for images only" in str(w.message)]
    if importlib.util.find_spec("torchvision") is not None:  # the stock path: nothing dropped
        assert not ours and proc.video_processor is not None
        return
    assert len(ours) == 1 and isinstance(proc, Qwen2VLProcessor) and type(proc).__name__ == "Qwen2VLProcessor"
    images = [Image.new("RGB", (100, 80), "red"), Image.new("RGB", (60, 200), "blue")]
    text = ["a <|vision_start|><|image_pad|><|vision_end|> b", "<|vision_start|><|image_pad|><|vision_end|> c d"]
    out = proc(images=images, text=text, padding=True, return_tensors="pt")
    alone = proc.image_processor(images, return_tensors="pt")
    assert torch.equal(out["pixel_values"], alone["pixel_values"])
    assert torch.equal(out["image_grid_thw"], alone["image_grid_thw"])
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (out["input_ids"] == pad).sum(1).tolist() == (alone["image_grid_thw"].prod(1) // 4).tolist()
    assert torch.equal(out["mm_token_type_ids"], (out["input_ids"] == pad).long())
    assert "<|image_pad|>" in proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}], add_generation_prompt=True)
    with pytest.raises(ImportError, match="without its video processor.*install torchvision"):
        proc(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[[images[0]] * 2])
    proc.save_pretrained(tmp_path / "saved")  # the video processor's config goes along: loadable in full elsewhere
    assert (tmp_path / "saved" / "video_preprocessor_config.json").read_text() == (
        tmp_path / "qwen" / "video_preprocessor_config.json").read_text()
    with pytest.warns(UserWarning, match="images only"):
        again = compat.load_processor(str(tmp_path / "saved"))
    assert torch.equal(again(images=images, text=text, padding=True, return_tensors="pt")["input_ids"], out["input_ids"])
    with pytest.raises(Exception) as stock:
        transformers.AutoProcessor.from_pretrained(str(tmp_path))
    with pytest.raises(type(stock.value), match="^" + re.escape(str(stock.value)[:60])):
        compat.load_processor(str(tmp_path))  # no processor here: the stock error, not the fallback


def test_video_llava_processor_without_torchvision_keeps_its_argument_order(tmp_path):
    """Assumption 20 on a processor whose ``video_processor`` sits between the image processor and
    the tokenizer (``VideoLlavaProcessor``): saved and loaded for images only, each part in its place,
    the processor's own settings kept."""
    import importlib.util
    import json

    from PIL import Image
    from transformers import VideoLlavaImageProcessor, VideoLlavaProcessor

    from atp_helpers import CHAT_TEMPLATE, tiny_tokenizer

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: AutoProcessor loads the video processor itself")
    tok = tiny_tokenizer({"image_token": "<image>", "video_token": "<video>"})
    ip = VideoLlavaImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    built = compat.images_only_processor(VideoLlavaProcessor)(image_processor=ip, tokenizer=tok, patch_size=14,
                                                              vision_feature_select_strategy="full",
                                                              chat_template=CHAT_TEMPLATE)
    built.save_pretrained(tmp_path)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"processor_class": "VideoLlavaProcessor", "video_processor_type": "VideoLlavaVideoProcessor"}))
    with pytest.warns(UserWarning, match="images only"):
        proc = compat.load_processor(str(tmp_path))
    assert isinstance(proc, VideoLlavaProcessor) and proc.video_processor is None
    assert type(proc.image_processor) is VideoLlavaImageProcessor and proc.tokenizer.get_vocab() == tok.get_vocab()
    assert proc.vision_feature_select_strategy == "full" and proc.patch_size == 14
    assert proc.chat_template == CHAT_TEMPLATE
    out = proc(images=[Image.new("RGB", (70, 56), "red")], text=["a <image> b"], return_tensors="pt")
    assert torch.equal(out["pixel_values_images"], ip([Image.new("RGB", (70, 56), "red")], return_tensors="pt")
                       ["pixel_values_images"])
    assert int((out["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == 4 * 4 + 1  # "full": [CLS] too
