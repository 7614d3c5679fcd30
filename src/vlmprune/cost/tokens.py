"""Per-layer token counts for the cost model: a schedule from visual + text tokens, and the
``--layer-tokens`` syntax of ``vlmprune cost``."""

from __future__ import annotations

import re
from typing import Sequence

from .specs import CostModelError

__all__ = ["layer_token_schedule", "parse_layer_tokens"]


def layer_token_schedule(
    visual_tokens: int | Sequence[int], text_tokens: int, num_layers: int
) -> list[int]:
    """Per-layer sequence lengths = visual tokens in that layer + text tokens.

    ``visual_tokens`` is one count (same at every layer, i.e. pruning before the
    LLM) or one count per decoder layer (pruning inside the decoder).
    """
    if isinstance(text_tokens, bool) or int(text_tokens) != text_tokens or text_tokens < 0:
        raise CostModelError(f"text tokens must be a non-negative integer, got {text_tokens!r}")
    if isinstance(visual_tokens, (int,)) and not isinstance(visual_tokens, bool):
        per_layer = [visual_tokens] * num_layers
    else:
        per_layer = list(visual_tokens)
        if len(per_layer) != num_layers:
            raise CostModelError(
                f"expected {num_layers} per-layer visual-token counts (one per decoder "
                f"layer), got {len(per_layer)}")
    for i, v in enumerate(per_layer):
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise CostModelError(
                f"visual tokens must be non-negative integers; layer {i} has {v!r}")
    out = [int(v) + int(text_tokens) for v in per_layer]
    if any(s == 0 for s in out):
        raise CostModelError("a layer would process 0 tokens; give at least one token")
    return out


_REPEAT = re.compile(r"^\s*(-?\d+)\s*(?:[x*]\s*(\d+))?\s*$")


def parse_layer_tokens(text: str, num_layers: int | None = None) -> list[int]:
    """Parse ``"576,576,144,..."``; ``"576x3,99x29"`` repeats a count.

    Raises :class:`CostModelError` on negative numbers, junk, or (when
    ``num_layers`` is given) the wrong number of entries.
    """
    counts: list[int] = []
    for part in text.split(","):
        if not part.strip():
            continue
        m = _REPEAT.match(part)
        if not m:
            raise CostModelError(
                f"cannot parse {part.strip()!r} in --layer-tokens; use a comma list of "
                "non-negative integers, optionally COUNTxREPEAT (e.g. 576x3,99x29)")
        value = int(m.group(1))
        if value < 0:
            raise CostModelError(f"visual tokens must be >= 0, got {value} in --layer-tokens")
        counts.extend([value] * (int(m.group(2)) if m.group(2) else 1))
    if not counts:
        raise CostModelError("--layer-tokens is empty")
    if num_layers is not None and len(counts) != num_layers:
        raise CostModelError(
            f"--layer-tokens has {len(counts)} entries but the model has {num_layers} "
            "decoder layers; give one count per layer")
    return counts

