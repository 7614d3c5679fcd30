"""The models ``vlmprune bench`` measures and their prompts.

* Model names (``check_model_name``): ``testbed`` (the committed checkpoint), ``scaled`` /
  ``tiny`` (LLaVA-1.5-shaped, random weights: ``ScaledConfig``, ``TINY``), the scaled models of
  the other families (``SCALED``) and saved folders; ``load_bench_model`` builds or loads one and
  describes its shapes.
* ``SCALED``: each family's 7B shape scaled to a CPU (random weights, fp32, sdpa). The decoder keeps
  the 7B's layer count, head size 64, query : key/value head ratio and MLP ratio at a smaller
  width; the vision tower is narrowed and shortened; the image geometry is the family's own:

  - ``scaled-llava-next`` (LLaVA-NeXT-7B, vicuna): Llama decoder 32 x 256 (4 heads of 64, MLP
    11008/4096), CLIP tower 6 x 128 (2 heads), any-res with 168 px tiles (12 x 12 patches per
    crop) and llava-v1.6's pinpoints halved: a 336 x 336 image is the base image plus a 2 x 2
    mosaic with a newline per mosaic row, 144 + 24 * 25 = 744 tokens in 5 tower passes;
  - ``scaled-qwen2-vl`` (Qwen2-VL-7B): Qwen2 decoder 28 x 448 (7 query heads of 64, 1 key/value
    head, MLP 18944/3584, vocabulary 152064, M-RoPE sections [8, 12, 12]), ViT 6 x 320 (5 heads,
    MLP ratio 4) with the 2 x 2 merger: a 336 x 336 image is 24 x 24 patches, 144 merged tokens;
  - ``scaled-qwen2.5-vl`` (Qwen2.5-VL-7B): the same decoder; ViT 8 x 320 (5 heads, SwiGLU MLP
    3420/1280) with 112 px windows and full attention in blocks 3 and 7 (the 7B: every 8th of 32,
    the last one included), the 2 x 2 merger: a 336 x 336 image is 144 merged tokens;
  - ``scaled-video-llava`` (Video-LLaVA-7B): Llama decoder 32 x 256 as above, CLIP tower 6 x 128
    (2 heads) at LanguageBind's 224 px: an image is 16 x 16 = 256 tokens ([CLS] dropped);
  - ``scaled-llava-onevision`` (LLaVA-OneVision-7B): the Qwen2 decoder 28 x 448 above (1-D
    rotary), SigLIP tower 6 x 128 without [CLS] at 168 px (12 x 12 patches per crop),
    ``anyres_max_9`` with pinpoints up to 3 x 3 crops of 168 px (the 7B's up to 6 x 6 of 384 px).

* Prompts (``make_bench_inputs``): synthetic models get 35 system tokens, one image, 24
  question tokens, random ids and pixels, in LLaVA-1.5's layout (``bench.decoder.make_prompt``)
  or the family's own (``synthetic_inputs``: placeholders, pixels, geometry keywords and extra
  per-token inputs all come from the family's adapter); the testbed and saved models with a
  processor get ShapesVQA test questions through it.

The choice of widths is explained in ``docs/efficiency.md`` ("Other families").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .spec import BenchError

__all__ = ["DEFAULT_IMAGE_SIZE", "FAMILY_MODELS", "MODEL_CHOICES", "N_QUESTION", "N_SYSTEM", "SCALED",
           "SYNTHETIC_MODELS", "TINY", "ScaledConfig", "ScaledFamily", "bench_image_size", "build",
           "check_model_name", "describe", "load_bench_model", "make_bench_inputs", "synthetic_inputs",
           "tower_patches"]

N_SYSTEM, N_QUESTION = 35, 24


@dataclass(frozen=True)
class ScaledFamily:
    """A scaled random model of one family: its builder, the image size of its prompts, its 7B."""

    name: str
    build: Callable[[int], Any]
    image_size: tuple[int, int]
    shape_of: str


def _finish(model):
    model.config._attn_implementation = "sdpa"
    model.config.pad_token_id = 0
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.bos_token_id = 1
    return model.float().eval()


def _vicuna_text():
    """The scaled Vicuna-7B decoder of LLaVA-NeXT-7B and Video-LLaVA-7B: Llama 32 x 256."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32064, hidden_size=256, intermediate_size=int(256 * 11008 / 4096),
                       num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_llava_next(seed: int = 0):
    """The scaled LLaVA-NeXT-7B (``scaled-llava-next``)."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=2,
                              image_size=168, patch_size=14, projection_dim=128)
    pinpoints = [[168, 336], [336, 168], [336, 336], [504, 168], [168, 504]]  # llava-v1.6's, halved
    config = LlavaNextConfig(vision_config=vision, text_config=_vicuna_text(), image_token_id=32000, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
                             image_seq_length=144)
    torch.manual_seed(seed)
    return _finish(LlavaNextForConditionalGeneration(config))


def _qwen_text() -> dict[str, Any]:
    """The scaled Qwen2-VL-7B / Qwen2.5-VL-7B decoder (the two 7Bs share it)."""
    return dict(vocab_size=152064, hidden_size=448, intermediate_size=448 * 18944 // 3584, num_hidden_layers=28,
                num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_qwen2_vl(seed: int = 0):
    """The scaled Qwen2-VL-7B (``scaled-qwen2-vl``)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=6, embed_dim=320, hidden_size=448, num_heads=5, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(vision_config=vision, text_config=_qwen_text())
    torch.manual_seed(seed)
    return _finish(Qwen2VLForConditionalGeneration(config))


def build_qwen2_5_vl(seed: int = 0):
    """The scaled Qwen2.5-VL-7B (``scaled-qwen2.5-vl``)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = dict(depth=8, hidden_size=320, intermediate_size=320 * 3420 // 1280, num_heads=5, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
                  fullatt_block_indexes=[3, 7], out_hidden_size=448)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text())
    torch.manual_seed(seed)
    return _finish(Qwen2_5_VLForConditionalGeneration(config))


def build_video_llava(seed: int = 0):
    """The scaled Video-LLaVA-7B (``scaled-video-llava``)."""
    from transformers import CLIPVisionConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=2,
                              image_size=224, patch_size=14, projection_dim=128)
    config = VideoLlavaConfig(vision_config=vision, text_config=_vicuna_text(), image_token_index=32000,
                              video_token_index=32001, vision_feature_layer=-2,
                              vision_feature_select_strategy="default", image_seq_length=256,
                              video_seq_length=8 * 257)
    torch.manual_seed(seed)
    return _finish(VideoLlavaForConditionalGeneration(config))


def build_llava_onevision(seed: int = 0):
    """The scaled LLaVA-OneVision-7B (``scaled-llava-onevision``)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, \
        SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=2,
                                image_size=168, patch_size=14, vision_use_head=False)
    t = _qwen_text()
    del t["rope_parameters"]  # Qwen2-7B: 1-D rotary positions
    text = Qwen2Config(**t, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    side = [168 * k for k in (1, 2, 3)]
    pinpoints = [[h, w] for h in side for w in side]  # OneVision's 384-px multiples up to 6 x 6, scaled to 3 x 3
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=151646,
                                  video_token_index=151647, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints,
                                  vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(seed)
    return _finish(LlavaOnevisionForConditionalGeneration(config))


SCALED: dict[str, ScaledFamily] = {f.name: f for f in (
    ScaledFamily("scaled-llava-next", build_llava_next, (336, 336), "LLaVA-NeXT-7B (llava-v1.6-vicuna-7b)"),
    ScaledFamily("scaled-qwen2-vl", build_qwen2_vl, (336, 336), "Qwen2-VL-7B"),
    ScaledFamily("scaled-qwen2.5-vl", build_qwen2_5_vl, (336, 336), "Qwen2.5-VL-7B"),
    ScaledFamily("scaled-video-llava", build_video_llava, (224, 224), "Video-LLaVA-7B (LanguageBind towers)"),
    ScaledFamily("scaled-llava-onevision", build_llava_onevision, (336, 336), "LLaVA-OneVision-7B (Qwen2-7B, SigLIP)"),
)}


def build(name: str, seed: int = 0):
    """The scaled model ``name`` (a key of ``SCALED``)."""
    return SCALED[name].build(seed)


def synthetic_inputs(model, batch: int, image_size: tuple[int, int], seed: int = 0
                     ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A batch of ``batch`` equal-length prompts (35 system tokens, one image of ``image_size``
    (H, W) px, 24 question tokens; random ids other than the family's special ids, random pixels) in
    the family's input form, and its description (token counts, image size, tower passes)."""
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    layout = adapter.size_layout(model, image_size)
    count = int(sum(layout.tokens_per_image))
    image_ids = adapter.image_prompt_ids(model, count)
    specials = set(image_ids) | {adapter.image_token_id(model)} | set(adapter.image_prompt_ids(model, 1))
    vocab = torch.arange(3, min(model.config.get_text_config().vocab_size, 32000))  # 0-2: pad, BOS, EOS
    vocab = vocab[~torch.isin(vocab, torch.tensor(sorted(specials))) & ~adapter.visual_columns(model, vocab[None])[0]]
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for _ in range(batch):
        system = vocab[torch.randint(len(vocab), (N_SYSTEM - 1,), generator=g)].tolist()
        question = vocab[torch.randint(len(vocab), (N_QUESTION,), generator=g)].tolist()
        rows.append([1] + system + image_ids + question)
    ids = torch.tensor(rows)
    inputs: dict[str, Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs.update(adapter.random_image_inputs(model, [tuple(image_size)] * batch, g, dtype=model.dtype))
    inputs.update(adapter.sequence_extras(model, ids))
    desc = {"source": f"synthetic {adapter.family} layout (vlmprune.bench.models.synthetic_inputs)",
            "system_tokens": N_SYSTEM, "question_tokens": N_QUESTION, "image_size": list(image_size),
            "image_tokens": count, "tower_passes_per_image": len(adapter.unit_tokens(model, layout))}
    return inputs, desc


# ================================================================================ the bench's model names

#: The scaled random models of the other families (a new one is added to ``SCALED``).
FAMILY_MODELS = tuple(SCALED)
SYNTHETIC_MODELS = ("scaled", "tiny", *FAMILY_MODELS)
MODEL_CHOICES = ("testbed", "scaled", "tiny", *FAMILY_MODELS)
#: Image size (H, W) px of the synthetic prompts of a saved model without a processor.
DEFAULT_IMAGE_SIZE = (336, 336)


@dataclass(frozen=True)
class ScaledConfig:
    """The LLaVA-1.5-shaped model scaled to a CPU (random weights).

    Decoder: LLaVA-1.5-7B's 32 Llama layers, head_dim 64, MLP ratio 11008/4096, vocab 32064,
    width ``hidden`` (7B: 4096). Vision: CLIP-L/14 geometry (336 px, patch 14 -> 576 patches +
    [CLS], features from layer -2) with ``vision_layers`` layers of width ``vision_hidden`` (CLIP-L:
    24 x 1024). Built by ``vlmprune.bench.decoder.make_model``.
    """

    hidden: int = 512
    layers: int = 32
    vision_hidden: int = 256
    vision_layers: int = 6

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "vision_hidden", "vision_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BenchError(f"scaled model: {name} must be an int >= 1, got {v!r}")
        for name in ("hidden", "vision_hidden"):
            if getattr(self, name) % 64 and getattr(self, name) > 64:
                raise BenchError(f"scaled model: {name} must be a multiple of 64 (head size 64), "
                                 f"got {getattr(self, name)}")


#: The tiny synthetic model (plumbing checks, tests): same geometry, 4 layers of width 64.
TINY = ScaledConfig(hidden=64, layers=4, vision_hidden=32, vision_layers=2)


def check_model_name(name: str) -> str:
    """``testbed`` (the committed checkpoint), ``scaled``, ``tiny``, a ``SCALED`` family model or a
    local model folder (with a ``config.json``)."""
    if name in SYNTHETIC_MODELS:
        return name
    if name == "testbed":
        from ..testbed.model import CHECKPOINT_DIR

        if not (CHECKPOINT_DIR / "config.json").exists():
            raise BenchError(f"the testbed checkpoint is missing from {CHECKPOINT_DIR}; train it with "
                             "`vlmprune testbed train --install`, or benchmark --model scaled")
        return name
    if Path(name).is_dir() and (Path(name) / "config.json").exists():
        return name
    raise BenchError(f"unknown model {name!r}; use one of {', '.join(MODEL_CHOICES)} or a local folder with a "
                     "saved model of a supported family (config.json)")


def bench_image_size(name: str, image_size: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The image size of a model's synthetic prompts: ``image_size`` if given, else a scaled
    family model's own (``SCALED``), else ``DEFAULT_IMAGE_SIZE`` for a saved folder; None for
    ``scaled`` / ``tiny`` / ``testbed`` (LLaVA-1.5's fixed layout, or real questions)."""
    if name in ("scaled", "tiny", "testbed"):
        return None
    if image_size is not None:
        return tuple(image_size)
    if name in FAMILY_MODELS:
        return SCALED[name].image_size
    return DEFAULT_IMAGE_SIZE


def _has_processor(folder: str | Path) -> bool:
    return any((Path(folder) / f).exists() for f in ("processor_config.json", "preprocessor_config.json"))


def load_bench_model(name: str, dtype: torch.dtype, scaled: ScaledConfig = ScaledConfig()):
    """(model, processor or None, config description) for a model name (see ``check_model_name``)."""
    if name in FAMILY_MODELS:
        model, processor = build(name), None
        kind = f"synthetic (random weights, {SCALED[name].shape_of} scaled; vlmprune.bench.models)"
    elif name in SYNTHETIC_MODELS:
        from .decoder import make_model

        cfg = scaled if name == "scaled" else TINY
        model = make_model(hidden=cfg.hidden, layers=cfg.layers, vision_hidden=cfg.vision_hidden,
                           vision_layers=cfg.vision_layers)
        model.config.pad_token_id = 0
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = 2
        model.generation_config.bos_token_id = 1
        processor = None
        kind = "synthetic (random weights, vlmprune.bench.decoder.make_model)"
    else:
        try:  # a missing / corrupt folder is the user's input: one line naming it
            if name != "testbed" and not _has_processor(name):  # a saved model alone: synthetic prompts
                from transformers import AutoModelForImageTextToText

                model = AutoModelForImageTextToText.from_pretrained(name, attn_implementation="sdpa").eval()
                processor, kind = None, f"local folder {name} (no processor: synthetic prompts)"
            else:
                from ..testbed.model import load

                model, processor = load(None if name == "testbed" else name)
                kind = "testbed checkpoint" if name == "testbed" else f"local folder {name}"
        except Exception as e:  # noqa: BLE001 -- from_pretrained raises many kinds
            from .spec import BenchError

            raise BenchError(f"could not load model {name}: {type(e).__name__}: {e}") from None
    model = model.to(dtype).eval()
    return model, processor, {"kind": kind, **describe(model)}


def tower_patches(model) -> tuple[int, bool]:
    """(patches of one tower pass, whether the tower has a [CLS] token), from the model's adapter."""
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    h, w = adapter.patch_grid(model)
    return h * w, adapter.tower_has_cls(model)


def describe(model) -> dict[str, Any]:
    """The card's ``config`` of a model: family, decoder / vision / projector shapes, parameters,
    dtype and attention implementation."""
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    c = model.config
    t = adapter.text_config(model)
    shape = adapter.vision_shape(model)
    return {
        "family": adapter.family,
        "decoder": {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "heads": t.num_attention_heads,
                    "kv_heads": t.num_key_value_heads, "head_dim": getattr(t, "head_dim", None) or
                    t.hidden_size // t.num_attention_heads, "intermediate": t.intermediate_size,
                    "vocab": t.vocab_size},
        "vision": {"type": shape["type"], "image_size": shape["image_size"], "patch_size": shape["patch_size"],
                   "patches": tower_patches(model)[0], "layers": shape["layers"],
                   "hidden": shape["hidden"], "heads": shape["heads"], "intermediate": shape["intermediate"],
                   "feature_layer": adapter.vision_feature_layer(model),
                   "select_strategy": adapter.select_strategy(model),
                   "fixed_image_tokens": adapter.fixed_image_tokens(model), "shape": shape},
        "projector": {"dims": shape["projector_dims"], "after_pruning": shape["projector_after_pruning"]},
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).replace("torch.", ""),
        "attn_implementation": getattr(t, "_attn_implementation", None) or c._attn_implementation,
    }


def make_bench_inputs(model, processor, batch: int, seed: int = 0,
                      image_size: tuple[int, int] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A batch of ``batch`` prompts and its description.

    Synthetic models: with ``image_size``, the family's own layout of one image of that size
    (``synthetic_inputs``); without, LLaVA-1.5's layout (35 system tokens, 576 image tokens, 24
    question tokens; ``vlmprune.bench.decoder.make_prompt``); random ids and pixels. Testbed /
    saved models: real ShapesVQA test questions (families round-robin) through the model's
    processor, left-padded, with the processor's chat template when it has one (``eval.prompts``).
    """
    if processor is None and image_size is not None:
        inputs, desc = synthetic_inputs(model, batch, image_size, seed)
    elif processor is None:
        from .decoder import make_prompt

        inputs = make_prompt(model, batch=batch, seed=seed + 1)
        desc = {"source": "synthetic LLaVA-1.5 layout", "system_tokens": N_SYSTEM, "question_tokens": N_QUESTION}
    else:
        from ..eval.data import shapesvqa_items
        from ..eval.prompts import prompt_style
        from ..testbed.questions import FAMILIES

        per_family = -(-batch // len(FAMILIES))
        items = shapesvqa_items("test", "all", per_family)
        by_family = [items[i * per_family:(i + 1) * per_family] for i in range(len(FAMILIES))]
        chosen = [by_family[j % len(FAMILIES)][j // len(FAMILIES)] for j in range(batch)]
        processor.tokenizer.padding_side = "left"
        style = prompt_style(processor)  # a chat template writes its own special tokens (BOS): none added
        enc = processor(images=[it.image() for it in chosen], text=[style.build(it.question) for it in chosen],
                        padding=True, add_special_tokens=style.add_special_tokens, return_tensors="pt")
        inputs = dict(enc)
        desc = {"source": "ShapesVQA test questions via the processor", "items": [it.id for it in chosen],
                "template": style.description}
    for k in [k for k in inputs if k.startswith("pixel_values")]:  # Video-LLaVA: pixel_values_images
        inputs[k] = inputs[k].to(model.dtype)
    mask = inputs.get("attention_mask")
    lengths = (mask.sum(1) if mask is not None else torch.full((batch,), inputs["input_ids"].shape[1])).tolist()
    desc.update(tokens_per_sample=[int(x) for x in lengths], padded_length=int(inputs["input_ids"].shape[1]))
    return inputs, desc
