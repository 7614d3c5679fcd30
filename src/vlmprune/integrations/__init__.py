"""Integrations: everything that knows transformers lives here (one adapter per model family).

``attach(model, info, method_obj)`` is what ``vlmprune.apply`` calls: it finds the adapter for the
model's family, refuses a model that is already pruned, and hands over to the stage's plumbing
(``vision.attach`` or ``decoder.attach``), which returns a handle (``base.PruneHandle``).
"""

from __future__ import annotations

from typing import Any


def attach(model: Any, info: Any, method_obj: Any):
    from .base import HANDLE_ATTR, get_adapter

    existing = getattr(model, HANDLE_ATTR, None)
    if existing is not None:
        raise RuntimeError(f"this model is already pruned with {existing.method!r}; call handle.remove() "
                           "(or vlmprune.remove(model)) before applying another method")
    adapter = get_adapter(model)
    check_budget(info, method_obj, adapter.tokens_per_image(model))
    if info.stage == "vision":
        from .vision import attach as attach_stage
    else:
        from .decoder import attach as attach_stage
    return attach_stage(model, adapter, info, method_obj)


def check_budget(info: Any, method_obj: Any, num_tokens: int) -> None:
    """Refuse a token budget larger than the model's ``num_tokens`` visual tokens per image
    (``ValueError`` naming the method and the option), instead of capping it silently."""
    if hasattr(method_obj, "check_budget"):  # decoder-stage methods
        method_obj.check_budget(num_tokens)
        return
    keep = getattr(method_obj, "options", {}).get("keep")
    if isinstance(keep, int) and not isinstance(keep, bool) and keep > num_tokens:
        raise ValueError(f"{info.name}: keep={keep} is more than the {num_tokens} visual tokens per image of this "
                         f"model; pass keep <= {num_tokens} (a count) or a ratio in (0, 1]")
