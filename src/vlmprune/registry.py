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
import os
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

    def resolve(self, options: dict[str, Any]) -> dict[str, Any]:
        """Every option of the builder with its value: ``options`` over the signature's defaults
        (JSON-ready: tuples -> lists, paths -> str). Unknown names raise like ``build``."""
        sig = inspect.signature(self.load_builder())
        named = {p.name: p for p in sig.parameters.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        unknown = sorted(set(options) - set(named))
        if unknown and not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            raise ValueError(f"method {self.name!r} has no option(s) {', '.join(unknown)}; "
                             f"its options are: {', '.join(named) or '(none)'}")
        out = {k: (None if p.default is p.empty else p.default) for k, p in named.items()}
        out.update(options)
        return {k: _jsonable(v) for k, v in out.items()}

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


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


# --- method specs: "NAME[:key=value,...]" --------------------------------------------------------

SPEC_GRAMMAR = """\
A method spec is NAME or NAME:key=value,key=value,... ('none' or 'unpruned' = no pruning).
Values: ints (32), floats (0.25, 1e-3), booleans (true / false), none, lists in brackets
([100,50,20], nested allowed; (1,2) is the same), quoted strings ('a,b' or "a,b"), and anything
else as a plain string (paths: checkpoint=runs/atp). Examples: random:keep=32,seed=1;
sparsevlm:schedule=[100,50,20],layers=[1,2,3]; fastv:k=2,count=64; atp:checkpoint=runs/atp."""

_CLOSE = {"[": "]", "(": ")"}


def _split_top(text: str, spec: str) -> list[str]:
    """Split ``text`` on commas outside brackets and quotes."""
    parts, depth, quote, cur = [], [], None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _CLOSE:
            depth.append(_CLOSE[ch])
        elif ch in ")]":
            if not depth or depth.pop() != ch:
                raise ValueError(f"unbalanced {ch!r} in method spec {spec!r}")
        elif ch == "," and not depth:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if quote or depth:
        raise ValueError(f"unclosed {quote or '['} in method spec {spec!r}")
    parts.append("".join(cur))
    return parts


def parse_value(text: str, spec: str = "") -> Any:
    """One option value of a method spec (see ``SPEC_GRAMMAR``)."""
    v = text.strip()
    if v[:1] in _CLOSE:
        if v[-1:] != _CLOSE[v[0]]:
            raise ValueError(f"unbalanced brackets in {v!r} of method spec {spec!r}")
        inner = v[1:-1].strip()
        return [] if not inner else [parse_value(x, spec) for x in _split_top(inner, spec)]
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    if not v:
        raise ValueError(f"empty value in method spec {spec!r}")
    return v


def format_value(v: Any) -> str:
    """An option value written back in the spec grammar (``[100,50,20]``, ``true``, ``none``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, str) and (v != v.strip() or any(c in v for c in ",[]()'\"=") or
                               not isinstance(parse_value(v), str)):
        return repr(v)
    return os.fspath(v) if isinstance(v, os.PathLike) else str(v)


def parse_method_spec(spec: str) -> tuple[str | None, dict[str, Any]]:
    """``"prumerge+"`` / ``"random:keep=32,seed=1"`` / ``"sparsevlm:schedule=[100,50,20]"`` / ``"none"``
    -> (name or None for no pruning, options). Syntax errors raise ``ValueError`` naming the spec;
    the name and options are checked by ``check_method_spec``."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    options: dict[str, Any] = {}
    if rest.strip():
        for part in _split_top(rest, spec):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or not key or not key.isidentifier():
                raise ValueError(f"bad option {part.strip()!r} in method spec {spec!r}; write NAME:key=value,key=value "
                                 "(lists in brackets: schedule=[100,50,20])")
            if key in options:
                raise ValueError(f"option {key!r} given twice in method spec {spec!r}")
            options[key] = parse_value(value, spec)
    if name in ("", "none", "unpruned"):
        if options:
            raise ValueError(f"options given without a method in {spec!r}")
        return None, {}
    return name, options


def check_method_spec(spec: str) -> tuple[str | None, dict[str, Any], Any]:
    """Parse ``spec`` and build its method (validating every option); -> (name, options, method object
    or None for no pruning). Errors are ``ValueError`` naming the spec."""
    name, options = parse_method_spec(spec)
    if name is None:
        return None, {}, None
    try:
        obj = get_method(name).build(**options)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ValueError(f"{e} (in method spec {spec!r})") from None
    return name, options, obj


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
