"""Shared fixtures: tiny random LLaVA models built in code (no downloads), and prompt batches."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

IMAGE_TOKEN_ID = 3
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
VOCAB = 64


def make_tiny_llava(*, image_size: int = 56, patch: int = 14, vision_layers: int = 3, text_layers: int = 4,
                    hidden: int = 32, heads: int = 4, kv_heads: int | None = None, seed: int = 0,
                    attn: str = "sdpa", dtype=torch.float32):
    """A randomly initialised LlavaForConditionalGeneration (CLIP tower with [CLS], Llama decoder)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch, projection_dim=hidden)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=text_layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads or heads, max_position_embeddings=512,
                       bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    n_patches = (image_size // patch) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=n_patches)
    config.pad_token_id = PAD_ID
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype)
    model.config._attn_implementation = attn
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.eval()
    return model


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids [B, L], attention_mask [B, L]), left-padded with PAD_ID."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return ids, mask


def make_inputs(model, prefix_lens=(3,), suffix_lens=(5,), seed: int = 1):
    """A left-padded batch: [pad...] BOS prefix <image>*N suffix, with random pixel values."""
    cfg = model.config
    n_img = cfg.image_seq_length
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p, s in zip(prefix_lens, suffix_lens):
        prefix = torch.randint(4, VOCAB, (p,), generator=g).tolist()
        suffix = torch.randint(4, VOCAB, (s,), generator=g).tolist()
        rows.append([BOS_ID] + prefix + [IMAGE_TOKEN_ID] * n_img + suffix)
    ids, mask = left_pad(rows)
    size = cfg.vision_config.image_size
    pixels = torch.randn(len(rows), 3, size, size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels.to(model.dtype)}


@pytest.fixture
def tiny_llava():
    return make_tiny_llava()


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny LLaVA + the testbed processor, saved with save_pretrained (the local-path load route)."""
    from vlmprune.testbed.model import build_model, build_processor, build_tokenizer

    d = tmp_path_factory.mktemp("tiny_testbed")
    tok = build_tokenizer()
    proc = build_processor(tok)
    model = build_model(tok, seed=3, vision=TINY_VISION, text=TINY_TEXT)
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d


NEXT_PINPOINTS = [[42, 84], [84, 42], [84, 84]]


def make_tiny_llava_next(*, image_size: int = 42, patch: int = 14, vision_layers: int = 3, text_layers: int = 4,
                         hidden: int = 32, heads: int = 4, seed: int = 0, attn: str = "sdpa"):
    """A randomly initialised LlavaNextForConditionalGeneration: CLIP tower with [CLS] (3x3 patches
    per crop at 42 px), any-res crops from ``NEXT_PINPOINTS`` (1x2, 2x1 or 2x2 crops plus the base
    image), ``image_newline``, Llama decoder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch, projection_dim=hidden)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=512, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=NEXT_PINPOINTS, image_seq_length=(image_size // patch) ** 2)
    return build_tiny(LlavaNextForConditionalGeneration, config, seed=seed, attn=attn)


def next_image_tokens(model, image_sizes) -> list[int]:
    """Placeholder count of each image (H, W) in ``image_sizes``, from the stock model's own packing."""
    cfg = model.config
    side = cfg.vision_config.image_size
    with torch.no_grad():
        out = model.model.get_image_features(torch.zeros(len(image_sizes), 5, 3, side, side),
                                             torch.tensor(image_sizes), return_dict=True)
    return [int(t.shape[0]) for t in out.pooler_output]


def make_next_inputs(model, image_sizes, prefix_lens, suffix_lens, seed: int = 1):
    """A left-padded LLaVA-NeXT batch: [pad...] BOS prefix <image>*n_i suffix, one image (H, W) per
    sample, pixel_values [B, 5, 3, S, S] (crops past an image's own count are random padding)."""
    counts = next_image_tokens(model, image_sizes)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p, s, n in zip(prefix_lens, suffix_lens, counts):
        prefix = torch.randint(4, VOCAB, (p,), generator=g).tolist()
        suffix = torch.randint(4, VOCAB, (s,), generator=g).tolist()
        rows.append([BOS_ID] + prefix + [IMAGE_TOKEN_ID] * n + suffix)
    ids, mask = left_pad(rows)
    side = model.config.vision_config.image_size
    pixels = torch.randn(len(rows), 5, 3, side, side, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_sizes": torch.tensor(image_sizes)}


@pytest.fixture
def tiny_llava_next():
    return make_tiny_llava_next()


# ------------------------------------------------------------------------------------------ Qwen2-VL

QWEN_VIDEO_ID, QWEN_VISION_START, QWEN_VISION_END = 4, 5, 6
QWEN_PATCH = 3 * 2 * 14 * 14  # channels x temporal patch x 14 x 14: one row of pixel_values


def make_tiny_qwen2_vl(*, vision_layers: int = 2, text_layers: int = 4, hidden: int = 32, heads: int = 4,
                       kv_heads: int = 2, seed: int = 0, attn: str = "sdpa", family: str = "qwen2_vl"):
    """A randomly initialised Qwen2VLForConditionalGeneration (``family="qwen2_5_vl"``: its
    Qwen2.5-VL sibling): a ``vision_layers``-block tower with the 2x2 merger, a Qwen2 decoder
    with grouped-query heads and M-RoPE (head_dim 8, ``mrope_section`` [2, 1, 1])."""
    import transformers

    names = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
             "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}[family]
    config_class, model_class = (getattr(transformers, n) for n in names)
    vision = dict(depth=vision_layers, embed_dim=hidden, hidden_size=hidden, num_heads=heads, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        vision["mlp_ratio"] = 2
    else:  # 56 px windows (2x2 merged tokens); full attention in block 1 only (not the last)
        del vision["embed_dim"]  # Qwen2.5-VL: hidden_size is the tower's width, out_hidden_size the LLM's
        vision.update(out_hidden_size=hidden, intermediate_size=2 * hidden, window_size=56,
                      fullatt_block_indexes=[1])
        vision_layers = max(vision_layers, 3)
        vision["depth"] = vision_layers
    text = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=text_layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    config = config_class(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                          video_token_id=QWEN_VIDEO_ID, vision_start_token_id=QWEN_VISION_START,
                          vision_end_token_id=QWEN_VISION_END)
    return build_tiny(model_class, config, seed=seed, attn=attn)


def build_tiny(model_class, config, *, seed: int = 0, attn: str = "sdpa"):
    """``model_class(config)`` seeded with ``seed``, attention ``attn``, PAD / EOS set, in eval mode."""
    config.pad_token_id = PAD_ID
    torch.manual_seed(seed)
    model = model_class(config)
    model.config._attn_implementation = attn
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = EOS_ID
    model.eval()
    return model


def module_hooks(model) -> dict[str, tuple[int, int]]:
    """Module name -> (forward pre-hooks, forward hooks) of every module of ``model``."""
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}


def warm_up(model, inputs):
    """Generate two tokens on ``inputs`` (transformers adds its own output-recording hooks on the
    first call), then record the stock hooks as ``model._test_stock_hooks``; returns ``model``."""
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    model._test_stock_hooks = module_hooks(model)
    return model


def assert_remove_restores_and_sdpa_stays(model, inputs, method, options, monkeypatch, is_stock, gen=None):
    """Under ``method`` the prefill is shorter, every attention still runs sdpa (as often as on the
    stock model) and ``generate(**gen)`` works; ``remove()`` (twice: idempotent) leaves
    ``is_stock(model)``, the stock logits and the same weights, with sdpa still configured."""
    import copy

    import vlmprune

    state = copy.deepcopy(model.state_dict())
    ref = model(**inputs).logits
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model(**inputs)
    n_ref = len(calls)
    cfg = model.config
    impl = lambda: (cfg._attn_implementation, cfg.text_config._attn_implementation,  # noqa: E731
                    cfg.vision_config._attn_implementation)
    assert impl() == ("sdpa",) * 3
    handle = vlmprune.apply(model, method, **(options or {}))
    try:
        calls.clear()
        assert model(**inputs).logits.shape[1] < ref.shape[1]
        assert len(calls) == n_ref  # every attention still runs sdpa, once
        if gen is not None:
            model.generate(**inputs, **gen)
        assert impl() == ("sdpa",) * 3
    finally:
        handle.remove()
    handle.remove()  # idempotent
    assert is_stock(model) and impl() == ("sdpa",) * 3
    assert torch.equal(model(**inputs).logits, ref)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def assert_beam_batch_equals_singles(model, inputs, row, method, options, beams):
    """Under ``method``, beam search (``generate(**beams)``) on the batch gives each sample the
    tokens of its own single-sample run (``row(inputs, b)``: sample b unpadded)."""
    import vlmprune

    width = inputs["input_ids"].shape[1]
    with vlmprune.pruned(model, method, **(options or {})):
        out = model.generate(**inputs, **beams)
        for b in range(inputs["input_ids"].shape[0]):
            single = row(inputs, b)
            one = model.generate(**single, **beams)
            assert torch.equal(one[0, single["input_ids"].shape[1]:], out[b, width:])


def assert_ragged_batch_equals_singles(model, inputs, row, method, options, gen, atol=2e-5):
    """Under ``method``, greedy ``generate`` on the batch ``inputs`` (samples keep different
    visual counts) gives each sample the tokens and logits of its own single-sample run
    (``row(inputs, b)``: sample b unpadded) and the same visual count."""
    import vlmprune

    width = inputs["input_ids"].shape[1]
    with vlmprune.pruned(model, method, **options) as handle:
        out = model.generate(**inputs, **gen, return_dict_in_generate=True, output_logits=True)
        batch_counts = handle.stats.visual_tokens_per_sample()
        assert len(set(batch_counts)) > 1, batch_counts
        for b in range(inputs["input_ids"].shape[0]):
            single = row(inputs, b)
            one = model.generate(**single, **gen, return_dict_in_generate=True, output_logits=True)
            assert handle.stats.visual_tokens_per_sample() == [batch_counts[b]]
            assert torch.equal(one.sequences[0, single["input_ids"].shape[1]:], out.sequences[b, width:])
            for step_b, step_1 in zip(out.logits, one.logits):
                torch.testing.assert_close(step_1[0], step_b[b], atol=atol, rtol=1e-5)


def make_qwen_inputs(grids, prefix_lens, suffix_lens, seed: int = 1):
    """A left-padded Qwen2-VL batch, one image per sample with patch grid (h, w) from ``grids``:
    [pad...] BOS prefix <vision_start> <image>*(h*w/4) <vision_end> suffix; ``pixel_values``
    [sum h*w, 1176], ``image_grid_thw`` [B, 3] = (1, h, w), ``mm_token_type_ids`` (1 at images)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for (h, w), p, s in zip(grids, prefix_lens, suffix_lens):
        prefix = torch.randint(7, VOCAB, (p,), generator=g).tolist()
        suffix = torch.randint(7, VOCAB, (s,), generator=g).tolist()
        rows.append([BOS_ID] + prefix + [QWEN_VISION_START] + [IMAGE_TOKEN_ID] * (h * w // 4) + [QWEN_VISION_END]
                    + suffix)
    ids, mask = left_pad(rows)
    pixels = torch.randn(sum(h * w for h, w in grids), QWEN_PATCH, generator=g)
    thw = torch.tensor([[1, h, w] for h, w in grids])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_grid_thw": thw,
            "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).int()}


def qwen_row(inputs, b):
    """Sample ``b`` of a ``make_qwen_inputs`` batch, unpadded, with its own pixel rows."""
    valid = inputs["attention_mask"][b].bool()
    sizes = inputs["image_grid_thw"].prod(-1).tolist()
    start = sum(sizes[:b])
    return {"input_ids": inputs["input_ids"][b:b + 1, valid], "attention_mask": inputs["attention_mask"][b:b + 1, valid],
            "pixel_values": inputs["pixel_values"][start:start + sizes[b]],
            "image_grid_thw": inputs["image_grid_thw"][b:b + 1],
            "mm_token_type_ids": inputs["mm_token_type_ids"][b:b + 1, valid]}


@pytest.fixture
def tiny_qwen2_vl():
    return make_tiny_qwen2_vl()


@pytest.fixture
def tiny_qwen2_5_vl():
    return make_tiny_qwen2_vl(family="qwen2_5_vl")


# ------------------------------------------------------------------------------------------ Video-LLaVA

VIDEO_ID = 4  # Video-LLaVA's video placeholder (the image one is IMAGE_TOKEN_ID)


def make_tiny_video_llava(*, image_size: int = 56, patch: int = 14, frames: int = 3, vision_layers: int = 2,
                          text_layers: int = 4, hidden: int = 32, heads: int = 4, seed: int = 0, attn: str = "sdpa",
                          strategy: str = "default"):
    """A randomly initialised VideoLlavaForConditionalGeneration: image and video CLIP towers with
    [CLS] (4x4 patches at 56 px), one projector, Llama decoder; videos of ``frames`` frames get
    frames * 17 placeholders (each frame's [CLS] and 16 patches)."""
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch, projection_dim=hidden)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=512, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    n = (image_size // patch) ** 2
    config = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                              video_token_index=VIDEO_ID, vision_feature_layer=-2,
                              vision_feature_select_strategy=strategy, image_seq_length=n,
                              video_seq_length=frames * (n + 1))
    return build_tiny(VideoLlavaForConditionalGeneration, config, seed=seed, attn=attn)


def make_video_llava_inputs(model, kinds, prefix_lens, suffix_lens, frames: int = 3, seed: int = 1):
    """A left-padded Video-LLaVA batch, one visual input per sample: ``kinds[b]`` "image" ([pad...]
    BOS prefix <image>*N suffix) or "video" (<video>*frames*(N+1)); ``pixel_values`` [images, 3, S,
    S] and ``pixel_values_videos`` [videos, frames, 3, S, S] in batch order (None when absent)."""
    cfg = model.config
    side = cfg.vision_config.image_size
    n = (side // cfg.vision_config.patch_size) ** 2
    n_image = n + int(cfg.vision_feature_select_strategy == "full")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for kind, p, s in zip(kinds, prefix_lens, suffix_lens):
        prefix = torch.randint(5, VOCAB, (p,), generator=g).tolist()
        suffix = torch.randint(5, VOCAB, (s,), generator=g).tolist()
        visual = [IMAGE_TOKEN_ID] * n_image if kind == "image" else [VIDEO_ID] * (frames * (n + 1))
        rows.append([BOS_ID] + prefix + visual + suffix)
    ids, mask = left_pad(rows)
    images, videos = kinds.count("image"), kinds.count("video")
    out = {"input_ids": ids, "attention_mask": mask}
    if images:
        out["pixel_values"] = torch.randn(images, 3, side, side, generator=g)
    if videos:
        out["pixel_values_videos"] = torch.randn(videos, frames, 3, side, side, generator=g)
    return out


def video_llava_row(inputs, b, kinds):
    """Sample ``b`` of a ``make_video_llava_inputs`` batch, unpadded, with its own pixels."""
    valid = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b:b + 1, valid], "attention_mask": inputs["attention_mask"][b:b + 1, valid]}
    i = kinds[:b].count(kinds[b])
    key = "pixel_values" if kinds[b] == "image" else "pixel_values_videos"
    out[key] = inputs[key][i:i + 1]
    return out


@pytest.fixture
def tiny_video_llava():
    return make_tiny_video_llava()


def make_qwen_mixed_inputs(items, prefix_lens, suffix_lens, seed: int = 1):
    """A left-padded Qwen2-VL batch, one visual input per sample: ``items[b]`` is (t, h, w) patches,
    a video when t > 1 (``video_token_id`` placeholders, ``mm_token_type_ids`` 2) else an image;
    [pad...] BOS prefix <vision_start> <placeholder>*(t*h*w/4) <vision_end> suffix, with
    ``pixel_values`` / ``image_grid_thw`` and ``pixel_values_videos`` / ``video_grid_thw`` in batch
    order (absent when the batch has none of that kind)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for (t, h, w), p, s in zip(items, prefix_lens, suffix_lens):
        prefix = torch.randint(7, VOCAB, (p,), generator=g).tolist()
        suffix = torch.randint(7, VOCAB, (s,), generator=g).tolist()
        token = QWEN_VIDEO_ID if t > 1 else IMAGE_TOKEN_ID
        rows.append([BOS_ID] + prefix + [QWEN_VISION_START] + [token] * (t * h * w // 4) + [QWEN_VISION_END] + suffix)
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask,
           "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).int() + 2 * (ids == QWEN_VIDEO_ID).int()}
    for kind, keys in (("image", ("pixel_values", "image_grid_thw")), ("video", ("pixel_values_videos", "video_grid_thw"))):
        grids = [thw for thw in items if (thw[0] > 1) == (kind == "video")]
        if grids:
            out[keys[0]] = torch.randn(sum(t * h * w for t, h, w in grids), QWEN_PATCH, generator=g)
            out[keys[1]] = torch.tensor(grids)
    return out


def qwen_mixed_row(inputs, b, items):
    """Sample ``b`` of a ``make_qwen_mixed_inputs`` batch, unpadded, with its own pixel rows."""
    valid = inputs["attention_mask"][b].bool()
    out = {k: inputs[k][b:b + 1, valid] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    video = items[b][0] > 1
    pix, grid = ("pixel_values_videos", "video_grid_thw") if video else ("pixel_values", "image_grid_thw")
    same = [thw for thw in items[:b] if (thw[0] > 1) == video]
    start = sum(t * h * w for t, h, w in same)
    t, h, w = items[b]
    out[pix] = inputs[pix][start:start + t * h * w]
    out[grid] = inputs[grid][len(same):len(same) + 1]
    return out


def join_samples(inputs, groups, per_image=("pixel_values", "image_sizes")):
    """A batch of one image per sample (LLaVA-1.5 / NeXT layout: the keys ``per_image`` hold one
    entry per image) regrouped so that new sample g holds the ``groups[g]`` consecutive images:
    their rows joined in order (each later row without its BOS), left-padded again;
    -> (batch, row(batch, b)), ``row`` giving sample b unpadded with its own images."""
    valid = inputs["attention_mask"].bool()
    rows = [inputs["input_ids"][b, valid[b]].tolist() for b in range(len(valid))]
    joined, start = [], 0
    for k in groups:
        joined.append(rows[start] + [t for r in rows[start + 1:start + k] for t in r[1:]])
        start += k
    ids, mask = left_pad(joined)
    batch = {"input_ids": ids, "attention_mask": mask, **{k: inputs[k] for k in per_image if k in inputs}}

    def row(batch, b):
        lo = sum(groups[:b])
        keep = batch["attention_mask"][b].bool()
        return {"input_ids": batch["input_ids"][b:b + 1, keep], "attention_mask": batch["attention_mask"][b:b + 1, keep],
                **{k: batch[k][lo:lo + groups[b]] for k in per_image if k in batch}}
    return batch, row


def make_qwen_multi_inputs(samples, prefix_lens, suffix_lens, seed: int = 1):
    """A left-padded Qwen2-VL batch whose sample b holds the images of patch grids ``samples[b]``
    (a list of (h, w)), each in <vision_start> ... <vision_end> and followed by a text token;
    ``pixel_values`` / ``image_grid_thw`` in batch order."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for grids, p, s in zip(samples, prefix_lens, suffix_lens):
        row = [BOS_ID] + torch.randint(7, VOCAB, (p,), generator=g).tolist()
        for h, w in grids:
            row += [QWEN_VISION_START] + [IMAGE_TOKEN_ID] * (h * w // 4) + [QWEN_VISION_END]
            row += torch.randint(7, VOCAB, (1,), generator=g).tolist()
        rows.append(row + torch.randint(7, VOCAB, (s,), generator=g).tolist())
    ids, mask = left_pad(rows)
    flat = [hw for grids in samples for hw in grids]
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(sum(h * w for h, w in flat), QWEN_PATCH, generator=g),
            "image_grid_thw": torch.tensor([[1, h, w] for h, w in flat]),
            "mm_token_type_ids": (ids == IMAGE_TOKEN_ID).int()}


def qwen_multi_row(inputs, b, samples):
    """Sample ``b`` of a ``make_qwen_multi_inputs`` batch, unpadded, with its own pixel rows."""
    valid = inputs["attention_mask"][b].bool()
    before = [hw for grids in samples[:b] for hw in grids]
    start = sum(h * w for h, w in before)
    size = sum(h * w for h, w in samples[b])
    out = {k: inputs[k][b:b + 1, valid] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out["pixel_values"] = inputs["pixel_values"][start:start + size]
    out["image_grid_thw"] = inputs["image_grid_thw"][len(before):len(before) + len(samples[b])]
    return out


def visual_kept_per_sample(handle, input_ids, visual_ids) -> list[int]:
    """The visual tokens each sample fed the LLM at the last prefill (any visual placeholder id in
    ``visual_ids``): the vision stage's plan, or the decoder stage's per-sample counts."""
    if handle.stage == "decoder":
        return [int(sum(layers)) for layers in handle.stats.visual_tokens_per_layer()]
    visual = torch.isin(input_ids, torch.tensor(visual_ids))
    keep = handle.plan.keep if handle.plan is not None else torch.ones_like(visual)
    return (visual & keep).sum(1).tolist()


def assert_mixed_batch_equals_singles(model, inputs, row, method, options, gen, visual_ids, atol=2e-5):
    """Under ``method``, greedy ``generate`` on the batch ``inputs`` (samples with images or videos,
    so different visual counts) gives each sample the tokens and logits, and the visual count, of
    its own single-sample run (``row(inputs, b)``: sample b unpadded)."""
    import vlmprune

    width = inputs["input_ids"].shape[1]
    with vlmprune.pruned(model, method, **options) as handle:
        model(**inputs)
        batch_counts = visual_kept_per_sample(handle, inputs["input_ids"], visual_ids)
        assert len(set(batch_counts)) > 1, batch_counts
        out = model.generate(**inputs, **gen, return_dict_in_generate=True, output_logits=True)
        for b in range(inputs["input_ids"].shape[0]):
            single = row(inputs, b)
            model(**single)
            assert visual_kept_per_sample(handle, single["input_ids"], visual_ids) == [batch_counts[b]]
            one = model.generate(**single, **gen, return_dict_in_generate=True, output_logits=True)
            assert torch.equal(one.sequences[0, single["input_ids"].shape[1]:], out.sequences[b, width:])
            for step_b, step_1 in zip(out.logits, one.logits):
                torch.testing.assert_close(step_1[0], step_b[b], atol=atol, rtol=1e-5)


# ------------------------------------------------------------------------------------------ LLaVA-OneVision

#: LLaVA-NeXT's pinpoints plus a 1x3 mosaic; with ``anyres_max_2`` a 2x2 or 1x3 mosaic is resized
ONEVISION_PINPOINTS = NEXT_PINPOINTS + [[42, 126]]
ONEVISION_VIDEO_ID = VIDEO_ID


def make_tiny_llava_onevision(*, image_size: int = 42, patch: int = 14, vision_layers: int = 2, text_layers: int = 4,
                              hidden: int = 32, heads: int = 4, kv_heads: int = 2, seed: int = 0, attn: str = "sdpa",
                              aspect: str = "anyres_max_2", tower: str = "siglip"):
    """A randomly initialised LlavaOnevisionForConditionalGeneration: SigLIP tower without [CLS]
    (3x3 patches per crop at 42 px, strategy "full"; ``tower="clip"``: a CLIP tower with [CLS] and
    strategy "default"), any-res crops from ``ONEVISION_PINPOINTS``, the ``aspect`` resize of large
    mosaics, ``image_newline``, a Qwen2 decoder with grouped-query heads; videos pool each frame
    to 2x2 tokens (frames * 4 + 1 placeholders)."""
    from transformers import (CLIPVisionConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              Qwen2Config, SiglipVisionConfig)

    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=vision_layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch)
    vision = (SiglipVisionConfig(**common, vision_use_head=False) if tower == "siglip"
              else CLIPVisionConfig(**common, projection_dim=hidden))
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=512, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                                  video_token_index=ONEVISION_VIDEO_ID, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full" if tower == "siglip" else "default",
                                  image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio=aspect)
    return build_tiny(LlavaOnevisionForConditionalGeneration, config, seed=seed, attn=attn)


def onevision_visual_tokens(model, items, frames: int = 3) -> list[int]:
    """Placeholders of each item (an image (H, W), or ``"video"`` of ``frames`` frames), from the
    stock model's own features."""
    side = model.config.vision_config.image_size
    with torch.no_grad():
        out = []
        for item in items:
            if item == "video":
                v = model.model.get_video_features(torch.zeros(1, frames, 3, side, side), return_dict=True)
                out.append(int(v.pooler_output.shape[1]))
            else:
                f = model.model.get_image_features(torch.zeros(1, 5, 3, side, side), torch.tensor([item]),
                                                   return_dict=True)
                out.append(int(f.pooler_output[0].shape[0]))
    return out


def make_onevision_inputs(model, items, prefix_lens, suffix_lens, frames: int = 3, seed: int = 1):
    """A left-padded LLaVA-OneVision batch, one visual input per sample: ``items[b]`` an image size
    (H, W) ([pad...] BOS prefix <image>*n suffix) or ``"video"`` (<video>*(frames*4+1)); text ids
    avoid the placeholder ids. ``pixel_values`` [images, 5, 3, S, S] with ``image_sizes``, and
    ``pixel_values_videos`` [videos, frames, 3, S, S], in batch order (absent when none)."""
    counts = onevision_visual_tokens(model, items, frames)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for item, p, s, n in zip(items, prefix_lens, suffix_lens, counts):
        prefix = torch.randint(7, VOCAB, (p,), generator=g).tolist()
        suffix = torch.randint(7, VOCAB, (s,), generator=g).tolist()
        token = ONEVISION_VIDEO_ID if item == "video" else IMAGE_TOKEN_ID
        rows.append([BOS_ID] + prefix + [token] * n + suffix)
    ids, mask = left_pad(rows)
    side = model.config.vision_config.image_size
    sizes = [list(item) for item in items if item != "video"]
    out = {"input_ids": ids, "attention_mask": mask}
    if sizes:
        out["pixel_values"] = torch.randn(len(sizes), 5, 3, side, side, generator=g)
        out["image_sizes"] = torch.tensor(sizes)
    if len(sizes) < len(items):
        out["pixel_values_videos"] = torch.randn(len(items) - len(sizes), frames, 3, side, side, generator=g)
    return out


def onevision_row(inputs, b, items):
    """Sample ``b`` of a ``make_onevision_inputs`` batch, unpadded, with its own pixels."""
    valid = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b:b + 1, valid], "attention_mask": inputs["attention_mask"][b:b + 1, valid]}
    video = items[b] == "video"
    i = sum((item == "video") == video for item in items[:b])
    if video:
        out["pixel_values_videos"] = inputs["pixel_values_videos"][i:i + 1]
    else:
        out["pixel_values"] = inputs["pixel_values"][i:i + 1]
        out["image_sizes"] = inputs["image_sizes"][i:i + 1]
    return out


def make_onevision_multi_inputs(model, samples, prefix_lens, suffix_lens, seed: int = 1):
    """A left-padded LLaVA-OneVision batch whose sample b holds the images of sizes ``samples[b]``
    (a list of (H, W)), each followed by a text token, with ``batch_num_images``: an image of a
    multi-image sample is its base image only (the stock model's rule), a lone image any-res."""
    side = model.config.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    rows = []
    for sizes, p, s in zip(samples, prefix_lens, suffix_lens):
        with torch.no_grad():  # each image's placeholders, from the stock model's own features
            f = model.model.get_image_features(torch.zeros(len(sizes), 5, 3, side, side), torch.tensor(sizes),
                                               batch_num_images=torch.tensor([len(sizes)]), return_dict=True)
        row = [BOS_ID] + torch.randint(7, VOCAB, (p,), generator=g).tolist()
        for feats in f.pooler_output:
            row += [IMAGE_TOKEN_ID] * int(feats.shape[0]) + torch.randint(7, VOCAB, (1,), generator=g).tolist()
        rows.append(row + torch.randint(7, VOCAB, (s,), generator=g).tolist())
    ids, mask = left_pad(rows)
    flat = [list(hw) for sizes in samples for hw in sizes]
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(len(flat), 5, 3, side, side, generator=g), "image_sizes": torch.tensor(flat),
            "batch_num_images": torch.tensor([len(sizes) for sizes in samples])}


def onevision_multi_row(inputs, b, samples):
    """Sample ``b`` of a ``make_onevision_multi_inputs`` batch, unpadded, with its own images."""
    valid = inputs["attention_mask"][b].bool()
    lo = sum(len(sizes) for sizes in samples[:b])
    hi = lo + len(samples[b])
    return {"input_ids": inputs["input_ids"][b:b + 1, valid], "attention_mask": inputs["attention_mask"][b:b + 1, valid],
            "pixel_values": inputs["pixel_values"][lo:hi], "image_sizes": inputs["image_sizes"][lo:hi],
            "batch_num_images": inputs["batch_num_images"][b:b + 1]}


@pytest.fixture
def tiny_llava_onevision():
    return make_tiny_llava_onevision()


def assert_fastv_k0_equals_lm_on_survivors(model, inputs, count, positions, atol=2e-5):
    """FastV at layer 0 (``count`` kept) == the untouched language model fed only the survivors
    (their stock input embeddings) at ``positions(idx)``, their own unpruned positions; ``idx``
    [B, L'] is each survivor's column in the prompt. Returns (idx, valid) for further checks."""
    import vlmprune

    seen = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, k: seen.update(x=k["inputs_embeds"]), with_kwargs=True)
    model(**inputs)
    hook.remove()
    with vlmprune.pruned(model, "fastv", k=0, count=count) as h:
        out = model(**inputs).logits
        src = h.state.final_source.clone()
    valid = src >= 0
    idx = src.clamp(min=0)
    x = seen["x"].gather(1, idx[:, :, None].expand(-1, -1, seen["x"].shape[-1]))
    ref = model(inputs_embeds=x, attention_mask=valid.long(), position_ids=positions(idx)).logits
    torch.testing.assert_close(out[valid], ref[valid], atol=atol, rtol=0)
    return idx, valid
