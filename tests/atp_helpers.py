"""A tiny testbed-style LLaVA (tokenizer + processor + model) saved to a folder, for the ATP training tests.

The testbed's own tokenizer trains its BPE on 300 rendered scenes (~10 s); here the merges come
from a few template sentences (byte-level BPE encodes any text anyway), in milliseconds.
"""

from __future__ import annotations

from pathlib import Path


def tiny_tokenizer():
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
                                   extra_special_tokens={"image_token": "<image>"})


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
