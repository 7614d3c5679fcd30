"""Public API: ``apply()``, ``pruned()``, ``remove()``, ``list_methods()``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from . import registry


def list_methods() -> list[dict[str, Any]]:
    """Every registered method with its stage, summary, options (name -> default), ``families``
    (model family -> ``"yes"``, or why the method cannot run on it) and, for the vision methods
    driven by [CLS] attention, ``scores`` (family -> the importance score it uses there, e.g. a
    substitute on families without [CLS])."""
    from .integrations.base import adapters

    known = adapters()
    out = []
    for name in registry.method_names():
        info = registry.get_method(name)
        families = {a.family: a.method_problem(name) or "yes" for a in known}
        entry = {"name": name, "stage": info.stage, "summary": info.summary, "options": info.options(),
                 "families": families}
        if info.stage == "vision" and getattr(info.build(), "needs_signals", False):
            entry["scores"] = {a.family: a.importance_score for a in known if families[a.family] == "yes"}
        out.append(entry)
    return out


def apply(model: Any, method: str, **options: Any):
    """Prune ``model`` in place with ``method``; returns a handle (``.stats``, ``.remove()``).

    ``model`` is a transformers vision-language model of a supported family (LLaVA-1.5,
    LLaVA-NeXT, Qwen2-VL; ``list_methods()`` says which method runs on which). ``method`` is a name or a spec string ``"NAME:key=value,..."``
    (``vlmprune.registry.SPEC_GRAMMAR``; keyword ``options`` override the spec's). ``options`` are
    the method's, plus the model family's own (``ModelAdapter.family_options``, e.g. LLaVA-NeXT's
    ``newlines="keep" | "rows"``). Pruning stays active until ``handle.remove()``, which restores the model
    exactly. Applying twice raises.
    """
    from .integrations import attach, family_options

    if isinstance(method, str) and ":" in method:
        name, spec_options = registry.parse_method_spec(method)
        if name is None:
            raise ValueError(f"{method!r} names no method; to run unpruned, do not apply one")
        method, options = name, {**spec_options, **options}
    info = registry.get_method(method)
    options = dict(options)
    family = family_options(model, options)  # e.g. LLaVA-NeXT's newlines=; the rest are the method's
    method_obj = info.build(**options)
    return attach(model, info, method_obj, family)


@contextmanager
def pruned(model: Any, method: str, **options: Any) -> Iterator[Any]:
    """``with pruned(model, "prumerge"): ...`` applies ``method`` and removes it on exit."""
    handle = apply(model, method, **options)
    try:
        yield handle
    finally:
        handle.remove()


def remove(model: Any) -> bool:
    """Undo the pruning applied to ``model``, if any; returns whether there was one to remove."""
    from .integrations.handle import HANDLE_ATTR

    handle = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        return False
    handle.remove()
    return True
