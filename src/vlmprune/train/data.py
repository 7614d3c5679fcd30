"""Training batches of ShapesVQA conversations for the training commands (``train atp`` / ``train lora``).

Sample ``i`` of a run is a train-split scene drawn from seed ``split_seed("train", SCENE_BASE + i)``
(a range disjoint from the testbed's own), with its conversation: ``turns`` question-answer turns
of random question families, tokenised with the testbed's template (``testbed.prompt.encode_turns``):
loss on the answer tokens only, and each sample's *instruction rows* (the first turn's tokens after
the image, up to its "ASSISTANT:", which ATP scores with).
"""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["SCENE_BASE", "sample_conversation", "encode_atp_conversation", "make_batch"]

# ShapesVQA train-split scene indices used by the training commands (disjoint from the testbed's own ranges)
SCENE_BASE = 600_000_000


def sample_conversation(scene: Any, rnd: random.Random, turns: int) -> list[tuple[str, str]]:
    """Question-answer turns about ``scene``; one turn = a question of a random supported family."""
    from ..testbed.questions import FAMILIES, ask
    from ..testbed.questions import conversation

    if turns > 1:
        return conversation(scene, rnd, turns)
    while True:  # every scene supports "exist" and "count", so this ends
        q = ask(scene, rnd.choice(FAMILIES), rnd)
        if q is not None:
            return [(q.question, q.answer)]


def encode_atp_conversation(tokenizer: Any, qa: list[tuple[str, str]], image_token_id: int,
                            num_image_tokens: int) -> tuple[list[int], list[int], list[bool]]:
    """Token ids, labels and instruction mask of a conversation: the testbed's ``encode_turns``."""
    from ..testbed.prompt import encode_turns

    return encode_turns(tokenizer, qa, image_token_id, num_image_tokens)


def make_batch(processor: Any, sample_indices: list[int], *, image_token_id: int, num_image_tokens: int,
               turns: int = 1, text_prob: float = 0.5) -> dict[str, torch.Tensor]:
    """A right-padded training batch: input_ids / attention_mask / labels / instruction [B, L]
    (labels -100 off the answers, instruction True on the first question's rows) and
    pixel_values [B, 3, H, W]."""
    from ..testbed.scenes import make_scene, split_seed

    tok = processor.tokenizer
    images, seqs = [], []
    for index in sample_indices:
        seed = split_seed("train", (SCENE_BASE + index) % 900_000_000)
        rnd = random.Random(seed)
        scene = make_scene(seed, text=rnd.random() < text_prob)
        images.append(scene.image)
        seqs.append(encode_atp_conversation(tok, sample_conversation(scene, rnd, turns), image_token_id,
                                            num_image_tokens))
    width = max(len(s[0]) for s in seqs)
    bsz = len(seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.full((bsz, width), pad, dtype=torch.long)
    labels = torch.full((bsz, width), -100, dtype=torch.long)
    mask = torch.zeros((bsz, width), dtype=torch.long)
    instruction = torch.zeros((bsz, width), dtype=torch.bool)
    for b, (ids, lab, ins) in enumerate(seqs):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(ids)] = 1
        instruction[b, : len(ins)] = torch.tensor(ins)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, pixel_values=pixels, instruction=instruction)
