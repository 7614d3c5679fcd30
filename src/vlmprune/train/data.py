"""Training batches of ShapesVQA conversations for the training commands (``train atp`` / ``train lora``).

Sample ``i`` of a run is a train-split scene drawn from seed ``split_seed("train", SCENE_BASE + i)``
(a range disjoint from the testbed's own), with its conversation: ``turns`` question-answer turns
of random question families. Two ways to tokenise it, both with loss on the answer tokens only and
each sample's *instruction rows* (the first turn's tokens after the image, which ATP scores with):

* ``make_batch``: the testbed's template (``testbed.prompt.encode_turns``), for a LLaVA-1.5 model
  whose processor has no chat template (the testbed);
* ``make_chat_batch``: the processor's chat template, for any family (LLaVA-NeXT, Qwen2-VL, ...):
  the processor expands the image placeholder and produces the family's image inputs
  (``image_sizes``, ``image_grid_thw``, ...), which the batch carries through.
"""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["SCENE_BASE", "sample_conversation", "encode_atp_conversation", "make_batch", "chat_segments",
           "make_chat_batch", "conversations", "to_model",
           "training_batch", "training_style"]

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


def conversations(sample_indices: list[int], turns: int, text_prob: float) -> list[tuple[Any, list[tuple[str, str]]]]:
    """(image, conversation) of each training sample index."""
    from ..testbed.scenes import make_scene, split_seed

    out = []
    for index in sample_indices:
        seed = split_seed("train", (SCENE_BASE + index) % 900_000_000)
        rnd = random.Random(seed)
        scene = make_scene(seed, text=rnd.random() < text_prob)
        out.append((scene.image, sample_conversation(scene, rnd, turns)))
    return out


def make_batch(processor: Any, sample_indices: list[int], *, image_token_id: int, num_image_tokens: int,
               turns: int = 1, text_prob: float = 0.5) -> dict[str, torch.Tensor]:
    """A right-padded training batch: input_ids / attention_mask / labels / instruction [B, L]
    (labels -100 off the answers, instruction True on the first question's rows) and
    pixel_values [B, 3, H, W]."""
    tok = processor.tokenizer
    images, seqs = [], []
    for image, qa in conversations(sample_indices, turns, text_prob):
        images.append(image)
        seqs.append(encode_atp_conversation(tok, qa, image_token_id, num_image_tokens))
    batch = _right_padded(seqs, tok.pad_token_id)
    batch["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return batch


def _right_padded(seqs: list[tuple[list[int], list[int], list[bool]]], pad: int | None) -> dict[str, torch.Tensor]:
    """Per-sample (ids, labels, instruction) lists -> input_ids / attention_mask / labels /
    instruction [B, L], right-padded (pad id, 0 mask, label -100, instruction False; each field
    filled to its own length)."""
    width = max(len(s[0]) for s in seqs)
    bsz = len(seqs)
    input_ids = torch.full((bsz, width), pad if pad is not None else 0, dtype=torch.long)
    labels = torch.full((bsz, width), -100, dtype=torch.long)
    mask = torch.zeros((bsz, width), dtype=torch.long)
    instruction = torch.zeros((bsz, width), dtype=torch.bool)
    for b, (ids, lab, ins) in enumerate(seqs):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(ids)] = 1
        instruction[b, : len(ins)] = torch.tensor(ins)
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels, instruction=instruction)


def chat_segments(processor: Any, qa: list[tuple[str, str]], visual: str = "image") -> list[str]:
    """A conversation rendered by the processor's chat template, cut into its turns' texts:
    [prompt_1, answer_1, prompt_2, answer_2, ...]. prompt_1 holds the ``visual`` placeholder (a
    ``{"type": "image"}`` or ``{"type": "video"}`` content entry: the first user turn holds it, then
    the question) and every prompt ends with the template's generation
    prompt; an answer segment is the answer and whatever the template writes after it (its
    end-of-turn tokens). Raises ValueError when a rendering is not a prefix of the next one (a
    template that rewrites earlier turns cannot be cut this way)."""
    messages: list[dict] = []
    segments, prev = [], ""
    for turn, (question, answer) in enumerate(qa):
        content = ([{"type": visual}] if turn == 0 else []) + [{"type": "text", "text": question}]
        for message, generation_prompt in (({"role": "user", "content": content}, True),
                                           ({"role": "assistant", "content": [{"type": "text", "text": answer}]}, False)):
            messages.append(message)
            text = processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
            if not text.startswith(prev):
                raise ValueError("the processor's chat template renders a conversation differently once a turn is "
                                 "added, so its answers cannot be located; train with ATPTrainStep on your own "
                                 "batches (docs/atp.md)")
            segments.append(text[len(prev):])
            prev = text
    return segments


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def make_chat_batch(processor: Any, sample_indices: list[int], *, image_token_id: int, turns: int = 1,
                    text_prob: float = 0.5, video_frames: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded training batch through the processor's chat template (``chat_segments``).

    ``video_frames`` > 0: each scene is a still video of that many frames (the scene image
    repeated; ShapesVQA's answers hold for every frame), passed as ``videos=`` through a
    ``{"type": "video"}`` entry, and ``image_token_id`` is the video placeholder's id.

    Each whole conversation goes through ``processor(images=..., text=...)`` in one batched call
    (the image placeholder expanded, the family's image inputs and per-token outputs such as
    ``mm_token_type_ids`` produced; the tokenizer's special tokens only when the rendering does not
    start with BOS, ``eval.prompts.chat_adds_special_tokens``), so the ids are those of the rendered
    conversation, as inference would tokenise it. The turn boundaries are found on the tokenizer's
    ids of the unexpanded text: segment k ends where the ids of the text up to it stop agreeing with
    the whole conversation's (a tokeniser may join or split tokens at a boundary: a trailing space
    of the generation prompt goes with the answer's first token), then shifted past the image's
    expansion. Returns input_ids / attention_mask / labels / instruction [B, L] (labels -100 off
    the answer segments, i.e. the answers and what the template writes after them; instruction
    True on the first prompt's rows after its last ``image_token_id``), the processor's other
    outputs (pixel values, image_sizes, image_grid_thw, ...) and its ``*token_type_ids`` [B, L]
    re-padded on the right with 0. Raises ValueError when the processor's ids differ from the
    tokenizer's outside the image placeholder."""
    from ..eval.prompts import chat_adds_special_tokens

    tok = processor.tokenizer
    convs = conversations(sample_indices, turns, text_prob)
    visual = "video" if video_frames else "image"
    segs = [chat_segments(processor, qa, visual) for _, qa in convs]
    texts = ["".join(s) for s in segs]
    special = chat_adds_special_tokens(processor, texts[0])
    pixels = ({"videos": [[image] * video_frames for image, _ in convs]} if video_frames
              else {"images": [image for image, _ in convs]})
    full = processor(**pixels, text=texts, padding=True, add_special_tokens=special, return_tensors="pt")
    ids_all, mask_all = full["input_ids"], full["attention_mask"].bool()
    token_keys = [k for k, v in full.items() if k.endswith("token_type_ids") and isinstance(v, torch.Tensor)
                  and tuple(v.shape) == tuple(ids_all.shape)]
    rows = []
    for b, s in enumerate(segs):
        ids = ids_all[b][mask_all[b]].tolist()
        plain = tok(texts[b], add_special_tokens=special)["input_ids"]  # the placeholder not expanded
        image_at = [i for i, t in enumerate(ids) if t == image_token_id]
        if not image_at or plain.count(image_token_id) != 1:
            raise ValueError(f"the conversation must hold one {visual} placeholder (token id {image_token_id}) that "
                             f"the processor expands: the chat template must place the {visual} of a "
                             f"{{'type': '{visual}'}} content entry")
        p, n = plain.index(image_token_id), len(image_at)
        shift = n - 1
        if ids[:p] != plain[:p] or ids[image_at[-1] + 1:] != plain[p + 1:] or image_at != list(range(image_at[0],
                                                                                                      image_at[-1] + 1)):
            raise ValueError("the processor's token ids differ from its tokenizer's outside the image placeholder, "
                             "so the answers cannot be located; train with ATPTrainStep on your own batches")
        bounds, prefix = [], ""
        for seg in s[:-1]:  # the last segment ends with the conversation
            prefix += seg
            bounds.append(_common_prefix(tok(prefix, add_special_tokens=special)["input_ids"], plain))
        bounds.append(len(plain))
        if bounds[0] <= p:
            raise ValueError("the chat template's first prompt must hold the image")
        bounds = [x + shift for x in bounds]  # every boundary lies after the image
        labels, instruction = [-100] * len(ids), [False] * len(ids)
        for k in range(1, len(bounds), 2):  # the answer segments
            labels[bounds[k - 1]:bounds[k]] = ids[bounds[k - 1]:bounds[k]]
        instruction[image_at[-1] + 1:bounds[0]] = [True] * (bounds[0] - image_at[-1] - 1)
        rows.append((ids, labels, instruction))
    batch = _right_padded(rows, tok.pad_token_id)
    for k in token_keys:  # the processor's own values at each sample's rows, re-padded on the right
        batch[k] = torch.zeros_like(batch["input_ids"], dtype=full[k].dtype)
        for b in range(len(rows)):
            vals = full[k][b][mask_all[b]]
            batch[k][b, :len(vals)] = vals
    for k, v in full.items():
        if k not in batch:
            batch[k] = v
    return batch


def training_style(processor: Any, fixed_image_tokens: int | None, family: str) -> bool:
    """Whether the training commands build their batches with ``processor``'s chat template (True)
    or the testbed's LLaVA-1.5 template (False, a processor without one on a model whose images
    all get ``fixed_image_tokens``); raises ValueError for another family's processor without one."""
    from ..eval.prompts import has_chat_template

    if has_chat_template(processor):
        return True
    if fixed_image_tokens is None:
        raise ValueError(f"the {family} model's processor has no chat template, and the ShapesVQA template is "
                         "LLaVA-1.5's: give the processor a chat_template (processor.chat_template = ...; "
                         "processor.save_pretrained(DIR))")
    return False


def to_model(batch: dict[str, Any], device: Any, dtype: torch.dtype) -> dict[str, Any]:
    """``batch``'s tensors on ``device``, the pixel values (``pixel_values*``) in the model's ``dtype``
    (other float inputs, e.g. ``second_per_grid_ts``, keep theirs)."""
    return {k: (v.to(device, dtype) if k.startswith("pixel_values") else v.to(device))
            if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def training_batch(processor: Any, sample_indices: list[int], *, chat: bool, image_token_id: int,
                   num_image_tokens: int | None, turns: int, text_prob: float,
                   video_frames: int = 0) -> dict[str, torch.Tensor]:
    """The training commands' batch: ``make_chat_batch`` when ``chat`` (the processor has a chat
    template: any family; ``video_frames`` > 0: still videos), else ``make_batch`` (the testbed's
    LLaVA-1.5 template, ``num_image_tokens`` placeholders per image)."""
    if chat:
        return make_chat_batch(processor, sample_indices, image_token_id=image_token_id, turns=turns,
                               text_prob=text_prob, video_frames=video_frames)
    return make_batch(processor, sample_indices, image_token_id=image_token_id, num_image_tokens=num_image_tokens,
                      turns=turns, text_prob=text_prob)


def video_view(model: Any, processor: Any, frames: int) -> Any:
    """The adapter view of ``model``'s video inputs, for training on still videos of ``frames``
    frames; ValueError in one line when the family takes no videos, or ``processor`` cannot make
    them (``integrations.base.video_view``)."""
    from ..integrations import base

    try:
        return base.video_view(model, processor)
    except ValueError as e:
        raise ValueError(f"--videos {frames}: {e}; without --videos it trains on images") from None
