"""A tiny testbed-style LLaVA (tokenizer + processor + model) saved to a folder, for the ATP training tests.

The testbed's own tokenizer trains its BPE on 300 rendered scenes (~10 s); here the merges come
from a few template sentences (byte-level BPE encodes any text anyway), in milliseconds.
"""

from __future__ import annotations

from pathlib import Path


def tiny_tokenizer(extra_special_tokens: dict | None = None):
    """The tiny byte-level BPE tokenizer of the testbed's vocabulary; ``extra_special_tokens``
    (default ``{"image_token": "<image>"}``, LLaVA's) as transformers' named special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from vlmprune.testbed.model import SPECIAL_TOKENS
    from vlmprune.testbed.prompt import format_prompt
    from vlmprune.testbed.questions import CORNERS
    from vlmprune.testbed.scenes import CODE_ALPHABET, COLOR_NAMES, PLURALS, SHAPES

    words = list(COLOR_NAMES) + list(SHAPES) + list(PLURALS.values()) + list(CORNERS) + ["yes", "no"]
    corpus = [format_prompt(f"Is there a {c} {s}? How many {p} are there? What color is the {s}?")
              for c, s, p in zip(COLOR_NAMES, SHAPES, PLURALS.values())]
    corpus += [" ".join(words), " ".join(CODE_ALPHABET), " ".join(CODE_ALPHABET.lower()), "0 1 2 3 4 5 6 7 8 9"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>"} if extra_special_tokens is None
                                   else extra_special_tokens)


def tiny_processor(tokenizer, image_size: int = 56):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def make_tiny_testbed(folder: str | Path, *, text_layers: int = 4, image_size: int = 56, seed: int = 0) -> Path:
    """Save a tiny random testbed-style LLaVA + processor in ``folder`` (loadable by testbed.model.load)."""
    from vlmprune.testbed.model import build_model

    tok = tiny_tokenizer()
    proc = tiny_processor(tok, image_size)
    model = build_model(tok, seed=seed,
                        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=image_size, patch_size=14, projection_dim=32),
                        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512))
    model.config.image_seq_length = (image_size // 14) ** 2
    folder = Path(folder)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def set_constant_thresholds(pruner, theta_r=None, theta_s=None):
    """Make every module of ``pruner`` predict constant thresholds: head weights zeroed, biases so
    that theta = ``theta_r`` / ``theta_s`` (a number, or one per module; None leaves that head);
    fixed-ratio pruners (no learned modules) are left as they are. Returns ``pruner``."""
    import math

    import torch

    cfg = pruner.config
    lo, hi = cfg.theta_range
    for k, layer in enumerate(cfg.layers):
        mod = pruner.atp[str(layer)] if cfg.learned else None
        for head, theta in ((getattr(mod, "head_r", None), theta_r), (getattr(mod, "head_s", None), theta_s)):
            if head is None or theta is None:
                continue
            t = theta[k] if isinstance(theta, (tuple, list)) else theta
            p = (t - lo) / (hi - lo)
            with torch.no_grad():
                head.weight.zero_()
                head.bias.fill_(math.log(p / (1 - p)))
    return pruner


# ------------------------------------------------------------------ other families, with processors

# a user turn: the image (first turn), then the text; an assistant turn closed by the EOS token
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}[user] {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
                 "{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                 "{% else %}[assistant] {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")
NEXT_PINPOINTS = [[42, 84], [84, 42], [84, 84]]


def _clip_llama_configs(tok, image_size: int, text_layers: int):
    """(vision, text) configs of the tiny folders: a 2-layer CLIP tower of 14 px patches at
    ``image_size`` px with [CLS], and a Llama decoder of width 32 on ``tok``'s vocabulary."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return vision, text


def make_tiny_next_folder(folder: str | Path, *, text_layers: int = 4, seed: int = 0) -> Path:
    """Save a tiny random LLaVA-NeXT (42 px crops of 3x3 patches, the any-res pinpoints above) with
    a real ``LlavaNextProcessor`` carrying ``CHAT_TEMPLATE`` in ``folder`` (loadable by
    ``AutoProcessor`` / ``vlmprune``'s loaders)."""
    import torch
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = tiny_tokenizer()
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42},
                                    image_grid_pinpoints=NEXT_PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE)
    vision, text = _clip_llama_configs(tok, 42, text_layers)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=NEXT_PINPOINTS, image_seq_length=9)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    folder = Path(folder)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


QWEN_SPECIALS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
QWEN_CHAT_TEMPLATE = (CHAT_TEMPLATE.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>")
                      .replace("<video>\n", "<|vision_start|><|video_pad|><|vision_end|>"))


def make_tiny_qwen_chat(family: str = "qwen2_vl", *, text_layers: int = 4, seed: int = 0):
    """(model, processor): a tiny random Qwen2-VL / Qwen2.5-VL on the tiny tokenizer with Qwen's
    vision tokens added, and a real ``Qwen2VLProcessor`` (the PIL image processor, images resized to
    4..64 merged tokens; built without its video processor, which needs torchvision:
    ``compat.images_only_processor``)."""
    import torch
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmprune.integrations.compat import images_only_processor

    tok = tiny_tokenizer({})
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    image_id, video_id, start_id, end_id = tok.convert_tokens_to_ids(QWEN_SPECIALS)
    ip = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28, patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    names = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
             "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}[family]
    config_class, model_class = (getattr(transformers, n) for n in names)
    vision = dict(depth=2, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3)
    if family == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2)
    else:
        vision.update(depth=3, out_hidden_size=32, intermediate_size=64, window_size=56, fullatt_block_indexes=[1])
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = config_class(vision_config=vision, text_config=text, image_token_id=image_id, video_token_id=video_id,
                          vision_start_token_id=start_id, vision_end_token_id=end_id)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = model_class(config).eval()
    for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, k, getattr(tok, k))
    proc = images_only_processor(transformers.Qwen2VLProcessor)(image_processor=ip, tokenizer=tok,
                                                                 chat_template=QWEN_CHAT_TEMPLATE)
    return model, proc


def make_tiny_qwen_folder(folder: str | Path, family: str = "qwen2_vl", **kwargs) -> Path:
    """Save ``make_tiny_qwen_chat``'s model and processor in ``folder`` as a checkpoint holds them,
    with the video processor's config beside (``video_preprocessor_config.json``, as Qwen2-VL's
    checkpoints carry it): ``AutoProcessor`` then needs torchvision, ``vlmprune``'s loader does not."""
    import json

    model, proc = make_tiny_qwen_chat(family, **kwargs)
    folder = Path(folder)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    video = {"processor_class": "Qwen2VLProcessor", "video_processor_type": "Qwen2VLVideoProcessor",
             "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "do_sample_frames": False,
             "size": {"shortest_edge": 4 * 28 * 28, "longest_edge": 16 * 28 * 28}}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    return folder


def _save_images_only(folder: Path, model, proc, video_config: dict) -> Path:
    """Save ``model`` and ``proc`` (an images-only processor) in ``folder``, with the video
    processor's config beside as a checkpoint carries it (loading it needs torchvision)."""
    import json

    for k in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, k, getattr(proc.tokenizer, k))
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    (folder / "video_preprocessor_config.json").write_text(json.dumps(video_config, indent=2))
    return folder


def make_tiny_video_llava_folder(folder: str | Path, *, text_layers: int = 4, seed: int = 0) -> Path:
    """Save a tiny random Video-LLaVA (CLIP towers with [CLS], 4x4 patches at 56 px) with a real
    ``VideoLlavaProcessor`` (images only: its video processor needs torchvision) carrying
    ``CHAT_TEMPLATE``."""
    import torch
    from transformers import (VideoLlavaConfig, VideoLlavaForConditionalGeneration,
                              VideoLlavaImageProcessor, VideoLlavaProcessor)

    from vlmprune.integrations.compat import images_only_processor

    tok = tiny_tokenizer({"image_token": "<image>", "video_token": "<video>"})
    tok.add_special_tokens({"additional_special_tokens": ["<video>"]})
    ip = VideoLlavaImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    proc = images_only_processor(VideoLlavaProcessor)(image_processor=ip, tokenizer=tok, patch_size=14,
                                                      vision_feature_select_strategy="default",
                                                      num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    vision, text = _clip_llama_configs(tok, 56, text_layers)
    config = VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                              video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-2,
                              vision_feature_select_strategy="default", image_seq_length=16, video_seq_length=8 * 17)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config)
    return _save_images_only(Path(folder), model, proc, {"processor_class": "VideoLlavaProcessor",
                                                         "video_processor_type": "VideoLlavaVideoProcessor",
                                                         "size": {"shortest_edge": 56}, "do_sample_frames": False,
                                                         "crop_size": {"height": 56, "width": 56}})


def make_tiny_onevision_folder(folder: str | Path, *, text_layers: int = 4, seed: int = 0) -> Path:
    """Save a tiny random LLaVA-OneVision (SigLIP tower without [CLS], 3x3 patches per 42 px crop,
    any-res pinpoints up to 2x2 crops, ``anyres_max_2``) with a real ``LlavaOnevisionProcessor``
    (images only) carrying ``CHAT_TEMPLATE``."""
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor,
                              Qwen2Config, SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from vlmprune.integrations.compat import images_only_processor

    tok = tiny_tokenizer({"image_token": "<image>", "video_token": "<video>"})
    tok.add_special_tokens({"additional_special_tokens": ["<video>"]})
    ip = LlavaOnevisionImageProcessorPil(size={"height": 42, "width": 42}, image_grid_pinpoints=NEXT_PINPOINTS)
    proc = images_only_processor(LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok, num_image_tokens=9,
                                                          vision_feature_select_strategy="full",
                                                          vision_aspect_ratio="anyres_max_2",
                                                          chat_template=CHAT_TEMPLATE)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=42, patch_size=14, vision_use_head=False)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=NEXT_PINPOINTS,
                                  vision_aspect_ratio="anyres_max_2")
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    return _save_images_only(Path(folder), model, proc, {"processor_class": "LlavaOnevisionProcessor",
                                                         "video_processor_type": "LlavaOnevisionVideoProcessor",
                                                         "size": {"height": 42, "width": 42},
                                                         "do_sample_frames": False})
