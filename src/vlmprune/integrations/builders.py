"""Builders of the vision-stage methods: user options -> a validated ``VisionMethod``.

Each builder is registered in ``vlmprune.registry``; its keyword-only parameters *are* the method's
options (``list_methods()`` reads them from the signature). Options are checked here, with a
``ValueError`` that says what to pass; budgets that depend on the model's N (e.g. ``keep`` larger
than the number of patches) are checked by a dry run when the method is attached.

Budgets (``keep``): an int count in [1, N], or a float ratio in (0, 1] (floor(ratio * N)).

Every vision-stage method also takes ``lora=DIR``: LoRA adapters on the language model (a folder
written by ``vlmprune train lora``, see ``integrations/lora.py``), injected when the method is
attached and removed with it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import Tensor

from ..methods.baselines import cls_topk, random_keep, sequential_keep, spatial_keep
from ..methods.common import Reduction, is_int, is_real
from ..methods.prumerge import prumerge
from .vision import VisionMethod, VisionSignals

__all__ = ["build_random", "build_sequential", "build_spatial", "build_cls_topk", "build_prumerge",
           "build_prumerge_plus"]

DEFAULT_KEEP = 0.25  # ~144 of 576 tokens, PruMerge+'s mean budget on LLaVA-1.5


def _check_keep(method: str, keep: Any, *, allow_none: bool = False) -> None:
    hint = "an int count >= 1 or a float ratio in (0, 1]" + (", or None for the adaptive count" if allow_none else "")
    if keep is None:
        if allow_none:
            return
        raise ValueError(f"{method}: keep is required; pass {hint}")
    if not is_real(keep):
        raise ValueError(f"{method}: keep must be {hint}, got {keep!r}")
    if is_int(keep):
        if keep < 1:
            raise ValueError(f"{method}: keep = {keep} keeps no token; pass {hint}")
    elif not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"{method}: keep = {keep} is not a ratio in (0, 1]; pass {hint}")


def _check_choice(method: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{method}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_bool(method: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{method}: {name} must be True or False, got {value!r}")


def _with_lora(method: VisionMethod, lora: str | os.PathLike | None) -> VisionMethod:
    """``method`` carrying the LoRA adapter folder ``lora`` (checked readable now), or as it is."""
    if lora is None:
        return method
    from .lora import read_folder

    if not isinstance(lora, (str, os.PathLike)) or not os.fspath(lora).strip():
        raise ValueError(f"{method.name}: lora must be the folder of a LoRA adapter (from `vlmprune train lora "
                         f"--out DIR`), got {lora!r}")
    try:
        read_folder(lora)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{method.name}: lora={os.fspath(lora)}: {e}") from None
    return dataclasses.replace(method, lora=os.fspath(lora))


def build_random(*, keep: int | float = DEFAULT_KEEP, seed: int | None = 0,
                 lora: str | None = None) -> VisionMethod:
    """``random``: keep ``keep`` patches drawn uniformly per image (ascending order).

    ``seed``: the generator is re-seeded at every prefill (same batch -> same selection, so cached
    and uncached generation agree); ``None`` draws from torch's global RNG.
    """
    _check_keep("random", keep)
    if seed is not None and (not is_int(seed) or seed < 0):
        raise ValueError(f"random: seed must be an int >= 0 or None, got {seed!r}")

    def fn(features: Tensor, signals: VisionSignals | None, grid: tuple[int, int], fetch=None) -> Reduction:
        gen = None
        if seed is not None:
            gen = torch.Generator(device=features.device).manual_seed(int(seed))
        return random_keep(features, keep, generator=gen, fetch=fetch)

    return _with_lora(VisionMethod("random", fn, options={"keep": keep, "seed": seed}), lora)


def build_sequential(*, keep: int | float = DEFAULT_KEEP, lora: str | None = None) -> VisionMethod:
    """``sequential``: keep the first ``keep`` patches in raster order (``keep=1.0`` = no pruning)."""
    _check_keep("sequential", keep)
    def fn(features: Tensor, signals: VisionSignals | None, grid: tuple[int, int], fetch=None) -> Reduction:
        return sequential_keep(features, keep, fetch=fetch)

    return _with_lora(VisionMethod("sequential", fn, options={"keep": keep}), lora)


def build_spatial(*, keep: int | float = DEFAULT_KEEP, lora: str | None = None) -> VisionMethod:
    """``spatial``: keep a centred uniform 2-D lattice of about ``keep`` patches."""
    _check_keep("spatial", keep)
    def fn(features: Tensor, signals: VisionSignals | None, grid: tuple[int, int], fetch=None) -> Reduction:
        return spatial_keep(features, keep, grid_size=grid, fetch=fetch)

    return _with_lora(VisionMethod("spatial", fn, needs_grid=True, options={"keep": keep}), lora)


def build_cls_topk(*, keep: int | float | None = None, order: str = "attention",
                   lora: str | None = None) -> VisionMethod:
    """``cls-topk``: the patches with the highest [CLS] attention, unmerged.

    ``keep=None`` (default) uses PruMerge's adaptive IQR count (the paper's "AITS only"
    ablation); an int / ratio fixes the budget. ``order``: "attention" (descending) or "spatial".
    """
    _check_keep("cls-topk", keep, allow_none=True)
    _check_choice("cls-topk", "order", order, ("attention", "spatial"))

    def fn(features: Tensor, signals: VisionSignals | None, grid: tuple[int, int], fetch=None) -> Reduction:
        if keep is None:
            return prumerge(signals.cls_attn, signals.keys, features, k_neighbors=0, extra_token=False,
                            order=order, grid_size=grid, fetch=fetch)
        return cls_topk(signals.cls_attn, features, keep, order=order, fetch=fetch)

    return _with_lora(VisionMethod("cls-topk", fn, needs_signals=True, needs_grid=True,
                                   options={"keep": keep, "order": order}), lora)


def _build_prumerge(name: str, plus: bool, *, k_neighbors: int, merge: str, extra_token: bool, grid: str,
                    order: str, keep: int | float | None, sim_dtype: str = "keys",
                    lora: str | None = None) -> VisionMethod:
    if not is_int(k_neighbors) or k_neighbors < 0:
        raise ValueError(f"{name}: k_neighbors must be an int >= 0 (official: 32; 0 turns merging off), "
                         f"got {k_neighbors!r}")
    _check_choice(name, "merge", merge, ("residual", "average"))
    _check_bool(name, "extra_token", extra_token)
    _check_choice(name, "grid", grid, ("raster", "2d"))
    _check_choice(name, "order", order, ("attention", "spatial"))
    _check_choice(name, "sim_dtype", sim_dtype, ("keys", "float32"))
    _check_keep(name, keep, allow_none=True)
    options = {"k_neighbors": int(k_neighbors), "merge": merge, "extra_token": extra_token, "order": order,
               "keep": keep, "sim_dtype": sim_dtype}
    if plus:
        options["grid"] = grid

    def fn(features: Tensor, signals: VisionSignals | None, grid_hw: tuple[int, int], fetch=None) -> Reduction:
        return prumerge(signals.cls_attn, signals.keys, features, plus=plus, k_neighbors=int(k_neighbors),
                        merge=merge, extra_token=extra_token, grid=grid, order=order, keep=keep, grid_size=grid_hw,
                        sim_dtype=sim_dtype, fetch=fetch)

    return _with_lora(VisionMethod(name, fn, needs_signals=True, needs_grid=True, options=options), lora)


def build_prumerge(*, k_neighbors: int = 32, merge: str = "residual", extra_token: bool = True,
                   order: str = "attention", keep: int | float | None = None, sim_dtype: str = "keys",
                   lora: str | None = None) -> VisionMethod:
    """``prumerge``: adaptive IQR selection + key-similarity merge + extra token.

    Defaults reproduce the official code per image. ``keep`` fixes the number of centres instead
    of the adaptive count; ``merge="average"`` is the paper's weighted average; ``order="spatial"``
    sorts the centres by patch index; ``sim_dtype="float32"`` takes the key similarities of a
    bf16 / fp16 tower in float32 (default "keys": in the keys' dtype, as the official code).
    """
    return _build_prumerge("prumerge", False, k_neighbors=k_neighbors, merge=merge, extra_token=extra_token,
                           grid="raster", order=order, keep=keep, sim_dtype=sim_dtype, lora=lora)


def build_prumerge_plus(*, k_neighbors: int = 32, merge: str = "residual", extra_token: bool = True,
                        grid: str = "raster", order: str = "attention",
                        keep: int | float | None = None, sim_dtype: str = "keys",
                        lora: str | None = None) -> VisionMethod:
    """``prumerge+``: PruMerge plus a spatially uniform supplement of centres.

    ``grid="raster"`` is the official stride sampling (column stripes); ``"2d"`` a true lattice.
    The other options are ``prumerge``'s.
    """
    return _build_prumerge("prumerge+", True, k_neighbors=k_neighbors, merge=merge, extra_token=extra_token,
                           grid=grid, order=order, keep=keep, sim_dtype=sim_dtype, lora=lora)
