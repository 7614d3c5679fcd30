"""Token ids of the testbed's words (colours, shapes, plurals, code characters, corners) in a tokenizer."""

from __future__ import annotations

import functools

import torch

from ..scenes import CODE_ALPHABET, COLOR_NAMES, CORNERS, PLURALS, SHAPES


def single_token(tok, text: str) -> int | None:
    """The id of ``text`` when the tokenizer spells it as exactly one token, else None."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


@functools.lru_cache(maxsize=4)
def naming_tokens(tok) -> dict[int, tuple[str, int]]:
    """Token id -> ("color" | "shape", 1-based label index) for the colour words, shape words and plurals."""
    table = {}
    for kind, names in (("color", COLOR_NAMES), ("shape", SHAPES), ("shape", [PLURALS[s] for s in SHAPES])):
        for i, name in enumerate(names, start=1):
            tid = single_token(tok, " " + name)
            if tid is not None:
                table[tid] = (kind, i)
    return table


@functools.lru_cache(maxsize=4)
def plural_tokens(tok) -> dict[int, str]:
    """Token id -> shape for the plural shape words that are one token (" circles", ...)."""
    ids = {shape: single_token(tok, " " + PLURALS[shape]) for shape in SHAPES}
    return {tid: shape for shape, tid in ids.items() if tid is not None}


@functools.lru_cache(maxsize=4)
def word_tables(tok) -> dict[str, torch.Tensor]:
    """Label index -> token id tables (index 0 = none -> -100; -100 also for a word that is not one
    token): ``color``, ``shape``, ``char`` (code characters) and ``corner`` words.

    Cached per tokenizer (read-only tensors: callers index them, never write).
    """
    def tid(text):
        t = single_token(tok, text)
        return -100 if t is None else t

    table = lambda words: torch.tensor([-100] + [tid(w) for w in words])  # noqa: E731
    return {"color": table([" " + c for c in COLOR_NAMES]), "shape": table([" " + s for s in SHAPES]),
            "char": table(list(CODE_ALPHABET)), "corner": table([" " + c for c in CORNERS])}
