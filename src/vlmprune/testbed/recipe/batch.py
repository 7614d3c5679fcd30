"""Stage 2's batches: sampled multi-turn conversations, right-padded, with the auxiliary and guide inputs."""

from __future__ import annotations

import random

import torch

from ..prompt import encode_conversation, encode_independent_turns
from ..questions import conversation
from ..scenes import make_scene, patch_labels, split_seed
from .auxiliary import grounding_word_ids, patch_word_ids
from .config import TrainConfig
from .dropout import background_keep, background_sample
from .guide_targets import (answer_start_rows, code_prev_targets, count_guide_targets, position_guide_targets,
                            question_patches, read_guide_targets, word_guide_targets)
from .vision import pixel_values_of
from .words import word_tables


def segment_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """[B, L] segment ids (0 prefix, k >= 1 turn k, -1 padding) -> [B, 1, L, L] boolean mask.

    Query i may see key j iff j <= i and (j is in the prefix or in i's own segment); a padding row
    sees the prefix and itself, so no row is empty.
    """
    L = segment.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    q, k = segment[:, :, None], segment[:, None, :]
    allowed = causal & ((k == 0) | (q == k))
    allowed |= torch.eye(L, dtype=torch.bool)
    return allowed[:, None]


def scatter_image(image: torch.Tensor, per_patch: list[torch.Tensor], fill) -> torch.Tensor:
    """[B, L] tensor holding sample b's ``per_patch[b]`` at its image-token positions, ``fill`` elsewhere."""
    out = torch.full(image.shape, fill, dtype=per_patch[0].dtype)
    for b, values in enumerate(per_patch):
        out[b, image[b].nonzero()[:, 0]] = values
    return out


def sample_conversations(cfg: TrainConfig, step: int) -> tuple[list, list[list[tuple[str, str]]]]:
    """The scenes of the ``step``-th stage-2 batch and a conversation of ``cfg.turns`` turns about each.

    Seeds are step-indexed (train split, disjoint from stage 1's); a conversation that comes out
    empty (e.g. only "read" asked of a scene without text) falls back to one existence question.
    """
    scenes, conversations = [], []
    for i in range(cfg.llm_batch):
        seed = split_seed("train", (400_000_000 + cfg.seed * 7919 + step * cfg.llm_batch + i) % 800_000_000)
        rnd = random.Random(seed)
        n_objects = rnd.randint(1, cfg.max_objects) if cfg.max_objects else None
        scene = make_scene(seed, text=rnd.random() < cfg.text_prob, n_objects=n_objects)
        qa = conversation(scene, rnd, cfg.turns, cfg.families)
        if not qa:
            qa = conversation(scene, rnd, 1, ("exist",))
        scenes.append(scene)
        conversations.append(qa)
    return scenes, conversations


def _pad_conversations(processor, conversations) -> tuple[dict, torch.Tensor]:
    """Right-padded ``input_ids`` / ``labels`` / ``attention_mask`` [B, L] of whole conversations, and
    the [B, L, L] bool causal-and-padding mask the forward pass applies."""
    tok = processor.tokenizer
    seqs = [encode_conversation(processor, qa) for qa in conversations]
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (ids, lab) in enumerate(seqs):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
        mask[b, : len(ids)] = 1
    allowed = torch.ones(width, width, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels), allowed


def _pad_independent_turns(processor, conversations) -> tuple[dict, torch.Tensor]:
    """Right-padded ``input_ids`` / ``labels`` / ``position_ids`` [B, L] of independent turns
    (``encode_independent_turns``) with their [B, 1, L, L] ``attention_mask``, and that mask [B, L, L]."""
    tok = processor.tokenizer
    seqs = [encode_independent_turns(tok, qa, tok.convert_tokens_to_ids("<image>")) for qa in conversations]
    width = max(len(s["input_ids"]) for s in seqs)
    fills = {"input_ids": tok.pad_token_id, "labels": -100, "position_ids": 0, "segment": -1}
    out = {}
    for key, fill in fills.items():
        out[key] = torch.full((len(seqs), width), fill)
        for b, s in enumerate(seqs):
            out[key][b, : len(s[key])] = torch.tensor(s[key])
    mask = segment_attention_mask(out.pop("segment"))
    return dict(**out, attention_mask=mask), mask[:, 0]


def _words_guide(cfg: TrainConfig, input_ids, labels, image, labs, scenes, conversations, tok) -> dict:
    """The words guide's inputs (``guide_rows`` "words" / "words+read", with the add-ons ``cfg`` turns on):
    ``rows`` / ``targets``, and as needed ``uniform``, ``layer_rows`` and the position group in ``extra``."""
    rows, targets = word_guide_targets(input_ids, labels, image, labs, tok)
    guide = dict(rows=rows, targets=targets)
    layer_rows = None
    if cfg.guide_count:
        guide["uniform"] = count_guide_targets(input_ids, image, scenes, tok, rows, targets)
    if cfg.guide_rows == "words+read":
        if cfg.guide_read_prev:  # image rows, guided with the word rows (on the word layers)
            code_prev_targets(image, scenes, rows, targets)
        word_rows = rows.clone()
        read_guide_targets(input_ids, labels, image, scenes, tok, rows, targets, stop=cfg.guide_read_stop)
        if cfg.guide_read_layers is not None:  # each kind of row on its own layers
            layer_rows = {}
            for layers, r in ((cfg.guide_layers, word_rows), (cfg.guide_read_layers, rows & ~word_rows)):
                for layer in layers:
                    layer_rows[layer] = layer_rows.get(layer, torch.zeros_like(r)) | r
    if cfg.guide_position:
        answer_rows, pos_words, pos_targets = position_guide_targets(input_ids, labels, image, conversations, tok,
                                                                     cfg.guide_heads)
        if layer_rows is None:
            layer_rows = {layer: rows.clone() for layer in cfg.guide_layers}
        fetch = cfg.guide_position_layers[0]  # the shape words re-fetch their patches here
        layer_rows[fetch] = layer_rows.get(fetch, torch.zeros_like(rows)) | (pos_words & rows)
        guide["extra"] = [dict(rows=answer_rows, targets=pos_targets, layer=cfg.guide_position_layers[1])]
    if layer_rows is not None:
        guide["layer_rows"] = layer_rows
    return guide


def _answer_guide(cfg: TrainConfig, labels, image, labs, conversations) -> dict:
    """The answer guide's inputs: the rows predicting each answer's first token, towards every
    object/text patch ([B, L] targets) or, with ``guide_focus``, the patches their question names
    ([B, L, L]; a question naming nothing present is not guided)."""
    rows = answer_start_rows(labels)
    if not cfg.guide_focus:
        return dict(rows=rows, targets=scatter_image(image, [torch.as_tensor(lab.object_or_text) for lab in labs],
                                                     False))
    targets = torch.zeros(*rows.shape, rows.shape[1], dtype=torch.bool)
    for b, (lab, qa) in enumerate(zip(labs, conversations)):
        keys = image[b].nonzero()[:, 0]
        for row, (question, _) in zip(rows[b].nonzero()[:, 0], qa):
            targets[b, row, keys] = torch.as_tensor(question_patches(question, lab))
    return dict(rows=rows & targets.any(-1), targets=targets)


def llm_batch(cfg: TrainConfig, step: int, processor) -> dict:
    """The ``step``-th stage-2 batch, a dict of tensors (B = ``cfg.llm_batch``, L the padded length).

    Model inputs: ``input_ids``, ``labels`` (-100 except answers), ``attention_mask`` ([B, L], or
    [B, 1, L, L] with ``position_ids`` for ``independent_turns``) and ``pixel_values``. Then, as
    ``cfg`` asks, the inputs the loop pops before the forward pass: ``keep_image`` [B, N] (background
    dropout), ``patch_words`` [B, L] (patch-naming targets at image tokens, -100 elsewhere),
    ``ground_words`` [B, N, 2] and ``guide`` (``AttentionGuide.loss`` keyword arguments, with
    ``allowed`` the [B, L, L] mask of the forward pass).
    """
    tok = processor.tokenizer
    scenes, conversations = sample_conversations(cfg, step)
    pad = _pad_independent_turns if cfg.independent_turns else _pad_conversations
    batch, allowed = pad(processor, conversations)
    batch["pixel_values"] = pixel_values_of(processor, [sc.image for sc in scenes])

    share = background_keep(cfg, step)
    if not (cfg.patch_words or cfg.guide_weight or cfg.ground_words or share < 1):
        return batch
    labs = [patch_labels(sc) for sc in scenes]
    image = batch["input_ids"] == tok.convert_tokens_to_ids("<image>")
    words = word_tables(tok)
    if share < 1:
        batch["keep_image"] = torch.stack([
            background_sample(torch.as_tensor(lab.object_or_text), share, cfg.seed * 104729 + step * cfg.llm_batch + b)
            for b, lab in enumerate(labs)])
    if cfg.patch_words:
        batch["patch_words"] = scatter_image(image, [patch_word_ids(lab, words, cfg.patch_position) for lab in labs],
                                             -100)
    if cfg.ground_words:
        batch["ground_words"] = torch.stack([grounding_word_ids(lab, words) for lab in labs])
    if cfg.guide_weight:
        if cfg.guide_rows.startswith("words"):
            guide = _words_guide(cfg, batch["input_ids"], batch["labels"], image, labs, scenes, conversations, tok)
        else:
            guide = _answer_guide(cfg, batch["labels"], image, labs, conversations)
        batch["guide"] = dict(guide, allowed=allowed)
    return batch
