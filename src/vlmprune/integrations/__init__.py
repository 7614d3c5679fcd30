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
    if info.stage == "vision":
        from .vision import attach as attach_stage
    else:
        from .decoder import attach as attach_stage
    return attach_stage(model, adapter, info, method_obj)
