"""Measured efficiency of pruning methods: ``vlmprune bench`` and its JSON "efficiency card".

    vlmprune bench --model scaled --method prumerge+ --method fastv --batch 1 --batch 8 --out out/bench

For each model, batch size and method (plus the unpruned model, always), one run is one greedy
``model.generate(max_new_tokens=T, min_new_tokens=T)`` of a LLaVA prompt (system text, the image's
576 placeholders, a question). Per run this module measures, with forward hooks on the stock
modules and wrappers around the pruning machinery's own entry points (nothing is patched in the
model's code path; hooks are installed for the unpruned runs too):

* ``ttft_s`` — time to first token: from the ``generate`` call to the first call of a logits
  processor that only records the time (so: input preparation, image encoding, pruning, the
  LLM prefill and the first ``lm_head``);
* ``vision_s`` / ``projector_s`` — time inside the vision tower / the multimodal projector;
* ``llm_prefill_s`` — time inside the language model's first forward (the prefill; includes a
  decoder-stage method's work, which runs inside it);
* ``overhead_s`` — the method's own work at prefill: for vision-stage methods the time in the
  replaced image encoder (``VisionHandle._encode_images``) minus the stock tower and projector
  inside it — signal capture, [CLS] attention, the method's ``reduce``, padding — plus the
  placeholder rewrite of the batch (``VisionHandle._prefill``); for decoder-stage methods
  everything the decoder hooks do besides running the stock layers (``DecoderHandle``'s
  ``_begin_prefill`` / ``_prefill_layer`` / ``_finish_prefill``: scoring, gathering, masks,
  rotary tables). ``decode_overhead_s`` is the same during decoding (``_continue``;
  ``_begin_decode_step`` / ``_decode_layer``);
* ``decode_s`` — from the first to the last logits-processor call (``T - 1`` decode steps);
  decode tokens/s = ``batch * (T - 1) / decode_s``.

Variants are timed interleaved (each round runs every variant once, the order rotated from
round to round) so that a shared machine's load hits them alike; the first ``warmup`` rounds
are discarded; medians (and quartiles, minima) of the ``repeats`` rounds are reported, and every
ratio is a ratio of medians, pruned vs unpruned in the same process.

Not timed, measured once per variant: **KV-cache bytes** (sum of the key/value tensors of the
cache returned by one prefill forward — the real layout, padding included) and the visual
tokens fed to the LLM (from the handle's stats). **Peak memory** is measured in a fresh
subprocess per (model, batch, variant): the model is built, one warm-up ``generate`` runs, the
kernel's peak-RSS mark is reset (``/proc/self/clear_refs`` = 5), the baseline RSS is read, one
``generate`` runs, and the peak is ``VmHWM - baseline``. glibc's dynamic mmap threshold is
pinned (``MALLOC_MMAP_THRESHOLD_``) so freed tensors return to the OS and the RSS follows the live
tensors (``tracemalloc`` does not see torch's allocations, and torch has no CPU allocator stats).

**FLOP-ideal speed-ups** come from the analytic cost model (``vlmprune.cost.analytic``) of the
same config: matmul FLOPs of the vision tower (never pruned), the projector (on the tokens it
receives) and the LLM decoder for each sample's own per-layer token counts (no padding),
unpruned / pruned. ``llm`` = decoder only.

Default dtype is float32. Whether the CPU accelerates bf16 is measured and recorded in every card
(``machine.bf16_matmul``: a bf16 / fp32 matmul time ratio, the ``amx_bf16`` / ``avx512_bf16``
flags and the verdict of ``bf16_verdict``); without acceleration bf16 matmuls are emulated and
many times slower, and timing them would time the emulation, not the pruning.
"""

from __future__ import annotations

import functools
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..integrations.compat import output_cache
from .models import SCALED as _SCALED_FAMILIES
from ..runinfo import cpu_model as _cpu_model

__all__ = [
    "BenchError",
    "BenchInterrupted",
    "CARD_FIELDS",
    "ScaledConfig",
    "TINY",
    "Variant",
    "cache_bytes",
    "check_batches",
    "evaluate_targets",
    "flop_config",
    "load_bench_model",
    "make_bench_inputs",
    "bf16_verdict",
    "measure_bf16",
    "check_device",
    "device_sync",
    "parse_dtype",
    "parse_dtypes",
    "parse_methods",
    "resolve_dtypes",
    "plot_card",
    "print_card",
    "probe_memory",
    "run_bench",
]

SCHEMA = "vlmprune.efficiency-card/1"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
#: Scaled random models of the other families (``vlmprune.bench.models.SCALED``; a new one is added there).
FAMILY_MODELS = tuple(_SCALED_FAMILIES)
SYNTHETIC_MODELS = ("scaled", "tiny", *FAMILY_MODELS)
MODEL_CHOICES = ("testbed", "scaled", "tiny", *FAMILY_MODELS)

#: Acceptance targets (issue 6): on the scaled model, batch 1.
TARGET_SPEEDUP_TOL = 0.15  # |measured / FLOP-ideal - 1| <= 15 % for these methods
TARGET_SPEEDUP_METHODS = ("prumerge+", "fastv")
TARGET_OVERHEAD = 0.05  # pruning overhead <= 5 % of the unpruned prefill
#: Acceptance targets (issue 17): on the scaled model of each other family, batch 1 and 8.
FAMILY_SPEEDUP_TOL = 0.10
FAMILY_OVERHEAD = 0.03

#: Per-run timings recorded in ``variants[*].raw`` (seconds; decode_steps is a count).
RAW_KEYS = ("ttft_s", "vision_s", "projector_s", "llm_prefill_s", "overhead_s", "decode_s",
            "decode_overhead_s", "decode_tokens_per_s", "overhead_score_s", "overhead_select_s",
            "overhead_gather_s", "overhead_masks_s", "overhead_other_s")
#: The parts of ``overhead_s`` (see ``_Probe.instrument``); ``other`` is the rest (bookkeeping).
OVERHEAD_PARTS = ("score", "select", "gather", "masks", "other")

#: Every field of the card, as dotted paths ("[]" = every element of a list). The tests check them.
CARD_FIELDS: dict[str, tuple[str, ...]] = {
    "": ("schema", "command", "created", "machine", "settings", "models", "results", "targets", "plot", "notes",
         "run"),
    "machine": ("cpu_model", "cores_logical", "cpu_flags", "platform", "python", "torch", "transformers",
                "vlmprune", "torch_threads", "torch_interop_threads", "omp_num_threads_env", "loadavg_before",
                "loadavg_after", "bf16_matmul"),
    "machine.bf16_matmul": ("shape", "fp32_s", "bf16_s", "slowdown", "accelerated", "hardware", "note"),
    "settings": ("dtype", "dtype_requested", "device", "batches", "methods", "repeats", "warmup", "new_tokens",
                 "decode_steps", "threads", "memory", "seed", "timing", "ratios", "flop_ideal", "memory_method",
                 "kv_method"),
    "models[]": ("name", "dtype", "kind", "config", "prompt"),
    "results[]": ("model", "dtype", "batch", "prompt_tokens", "visual_tokens_unpruned", "variants"),
    "results[].variants[]": ("label", "method", "options", "stage", "visual_tokens", "visual_tokens_per_sample",
                             "layer_tokens", "kv_cache_bytes", "raw", "median", "stats", "flops", "ratios",
                             "memory"),
    "results[].variants[].ratios": ("prefill_speedup", "prefill_speedup_of_min", "llm_prefill_speedup",
                                    "flop_ideal_speedup", "llm_flop_ideal_speedup", "flop_ideal_padded_speedup", "prefill_vs_ideal",
                                    "llm_prefill_vs_ideal", "vision_time_ratio", "overhead_fraction",
                                    "decode_speedup", "kv_cache_ratio", "peak_memory_ratio"),
    "results[].variants[].memory": ("peak_rss_delta_bytes", "baseline_rss_bytes", "peak_rss_bytes", "method"),
    "results[].variants[].flops": ("vision_tower", "projector", "decoder", "total"),
    "targets[]": ("name", "model", "batch", "method", "measured", "threshold", "met", "margin", "detail"),
}


class BenchError(ValueError):
    """Bad benchmark input; the message says what to pass."""


# ================================================================================ inputs


@dataclass(frozen=True)
class ScaledConfig:
    """The LLaVA-1.5-shaped model scaled to a CPU (random weights).

    Decoder: LLaVA-1.5-7B's 32 Llama layers, head_dim 64, MLP ratio 11008/4096, vocab 32064,
    width ``hidden`` (7B: 4096). Vision: CLIP-L/14 geometry (336 px, patch 14 -> 576 patches +
    [CLS], features from layer -2) with ``vision_layers`` layers of width ``vision_hidden`` (CLIP-L:
    24 x 1024); the defaults keep the 7B's vision : decoder FLOP share (~4 %). Built by
    ``vlmprune.bench.decoder.make_model``.
    """

    hidden: int = 512
    layers: int = 32
    vision_hidden: int = 256
    vision_layers: int = 6

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "vision_hidden", "vision_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BenchError(f"scaled model: {name} must be an int >= 1, got {v!r}")
        for name in ("hidden", "vision_hidden"):
            if getattr(self, name) % 64 and getattr(self, name) > 64:
                raise BenchError(f"scaled model: {name} must be a multiple of 64 (head size 64), "
                                 f"got {getattr(self, name)}")


#: The tiny synthetic model (plumbing checks, tests): same geometry, 4 layers of width 64.
TINY = ScaledConfig(hidden=64, layers=4, vision_hidden=32, vision_layers=2)


@dataclass(frozen=True)
class Variant:
    """One measured configuration: unpruned (``method=None``) or a method with options."""

    label: str
    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    stage: str = "none"


def parse_methods(specs: Sequence[str]) -> list[Variant]:
    """Method specs ``NAME[:key=value,...]`` -> validated variants (unpruned first, always).

    Options are checked by building the method (``BenchError`` names the problem); budgets that
    depend on the model (e.g. ``keep`` > N) are checked when the method is applied.
    """
    from ..registry import parse_method_spec
    from ..registry import get_method

    variants = [Variant("unpruned", None)]
    seen = {"unpruned"}
    for spec in specs:
        try:
            name, opts = parse_method_spec(spec)
            if name is None:
                continue  # the unpruned baseline is always measured
            info = get_method(name)
            info.build(**opts)
        except ValueError as e:
            raise BenchError(str(e)) from None
        label = spec.strip()
        if label in seen:
            raise BenchError(f"method {label!r} given twice")
        seen.add(label)
        variants.append(Variant(label, name, dict(opts), info.stage))
    return variants


def parse_dtypes(names: str | Sequence[str]) -> list[str]:
    """Dtype choices -> canonical names, ``"auto"`` kept (resolved by ``resolve_dtypes`` once the CPU
    is measured); duplicates dropped, order kept."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise BenchError("give at least one dtype (fp32, bf16 or auto)")
    out = []
    for name in names:
        key = "auto" if str(name).strip().lower() == "auto" else parse_dtype(name)[0]
        if key not in out:
            out.append(key)
    return out


def resolve_dtypes(names: Sequence[str], bf16_accelerated: bool) -> list[str]:
    """``auto`` -> bf16 and fp32 side by side where the CPU accelerates bf16, else fp32 alone."""
    out: list[str] = []
    for name in names:
        for d in ((["bf16", "fp32"] if bf16_accelerated else ["fp32"]) if name == "auto" else [name]):
            if d not in out:
                out.append(d)
    return out


def check_device(device: str) -> str:
    """``cpu`` or ``cuda`` / ``cuda:N`` (which must exist here); returns it normalised."""
    dev = str(device).strip().lower()
    if dev == "cpu":
        return dev
    if dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit()):
        if not torch.cuda.is_available():
            raise BenchError(f"--device {device}: no CUDA device here (torch.cuda.is_available() is False); "
                             "use --device cpu")
        index = int(dev[5:]) if ":" in dev else 0
        if index >= torch.cuda.device_count():
            raise BenchError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    raise BenchError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def device_sync(device: str) -> Callable[[], None]:
    """What the timers call before reading the clock: ``torch.cuda.synchronize`` on a GPU (kernels
    run asynchronously there), nothing on the CPU."""
    if str(device).startswith("cuda"):
        return functools.partial(torch.cuda.synchronize, torch.device(device))
    return _no_sync


def _no_sync() -> None:
    return None


def parse_dtype(name: str) -> tuple[str, torch.dtype]:
    """``"fp32"`` / ``"bf16"`` (or ``float32`` / ``bfloat16``) -> (canonical name, dtype)."""
    key = str(name).strip().lower()
    if key not in DTYPES:
        raise BenchError(f"unknown dtype {name!r}; use fp32 (default) or bf16")
    dt = DTYPES[key]
    return ("fp32" if dt == torch.float32 else "bf16"), dt


def check_batches(batches: Sequence[Any]) -> list[int]:
    """Batch sizes must be distinct ints >= 1."""
    out = []
    for b in batches:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise BenchError(f"batch size must be an int >= 1, got {b!r}")
        if b in out:
            raise BenchError(f"batch size {b} given twice")
        out.append(b)
    if not out:
        raise BenchError("give at least one batch size")
    return out


def check_model_name(name: str) -> str:
    """``testbed`` (the committed checkpoint), ``scaled``, ``tiny`` or a local model folder."""
    if name in SYNTHETIC_MODELS:
        return name
    if name == "testbed":
        from ..testbed.model import CHECKPOINT_DIR

        if not (CHECKPOINT_DIR / "config.json").exists():
            raise BenchError(f"the testbed checkpoint is missing from {CHECKPOINT_DIR}; train it with "
                             "`vlmprune testbed train --install`, or benchmark --model scaled")
        return name
    if Path(name).is_dir() and (Path(name) / "config.json").exists():
        return name
    raise BenchError(f"unknown model {name!r}; use one of {', '.join(MODEL_CHOICES)} or a local folder with a "
                     "saved model of a supported family (config.json)")


#: Image size (H, W) px of the synthetic prompts of a saved model without a processor.
DEFAULT_IMAGE_SIZE = (336, 336)


def bench_image_size(name: str, image_size: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The image size of a model's synthetic prompts: ``image_size`` if given, else a scaled
    family model's own (``bench.models.SCALED``), else ``DEFAULT_IMAGE_SIZE`` for a saved folder;
    None for ``scaled`` / ``tiny`` / ``testbed`` (LLaVA-1.5's fixed layout, or real questions)."""
    if name in ("scaled", "tiny", "testbed"):
        return None
    if image_size is not None:
        return tuple(image_size)
    if name in FAMILY_MODELS:
        from .models import SCALED

        return SCALED[name].image_size
    return DEFAULT_IMAGE_SIZE


def _has_processor(folder: str | Path) -> bool:
    return any((Path(folder) / f).exists() for f in ("processor_config.json", "preprocessor_config.json"))


def load_bench_model(name: str, dtype: torch.dtype, scaled: ScaledConfig = ScaledConfig()):
    """(model, processor or None, config description) for a model name (see ``check_model_name``)."""
    if name in FAMILY_MODELS:
        from .models import SCALED, build

        model, processor = build(name), None
        kind = f"synthetic (random weights, {SCALED[name].shape_of} scaled; vlmprune.bench.models)"
    elif name in SYNTHETIC_MODELS:
        from .decoder import make_model

        cfg = scaled if name == "scaled" else TINY
        model = make_model(hidden=cfg.hidden, layers=cfg.layers, vision_hidden=cfg.vision_hidden,
                           vision_layers=cfg.vision_layers)
        model.config.pad_token_id = 0
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = 2
        model.generation_config.bos_token_id = 1
        processor = None
        kind = "synthetic (random weights, vlmprune.bench.decoder.make_model)"
    elif name != "testbed" and not _has_processor(name):  # a saved model alone: synthetic prompts
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(name, attn_implementation="sdpa").eval()
        processor, kind = None, f"local folder {name} (no processor: synthetic prompts)"
    else:
        from ..testbed.model import load

        model, processor = load(None if name == "testbed" else name)
        kind = "testbed checkpoint" if name == "testbed" else f"local folder {name}"
    model = model.to(dtype).eval()
    return model, processor, {"kind": kind, **_describe(model)}


def _patches(model) -> tuple[int, bool]:
    """(patches of one tower pass, whether the tower has a [CLS] token), from the model's adapter."""
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    h, w = adapter.patch_grid(model)
    return h * w, adapter.tower_has_cls(model)


def _describe(model) -> dict[str, Any]:
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    c = model.config
    t = adapter.text_config(model)
    shape = adapter.vision_shape(model)
    return {
        "family": adapter.family,
        "decoder": {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "heads": t.num_attention_heads,
                    "kv_heads": t.num_key_value_heads, "head_dim": getattr(t, "head_dim", None) or
                    t.hidden_size // t.num_attention_heads, "intermediate": t.intermediate_size,
                    "vocab": t.vocab_size},
        "vision": {"type": shape["type"], "image_size": shape["image_size"], "patch_size": shape["patch_size"],
                   "patches": _patches(model)[0], "layers": shape["layers"],
                   "hidden": shape["hidden"], "heads": shape["heads"], "intermediate": shape["intermediate"],
                   "feature_layer": adapter.vision_feature_layer(model),
                   "select_strategy": adapter.select_strategy(model),
                   "fixed_image_tokens": adapter.fixed_image_tokens(model), "shape": shape},
        "projector": {"dims": shape["projector_dims"], "after_pruning": shape["projector_after_pruning"]},
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).replace("torch.", ""),
        "attn_implementation": getattr(t, "_attn_implementation", None) or c._attn_implementation,
    }


def make_bench_inputs(model, processor, batch: int, seed: int = 0,
                      image_size: tuple[int, int] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A batch of ``batch`` prompts and its description.

    Synthetic models: with ``image_size``, the family's own layout of one image of that size
    (``vlmprune.bench.models.synthetic_inputs``: geometry from the adapter); without, LLaVA-1.5's
    layout (35 system tokens, 576 image tokens, 24 question tokens;
    ``vlmprune.bench.decoder.make_prompt``); random ids and pixels. Testbed / saved models: real
    ShapesVQA test questions (families round-robin) through the model's processor, left-padded,
    with the processor's chat template when it has one (``eval.prompts``).
    """
    if processor is None and image_size is not None:
        from .models import synthetic_inputs

        inputs, desc = synthetic_inputs(model, batch, image_size, seed)
    elif processor is None:
        from .decoder import N_QUESTION, N_SYSTEM, make_prompt

        inputs = make_prompt(model, batch=batch, seed=seed + 1)
        desc = {"source": "synthetic LLaVA-1.5 layout", "system_tokens": N_SYSTEM, "question_tokens": N_QUESTION}
    else:
        from ..eval.data import shapesvqa_items
        from ..eval.prompts import prompt_builder
        from ..testbed.questions import FAMILIES

        per_family = -(-batch // len(FAMILIES))
        items = shapesvqa_items("test", "all", per_family)
        by_family = [items[i * per_family:(i + 1) * per_family] for i in range(len(FAMILIES))]
        chosen = [by_family[j % len(FAMILIES)][j // len(FAMILIES)] for j in range(batch)]
        processor.tokenizer.padding_side = "left"
        build, template = prompt_builder(processor)
        enc = processor(images=[it.image() for it in chosen], text=[build(it.question) for it in chosen],
                        padding=True, return_tensors="pt")
        inputs = dict(enc)
        desc = {"source": "ShapesVQA test questions via the processor", "items": [it.id for it in chosen],
                "template": template}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    mask = inputs.get("attention_mask")
    lengths = (mask.sum(1) if mask is not None else torch.full((batch,), inputs["input_ids"].shape[1])).tolist()
    desc.update(tokens_per_sample=[int(x) for x in lengths], padded_length=int(inputs["input_ids"].shape[1]))
    return inputs, desc


# ================================================================================ measurement


def cache_bytes(cache: Any) -> int:
    """Bytes of every key/value tensor held by a transformers cache (or a legacy tuple cache)."""
    if cache is None:
        return 0
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()
        return total
    for item in cache:  # legacy ((k, v), ...) per layer
        for t in item:
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


def _stock_parts(model) -> dict[str, torch.nn.Module]:
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    return {"vision": adapter.get_vision_tower(model), "projector": adapter.get_projector(model),
            "llm": adapter.get_language_model(model)}


def _make_clock(sync: Callable[[], None] = _no_sync):
    from transformers import LogitsProcessor

    class Clock(LogitsProcessor):
        """Records the time of every call (one per generated token); changes nothing."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
            sync()
            self.times.append(time.perf_counter())
            return scores

    return Clock()


class _Probe:
    """Timers for one run: forward hooks on the stock parts, wrappers on the handle's machinery."""

    def __init__(self, model, sync: Callable[[], None] = _no_sync) -> None:
        self.sync = sync
        self.parts = _stock_parts(model)
        self.acc: dict[str, float] = {}
        self.llm_calls: list[float] = []
        self._hooks: list[Any] = []
        self._restore: list[Callable[[], None]] = []
        self._t0: dict[str, float] = {}
        # a projector inside the tower (Qwen2-VL's merger) is already in the tower's time
        self.projector_in_tower = any(m is self.parts["projector"] for m in self.parts["vision"].modules())
        for name, module in self.parts.items():
            self._hooks.append(module.register_forward_pre_hook(self._pre(name)))
            self._hooks.append(module.register_forward_hook(self._post(name)))

    def reset(self) -> None:
        self.acc = {k: 0.0 for k in ("vision", "projector", "overhead", "decode_overhead",
                                     *(f"overhead_{p}" for p in OVERHEAD_PARTS[:-1]))}
        self.llm_calls = []

    def _pre(self, name: str):
        def hook(module, args):
            self.sync()
            self._t0[name] = time.perf_counter()
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            self.sync()
            dt = time.perf_counter() - self._t0.pop(name)
            if name == "llm":
                self.llm_calls.append(dt)
            else:
                self.acc[name] = self.acc.get(name, 0.0) + dt
        return hook

    def _timed(self, fn: Callable[..., Any], key: str | tuple[str, ...],
               exclude: tuple[str, ...] = ()) -> Callable[..., Any]:
        """``fn`` adding its wall time to ``acc[key]`` (each of several keys), minus what the
        ``exclude`` timers got meanwhile."""
        keys = (key,) if isinstance(key, str) else tuple(key)

        def wrapper(*a, **k):
            before = sum(self.acc.get(e, 0.0) for e in exclude)
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                dt = time.perf_counter() - t0 - (sum(self.acc.get(e, 0.0) for e in exclude) - before)
                for k_ in keys:
                    self.acc[k_] = self.acc.get(k_, 0.0) + dt
        return wrapper

    def _wrap_attr(self, obj: Any, name: str, key: str | tuple[str, ...], exclude: tuple[str, ...] = ()) -> None:
        """Shadow ``obj.name`` (a bound method the hooks look up at call time) by a timed wrapper."""
        own = name in vars(obj)
        previous = vars(obj).get(name)
        setattr(obj, name, self._timed(getattr(obj, name), key, exclude))

        def restore() -> None:
            if own:
                setattr(obj, name, previous)
            else:
                delattr(obj, name)
        self._restore.append(restore)

    def instrument(self, handle: Any) -> bool:
        """Wrap the machinery's own entry points (see module doc); False for an unknown stage.

        The overhead is split (each part is inside ``overhead``): vision stage — ``score`` the
        [CLS] attention from the captured q/k, ``select`` the method's reduce (selection and
        merge), ``gather`` the placeholder rewrite of the batch; decoder stage — ``score`` the
        side-computed attention rows, ``select`` the method's decision, ``gather`` dropping /
        inserting tokens, ``masks`` the new layout's attention mask and rotary tables.
        """
        if handle is None:
            return True
        if handle.stage == "vision":
            # image encoding minus the stock tower and projector inside it = signal capture, [CLS]
            # attention, the method's reduce, NaN padding; plus the placeholder rewrite of the batch
            stock = ("vision",) if self.projector_in_tower else ("vision", "projector")
            self._wrap_attr(handle, "_encode_images", "overhead", exclude=stock)
            self._wrap_attr(handle, "_prefill", ("overhead", "overhead_gather"))  # the rewrite is the gather part
            self._wrap_attr(handle, "_continue", "decode_overhead")
            for module, function in handle.adapter.score_functions:  # where the family computes its score
                self._wrap_attr(importlib.import_module(module), function, "overhead_score")
            self._wrap_attr(type(handle.method_obj), "reduce", "overhead_select")
            return True
        if handle.stage == "decoder":
            for name in ("_begin_prefill", "_prefill_layer", "_finish_prefill"):
                self._wrap_attr(handle, name, "overhead")
            for name in ("_begin_decode_step", "_decode_layer"):
                self._wrap_attr(handle, name, "decode_overhead")
            self._wrap_attr(handle, "_scores", "overhead_score")
            self._wrap_attr(handle.method_obj, "select", "overhead_select")
            self._wrap_attr(handle, "_apply_decision", "overhead_gather", exclude=("overhead_masks",))
            self._wrap_attr(handle, "_finish_segment", "overhead_masks")
            return True
        return False

    def uninstrument(self) -> None:
        while self._restore:
            self._restore.pop()()

    def close(self) -> None:
        self.uninstrument()
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _generate(model, inputs: dict[str, Tensor], new_tokens: int, sync: Callable[[], None] = _no_sync):
    from transformers import LogitsProcessorList

    clock = _make_clock(sync)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]))
    return t0, clock.times, out


def _timed_run(model, inputs: dict[str, Tensor], new_tokens: int, probe: _Probe) -> dict[str, float]:
    """One generate() with the probe's timers; returns this run's raw timings."""
    probe.reset()
    t0, times, _ = _generate(model, inputs, new_tokens, probe.sync)
    if len(times) != new_tokens or not probe.llm_calls:
        raise RuntimeError(f"expected {new_tokens} generation steps, saw {len(times)}")
    batch = int(inputs["input_ids"].shape[0])
    steps = len(times) - 1
    decode = times[-1] - times[0]
    return {
        "ttft_s": times[0] - t0,
        "vision_s": probe.acc.get("vision", 0.0),
        "projector_s": probe.acc.get("projector", 0.0),
        "llm_prefill_s": probe.llm_calls[0],
        "overhead_s": probe.acc.get("overhead", 0.0),
        **{f"overhead_{p}_s": probe.acc.get(f"overhead_{p}", 0.0) for p in OVERHEAD_PARTS[:-1]},
        "overhead_other_s": probe.acc.get("overhead", 0.0) - sum(probe.acc.get(f"overhead_{p}", 0.0)
                                                                  for p in OVERHEAD_PARTS[:-1]),
        "decode_s": decode,
        "decode_overhead_s": probe.acc.get("decode_overhead", 0.0),
        "decode_tokens_per_s": batch * steps / decode if decode > 0 else math.nan,
    }


def _apply(model, variant: Variant):
    if variant.method is None:
        return None
    import vlmprune

    try:
        return vlmprune.apply(model, variant.method, **variant.options)
    except (ValueError, TypeError) as e:
        raise BenchError(f"{variant.label}: {e}") from None


def bench_layout(model, inputs: dict[str, Tensor]):
    """The adapter's ``VisualLayout`` of the batch's images (tower passes, placeholders per image)."""
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    geometry = {k: inputs[k] for k in adapter.image_geometry if inputs.get(k) is not None}
    return adapter.image_layout(model, inputs["pixel_values"], inputs.get("image_sizes"), **geometry)


def _token_schedules(model, inputs: dict[str, Tensor], handle: Any,
                     projector_rows: int) -> tuple[list[list[int]], list[float], int]:
    """Per-sample per-layer token counts of one prefill, per-sample visual tokens (all-layer
    average), and the projector rows (``projector_rows`` unpruned; a vision-stage method's kept
    tokens per tower pass, summed over the batch)."""
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    layers = adapter.text_config(model).num_hidden_layers
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    valid = (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
    ph = (ids == adapter.image_token_id(model)).sum(1).tolist()  # image placeholders per sample
    if handle is None:
        return [[int(v)] * layers for v in valid], [float(p) for p in ph], projector_rows
    stats = handle.stats
    if handle.stage == "decoder":
        sched = [[int(x) for x in row] for row in stats.tokens_per_layer]
        return sched, [float(x) for x in stats.visual_tokens_per_sample()], projector_rows
    # vision stage: stats.last_kept lists the kept tokens of each image, in batch order
    kept = list(stats.last_kept)
    unpruned = stats.unpruned_per_image[-len(kept):] if kept else []
    if len(unpruned) != len(kept):
        raise RuntimeError(f"{handle.method}: the handle recorded {len(unpruned)} unpruned counts for {len(kept)} images")
    red = getattr(handle, "last_reduction", None)
    rows = int(red.counts.sum()) if red is not None else int(sum(kept))
    out, vis, k = [], [], 0
    for v, p in zip(valid, ph):
        kept_b = seen = 0
        while seen < int(p) and k < len(kept):  # this sample's images: their placeholder runs add up to p
            seen, kept_b, k = seen + unpruned[k], kept_b + kept[k], k + 1
        out.append([int(v) - int(p) + int(kept_b)] * layers)
        vis.append(float(kept_b))
    return out, vis, rows


def flop_config(model):
    """The analytic cost model's ``ModelConfig`` of a model: its decoder, and (families with one
    fixed-size tower pass per image, for the plot's curves) its tower and projector."""
    from ..cost.analytic import ModelConfig
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    t = adapter.text_config(model)
    if adapter.fixed_image_tokens(model) is None:
        return ModelConfig(
            name="bench", hidden_size=t.hidden_size, num_layers=t.num_hidden_layers,
            num_heads=t.num_attention_heads, num_kv_heads=t.num_key_value_heads,
            intermediate_size=t.intermediate_size, vocab_size=t.vocab_size, head_dim=getattr(t, "head_dim", None),
            tie_word_embeddings=bool(getattr(t, "tie_word_embeddings", False)))
    v = adapter.vision_config(model)
    patches, has_cls = _patches(model)
    return ModelConfig(
        name="bench", hidden_size=t.hidden_size, num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads, intermediate_size=t.intermediate_size, vocab_size=t.vocab_size,
        head_dim=getattr(t, "head_dim", None), tie_word_embeddings=bool(getattr(t, "tie_word_embeddings", False)),
        default_visual_tokens=patches, max_visual_tokens=patches,
        vision={"image_size": v.image_size, "patch_size": v.patch_size, "hidden_size": v.hidden_size,
                "num_layers": v.num_hidden_layers, "intermediate_size": v.intermediate_size,
                "cls_token": has_cls, "tokens_per_image": patches + int(has_cls), "projector_rows_per_image": patches, "max_images_per_sample": 1},
        projector={"dims": [v.hidden_size, t.hidden_size, t.hidden_size]},
    )


_FLOPS_GPU = None


def _decoder_flops(cfg, schedule: Sequence[int]) -> float:
    """Matmul FLOPs of one sample's decoder prefill (lm_head on the last token) for per-layer tokens."""
    from ..cost.analytic import GPUSpec, prefill_cost

    global _FLOPS_GPU
    if _FLOPS_GPU is None:  # prefill_cost wants a GPU for its roofline; only the FLOPs are used here
        _FLOPS_GPU = GPUSpec(name="flops-only", fp16_tflops=1.0, int8_tops=1.0, bandwidth_gbs=1.0)
    return prefill_cost(cfg, list(schedule), _FLOPS_GPU, "fp16", batch=1).matmul_flops  # FLOPs ignore precision


def _flops(cfg, shape: dict[str, Any], units: list[tuple[int, int]], schedules: list[list[int]],
           projector_rows: int) -> dict[str, float]:
    """FLOPs of one prefill: the tower on every pass ``units`` (adapter's ``unit_tokens``), the
    projector on ``projector_rows`` (when it runs after pruning), the decoder per sample."""
    from ..cost.analytic import vision_tower_flops

    vf = vision_tower_flops(shape, units, projector_rows)
    dec = sum(_decoder_flops(cfg, s) for s in schedules)
    return {"vision_tower": vf["vision_tower"], "projector": vf["projector"], "decoder": dec,
            "total": vf["vision_tower"] + vf["projector"] + dec}


def _padded(schedules: list[list[int]]) -> list[list[int]]:
    """Every sample at each layer's longest sample's count: what a padded batch computes."""
    longest = [max(col) for col in zip(*schedules)]
    return [list(longest) for _ in schedules]


def _stats(values: Sequence[float]) -> dict[str, float]:
    vals = [float(v) for v in values]
    if len(vals) >= 2:
        q1, med, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = med = q3 = vals[0]
    return {"median": statistics.median(vals), "q1": q1, "q3": q3, "min": min(vals), "max": max(vals),
            "n": len(vals)}


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


# ================================================================================ memory (subprocess)


def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _probe_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the fresh subprocess: build, warm up, reset the peak mark, one generate, read the peak."""
    import resource

    torch.set_num_threads(int(spec["threads"]))
    _, dtype = parse_dtype(spec["dtype"])
    model, processor, _ = load_bench_model(spec["model"], dtype, ScaledConfig(**spec["scaled"]))
    inputs, _ = make_bench_inputs(model, processor, int(spec["batch"]), int(spec["seed"]), bench_image_size(spec["model"]))
    variant = Variant(spec["label"], spec["method"], spec["options"], spec["stage"])
    handle = _apply(model, variant)
    _generate(model, inputs, int(spec["new_tokens"]))  # warm-up: lazy initialisations, kernel caches
    gc.collect()
    reset = _reset_peak()
    base = _status_kib("VmRSS")
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _generate(model, inputs, int(spec["new_tokens"]))
    hwm = _status_kib("VmHWM")
    maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if handle is not None:
        handle.remove()
    if reset and base is not None and hwm is not None:
        return {"peak_rss_delta_bytes": (hwm - base) * 1024, "baseline_rss_bytes": base * 1024,
                "peak_rss_bytes": hwm * 1024, "method": "VmHWM after clear_refs reset, minus VmRSS before the run"}
    # no resettable peak mark: the process peak so far (an upper bound if loading peaked higher)
    return {"peak_rss_delta_bytes": max(maxrss1 - (base or maxrss0), 0) * 1024,
            "baseline_rss_bytes": (base or maxrss0) * 1024, "peak_rss_bytes": maxrss1 * 1024,
            "method": "ru_maxrss minus VmRSS before the run (peak mark not resettable; may over-count)"}


def probe_memory(model: str, variant: Variant, batch: int, *, dtype: str = "fp32", threads: int = 1,
                 new_tokens: int = 8, seed: int = 0, scaled: ScaledConfig = ScaledConfig(),
                 timeout: float = 1800.0) -> dict[str, Any]:
    """Peak-RSS increase of one ``generate`` of ``variant`` in a fresh Python process (see module doc)."""
    spec = {"model": model, "label": variant.label, "method": variant.method, "options": variant.options,
            "stage": variant.stage, "batch": batch, "dtype": dtype, "threads": threads, "new_tokens": new_tokens,
            "seed": seed, "scaled": asdict(scaled)}
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", TOKENIZERS_PARALLELISM="false")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        path = f.name
    try:
        proc = subprocess.run([sys.executable, "-m", "vlmprune.bench.measure", "--probe", path],
                              capture_output=True, text=True, env=env, timeout=timeout)
    finally:
        os.unlink(path)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"memory probe for {variant.label} (batch {batch}) failed (exit {proc.returncode}): "
                       + " | ".join(tail))


# ================================================================================ machine


def measure_bf16(n: int = 256, repeats: int = 5) -> dict[str, Any]:
    """Time an n x n x n matmul in fp32 and in bf16 (after one warm-up; the minimum of ``repeats``
    is robust to a shared machine's load). ``slowdown`` = bf16 time / fp32 time."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out: dict[str, Any] = {"shape": [n, n, n], "repeats": repeats}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dt), b.to(dt)
        x @ y
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ y
            ts.append(time.perf_counter() - t0)
        out[f"{name}_s"] = min(ts)
        out[f"{name}_median_s"] = statistics.median(ts)
    out["slowdown"] = out["bf16_s"] / out["fp32_s"]
    out["accelerated"], out["hardware"], out["note"] = bf16_verdict(out["slowdown"], _cpu_flags(),
                                                                    f"a {n}^3 bf16 matmul")
    return out


#: bf16 / fp32 matmul time ratio up to which bf16 counts as accelerated (emulation is ~10-100x slower)
BF16_ACCELERATED_RATIO = 1.5


def bf16_verdict(ratio: float, flags: dict[str, bool], what: str = "a bf16 matmul") -> tuple[bool, str, str]:
    """(accelerated, hardware, a note for the card) from the measured bf16 / fp32 ``ratio`` and the
    CPU ``flags``: hardware is ``"amx_bf16"``, ``"avx512_bf16"`` or ``"none"``; accelerated means
    the measured ratio is at most ``BF16_ACCELERATED_RATIO`` (the flags alone do not decide: the
    torch build must use them)."""
    hardware = next((f for f in ("amx_bf16", "avx512_bf16") if flags.get(f)), "none")
    accelerated = ratio <= BF16_ACCELERATED_RATIO
    took = f"{what} took {ratio:.2f}x the fp32 time"
    if accelerated:
        where = f"{hardware} present" if hardware != "none" else "no amx_bf16 / avx512_bf16 flag"
        note = (f"this CPU accelerates bf16 ({where}): {took}; --dtype auto (the default) times bf16 and fp32 "
                "side by side")
    elif hardware != "none":
        note = f"this CPU reports {hardware}, but {took}: this torch build does not accelerate bf16 here"
    else:
        note = f"this CPU has no bf16 acceleration (neither amx_bf16 nor avx512_bf16): {took}, so bf16 times " \
               "would measure the emulation"
    return accelerated, hardware, note


def _cpu_flags() -> dict[str, bool]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        flags = set()
    return {f: f in flags for f in wanted}


def _run_block(models: Sequence[str], variants: Sequence[Variant], dtype: str, batches: Sequence[int],
               new_tokens: int, seed: int) -> dict[str, Any]:
    """The ``run`` block every results file carries (``vlmprune.runinfo``); synthetic models have no weights."""
    from ..runinfo import method_entry, model_info, new_run
    from ..testbed.model import CHECKPOINT_DIR

    described = [{"path": None, "synthetic": m, "weights_sha256": None, "weights_files": {}, "dtype": dtype}
                 if m in SYNTHETIC_MODELS else {**model_info(CHECKPOINT_DIR if m == "testbed" else m), "dtype": dtype}
                 for m in models]
    run = new_run("bench", model=described[0] if len(described) == 1 else {"models": described},
                  data={"source": "synthetic", "prompt": "LLaVA prompt: system text, the image placeholders, a "
                                                         "question; random pixels", "seed": seed},
                  generation={"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                              "batch_sizes": list(batches)})
    run["methods"] = [method_entry(v.label, v.method, v.options) for v in variants]
    return run


def _machine(bf16: dict[str, Any], load_before: Any) -> dict[str, Any]:
    import transformers

    import vlmprune

    return {
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cpu_flags": _cpu_flags(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vlmprune": vlmprune.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "bf16_matmul": bf16,
    }


# ================================================================================ the benchmark


def run_bench(
    models: Sequence[str] = ("testbed", "scaled"),
    methods: Sequence[str] = ("prumerge+", "fastv"),
    batches: Sequence[int] = (1, 8),
    *,
    dtype: str | Sequence[str] = "fp32",
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    new_tokens: int = 16,
    threads: int | None = 1,
    memory: bool = True,
    seed: int = 0,
    scaled: ScaledConfig = ScaledConfig(),
    out: str | Path | None = "out/bench",
    command: str = "",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return the efficiency card (also written to ``out/card.json`` with the
    plot ``out/speedup.png`` when ``out`` is given). Validates every input before measuring.

    ``dtype``: one name or several (each model is measured in each, one results block per dtype);
    ``"auto"`` means bf16 and fp32 side by side when the measured CPU accelerates bf16, else fp32.
    ``device``: ``cpu`` or ``cuda[:N]`` (timers synchronise the GPU before reading the clock; peak
    memory is then the allocator's ``max_memory_allocated`` over one generate, in this process)."""
    log = log or (lambda msg: None)
    variants = parse_methods(methods)
    if len(variants) < 2:
        raise BenchError("give at least one pruning method (e.g. --method prumerge+)")
    dtype_choice = parse_dtypes(dtype)
    device = check_device(device)
    batches = check_batches(list(batches))
    models = [check_model_name(m) for m in models]
    if not models:
        raise BenchError("give at least one model")
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0), ("new_tokens", new_tokens, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BenchError(f"{name} must be an int >= {low}, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise BenchError(f"threads must be an int >= 1, got {threads!r}")

    if not command:
        command = (f"vlmprune.bench.measure.run_bench(models={list(models)!r}, methods={list(methods)!r}, "
                   f"batches={batches!r}, dtype={dtype_choice!r}, device={device!r}, repeats={repeats}, "
                   f"warmup={warmup}, "
                   f"new_tokens={new_tokens}, threads={threads}, memory={memory}, seed={seed}, scaled={scaled!r})")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        bf16 = measure_bf16()
        log(f"bf16 on this CPU: {bf16['note']}")
        dtypes = resolve_dtypes(dtype_choice, bool(bf16["accelerated"]))
        run = _run_block(models, variants, "+".join(dtypes), batches, new_tokens, seed)
        if len(models) > 1:  # budgets depend on the model: check every method on every model first
            for name in models:
                model, _, _ = load_bench_model(name, torch.float32, scaled)
                for v in variants:
                    handle = _apply(model, v)
                    if handle is not None:
                        handle.remove()
                del model
        model_cards, results = [], []
        try:
            _measure_all(models, dtypes, batches, variants, device, scaled, seed, repeats, warmup, new_tokens, memory,
                         log, model_cards, results)
        except KeyboardInterrupt:
            if out is None or not results:
                raise BenchInterrupted(None, len(results)) from None
            card = _card(command, bf16, load_before, dtypes, dtype_choice, device, batches, variants, repeats,
                         warmup, new_tokens, memory, seed, model_cards, results, run, "interrupted")
            raise BenchInterrupted(_write_card(card, out), len(results)) from None
        card = _card(command, bf16, load_before, dtypes, dtype_choice, device, batches, variants, repeats, warmup,
                     new_tokens, memory, seed, model_cards, results, run, "complete")
        if out is not None:
            _write_card(card, out)
        return card
    finally:
        torch.set_num_threads(old_threads)


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``run_bench``: ``path`` is the card holding the finished (model, dtype, batch)
    blocks (status "interrupted"), or None when none had finished."""

    def __init__(self, path: Path | None, finished: int) -> None:
        super().__init__(str(path))
        self.path, self.finished = path, finished


def _write_card(card: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_path = out / "speedup.png"
    plot_card(card, plot_path)
    card["plot"] = str(plot_path)
    path = out / "card.json"
    path.write_text(json.dumps(_clean(card), indent=1, allow_nan=False) + "\n")
    return path


def _measure_all(models, dtypes, batches, variants, device, scaled, seed, repeats, warmup, new_tokens, memory, log,
                 model_cards: list, results: list) -> None:
    """Every (model, dtype, batch) block, appended to ``results`` as it finishes (its model card first)."""
    for name in models:
        for dtype_name in dtypes:
            log(f"[{name}] building / loading the model ({dtype_name}, {device})")
            model, processor, desc = load_bench_model(name, parse_dtype(dtype_name)[1], scaled)
            model = model.to(device)
            cfg = flop_config(model)
            if name in ("scaled", "tiny"):
                desc["scaled_config"] = asdict(scaled if name == "scaled" else TINY)
            mcard = {"name": name, "dtype": dtype_name, "kind": desc.pop("kind"), "config": desc, "prompt": None}
            model_cards.append(mcard)
            for batch in batches:
                inputs, pdesc = make_bench_inputs(model, processor, batch, seed, bench_image_size(name))
                inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
                mcard["prompt"] = mcard["prompt"] or pdesc
                res = _bench_config(model, name, cfg, inputs, pdesc, variants, batch, repeats=repeats, warmup=warmup,
                                    new_tokens=new_tokens, memory=memory, dtype=dtype_name, device=device,
                                    threads=torch.get_num_threads(), seed=seed, scaled=scaled, log=log)
                results.append({"model": res.pop("model"), "dtype": dtype_name, **res})
            del model
            gc.collect()


def _card(command, bf16, load_before, dtypes, dtype_choice, device, batches, variants, repeats, warmup, new_tokens,
          memory, seed, model_cards, results, run, status: str) -> dict[str, Any]:
    """The efficiency card of the finished blocks (``status``: "complete" or "interrupted")."""
    card = {
        "schema": SCHEMA,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(bf16, load_before),
        "settings": {
            "dtype": dtypes, "dtype_requested": dtype_choice, "device": device, "batches": batches,
            "methods": [v.label for v in variants[1:]],
            "repeats": repeats, "warmup": warmup, "new_tokens": new_tokens, "decode_steps": new_tokens - 1,
            "threads": torch.get_num_threads(), "memory": memory, "seed": seed,
            "timing": ("one greedy generate(max_new_tokens=min_new_tokens=new_tokens) per run; variants "
                       "interleaved, order rotated per round; warm-up rounds discarded; median of repeats"),
            "ratios": ("ratios of medians vs the unpruned model in the same process: speed-ups = unpruned "
                       "time / pruned time; decode_speedup = pruned tokens/s / unpruned tokens/s; "
                       "kv/peak-memory ratios = pruned / unpruned; overhead_fraction = pruned overhead_s / "
                       "unpruned ttft_s"),
            "flop_ideal": ("vlmprune.cost.analytic of the same config: matmul FLOPs (2/MAC) of vision tower + "
                           "projector (on the tokens it receives) + decoder (each sample's own per-layer "
                           "tokens, no padding; lm_head on the last token); ideal speed-up = unpruned / "
                           "pruned; 'llm' = decoder only; flop_ideal_padded_speedup: the same with every "
                           "sample at the batch's longest count per layer (what a padded batch computes)"),
            "memory_method": ("fresh subprocess per (model, batch, variant): warm-up generate, reset the peak "
                              "RSS mark (/proc/self/clear_refs=5), peak = VmHWM - VmRSS over one generate; "
                              "MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the RSS"),
            "kv_method": "sum of key/value tensor bytes of the cache after one prefill forward (padding included)",
        },
        "models": model_cards,
        "results": results,
        "targets": [],
        "plot": None,
        "run": {**run, "status": status, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "notes": [
            f"dtype {' and '.join(dtypes)} (asked: {', '.join(dtype_choice)}); {bf16['note']}",
            "the acceptance targets apply to the scaled model at batch 1 (speed-up within 15% of the FLOP-ideal, "
            "overhead <= 5%) and to the scaled family models at every batch (10% / 3%)",
            "prefill_vs_ideal = measured prefill speed-up / FLOP-ideal speed-up - 1 (0 = ideal)",
        ],
    }
    card["targets"] = card_targets(card)
    return card


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None (strict JSON has no NaN), tuples -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _bench_config(model, name: str, cfg, inputs: dict[str, Tensor], pdesc: dict[str, Any],
                  variants: list[Variant], batch: int, *, repeats: int, warmup: int, new_tokens: int, memory: bool,
                  dtype: str, threads: int, seed: int, scaled: ScaledConfig,
                  log: Callable[[str], None], device: str = "cpu") -> dict[str, Any]:
    """All variants on one (model, batch): untimed KV / token pass, interleaved timed rounds, memory."""
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    units = adapter.unit_tokens(model, bench_layout(model, inputs))  # (tower tokens, projector rows) per pass
    shape = adapter.vision_shape(model)
    rows: dict[str, dict[str, Any]] = {}
    # 1. untimed: KV-cache bytes and token counts (also validates every method on this model)
    for v in variants:
        handle = _apply(model, v)
        try:
            with torch.inference_mode():
                out = model(**inputs, use_cache=True, logits_to_keep=1)
            kv = cache_bytes(output_cache(out))
            del out
            sched, vis, proj_rows = _token_schedules(model, inputs, handle, sum(r for _, r in units))
        finally:
            if handle is not None:
                handle.remove()
        rows[v.label] = {
            "label": v.label, "method": v.method, "options": v.options, "stage": v.stage,
            "visual_tokens": sum(vis) / len(vis), "visual_tokens_per_sample": vis,
            "layer_tokens": sched, "kv_cache_bytes": kv, "flops": _flops(cfg, shape, units, sched, proj_rows),
            "flops_padded": _flops(cfg, shape, units, _padded(sched), proj_rows),
            "raw": {k: [] for k in RAW_KEYS},
        }
    # 2. timed rounds, interleaved
    probe = _Probe(model, device_sync(device))
    try:
        for r in range(warmup + repeats):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                handle = _apply(model, v)
                try:
                    if not probe.instrument(handle):
                        log(f"note: no overhead timers for stage {handle.stage!r}")
                    raw = _timed_run(model, inputs, new_tokens, probe)
                finally:
                    probe.uninstrument()
                    if handle is not None:
                        handle.remove()
                if r >= warmup:
                    for k in RAW_KEYS:
                        rows[v.label]["raw"][k].append(raw[k])
            log(f"[{name} b={batch}] round {r + 1}/{warmup + repeats}"
                + (" (warm-up)" if r < warmup else "") + ": "
                + ", ".join(f"{lab} {rows[lab]['raw']['ttft_s'][-1] * 1e3:.0f} ms" for lab in rows
                            if r >= warmup))
    finally:
        probe.close()
    # 3. memory, one fresh process per variant
    for v in variants:
        if memory and device.startswith("cuda"):
            log(f"[{name} b={batch}] memory (CUDA allocator): {v.label}")
            rows[v.label]["memory"] = _cuda_peak_memory(model, inputs, v, new_tokens, device)
        elif memory:
            log(f"[{name} b={batch}] memory probe: {v.label}")
            rows[v.label]["memory"] = probe_memory(name, v, batch, dtype=dtype, threads=threads,
                                                   new_tokens=new_tokens, seed=seed, scaled=scaled)
        else:
            rows[v.label]["memory"] = {"peak_rss_delta_bytes": None, "baseline_rss_bytes": None,
                                       "peak_rss_bytes": None, "method": "not measured (--no-memory)"}
    # 4. summaries and ratios vs unpruned
    for row in rows.values():
        row["stats"] = {k: _stats(vals) for k, vals in row["raw"].items()}
        row["median"] = {k: s["median"] for k, s in row["stats"].items()}
    base = rows["unpruned"]
    for row in rows.values():
        m, b = row["median"], base["median"]
        ideal = _ratio(base["flops"]["total"], row["flops"]["total"])
        ideal_llm = _ratio(base["flops"]["decoder"], row["flops"]["decoder"])
        speed = _ratio(b["ttft_s"], m["ttft_s"])
        speed_llm = _ratio(b["llm_prefill_s"], m["llm_prefill_s"])
        mb, mr = base["memory"]["peak_rss_delta_bytes"], row["memory"]["peak_rss_delta_bytes"]
        row["ratios"] = {
            "prefill_speedup": speed,
            "prefill_speedup_of_min": _ratio(base["stats"]["ttft_s"]["min"], row["stats"]["ttft_s"]["min"]),
            "llm_prefill_speedup": speed_llm,
            "flop_ideal_speedup": ideal,
            "llm_flop_ideal_speedup": ideal_llm,
            "flop_ideal_padded_speedup": _ratio(base["flops"]["total"], row["flops_padded"]["total"]),
            "prefill_vs_ideal": speed / ideal - 1,
            "llm_prefill_vs_ideal": speed_llm / ideal_llm - 1,
            "vision_time_ratio": _ratio(m["vision_s"], b["vision_s"]),
            "overhead_fraction": _ratio(m["overhead_s"], b["ttft_s"]),
            "decode_speedup": _ratio(m["decode_tokens_per_s"], b["decode_tokens_per_s"]),
            "kv_cache_ratio": _ratio(row["kv_cache_bytes"], base["kv_cache_bytes"]),
            "peak_memory_ratio": _ratio(mr, mb) if mr is not None and mb else None,
        }
    ordered = [rows[v.label] for v in variants]
    return {"model": name, "batch": batch, "prompt_tokens": pdesc["tokens_per_sample"],
            "visual_tokens_unpruned": base["visual_tokens"], "variants": ordered}


# ================================================================================ targets


def evaluate_targets(card: dict[str, Any], model: str = "scaled", batch: int = 1, *,
                     speedup_tol: float = TARGET_SPEEDUP_TOL, overhead: float = TARGET_OVERHEAD
                     ) -> list[dict[str, Any]]:
    """Acceptance targets on ``model`` at ``batch``: prefill speed-up of PruMerge+ and FastV within
    ``speedup_tol`` of the FLOP-ideal, and every method's overhead <= ``overhead`` of the unpruned
    prefill (defaults: issue 6's 15 % / 5 % on the scaled LLaVA-1.5 model)."""
    found = [r for r in card["results"] if r["model"] == model and r["batch"] == batch]
    if not found:
        return [{"name": "all targets", "model": model, "batch": batch, "method": None, "measured": None,
                 "threshold": None, "met": None, "margin": None,
                 "detail": f"not evaluated: the run has no {model} model at batch {batch}"}]
    return [t for res in found for t in _targets_of(res, model, batch, speedup_tol, overhead)]


def card_targets(card: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target that applies to the card: issue 6's on the scaled LLaVA-1.5 model at batch 1
    (reported as not evaluated when absent, unless the run is of the other families only), and
    issue 17's (``FAMILY_SPEEDUP_TOL`` / ``FAMILY_OVERHEAD``) on each scaled family model at
    every batch measured."""
    names = {r["model"] for r in card["results"]} | {m["name"] for m in card.get("models", [])}
    out = []
    if "scaled" in names or not names & set(FAMILY_MODELS):
        out += evaluate_targets(card)
    for model in FAMILY_MODELS:
        if model in names:
            for batch in sorted({r["batch"] for r in card["results"] if r["model"] == model}):
                out += evaluate_targets(card, model, batch, speedup_tol=FAMILY_SPEEDUP_TOL, overhead=FAMILY_OVERHEAD)
    return out


def _targets_of(res: dict[str, Any], model: str, batch: int, tol: float = TARGET_SPEEDUP_TOL,
                limit: float = TARGET_OVERHEAD) -> list[dict[str, Any]]:
    targets = []
    dtype = res.get("dtype")
    for v in res["variants"]:
        if v["method"] is None:
            continue
        r = v["ratios"]
        if v["method"] in TARGET_SPEEDUP_METHODS:
            dev = r["prefill_vs_ideal"]
            targets.append({
                "name": f"prefill speed-up within {100 * tol:.0f}% of FLOP-ideal", "model": model, "batch": batch,
                "dtype": dtype, "method": v["label"], "measured": dev, "threshold": tol,
                "met": abs(dev) <= tol, "margin": tol - abs(dev),
                "detail": (f"measured {r['prefill_speedup']:.3f}x vs FLOP-ideal {r['flop_ideal_speedup']:.3f}x "
                           f"({100 * dev:+.1f}%) at {v['visual_tokens']:.1f} visual tokens (ideal with the batch's "
                           f"padding: {r.get('flop_ideal_padded_speedup', math.nan):.3f}x); LLM only "
                           f"{r['llm_prefill_speedup']:.3f}x vs {r['llm_flop_ideal_speedup']:.3f}x "
                           f"({100 * r['llm_prefill_vs_ideal']:+.1f}%)"),
            })
        frac = r["overhead_fraction"]
        targets.append({
            "name": f"pruning overhead <= {100 * limit:.0f}% of unpruned prefill", "model": model, "batch": batch,
            "dtype": dtype, "method": v["label"], "measured": frac, "threshold": limit, "met": frac <= limit,
            "margin": limit - frac,
            "detail": (f"{v['median']['overhead_s'] * 1e3:.2f} ms of the method's own work vs "
                       f"{res['variants'][0]['median']['ttft_s'] * 1e3:.1f} ms unpruned prefill "
                       f"({100 * frac:.2f}%)"),
        })
    return targets


# ================================================================================ output


def _ideal_curve(cfg, text_tokens: int, points: Sequence[int], prefix: int = 0) -> list[float]:
    """End-to-end FLOP-ideal speed-ups (batch 1) at ``points`` visual tokens kept in layers >= ``prefix``."""
    from ..cost.analytic import vision_encoder_flops

    n = cfg.vision["projector_rows_per_image"]
    layers = cfg.num_layers
    vf = vision_encoder_flops(cfg, images=1)
    full = vf["vision_tower"] + vf["projector"] + _decoder_flops(cfg, [text_tokens + n] * layers)
    out = []
    for k in points:
        if prefix:  # decoder stage: projector and the first layers see every token
            sched = [text_tokens + n] * prefix + [text_tokens + k] * (layers - prefix)
            pruned = vf["vision_tower"] + vf["projector"] + _decoder_flops(cfg, sched)
        else:
            pruned = vf["vision_tower"] + vf["projector"] * k / n + _decoder_flops(cfg, [text_tokens + k] * layers)
        out.append(full / pruned)
    return out


def _two_level(sched: Sequence[int]) -> tuple[int, int] | None:
    """(prefix layers, tokens after) if a per-layer schedule is full-then-constant (FastV-like)."""
    first = sched[0]
    p = next((i for i, s in enumerate(sched) if s != first), None)
    if p is None or len(set(sched[p:])) != 1:
        return None
    return p, sched[p]


def plot_card(card: dict[str, Any], path: str | Path) -> Path:
    """Prefill speed-up (end to end) vs visual tokens per sample, with the FLOP-ideal curves (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m["name"] for m in card["models"]]
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.6), squeeze=False)
    markers = {b: m for b, m in zip(card["settings"]["batches"], "osD^v<>p*h")}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    method_color = {lab: colors[i % len(colors)] for i, lab in enumerate(card["settings"]["methods"])}
    for ax, mcard in zip(axes[0], card["models"]):
        res = [r for r in card["results"] if r["model"] == mcard["name"] and r.get("dtype") == mcard.get("dtype")]
        if not res:
            continue
        first = min(res, key=lambda r: r["batch"])
        fixed = mcard["config"]["vision"].get("fixed_image_tokens", True) is not None
        cfg = _cfg_from_card(mcard) if fixed else None  # the curves need one fixed-size image per sample
        n = cfg.vision["projector_rows_per_image"] if fixed else int(round(first["visual_tokens_unpruned"]))
        text = int(first["prompt_tokens"][0]) - n
        xs = sorted(set([1, 2, 4, 8] + list(range(16, n + 1, 16)) + [n]))
        if fixed:
            ax.plot(xs, _ideal_curve(cfg, text, xs), color="0.3", lw=1.5,
                    label="FLOP-ideal, tokens pruned before the LLM")
        drawn = set()
        for v in (first["variants"] if fixed else []):
            two = _two_level(v["layer_tokens"][0]) if v["stage"] == "decoder" else None
            if two and two[0] not in drawn:
                drawn.add(two[0])
                p = two[0]
                ks = [k for k in xs if k <= n]
                avg = [(p * n + (cfg.num_layers - p) * k) / cfg.num_layers for k in ks]
                ax.plot(avg, _ideal_curve(cfg, text, ks, prefix=p), color="0.3", lw=1.2, ls="--",
                        label=f"FLOP-ideal, pruned from decoder layer {p} (x = all-layer avg)")
        for r in res:
            for v in r["variants"]:
                if v["method"] is None:
                    continue
                x = v["visual_tokens"]
                c = method_color.get(v["label"], "k")
                ax.plot([x, x], [v["ratios"]["flop_ideal_speedup"], v["ratios"]["prefill_speedup"]], color=c,
                        lw=0.8, alpha=0.6)
                ax.scatter([x], [v["ratios"]["flop_ideal_speedup"]], facecolors="none", edgecolors=c,
                           marker=markers.get(r["batch"], "o"), s=50)
                ax.scatter([x], [v["ratios"]["prefill_speedup"]], color=c, marker=markers.get(r["batch"], "o"), s=50,
                           label=f"{v['label']} (batch {r['batch']})")
        ax.scatter([n], [1.0], color="k", marker="x", label="unpruned")
        ax.set_xlabel("visual tokens per sample (all-layer average)")
        ax.set_ylabel("prefill speed-up (time to first token)")
        ax.set_title(f"{mcard['name']}: {mcard.get('dtype')}, {card['settings']['threads']} thread(s)\n"
                     "filled = measured, hollow = FLOP-ideal for its token counts", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def flop_config_from_card(mcard: dict[str, Any]):
    """The decoder ``ModelConfig`` of a card's model entry (its ``config.decoder``)."""
    from ..cost.analytic import ModelConfig

    d = mcard["config"]["decoder"]
    return ModelConfig(name=mcard["name"], hidden_size=d["hidden"], num_layers=d["layers"], num_heads=d["heads"],
                       num_kv_heads=d["kv_heads"], intermediate_size=d["intermediate"], vocab_size=d["vocab"],
                       head_dim=d["head_dim"])


def _cfg_from_card(mcard: dict[str, Any]):
    from ..cost.analytic import ModelConfig

    c = mcard["config"]
    d, v = c["decoder"], c["vision"]
    return ModelConfig(
        name=mcard["name"], hidden_size=d["hidden"], num_layers=d["layers"], num_heads=d["heads"],
        num_kv_heads=d["kv_heads"], intermediate_size=d["intermediate"], vocab_size=d["vocab"], head_dim=d["head_dim"],
        vision={"image_size": v["image_size"], "patch_size": v["patch_size"], "hidden_size": v["hidden"],
                "num_layers": v["layers"], "intermediate_size": v["intermediate"], "cls_token": True,
                "tokens_per_image": v["patches"] + 1, "projector_rows_per_image": v["patches"],
                "max_images_per_sample": 1},
        projector={"dims": c["projector"]["dims"]})


def _mb(x: Any) -> str:
    return "-" if x is None else f"{x / 1e6:.1f}"


def _x(x: Any, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}x"


def print_card(card: dict[str, Any], console: Any = None) -> None:
    """Rich tables (one per model and batch), the acceptance targets, the notes."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 170))
    s = card["settings"]
    m = card["machine"]
    console.print(f"[bold]{m['cpu_model']}[/], {m['cores_logical']} logical cores, torch {m['torch']}, "
                  f"transformers {m['transformers']}, {s['threads']} thread(s), dtype [bold]{' + '.join(s['dtype'])}[/] on {s.get('device', 'cpu')} "
                  f"(bf16 matmul here: {m['bf16_matmul']['slowdown']:.2f}x the fp32 time), "
                  f"median of {s['repeats']} after {s['warmup']} warm-up, {s['decode_steps']} decode steps")
    for r in card["results"]:
        t = Table(title=f"{r['model']} {r.get('dtype', '')}, batch {r['batch']} (prompt {r['prompt_tokens'][0]} tokens, "
                        f"{r['visual_tokens_unpruned']:.0f} visual)")
        cols = ("variant", "visual tok", "vision ms", "overhead ms (% prefill)", "prefill ms", "speed-up",
                "FLOP-ideal", "vs ideal", "LLM speed-up / ideal", "decode tok/s", "KV MB", "peak mem MB")
        for c in cols:
            t.add_column(c, justify="left" if c == "variant" else "right")
        for v in r["variants"]:
            md, ra = v["median"], v["ratios"]
            pruned = v["method"] is not None
            mem = v["memory"]["peak_rss_delta_bytes"]
            t.add_row(
                v["label"], f"{v['visual_tokens']:.1f}", f"{md['vision_s'] * 1e3:.1f}",
                f"{md['overhead_s'] * 1e3:.2f} ({100 * ra['overhead_fraction']:.2f}%)" if pruned else "-",
                f"{md['ttft_s'] * 1e3:.1f}", _x(ra["prefill_speedup"]),
                _x(ra["flop_ideal_speedup"]), f"{100 * ra['prefill_vs_ideal']:+.1f}%" if pruned else "-",
                f"{_x(ra['llm_prefill_speedup'])} / {_x(ra['llm_flop_ideal_speedup'])}" if pruned else "-",
                f"{md['decode_tokens_per_s']:.1f}" + (f" ({_x(ra['decode_speedup'])})" if pruned else ""),
                _mb(v["kv_cache_bytes"]) + (f" ({_x(ra['kv_cache_ratio'])})" if pruned else ""),
                _mb(mem) + (f" ({_x(ra['peak_memory_ratio'])})" if pruned and mem is not None else ""),
            )
        console.print(t)
        pruned = [v for v in r["variants"] if v["method"] is not None and "overhead_score_s" in v["median"]]
        if pruned:
            split = Table(title=f"{r['model']} {r.get('dtype', '')}, batch {r['batch']}: where the overhead goes (ms, median)")
            for c in ("variant", "stage", *OVERHEAD_PARTS, "total"):
                split.add_column(c, justify="left" if c in ("variant", "stage") else "right")
            for v in pruned:
                md = v["median"]
                split.add_row(v["label"], v.get("stage") or "-",
                              *(f"{md[f'overhead_{p}_s'] * 1e3:.2f}" for p in OVERHEAD_PARTS),
                              f"{md['overhead_s'] * 1e3:.2f}")
            console.print(split)
    console.print("[bold]acceptance targets[/]:")
    for tg in card["targets"]:
        if tg["met"] is None:
            console.print(f"  [yellow]-[/] {tg['name']}: {tg['detail']}")
            continue
        how = (f"[green]MET[/] with {100 * tg['margin']:.1f} points to spare" if tg["met"] else
               f"[red]MISSED[/] by {-100 * tg['margin']:.1f} points")
        console.print(f"  {tg['model']} b={tg['batch']} {tg['method']} ({tg.get('dtype')}): {tg['name']}: {how} "
                      f"(limit {100 * tg['threshold']:.0f}%); {tg['detail']}")
    for note in card["notes"]:
        console.print(f"note: {note}")


# ================================================================================ subprocess entry


def _main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "--probe":
        spec = json.loads(Path(argv[1]).read_text())
        result = _probe_child(spec)
        print("PROBE " + json.dumps(result), flush=True)
        return 0
    print("usage: python -m vlmprune.bench.measure --probe SPEC.json (internal; use `vlmprune bench`)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
