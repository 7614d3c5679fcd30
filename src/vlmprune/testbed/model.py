"""The testbed LLaVA: a stock transformers ``LlavaForConditionalGeneration``, its tokenizer and processor.

Everything is built offline: the tokenizer is a byte-level BPE trained on ShapesVQA text, the
image processor is the PIL CLIP processor (no torchvision), the model is a small CLIP vision
tower ([CLS] + 24x24 patches at 336 px / patch 14), LLaVA's 2-layer MLP projector and a Llama
decoder. ``load()`` returns the committed, trained checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# Architecture of the shipped testbed (see docs in README "The testbed").
VISION = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=6,
              image_size=336, patch_size=14, projection_dim=192)
TEXT = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5)


def _tokenizer_corpus() -> list[str]:
    """Every kind of sentence the testbed uses, for training the BPE merges."""
    from .prompt import format_prompt
    from .questions import FAMILIES, ask
    from .scenes import CODE_ALPHABET, make_scene

    rnd = random.Random(0)
    lines = []
    for seed in range(300):
        scene = make_scene(seed, text=True)
        for fam in FAMILIES:
            q = ask(scene, fam, rnd)
            if q is not None:
                lines.append(format_prompt(q.question) + " " + q.answer + "</s>")
    lines += [" ".join(CODE_ALPHABET), " ".join(CODE_ALPHABET.lower()), "0 1 2 3 4 5 6 7 8 9"]
    return lines


def build_tokenizer():
    """Byte-level BPE tokenizer (Llama-style specials, ``<image>`` as a special token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left", extra_special_tokens={"image_token": "<image>"})
    return fast


def build_processor(tokenizer):
    """``LlavaProcessor`` with the PIL CLIP image processor at 336 px (576 image tokens per image)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_model(tokenizer, seed: int = 0, *, vision: dict | None = None, text: dict | None = None):
    """A randomly initialised testbed model (deterministic from ``seed``).

    ``vision`` / ``text`` override entries of the default architecture (tests use tiny widths).
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(**{**VISION, **(vision or {})})
    text = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False, **{**TEXT, **(text or {})})
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=576)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _path_like(src: str) -> bool:
    """Whether ``src`` can only be a local path (hub ids look like 'org/name' or 'name')."""
    return src.startswith(("/", ".", "~")) or src.count("/") > 1


def hub_lookup_note(path: str | Path | None) -> str | None:
    """What to tell a user whose ``path`` is no local folder and will be looked up on the Hugging
    Face Hub (which takes about a minute of retries without a network); None otherwise (a local
    folder, the testbed, a missing local path that ``load`` refuses at once, or ``HF_HUB_OFFLINE``)."""
    import os

    src = None if path is None else str(path).strip()
    if not src or Path(src).exists() or _path_like(src):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return None
    return (f"{src} is not a local folder: looking it up on the Hugging Face Hub (or its cache); set "
            "HF_HUB_OFFLINE=1 to use the cache only")


def load(path: str | Path | None = None, *, dtype=None, attn_implementation: str = "sdpa"):
    """Load a model of any supported family and its processor (default: the committed testbed checkpoint).

    ``path`` may be any local directory or hub id that ``from_pretrained`` accepts. A processor whose
    video processor needs torchvision, when torchvision is missing, loads for images only
    (``integrations.compat.load_processor``, with a ``UserWarning``).
    """
    from transformers import AutoModelForImageTextToText

    from ..integrations.compat import load_processor

    if path is not None and not str(path).strip():
        raise ValueError("empty model path; pass a model folder or hub id, or nothing for the committed testbed")
    src = str(path) if path is not None else str(CHECKPOINT_DIR)
    if path is not None and not Path(src).exists() and _path_like(src):
        raise FileNotFoundError(f"no model folder at {src} (a local path; hub ids look like 'org/name')")
    if path is not None and Path(src).is_file():
        raise FileNotFoundError(f"{src} is a file; pass the model's folder (the one holding config.json)")
    if path is None and not (CHECKPOINT_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"the testbed checkpoint is missing from {CHECKPOINT_DIR}; train it with `vlmprune testbed train`")
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype, attn_implementation=attn_implementation)
    processor = load_processor(src)  # images only when its video processor needs a missing torchvision
    model.eval()
    return model, processor


def install_checkpoint(src: str | Path) -> Path:
    """Copy a trained model folder (``save_pretrained`` output) into the package as the testbed."""
    import shutil

    src = Path(src)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src} holds no saved model (config.json missing)")
    if CHECKPOINT_DIR.exists():
        shutil.rmtree(CHECKPOINT_DIR)
    shutil.copytree(src, CHECKPOINT_DIR)
    return CHECKPOINT_DIR
