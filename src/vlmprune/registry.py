"""The one place that knows every pruning method.

A method is registered with its name, the stage it acts at (``"vision"``: on the vision tower's
output, before the LLM; ``"decoder"``: between decoder layers), a one-line summary and the dotted
path of its *builder*. A builder takes the user's options as keyword arguments, validates them
(raising ``ValueError`` that says what was wrong and what to pass) and returns the method object
the stage's integration drives (see ``vlmprune.integrations.vision`` / ``.decoder``). Builders are
imported lazily so that listing methods stays cheap.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

STAGES = ("vision", "decoder")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    stage: str
    summary: str
    builder: str  # "package.module:function"

    def load_builder(self) -> Callable[..., Any]:
        module, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module), attr)

    def build(self, **options: Any) -> Any:
        """Validate ``options`` against the builder's signature and build the method object."""
        fn = self.load_builder()
        sig = inspect.signature(fn)
        accepted = [p for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY or p.kind == p.POSITIONAL_OR_KEYWORD]
        unknown = sorted(set(options) - {p.name for p in accepted})
        if unknown and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            raise ValueError(f"method {self.name!r} has no option(s) {', '.join(unknown)}; "
                             f"its options are: {', '.join(p.name for p in accepted) or '(none)'}")
        return fn(**options)

    def options(self) -> dict[str, str]:
        """Option name -> default value (as text), read from the builder's signature."""
        sig = inspect.signature(self.load_builder())
        return {p.name: ("required" if p.default is p.empty else repr(p.default)) for p in sig.parameters.values()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


_METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, stage: str, summary: str, builder: str) -> MethodInfo:
    """Add a method to the registry (used below for the built-ins, and by plug-ins)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if name in _METHODS:
        raise ValueError(f"a method named {name!r} is already registered")
    info = MethodInfo(name, stage, summary, builder)
    _METHODS[name] = info
    return info


def get_method(name: str) -> MethodInfo:
    """Look a method up by name; unknown names get an error listing the known ones."""
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(sorted(_METHODS))} "
                         "(see vlmprune.list_methods())")
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)


# --- built-in methods --------------------------------------------------------------------------
# (name, stage, summary, builder). Builders live in vlmprune.integrations.builders so that the
# pure-tensor code in vlmprune.methods stays free of integration concerns.
_BUILTINS = [
    ("random", "vision", "keep N random patch tokens before the LLM", "vlmprune.integrations.builders:build_random"),
    ("sequential", "vision", "keep the first N patch tokens in raster order",
     "vlmprune.integrations.builders:build_sequential"),
    ("spatial", "vision", "keep a uniform 2-D lattice of about N patch tokens",
     "vlmprune.integrations.builders:build_spatial"),
    ("cls-topk", "vision", "keep the patches with the highest [CLS] attention, unmerged (default: PruMerge's "
     "adaptive IQR count, the paper's 'AITS only')", "vlmprune.integrations.builders:build_cls_topk"),
    ("prumerge", "vision", "PruMerge: adaptive [CLS]-attention outliers + key-similarity merge (~6% of tokens)",
     "vlmprune.integrations.builders:build_prumerge"),
    ("prumerge+", "vision", "PruMerge+: PruMerge plus a spatially uniform supplement (~25% of tokens)",
     "vlmprune.integrations.builders:build_prumerge_plus"),
    ("fastv", "decoder", "FastV: drop low-attention visual tokens from the input of decoder layer K (default K=2, 50%)",
     "vlmprune.integrations.decoder_builders:build_fastv"),
    ("sparsevlm", "decoder", "SparseVLM v1.5: text raters prune visual tokens at 3 decoder layers, pruned ones "
     "recycled as cluster means", "vlmprune.integrations.decoder_builders:build_sparsevlm"),
    ("atp", "decoder", "ATP-LLaVA: learned per-instance thresholds prune visual tokens after several decoder layers "
     "(checkpoint=DIR from `vlmprune train atp`)", "vlmprune.integrations.atp:build_atp"),
]
for _row in _BUILTINS:
    register_method(*_row)
