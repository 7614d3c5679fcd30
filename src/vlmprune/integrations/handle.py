"""What ``vlmprune.apply`` returns: the handle of a pruning applied to one model, and its stats.

A **handle** (``PruneHandle``) is attached to the model under ``HANDLE_ATTR`` (so applying twice
is detected), owns every hook and patch the stage installed (``remove()`` undoes them in reverse
order, idempotently, restoring the model exactly), and carries typed statistics
(``PruneStats``: the visual tokens fed to the LLM, per image and per decoder layer). The vision
and decoder stages subclass both.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, TypeVar

__all__ = ["HANDLE_ATTR", "check_not_pruned", "PruneStats", "PruneHandle"]

#: Attribute set on a pruned model; holds its ``PruneHandle`` (absent when the model is not pruned).
HANDLE_ATTR = "_vlmprune_handle"


def check_not_pruned(model: Any) -> None:
    """Raise RuntimeError if ``model`` already carries a pruning (a ``PruneHandle``)."""
    existing = getattr(model, HANDLE_ATTR, None)
    if existing is not None:
        raise RuntimeError(f"this model is already pruned with {existing.method!r}; call handle.remove() "
                           "(or vlmprune.remove(model)) before applying another method")


@dataclass
class PruneStats:
    """Counts of visual tokens fed to the LLM, accumulated over every image-bearing forward.

    ``kept_per_image`` lists, in order, the visual tokens each image contributed to the LLM's
    input since ``apply`` (or the last ``reset()``); ``last_kept`` those of the most recent
    prefill only (a prompt with images and videos: its images', then its videos'). ``tokens_per_image`` is the unpruned count N. The decoder stage extends this
    class with per-layer counts, and there ``last_kept`` / ``kept_per_image`` hold per-sample
    all-layer averages (floats).

    Read the same way for both stages: ``visual_tokens_per_sample()`` (the last prefill's visual
    tokens per sample, averaged over the decoder layers) and ``visual_tokens_per_layer()``
    ([B][num_layers]: the visual tokens each decoder layer processed). A vision-stage method feeds
    every layer the same count, so its per-sample value is what the sample's images (and videos)
    kept together; the vision stage records it per prefill as a [B] tensor (``last_per_sample``,
    read to the host only when asked), and without that record each image counts as a sample
    (one image per sample).
    """

    method: str
    tokens_per_image: int | None = None
    num_layers: int = 0
    prefills: int = 0
    kept_per_image: list[int] = field(default_factory=list)
    last_kept: list[int] = field(default_factory=list)
    #: Unpruned visual tokens of each entry of ``kept_per_image``: per image (vision stage), per
    #: sample (decoder stage).
    unpruned_per_image: list[int] = field(default_factory=list)
    #: The last prefill's visual tokens per sample, [B] (a device tensor until read), or None.
    last_per_sample: Any = None

    def record(self, kept: list[int], unpruned: list[int] | None = None, *, same_prefill: bool = False) -> None:
        """Add one prefill's kept counts, per image (vision stage) or per sample (decoder stage's
        all-layer averages), and optionally their unpruned counts;
        ``same_prefill``: they are another modality of the prefill recorded last (its videos after
        its images): appended to ``last_kept``, not counted as a new prefill."""
        if same_prefill:
            self.last_kept.extend(kept)
        else:
            self.prefills += 1
            self.last_kept = list(kept)
        self.kept_per_image.extend(kept)
        self.last_per_sample = None
        if unpruned is not None:
            self.unpruned_per_image.extend(unpruned)

    def _per_sample(self) -> list[float]:
        if self.last_per_sample is None:
            return [float(v) for v in self.last_kept]
        if not isinstance(self.last_per_sample, list):  # the one host read, when asked
            self.last_per_sample = [float(v) for v in self.last_per_sample.tolist()]
        return list(self.last_per_sample)

    def visual_tokens_per_sample(self) -> list[float]:
        """Visual tokens of each sample in the last prefill, averaged over the decoder layers."""
        return self._per_sample()

    def visual_tokens_per_layer(self) -> list[list[int]]:
        """[B][num_layers]: visual tokens each decoder layer processed in the last prefill."""
        return [[int(v)] * self.num_layers for v in self._per_sample()]

    @property
    def images(self) -> int:
        return len(self.kept_per_image)

    @property
    def mean_visual_tokens(self) -> float:
        """Mean of ``kept_per_image`` (nan before the first image): visual tokens per image fed to
        the LLM (vision stage), or per sample, averaged over the layers (decoder stage; a sample of
        several images counts once)."""
        return sum(self.kept_per_image) / len(self.kept_per_image) if self.kept_per_image else math.nan

    @property
    def mean_kept_ratio(self) -> float:
        """Kept / unpruned visual tokens over everything recorded so far: the ratio of the sums of
        ``kept_per_image`` and ``unpruned_per_image`` when every entry's unpruned count is known
        (images of different sizes, samples of several images), else ``mean_visual_tokens /
        tokens_per_image`` (nan when neither is known)."""
        if self.kept_per_image and len(self.unpruned_per_image) == len(self.kept_per_image):
            return sum(self.kept_per_image) / sum(self.unpruned_per_image)
        if not self.tokens_per_image:
            return math.nan
        return self.mean_visual_tokens / self.tokens_per_image

    def reset(self) -> None:
        self.prefills = 0
        self.kept_per_image = []
        self.last_kept = []
        self.unpruned_per_image = []
        self.last_per_sample = None


#: The phases of a handle's own work that its stages report to ``PruneHandle.phase_timer``:
#: ``prefill`` / ``decode`` (everything the stage does at the prompt / at a decode step besides
#: running the stock modules) and, nested inside ``prefill``, the parts ``score`` (the importance
#: signal), ``select`` (the method's decision: selection, merging), ``gather`` (building the
#: reduced sequence) and ``masks`` (its attention mask and rotary tables, inside ``gather``).
PHASES = ("prefill", "decode", "score", "select", "gather", "masks")

_NO_PHASE = contextlib.nullcontext()
_F = TypeVar("_F", bound=Callable[..., Any])


def in_phase(name: str) -> Callable[[_F], _F]:
    """Decorator of a ``PruneHandle`` method: the call runs inside ``self.phase_timer(name)``
    when a timer is set (a plain call otherwise)."""

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def timed(self: "PruneHandle", *args: Any, **kwargs: Any) -> Any:
            timer = self.phase_timer
            if timer is None:
                return fn(self, *args, **kwargs)
            with timer(name):
                return fn(self, *args, **kwargs)

        return timed  # type: ignore[return-value]

    return decorate


class PruneHandle:
    """A pruning applied to one model: ``.method``, ``.stats``, ``.remove()``, context manager.

    ``phase_timer`` is a timing hook: None by default; a benchmark sets it to a ``name -> context
    manager`` callable, and the stages' own work runs inside ``phase_timer(name)`` for the names in
    ``PHASES`` (``in_phase`` decorates a handle method with one phase, ``phase`` opens one around a
    few lines).

    Stages subclass it and register their undo actions with ``add_undo`` / ``add_hook``
    (torch hook handles); ``remove()`` runs them in reverse order exactly once.
    """

    stats_class: type[PruneStats] = PruneStats
    #: Timing hook: ``phase_timer(name)`` returns a context manager entered around each phase of
    #: the handle's own work (``PHASES``); None (the default) times nothing.
    phase_timer: Callable[[str], ContextManager[Any]] | None = None

    def __init__(self, model: Any, adapter: Any, method: str, method_obj: Any, stage: str) -> None:
        """``adapter``: the family's ``base.ModelAdapter``; ``stage``: ``"vision"`` or ``"decoder"``."""
        check_not_pruned(model)
        self.model = model
        self.adapter = adapter
        self.method = method
        self.method_obj = method_obj
        self.stage = stage
        self.stats = self.stats_class(method=method)
        self._undo: list[Callable[[], None]] = []
        self._active = True
        setattr(model, HANDLE_ATTR, self)

    @property
    def active(self) -> bool:
        return self._active

    def phase(self, name: str) -> ContextManager[Any]:
        """``phase_timer(name)``, or a no-op context manager when no timer is set."""
        return _NO_PHASE if self.phase_timer is None else self.phase_timer(name)

    def add_undo(self, fn: Callable[[], None]) -> None:
        """Register an action that ``remove()`` runs (in reverse registration order)."""
        self._undo.append(fn)

    def add_hook(self, hook_handle: Any) -> Any:
        """Register a torch ``RemovableHandle`` to be removed by ``remove()``; returns it."""
        self._undo.append(hook_handle.remove)
        return hook_handle

    def remove(self) -> None:
        """Undo every change to the model; idempotent. The model is then exactly the stock model."""
        if not self._active:
            return
        self._active = False
        errors = []
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as exc:  # keep undoing the rest; report at the end
                errors.append(exc)
        if getattr(self.model, HANDLE_ATTR, None) is self:
            delattr(self.model, HANDLE_ATTR)
        if errors:
            raise RuntimeError(f"errors while removing the pruning: {errors!r}")

    def __enter__(self) -> "PruneHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"<{type(self).__name__} method={self.method!r} stage={self.stage!r} {state}>"
