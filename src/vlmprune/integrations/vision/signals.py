"""Capture of the [CLS] signals: hooks on the last vision layer's q/k projections, and the signals they give."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import Tensor

from ...methods.prumerge import cls_attention
from ..base import ModelAdapter
from .method import VisionSignals


@contextmanager
def capture_signals(adapter: ModelAdapter, model: Any) -> Iterator[dict[str, Tensor]]:
    """Forward hooks on the last vision layer's q_proj / k_proj, active inside the ``with``.

    Yields a dict that receives ``"q_cls"`` [U, 1, C] (the [CLS] query row only, at the adapter's
    ``cls_index``) and ``"k"`` [U, 1+N, C] (all keys): raw linear outputs, bias included, before
    the 1/sqrt(d) scaling.
    """
    q_proj, k_proj = adapter.get_last_qk(model)
    store: dict[str, Tensor] = {}
    ci = adapter.cls_index

    def on_q(_module: Any, _inp: Any, out: Tensor) -> None:
        store["q_cls"] = out[:, ci:ci + 1].detach()  # [U, 1, C]

    def on_k(_module: Any, _inp: Any, out: Tensor) -> None:
        store["k"] = out.detach()  # [U, 1+N, C]

    hooks = [q_proj.register_forward_hook(on_q), k_proj.register_forward_hook(on_k)]
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def signals_from_qk(q_cls: Tensor, k: Tensor, cls_index: int = 0) -> VisionSignals:
    """q_cls [U, 1, C], k [U, 1+N, C] with the [CLS] key at ``cls_index`` -> VisionSignals
    (cls_attn [U, N] float32, keys [U, N, C], both without the [CLS] column)."""
    if cls_index:  # move [CLS] to the front: cls_attention expects it at index 0
        order = [cls_index] + [j for j in range(k.shape[1]) if j != cls_index]
        k = k[:, order]
    q = q_cls.expand_as(k)  # a view: cls_attention reads row 0 only
    return VisionSignals(cls_attn=cls_attention(q, k), keys=k[:, 1:])
