"""The rows and target keys of stage 2's attention guides (answer, focus, words, count, read, position).

Every function reads a batch's [B, L] token ids / labels / image-token mask and returns (or fills
in place) bool rows [B, L] and targets [B, L, L] (per head: [B, heads, L, L]).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..questions import POSITION_QUESTION
from ..scenes import COLOR_NAMES, GRID, PLURALS, SHAPES
from .words import naming_tokens, plural_tokens


def word_guide_targets(input_ids: torch.Tensor, labels: torch.Tensor, image: torch.Tensor, labs, tok):
    """Rows [B, L] and targets [B, L, L] of the word-grounding guide (``guide_rows="words"``).

    Every question token (not an answer, not an image token) that names a colour or a shape
    (" red", " triangle", " triangles") is guided to the image patches showing that colour or
    shape; a word naming nothing in the image is not guided. ``labs``: the samples' ``PatchLabels``.
    """
    table = naming_tokens(tok)
    B, L = input_ids.shape
    rows = torch.zeros(B, L, dtype=torch.bool)
    targets = torch.zeros(B, L, L, dtype=torch.bool)
    for b, lab in enumerate(labs):
        keys = image[b].nonzero()[:, 0]
        maps = {"color": torch.as_tensor(lab.color), "shape": torch.as_tensor(lab.shape)}
        for t in ((labels[b] == -100) & ~image[b]).nonzero()[:, 0].tolist():
            hit = table.get(int(input_ids[b, t]))
            if hit is not None:
                patches = maps[hit[0]] == hit[1]
                if patches.any():
                    targets[b, t, keys] = patches
                    rows[b, t] = True
    return rows, targets


def count_guide_targets(input_ids: torch.Tensor, image: torch.Tensor, scenes, tok,
                        rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Turn the plural-word rows of a words guide into counting rows (in place); returns them [B, L].

    The plural in "How many circles are there?" is re-targeted to the first token of the sequence
    (an attention sink) plus the centre patch of every circle, and the returned rows are trained
    towards a *uniform* distribution over those keys (``AttentionGuide.loss``'s ``uniform``), so
    the sink gets 1 / (n + 1) of the attention. A plural naming an absent shape points at the sink
    alone (answer 0).
    """
    plurals = plural_tokens(tok)
    uniform = torch.zeros_like(rows)
    for b, scene in enumerate(scenes):
        keys = image[b].nonzero()[:, 0]
        for t in (~image[b]).nonzero()[:, 0].tolist():
            shape = plurals.get(int(input_ids[b, t]))
            if shape is None or t == 0:
                continue
            centres = sorted({r * GRID + c for r, c in (o.center_patch for o in scene.objects if o.shape == shape)})
            targets[b, t] = False
            targets[b, t, 0] = True
            if centres:
                targets[b, t, keys[centres]] = True
            rows[b, t] = True
            uniform[b, t] = True
    return uniform


def read_guide_targets(input_ids: torch.Tensor, labels: torch.Tensor, image: torch.Tensor, scenes, tok,
                       rows: torch.Tensor, targets: torch.Tensor, *, stop: bool = False) -> None:
    """Add the reading rows to a guide's ``rows`` [B, L] / ``targets`` [B, L, L] (in place).

    For each answer to "What is written in the image?" (an answer span equal to the scene's code),
    the row that predicts each answer token is guided to the patch(es) of the character(s) that
    token spells (one character per patch cell, left to right).

    ``stop=True`` also guides the row that predicts the end of the answer (the token after the
    code) to the cell right after the last character, when the grid has one.
    """
    for b, scene in enumerate(scenes):
        if scene.text is None:
            continue
        code = scene.text.code.lower()
        keys = image[b].nonzero()[:, 0]
        answer = (labels[b] != -100).tolist()
        t = 0
        while t < len(answer):
            if not answer[t]:
                t += 1
                continue
            end = t
            while end < len(answer) and answer[end]:
                end += 1
            span = input_ids[b, t:end].tolist()
            if span and span[-1] == tok.eos_token_id:
                span = span[:-1]
            pieces = [tok.decode([i]) for i in span]
            if pieces and "".join(pieces).strip() == code:
                done = 0
                for j, piece in enumerate(pieces):
                    n = len(piece.strip())
                    cells = [scene.text.row * GRID + scene.text.col + c for c in range(done, done + n)]
                    done += n
                    if cells:
                        rows[b, t + j - 1] = True
                        targets[b, t + j - 1, keys[cells]] = True
                after = scene.text.col + len(code)  # the cell right after the code
                if stop and end - t > len(pieces) and after < GRID:  # the answer has an end token after the code
                    stop_row = t + len(pieces) - 1  # the row that predicts the end token
                    rows[b, stop_row] = True
                    targets[b, stop_row, keys[scene.text.row * GRID + after]] = True
            t = end


def code_prev_targets(image: torch.Tensor, scenes, rows: torch.Tensor, targets: torch.Tensor) -> None:
    """Add the previous-cell rows of a read guide (``guide_read_prev``) to ``rows`` / ``targets`` (in place).

    The image token of each code cell after the first is guided to the cell on its left (the image
    token just before it): a previous-token pattern over the code. The first cell is left out: its
    left neighbour is background, which background dropout may drop.
    """
    for b, scene in enumerate(scenes):
        if scene.text is None:
            continue
        keys = image[b].nonzero()[:, 0]
        first = scene.text.row * GRID + scene.text.col
        for cell in range(first + 1, first + len(scene.text.code)):
            rows[b, keys[cell]] = True
            targets[b, keys[cell], keys[cell - 1]] = True


def answer_start_rows(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the rows that predict each answer's first token (a prompt token followed by a labelled one)."""
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = (labels[:, :-1] == -100) & (labels[:, 1:] != -100)
    return rows


def position_guide_targets(input_ids: torch.Tensor, labels: torch.Tensor, image: torch.Tensor,
                           conversations: list[list[tuple[str, str]]], tok, heads: int):
    """Rows and per-head targets of the position guide (``guide_position``).

    Returns ``(answer_rows [B, L], word_rows [B, L], targets [B, heads, L, L])``. For every
    position question ("Which corner is the star in?", "Is the star left of the square?") the row
    predicting its answer is guided, guided head ``h`` towards the ``h % n``-th of the question's
    ``n`` shape words (the corner question's one word on every head; a relation's first word on
    head 0, second on head 1), and those shape-word tokens are returned as ``word_rows``.
    """
    table = naming_tokens(tok)
    B, L = input_ids.shape
    answer_rows = torch.zeros(B, L, dtype=torch.bool)
    word_rows = torch.zeros(B, L, dtype=torch.bool)
    targets = torch.zeros(B, heads, L, L, dtype=torch.bool)
    starts = answer_start_rows(labels)
    for b, qa in enumerate(conversations):
        begin = 0
        for row, (question, _) in zip(starts[b].nonzero()[:, 0].tolist(), qa):
            span = range(begin, row + 1)
            begin = row + 1
            if not POSITION_QUESTION.match(question):
                continue
            words = [t for t in span if labels[b, t] == -100 and not image[b, t]
                     and table.get(int(input_ids[b, t]), ("",))[0] == "shape"]
            if not words:
                continue
            answer_rows[b, row] = True
            word_rows[b, words] = True
            for h in range(heads):
                targets[b, h, row, words[h % len(words)]] = True
    return answer_rows, word_rows, targets


def question_patches(question: str, lab) -> np.ndarray:
    """[N] bool: the patches a ShapesVQA question is about (the ``guide_focus`` target).

    Object patches whose colour or shape (singular or plural) the question names; for the reading
    question, the code's patches. ("Is there a red star?" -> red patches and star patches;
    "How many circles are there?" -> circle patches.)
    """
    if question.startswith("What is written"):
        return lab.char > 0
    words = set(re.findall(r"[a-z]+", question.lower()))
    colors = [i + 1 for i, c in enumerate(COLOR_NAMES) if c in words]
    shapes = [i + 1 for i, s in enumerate(SHAPES) if s in words or PLURALS[s] in words]
    return np.isin(lab.color, colors) | np.isin(lab.shape, shapes)
