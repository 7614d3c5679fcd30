"""Integrations: everything that knows transformers lives here (one adapter per model family).

``attach(model, info, method_obj)`` is what ``vlmprune.apply`` calls: it finds the adapter for the
model's family, refuses a model that is already pruned or a method the family cannot run
(``adapter.method_problem``), and hands over to the stage's plumbing
(``vision.attach`` or ``decoder.attach``), which returns a handle (``handle.PruneHandle``).
"""

from __future__ import annotations

from typing import Any


def family_options(model: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Pop the options of ``model``'s family (``ModelAdapter.family_options``) out of ``options``;
    returns them ({} for a model no adapter handles: ``attach`` reports that)."""
    from .base import UnsupportedModelError, get_adapter

    try:
        names = get_adapter(model).family_options
    except UnsupportedModelError:
        return {}
    return {name: options.pop(name) for name in names if name in options}


def attach(model: Any, info: Any, method_obj: Any, family: dict[str, Any] | None = None):
    from .base import get_adapter
    from .handle import check_not_pruned

    check_not_pruned(model)
    adapter = get_adapter(model).configure(**(family or {}))
    if problem := adapter.method_problem(info.name):
        raise ValueError(f"method {info.name!r} cannot run on {adapter.family} models yet: {problem}")
    check_budget(info, method_obj, adapter.budget_tokens(model, info.stage))
    if info.stage == "vision":
        from .vision import attach as attach_stage
    else:
        from .decoder import attach as attach_stage
    handle = attach_stage(model, adapter, info, method_obj)
    if not handle.stats.num_layers:
        handle.stats.num_layers = len(adapter.get_decoder_layers(model))
    if info.stage == "decoder":
        _gather_labels(model, handle)
    return handle


def _gather_labels(model: Any, handle: Any) -> None:
    """``model(..., labels=...)`` under a decoder-stage method: the pruned forward's logits cover the
    kept tokens only ([B, L_final, V], column j = input position ``handle.state.final_source[:, j]``),
    so the labels are gathered the same way (-100 at padding and recycled tokens) and the loss is the
    model's own loss of those logits against them."""
    from .compat import K, lm_loss

    pending: dict[str, Any] = {}

    def pre(module, args, kwargs):
        labels = kwargs.get(K.LABELS)
        if labels is None:
            return None
        pending["labels"] = labels
        return args, {**kwargs, K.LABELS: None}

    def post(module, args, kwargs, output):
        labels = pending.pop("labels", None)
        if labels is None:
            return None
        logits = output.logits
        src = handle.state.final_source
        if logits.shape[1] != labels.shape[1]:
            if src is None or tuple(src.shape) != tuple(logits.shape[:2]):
                raise ValueError(f"{handle.method}: labels have {labels.shape[1]} columns but the logits "
                                 f"{logits.shape[1]}, and no pruned layout maps one to the other")
            src = src.to(labels.device)
            labels = labels.gather(1, src.clamp(min=0)).masked_fill(src < 0, -100)
        output.loss = lm_loss(model, logits, labels)
        return output

    handle.add_hook(model.register_forward_pre_hook(pre, with_kwargs=True))
    handle.add_hook(model.register_forward_hook(post, with_kwargs=True))


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
