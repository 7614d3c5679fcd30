"""Scaled random models of each family for ``vlmprune bench``, and their prompts.

Each model is the family's real 7B shape scaled to a CPU (random weights, fp32, sdpa), built in
code: the decoder keeps the 7B's layer count, head size 64, grouped-query ratio and MLP ratio at a
smaller width; the vision tower is narrowed and shortened like the LLaVA-1.5 ``scaled`` model's so
that its share of the prefill FLOPs stays close to the 7B's (it is never pruned); the image geometry
is the family's own (``SCALED``):

* ``scaled-llava-next`` — LLaVA-NeXT-7B (vicuna): Llama decoder 32 x 256 (4 heads of 64, MLP
  11008/4096), CLIP tower 6 x 128 (2 heads of 64; half the decoder's width as in the LLaVA-1.5
  ``scaled`` model: ~3 % of the prefill FLOPs, the 7B's ~4.5 %); any-res with the tile halved (168 px, 12 x 12 patches per
  crop) and llava-v1.6's pinpoints halved, so a 336 x 336 image is, as a 672 x 672 image on the
  7B, the base image plus a 2 x 2 mosaic with a newline per mosaic row: 144 + 24 * 25 = 744 tokens.
* ``scaled-qwen2-vl`` — Qwen2-VL-7B: Qwen2 decoder 28 x 448 (7 query heads of 64, 1 key/value
  head: the 7B's 28 : 4 ratio; MLP 18944/3584; vocabulary 152064; M-RoPE sections [8, 12, 12],
  the 7B's [16, 24, 24] at half the head size), ViT 6 x 320 (5 heads, MLP ratio 4) with the 2 x 2
  merger (its share of the prefill FLOPs: ~20 %, as the 7B's at this image size); a 336 x 336
  image: 24 x 24 patches, 144 merged tokens.

The widths are below the LLaVA-1.5 ``scaled`` model's 512 so that a card (batch 1 and 8, four
variants) runs in minutes on a shared 2-core machine; a narrower model makes the pruning's fixed
costs a *larger* share of the prefill, not a smaller one. 448 is the narrowest width with the
7B's 7 : 1 query : key/value heads at head size 64.

The prompt (``synthetic_inputs``) is the LLaVA-1.5 bench's: 35 system tokens, one image per
sample, 24 question tokens, random ids and pixels; everything family-shaped in it comes from the
family's adapter (``size_layout``: the placeholder count; ``image_prompt_ids``: how an image sits
in the prompt; ``random_image_inputs``: pixels and geometry keywords; ``sequence_extras``: e.g.
``mm_token_type_ids``), so a new family needs a builder here and nothing else in the bench.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["ScaledFamily", "SCALED", "build", "synthetic_inputs", "N_SYSTEM", "N_QUESTION"]

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


def build_llava_next(seed: int = 0):
    """The scaled LLaVA-NeXT-7B (see the module docstring)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=2,
                              image_size=168, patch_size=14, projection_dim=128)
    text = LlamaConfig(vocab_size=32064, hidden_size=256, intermediate_size=int(256 * 11008 / 4096),
                       num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    pinpoints = [[168, 336], [336, 168], [336, 336], [504, 168], [168, 504]]  # llava-v1.6's, halved
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
                             image_seq_length=144)
    torch.manual_seed(seed)
    return _finish(LlavaNextForConditionalGeneration(config))


def build_qwen2_vl(seed: int = 0):
    """The scaled Qwen2-VL-7B (see the module docstring)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=6, embed_dim=320, hidden_size=448, num_heads=5, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(vocab_size=152064, hidden_size=448, intermediate_size=448 * 18944 // 3584, num_hidden_layers=28,
                num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = Qwen2VLConfig(vision_config=vision, text_config=text)
    torch.manual_seed(seed)
    return _finish(Qwen2VLForConditionalGeneration(config))


SCALED: dict[str, ScaledFamily] = {f.name: f for f in (
    ScaledFamily("scaled-llava-next", build_llava_next, (336, 336), "LLaVA-NeXT-7B (llava-v1.6-vicuna-7b)"),
    ScaledFamily("scaled-qwen2-vl", build_qwen2_vl, (336, 336), "Qwen2-VL-7B"),
)}


def build(name: str, seed: int = 0):
    """The scaled model ``name`` (a key of ``SCALED``)."""
    return SCALED[name].build(seed)


def synthetic_inputs(model, batch: int, image_size: tuple[int, int], seed: int = 0
                     ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A batch of ``batch`` equal-length prompts (35 system tokens, one image of ``image_size``
    (H, W) px, 24 question tokens; random ids other than the family's special ids, random pixels) in
    the family's input form, and its description (see the module docstring)."""
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
            "image_tokens": count, "tower_passes_per_image": len(layout.units)}
    return inputs, desc
