"""Stage 2's auxiliary losses: patch naming (image tokens predict the words that name them) and
projector grounding (projected patches point along those words' embeddings)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..scenes import GRID, patch_labels
from .words import word_tables


def patch_word_ids(lab, words: dict[str, torch.Tensor], position: bool = False) -> torch.Tensor:
    """[N] token ids naming each patch of ``lab`` (a ``PatchLabels``), ``words`` = ``word_tables``.

    Object patches alternate (in raster order) between their colour word and their shape word;
    with ``position`` they cycle by ``(row + col) % 3`` through colour, shape and the corner word of
    the object's centre. Text patches name their character; background patches get -100.
    """
    color, shape, char = (torch.as_tensor(getattr(lab, k)) for k in ("color", "shape", "char"))
    if position:
        cell = torch.arange(len(color))
        phase = (cell // GRID + cell % GRID) % 3
        ids = torch.where(phase == 0, words["color"][color], words["shape"][shape])
        ids = torch.where(phase == 2, words["corner"][torch.as_tensor(lab.corner)], ids)
    else:
        even = torch.arange(len(color)) % 2 == 0
        ids = torch.where(even, words["color"][color], words["shape"][shape])  # -100 where no object
    return torch.where(char > 0, words["char"][char], ids)


def grounding_word_ids(lab, words: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, 2] token ids whose embeddings describe each patch of ``lab`` (-100 = none).

    Object patches: (colour word, shape word); text patches: (character, -100); background: both -100.
    """
    color, shape, char = (torch.as_tensor(getattr(lab, k)) for k in ("color", "shape", "char"))
    ids = torch.stack([words["color"][color], words["shape"][shape]], -1)
    text = torch.stack([words["char"][char], torch.full_like(char, -100)], -1)
    return torch.where((char > 0)[:, None], text, ids)


def grounding_loss(image_features: torch.Tensor, word_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between projected patches and the summed embeddings of the words naming them.

    ``image_features`` [B, N, D] is the projector's output, ``word_ids`` [B, N, 2]
    (``grounding_word_ids``), ``embeddings`` the decoder's input embedding matrix (used as a fixed
    target: detached, so the loss moves the projector only). Patches with no word are left out;
    with none at all the loss is 0 (still connected to the graph).
    """
    valid = word_ids >= 0
    target = (embeddings.detach()[word_ids.clamp(min=0)] * valid[..., None]).sum(-2)  # [B, N, D]
    labelled = valid.any(-1)
    if not labelled.any():
        return image_features.sum() * 0
    cos = F.cosine_similarity(image_features[labelled].float(), target[labelled].float(), dim=-1)
    return (1 - cos).mean()


def patch_word_targets(scene, tok, position: bool = False) -> torch.Tensor:
    """[N] token ids naming each patch of ``scene`` (``patch_word_ids`` of its labels), the targets of
    the patch-naming loss: the decoder's output at each image token predicts its word through
    ``lm_head`` (cross-entropy, -100 ignored)."""
    return patch_word_ids(patch_labels(scene), word_tables(tok), position)
